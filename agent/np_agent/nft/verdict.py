"""Decide a flow in Python exactly as the kernel's chains decide its first packet.

Established connections never reach the policy chains again (``ct state established,related
accept`` comes first), so when a policy change removes an allowance, the agent has to find
the connections that are no longer allowed itself and cut them (see ``conntrack.py``). For
that it needs the same verdict the kernel would give a new connection under the new ruleset,
without asking the kernel packet by packet: that is this module.

The walk mirrors the chains of ``layout``: egress on the source, then ingress on the
destination; per direction, a pod that is not in the isolated set is open; otherwise the peer
map sends a peer pod to its identity's chain, whose sets hold ``pod . proto . port`` (or just
``pod``, every protocol), and then, as in the kernel, the address-range sets (``peer . pod .
proto . port`` and ``peer . pod``) are looked at. IPv6 neighbour discovery is accepted before
either direction is looked at.

It must answer tens of thousands of queries quickly, so the elements are indexed once: the
peer map as a dict, identity elements and ranged elements grouped by pod address (always one
address when the compiler wrote it) and protocol, so a query only scans the elements of the
pod it is about.
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
    identity_chain,
    identity_of_set,
    identity_ports_set,
    isolated_set,
    peer_map,
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
class _Identity:
    """The two sets of one peer identity: pod -> protocol -> port intervals, and pods; each
    with its element's comment (the policy rules behind it)."""

    ports: dict[tuple[int, int], list[tuple[int, int, str]]] = field(
        default_factory=lambda: defaultdict(list))
    wide_ports: list[tuple[Interval, int, Interval, str]] = field(default_factory=list)
    all: list[tuple[int, int, str]] = field(default_factory=list)

    def admits(self, pod: int, proto: int, port: int) -> str | None:
        """The comment of the element that admits the packet, None if none does."""
        for lo, hi, why in self.ports.get((pod, proto), ()):
            if lo <= port <= hi:
                return why
        for p, pr, span, why in self.wide_ports:
            if p[0] <= pod <= p[1] and pr == proto and span[0] <= port <= span[1]:
                return why
        return next((why for lo, hi, why in self.all if lo <= pod <= hi), None)

    def offers(self, pod: int) -> list[tuple[int, int, int, str]]:
        """(protocol, port range, comment) of everything this identity may reach on ``pod``
        (protocol 0: every protocol): what a near miss was near to."""
        out = [(proto, lo, hi, why) for (p, proto), items in self.ports.items() if p == pod
               for lo, hi, why in items]
        return out + [(0, 0, 65535, why) for lo, hi, why in self.all if lo <= pod <= hi]


@dataclass
class _Direction:
    """The sets of one direction and one IP version, indexed for lookups."""

    isolated: dict[int, str] = field(default_factory=dict)  # pod -> who isolates it
    isolated_ranges: list[tuple[int, int, str]] = field(default_factory=list)
    peers: dict[int, str] = field(default_factory=dict)  # peer pod IP -> identity chain
    identities: dict[str, _Identity] = field(default_factory=lambda: defaultdict(_Identity))
    ranges: dict[tuple[int, int], list[tuple[PortBox, str]]] = field(
        default_factory=lambda: defaultdict(list))  # (pod, proto) -> boxes
    # Elements whose pod field is itself a range: the compiler never writes them, but the
    # kernel would honour them, so they are kept (and scanned for every query).
    wide_ranges: list[tuple[Interval, int, PortBox, str]] = field(default_factory=list)
    allow_all: dict[int, list[tuple[int, int, str]]] = field(
        default_factory=lambda: defaultdict(list))
    wide_allow_all: list[tuple[Interval, Interval, str]] = field(default_factory=list)

    def add_isolated(self, key: Key, why: str = "") -> None:
        lo, hi = _interval(key[0])
        if lo == hi:
            self.isolated[lo] = why
        else:
            self.isolated_ranges.append((lo, hi, why))

    def add_peer(self, key: Key, why: str = "") -> None:
        lo, _ = _interval(key[0])
        target = key[-1]
        assert isinstance(target, str)
        self.peers[lo] = target

    def add_identity_ports(self, chain: str, key: Key, why: str = "") -> None:
        pod, proto, port = _interval(key[0]), key[1], _interval(key[2])
        assert isinstance(proto, int)
        ident = self.identities[chain]
        if pod[0] == pod[1]:
            ident.ports[(pod[0], proto)].append((*port, why))
        else:
            ident.wide_ports.append((pod, proto, port, why))

    def add_identity_all(self, chain: str, key: Key, why: str = "") -> None:
        self.identities[chain].all.append((*_interval(key[0]), why))

    def add_port_element(self, key: Key, why: str = "") -> None:
        """An element of the ranges set: ``peer . pod . proto . port``."""
        peer, pod, proto, port = (_interval(key[0]), _interval(key[1]), key[2], _interval(key[3]))
        assert isinstance(proto, int)
        box = (peer[0], peer[1], port[0], port[1])
        if pod[0] == pod[1]:
            self.ranges[(pod[0], proto)].append((box, why))
        else:
            self.wide_ranges.append((pod, proto, box, why))

    def add_allow_all(self, key: Key, why: str = "") -> None:
        peer, pod = _interval(key[0]), _interval(key[1])
        if pod[0] == pod[1]:
            self.allow_all[pod[0]].append((*peer, why))
        else:
            self.wide_allow_all.append((pod, peer, why))

    def isolated_by(self, pod: int) -> str | None:
        """The isolation element's comment ("ns/pod by ns/policy, ..."), None: not isolated."""
        if pod in self.isolated:
            return self.isolated[pod]
        return next((why for lo, hi, why in self.isolated_ranges if lo <= pod <= hi), None)

    def is_isolated(self, pod: int) -> bool:
        return self.isolated_by(pod) is not None

    def admits(self, pod: int, peer: int, proto: int, port: int) -> str | None:
        """The direction's chains for one packet of an isolated pod: the comment of the
        element that admits it (the peer's identity chain first, then the address ranges, as
        the kernel looks), None when the packet is dropped."""
        chain = self.peers.get(peer)
        if chain is not None and chain in self.identities:
            why = self.identities[chain].admits(pod, proto, port)
            if why is not None:
                return why
        for box, why in self.ranges.get((pod, proto), ()):
            if _in_box(box, peer, port):
                return why
        for p, box_proto, box, why in self.wide_ranges:
            if p[0] <= pod <= p[1] and box_proto == proto and _in_box(box, peer, port):
                return why
        for lo, hi, why in self.allow_all.get(pod, ()):
            if lo <= peer <= hi:
                return why
        return next((why for p, a, why in self.wide_allow_all
                     if p[0] <= pod <= p[1] and a[0] <= peer <= a[1]), None)

    def allows(self, pod: int, peer: int, proto: int, port: int) -> bool:
        """Open (not isolated), or some element admits the packet."""
        return not self.is_isolated(pod) or self.admits(pod, peer, proto, port) is not None

    def near(self, pod: int, peer: int) -> list[tuple[int, int, int, str]]:
        """What this peer may reach on ``pod`` at all, (protocol, port range, comment):
        the nearest misses of a packet no element admits (right peer, wrong port)."""
        out = []
        chain = self.peers.get(peer)
        if chain is not None and chain in self.identities:
            out += self.identities[chain].offers(pod)
        out += [(proto, box[2], box[3], why) for (p, proto), items in self.ranges.items()
                if p == pod for box, why in items if box[0] <= peer <= box[1]]
        return out


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
        self._dirs: dict[tuple[str, int], _Direction] = {
            (d, v): _Direction() for v in (4, 6) for d in DIRECTIONS}
        for name, items in ruleset.elements.items():
            self._index(name, items)

    def _index(self, name: str, items: Mapping[Key, str]) -> None:
        ident = identity_of_set(name)
        if ident is not None:
            direction, version, number = ident
            d = self._dirs[(direction, version)]
            chain = identity_chain(direction, version, number)
            add = (d.add_identity_ports if name == identity_ports_set(*ident)
                   else d.add_identity_all)
            for key, why in items.items():
                add(chain, key, why)
            return
        for (direction, version), d in self._dirs.items():
            adder = {isolated_set(direction, version): d.add_isolated,
                     peer_map(direction, version): d.add_peer,
                     allow_ranges_set(direction, version): d.add_port_element,
                     allow_all_set(direction, version): d.add_allow_all}.get(name)
            if adder is not None:
                for key, why in items.items():
                    adder(key, why)
                return

    def direction(self, direction: str, version: int) -> _Direction:
        """One direction's indexed sets (explain asks them why)."""
        return self._dirs[(direction, version)]

    def direction_allows(self, direction: str, version: int, pod: Address, peer: Address,
                         proto: int, dport: int) -> bool:
        """One direction's chains alone: is ``pod`` (open, or) allowed to or from ``peer``?"""
        return self._dirs[(direction, version)].allows(_as_int(pod), _as_int(peer), proto, dport)

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
