"""An independent, word-by-word reading of the NetworkPolicy API reference.

``evaluate`` answers "may this connection be opened?" straight from the objects, with no
intervals, boxes or sets. It shares nothing with the compiler, which is why it is the oracle
the compiler is tested against, and what the lab and the demo print as the expected side of
their reachability matrices.
"""

from __future__ import annotations

import ipaddress

from np_agent.policy.model import EGRESS, INGRESS, ClusterState, NetworkPolicy, Peer, Pod, Rule


def _pod_by_ip(state: ClusterState, ip: ipaddress._BaseAddress) -> Pod | None:
    for pod in state.pods.values():
        if pod.is_enforceable and ip in pod.ips:
            return pod
    return None


def _ns_labels(state: ClusterState, name: str) -> dict[str, str]:
    ns = state.namespaces.get(name)
    return dict(ns.labels) if ns else {"kubernetes.io/metadata.name": name}


def _peer_matches(state: ClusterState, policy: NetworkPolicy, peer: Peer, ip) -> bool:
    if peer.ip_block is not None:
        b = peer.ip_block
        return (ip.version == b.cidr.version and ip in b.cidr
                and not any(ip in e for e in b.excepts))
    pod = _pod_by_ip(state, ip)
    if pod is None:
        return False
    if peer.namespace_selector is None:
        if pod.namespace != policy.namespace:
            return False
    elif not peer.namespace_selector.matches(_ns_labels(state, pod.namespace)):
        return False
    return peer.pod_selector is None or peer.pod_selector.matches(pod.labels)


def _port_matches(rule: Rule, proto: str, port: int, dst_pod: Pod | None) -> bool:
    if not rule.ports:
        return True
    for p in rule.ports:
        if p.protocol != proto:
            continue
        if p.port is None:
            return True
        if isinstance(p.port, str):
            if dst_pod is not None and dst_pod.named_port(p.port, proto) == port:
                return True
        elif p.port <= port <= (p.end_port or p.port):
            return True
    return False


def _direction_allows(state, pod: Pod, direction: str, other_ip, proto, port, dst_pod) -> bool:
    policies = [p for p in state.policies.values()
                if p.namespace == pod.namespace and p.pod_selector.matches(pod.labels)
                and direction in p.policy_types]
    if not policies:
        return True
    for policy in policies:
        for rule in (policy.ingress if direction == INGRESS else policy.egress):
            peer_ok = not rule.peers or any(_peer_matches(state, policy, peer, other_ip)
                                            for peer in rule.peers)
            if peer_ok and _port_matches(rule, proto, port, dst_pod):
                return True
    return False


def evaluate(state: ClusterState, src: str, dst: str, proto: str, port: int,
             node_name: str | None = None) -> bool:
    """proto is TCP/UDP/SCTP (ports matter) or ICMP (only rules without ports allow it).
    With ``node_name``, only pods of that node are enforced here (the others' nodes do)."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    src_pod, dst_pod = _pod_by_ip(state, s), _pod_by_ip(state, d)

    def here(pod: Pod | None) -> bool:
        return pod is not None and (node_name is None or pod.node_name == node_name)

    if here(src_pod) and not _direction_allows(state, src_pod, EGRESS, d, proto, port, dst_pod):
        return False
    return not (here(dst_pod) and not _direction_allows(
        state, dst_pod, INGRESS, s, proto, port, dst_pod))
