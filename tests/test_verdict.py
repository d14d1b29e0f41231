"""The indexed Matcher must decide every flow exactly as the kernel's chains would.

`oracle.lookup` walks a compiled Ruleset element by element the way the chains in layout.py
do; the Matcher indexes the same elements for speed. Random clusters (the same generator as
test_property.py) with overlapping ranges, excepts, endPorts and named ports must get the
same verdict from both for every probed flow, including addresses and ports at the edges of
the compiled intervals, where an off-by-one in an index would show.
"""

from __future__ import annotations

import ipaddress
import random

import pytest

from np_agent.nft import layout
from np_agent.nft.verdict import Matcher
from np_agent.policy.compiler import compile_state
from np_agent.ruleset import (
    PROTO_NUMBERS,
    Ruleset,
    allow_all_set,
    allow_ranges_set,
    identity_chain,
    identity_ports_set,
    isolated_set,
    peer_map,
)
from oracle import lookup
from test_property import random_state

PROTOS = ["TCP", "UDP", "SCTP", "ICMP"]
ICMP_NUMBER = {4: 1, 6: 58}


def _edges(rs: Ruleset, version: int) -> tuple[list[int], list[int]]:
    """Addresses and ports at and around every interval bound of the compiled elements."""
    addrs, ports = set(), {0, 1, 80, 65535}
    for name, elements in rs.elements.items():
        if not name.endswith(f"-v{version}") or name.startswith("pod-ifaces"):
            continue
        for key in elements:
            for i, fld in enumerate(key):
                if not isinstance(fld, tuple):
                    continue
                values = {fld[0] - 1, fld[0], fld[1], fld[1] + 1}
                (ports if i == 3 else addrs).update(values)
    top = 2**32 - 1 if version == 4 else 2**128 - 1
    return sorted(a for a in addrs if 0 <= a <= top), sorted(p for p in ports if 0 <= p <= 65535)


def _text(version: int, value: int) -> str:
    return str(ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value))


def _check_flows(rs: Ruleset, rng: random.Random, flows: int) -> None:
    matcher = Matcher(rs)
    for version in (4, 6):
        addrs, ports = _edges(rs, version)
        if len(addrs) < 2:
            continue
        for _ in range(flows):
            src, dst = rng.sample(addrs, 2)
            proto = rng.choice(PROTOS)
            port = rng.choice(ports) if proto != "ICMP" else 0
            number = PROTO_NUMBERS.get(proto.lower(), ICMP_NUMBER[version])
            want = lookup(rs, _text(version, src), _text(version, dst), proto, port)
            # addresses as text for half the queries, as integers for the other half
            s, d = (_text(version, src), _text(version, dst)) if rng.random() < 0.5 else (src, dst)
            assert matcher.allowed(s, d, version, number, port) == want, (
                version, _text(version, src), _text(version, dst), proto, port, want)


@pytest.mark.parametrize("seed", range(60))
def test_matcher_agrees_with_the_chain_walk(seed):
    rs = layout.ruleset(compile_state(random_state(seed)).elements)
    _check_flows(rs, random.Random(seed), 300)


@pytest.mark.parametrize("seed", range(3))
def test_matcher_agrees_on_large_clusters(seed):
    rs = layout.ruleset(compile_state(random_state(1000 + seed, n_pods=60, n_policies=40)).elements)
    _check_flows(rs, random.Random(seed), 1000)


def _ip(text: str) -> tuple[int, int]:
    value = int(ipaddress.ip_address(text))
    return value, value


def test_elements_whose_pod_field_is_a_range_still_count():
    """The compiler always writes one pod address, but the kernel would honour a range there
    too; the matcher must not silently ignore such an element."""
    rs = layout.empty_ruleset()
    pods = (int(ipaddress.ip_address("10.0.0.0")), int(ipaddress.ip_address("10.0.0.255")))
    rs.add_element(isolated_set("ingress", 4), (_ip("10.0.0.5"),), "")
    rs.add_element(allow_ranges_set("ingress", 4),
                   (_ip("10.1.0.1"), pods, 6, (80, 90)), "")
    rs.add_element(allow_all_set("ingress", 4), (_ip("10.1.0.2"), pods), "")
    m = Matcher(rs)
    assert m.allowed("10.1.0.1", "10.0.0.5", 4, 6, 85)
    assert not m.allowed("10.1.0.1", "10.0.0.5", 4, 17, 85)
    assert not m.allowed("10.1.0.1", "10.0.0.5", 4, 6, 91)
    assert m.allowed("10.1.0.2", "10.0.0.5", 4, 1, 0)
    assert not m.allowed("10.1.0.3", "10.0.0.5", 4, 6, 80)
    for src, dst, proto, port in (("10.1.0.1", "10.0.0.5", 6, 85), ("10.1.0.2", "10.0.0.5", 1, 0),
                                  ("10.1.0.3", "10.0.0.5", 6, 80)):
        name = {6: "TCP", 1: "ICMP"}[proto]
        assert m.allowed(src, dst, 4, proto, port) == lookup(rs, src, dst, name, port)


def test_icmp_only_through_allow_all_and_neighbour_discovery_always():
    rs = layout.empty_ruleset()
    for version, pod, peer in ((4, "10.0.0.5", "10.0.0.6"), (6, "fd00::5", "fd00::6")):
        rs.add_element(isolated_set("ingress", version), (_ip(pod),), "")
        chain = identity_chain("ingress", version, 1)
        rs.add_element(peer_map("ingress", version), (_ip(peer), chain), "")
        rs.add_element(identity_ports_set("ingress", version, 1), (_ip(pod), 6, (0, 0)), "")
    m = Matcher(rs)
    assert m.allowed("10.0.0.6", "10.0.0.5", 4, 6, 0)  # TCP to port 0 is a port like any other
    assert not m.allowed("10.0.0.6", "10.0.0.5", 4, 1, 0)  # ICMP needs allow-all
    assert not m.allowed("fd00::6", "fd00::5", 6, 58, 0, icmp_type=128)  # echo request
    assert m.allowed("fd00::6", "fd00::5", 6, 58, 0, icmp_type=135)  # neighbour solicitation
    assert m.isolated("10.0.0.5", 4) and not m.isolated("10.0.0.6", 4)
