"""NetworkPolicy -> desired nftables ruleset. A pure function: no kernel, no network.

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
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from . import layout
from .endpoints import Endpoint
from .intervals import Interval, Rect, Refs, disjoint_boxes, network_interval, subtract, union
from .model import (
    EGRESS,
    INGRESS,
    ClusterState,
    IPAddress,
    LabelSelector,
    Namespace,
    NetworkPolicy,
    Peer,
    Pod,
    PolicyPort,
    Rule,
)
from .ruleset import PROTO_NUMBERS, Ruleset

ALL_PORTS: Interval = (0, 65535)
FULL_RANGE = {4: (0, 2**32 - 1), 6: (0, 2**128 - 1)}
COMMENT_MAX = 127  # nft keeps at most 128 bytes of comment


@dataclass(frozen=True)
class Target:
    """One resolved peer: an address interval of one IP version, and the pod behind it when
    it is a single pod (needed to resolve egress named ports on the destination pod)."""

    version: int
    interval: Interval
    pod: Pod | None = None


@dataclass
class PodIsolation:
    """Which policies isolate a local pod, per direction (empty list: open that way)."""

    pod: Pod
    ingress: list[str] = field(default_factory=list)
    egress: list[str] = field(default_factory=list)


@dataclass
class Compiled:
    ruleset: Ruleset
    pods: list[PodIsolation]
    warnings: list[str]


class Index:
    """Lookups the compiler needs many times, built once per cluster state."""

    def __init__(self, state: ClusterState) -> None:
        self.state = state
        self.pods_by_ns: dict[str, list[Pod]] = defaultdict(list)
        self.named: dict[tuple[str, str], list[tuple[int, int, int]]] = defaultdict(list)
        for pod in state.pods.values():
            if not pod.is_enforceable:
                continue
            self.pods_by_ns[pod.namespace].append(pod)
            for cp in pod.ports:
                for ip in pod.ips:
                    self.named[(cp.name, cp.protocol)].append((ip.version, int(ip), cp.port))
        self.policies_by_ns: dict[str, list[NetworkPolicy]] = defaultdict(list)
        for pol in state.policies.values():
            self.policies_by_ns[pol.namespace].append(pol)
        self._ns_cache: dict[LabelSelector, list[str]] = {}

    def namespace(self, name: str) -> Namespace:
        # A namespace we were not told about still carries the label the API server sets.
        return self.state.namespaces.get(name) or Namespace(
            name, {"kubernetes.io/metadata.name": name})

    def namespaces_matching(self, selector: LabelSelector) -> list[str]:
        if selector not in self._ns_cache:
            names = set(self.state.namespaces) | set(self.pods_by_ns)
            self._ns_cache[selector] = [n for n in sorted(names)
                                        if selector.matches(self.namespace(n).labels)]
        return self._ns_cache[selector]


def _pod_targets(pods: Iterable[Pod]) -> list[Target]:
    return [Target(ip.version, (int(ip), int(ip)), pod) for pod in pods for ip in pod.ips]


def resolve_peer(index: Index, policy: NetworkPolicy, peer: Peer) -> list[Target]:
    """The addresses one from/to entry stands for."""
    if peer.ip_block is not None:
        block = peer.ip_block
        holes = [network_interval(e) for e in block.excepts]
        return [Target(block.cidr.version, iv)
                for iv in subtract(network_interval(block.cidr), holes)]
    if peer.namespace_selector is None:
        namespaces = [policy.namespace]
    else:
        namespaces = index.namespaces_matching(peer.namespace_selector)
    selector = peer.pod_selector or LabelSelector()
    return _pod_targets(p for ns in namespaces for p in index.pods_by_ns.get(ns, ())
                        if selector.matches(p.labels))


def resolve_peers(index: Index, policy: NetworkPolicy, rule: Rule) -> list[Target]:
    if not rule.peers:  # from/to absent or empty: every address
        return [Target(v, FULL_RANGE[v]) for v in (4, 6)]
    return [t for peer in rule.peers for t in resolve_peer(index, policy, peer)]


def _port_interval(port: PolicyPort) -> Interval:
    if port.port is None:
        return ALL_PORTS
    assert isinstance(port.port, int)
    return port.port, port.end_port or port.port


def _egress_named(index: Index, port: PolicyPort, target: Target) -> list[tuple[Interval, int]]:
    """An egress named port is resolved on each destination pod: find the pods inside the
    target that declare that name, each with its own number."""
    assert isinstance(port.port, str)
    if target.pod is not None:
        number = target.pod.named_port(port.port, port.protocol)
        return [] if number is None else [(target.interval, number)]
    lo, hi = target.interval
    return [((ip, ip), number) for version, ip, number in index.named[(port.port, port.protocol)]
            if version == target.version and lo <= ip <= hi]


def _comment(prefix: str, refs: Iterable[str]) -> str:
    refs = sorted(refs)
    text = prefix + ", ".join(refs)
    shown = len(refs)
    while len(text) > COMMENT_MAX and shown > 1:
        shown -= 1
        text = prefix + ", ".join(refs[:shown]) + f" +{len(refs) - shown} more"
    return text[:COMMENT_MAX]


def _gather(index: Index, pod: Pod, direction: str, policies: list[NetworkPolicy]) -> (
        tuple[dict[tuple[int, int], list[Rect]], dict[int, list[tuple[Interval, Refs]]]]):
    """Collect the (peer x port) rectangles every rule of every policy allows for this pod."""
    ports: dict[tuple[int, int], list[Rect]] = defaultdict(list)
    any_port: dict[int, list[tuple[Interval, Refs]]] = defaultdict(list)
    key = "ingress" if direction == INGRESS else "egress"
    for policy in policies:
        for i, rule in enumerate(getattr(policy, key)):
            refs = frozenset([f"{policy.ref} {key}[{i}]"])
            targets = resolve_peers(index, policy, rule)
            if not rule.ports:
                for t in targets:
                    any_port[t.version].append((t.interval, refs))
                continue
            for port in rule.ports:
                proto = PROTO_NUMBERS[port.protocol.lower()]
                if isinstance(port.port, str):
                    if direction == INGRESS:  # resolved on the destination: this pod
                        number = pod.named_port(port.port, port.protocol)
                        if number is not None:
                            for t in targets:
                                ports[(t.version, proto)].append((t.interval, (number, number),
                                                                  refs))
                    else:
                        for t in targets:
                            for iv, number in _egress_named(index, port, t):
                                ports[(t.version, proto)].append((iv, (number, number), refs))
                    continue
                span = _port_interval(port)
                for t in targets:
                    ports[(t.version, proto)].append((t.interval, span, refs))
    return ports, any_port


def _emit_pod(ruleset: Ruleset, index: Index, pod: Pod, direction: str,
              policies: list[NetworkPolicy]) -> None:
    key = "ingress" if direction == INGRESS else "egress"
    ports, any_port = _gather(index, pod, direction, policies)
    iso_comment = _comment(f"{pod.ref} by ", (p.ref for p in policies))
    for ip in pod.ips:
        v, me = ip.version, (int(ip), int(ip))
        ruleset.add_element(layout.isolated_set(key, v), (me,), iso_comment)
        for (version, proto), rects in ports.items():
            if version == v:
                _emit_ports(ruleset, key, v, me, proto, rects)
        for addr, refs in union(any_port.get(v, ())):
            ruleset.add_element(layout.allow_all_set(key, v), (addr, me), _comment("", refs))


def _emit_ports(ruleset: Ruleset, direction: str, version: int, me: Interval, proto: int,
                rects: list[Rect]) -> None:
    """One peer address on one port goes to the hash set (cheap to update, no overlap rules);
    everything with a range goes to the interval set, made disjoint first."""
    exact: dict[tuple[Interval, Interval], Refs] = {}
    ranged: list[Rect] = []
    for addr, span, refs in rects:
        if addr[0] == addr[1] and span[0] == span[1]:
            exact[(addr, span)] = exact.get((addr, span), frozenset()) | refs
        else:
            ranged.append((addr, span, refs))
    for (addr, span), refs in exact.items():
        ruleset.add_element(layout.allow_set(direction, version), (addr, me, proto, span),
                            _comment("", refs))
    for addr, span, refs in disjoint_boxes(ranged):
        ruleset.add_element(layout.allow_ranges_set(direction, version), (addr, me, proto, span),
                            _comment("", refs))


def is_local(pod: Pod, node_name: str | None) -> bool:
    return node_name is None or pod.node_name == node_name


def _with_endpoints(state: ClusterState, endpoints: Iterable[Endpoint]) -> tuple[
        ClusterState, set[str], list[Endpoint]]:
    """Give local pods the IPs np-cni assigned (the kubelet publishes status.podIPs later).

    Returns the effective state, the refs of pods wired on this node, and the endpoints whose
    pod the agent does not know (or knows with another UID: a pod of the same name that was
    re-created): those stay pending, denied both ways, until their Pod object arrives.
    """
    ips: dict[str, list[IPAddress]] = defaultdict(list)
    pending: list[Endpoint] = []
    for ep in endpoints:
        pod = state.pods.get(ep.pod_ref)
        if pod is None or (pod.uid and ep.uid and pod.uid != ep.uid):
            pending.append(ep)
            continue
        ips[ep.pod_ref].extend(ipaddress.ip_address(ip) for ip in ep.ips)
    if not ips:
        return state, set(), pending
    effective = ClusterState(dict(state.pods), state.namespaces, state.policies)
    for ref, addrs in ips.items():
        effective.pods[ref] = replace(state.pods[ref], ips=tuple(dict.fromkeys(addrs)))
    return effective, set(ips), pending


def _emit_endpoints(ruleset: Ruleset, endpoints: Iterable[Endpoint],
                    pending: list[Endpoint]) -> None:
    for ep in endpoints:
        for text in ep.ips:
            ip = ipaddress.ip_address(text)
            me = (int(ip), int(ip))
            ruleset.add_element(layout.pod_ifaces_set(ip.version), (ep.host_if, me), ep.pod_ref)
    for ep in pending:  # isolated both ways with nothing allowed: denied until known
        for text in ep.ips:
            ip = ipaddress.ip_address(text)
            for direction in ("ingress", "egress"):
                ruleset.add_element(layout.isolated_set(direction, ip.version),
                                    ((int(ip), int(ip)),), f"{ep.pod_ref} (Pod not known yet)")


def compile_state(state: ClusterState, node_name: str | None = None,
                  endpoints: Iterable[Endpoint] = ()) -> Compiled:
    """Compile the whole cluster state into the ruleset for one node.

    With ``node_name`` None every pod is treated as local (a one-node lab); otherwise pods of
    other nodes are only peers, and their own isolation is left to their node. ``endpoints``
    are the attachments np-cni made on this node: their pods are local, with the IPs np-cni
    gave them.
    """
    endpoints = list(endpoints)
    state, wired, pending = _with_endpoints(state, endpoints)
    index = Index(state)
    ruleset = layout.empty_ruleset()
    _emit_endpoints(ruleset, endpoints, pending)
    reports: list[PodIsolation] = []
    warnings = [f"NetworkPolicy {p.ref} is invalid ({p.invalid}): the pods it selects are "
                f"isolated both ways with nothing allowed" for p in state.policies.values()
                if p.invalid]
    warnings += [f"pod {ep.pod_ref} (container {ep.container_id[:12]}) was wired by np-cni but "
                 "its Pod object is not known: denied both ways until it is" for ep in pending]
    for pod in sorted(state.pods.values(), key=lambda p: p.ref):
        if not pod.is_enforceable or not (pod.ref in wired or is_local(pod, node_name)):
            continue
        selecting = [p for p in index.policies_by_ns.get(pod.namespace, ())
                     if p.pod_selector.matches(pod.labels)]
        report = PodIsolation(pod)
        for direction in (INGRESS, EGRESS):
            policies = sorted((p for p in selecting if direction in p.policy_types),
                              key=lambda p: p.ref)
            if policies:
                _emit_pod(ruleset, index, pod, direction, policies)
                getattr(report, direction.lower()).extend(p.ref for p in policies)
        reports.append(report)
    return Compiled(ruleset, reports, warnings)


def address_text(version: int, iv: Interval) -> str:
    """An interval as a person writes it: an address, a CIDR, or a range."""
    cls = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
    lo, hi = cls(iv[0]), cls(iv[1])
    if lo == hi:
        return str(lo)
    nets = list(ipaddress.summarize_address_range(lo, hi))
    return str(nets[0]) if len(nets) == 1 else f"{lo}-{hi}"
