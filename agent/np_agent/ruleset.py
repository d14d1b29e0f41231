"""The desired ruleset as plain data: the contract between the compiler and the dataplane.

The compiler fills it; the dataplane renders, diffs and applies it. Neither side needs the
other's vocabulary: there is no NetworkPolicy here, only a table, its sets and their elements,
and its chains and their rules.

Element keys are canonical so that what the compiler wants and what the kernel reports can be
compared with ``==``: every address or port field is an inclusive integer interval (lo, hi),
even when it is a single value, a protocol field is its IP protocol number, and an interface
name field is the name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Field = int | str | tuple[int, int]
Key = tuple[Field, ...]

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


@dataclass(frozen=True)
class RuleSpec:
    """One rule: its libnftables JSON expression list, the same rule in nft syntax for people
    (checked against the kernel's own listing by a test), and a comment that says why."""

    expr: tuple[Any, ...]
    text: str
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
    elements: dict[str, dict[Key, str]] = field(default_factory=dict)  # set -> key -> comment

    def add_element(self, set_name: str, key: Key, comment: str) -> None:
        self.elements.setdefault(set_name, {})[key] = comment

    def element_count(self) -> int:
        return sum(len(e) for e in self.elements.values())
