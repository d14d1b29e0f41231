"""The desired ruleset as plain data: the contract between the compiler and the dataplane.

The compiler fills it; the dataplane renders, diffs and applies it. Neither side needs the
other's vocabulary: there is no NetworkPolicy here, only a table, its sets and their elements,
and its chains and their rules.

Element keys are canonical so that what the compiler wants and what the kernel reports can be
compared with ``==``: every address or port field is an inclusive integer interval (lo, hi),
even when it is a single value, a protocol field is its IP protocol number, and an interface
name field is the name. An element of a verdict map carries the chain it goes to as one more
field at the end of its key: a pod that changes identity is one element removed and one added.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cache
from typing import Any

Field = int | str | tuple[int, int]
Key = tuple[Field, ...]
Elements = dict[str, dict[Key, str]]  # set name -> element key -> comment (who asked for it)

# nftables data types used in set keys, and how a key field of that type is held.
ADDRESS_TYPES = {"ipv4_addr": 4, "ipv6_addr": 6}
PROTO_TYPE = "inet_proto"
SERVICE_TYPE = "inet_service"
IFNAME_TYPE = "ifname"
PROTO_NUMBERS = {"tcp": 6, "udp": 17, "sctp": 132}
PROTO_NAMES = {v: k for k, v in PROTO_NUMBERS.items()}


@dataclass(frozen=True)
class SetSpec:
    name: str
    key_type: tuple[str, ...]
    interval: bool = False
    counter: bool = False  # per-element packet counters: dump-rules shows which rules are hit
    verdict_map: bool = False  # a vmap: each key's last field is the chain it goes to


@dataclass(frozen=True)
class RuleSpec:
    """One rule: its libnftables JSON expression list, written once (nft.render derives the
    nft text people read from it), and a comment that says why."""

    expr: tuple[Any, ...]
    comment: str


@dataclass(frozen=True)
class ChainSpec:
    name: str
    rules: tuple[RuleSpec, ...]
    hook: str | None = None  # base chains only
    priority: int = 0
    policy: str = "accept"

    @property
    def is_base(self) -> bool:
        return self.hook is not None


@dataclass
class Ruleset:
    table: str
    family: str
    sets: dict[str, SetSpec]
    chains: list[ChainSpec]
    elements: Elements = field(default_factory=dict)

    def add_element(self, set_name: str, key: Key, comment: str) -> None:
        self.elements.setdefault(set_name, {})[key] = comment

    def element_count(self) -> int:
        return sum(len(e) for e in self.elements.values())


@dataclass
class Delta:
    """Element changes since the last compile (NodeCompiler.update): set -> key -> comment; the
    dataplane sends exactly these when the kernel holds the previous state."""

    added: dict[str, dict[Key, str]] = field(default_factory=dict)
    removed: dict[str, dict[Key, str]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)

    def count(self) -> tuple[int, int]:
        return (sum(map(len, self.added.values())), sum(map(len, self.removed.values())))


# ----------------------------------------------------------------- names
# The one place where the table, its sets and their meaning are named: the compiler fills
# these sets, nft.layout builds the chains that look them up, nft.verdict and the conntrack
# cutter read them back. Names are cached: an element holds its set's name and a peer-map
# element its chain's, so one string each, not one per element (150,000 peers).

TABLE = "np-nft"
FAMILY = "inet"
DIRECTIONS = ("ingress", "egress")
VERSIONS = (4, 6)


@cache
def pod_ifaces_set(version: int) -> str:
    """host veth . pod IP: the only source address a pod may use (anti-spoofing)."""
    return f"pod-ifaces-v{version}"


@cache
def isolated_set(direction: str, version: int) -> str:
    return f"{direction}-isolated-v{version}"


@cache
def allow_ranges_set(direction: str, version: int) -> str:
    """peer-range . pod . protocol . port-range: address peers (ipBlock, "every address")."""
    return f"{direction}-allow-ranges-v{version}"


@cache
def allow_all_set(direction: str, version: int) -> str:
    """peer-range . pod: address peers of rules without ports (every protocol, ICMP too)."""
    return f"{direction}-allow-all-v{version}"


@cache
def peer_map(direction: str, version: int) -> str:
    """peer pod IP -> goto the chain of its identity: pods that some policy here admits."""
    return f"{direction}-peers-v{version}"


def _identity_base(direction: str, version: int, ident: int) -> tuple[str, str]:
    return f"{direction}-{'from' if direction == 'ingress' else 'to'}-id{ident}", f"v{version}"


@cache
def identity_chain(direction: str, version: int, ident: int) -> str:
    """What a peer identity may reach (ingress: which local pods and ports it may reach)."""
    base, v = _identity_base(direction, version, ident)
    return f"{base}-{v}"


@cache
def identity_ports_set(direction: str, version: int, ident: int) -> str:
    """pod . protocol . port-range: what one peer identity may reach, rules with ports."""
    base, v = _identity_base(direction, version, ident)
    return f"{base}-ports-{v}"


@cache
def identity_all_set(direction: str, version: int, ident: int) -> str:
    """pod: the local pods one peer identity may reach on every protocol (rules without
    ports)."""
    base, v = _identity_base(direction, version, ident)
    return f"{base}-all-{v}"


_IDENTITY_SET = re.compile(r"^(ingress|egress)-(?:from|to)-id(\d+)-(ports|all)-v([46])$")


def identity_of_set(name: str) -> tuple[str, int, int] | None:
    """(direction, version, identity) of an identity's set, None for any other set."""
    m = _IDENTITY_SET.match(name)
    return None if m is None else (m.group(1), int(m.group(4)), int(m.group(2)))


@cache
def direction_chain(direction: str, version: int) -> str:
    """Where a new connection meets one pod's isolation and allowances, per direction."""
    return f"{direction}-v{version}"


@cache
def cidr_chain(direction: str, version: int) -> str:
    """Address peers (ipBlock, rules without peers), then the drop: where every identity chain
    ends when none of its own sets holds the packet."""
    return f"{direction}-cidrs-v{version}"


@cache
def policy_chain(version: int) -> str:
    return f"policy-v{version}"


@cache
def antispoof_chain(version: int) -> str:
    return f"antispoof-v{version}"


ISOLATION_SETS = frozenset(isolated_set(d, v) for d in DIRECTIONS for v in VERSIONS)
STATIC_ALLOW_SETS = frozenset(f(d, v) for f in (allow_ranges_set, allow_all_set, peer_map)
                              for d in DIRECTIONS for v in VERSIONS)


def is_allow_set(name: str) -> bool:
    """Does this set (or map) hold allowances? Removing an element may cut connections."""
    return name in STATIC_ALLOW_SETS or identity_of_set(name) is not None
