"""Who a policy's from/to stands for: peers resolved to address intervals.

Selectors become the IPs of the pods they match, ipBlocks become ``cidr - except`` as
disjoint intervals, named ports are resolved on the destination pod. An ``Index`` holds the
lookups this needs, built once per cluster state.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from np_agent.policy.intervals import Interval, network_interval, subtract
from np_agent.policy.model import (
    LabelSelector,
    Namespace,
    NetworkPolicy,
    Peer,
    Pod,
    PolicyPort,
    Rule,
)

ALL_PORTS: Interval = (0, 65535)
FULL_RANGE = {4: (0, 2**32 - 1), 6: (0, 2**128 - 1)}


@dataclass(frozen=True)
class Target:
    """One resolved peer: an address interval of one IP version, and the pod behind it when
    it is a single pod (needed to resolve egress named ports on the destination pod)."""

    version: int
    interval: Interval
    pod: Pod | None = None


class Index:
    """Pod and namespace lookups for peer resolution. Pods are added and removed one by one
    as they change; namespaces changing rebuilds it (rare). Resolved peers are memoised, and
    a pod's change forgets only the memos it could be part of."""

    def __init__(self, pods: Iterable[Pod], namespaces: dict[str, Namespace]) -> None:
        self.namespaces = namespaces
        self.pods_by_ns: dict[str, dict[str, Pod]] = defaultdict(dict)
        self.named: dict[tuple[str, str], dict[str, Pod]] = defaultdict(dict)
        self._ns_cache: dict[LabelSelector, list[str]] = {}
        self.peer_cache: dict[tuple[Peer, str], list[Target]] = {}
        for pod in pods:
            self.add_pod(pod)

    def add_pod(self, pod: Pod) -> None:
        if not pod.is_enforceable:
            return
        if pod.namespace not in self.pods_by_ns:
            self._ns_cache.clear()  # a namespace known only through its pods appears
        self.pods_by_ns[pod.namespace][pod.ref] = pod
        for cp in pod.ports:
            self.named[(cp.name, cp.protocol)][pod.ref] = pod
        self._forget(pod)

    def remove_pod(self, pod: Pod) -> None:
        if self.pods_by_ns.get(pod.namespace, {}).pop(pod.ref, None) is None:
            return
        for cp in pod.ports:
            self.named[(cp.name, cp.protocol)].pop(pod.ref, None)
        self._forget(pod)

    def _forget(self, pod: Pod) -> None:
        """Drop the memoised peers this pod is (or was) one of."""
        ns_labels = self.namespace(pod.namespace).labels
        for key in [k for k in self.peer_cache if _could_match(k, pod, ns_labels)]:
            del self.peer_cache[key]

    def forget_namespaces(self) -> None:
        """Namespace labels changed: selector results over namespaces are stale."""
        self._ns_cache.clear()
        self.peer_cache.clear()

    def namespace(self, name: str) -> Namespace:
        # A namespace we were not told about still carries the label the API server sets.
        return self.namespaces.get(name) or Namespace(
            name, {"kubernetes.io/metadata.name": name})

    def namespaces_matching(self, selector: LabelSelector) -> list[str]:
        if selector not in self._ns_cache:
            names = set(self.namespaces) | set(self.pods_by_ns)
            self._ns_cache[selector] = [n for n in sorted(names)
                                        if selector.matches(self.namespace(n).labels)]
        return self._ns_cache[selector]


def _could_match(key: tuple[Peer, str], pod: Pod, ns_labels: object) -> bool:
    peer, policy_ns = key
    if peer.ip_block is not None:
        return False  # addresses only: no pod changes them
    if peer.namespace_selector is None:
        if pod.namespace != policy_ns:
            return False
    elif not peer.namespace_selector.matches(ns_labels):  # type: ignore[arg-type]
        return False
    return peer.pod_selector is None or peer.pod_selector.matches(pod.labels)


def _pod_targets(pods: Iterable[Pod]) -> list[Target]:
    return [Target(ip.version, (int(ip), int(ip)), pod) for pod in pods for ip in pod.ips]


def resolve_peer(index: Index, policy: NetworkPolicy, peer: Peer) -> list[Target]:
    """The addresses one from/to entry stands for.

    Memoised per index: many policies name the same peers (a team's namespaces, an app
    label), and an index lives until pods or namespaces change.
    """
    key = (peer, policy.namespace if peer.namespace_selector is None else "")
    cached = index.peer_cache.get(key)
    if cached is None:
        cached = index.peer_cache[key] = _resolve(index, policy, peer)
    return cached


def _resolve(index: Index, policy: NetworkPolicy, peer: Peer) -> list[Target]:
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
    return _pod_targets(p for ns in namespaces for p in index.pods_by_ns.get(ns, {}).values()
                        if selector.matches(p.labels))


def resolve_peers(index: Index, policy: NetworkPolicy, rule: Rule) -> list[Target]:
    if not rule.peers:  # from/to absent or empty: every address
        return [Target(v, FULL_RANGE[v]) for v in (4, 6)]
    return [t for peer in rule.peers for t in resolve_peer(index, policy, peer)]


def port_interval(port: PolicyPort) -> Interval:
    if port.port is None:
        return ALL_PORTS
    assert isinstance(port.port, int)
    return port.port, port.end_port or port.port


def egress_named(index: Index, port: PolicyPort, target: Target) -> list[tuple[Interval, int]]:
    """An egress named port is resolved on each destination pod: find the pods inside the
    target that declare that name, each with its own number."""
    assert isinstance(port.port, str)
    if target.pod is not None:
        number = target.pod.named_port(port.port, port.protocol)
        return [] if number is None else [(target.interval, number)]
    lo, hi = target.interval
    out = []
    for pod in index.named[(port.port, port.protocol)].values():
        number = pod.named_port(port.port, port.protocol)
        out += [((int(ip), int(ip)), number) for ip in pod.ips
                if ip.version == target.version and lo <= int(ip) <= hi and number is not None]
    return out
