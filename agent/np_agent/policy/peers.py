"""Peers that are addresses, and the pod and namespace index the compiler looks things up in.

Pod peers are classes of pods (policy.identity); what stays an address is an ipBlock (``cidr -
except`` as disjoint intervals) and "every address" for a rule without from/to. An egress
named port towards such a range is resolved on every known pod inside it that declares the
name. An ``Index`` holds pods by namespace and by named port, and namespace selector results.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from np_agent.policy.intervals import Interval, network_interval, subtract
from np_agent.policy.model import IPBlock, LabelSelector, Namespace, Pod, PolicyPort

ALL_PORTS: Interval = (0, 65535)
FULL_RANGE = {4: (0, 2**32 - 1), 6: (0, 2**128 - 1)}


@dataclass(frozen=True)
class Target:
    """One address peer: an interval of one IP version."""

    version: int
    interval: Interval


class Index:
    """Pod and namespace lookups. Pods are added and removed one by one as they change;
    namespace selector results are memoised until a namespace changes."""

    def __init__(self, pods: Iterable[Pod], namespaces: dict[str, Namespace]) -> None:
        self.namespaces = namespaces
        self.pods_by_ns: dict[str, dict[str, Pod]] = defaultdict(dict)
        self.named: dict[tuple[str, str], dict[str, Pod]] = defaultdict(dict)
        self._ns_cache: dict[LabelSelector, list[str]] = {}
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

    def remove_pod(self, pod: Pod) -> None:
        if self.pods_by_ns.get(pod.namespace, {}).pop(pod.ref, None) is None:
            return
        for cp in pod.ports:
            self.named[(cp.name, cp.protocol)].pop(pod.ref, None)

    def forget_namespaces(self) -> None:
        """Namespace labels changed: selector results over namespaces are stale."""
        self._ns_cache.clear()

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


@lru_cache(maxsize=4096)  # many policies name the same blocks (the cluster's, the internet)
def block_targets(block: IPBlock) -> tuple[Target, ...]:
    """An ipBlock as disjoint intervals: its cidr minus every except."""
    holes = [network_interval(e) for e in block.excepts]
    return tuple(Target(block.cidr.version, iv)
                 for iv in subtract(network_interval(block.cidr), holes))


def port_interval(port: PolicyPort) -> Interval:
    if port.port is None:
        return ALL_PORTS
    assert isinstance(port.port, int)
    return port.port, port.end_port or port.port


def egress_named(index: Index, port: PolicyPort, target: Target) -> list[tuple[Interval, int]]:
    """An egress named port towards an address range is resolved on each destination pod:
    the pods inside the range that declare that name, each with its own number."""
    assert isinstance(port.port, str)
    lo, hi = target.interval
    out = []
    for pod in index.named[(port.port, port.protocol)].values():
        number = pod.named_port(port.port, port.protocol)
        out += [((int(ip), int(ip)), number) for ip in pod.ips
                if ip.version == target.version and lo <= int(ip) <= hi and number is not None]
    return out
