"""Two independent ways to answer "is this packet allowed?", for property tests.

``evaluate`` reads the NetworkPolicy objects directly, following the API reference word by
word, with no intervals, boxes or sets. ``lookup`` walks a compiled Ruleset the way the
kernel's chains do. The compiler is right when both agree on every flow.
"""

from __future__ import annotations

import ipaddress

from np_agent import layout
from np_agent.compiler import is_local
from np_agent.model import EGRESS, INGRESS, ClusterState, NetworkPolicy, Peer, Pod, Rule
from np_agent.ruleset import PROTO_NUMBERS, Ruleset


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
    """proto is TCP/UDP/SCTP (ports matter) or ICMP (only rules without ports allow it)."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    src_pod, dst_pod = _pod_by_ip(state, s), _pod_by_ip(state, d)
    if src_pod and is_local(src_pod, node_name) and not _direction_allows(
            state, src_pod, EGRESS, d, proto, port, dst_pod):
        return False
    return not (dst_pod and is_local(dst_pod, node_name) and not _direction_allows(
        state, dst_pod, INGRESS, s, proto, port, dst_pod))


def _contains(key, probe) -> bool:
    for field, value in zip(key, probe, strict=True):
        if isinstance(field, tuple):
            if not field[0] <= value <= field[1]:
                return False
        elif field != value:
            return False
    return True


def _in_set(rs: Ruleset, name: str, probe: tuple) -> bool:
    return any(_contains(k, probe) for k in rs.elements.get(name, {}))


def lookup(rs: Ruleset, src: str, dst: str, proto: str, port: int) -> bool:
    """What the forward chain decides for the first packet of a connection."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    v = s.version
    proto_num = PROTO_NUMBERS.get(proto.lower(), 1)
    for direction, me, peer in (("egress", int(s), int(d)), ("ingress", int(d), int(s))):
        if not _in_set(rs, layout.isolated_set(direction, v), (me,)):
            continue
        if proto_num in (6, 17, 132) and any(
                _in_set(rs, name, (peer, me, proto_num, port))
                for name in (layout.allow_set(direction, v),
                             layout.allow_ranges_set(direction, v))):
            continue
        if _in_set(rs, layout.allow_all_set(direction, v), (peer, me)):
            continue
        return False
    return True
