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
    DIRECTIONS,
    IFNAME_TYPE,
    PROTO_NAMES,
    PROTO_NUMBERS,
    PROTO_TYPE,
    SERVICE_TYPE,
    VERSIONS,
    ChainSpec,
    Field,
    Key,
    Ruleset,
    SetSpec,
    cidr_chain,
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
    """The key of an element as libnftables JSON (without a verdict map's target)."""
    fields = [_render_field(t, v) for t, v in zip(spec.key_type, key[:len(spec.key_type)],
                                                   strict=True)]
    return fields[0] if len(fields) == 1 else {"concat": fields}


def render_element(spec: SetSpec, key: Key, comment: str) -> Any:
    elem = render_key(spec, key)
    if comment:
        elem = {"elem": {"val": elem, "comment": comment}}
    return [elem, {"goto": {"target": key[-1]}}] if spec.verdict_map else elem


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
    target: tuple[str, ...] = ()
    if isinstance(elem, list):  # a map element: [key, verdict]
        elem, verdict = elem
        (kind, body), = verdict.items()
        target = (body["target"] if kind in ("goto", "jump") else kind,)
    if isinstance(elem, dict) and "elem" in elem:
        comment = elem["elem"].get("comment", "")
        elem = elem["elem"]["val"]
    values = elem["concat"] if isinstance(elem, dict) and "concat" in elem else [elem]
    key = tuple(_parse_field(t, v) for t, v in zip(spec.key_type, values, strict=True))
    return key + target, comment


# ------------------------------------------------------------------- what the kernel holds


@dataclass
class KernelSet:
    key_type: tuple[str, ...]
    interval: bool
    elements: dict[Key, str]
    verdict_map: bool = False


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
        if "set" in obj or "map" in obj:
            s = obj.get("set") or obj["map"]
            ktype = tuple(s["type"]) if isinstance(s["type"], list) else (s["type"],)
            spec = SetSpec(s["name"], ktype)
            elements = dict(parse_element(spec, e) for e in s.get("elem", []))
            table.sets[s["name"]] = KernelSet(ktype, "interval" in s.get("flags", []), elements,
                                              s.get("map") == "verdict")
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
    structural: bool = False  # sets or chains added, removed or rewritten

    @property
    def commits(self) -> bool:
        return bool(self.added or self.removed or self.structural)


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
        if spec.verdict_map:
            return {"map": {**decl, "map": "verdict"}}
        return {"set": decl}

    def set_ref(self, spec: SetSpec) -> dict[str, Any]:
        return {"map" if spec.verdict_map else "set": {**self.ident, "name": spec.name}}

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
        elems = [render_element(spec, k, c) for k, c in items.items()]
        return [{verb: {"element": {**self.ident, "name": spec.name, "elem": elems}}}]


def expected_table(rs: Ruleset) -> KernelTable:
    """What the kernel holds right after `rs` was applied: the agent's memory of its last
    transaction, so that steady-state reconciles need not list tens of thousands of elements."""
    return KernelTable(
        sets={n: _expected_set(rs, s) for n, s in rs.sets.items()},
        chains={c.name: _expected_chain(c) for c in rs.chains})


def _expected_set(rs: Ruleset, spec: SetSpec) -> KernelSet:
    return KernelSet(spec.key_type, spec.interval, dict(rs.elements.get(spec.name, {})),
                     spec.verdict_map)


def _expected_chain(c: ChainSpec) -> KernelChain:
    return KernelChain(c.hook, c.priority if c.is_base else None, c.policy if c.is_base else None,
                       [r.comment for r in c.rules])


def _set_compatible(spec: SetSpec, have: KernelSet) -> bool:
    return (have.key_type == spec.key_type and have.interval == spec.interval
            and have.verdict_map == spec.verdict_map)


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
    have = KernelTable() if rebuild or current is None else current
    stale: dict[str, dict[Key, str]] = {}
    missing: dict[str, dict[Key, str]] = {}
    for name in desired.sets:
        want = desired.elements.get(name, {})
        got = have.sets[name].elements if name in have.sets else {}
        stale[name] = {k: c for k, c in got.items() if want.get(k) != c}
        missing[name] = {k: c for k, c in want.items() if got.get(k) != c}
    rewrite = [c for c in desired.chains
               if c.name in have.chains and not _chain_current(c, have.chains[c.name])]
    result = _batch(b, rebuild, stale, missing,
                    new_sets=[s for s in desired.sets.values() if s.name not in have.sets],
                    gone_sets=[SetSpec(n, k.key_type, verdict_map=k.verdict_map)
                               for n, k in sorted(have.sets.items()) if n not in desired.sets],
                    new_chains=[c for c in desired.chains if c.name not in have.chains],
                    gone_chains=sorted(have.chains.keys() - {c.name for c in desired.chains}),
                    rewrite=rewrite)
    return result


def plan_delta(desired: Ruleset, previous: Ruleset, added: dict[str, dict[Key, str]],
               removed: dict[str, dict[Key, str]]) -> Plan:
    """The batch for known element changes (an element whose comment changed is in both),
    with the sets and chains that came or went since ``previous`` (identities)."""
    b = _Builder(desired)
    old_chains = {c.name for c in previous.chains}
    new_chains = {c.name for c in desired.chains}
    return _batch(b, False, {n: items for n, items in removed.items() if n in desired.sets},
                  added,
                  new_sets=[s for n, s in desired.sets.items() if n not in previous.sets],
                  gone_sets=[s for n, s in previous.sets.items() if n not in desired.sets],
                  new_chains=[c for c in desired.chains if c.name not in old_chains],
                  gone_chains=sorted(old_chains - new_chains), rewrite=[])


def _batch(b: _Builder, rebuild: bool, stale: dict[str, dict[Key, str]],
           missing: dict[str, dict[Key, str]], *, new_sets: list[SetSpec],
           gone_sets: list[SetSpec], new_chains: list[ChainSpec], gone_chains: list[str],
           rewrite: list[ChainSpec]) -> Plan:
    """One batch, in the order the kernel accepts it: a map element that goes to a chain is
    deleted before the chain, a chain that refers to a set is flushed before the set goes,
    and sets and chains exist before the rules and elements that refer to them."""
    sets = b.rs.sets
    cmds: list[dict[str, Any]] = []
    if rebuild:
        cmds.append({"delete": b.table()})
    cmds.append({"add": b.table()})
    for name, items in stale.items():
        cmds.extend(b.elements("delete", sets[name], items))
    cmds.extend({"flush": {"chain": {**b.ident, "name": c.name}}} for c in rewrite)
    for name in gone_chains:  # identities gone, or left by an older layout
        cmds.append({"flush": {"chain": {**b.ident, "name": name}}})
    for name in gone_chains:
        cmds.append({"delete": {"chain": {**b.ident, "name": name}}})
    cmds.extend({"delete": b.set_ref(spec)} for spec in gone_sets)
    cmds.extend({"add": b.set_decl(s)} for s in new_sets)
    cmds.extend({"add": b.chain_decl(c)} for c in new_chains)
    for chain in (*new_chains, *rewrite):
        cmds.extend(b.rules(chain))
    for name, items in missing.items():
        cmds.extend(b.elements("add", sets[name], items))
    return Plan(cmds, added=sum(map(len, missing.values())),
                removed=sum(map(len, stale.values())),
                rewritten_chains=[c.name for c in (*new_chains, *rewrite)], rebuild=rebuild,
                structural=bool(rebuild or new_sets or gone_sets or new_chains or gone_chains
                                or rewrite))


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
            assert self._desired is not None  # use_cache: something was applied
            p = plan_delta(desired, self._desired, delta.added, delta.removed)
        else:
            p = plan(desired, current)
        t2 = time.perf_counter()
        committed = p.commits
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
                _apply_delta(self._applied, desired, delta)
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

    def drop_counters(self) -> dict[tuple[str, int], int]:
        """Packets dropped by policy, per (direction, IP version): the counters of the drop
        rules in the address-peer chains, where every denied new connection ends. Empty when
        nothing was applied yet or the table is gone."""
        with self._lock:
            desired = self._desired
        if desired is None:
            return {}
        out = {}
        for direction in DIRECTIONS:
            for version in VERSIONS:
                objects = self.nft.list_chain(desired.family, desired.table,
                                              cidr_chain(direction, version))
                out[(direction, version)] = sum(
                    e["counter"]["packets"] for o in objects or () if "rule" in o
                    for e in o["rule"]["expr"] if isinstance(e, dict) and "counter" in e
                    and isinstance(e["counter"], dict))
        return out

    def remove(self, family: str, table: str) -> bool:
        """Delete our table (uninstall). Returns False when there was none."""
        if self.nft.list_table(family, table) is None:
            return False
        self.nft.transaction([{"delete": {"table": {"family": family, "name": table}}}])
        return True


def _apply_delta(table: KernelTable, desired: Ruleset, delta: Any) -> None:
    """What the kernel holds after ``delta`` was applied to ``table`` (sets and chains of
    identities that came or went included)."""
    for name in table.sets.keys() - desired.sets.keys():
        del table.sets[name]
    wanted = {c.name: c for c in desired.chains}
    for name in table.chains.keys() - wanted.keys():
        del table.chains[name]
    for name, chain in wanted.items():
        if name not in table.chains:
            table.chains[name] = _expected_chain(chain)
    for name, items in delta.removed.items():
        if name in table.sets:
            for key in items:
                table.sets[name].elements.pop(key, None)
    for name, spec in desired.sets.items():
        if name not in table.sets:
            table.sets[name] = KernelSet(spec.key_type, spec.interval, {}, spec.verdict_map)
    for name, items in delta.added.items():
        table.sets[name].elements.update(items)


def _generation_or_none() -> int | None:
    """The ruleset generation, or None where it cannot be read (drift checks then list)."""
    try:
        return ruleset_generation()
    except OSError:
        return None
