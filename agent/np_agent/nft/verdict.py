"""Decide a flow in Python exactly as the kernel's chains decide its first packet.

Established connections never reach the policy chains again (``ct state established,related
accept`` comes first), so when a policy change removes an allowance, the agent has to find
the connections that are no longer allowed itself and cut them (see ``conntrack.py``). For
that it needs the same verdict the kernel would give a new connection under the new ruleset,
without asking the kernel packet by packet: that is this module.

The walk mirrors ``layout._direction_chain`` and ``layout._policy_chain``: egress on the
source, then ingress on the destination; per direction, a pod that is not in the isolated set
is open, otherwise one of the exact set, the ranges set or the allow-all set must hold the
peer-first key ``peer . pod . proto . port`` (``peer . pod`` for allow-all). IPv6 neighbour
discovery is accepted before either direction is looked at.

It must answer tens of thousands of queries against tens of thousands of elements quickly, so
the elements are indexed once: exact elements in a hash set keyed on the exact tuple (what the
kernel's hash set does), ranged elements grouped by pod address (the second key field, always
one address when the compiler wrote it) and protocol, allow-all elements by pod address, so a
query only scans the elements of the pod it is about.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

from np_agent.ruleset import (
    DIRECTIONS,
    Key,
    Ruleset,
    allow_all_set,
    allow_ranges_set,
    allow_set,
    isolated_set,
)

# ICMPv6 neighbour discovery (router/neighbour solicitation and advertisement): policy-v6
# accepts these before any policy; mirrors layout._ND_TYPES.
ICMPV6 = 58
ND_TYPES = frozenset({133, 134, 135, 136})

Address = str | int
Interval = tuple[int, int]
# peer interval and port interval: a ranged element seen from its (pod, protocol)
PortBox = tuple[int, int, int, int]


@dataclass
class _Direction:
    """The four sets of one direction and one IP version, indexed for lookups."""

    isolated: set[int] = field(default_factory=set)
    isolated_ranges: list[Interval] = field(default_factory=list)
    exact: set[tuple[int, int, int, int]] = field(default_factory=set)  # peer, pod, proto, port
    # The hash set's own elements, looked up as they are rather than indexed again: it is
    # the big one (tens of thousands), and building a matcher must stay cheap.
    exact_keys: Mapping[Key, str] = field(default_factory=dict)
    ranges: dict[tuple[int, int], list[PortBox]] = field(
        default_factory=lambda: defaultdict(list))  # (pod, proto) -> boxes
    # Elements whose pod field is itself a range: the compiler never writes them, but the
    # kernel would honour them, so they are kept (and scanned for every query).
    wide_ranges: list[tuple[Interval, int, PortBox]] = field(default_factory=list)
    allow_all: dict[int, list[Interval]] = field(default_factory=lambda: defaultdict(list))
    wide_allow_all: list[tuple[Interval, Interval]] = field(default_factory=list)

    def add_isolated(self, key: Key) -> None:
        lo, hi = _interval(key[0])
        if lo == hi:
            self.isolated.add(lo)
        else:
            self.isolated_ranges.append((lo, hi))

    def add_port_element(self, key: Key) -> None:
        """An element of the exact or the ranges set: both are ``peer . pod . proto . port``.

        Which set it came from does not change the verdict, only how it is best indexed."""
        peer, pod, proto, port = (_interval(key[0]), _interval(key[1]), key[2], _interval(key[3]))
        assert isinstance(proto, int)
        if peer[0] == peer[1] and pod[0] == pod[1] and port[0] == port[1]:
            self.exact.add((peer[0], pod[0], proto, port[0]))
            return
        box = (peer[0], peer[1], port[0], port[1])
        if pod[0] == pod[1]:
            self.ranges[(pod[0], proto)].append(box)
        else:
            self.wide_ranges.append((pod, proto, box))

    def add_allow_all(self, key: Key) -> None:
        peer, pod = _interval(key[0]), _interval(key[1])
        if pod[0] == pod[1]:
            self.allow_all[pod[0]].append(peer)
        else:
            self.wide_allow_all.append((pod, peer))

    def is_isolated(self, pod: int) -> bool:
        return pod in self.isolated or any(lo <= pod <= hi for lo, hi in self.isolated_ranges)

    def allows(self, pod: int, peer: int, proto: int, port: int) -> bool:
        """The direction chain for one packet: open, or some allow set holds its key."""
        if not self.is_isolated(pod):
            return True
        if ((peer, peer), (pod, pod), proto, (port, port)) in self.exact_keys or (
                (peer, pod, proto, port) in self.exact):
            return True
        if any(_in_box(box, peer, port) for box in self.ranges.get((pod, proto), ())):
            return True
        if any(p[0] <= pod <= p[1] and box_proto == proto and _in_box(box, peer, port)
               for p, box_proto, box in self.wide_ranges):
            return True
        if any(lo <= peer <= hi for lo, hi in self.allow_all.get(pod, ())):
            return True
        return any(p[0] <= pod <= p[1] and a[0] <= peer <= a[1] for p, a in self.wide_allow_all)


def _interval(value: object) -> Interval:
    """Address and port fields are (lo, hi) in a Ruleset; tolerate a bare int as well."""
    if isinstance(value, int):
        return value, value
    assert isinstance(value, tuple) and len(value) == 2
    return value[0], value[1]


def _in_box(box: PortBox, peer: int, port: int) -> bool:
    peer_lo, peer_hi, port_lo, port_hi = box
    return peer_lo <= peer <= peer_hi and port_lo <= port <= port_hi


def _as_int(addr: Address) -> int:
    return addr if isinstance(addr, int) else int(ipaddress.ip_address(addr))


class Matcher:
    """``allowed(src, dst, version, proto, dport)``: would the forward chain let the first
    packet of this connection through under ``ruleset``?

    ``proto`` is the IP protocol number. ``dport`` is the transport destination port, or 0 for
    protocols without ports (ICMP): only allow-all elements admit those, because allow
    elements only carry TCP, UDP or SCTP. ``icmp_type`` matters for ICMPv6 only: neighbour
    discovery is accepted before any policy (conntrack does not track it, but the verdict
    should still be the kernel's).
    """

    def __init__(self, ruleset: Ruleset) -> None:
        self._dirs: dict[tuple[str, int], _Direction] = {}
        for version in (4, 6):
            for direction in DIRECTIONS:
                self._dirs[(direction, version)] = self._index(ruleset, direction, version)

    @staticmethod
    def _index(ruleset: Ruleset, direction: str, version: int) -> _Direction:
        d = _Direction()
        elements = ruleset.elements
        for key in elements.get(isolated_set(direction, version), {}):
            d.add_isolated(key)
        d.exact_keys = elements.get(allow_set(direction, version), {})
        for key in elements.get(allow_ranges_set(direction, version), {}):
            d.add_port_element(key)
        for key in elements.get(allow_all_set(direction, version), {}):
            d.add_allow_all(key)
        return d

    def isolated(self, addr: Address, version: int) -> bool:
        """Is this address isolated in either direction (a pod some policy selects)?"""
        a = _as_int(addr)
        return any(self._dirs[(d, version)].is_isolated(a) for d in DIRECTIONS)

    def allowed(self, src: Address, dst: Address, version: int, proto: int, dport: int, *,
                icmp_type: int | None = None) -> bool:
        if version == 6 and proto == ICMPV6 and icmp_type in ND_TYPES:
            return True
        s, d = _as_int(src), _as_int(dst)
        return (self._dirs[("egress", version)].allows(s, d, proto, dport)
                and self._dirs[("ingress", version)].allows(d, s, proto, dport))
