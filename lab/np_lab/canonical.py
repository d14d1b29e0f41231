"""Compiled elements compared without the identity numbers the compiler chose.

Identity numbers depend on history (the order in which classes appeared), so an agent that
compiled change by change and a compile from scratch name the same identity differently.
``canonical`` replaces each number by what the identity is: its members' peer-map elements and
its sets' elements. It also checks what the kernel would refuse: two map elements for one
address, and a map element that goes to an identity whose chain does not exist.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping
from typing import Any

from np_agent.ruleset import DIRECTIONS, VERSIONS, identity_chain, identity_of_set, peer_map


def canonical(elements: Mapping[str, Mapping[Any, str]], comments: bool = True) -> dict:
    def items(values: Mapping[Any, str]) -> frozenset:
        return frozenset(values.items() if comments else values)

    out: dict[str, Any] = {}
    sets: dict[tuple[str, int, int], dict[str, frozenset]] = defaultdict(dict)
    maps = {peer_map(d, v) for d in DIRECTIONS for v in VERSIONS}
    for name, values in elements.items():
        ident = identity_of_set(name)
        if ident is not None:
            sets[ident][name.rsplit("-", 2)[-2]] = items(values)
        elif name not in maps and values:
            out[name] = items(values)
    members: dict[str, set] = defaultdict(set)
    for name in maps:
        keys = elements.get(name, {})
        assert len({ip for ip, _ in keys}) == len(keys), f"{name}: one address, two identities"
        for (ip, chain), comment in keys.items():
            members[chain].add((ip, comment) if comments else ip)
    identities: Counter = Counter()
    for (direction, version, number), parts in sets.items():
        chain = identity_chain(direction, version, number)
        identities[(direction, version, frozenset(members.pop(chain, ())),
                    parts.get("ports", frozenset()), parts.get("all", frozenset()))] += 1
    assert not members, f"map elements that go to no chain: {sorted(members)}"
    out["identities"] = identities
    return out
