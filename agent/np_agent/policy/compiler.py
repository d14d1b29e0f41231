"""NetworkPolicy -> nftables set elements for one node. Pure: no kernel, no network.

For every pod of this node that some policy selects, and for each direction it is isolated in,
the compiler emits:

* the pod's IPs into ``<direction>-isolated-v4/v6``;
* for rules with ports, ``peer . pod . protocol . port`` into ``<direction>-allow-v4/v6`` when
  the peer is one address and the port one number (a hash set), and otherwise
  ``peer-interval . pod . protocol . port-interval`` boxes into ``<direction>-allow-ranges-*``,
  made disjoint per (pod, protocol) because interval sets refuse overlaps;
* ``peer-interval . pod`` into ``<direction>-allow-all-v4/v6`` for rules without ports.

The union of elements *is* the OR of peers, rules and policies, so a packet needs one lookup
per set however many policies there are. Element comments name the policy rules behind them.

``NodeCompiler`` keeps what each policy contributes to each local pod, so a change recomputes
only the (pod, policy) pairs it can affect: a pod's label change re-resolves the policies that
could select it as a peer, not every policy; a policy change touches only the pods it selects.
``compile_state`` is the same machinery run once over a whole cluster state.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from np_agent.policy.intervals import Interval, Rect, Refs, disjoint_boxes, union
from np_agent.policy.model import EGRESS, INGRESS, ClusterState, Namespace, NetworkPolicy, Pod, Rule
from np_agent.policy.peers import Index, Target, egress_named, port_interval, resolve_peers
from np_agent.ruleset import (
    PROTO_NUMBERS,
    Delta,
    Elements,
    Key,
    allow_all_set,
    allow_ranges_set,
    allow_set,
    isolated_set,
    pod_ifaces_set,
)
from np_cni.shared.endpoints import Endpoint

COMMENT_MAX = 127  # nft keeps at most 128 bytes of comment
Element = tuple[str, Key]  # (set name, key)
DIRECTIONS = ((INGRESS, "ingress"), (EGRESS, "egress"))


@dataclass
class PodIsolation:
    """Which policies isolate a local pod, per direction (empty list: open that way)."""

    pod: Pod
    ingress: list[str] = field(default_factory=list)
    egress: list[str] = field(default_factory=list)


@dataclass
class Compiled:
    """What one node must enforce: the element of every set (nft.layout.ruleset() puts them
    into the table), and per pod what isolates it and why (dump-rules)."""

    elements: Elements
    pods: list[PodIsolation]
    warnings: list[str]

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


# ------------------------------------------------------------------ one policy, one pod


@dataclass
class _Contribution:
    """What one policy allows one local pod in one direction, keyed on the pod's own IPs."""

    exact: dict[Element, Refs] = field(default_factory=dict)
    ranged: dict[tuple[str, int, Interval], list[Rect]] = field(default_factory=dict)
    any: dict[Element, list[tuple[Interval, Refs]]] = field(default_factory=dict)


def _groups_of(c: _Contribution) -> set[tuple]:
    """The element groups of a pod a contribution feeds: what must be re-assembled."""
    return ({("ranged", *k) for k in c.ranged} | {("any", *k) for k in c.any})


def _my_addresses(pod: Pod) -> dict[int, list[Interval]]:
    out: dict[int, list[Interval]] = defaultdict(list)
    for ip in pod.ips:
        out[ip.version].append((int(ip), int(ip)))
    return out


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


def contribution(index: Index, pod: Pod, direction: str, policy: NetworkPolicy) -> _Contribution:
    key = "ingress" if direction == INGRESS else "egress"
    mine = _my_addresses(pod)
    exact_set = {v: allow_set(key, v) for v in (4, 6)}
    ranges_set = {v: allow_ranges_set(key, v) for v in (4, 6)}
    c = _Contribution()
    exact = c.exact
    for i, rule in enumerate(policy.ingress if direction == INGRESS else policy.egress):
        refs = frozenset([f"{policy.ref} {key}[{i}]"])
        targets = resolve_peers(index, policy, rule)
        if not rule.ports:
            for t in targets:
                for me in mine.get(t.version, ()):
                    c.any.setdefault((allow_all_set(key, t.version), me), []).append(
                        (t.interval, refs))
            continue
        for version, proto, peer, span in _rule_boxes(index, pod, direction, rule, targets):
            for me in mine.get(version, ()):
                if peer[0] == peer[1] and span[0] == span[1]:
                    el = (exact_set[version], (peer, me, proto, span))
                    have = exact.get(el)
                    exact[el] = refs if have is None or have == refs else have | refs
                else:
                    c.ranged.setdefault((ranges_set[version], proto, me), []).append(
                        (peer, span, refs))
    return c


# ------------------------------------------------------------------ the node


class NodeCompiler:
    """The node's desired elements, kept up to date change by change."""

    def __init__(self, node_name: str | None = None) -> None:
        self.node_name = node_name
        self.state = ClusterState()
        self.endpoints: dict[tuple[str, str], Endpoint] = {}
        self.elements: dict[str, dict[Key, str]] = defaultdict(dict)
        self._raw: dict[str, Pod] = {}  # pods with np-cni's IPs applied
        self._ip_claims: dict[object, set[str]] = defaultdict(set)  # IP -> raw pods with it
        self._effective: dict[str, Pod] = {}  # the same, each IP kept by one pod only
        self._contrib: dict[str, dict[tuple[str, str], _Contribution]] = {}
        self._targets: dict[str, set[str]] = defaultdict(set)  # policy ref -> local pod refs
        self._exact: dict[Element, dict[str, int]] = {}  # element -> policy rule -> count
        self._owned: dict[tuple, dict[Element, str]] = {}  # owner -> non-exact elements placed
        self._claims: dict[Element, dict[tuple, str]] = {}  # element -> owner -> comment
        self._groups: dict[str, set[tuple]] = defaultdict(set)  # pod ref -> its element groups
        self._dirty_groups: dict[str, set[tuple]] = defaultdict(set)
        self._exact_dirty: set[Element] = set()
        self._before: dict[Element, str | None] = {}  # first value of each touched element
        self._index: Index | None = None
        self._by_ns: dict[str, dict[str, NetworkPolicy]] = defaultdict(dict)
        self._full = True
        self._changed_pods: set[str] = set()
        self._changed_policies: dict[str, NetworkPolicy | None] = {}
        self._changed_ns: dict[str, Namespace | None] = {}
        self._endpoints_changed = False

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
            self._recompute_all()
        else:
            self._recompute_changes()
        self._changed_pods.clear()
        self._changed_policies.clear()
        self._changed_ns.clear()
        self._endpoints_changed = False
        self._full = False
        self._flush_exact()
        return self._take_delta()

    def _recompute_all(self) -> None:
        self._raw, self._effective, self._ip_claims = {}, {}, defaultdict(set)
        self._refresh_pods(set(self.state.pods))
        self._index = Index(self._effective.values(), self.state.namespaces)
        self._by_ns = defaultdict(dict)
        for policy in self.state.policies.values():
            self._by_ns[policy.namespace][policy.ref] = policy
        for ref in list(self._contrib):
            self._drop_pod(ref)
        for ref in list(self._groups):
            self._assemble(ref)
        for ref in self._local_refs():
            self._rebuild_pod(ref)
        self._assemble_endpoints()

    def _recompute_changes(self) -> None:
        old_pods = self._refresh_pods(self._changed_pods)
        if self._changed_ns or self._index is None:
            self._index = Index(self._effective.values(), self.state.namespaces)
        else:
            for ref, old in old_pods.items():
                if old is not None:
                    self._index.remove_pod(old)
                new = self._effective.get(ref)
                if new is not None:
                    self._index.add_pod(new)
        index = self._require_index()
        pairs: set[tuple[str, str]] = set()
        full: set[str] = set()
        for ref, old in old_pods.items():
            new = self._effective.get(ref)
            full.add(ref)
            for policy in self.state.policies.values():
                if any(p is not None and self._peer_relevant(policy, p) for p in (old, new)):
                    pairs.update((t, policy.ref) for t in self._targets.get(policy.ref, ()))
        for name, old_ns in self._changed_ns.items():
            labels = [n.labels for n in (old_ns, self.state.namespaces.get(name)) if n]
            labels.append(index.namespace(name).labels)
            for policy in self.state.policies.values():
                if self._ns_relevant(policy, labels):
                    pairs.update((t, policy.ref) for t in self._targets.get(policy.ref, ()))
        for ref, old_policy in self._changed_policies.items():
            new_policy = self.state.policies.get(ref)
            pairs.update((t, ref) for t in self._targets.get(ref, ()))
            for pol in (old_policy, new_policy):
                if pol is None:
                    continue
                for pod in index.pods_by_ns.get(pol.namespace, {}).values():
                    if self._is_target(pod) and pol.pod_selector.matches(pod.labels):
                        pairs.add((pod.ref, ref))
        for ref in full:
            if self._is_target_ref(ref):
                self._rebuild_pod(ref)
            else:
                self._drop_pod(ref)
                self._assemble(ref)
        for pod_ref, policy_ref in pairs - {(p, q) for p, q in pairs if p in full}:
            self._recompute_pair(pod_ref, policy_ref)
        for pod_ref in {p for p, _ in pairs} - full:
            self._assemble(pod_ref)
        if self._endpoints_changed or old_pods:
            self._assemble_endpoints()

    # ---------------------------------------------------------------- pods and pairs

    def _refresh_pods(self, refs: set[str]) -> dict[str, Pod | None]:
        """Recompute the effective pods of ``refs`` (and of pods sharing an IP with them);
        returns the previous effective pod of each one that changed.

        Each IP is given to one pod only (a pod np-cni wired here first, then by name): two
        live pods can briefly hold the same IP (a deleted pod whose object lingers while its
        IP went to a new pod), and one element per IP keeps the sets consistent and disjoint.
        """
        affected = set(refs)
        for ref in refs:
            for ip in self._claimed(self._raw.get(ref)):
                self._ip_claims[ip].discard(ref)
                affected |= self._ip_claims[ip]
            raw = self._effective_pod(ref)
            if raw is None:
                self._raw.pop(ref, None)
            else:
                self._raw[ref] = raw
            for ip in self._claimed(raw):
                self._ip_claims[ip].add(ref)
                affected |= self._ip_claims[ip]
        wired = {e.pod_ref for e in self.endpoints.values()}
        changed: dict[str, Pod | None] = {}
        for ref in affected:
            raw = self._raw.get(ref)
            new = None
            if raw is not None:
                keep = tuple(ip for ip in raw.ips if min(
                    self._ip_claims.get(ip) or {ref}, key=lambda r: (r not in wired, r)) == ref)
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
        return [e for e in self.endpoints.values() if e.pod_ref == ref
                and not (pod.uid and e.uid and pod.uid != e.uid)]

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

    def _is_target_ref(self, ref: str) -> bool:
        pod = self._effective.get(ref)
        return pod is not None and self._is_target(pod)

    def _local_refs(self) -> list[str]:
        return sorted(r for r, p in self._effective.items() if self._is_target(p))

    def _require_index(self) -> Index:
        if self._index is None:
            self._index = Index(self._effective.values(), self.state.namespaces)
        return self._index

    def _selecting(self, pod: Pod) -> list[NetworkPolicy]:
        return [p for p in self._by_ns.get(pod.namespace, {}).values()
                if p.pod_selector.matches(pod.labels)]

    def _rebuild_pod(self, ref: str) -> None:
        self._drop_pod(ref)
        pod = self._effective[ref]
        self._contrib[ref] = {}
        for policy in self._selecting(pod):
            self._set_pair(pod, policy)
        self._assemble(ref)

    def _drop_pod(self, ref: str) -> None:
        for (policy_ref, _), c in self._contrib.pop(ref, {}).items():
            self._targets[policy_ref].discard(ref)
            self._count_exact(c, -1)
            self._dirty_groups[ref] |= _groups_of(c)

    def _set_pair(self, pod: Pod, policy: NetworkPolicy) -> None:
        index = self._require_index()
        self._targets[policy.ref].add(pod.ref)
        pairs = self._contrib[pod.ref]
        for direction, _ in DIRECTIONS:
            old = pairs.pop((policy.ref, direction), None)
            new = (contribution(index, pod, direction, policy)
                   if direction in policy.policy_types else None)
            if new is not None:
                pairs[(policy.ref, direction)] = new
            self._swap_exact(old, new)
            for c in (old, new):
                if c is not None and (c.ranged or c.any):
                    self._dirty_groups[pod.ref] |= _groups_of(c)

    def _recompute_pair(self, pod_ref: str, policy_ref: str) -> None:
        pairs = self._contrib.get(pod_ref)
        if pairs is None:
            return
        pod = self._effective.get(pod_ref)
        policy = self.state.policies.get(policy_ref)
        if pod is not None and policy is not None and policy.namespace == pod.namespace and (
                policy.pod_selector.matches(pod.labels)):
            self._set_pair(pod, policy)
            return
        for direction, _ in DIRECTIONS:
            old = pairs.pop((policy_ref, direction), None)
            if old is not None:
                self._swap_exact(old, None)
                self._dirty_groups[pod_ref] |= _groups_of(old)
        self._targets[policy_ref].discard(pod_ref)

    # ---------------------------------------------------------------- which changes matter

    def _peer_relevant(self, policy: NetworkPolicy, pod: Pod) -> bool:
        """Could this pod be one of the policy's peers (before or after a change)?"""
        for direction, rules in ((INGRESS, policy.ingress), (EGRESS, policy.egress)):
            for rule in rules:
                named = direction == EGRESS and pod.ports and any(
                    isinstance(p.port, str) for p in rule.ports)
                if not rule.peers:
                    if named:
                        return True
                    continue
                for peer in rule.peers:
                    if peer.ip_block is not None:
                        if named and any(ip in peer.ip_block.cidr for ip in pod.ips
                                         if ip.version == peer.ip_block.cidr.version):
                            return True
                        continue
                    if peer.namespace_selector is None:
                        if pod.namespace != policy.namespace:
                            continue
                    elif not peer.namespace_selector.matches(self._ns_labels(pod.namespace)):
                        continue  # namespace label changes are handled on their own
                    if peer.pod_selector is None or peer.pod_selector.matches(pod.labels):
                        return True
        return False

    def _ns_labels(self, name: str) -> object:
        return self._require_index().namespace(name).labels

    @staticmethod
    def _ns_relevant(policy: NetworkPolicy, labels: list) -> bool:
        return any(peer.namespace_selector is not None and any(
            peer.namespace_selector.matches(lab) for lab in labels)
            for rule in (*policy.ingress, *policy.egress) for peer in rule.peers)

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

    def _count_exact(self, c: _Contribution, sign: int) -> None:
        self._count(c.exact.items(), sign)

    def _swap_exact(self, old: _Contribution | None, new: _Contribution | None) -> None:
        """Replace a contribution's exact elements, counting only what differs: a policy
        re-resolved after one peer changed keeps nearly all of its elements."""
        before = old.exact if old is not None else {}
        after = new.exact if new is not None else {}
        self._count(((el, refs) for el, refs in before.items() if after.get(el) != refs), -1)
        self._count(((el, refs) for el, refs in after.items() if before.get(el) != refs), +1)

    def _count(self, items: Iterable[tuple[Element, Refs]], sign: int) -> None:
        exact, dirty = self._exact, self._exact_dirty
        for el, refs in items:
            counts = exact.get(el)
            if counts is None:
                counts = exact[el] = {}
            for r in refs:
                n = counts.get(r, 0) + sign
                if n:
                    counts[r] = n
                else:
                    del counts[r]
            dirty.add(el)

    def _flush_exact(self) -> None:
        """Comments of the exact elements whose refs changed, computed once per update."""
        for el in self._exact_dirty:
            counts = self._exact.get(el)
            if counts:
                self._put(el, comment_for(counts))
            else:
                self._exact.pop(el, None)
                self._drop(el)
        self._exact_dirty.clear()

    def _place(self, owner: tuple, wanted: dict[Element, str]) -> None:
        """Make ``owner``'s non-exact elements exactly ``wanted``.

        An element may be claimed by two owners for a moment (a pod handing its IP over to
        another, in whichever order they are recomputed): claims are counted, and the element
        goes only when nobody claims it.
        """
        old = self._owned.pop(owner, {})
        for el in old.keys() - wanted.keys():
            claims = self._claims[el]
            del claims[owner]
            if claims:
                self._put(el, claims[min(claims)])
            else:
                del self._claims[el]
                self._drop(el)
        for el, comment in wanted.items():
            if old.get(el) != comment:
                claims = self._claims.setdefault(el, {})
                claims[owner] = comment
                self._put(el, claims[min(claims)])
        if wanted:
            self._owned[owner] = wanted

    def _assemble(self, ref: str) -> None:
        """Isolation elements of one pod, and its ranged and allow-all groups whose
        contributions changed (the others stay as they are: a big pod has thousands)."""
        pod = self._effective.get(ref)
        pairs = self._contrib.get(ref, {})
        iso: dict[Element, str] = {}
        if pod is not None:
            for direction, key in DIRECTIONS:
                policies = sorted(p for p, d in pairs if d == direction)
                for ip in pod.ips if policies else ():
                    iso[(isolated_set(key, ip.version), ((int(ip), int(ip)),))] = (
                        comment_for(policies, f"{ref} by "))
        self._place((ref, ("iso",)), iso)
        for group in self._dirty_groups.pop(ref, set()):
            wanted: dict[Element, str] = {}
            if group[0] == "ranged":
                _, name, proto, me = group
                rects = [r for c in pairs.values() for r in c.ranged.get((name, proto, me), ())]
                for peer, span, refs in disjoint_boxes(rects):
                    wanted[(name, (peer, me, proto, span))] = comment_for(refs)
            else:
                _, name, me = group
                items = [i for c in pairs.values() for i in c.any.get((name, me), ())]
                for peer, refs in union(items):
                    wanted[(name, (peer, me))] = comment_for(refs)
            self._place((ref, group), wanted)
            if wanted:
                self._groups[ref].add(group)
            else:
                self._groups[ref].discard(group)
        if not self._groups.get(ref):
            self._groups.pop(ref, None)

    def _pending(self) -> list[Endpoint]:
        out = []
        for ep in self.endpoints.values():
            pod = self.state.pods.get(ep.pod_ref)
            if pod is None or (pod.uid and ep.uid and pod.uid != ep.uid):
                out.append(ep)
        return out

    def _assemble_endpoints(self) -> None:
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
        out = []
        for ref in self._local_refs():
            rep = PodIsolation(self._effective[ref])
            for policy_ref, direction in sorted(self._contrib.get(ref, {})):
                getattr(rep, direction.lower()).append(policy_ref)
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

    def compiled(self) -> Compiled:
        return Compiled(self.current_elements(), self.report(), self.warnings())


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
