"""NetworkPolicy -> nftables set elements for one node. Pure: no kernel, no network.

For every pod of this node that some policy selects, and for each direction it is isolated in:

* the pod's IPs go into ``<direction>-isolated-v4/v6``;
* peers that are pods are allowed by *identity* (policy.identity): every pod that a rule of
  this node's policies admits belongs to the class of pods those rules treat alike; the
  class's sets hold ``local pod . protocol . port`` (``<direction>-from-id<N>-ports-vX``) or
  just the local pod for rules without ports (``...-all-vX``), and each peer pod is one element
  of ``<direction>-peers-vX``, its IP -> its class's chain. A replica more is one element;
* peers that are addresses (ipBlock, and "every address" for rules without from/to) go into
  ``<direction>-allow-ranges-*`` (``peer-range . pod . protocol . port-range``, made disjoint
  per (pod, protocol) because interval sets refuse overlaps) and ``<direction>-allow-all-*``.

The union of elements *is* the OR of peers, rules and policies, so a packet needs a constant
number of lookups however many policies there are. Element comments name the policy rules
behind them.

``NodeCompiler`` recomputes, per change, only the units it can affect: a local pod's own
elements (isolation and address peers), an identity's sets, a peer pod's map element. Every
unit's elements are placed as a whole and diffed, so one change is one delta (one atomic
transaction): no packet ever sees a pod half moved between identities.
``compile_state`` is the same machinery run once over a whole cluster state.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from np_agent.policy.identity import EMPTY, Identities, RuleKey, SigItem, Signature
from np_agent.policy.intervals import Interval, Rect, Refs, disjoint_boxes, union
from np_agent.policy.model import (
    EGRESS,
    INGRESS,
    ClusterState,
    ContainerPort,
    Labels,
    LabelSelector,
    Namespace,
    NetworkPolicy,
    Pod,
    PolicyPort,
    Rule,
)
from np_agent.policy.peers import (
    FULL_RANGE,
    Index,
    Target,
    block_targets,
    egress_named,
    port_interval,
)
from np_agent.ruleset import (
    PROTO_NUMBERS,
    Delta,
    Elements,
    Key,
    allow_all_set,
    allow_ranges_set,
    identity_all_set,
    identity_chain,
    identity_ports_set,
    isolated_set,
    peer_map,
    pod_ifaces_set,
)
from np_cni.shared.endpoints import Endpoint

COMMENT_MAX = 127  # nft keeps at most 128 bytes of comment
FINISHED = ("Succeeded", "Failed")
Element = tuple[str, Key]  # (set name, key)
DIRECTIONS = ((INGRESS, "ingress"), (EGRESS, "egress"))


@dataclass
class PodIsolation:
    """Which policies isolate a local pod, per direction (empty list: open that way), and
    the policies themselves (dump-rules says what they allow)."""

    pod: Pod
    ingress: list[str] = field(default_factory=list)
    egress: list[str] = field(default_factory=list)
    selected: list[NetworkPolicy] = field(default_factory=list)


@dataclass
class IdentityView:
    """One peer identity, for people: the rules that admit its pods, and the pods."""

    number: int
    rules: list[str]
    members: list[str]


@dataclass
class Compiled:
    """What one node must enforce: the element of every set (nft.layout.ruleset() puts them
    into the table), per pod what isolates it and why, and the peer identities (dump-rules)."""

    elements: Elements
    pods: list[PodIsolation]
    warnings: list[str]
    identities: list[IdentityView] = field(default_factory=list)

    def element_count(self) -> int:
        return sum(len(items) for items in self.elements.values())


def comment_for(refs: Iterable[str], prefix: str = "") -> str:
    """``prefix`` + the refs, sorted; as many as fit in nft's 128 bytes, then "+N more"."""
    refs = sorted(refs)
    text = prefix + ", ".join(refs)
    if len(text) <= COMMENT_MAX:
        return text
    shown, length = 0, len(prefix)
    for ref in refs:  # keep room for the longest possible " +N more" suffix
        extra = len(ref) + (2 if shown else 0)
        if shown and length + extra + len(f" +{len(refs)} more") > COMMENT_MAX:
            break
        shown, length = shown + 1, length + extra
    text = prefix + ", ".join(refs[:shown])
    return (text + f" +{len(refs) - shown} more")[:COMMENT_MAX]


def is_local(pod: Pod, node_name: str | None) -> bool:
    return node_name is None or pod.node_name == node_name



# ------------------------------------------------------------------ rules and their peers


@dataclass(frozen=True)
class _Term:
    """One pod-selecting peer of a rule: which namespaces (a selector, or just the policy's
    own when None) and which pods in them (None: all)."""

    namespaces: LabelSelector | None
    pods: LabelSelector | None


@dataclass
class _Key:
    """A rule of a policy that selects local pods, with pod peers: what pods it admits."""

    policy: NetworkPolicy
    direction: str  # "ingress" | "egress"
    rule: Rule
    terms: tuple[_Term, ...]
    named: tuple[PolicyPort, ...]  # egress named ports: resolved on each peer pod
    locals: set[str] = field(default_factory=set)  # the local pods it allows
    namespaces: set[str] = field(default_factory=set)  # where its peers can be

    def same_peers(self, other: _Key) -> bool:
        return (self.terms, self.named, self.policy.namespace) == (
            other.terms, other.named, other.policy.namespace)


def _rule_keys(policy: NetworkPolicy) -> list[tuple[RuleKey, _Key]]:
    out = []
    for direction, key in DIRECTIONS:
        if direction not in policy.policy_types:
            continue
        for i, rule in enumerate(policy.ingress if direction == INGRESS else policy.egress):
            terms = tuple(_Term(p.namespace_selector, p.pod_selector)
                          for p in rule.peers if p.ip_block is None)
            if not terms:
                continue
            named = tuple(p for p in rule.ports if isinstance(p.port, str)) if (
                direction == EGRESS) else ()
            out.append(((policy.ref, key, i), _Key(policy, key, rule, terms, named)))
    return out


def _address_targets(rule: Rule) -> list[Target]:
    """The peers of a rule that are addresses: ipBlocks, or every address without from/to."""
    if not rule.peers:
        return [Target(v, FULL_RANGE[v]) for v in (4, 6)]
    return [t for peer in rule.peers if peer.ip_block is not None
            for t in block_targets(peer.ip_block)]


def _rule_boxes(index: Index, pod: Pod, direction: str, rule: Rule,
                targets: list[Target]) -> list[tuple[int, int, Interval, Interval]]:
    """(version, protocol, peer interval, port interval) for a rule that names ports."""
    out = []
    for port in rule.ports:
        proto = PROTO_NUMBERS[port.protocol.lower()]
        if isinstance(port.port, str):
            if direction == INGRESS:  # resolved on the destination: this pod
                number = pod.named_port(port.port, port.protocol)
                if number is not None:
                    out += [(t.version, proto, t.interval, (number, number)) for t in targets]
            else:  # resolved on each destination peer
                out += [(t.version, proto, iv, (n, n)) for t in targets
                        for iv, n in egress_named(index, port, t)]
            continue
        span = port_interval(port)
        out += [(t.version, proto, t.interval, span) for t in targets]
    return out


def _resolve(ports: tuple[ContainerPort, ...],
             named: tuple[PolicyPort, ...]) -> tuple[int | None, ...] | None:
    """What a peer's container ports make of a rule's egress named ports (None: none)."""
    if not named:
        return None
    by_name: dict[tuple[str, str], int] = {}
    for cp in ports:  # the first of a name counts, as Pod.named_port has it
        by_name.setdefault((cp.name, cp.protocol), cp.port)
    return tuple(by_name.get((p.port, p.protocol)) for p in named)  # type: ignore[misc]


def _refs(policy: NetworkPolicy, key: str, i: int) -> Refs:
    return frozenset([f"{policy.ref} {key}[{i}]"])


# ------------------------------------------------------------------ the node


class NodeCompiler:
    """The node's desired elements, kept up to date change by change."""

    def __init__(self, node_name: str | None = None) -> None:
        self.node_name = node_name
        self.state = ClusterState()
        self.endpoints: dict[tuple[str, str], Endpoint] = {}
        self.elements: dict[str, dict[Key, str]] = defaultdict(dict)
        self._raw: dict[str, Pod] = {}  # pods with np-cni's IPs applied
        self._ip_claims: dict[object, tuple[str, ...]] = {}  # IP -> raw pods with it
        self._effective: dict[str, Pod] = {}  # the same, each IP kept by one pod only
        self._wired_refs: dict[str, list[Endpoint]] = defaultdict(list)
        self._index: Index | None = None
        self._by_ns: dict[str, dict[str, NetworkPolicy]] = defaultdict(dict)
        # local pod -> the policies selecting it (as they were when it was attached)
        self._selected: dict[str, dict[str, NetworkPolicy]] = {}
        self._targets: dict[str, set[str]] = defaultdict(set)  # policy ref -> local pods
        self._keys: dict[RuleKey, _Key] = {}
        self._terms: dict[str, dict[RuleKey, list[_Term]]] = defaultdict(dict)  # by namespace
        self._memo: dict[str, dict[tuple[int, tuple], tuple[Labels, Signature]]] = (
            defaultdict(dict))
        self.identities = Identities()
        self._named_dependents: set[str] = set()  # local pods with egress named ipBlock ports
        self._seen_ns: set[str] = set()  # namespaces whose peer terms are computed
        self._owned: dict[tuple, dict[Element, str]] = {}  # unit -> elements placed
        # element -> the unit that placed it, or (two or more) unit -> comment
        self._claims: dict[Element, tuple | dict[tuple, str]] = {}
        self._before: dict[Element, str | None] = {}  # first value of each touched element
        self._full = True
        self._changed_pods: set[str] = set()
        self._changed_policies: dict[str, NetworkPolicy | None] = {}
        self._changed_ns: dict[str, Namespace | None] = {}
        self._endpoints_changed = False
        # what this update must recompute
        self._dirty_locals: set[str] = set()
        self._dirty_ids: set[int] = set()
        self._dirty_maps: set[str] = set()
        self._resign: set[str] = set()

    # ---------------------------------------------------------------- inputs

    def set_pod(self, pod: Pod) -> None:
        self._changed_pods.add(pod.ref)
        self.state.pods[pod.ref] = pod

    def delete_pod(self, ref: str) -> None:
        self._changed_pods.add(ref)
        self.state.pods.pop(ref, None)

    def set_policy(self, policy: NetworkPolicy) -> None:
        self._changed_policies.setdefault(policy.ref, self.state.policies.get(policy.ref))
        self.state.policies[policy.ref] = policy
        self._by_ns[policy.namespace][policy.ref] = policy

    def delete_policy(self, ref: str) -> None:
        old = self.state.policies.pop(ref, None)
        self._changed_policies.setdefault(ref, old)
        if old is not None:
            self._by_ns[old.namespace].pop(ref, None)

    def set_namespace(self, ns: Namespace) -> None:
        self._changed_ns.setdefault(ns.name, self.state.namespaces.get(ns.name))
        self.state.namespaces[ns.name] = ns

    def delete_namespace(self, name: str) -> None:
        self._changed_ns.setdefault(name, self.state.namespaces.get(name))
        self.state.namespaces.pop(name, None)

    def set_endpoints(self, endpoints: Iterable[Endpoint]) -> None:
        new = {(e.container_id, e.ifname): e for e in endpoints}
        if new == self.endpoints:
            return
        for key in new.keys() | self.endpoints.keys():
            for ep in (new.get(key), self.endpoints.get(key)):
                if ep is not None:
                    self._changed_pods.add(ep.pod_ref)
        self.endpoints = new
        self._wired_refs = defaultdict(list)
        for ep in new.values():
            self._wired_refs[ep.pod_ref].append(ep)
        self._endpoints_changed = True

    def replace_state(self, state: ClusterState) -> None:
        """A whole new state (first list, relist after 410): recompute everything."""
        self.state = ClusterState(dict(state.pods), dict(state.namespaces),
                                  dict(state.policies))
        self._full = True

    # ---------------------------------------------------------------- compile

    def update(self) -> Delta:
        """Bring the elements up to date with every input since the last call."""
        if self._full:
            self._reset()
        changed_pods = self._refresh_pods(set(self.state.pods) if self._full
                                          else self._changed_pods)
        self._update_index(changed_pods)
        self._update_selection(changed_pods)
        self._update_namespaces(changed_pods)
        self._resign.update(changed_pods)
        self._dirty_maps.update(changed_pods)
        self._assign_identities()
        for ref in sorted(self._dirty_ids):
            self._identity_unit(ref)
        for ref in self._dirty_maps:
            self._map_unit(ref)
        for ref in self._dirty_locals:
            self._local_unit(ref)
        if self._endpoints_changed or changed_pods or self._full:
            self._endpoints_unit()
        for dirty in (self._dirty_locals, self._dirty_ids, self._dirty_maps, self._resign,
                      self._changed_pods):
            dirty.clear()
        self._changed_policies.clear()
        self._changed_ns.clear()
        self._endpoints_changed = False
        self._full = False
        return self._take_delta()

    def _reset(self) -> None:
        """Before a full recomputation: every unit is placed again from nothing."""
        self._raw, self._effective, self._ip_claims = {}, {}, {}
        self._index = None
        self._by_ns = defaultdict(dict)
        for policy in self.state.policies.values():
            self._by_ns[policy.namespace][policy.ref] = policy
        self._selected, self._targets, self._keys = {}, defaultdict(set), {}
        self._terms, self._memo = defaultdict(dict), defaultdict(dict)
        self.identities.reset()
        self._named_dependents = set()
        for unit in list(self._owned):
            self._place(unit, {})
        self._changed_policies.clear()  # every policy is looked at anyway
        self._changed_ns.clear()

    # ---------------------------------------------------------------- pods

    def _refresh_pods(self, refs: set[str]) -> dict[str, Pod | None]:
        """Recompute the effective pods of ``refs`` (and of pods sharing an IP with them);
        returns the previous effective pod of each one that changed.

        Each IP is given to one pod only (a pod np-cni wired here first, then by name): two
        live pods can briefly hold the same IP (a deleted pod whose object lingers while its
        IP went to a new pod), and one element per IP keeps the sets consistent and disjoint.
        """
        affected = set(refs)
        claims = self._ip_claims
        for ref in refs:
            for ip in self._claimed(self._raw.get(ref)):
                others = tuple(r for r in claims.get(ip, ()) if r != ref)
                if others:
                    claims[ip] = others
                    affected.update(others)
                else:
                    claims.pop(ip, None)
            raw = self._effective_pod(ref)
            if raw is None:
                self._raw.pop(ref, None)
            else:
                self._raw[ref] = raw
            for ip in self._claimed(raw):
                have = claims.get(ip, ())
                if ref not in have:
                    claims[ip] = have = (*have, ref)
                affected.update(have)
        wired = self._wired_refs
        changed: dict[str, Pod | None] = {}
        for ref in affected:
            raw = self._raw.get(ref)
            new = None
            if raw is not None:
                keep = tuple(ip for ip in raw.ips if min(
                    claims.get(ip) or (ref,), key=lambda r: (r not in wired, r)) == ref)
                new = raw if keep == raw.ips else replace(raw, ips=keep)
            old = self._effective.get(ref)
            if new is old or (new is not None and new == old):
                continue
            changed[ref] = old
            if new is None:
                del self._effective[ref]
            else:
                self._effective[ref] = new
        return changed

    @staticmethod
    def _claimed(pod: Pod | None) -> tuple:
        return pod.ips if pod is not None and pod.is_enforceable else ()

    def _wired(self, ref: str, pod: Pod) -> list[Endpoint]:
        return [e for e in self._wired_refs.get(ref, ())
                if not (pod.uid and e.uid and pod.uid != e.uid)]

    def _effective_pod(self, ref: str) -> Pod | None:
        pod = self.state.pods.get(ref)
        if pod is None:
            return None
        wired = self._wired(ref, pod)
        if not wired:
            return pod
        ips = tuple(dict.fromkeys(ipaddress.ip_address(ip) for e in wired for ip in e.ips))
        return replace(pod, ips=ips)

    def _is_target(self, pod: Pod) -> bool:
        return pod.is_enforceable and (is_local(pod, self.node_name)
                                       or bool(self._wired(pod.ref, pod)))

    def _local_refs(self) -> list[str]:
        return sorted(self._target_refs())

    def _target_refs(self) -> set[str]:
        return {r for r, p in self._effective.items() if self._is_target(p)}

    def _require_index(self) -> Index:
        if self._index is None:
            self._index = Index(self._effective.values(), self.state.namespaces)
        return self._index

    def _update_index(self, changed: dict[str, Pod | None]) -> None:
        if self._index is None:
            self._require_index()
            return
        if self._changed_ns:
            self._index.namespaces = self.state.namespaces
            self._index.forget_namespaces()
        for ref, old in changed.items():
            if old is not None:
                self._index.remove_pod(old)
            new = self._effective.get(ref)
            if new is not None:
                self._index.add_pod(new)

    # ---------------------------------------------------------------- selection

    def _update_selection(self, changed: dict[str, Pod | None]) -> None:
        """Which policies select which local pods; the rules those policies hold become
        this node's keys (what signatures are made of)."""
        index = self._require_index()
        policies: dict[str, NetworkPolicy | None] = {}  # changed policy -> as it is now
        if self._full:
            pods = self._target_refs()
        else:
            pods = {r for r in changed if r in self._selected or self._target_ref(r)}
            policies = {ref: self.state.policies.get(ref) for ref in self._changed_policies}
            if changed and self._named_dependents and any(
                    p is not None and p.ports
                    for p in (*changed.values(), *(self._effective.get(r) for r in changed))):
                self._dirty_locals |= self._named_dependents
        removed: dict[RuleKey, _Key] = {}
        added: dict[RuleKey, _Key] = {}
        # A pod that changed is detached from all its policies and attached again; a policy
        # that changed, from (and to) its own targets only: a pod selected by 3,000
        # policies must not recompute them all for one of them.
        for ref in pods:
            for policy in self._selected.pop(ref, {}).values():
                self._detach(ref, policy, removed)
        touched = set(pods)
        for ref in policies:
            for target in self._targets.get(ref, set()) - pods:
                self._detach(target, self._selected[target].pop(ref), removed)
                touched.add(target)
        for ref in pods:
            pod = self._effective.get(ref)
            if pod is None or not self._is_target(pod):
                continue
            self._selected[ref] = {p.ref: p for p in self._selecting(pod)}
            for policy in self._selected[ref].values():
                self._attach(ref, policy, added)
        for policy in policies.values():
            if policy is None:
                continue
            for pod in index.pods_by_ns.get(policy.namespace, {}).values():
                if (pod.ref not in pods and self._is_target(pod)
                        and policy.pod_selector.matches(pod.labels)):
                    self._selected.setdefault(pod.ref, {})[policy.ref] = policy
                    self._attach(pod.ref, policy, added)
                    touched.add(pod.ref)
        self._dirty_locals |= touched
        for k in removed.keys() | added.keys():
            old, new = removed.get(k), added.get(k)
            if old is not None and new is not None and old.same_peers(new):
                new.namespaces = old.namespaces
                for ns in new.namespaces:
                    self._terms[ns][k] = self._terms_for(new, ns)
                continue
            if old is not None:
                self._drop_key(k, old)
            if new is not None:
                self._add_key(k, new)

    def _target_ref(self, ref: str) -> bool:
        pod = self._effective.get(ref)
        return pod is not None and self._is_target(pod)

    def _selecting(self, pod: Pod) -> list[NetworkPolicy]:
        return [p for p in self._by_ns.get(pod.namespace, {}).values()
                if p.pod_selector.matches(pod.labels)]

    def _detach(self, ref: str, policy: NetworkPolicy, removed: dict[RuleKey, _Key]) -> None:
        self._targets[policy.ref].discard(ref)
        if not self._targets[policy.ref]:
            del self._targets[policy.ref]
        for k, _ in _rule_keys(policy):
            info = self._keys.get(k)
            if info is None:
                continue
            info.locals.discard(ref)
            self._dirty_ids |= self.identities.by_key.get(k, set())
            if not info.locals:
                del self._keys[k]
                removed[k] = info

    def _attach(self, ref: str, policy: NetworkPolicy, added: dict[RuleKey, _Key]) -> None:
        self._targets[policy.ref].add(ref)
        for k, fresh in _rule_keys(policy):
            info = self._keys.get(k)
            if info is None:
                info = self._keys[k] = added[k] = fresh
            info.locals.add(ref)
            self._dirty_ids |= self.identities.by_key.get(k, set())

    # ---------------------------------------------------------------- keys and terms

    def _key_namespaces(self, info: _Key) -> set[str]:
        index = self._require_index()
        out: set[str] = set()
        for term in info.terms:
            if term.namespaces is None:
                out.add(info.policy.namespace)
            else:
                out.update(index.namespaces_matching(term.namespaces))
        return out

    def _terms_for(self, info: _Key, ns: str) -> list[_Term]:
        labels = self._require_index().namespace(ns).labels
        return [t for t in info.terms if (info.policy.namespace == ns if t.namespaces is None
                                          else t.namespaces.matches(labels))]

    def _add_key(self, k: RuleKey, info: _Key) -> None:
        """A rule that admits pods is in use here: the signatures it adds to are updated in
        the memo (not recomputed from every rule), and only their pods are looked at again."""
        info.namespaces = self._key_namespaces(info)
        for ns in info.namespaces:
            terms = self._terms[ns][k] = self._terms_for(info, ns)
            memo = self._memo.get(ns)
            if not memo:
                self._memo.pop(ns, None)
                self._resign_namespace(ns)
                continue
            changed = set()
            for mkey, (labels, sig) in memo.items():
                if any(t.pods is None or t.pods.matches(labels) for t in terms):
                    memo[mkey] = (labels, sig | {(k, _resolve(mkey[1], info.named))})
                    changed.add(mkey)
            self._resign_classes(ns, changed)

    def _drop_key(self, k: RuleKey, info: _Key) -> None:
        for ns in info.namespaces:
            terms = self._terms.get(ns)
            if terms is not None:
                terms.pop(k, None)
                if not terms:
                    del self._terms[ns]
            memo = self._memo.get(ns, {})
            for mkey, (labels, sig) in memo.items():
                if any(item[0] == k for item in sig):
                    memo[mkey] = (labels, frozenset(i for i in sig if i[0] != k))
        for number in self.identities.by_key.get(k, set()):
            self._resign |= self.identities.by_number[number].members

    def _resign_classes(self, ns: str, classes: set[tuple[int, tuple]]) -> None:
        """Look again at the pods of ``ns`` whose (label map, ports) memo entry changed."""
        if classes and not self._full:
            self._resign.update(p.ref for p in self._require_index().pods_by_ns.get(ns, {}).values()
                                if (id(p.labels), p.ports) in classes)

    def _resign_namespace(self, ns: str) -> None:
        if not self._full:
            self._resign.update(self._require_index().pods_by_ns.get(ns, {}))

    def _update_namespaces(self, changed: dict[str, Pod | None]) -> None:
        """A namespace's labels changed (or pods appeared in one not seen before): which keys'
        peers it holds may have too."""
        if self._full:
            self._seen_ns = set(self.state.namespaces) | set(self._require_index().pods_by_ns)
            return
        names = set(self._changed_ns)
        for ref in changed:
            pod = self._effective.get(ref)
            if pod is not None and pod.namespace not in self._seen_ns:
                names.add(pod.namespace)
        self._seen_ns |= names
        for ns in names:
            terms: dict[RuleKey, list[_Term]] = {}
            for k, info in self._keys.items():
                mine = self._terms_for(info, ns)
                if mine:
                    terms[k] = mine
                    info.namespaces.add(ns)
                else:
                    info.namespaces.discard(ns)
            if terms:
                self._terms[ns] = terms
            else:
                self._terms.pop(ns, None)
            self._memo.pop(ns, None)
            self._resign_namespace(ns)

    # ---------------------------------------------------------------- identities

    def _signature(self, pod: Pod) -> Signature:
        """The rules here that admit this pod as a peer (memoised per namespace and label
        map: replicas share theirs). Every pod looked at has its entry, empty signatures
        too: a rule that comes into use updates the entries, and must find them all."""
        if not pod.is_enforceable:
            return EMPTY
        terms = self._terms.get(pod.namespace, {})
        memo = self._memo[pod.namespace]
        mkey = (id(pod.labels), pod.ports)
        hit = memo.get(mkey)
        if hit is not None and hit[0] is pod.labels:
            return hit[1]
        labels = pod.labels
        items: list[SigItem] = []
        for k, kterms in terms.items():
            if any(t.pods is None or t.pods.matches(labels) for t in kterms):
                items.append((k, _resolve(pod.ports, self._keys[k].named)))
        sig = frozenset(items)
        existing = self.identities.by_signature.get(sig)
        if existing is not None:
            sig = existing.signature  # one frozenset per class
        memo[mkey] = (labels, sig)
        return sig

    def _assign_identities(self) -> None:
        refs = self._effective.keys() if self._full else self._resign
        changes = {}
        for ref in refs:
            pod = self._effective.get(ref)
            changes[ref] = EMPTY if pod is None else self._signature(pod)
        touched, moved = self.identities.assign(changes)
        self._dirty_ids |= touched
        self._dirty_maps |= moved

    def _identity_unit(self, number: int) -> None:
        """The two sets of an identity, per direction and version: what its members may reach
        on this node."""
        ident = self.identities.by_number.get(number)
        wanted: dict[Element, str] = {}
        if ident is not None:
            ports: dict[tuple[str, Interval, int], list[tuple[Interval, Refs]]] = (
                defaultdict(list))
            every: dict[Element, set[str]] = defaultdict(set)
            for k, named in ident.signature:
                self._identity_rule(number, k, named, ports, every)
            for (name, me, proto), items in ports.items():
                for span, refs in union(items):
                    wanted[(name, (me, proto, span))] = comment_for(refs)
            for el, refs in every.items():
                wanted[el] = comment_for(refs)
            chains = frozenset((d, v) for d in ("ingress", "egress") for v in (4, 6)
                               if any(el[0] in (identity_ports_set(d, v, number),
                                                identity_all_set(d, v, number))
                                      for el in wanted))
            if chains != ident.chains:
                ident.chains = chains
                self._dirty_maps |= ident.members
        self._place(("id", number), wanted)

    def _identity_rule(self, number: int, k: RuleKey, named: tuple[int | None, ...] | None,
                       ports: dict, every: dict) -> None:
        info = self._keys[k]
        d = info.direction
        refs = _refs(info.policy, d, k[2])
        for ref in info.locals:
            pod = self._effective.get(ref)
            if pod is None:
                continue
            for ip in pod.ips:
                v, me = ip.version, (int(ip), int(ip))
                if not info.rule.ports:
                    every[(identity_all_set(d, v, number), (me,))] |= refs
                    continue
                resolved = iter(named or ())
                for port in info.rule.ports:
                    if isinstance(port.port, str):
                        number_ = (pod.named_port(port.port, port.protocol) if d == "ingress"
                                   else next(resolved))
                        if number_ is None:
                            continue
                        span = (number_, number_)
                    else:
                        span = port_interval(port)
                    proto = PROTO_NUMBERS[port.protocol.lower()]
                    ports[(identity_ports_set(d, v, number), me, proto)].append((span, refs))

    def _map_unit(self, ref: str) -> None:
        """A peer pod's elements in the peer maps: its IPs -> its identity's chains."""
        wanted: dict[Element, str] = {}
        ident = self.identities.of_pod.get(ref)
        pod = self._effective.get(ref)
        if ident is not None and pod is not None:
            for ip in pod.ips:
                value = int(ip)
                for d, v in ident.chains:
                    if v == ip.version:
                        wanted[(peer_map(d, v), ((value, value),
                                                 identity_chain(d, v, ident.number)))] = ref
        self._place(("map", ref), wanted)

    # ---------------------------------------------------------------- local pods

    def _local_unit(self, ref: str) -> None:
        """A local pod's isolation, and what address peers (ipBlocks, every address) may do."""
        pod = self._effective.get(ref)
        selected = self._selected.get(ref, {})
        wanted: dict[Element, str] = {}
        self._named_dependents.discard(ref)
        if pod is not None and selected:
            index = self._require_index()
            ranged: dict[tuple[str, int, Interval], list[Rect]] = defaultdict(list)
            every: dict[tuple[str, Interval], list[tuple[Interval, Refs]]] = defaultdict(list)
            for direction, key in DIRECTIONS:
                policies = sorted(p.ref for p in selected.values()
                                  if direction in p.policy_types)
                for ip in pod.ips if policies else ():
                    wanted[(isolated_set(key, ip.version), ((int(ip), int(ip)),))] = (
                        comment_for(policies, f"{ref} by "))
                for policy in selected.values():
                    if direction in policy.policy_types:
                        self._address_rules(index, pod, policy, direction, ranged, every)
            for (name, proto, me), rects in ranged.items():
                for peer, span, refs in disjoint_boxes(rects):
                    wanted[(name, (peer, me, proto, span))] = comment_for(refs)
            for (name, me), items in every.items():
                for peer, refs in union(items):
                    wanted[(name, (peer, me))] = comment_for(refs)
        self._place(("pod", ref), wanted)

    def _address_rules(self, index: Index, pod: Pod, policy: NetworkPolicy, direction: str,
                       ranged: dict, every: dict) -> None:
        key = "ingress" if direction == INGRESS else "egress"
        mine: dict[int, list[Interval]] = defaultdict(list)
        for ip in pod.ips:
            mine[ip.version].append((int(ip), int(ip)))
        for i, rule in enumerate(policy.ingress if direction == INGRESS else policy.egress):
            targets = _address_targets(rule)
            if not targets:
                continue
            refs = _refs(policy, key, i)
            if not rule.ports:
                for t in targets:
                    for me in mine.get(t.version, ()):
                        every[(allow_all_set(key, t.version), me)].append((t.interval, refs))
                continue
            if direction == EGRESS and any(isinstance(p.port, str) for p in rule.ports):
                self._named_dependents.add(pod.ref)  # named ports of pods inside the ranges
            for version, proto, peer, span in _rule_boxes(index, pod, direction, rule, targets):
                for me in mine.get(version, ()):
                    ranged[(allow_ranges_set(key, version), proto, me)].append(
                        (peer, span, refs))

    def _endpoints_unit(self) -> None:
        wanted: dict[Element, str] = {}
        for ep in self.endpoints.values():
            for text in ep.ips:
                ip = ipaddress.ip_address(text)
                wanted[(pod_ifaces_set(ip.version),
                        (ep.host_if, (int(ip), int(ip))))] = ep.pod_ref
        for ep in self._pending():  # isolated both ways, nothing allowed: denied until known
            for text in ep.ips:
                ip = ipaddress.ip_address(text)
                for key in ("ingress", "egress"):
                    wanted[(isolated_set(key, ip.version), ((int(ip), int(ip)),))] = (
                        f"{ep.pod_ref} (Pod not known yet)")
        self._place(("~endpoints",), wanted)

    def _pending(self) -> list[Endpoint]:
        out = []
        for ep in self.endpoints.values():
            pod = self.state.pods.get(ep.pod_ref)
            if pod is None or (pod.uid and ep.uid and pod.uid != ep.uid):
                out.append(ep)
        return out

    # ---------------------------------------------------------------- elements

    def _touch(self, el: Element) -> None:
        if el not in self._before:
            self._before[el] = self.elements[el[0]].get(el[1])

    def _put(self, el: Element, comment: str) -> None:
        self._touch(el)
        self.elements[el[0]][el[1]] = comment

    def _drop(self, el: Element) -> None:
        self._touch(el)
        self.elements[el[0]].pop(el[1], None)

    def _place(self, unit: tuple, wanted: dict[Element, str]) -> None:
        """Make ``unit``'s elements exactly ``wanted``.

        An element may be claimed by two units for a moment (a pod handing its IP over to
        another, in whichever order they are recomputed): claims are counted, and the element
        goes only when nobody claims it. One claim (nearly always) is held as the unit alone.
        """
        old = self._owned.pop(unit, {})
        for el in old.keys() - wanted.keys():
            self._unclaim(el, unit)
        for el, comment in wanted.items():
            if old.get(el) != comment:
                self._claim(el, unit, comment)
        if wanted:
            self._owned[unit] = wanted

    def _claim(self, el: Element, unit: tuple, comment: str) -> None:
        have = self._claims.get(el)
        if have is None or have == unit:
            self._claims[el] = unit
            self._put(el, comment)
            return
        if not isinstance(have, dict):  # a second unit: keep every claim with its comment
            have = self._claims[el] = {have: self._owned[have][el]}
        have[unit] = comment
        self._put(el, have[min(have)])

    def _unclaim(self, el: Element, unit: tuple) -> None:
        have = self._claims[el]
        if not isinstance(have, dict):
            del self._claims[el]
            self._drop(el)
            return
        del have[unit]
        if len(have) == 1:
            (only, comment), = have.items()
            self._claims[el] = only
        else:
            comment = have[min(have)]
        self._put(el, comment)

    def _take_delta(self) -> Delta:
        delta = Delta()
        for (name, key), before in self._before.items():
            now = self.elements[name].get(key)
            if now == before:
                continue
            if before is not None:
                delta.removed.setdefault(name, {})[key] = before
            if now is not None:
                delta.added.setdefault(name, {})[key] = now
        self._before.clear()
        return delta

    # ---------------------------------------------------------------- outputs

    def current_elements(self) -> Elements:
        """The elements every set must hold now (the sets that hold some)."""
        return {name: items for name, items in self.elements.items() if items}

    def report(self) -> list[PodIsolation]:
        """The local pods, and the pods of this node that have no IP yet (a manifest has no
        status; a pod being created): those are listed with the policies that will select
        them, and get elements once they have an IP."""
        selected = {ref: list(self._selected.get(ref, {}).values()) for ref in self._local_refs()}
        pods = {ref: self._effective[ref] for ref in selected}
        for ref, pod in self.state.pods.items():
            if (not pod.ips and not pod.host_network and pod.phase not in FINISHED
                    and is_local(pod, self.node_name)):
                pods[ref], selected[ref] = pod, self._selecting(pod)
        out = []
        for ref in sorted(pods):
            rep = PodIsolation(pods[ref], selected=sorted(selected[ref], key=lambda p: p.ref))
            for policy in rep.selected:
                for direction in sorted(policy.policy_types):
                    getattr(rep, direction.lower()).append(policy.ref)
            out.append(rep)
        return out

    def warnings(self) -> list[str]:
        out = [f"NetworkPolicy {p.ref} is invalid ({p.invalid}): the pods it selects are "
               f"isolated both ways with nothing allowed" for p in self.state.policies.values()
               if p.invalid]
        out += [f"pod {ep.pod_ref} (container {ep.container_id[:12]}) was wired by np-cni but "
                "its Pod object is not known: denied both ways until it is"
                for ep in self._pending()]
        return out

    def identity_views(self) -> list[IdentityView]:
        return [IdentityView(n, sorted(f"{k[0]} {k[1]}[{k[2]}]" for k, _ in i.signature),
                             sorted(i.members))
                for n, i in sorted(self.identities.by_number.items()) if i.chains]

    def compiled(self) -> Compiled:
        return Compiled(self.current_elements(), self.report(), self.warnings(),
                        self.identity_views())


def compile_state(state: ClusterState, node_name: str | None = None,
                  endpoints: Iterable[Endpoint] = ()) -> Compiled:
    """Compile a whole cluster state into the ruleset for one node.

    With ``node_name`` None every pod is treated as local (a one-node lab); otherwise pods of
    other nodes are only peers, and their own isolation is left to their node. ``endpoints``
    are the attachments np-cni made on this node: their pods are local, with the IPs np-cni
    gave them.
    """
    nc = NodeCompiler(node_name)
    nc.replace_state(state)
    nc.set_endpoints(endpoints)
    nc.update()
    return nc.compiled()
