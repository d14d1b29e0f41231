"""A policy rule in words, for people reading dump-rules: who it admits and on what.

Read from the model, the same objects the compiler reads, so the words cannot drift from
what is enforced: "from pods {run=apipod} in namespaces {kubernetes.io/metadata.name=frontend}
on TCP 80".
"""

from __future__ import annotations

from np_agent.policy.model import INGRESS, NetworkPolicy, Peer, PolicyPort, Rule


def _peer(peer: Peer) -> str:
    if peer.ip_block is not None:
        block = peer.ip_block
        excepts = ", ".join(map(str, block.excepts))
        return f"{block.cidr}" + (f" except {excepts}" if excepts else "")
    pods = "every pod" if peer.pod_selector is None or str(peer.pod_selector) == "{}" else (
        f"pods {peer.pod_selector}")
    if peer.namespace_selector is None:
        return f"{pods} of this namespace"
    if str(peer.namespace_selector) == "{}":
        return f"{pods} of every namespace"
    return f"{pods} in namespaces {peer.namespace_selector}"


def _port(port: PolicyPort) -> str:
    if port.port is None:
        return f"{port.protocol} (every port)"
    if isinstance(port.port, str):
        return f"{port.protocol} port named {port.port}"
    if port.end_port:
        return f"{port.protocol} {port.port}-{port.end_port}"
    return f"{port.protocol} {port.port}"


def rule_words(rule: Rule, direction: str) -> str:
    """``direction``: INGRESS or EGRESS (model constants)."""
    word = "from" if direction == INGRESS else "to"
    peers = ", ".join(_peer(p) for p in rule.peers) if rule.peers else "anywhere"
    ports = ", ".join(_port(p) for p in rule.ports) if rule.ports else (
        "every port and protocol")
    return f"{word} {peers} on {ports}"


def policy_lines(policy: NetworkPolicy, direction: str) -> list[str]:
    """One line per rule of one direction: ``ns/name ingress[0]: from ... on ...``."""
    key = "ingress" if direction == INGRESS else "egress"
    rules = policy.ingress if direction == INGRESS else policy.egress
    if policy.invalid:
        return [f"{policy.ref}: invalid ({policy.invalid}): nothing allowed"]
    if not rules:
        return [f"{policy.ref} {key}: no rule: nothing allowed"]
    return [f"{policy.ref} {key}[{i}]: {rule_words(rule, direction)}"
            for i, rule in enumerate(rules)]
