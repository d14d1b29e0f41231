"""Make the kernel hold the desired ruleset: render, diff, and apply in ONE transaction.

The dataplane knows tables, sets, chains and elements; it does not know what a NetworkPolicy
is. A reconcile reads what the kernel holds in our table (and only our table), computes the
difference and sends it as one atomic batch:

* first apply: table, sets, chains, rules and elements in one batch;
* steady state: only element additions and deletions, so the table, its base chain and its
  hook are never deleted and re-created (kube-network-policies #402 lost packets exactly then);
* drift (someone flushed the table, edited a chain, removed elements): the same diff restores
  what is missing in the next reconcile, still in one batch. Only a set whose declaration is
  incompatible (wrong type) forces a rebuild of the table, also inside one batch.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from np_agent.memory import release
from np_agent.nft.generation import ruleset_generation
from np_agent.nft.libnft import Nft
from np_agent.ruleset import (
    ADDRESS_TYPES,
    IFNAME_TYPE,
    PROTO_NAMES,
    PROTO_NUMBERS,
    PROTO_TYPE,
    SERVICE_TYPE,
    ChainSpec,
    Field,
    Key,
    Ruleset,
    SetSpec,
)

BIG_CHANGE = 5000  # elements; after a transaction this big, freed heap is given back

# ------------------------------------------------------------------- key <-> JSON


def _address(version: int, value: int) -> str:
    return str(ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value))


def _render_field(ftype: str, value: Field) -> Any:
    if ftype == IFNAME_TYPE:
        return value
    if ftype == PROTO_TYPE:
        assert isinstance(value, int)
        return PROTO_NAMES.get(value, value)
    assert isinstance(value, tuple)
    lo, hi = value
    if ftype == SERVICE_TYPE:
        return lo if lo == hi else {"range": [lo, hi]}
    version = ADDRESS_TYPES[ftype]
    if lo == hi:
        return _address(version, lo)
    size = hi - lo + 1
    bits = 32 if version == 4 else 128
    if size & (size - 1) == 0 and lo % size == 0:
        return {"prefix": {"addr": _address(version, lo), "len": bits - size.bit_length() + 1}}
    return {"range": [_address(version, lo), _address(version, hi)]}


def render_key(spec: SetSpec, key: Key) -> Any:
    fields = [_render_field(t, v) for t, v in zip(spec.key_type, key, strict=True)]
    return fields[0] if len(fields) == 1 else {"concat": fields}


def _parse_field(ftype: str, value: Any) -> Field:
    if ftype == IFNAME_TYPE:
        return str(value)
    if ftype == PROTO_TYPE:
        return value if isinstance(value, int) else PROTO_NUMBERS[value]
    if ftype == SERVICE_TYPE:
        if isinstance(value, dict):
            lo, hi = value["range"]
            return int(lo), int(hi)
        return int(value), int(value)
    if isinstance(value, dict) and "prefix" in value:
        net = ipaddress.ip_network(f"{value['prefix']['addr']}/{value['prefix']['len']}")
        return int(net.network_address), int(net.broadcast_address)
    if isinstance(value, dict) and "range" in value:
        lo, hi = value["range"]
        return int(ipaddress.ip_address(lo)), int(ipaddress.ip_address(hi))
    ip = int(ipaddress.ip_address(value))
    return ip, ip


def parse_element(spec: SetSpec, elem: Any) -> tuple[Key, str]:
    """One element of `nft -j list` output -> (canonical key, comment)."""
    comment = ""
    if isinstance(elem, dict) and "elem" in elem:
        comment = elem["elem"].get("comment", "")
        elem = elem["elem"]["val"]
    values = elem["concat"] if isinstance(elem, dict) and "concat" in elem else [elem]
    key = tuple(_parse_field(t, v) for t, v in zip(spec.key_type, values, strict=True))
    return key, comment


# ------------------------------------------------------------------- what the kernel holds


@dataclass
class KernelSet:
    key_type: tuple[str, ...]
    interval: bool
    elements: dict[Key, str]


@dataclass
class KernelChain:
    hook: str | None
    priority: int | None
    policy: str | None
    comments: list[str] = field(default_factory=list)


@dataclass
class KernelTable:
    sets: dict[str, KernelSet] = field(default_factory=dict)
    chains: dict[str, KernelChain] = field(default_factory=dict)


def read_table(objects: list[dict[str, Any]]) -> KernelTable:
    table = KernelTable()
    for obj in objects:
        if "set" in obj:
            s = obj["set"]
            ktype = tuple(s["type"]) if isinstance(s["type"], list) else (s["type"],)
            spec = SetSpec(s["name"], ktype)
            elements = dict(parse_element(spec, e) for e in s.get("elem", []))
            table.sets[s["name"]] = KernelSet(ktype, "interval" in s.get("flags", []), elements)
        elif "chain" in obj:
            c = obj["chain"]
            table.chains[c["name"]] = KernelChain(c.get("hook"), c.get("prio"), c.get("policy"))
        elif "rule" in obj:
            r = obj["rule"]
            table.chains[r["chain"]].comments.append(r.get("comment", ""))
    return table


# ------------------------------------------------------------------- the plan


@dataclass
class Plan:
    commands: list[dict[str, Any]]
    added: int = 0
    removed: int = 0
    rewritten_chains: list[str] = field(default_factory=list)
    rebuild: bool = False


class _Builder:
    def __init__(self, rs: Ruleset) -> None:
        self.rs = rs
        self.ident = {"family": rs.family, "table": rs.table}

    def table(self) -> dict[str, Any]:
        return {"table": {"family": self.rs.family, "name": self.rs.table}}

    def set_decl(self, spec: SetSpec) -> dict[str, Any]:
        decl: dict[str, Any] = {**self.ident, "name": spec.name,
                                "type": list(spec.key_type) if len(spec.key_type) > 1
                                else spec.key_type[0]}
        if spec.interval:
            decl["flags"] = ["interval"]
        if spec.counter:
            decl["stmt"] = [{"counter": None}]
        return {"set": decl}

    def chain_decl(self, chain: ChainSpec) -> dict[str, Any]:
        decl: dict[str, Any] = {**self.ident, "name": chain.name}
        if chain.is_base:
            decl.update(type="filter", hook=chain.hook, prio=chain.priority, policy=chain.policy)
        return {"chain": decl}

    def rules(self, chain: ChainSpec) -> list[dict[str, Any]]:
        return [{"add": {"rule": {**self.ident, "chain": chain.name, "expr": list(r.expr),
                                  "comment": r.comment}}} for r in chain.rules]

    def elements(self, verb: str, spec: SetSpec, items: dict[Key, str]) -> list[dict[str, Any]]:
        if not items:
            return []
        elems = [{"elem": {"val": render_key(spec, k), "comment": c}} if c
                 else render_key(spec, k) for k, c in items.items()]
        return [{verb: {"element": {**self.ident, "name": spec.name, "elem": elems}}}]


def expected_table(rs: Ruleset) -> KernelTable:
    """What the kernel holds right after `rs` was applied: the agent's memory of its last
    transaction, so that steady-state reconciles need not list tens of thousands of elements."""
    return KernelTable(
        sets={n: KernelSet(s.key_type, s.interval, dict(rs.elements.get(n, {})))
              for n, s in rs.sets.items()},
        chains={c.name: KernelChain(c.hook, c.priority if c.is_base else None,
                                    c.policy if c.is_base else None,
                                    [r.comment for r in c.rules]) for c in rs.chains})


def _set_compatible(spec: SetSpec, have: KernelSet) -> bool:
    return have.key_type == spec.key_type and have.interval == spec.interval


def _chain_current(chain: ChainSpec, have: KernelChain) -> bool:
    return have.comments == [r.comment for r in chain.rules]


def _base_compatible(chain: ChainSpec, have: KernelChain) -> bool:
    return (have.hook, have.priority, have.policy) == (
        (chain.hook, chain.priority, chain.policy) if chain.is_base else (None, None, None))


def plan(desired: Ruleset, current: KernelTable | None) -> Plan:
    """The one batch that turns ``current`` (None: no table) into ``desired``."""
    b = _Builder(desired)
    rebuild = current is not None and (
        any(name in current.sets and not _set_compatible(spec, current.sets[name])
            for name, spec in desired.sets.items())
        or any(c.name in current.chains and not _base_compatible(c, current.chains[c.name])
               for c in desired.chains))
    cmds: list[dict[str, Any]] = []
    if rebuild:
        cmds.append({"delete": b.table()})
        current = None
    have = current or KernelTable()
    result = Plan(cmds, rebuild=rebuild)
    cmds.append({"add": b.table()})

    rewrite = [c for c in desired.chains
               if c.name in have.chains and not _chain_current(c, have.chains[c.name])]
    cmds.extend({"flush": {"chain": {**b.ident, "name": c.name}}} for c in rewrite)
    wanted_chains = {c.name for c in desired.chains}
    for name in have.chains.keys() - wanted_chains:  # left by an older layout
        cmds.append({"flush": {"chain": {**b.ident, "name": name}}})
        cmds.append({"delete": {"chain": {**b.ident, "name": name}}})
    for name in have.sets.keys() - desired.sets.keys():
        cmds.append({"delete": {"set": {**b.ident, "name": name}}})
    cmds.extend({"add": b.set_decl(s)} for s in desired.sets.values() if s.name not in have.sets)
    cmds.extend({"add": b.chain_decl(c)} for c in desired.chains if c.name not in have.chains)

    for name, spec in desired.sets.items():
        want = desired.elements.get(name, {})
        got = have.sets[name].elements if name in have.sets else {}
        stale = {k: c for k, c in got.items() if want.get(k) != c}
        missing = {k: c for k, c in want.items() if got.get(k) != c}
        cmds.extend(b.elements("delete", spec, stale))
        cmds.extend(b.elements("add", spec, missing))
        result.removed += len(stale)
        result.added += len(missing)

    for chain in desired.chains:
        if chain.name not in have.chains or chain in rewrite:
            cmds.extend(b.rules(chain))
            result.rewritten_chains.append(chain.name)
    return result


def plan_delta(desired: Ruleset, added: dict[str, dict[Key, str]],
               removed: dict[str, dict[Key, str]]) -> Plan:
    """The batch for known element changes (an element whose comment changed is in both)."""
    b = _Builder(desired)
    cmds: list[dict[str, Any]] = []
    for name, items in removed.items():
        cmds.extend(b.elements("delete", desired.sets[name], items))
    for name, items in added.items():
        cmds.extend(b.elements("add", desired.sets[name], items))
    return Plan(cmds, added=sum(map(len, added.values())),
                removed=sum(map(len, removed.values())))


# ------------------------------------------------------------------- apply


@dataclass
class ApplyResult:
    added: int
    removed: int
    rewritten_chains: list[str]
    rebuild: bool
    read_seconds: float  # listing our table from the kernel
    plan_seconds: float  # the diff, in Python
    transaction_seconds: float  # the one nftables batch, kernel included

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed or self.rewritten_chains)


class Dataplane:
    """Reconciles one table in the current network namespace."""

    def __init__(self, nft: Nft | None = None) -> None:
        self.nft = nft or Nft()
        self._applied: KernelTable | None = None  # the kernel after our last transaction
        self._desired: Ruleset | None = None  # what that transaction enforced
        # The kernel's ruleset generation when it last held exactly ``_applied`` (None:
        # unknown), and a counter of reconciles: a drift check that overlaps one is void.
        self._generation: int | None = None
        self._version = 0
        self._lock = threading.Lock()

    def read(self, desired: Ruleset) -> KernelTable | None:
        objects = self.nft.list_table(desired.family, desired.table)
        return None if objects is None else read_table(objects)

    def reconcile(self, desired: Ruleset, verify: bool = True, delta: Any = None) -> ApplyResult:
        """Make the kernel hold ``desired``. ``verify`` lists the kernel first (finds drift);
        without it the diff is against what our last transaction left, which is exact unless
        someone else edited the table (periodic verified reconciles repair that). A ``delta``
        (``added``/``removed``: set -> key -> comment, relative to the last ``desired``)
        spares the full diff when nothing needs verifying."""
        t0 = time.perf_counter()
        use_cache = self._applied is not None and not verify
        # Read before listing (a commit after it then shows as a new generation). Never read
        # right after our own commit: the kernel answers GETGEN only once that commit's
        # deferred clean-up is done (~15 ms on the hot path); the next drift check lists
        # once instead, off the hot path.
        generation = None if use_cache else _generation_or_none()
        current = self._applied if use_cache else self.read(desired)
        t1 = time.perf_counter()
        if use_cache and delta is not None:
            p = plan_delta(desired, delta.added, delta.removed)
        else:
            p = plan(desired, current)
        t2 = time.perf_counter()
        committed = bool(p.added or p.removed or p.rewritten_chains or p.rebuild)
        if committed:
            try:
                self.nft.transaction(p.commands)
            except Exception:
                with self._lock:
                    self._applied, self._generation = None, None  # unknown: list next time
                    self._version += 1
                raise
        t3 = time.perf_counter()
        if p.added + p.removed > BIG_CHANGE:
            release()
        with self._lock:
            if use_cache and delta is not None and self._applied is not None:
                for name, items in delta.removed.items():
                    for key in items:
                        self._applied.sets[name].elements.pop(key, None)
                for name, items in delta.added.items():
                    self._applied.sets[name].elements.update(items)
            else:
                self._applied = expected_table(desired)
            self._desired = desired
            if committed:
                self._generation = None
            elif not use_cache:  # listed, and the kernel already held it all
                self._generation = generation
            self._version += 1
        return ApplyResult(p.added, p.removed, p.rewritten_chains, p.rebuild,
                           t1 - t0, t2 - t1, t3 - t2)

    def known_generation(self) -> int | None:
        """The ruleset generation at which the kernel last held exactly what we applied."""
        with self._lock:
            return self._generation

    def check_drift(self) -> bool | None:
        """Does the kernel still hold what our last reconcile left? Meant for another thread
        than the one that reconciles: it never blocks a sync for longer than a comparison.

        If the ruleset generation has not moved since the kernel was last known to match, the
        answer is no without listing anything. Otherwise our table is listed (in a context of
        its own) and diffed against the last desired ruleset. True: drift (someone edited our
        table: a verified reconcile repairs it); False: none; None: unknown (nothing applied
        yet, or a reconcile ran meanwhile: ask again later).
        """
        with self._lock:
            desired, version, known = self._desired, self._version, self._generation
        if desired is None:
            return None
        generation = _generation_or_none()
        if generation is not None and generation == known:
            return False
        try:
            current = self.read(desired)
            # the plan always re-declares the table; anything more is a repair
            drift = current is None or len(plan(desired, current).commands) > 1
        except RuntimeError:  # the compiler's live element dicts moved under us
            return None
        with self._lock:
            if self._version != version:
                return None
            if not drift:
                self._generation = generation  # cheap again until the next commit anywhere
        return drift

    def remove(self, family: str, table: str) -> bool:
        """Delete our table (uninstall). Returns False when there was none."""
        if self.nft.list_table(family, table) is None:
            return False
        self.nft.transaction([{"delete": {"table": {"family": family, "name": table}}}])
        return True


def _generation_or_none() -> int | None:
    """The ruleset generation, or None where it cannot be read (drift checks then list)."""
    try:
        return ruleset_generation()
    except OSError:
        return None
