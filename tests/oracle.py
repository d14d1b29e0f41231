"""Two independent ways to answer "is this packet allowed?", for property tests.

``evaluate`` (np_lab.reference) reads the NetworkPolicy objects directly, following the API
reference word by word, with no intervals, boxes or sets. ``lookup`` walks a compiled Ruleset
the way the kernel's chains do. The compiler is right when both agree on every flow.
"""

from __future__ import annotations

import ipaddress

from np_agent.ruleset import (
    PROTO_NUMBERS,
    Ruleset,
    allow_all_set,
    allow_ranges_set,
    identity_all_set,
    identity_of_set,
    identity_ports_set,
    isolated_set,
    peer_map,
)
from np_lab.reference import evaluate  # noqa: F401 - the oracle's other half, re-exported


def _contains(key, probe) -> bool:
    for field, value in zip(key, probe, strict=True):
        if isinstance(field, tuple):
            if not field[0] <= value <= field[1]:
                return False
        elif field != value:
            return False
    return True


def _in_set(rs: Ruleset, name: str, probe: tuple) -> bool:
    return any(_contains(k, probe) for k in rs.elements.get(name, {}))


def _identity_allows(rs: Ruleset, direction: str, v: int, peer: int, me: int, proto: int,
                     port: int) -> bool:
    """The peer map sends the peer to its identity's chain; that chain's two sets."""
    for key in rs.elements.get(peer_map(direction, v), {}):
        if not _contains(key[:1], (peer,)):
            continue
        chain = key[1]
        for name in rs.elements:
            ident = identity_of_set(name)
            if ident is None or ident[:2] != (direction, v):
                continue
            if chain != name.replace("-ports-", "-").replace("-all-", "-"):
                continue
            if name == identity_ports_set(*ident) and proto in (6, 17, 132) and _in_set(
                    rs, name, (me, proto, port)):
                return True
            if name == identity_all_set(*ident) and _in_set(rs, name, (me,)):
                return True
    return False


def lookup(rs: Ruleset, src: str, dst: str, proto: str, port: int) -> bool:
    """What the forward chain decides for the first packet of a connection."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    v = s.version
    proto_num = PROTO_NUMBERS.get(proto.lower(), 1)
    for direction, me, peer in (("egress", int(s), int(d)), ("ingress", int(d), int(s))):
        if not _in_set(rs, isolated_set(direction, v), (me,)):
            continue
        if _identity_allows(rs, direction, v, peer, me, proto_num, port):
            continue
        if proto_num in (6, 17, 132) and _in_set(rs, allow_ranges_set(direction, v),
                                                  (peer, me, proto_num, port)):
            continue
        if _in_set(rs, allow_all_set(direction, v), (peer, me)):
            continue
        return False
    return True
