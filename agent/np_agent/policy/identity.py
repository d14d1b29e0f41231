"""Peer identities: classes of pods that every policy rule in use on this node treats alike.

A pod's *signature* is the set of rules (policy, direction, index) of this node's policies
whose pod selectors match it, each with the numbers its egress named ports resolve to on it.
Pods with the same signature are allowed exactly the same things as peers, so the dataplane
needs to tell them apart only by class: the allow sets are keyed on the class (its chain),
and each pod is one element of a map from its IP to its class. Labels no rule looks at never
split a class, and replicas of a Deployment share one.

``Identities`` keeps the partition up to date as signatures change, and keeps it cheap to
change: a class whose pods all change signature together is *relabelled* (same number, so no
map element moves; a new policy that admits an app does this); a class that splits keeps its
number for the pods that stay; a pod whose new signature already has a class joins it.
Numbers are remembered across a full recomputation (a relist), so a relist does not renumber.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

RuleKey = tuple[str, str, int]  # (policy ref, "ingress" | "egress", rule index)
# a rule, and the numbers its egress named ports resolve to on the peer (None: no such port)
SigItem = tuple[RuleKey, tuple[int | None, ...] | None]
Signature = frozenset[SigItem]
EMPTY: Signature = frozenset()


@dataclass(eq=False)
class Identity:
    number: int
    signature: Signature
    members: set[str] = field(default_factory=set)
    # (direction, version) pairs for which the dataplane has this identity's chain: only
    # there do its members get map elements
    chains: frozenset[tuple[str, int]] = frozenset()


class Identities:
    """The partition of pods (by ref) into identities; pods with an empty signature (no rule
    here admits them) belong to none."""

    def __init__(self) -> None:
        self.by_number: dict[int, Identity] = {}
        self.by_signature: dict[Signature, Identity] = {}
        self.of_pod: dict[str, Identity] = {}
        self.by_key: dict[RuleKey, set[int]] = defaultdict(set)
        self._remembered: dict[Signature, int] = {}
        self._next = 1

    def reset(self) -> None:
        """Forget every pod, but remember which number each signature had."""
        self._remembered.update((i.signature, i.number) for i in self.by_number.values())
        self.by_number.clear()
        self.by_signature.clear()
        self.of_pod.clear()
        self.by_key.clear()

    def signature(self, ref: str) -> Signature:
        ident = self.of_pod.get(ref)
        return EMPTY if ident is None else ident.signature

    def assign(self, changes: dict[str, Signature]) -> tuple[set[int], set[str]]:
        """Give pods their new signatures. Returns the identities whose signature or existence
        changed (their sets must be recomputed) and the pods that changed identity (their map
        elements must be)."""
        touched: set[int] = set()
        moved: set[str] = set()
        groups: dict[int | None, dict[Signature, list[str]]] = defaultdict(
            lambda: defaultdict(list))
        for ref, sig in changes.items():
            old = self.of_pod.get(ref)
            if (old.signature if old else EMPTY) != sig:
                groups[old.number if old else None][sig].append(ref)
        for number, by_sig in groups.items():
            ident = self.by_number.get(number) if number is not None else None
            if ident is not None and len(by_sig) == 1:
                (sig, refs), = by_sig.items()
                if sig and len(refs) == len(ident.members) and sig not in self.by_signature:
                    self._relabel(ident, sig)
                    touched.add(ident.number)
                    continue
            for sig, refs in by_sig.items():
                for ref in refs:
                    touched |= self._move(ref, sig)
                    moved.add(ref)
        return touched, moved

    def _relabel(self, ident: Identity, sig: Signature) -> None:
        self._unindex(ident)
        ident.signature = sig
        self._index(ident)

    def _move(self, ref: str, sig: Signature) -> set[int]:
        touched = set()
        old = self.of_pod.pop(ref, None)
        if old is not None:
            old.members.discard(ref)
            if not old.members:
                self._unindex(old)
                del self.by_number[old.number]
                touched.add(old.number)
        if sig:
            ident = self.by_signature.get(sig)
            if ident is None:
                ident = self._create(sig)
                touched.add(ident.number)
            ident.members.add(ref)
            self.of_pod[ref] = ident
        return touched

    def _create(self, sig: Signature) -> Identity:
        number = self._remembered.pop(sig, None)
        if number is None or number in self.by_number:
            number = self._next
        self._next = max(self._next, number + 1)
        ident = Identity(number, sig)
        self.by_number[number] = ident
        self._index(ident)
        return ident

    def _index(self, ident: Identity) -> None:
        self.by_signature[ident.signature] = ident
        for key, _ in ident.signature:
            self.by_key[key].add(ident.number)

    def _unindex(self, ident: Identity) -> None:
        del self.by_signature[ident.signature]
        for key, _ in ident.signature:
            numbers = self.by_key.get(key)
            if numbers is not None:
                numbers.discard(ident.number)
                if not numbers:
                    del self.by_key[key]
