"""The upstream NetworkPolicy e2e model, end to end on the real kernel.

One lab for the whole module (``ConformanceCluster``): two node netns joined by a switch, the
fake API server, `np-agent run` per node, namespaces x, y, z and pods a, b, c in each (np-cni
ADD like a kubelet), spread over both nodes, each serving TCP and UDP on 80 and 81:

    node-1: x/a x/c y/b z/a z/c        node-2: x/b y/a y/c z/b

Every case writes policies (and label changes) to the API server, waits until both kernels
hold what the API state compiles to (the barrier: no probing of a half-applied state), then
probes the full 9x9 matrix on TCP/80, TCP/81, UDP/80 and UDP/81 with real packets and compares
it with a truth table written by hand in the upstream style (``Reachability.expect_peer``,
``expect_all_ingress`` ...). The hand-written tables are also checked against
``tests/oracle.py`` (an independent reading of the API reference) on the same API state, so a
wrong expectation cannot pass silently. Loopback cells (a pod to itself) are ignored in the
comparison, as upstream does, and must always be reachable: that traffic never leaves the pod.

SCTP cannot be probed on this kernel (no SCTP sockets): SCTP rules are checked in the
kernel's own listing of table inet np-nft in the node's netns.

Run alone with ``pytest -m conformance``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import yaml

from np_agent.nft import layout
from np_agent.nft.verdict import Matcher
from np_lab.conformance import (
    ALL_CHECKS,
    MODEL_PODS,
    TCP80,
    TCP81,
    UDP80,
    UDP81,
    Check,
    ConformanceCluster,
    Peer,
    Reachability,
    render_matrices,
    same,
)
from oracle import evaluate

pytestmark = [pytest.mark.conformance, pytest.mark.kernel]

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cluster() -> Iterator[ConformanceCluster]:
    if os.geteuid() != 0:
        pytest.fail("conformance tests need root: they build network namespaces")
    with ConformanceCluster(2) as c:
        c.build_model()
        c.wait_converged()
        prefix = c.lab.prefix
        yield c
    leftovers = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert prefix not in leftovers


@pytest.fixture
def c(cluster: ConformanceCluster) -> ConformanceCluster:
    """The lab as every case starts: no policies, the model's labels, kernels converged."""
    cluster.reset_model()
    cluster.wait_converged()
    return cluster


# --------------------------------------------------------------------------- helpers


def R(default: bool = True) -> Reachability:  # noqa: N802 - upstream's NewReachability
    return Reachability(MODEL_PODS, default)


def apply(c: ConformanceCluster, *docs: str) -> None:
    """NetworkPolicies written as YAML (kind and apiVersion implied)."""
    for doc in docs:
        obj = yaml.safe_load(doc)
        obj.setdefault("kind", "NetworkPolicy")
        obj.setdefault("apiVersion", "networking.k8s.io/v1")
        c.apply_object(obj)


def delete(c: ConformanceCluster, namespace: str, name: str) -> None:
    c.api.delete("networkpolicies", namespace, name)


def cidr(ip: str, bits: int) -> str:
    return str(ipaddress.ip_network(f"{ip}/{bits}", strict=False))


def on_node_of(c: ConformanceCluster, ref: str) -> set[str]:
    """The model pods placed on the same node as ``ref`` (the placement alternates)."""
    node = c.pods[ref].node
    return {r for r in MODEL_PODS if c.pods[r].node == node}


def kernel_allows(c: ConformanceCluster, direction: str, peer: str, pod: str, proto: int,
                  port: int) -> bool:
    """Whether the sets of the pod's node, as the kernel holds them, admit the key
    ``peer . pod . proto . port`` in the direction's chains (IPv4; the pod is isolated)."""
    table = c.kernel_table(c.node(c.pods[pod].node))
    assert table is not None
    rs = layout.ruleset({name: s.elements for name, s in table.sets.items()})
    return Matcher(rs).direction_allows(direction, 4, c.ip(pod), c.ip(peer), proto, port)


def oracle_disagreements(c: ConformanceCluster, expectations: Mapping[Check, Reachability],
                         family: int) -> list[str]:
    state = c.api_state()
    out = []
    for check, r in expectations.items():
        for frm, to in r.expected.cells():
            if frm == to:
                continue
            want = evaluate(state, c.ip(frm, family), c.ip(to, family), check.protocol,
                            check.port)
            if want != r.expected.get(frm, to):
                out.append(f"{check} {frm} -> {to}: hand-written {r.expected.get(frm, to)}, "
                           f"oracle {want}")
    return out


def check(c: ConformanceCluster, expectations: Mapping[Check, Reachability] | Reachability,
          family: int = 4) -> None:
    """Barrier, cross-check with the oracle, then the full matrix with real packets."""
    if isinstance(expectations, Reachability):
        expectations = same(expectations)
    assert set(expectations) == set(ALL_CHECKS), "every case asserts all four port/protocols"
    c.wait_converged()
    wrong = oracle_disagreements(c, expectations, family)
    assert not wrong, "expectation disagrees with tests/oracle.py:\n" + "\n".join(wrong)
    ok = c.validate(expectations, family)
    if not ok:
        logs = "\n".join(f"--- {n.name}\n{c.agent_log(n)[-1500:]}\n{c.nft_list(n)}"
                         for n in c.nodes)
        pytest.fail("observed matrix differs from the expectation:\n"
                    + render_matrices(expectations, family, verbose=True) + "\n" + logs)
    for check_, r in expectations.items():
        for ref in MODEL_PODS:
            assert r.observed.get(ref, ref), f"{check_} loopback {ref} not reachable"


# --------------------------------------------------------------------------- baseline


def test_baseline_all_reachable(c: ConformanceCluster) -> None:
    """No policy: every pod reaches every pod on every port and protocol, across nodes."""
    check(c, R(True))
    assert c.kernel_isolated("ingress") == set() and c.kernel_isolated("egress") == set()


def test_baseline_all_reachable_ipv6(c: ConformanceCluster) -> None:
    """The same over IPv6: the pods are dual-stack (np-cni + host-local, one range each)."""
    check(c, R(True), family=6)


# --------------------------------------------------------------------------- deny


def test_default_deny_ingress(c: ConformanceCluster) -> None:
    """podSelector {} + policyTypes [Ingress]: nothing reaches x; x still reaches out."""
    apply(c, "metadata: {name: deny-ingress, namespace: x}\n"
             "spec: {podSelector: {}, policyTypes: [Ingress]}")
    r = R(True)
    r.expect_peer(Peer(), Peer(namespace="x"), False)
    check(c, r)


def test_default_deny_egress(c: ConformanceCluster) -> None:
    """podSelector {} + policyTypes [Egress]: x reaches nothing; x is still reachable."""
    apply(c, "metadata: {name: deny-egress, namespace: x}\n"
             "spec: {podSelector: {}, policyTypes: [Egress]}")
    r = R(True)
    r.expect_peer(Peer(namespace="x"), Peer(), False)
    check(c, r)


def test_default_deny_all(c: ConformanceCluster) -> None:
    """Both policyTypes, no rules: x is cut off both ways, also between its own pods."""
    apply(c, "metadata: {name: deny-all, namespace: x}\n"
             "spec: {podSelector: {}, policyTypes: [Ingress, Egress]}")
    r = R(True)
    r.expect_peer(Peer(), Peer(namespace="x"), False)
    r.expect_peer(Peer(namespace="x"), Peer(), False)
    check(c, r)


def test_deny_ingress_one_pod_implicit_policy_types(c: ConformanceCluster) -> None:
    """`ingress: []` without policyTypes defaults to [Ingress] and isolates only pod=a."""
    apply(c, "metadata: {name: deny-a, namespace: x}\n"
             "spec: {podSelector: {matchLabels: {pod: a}}, ingress: []}")
    r = R(True)
    r.expect_all_ingress("x/a", False)
    check(c, r)
    assert c.kernel_isolated("ingress") == {"x/a"} and c.kernel_isolated("egress") == set()


def test_policy_selects_only_its_own_namespace(c: ConformanceCluster) -> None:
    """A policy in y with podSelector pod=a isolates y/a, never x/a or z/a."""
    apply(c, "metadata: {name: deny-a, namespace: y}\n"
             "spec: {podSelector: {matchLabels: {pod: a}}, policyTypes: [Ingress, Egress]}")
    r = R(True)
    r.expect_all_ingress("y/a", False)
    r.expect_all_egress("y/a", False)
    check(c, r)


# --------------------------------------------------------------------------- allow-all


def test_allow_all_ingress_from_all_namespaces(c: ConformanceCluster) -> None:
    """namespaceSelector {} admits every pod of every namespace: x is isolated (the kernel
    says so) and still reached by all."""
    apply(c, "metadata: {name: allow-all-ns, namespace: x}\n"
             "spec: {podSelector: {}, ingress: [{from: [{namespaceSelector: {}}]}]}")
    check(c, R(True))
    assert c.kernel_isolated("ingress") == {"x/a", "x/b", "x/c"}


def test_multiple_ingress_policies_allow_all_takes_precedence(c: ConformanceCluster) -> None:
    """Port-80-only ingress on x, then an allow-all policy (`ingress: [{}]`) is added:
    policies are additive, the union opens everything."""
    apply(c, "metadata: {name: only-80, namespace: x}\n"
             "spec: {podSelector: {}, ingress: [{ports: [{port: 80}]}]}")
    closed = R(True)
    closed.expect_peer(Peer(), Peer(namespace="x"), False)
    check(c, {TCP80: R(True), TCP81: closed, UDP80: closed.copy(), UDP81: closed.copy()})
    apply(c, "metadata: {name: allow-all, namespace: x}\n"
             "spec: {podSelector: {}, ingress: [{}]}")
    check(c, R(True))


def test_multiple_egress_policies_allow_all_takes_precedence(c: ConformanceCluster) -> None:
    """Egress only to TCP 80 from x, then egress allow-all added: everything opens."""
    apply(c, "metadata: {name: only-80, namespace: x}\n"
             "spec: {podSelector: {}, policyTypes: [Egress], egress: [{ports: [{port: 80}]}]}")
    closed = R(True)
    closed.expect_peer(Peer(namespace="x"), Peer(), False)
    check(c, {TCP80: R(True), TCP81: closed, UDP80: closed.copy(), UDP81: closed.copy()})
    apply(c, "metadata: {name: allow-all, namespace: x}\n"
             "spec: {podSelector: {}, policyTypes: [Egress], egress: [{}]}")
    check(c, R(True))


# --------------------------------------------------------------------------- pod selectors


def test_ingress_from_same_namespace_empty_pod_selector(c: ConformanceCluster) -> None:
    """`from: [{podSelector: {}}]` means every pod of the policy's namespace only."""
    apply(c, "metadata: {name: same-ns, namespace: x}\n"
             "spec: {podSelector: {}, ingress: [{from: [{podSelector: {}}]}]}")
    r = R(True)
    r.expect_peer(Peer(namespace="y"), Peer(namespace="x"), False)
    r.expect_peer(Peer(namespace="z"), Peer(namespace="x"), False)
    check(c, r)


def test_ingress_pod_selector_match_labels(c: ConformanceCluster) -> None:
    """x/a admits pod=b of its own namespace only (not y/b, z/b)."""
    apply(c, "metadata: {name: from-b, namespace: x}\n"
             "spec: {podSelector: {matchLabels: {pod: a}},"
             " ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]}")
    r = R(True)
    r.expect_all_ingress("x/a", False)
    r.expect("x/b", "x/a", True)
    check(c, r)


def test_ingress_pod_selector_match_expressions_in(c: ConformanceCluster) -> None:
    """matchExpressions `pod In [b]` selects the same peers as matchLabels pod=b."""
    apply(c, "metadata: {name: from-b-expr, namespace: x}\n"
             "spec: {podSelector: {matchExpressions: [{key: pod, operator: In, values: [a]}]},"
             " ingress: [{from: [{podSelector: {matchExpressions:"
             " [{key: pod, operator: In, values: [b]}]}}]}]}")
    r = R(True)
    r.expect_all_ingress("x/a", False)
    r.expect("x/b", "x/a", True)
    check(c, r)


def test_ingress_any_of_several_pod_selectors(c: ConformanceCluster) -> None:
    """Two podSelector peers are OR-ed: x/b and x/c reach x/a."""
    apply(c, "metadata: {name: from-b-or-c, namespace: x}\n"
             "spec: {podSelector: {matchLabels: {pod: a}}, ingress: [{from: ["
             "{podSelector: {matchLabels: {pod: b}}}, {podSelector: {matchLabels: {pod: c}}}]}]}")
    r = R(True)
    r.expect_all_ingress("x/a", False)
    r.expect("x/b", "x/a", True)
    r.expect("x/c", "x/a", True)
    check(c, r)


def test_selector_exists_notin_doesnotexist_and_label_removed(c: ConformanceCluster) -> None:
    """`pod Exists` + `pod NotIn [c]` picks x/a, x/b; a namespaceSelector `ns DoesNotExist`
    matches no namespace until z loses its ns label mid-case, then z's pods get in."""
    apply(c, "metadata: {name: exprs, namespace: x}\n"
             "spec:\n"
             "  podSelector: {matchLabels: {pod: a}}\n"
             "  ingress:\n"
             "  - from:\n"
             "    - podSelector: {matchExpressions: [{key: pod, operator: Exists},"
             " {key: pod, operator: NotIn, values: [c]}]}\n"
             "    - namespaceSelector: {matchExpressions: [{key: ns, operator: DoesNotExist}]}")
    r = R(True)
    r.expect_all_ingress("x/a", False)
    r.expect("x/b", "x/a", True)
    check(c, r)
    c.set_namespace_labels("z", {})
    r.expect_peer(Peer(namespace="z"), Peer("x", "a"), True)
    check(c, r)


def test_match_labels_and_expressions_in_one_selector(c: ConformanceCluster) -> None:
    """matchLabels and matchExpressions of one selector are AND-ed (pod=b and pod In [b, c]
    is pod=b); with namespaceSelector {} in the same peer, pod=b of every namespace."""
    apply(c, "metadata: {name: and-in-selector, namespace: x}\n"
             "spec: {podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{"
             "namespaceSelector: {}, podSelector: {matchLabels: {pod: b}, matchExpressions:"
             " [{key: pod, operator: In, values: [b, c]}]}}]}]}")
    r = R(True)
    r.expect_all_ingress("x/a", False)
    r.expect_peer(Peer(pod="b"), Peer("x", "a"), True)
    check(c, r)


def test_policy_types_egress_only_ignores_ingress_rules(c: ConformanceCluster) -> None:
    """policyTypes [Egress] with an ingress section: the ingress rules are ignored (x/a is
    not ingress-isolated, everyone reaches it) while egress goes to ns=y only."""
    apply(c, "metadata: {name: egress-only, namespace: x}\n"
             "spec:\n"
             "  podSelector: {matchLabels: {pod: a}}\n"
             "  policyTypes: [Egress]\n"
             "  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]\n"
             "  egress: [{to: [{namespaceSelector: {matchLabels: {ns: y}}}]}]")
    r = R(True)
    r.expect_all_egress("x/a", False)
    r.expect_peer(Peer("x", "a"), Peer(namespace="y"), True)
    check(c, r)
    assert c.kernel_isolated("ingress") == set() and c.kernel_isolated("egress") == {"x/a"}


# --------------------------------------------------------------------------- namespace selectors


def test_ingress_namespace_selector_match_labels(c: ConformanceCluster) -> None:
    """x admits only pods of namespaces labelled ns=y: not even its own pods."""
    apply(c, "metadata: {name: from-y, namespace: x}\n"
             "spec: {podSelector: {}, ingress: [{from: [{namespaceSelector:"
             " {matchLabels: {ns: y}}}]}]}")
    r = R(True)
    r.expect_peer(Peer(namespace="x"), Peer(namespace="x"), False)
    r.expect_peer(Peer(namespace="z"), Peer(namespace="x"), False)
    check(c, r)


def test_ingress_namespace_selector_default_namespace_label(c: ConformanceCluster) -> None:
    """kubernetes.io/metadata.name (set by the API server) works as a namespace label."""
    apply(c, "metadata: {name: from-y, namespace: x}\n"
             "spec: {podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector:"
             " {matchLabels: {kubernetes.io/metadata.name: y}}}]}]}")
    r = R(True)
    r.expect_all_ingress("x/a", False)
    r.expect_peer(Peer(namespace="y"), Peer("x", "a"), True)
    check(c, r)


def test_ingress_namespace_selector_match_expressions_notin(c: ConformanceCluster) -> None:
    """`ns NotIn [x, y]`: only z's pods reach x."""
    apply(c, "metadata: {name: from-z, namespace: x}\n"
             "spec: {podSelector: {}, ingress: [{from: [{namespaceSelector: {matchExpressions:"
             " [{key: ns, operator: NotIn, values: [x, y]}]}}]}]}")
    r = R(True)
    r.expect_peer(Peer(namespace="x"), Peer(namespace="x"), False)
    r.expect_peer(Peer(namespace="y"), Peer(namespace="x"), False)
    check(c, r)


def test_ingress_namespace_match_expressions_default_label(c: ConformanceCluster) -> None:
    """`kubernetes.io/metadata.name In [y, z]` on x/a: x/b and x/c are shut out."""
    apply(c, "metadata: {name: from-yz, namespace: x}\n"
             "spec: {podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector:"
             " {matchExpressions: [{key: kubernetes.io/metadata.name, operator: In,"
             " values: [y, z]}]}}]}]}")
    r = R(True)
    r.expect_all_ingress("x/a", False)
    r.expect_peer(Peer(namespace="y"), Peer("x", "a"), True)
    r.expect_peer(Peer(namespace="z"), Peer("x", "a"), True)
    check(c, r)


def test_ingress_pod_or_namespace_selector_two_peers(c: ConformanceCluster) -> None:
    """Two peers (two dashes) are OR: all of y, and pod=b of x."""
    apply(c, "metadata: {name: or, namespace: x}\n"
             "spec:\n"
             "  podSelector: {matchLabels: {pod: a}}\n"
             "  ingress:\n"
             "  - from:\n"
             "    - namespaceSelector: {matchExpressions: [{key: ns, operator: In, values: [y]}]}\n"
             "    - podSelector: {matchLabels: {pod: b}}")
    r = R(True)
    r.expect_all_ingress("x/a", False)
    r.expect_peer(Peer(namespace="y"), Peer("x", "a"), True)
    r.expect("x/b", "x/a", True)
    check(c, r)


def test_ingress_pod_and_namespace_selector_one_peer(c: ConformanceCluster) -> None:
    """Both selectors in one peer (one dash) are AND: pod=b in namespaces other than x."""
    apply(c, "metadata: {name: and, namespace: x}\n"
             "spec:\n"
             "  podSelector: {matchLabels: {pod: a}}\n"
             "  ingress:\n"
             "  - from:\n"
             "    - namespaceSelector: {matchExpressions: [{key: ns, operator: NotIn,"
             " values: [x]}]}\n"
             "      podSelector: {matchLabels: {pod: b}}")
    r = R(True)
    r.expect_all_ingress("x/a", False)
    r.expect("y/b", "x/a", True)
    r.expect("z/b", "x/a", True)
    check(c, r)


def test_ingress_multiple_pod_and_namespace_selectors(c: ConformanceCluster) -> None:
    """`ns NotIn [x]` AND `pod In [b, c]`: y/b, y/c, z/b, z/c reach x/a."""
    apply(c, "metadata: {name: multi, namespace: x}\n"
             "spec:\n"
             "  podSelector: {matchLabels: {pod: a}}\n"
             "  ingress:\n"
             "  - from:\n"
             "    - namespaceSelector: {matchExpressions: [{key: ns, operator: NotIn,"
             " values: [x]}]}\n"
             "      podSelector: {matchExpressions: [{key: pod, operator: In, values: [b, c]}]}")
    r = R(True)
    r.expect_all_ingress("x/a", False)
    for ref in ("y/b", "y/c", "z/b", "z/c"):
        r.expect(ref, "x/a", True)
    check(c, r)


def test_ingress_from_pod_in_other_namespace(c: ConformanceCluster) -> None:
    """ns=y AND pod=a: exactly one pod of another namespace reaches x/a."""
    apply(c, "metadata: {name: from-ya, namespace: x}\n"
             "spec: {podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{"
             "namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: a}}}]}]}")
    r = R(True)
    r.expect_all_ingress("x/a", False)
    r.expect("y/a", "x/a", True)
    check(c, r)


# --------------------------------------------------------------------------- ports


def test_ingress_port_81_from_namespace(c: ConformanceCluster) -> None:
    """ns=y on TCP 81 only: TCP/81 from y gets in, TCP/80 and UDP do not."""
    apply(c, "metadata: {name: port-81, namespace: x}\n"
             "spec: {podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector:"
             " {matchLabels: {ns: y}}}], ports: [{protocol: TCP, port: 81}]}]}")
    closed = R(True)
    closed.expect_all_ingress("x/a", False)
    open81 = closed.copy()
    open81.expect_peer(Peer(namespace="y"), Peer("x", "a"), True)
    check(c, {TCP80: closed, TCP81: open81, UDP80: closed.copy(), UDP81: closed.copy()})


def test_udp_only_policy_does_not_admit_tcp(c: ConformanceCluster) -> None:
    """A rule for UDP 81 admits UDP/81 and nothing on TCP, not even TCP/81."""
    apply(c, "metadata: {name: udp-81, namespace: x}\n"
             "spec: {podSelector: {matchLabels: {pod: a}},"
             " ingress: [{ports: [{protocol: UDP, port: 81}]}]}")
    closed = R(True)
    closed.expect_all_ingress("x/a", False)
    check(c, {TCP80: closed, TCP81: closed.copy(), UDP80: closed.copy(), UDP81: R(True)})


def test_ingress_protocol_without_port_allows_any_port(c: ConformanceCluster) -> None:
    """`ports: [{protocol: UDP}]`: every UDP port, no TCP."""
    apply(c, "metadata: {name: any-udp, namespace: x}\n"
             "spec: {podSelector: {}, ingress: [{ports: [{protocol: UDP}]}]}")
    closed = R(True)
    closed.expect_peer(Peer(), Peer(namespace="x"), False)
    check(c, {TCP80: closed, TCP81: closed.copy(), UDP80: R(True), UDP81: R(True)})


def test_ingress_end_port(c: ConformanceCluster) -> None:
    """endPort ranges: TCP 81-90 and UDP 70-80 admit TCP/81 and UDP/80 only."""
    apply(c, "metadata: {name: ranges, namespace: x}\n"
             "spec: {podSelector: {matchLabels: {pod: a}}, ingress: [{ports: ["
             "{protocol: TCP, port: 81, endPort: 90}, {protocol: UDP, port: 70, endPort: 80}]}]}")
    closed = R(True)
    closed.expect_all_ingress("x/a", False)
    check(c, {TCP80: closed, TCP81: R(True), UDP80: R(True), UDP81: closed.copy()})


def test_egress_end_port(c: ConformanceCluster) -> None:
    """Egress TCP 79-80 from x/a: x/a reaches TCP/80 everywhere and nothing else."""
    apply(c, "metadata: {name: egress-range, namespace: x}\n"
             "spec: {podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress],"
             " egress: [{ports: [{protocol: TCP, port: 79, endPort: 80}]}]}")
    closed = R(True)
    closed.expect_all_egress("x/a", False)
    check(c, {TCP80: R(True), TCP81: closed, UDP80: closed.copy(), UDP81: closed.copy()})


def test_ingress_rules_are_or_with_their_own_ports(c: ConformanceCluster) -> None:
    """Two rules: y on TCP 80, z on TCP 81; a rule's ports apply to its own peers only."""
    apply(c, "metadata: {name: two-rules, namespace: x}\n"
             "spec:\n"
             "  podSelector: {matchLabels: {pod: a}}\n"
             "  ingress:\n"
             "  - {from: [{namespaceSelector: {matchLabels: {ns: y}}}], ports: [{port: 80}]}\n"
             "  - {from: [{namespaceSelector: {matchLabels: {ns: z}}}], ports: [{port: 81}]}")
    closed = R(True)
    closed.expect_all_ingress("x/a", False)
    t80, t81 = closed.copy(), closed.copy()
    t80.expect_peer(Peer(namespace="y"), Peer("x", "a"), True)
    t81.expect_peer(Peer(namespace="z"), Peer("x", "a"), True)
    check(c, {TCP80: t80, TCP81: t81, UDP80: closed, UDP81: closed.copy()})


# --------------------------------------------------------------------------- named ports


def test_ingress_named_port(c: ConformanceCluster) -> None:
    """port serve-80-tcp resolves on x/a's own container ports: TCP/80 only."""
    apply(c, "metadata: {name: named, namespace: x}\n"
             "spec: {podSelector: {matchLabels: {pod: a}},"
             " ingress: [{ports: [{port: serve-80-tcp}]}]}")
    closed = R(True)
    closed.expect_all_ingress("x/a", False)
    check(c, {TCP80: R(True), TCP81: closed, UDP80: closed.copy(), UDP81: closed.copy()})


def test_ingress_named_udp_port_from_namespace(c: ConformanceCluster) -> None:
    """From ns=y on the named port serve-81-udp (protocol UDP), into every pod of x."""
    apply(c, "metadata: {name: named-udp, namespace: x}\n"
             "spec: {podSelector: {}, ingress: [{from: [{namespaceSelector:"
             " {matchLabels: {ns: y}}}], ports: [{protocol: UDP, port: serve-81-udp}]}]}")
    closed = R(True)
    closed.expect_peer(Peer(), Peer(namespace="x"), False)
    u81 = closed.copy()
    u81.expect_peer(Peer(namespace="y"), Peer(namespace="x"), True)
    check(c, {TCP80: closed, TCP81: closed.copy(), UDP80: closed.copy(), UDP81: u81})


def test_egress_named_port(c: ConformanceCluster) -> None:
    """Egress on serve-81-tcp resolves on each destination pod: x/a reaches TCP/81 only."""
    apply(c, "metadata: {name: egress-named, namespace: x}\n"
             "spec: {podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress],"
             " egress: [{ports: [{port: serve-81-tcp}]}]}")
    closed = R(True)
    closed.expect_all_egress("x/a", False)
    check(c, {TCP80: closed, TCP81: R(True), UDP80: closed.copy(), UDP81: closed.copy()})


def test_named_port_with_wrong_protocol_matches_nothing(c: ConformanceCluster) -> None:
    """serve-80-tcp with protocol UDP names no container port: nothing gets in."""
    apply(c, "metadata: {name: wrong-proto, namespace: x}\n"
             "spec: {podSelector: {matchLabels: {pod: a}},"
             " ingress: [{ports: [{protocol: UDP, port: serve-80-tcp}]}]}")
    r = R(True)
    r.expect_all_ingress("x/a", False)
    check(c, r)


# --------------------------------------------------------------------------- egress


def test_egress_pod_selector(c: ConformanceCluster) -> None:
    """x/a may talk to pod=b of its namespace only."""
    apply(c, "metadata: {name: to-b, namespace: x}\n"
             "spec: {podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress],"
             " egress: [{to: [{podSelector: {matchLabels: {pod: b}}}]}]}")
    r = R(True)
    r.expect_all_egress("x/a", False)
    r.expect("x/a", "x/b", True)
    check(c, r)


def test_egress_namespace_and_pod_selector(c: ConformanceCluster) -> None:
    """Egress to ns=y AND pod=a: x/a reaches y/a only (a server in another namespace)."""
    apply(c, "metadata: {name: to-ya, namespace: x}\n"
             "spec: {podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress], egress: [{to: [{"
             "namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: a}}}]}]}")
    r = R(True)
    r.expect_all_egress("x/a", False)
    r.expect("x/a", "y/a", True)
    check(c, r)


def test_egress_denied_on_client_even_if_server_allows(c: ConformanceCluster) -> None:
    """x/a has no egress; y/b admits only x/a: the client side wins, y/b is unreachable."""
    apply(c, "metadata: {name: deny-egress-a, namespace: x}\n"
             "spec: {podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress]}",
          "metadata: {name: allow-from-xa, namespace: y}\n"
          "spec: {podSelector: {matchLabels: {pod: b}}, ingress: [{from: [{"
          "namespaceSelector: {matchLabels: {ns: x}}, podSelector: {matchLabels: {pod: a}}}]}]}")
    r = R(True)
    r.expect_all_egress("x/a", False)
    r.expect_all_ingress("y/b", False)
    check(c, r)


def test_ingress_and_egress_in_one_policy(c: ConformanceCluster) -> None:
    """policyTypes [Ingress, Egress] with a rule each: x/a talks with x/b only, both ways."""
    apply(c, "metadata: {name: both, namespace: x}\n"
             "spec:\n"
             "  podSelector: {matchLabels: {pod: a}}\n"
             "  policyTypes: [Ingress, Egress]\n"
             "  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]\n"
             "  egress: [{to: [{podSelector: {matchLabels: {pod: b}}}]}]")
    r = R(True)
    r.expect_all_ingress("x/a", False)
    r.expect_all_egress("x/a", False)
    r.expect("x/a", "x/b", True)
    r.expect("x/b", "x/a", True)
    check(c, r)


def test_ingress_and_egress_controlled_independently(c: ConformanceCluster) -> None:
    """An ingress deny and an egress allow-to-y on the same pod, in separate policies: each
    direction follows its own policy."""
    apply(c, "metadata: {name: deny-in, namespace: x}\n"
             "spec: {podSelector: {matchLabels: {pod: a}}, policyTypes: [Ingress]}",
          "metadata: {name: out-to-y, namespace: x}\n"
          "spec: {podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress],"
          " egress: [{to: [{namespaceSelector: {matchLabels: {ns: y}}}]}]}")
    r = R(True)
    r.expect_all_ingress("x/a", False)
    r.expect_all_egress("x/a", False)
    r.expect_peer(Peer("x", "a"), Peer(namespace="y"), True)
    check(c, r)


# --------------------------------------------------------------------------- ipBlock


def test_egress_ipblock_to_pod_ip(c: ConformanceCluster) -> None:
    """Egress to ipBlock <y/b's IP>/32 (taken at run time): x/a reaches y/b only."""
    apply(c, f"metadata: {{name: to-yb-ip, namespace: x}}\n"
             f"spec: {{podSelector: {{matchLabels: {{pod: a}}}}, policyTypes: [Egress],"
             f" egress: [{{to: [{{ipBlock: {{cidr: {c.ip('y/b')}/32}}}}]}}]}}")
    r = R(True)
    r.expect_all_egress("x/a", False)
    r.expect("x/a", "y/b", True)
    check(c, r)


def test_egress_ipblock_except(c: ConformanceCluster) -> None:
    """Egress to node-2's pod CIDR except y/a's /32: x/a reaches x/b, y/c, z/b."""
    apply(c, f"metadata: {{name: cidr-except, namespace: x}}\n"
             f"spec: {{podSelector: {{matchLabels: {{pod: a}}}}, policyTypes: [Egress],"
             f" egress: [{{to: [{{ipBlock: {{cidr: {cidr(c.ip('y/a'), 24)},"
             f" except: [{c.ip('y/a')}/32]}}}}]}}]}}")
    r = R(True)
    r.expect_all_egress("x/a", False)
    for ref in on_node_of(c, "y/a") - {"y/a"}:  # x/b, y/c, z/b
        r.expect("x/a", ref, True)
    check(c, r)


def test_ip_in_cidr_and_except_allowed_by_another_peer(c: ConformanceCluster) -> None:
    """y/a excepted from the CIDR peer is denied; the policy is updated to add a peer for
    y/a's /32: an address in both cidr and except of one block is allowed by another."""
    base = (f"metadata: {{name: overlap, namespace: x}}\n"
            f"spec: {{podSelector: {{matchLabels: {{pod: a}}}}, policyTypes: [Egress],"
            f" egress: [{{to: [{{ipBlock: {{cidr: {cidr(c.ip('y/a'), 24)},"
            f" except: [{c.ip('y/a')}/32]}}}}EXTRA]}}]}}")
    apply(c, base.replace("EXTRA", ""))
    r = R(True)
    r.expect_all_egress("x/a", False)
    for ref in on_node_of(c, "y/a") - {"y/a"}:
        r.expect("x/a", ref, True)
    check(c, r)
    apply(c, base.replace("EXTRA", f", {{ipBlock: {{cidr: {c.ip('y/a')}/32}}}}"))
    r.expect("x/a", "y/a", True)
    check(c, r)


def test_ingress_ipblock_except(c: ConformanceCluster) -> None:
    """Ingress from 0.0.0.0/0 except y/b and z/c: every pod of x is closed to those two."""
    apply(c, f"metadata: {{name: all-but-two, namespace: x}}\n"
             f"spec: {{podSelector: {{}}, ingress: [{{from: [{{ipBlock: {{cidr: 0.0.0.0/0,"
             f" except: [{c.ip('y/b')}/32, {c.ip('z/c')}/32]}}}}]}}]}}")
    r = R(True)
    r.expect_peer(Peer("y", "b"), Peer(namespace="x"), False)
    r.expect_peer(Peer("z", "c"), Peer(namespace="x"), False)
    check(c, r)


def test_ingress_ipblock_node_pod_cidr(c: ConformanceCluster) -> None:
    """Ingress from node-1's pod CIDR (derived from x/a's IP): only pods of node-1 reach x/a;
    ipBlock applies to pod IPs like to any address."""
    apply(c, f"metadata: {{name: from-node1, namespace: x}}\n"
             f"spec: {{podSelector: {{matchLabels: {{pod: a}}}},"
             f" ingress: [{{from: [{{ipBlock: {{cidr: {cidr(c.ip('x/a'), 24)}}}}}]}}]}}")
    r = R(True)
    r.expect_all_ingress("x/a", False)
    for ref in on_node_of(c, "x/a"):  # x/a, x/c, y/b, z/a, z/c
        r.expect(ref, "x/a", True)
    check(c, r)


def test_egress_ipblock_pod_ip_and_port(c: ConformanceCluster) -> None:
    """Egress to y/b's /32 on UDP 81 only: one cell open in one matrix."""
    apply(c, f"metadata: {{name: ip-port, namespace: x}}\n"
             f"spec: {{podSelector: {{matchLabels: {{pod: a}}}}, policyTypes: [Egress],"
             f" egress: [{{to: [{{ipBlock: {{cidr: {c.ip('y/b')}/32}}}}],"
             f" ports: [{{protocol: UDP, port: 81}}]}}]}}")
    closed = R(True)
    closed.expect_all_egress("x/a", False)
    u81 = closed.copy()
    u81.expect("x/a", "y/b", True)
    check(c, {TCP80: closed, TCP81: closed.copy(), UDP80: closed.copy(), UDP81: u81})


def test_ipblock_ipv6(c: ConformanceCluster) -> None:
    """Ingress from y/b's IPv6 /128: over IPv6 only y/b reaches x/a; the IPv6 block admits
    no IPv4 source, so over IPv4 x/a is closed to all."""
    apply(c, f"metadata: {{name: v6-block, namespace: x}}\n"
             f"spec: {{podSelector: {{matchLabels: {{pod: a}}}},"
             f" ingress: [{{from: [{{ipBlock: {{cidr: '{c.ip('y/b', 6)}/128'}}}}]}}]}}")
    r = R(True)
    r.expect_all_ingress("x/a", False)
    check(c, r, family=4)
    r6 = R(True)
    r6.expect_all_ingress("x/a", False)
    r6.expect("y/b", "x/a", True)
    check(c, r6, family=6)


def test_selectors_ipv6(c: ConformanceCluster) -> None:
    """Selectors resolve to both address families: ns=y into x, checked over IPv6."""
    apply(c, "metadata: {name: from-y, namespace: x}\n"
             "spec: {podSelector: {}, ingress: [{from: [{namespaceSelector:"
             " {matchLabels: {ns: y}}}]}], egress: [{to: [{podSelector: {}}]}],"
             " policyTypes: [Ingress, Egress]}")
    r = R(True)
    r.expect_peer(Peer(), Peer(namespace="x"), False)
    r.expect_peer(Peer(namespace="y"), Peer(namespace="x"), True)
    r.expect_peer(Peer(namespace="x"), Peer(namespace="y"), False)
    r.expect_peer(Peer(namespace="x"), Peer(namespace="z"), False)
    check(c, r, family=6)


# --------------------------------------------------------------------------- changes mid-case


def test_policy_updated(c: ConformanceCluster) -> None:
    """x/a admits ns=y; the policy is updated to admit ns=z instead."""
    doc = ("metadata: {name: update-me, namespace: x}\n"
           "spec: {podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector:"
           " {matchLabels: {ns: NS}}}]}]}")
    apply(c, doc.replace("NS", "y"))
    r = R(True)
    r.expect_all_ingress("x/a", False)
    r.expect_peer(Peer(namespace="y"), Peer("x", "a"), True)
    check(c, r)
    apply(c, doc.replace("NS", "z"))
    r = R(True)
    r.expect_all_ingress("x/a", False)
    r.expect_peer(Peer(namespace="z"), Peer("x", "a"), True)
    check(c, r)


def test_policies_deleted(c: ConformanceCluster) -> None:
    """Deny ingress on x and deny egress on y; deleting one stops exactly its enforcement,
    deleting the other opens everything again."""
    apply(c, "metadata: {name: deny-in, namespace: x}\n"
             "spec: {podSelector: {}, policyTypes: [Ingress]}",
          "metadata: {name: deny-out, namespace: y}\n"
          "spec: {podSelector: {}, policyTypes: [Egress]}")
    r = R(True)
    r.expect_peer(Peer(), Peer(namespace="x"), False)
    r.expect_peer(Peer(namespace="y"), Peer(), False)
    check(c, r)
    delete(c, "x", "deny-in")
    r = R(True)
    r.expect_peer(Peer(namespace="y"), Peer(), False)
    check(c, r)
    delete(c, "y", "deny-out")
    check(c, R(True))
    assert c.kernel_isolated("ingress") == set() and c.kernel_isolated("egress") == set()


def test_namespace_label_update_makes_peer_match(c: ConformanceCluster) -> None:
    """x/a admits namespaces labelled team=blue; y gets the label (y's pods get in), then
    loses it (they are out again)."""
    apply(c, "metadata: {name: from-blue, namespace: x}\n"
             "spec: {podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector:"
             " {matchLabels: {team: blue}}}]}]}")
    closed = R(True)
    closed.expect_all_ingress("x/a", False)
    check(c, closed)
    c.set_namespace_labels("y", {"ns": "y", "team": "blue"})
    opened = closed.copy()
    opened.expect_peer(Peer(namespace="y"), Peer("x", "a"), True)
    check(c, opened)
    c.set_namespace_labels("y", {"ns": "y"})
    check(c, closed)


def test_pod_label_update_makes_peer_match(c: ConformanceCluster) -> None:
    """x/a admits pod=b2 from any namespace; y/b is relabelled pod=b2 (gets in), then back."""
    apply(c, "metadata: {name: from-b2, namespace: x}\n"
             "spec: {podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{"
             "namespaceSelector: {}, podSelector: {matchLabels: {pod: b2}}}]}]}")
    closed = R(True)
    closed.expect_all_ingress("x/a", False)
    check(c, closed)
    c.label_pod("y/b", {"pod": "b2"})
    opened = closed.copy()
    opened.expect("y/b", "x/a", True)
    check(c, opened)
    c.label_pod("y/b", {"pod": "b"})
    check(c, closed)


def test_pod_label_update_makes_pod_selected(c: ConformanceCluster) -> None:
    """A policy selecting target=isolated selects nothing until x/a gets that label, and
    releases x/a when the label goes."""
    apply(c, "metadata: {name: isolate, namespace: x}\n"
             "spec: {podSelector: {matchLabels: {target: isolated}}, ingress: []}")
    check(c, R(True))
    assert c.kernel_isolated("ingress") == set()
    c.label_pod("x/a", {"pod": "a", "target": "isolated"})
    r = R(True)
    r.expect_all_ingress("x/a", False)
    check(c, r)
    c.label_pod("x/a", {"pod": "a"})
    check(c, R(True))


def test_namespace_label_update_moves_egress_peer(c: ConformanceCluster) -> None:
    """x/a may reach namespaces labelled team=red: none, then z, then y instead of z."""
    apply(c, "metadata: {name: to-red, namespace: x}\n"
             "spec: {podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress],"
             " egress: [{to: [{namespaceSelector: {matchLabels: {team: red}}}]}]}")
    r = R(True)
    r.expect_all_egress("x/a", False)
    check(c, r)
    c.set_namespace_labels("z", {"ns": "z", "team": "red"})
    rz = r.copy()
    rz.expect_peer(Peer("x", "a"), Peer(namespace="z"), True)
    check(c, rz)
    c.set_namespace_labels("z", {"ns": "z"})
    c.set_namespace_labels("y", {"ns": "y", "team": "red"})
    ry = r.copy()
    ry.expect_peer(Peer("x", "a"), Peer(namespace="y"), True)
    check(c, ry)


# --------------------------------------------------------------------------- several policies


def test_stacked_policies_with_overlapping_selectors(c: ConformanceCluster) -> None:
    """x (all pods) admits y on TCP 80; a second policy on x/a admits z on TCP 81: x/a gets
    the union, x/b and x/c only the first."""
    apply(c, "metadata: {name: y-80, namespace: x}\n"
             "spec: {podSelector: {}, ingress: [{from: [{namespaceSelector:"
             " {matchLabels: {ns: y}}}], ports: [{port: 80}]}]}",
          "metadata: {name: z-81, namespace: x}\n"
          "spec: {podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector:"
          " {matchLabels: {ns: z}}}], ports: [{port: 81}]}]}")
    closed = R(True)
    closed.expect_peer(Peer(), Peer(namespace="x"), False)
    t80, t81 = closed.copy(), closed.copy()
    t80.expect_peer(Peer(namespace="y"), Peer(namespace="x"), True)
    t81.expect_peer(Peer(namespace="z"), Peer("x", "a"), True)
    check(c, {TCP80: t80, TCP81: t81, UDP80: closed, UDP81: closed.copy()})


def test_policies_in_several_namespaces(c: ConformanceCluster) -> None:
    """Deny-all ingress in x, egress to own namespace only in y, named-port ingress on z/c:
    three namespaces' policies enforced at once on both nodes."""
    apply(c, "metadata: {name: deny-in, namespace: x}\n"
             "spec: {podSelector: {}, policyTypes: [Ingress]}",
          "metadata: {name: own-ns, namespace: y}\n"
          "spec: {podSelector: {}, policyTypes: [Egress], egress: [{to: [{podSelector: {}}]}]}",
          "metadata: {name: web, namespace: z}\n"
          "spec: {podSelector: {matchLabels: {pod: c}}, ingress: [{ports: [{port: serve-80-udp,"
          " protocol: UDP}]}]}")
    base = R(True)
    base.expect_peer(Peer(), Peer(namespace="x"), False)
    base.expect_peer(Peer(namespace="y"), Peer(namespace="z"), False)
    closed_zc = base.copy()
    closed_zc.expect_all_ingress("z/c", False)
    u80 = base.copy()  # z/c admits UDP/80 from everyone but y (y's egress is y-only)
    check(c, {TCP80: closed_zc, TCP81: closed_zc.copy(), UDP80: u80, UDP81: closed_zc.copy()})


# --------------------------------------------------------------------------- SCTP (kernel)


def _elements(text: str, set_name: str) -> str:
    m = re.search(r"set " + re.escape(set_name) + r" \{(.*?)\n\t\}", text, re.S)
    return m.group(1) if m else ""


def test_sctp_rule_is_not_tcp(c: ConformanceCluster) -> None:
    """Ingress from ns=y on SCTP 80 only: x/a is closed to TCP and UDP (SCTP is not taken
    for TCP), and the kernel on x/a's node holds `<y pod> . <x/a> . sctp . 80` for every
    pod of y and no TCP or UDP element for x/a."""
    apply(c, "metadata: {name: sctp, namespace: x}\n"
             "spec: {podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector:"
             " {matchLabels: {ns: y}}}], ports: [{protocol: SCTP, port: 80}]}]}")
    r = R(True)
    r.expect_all_ingress("x/a", False)
    check(c, r)
    text = c.nft_list(c.pods["x/a"].node)
    xa = c.ip("x/a")
    peers = re.search(r"map ingress-peers-v4 \{(.*?)\n\t\}", text, re.S)
    assert peers, text
    chains = {re.search(rf"{re.escape(c.ip(ref))} comment \"{ref}\" : goto ([\w-]+)",
                        peers.group(1)).group(1) for ref in ("y/a", "y/b", "y/c")}
    assert len(chains) == 1, peers.group(1)  # the pods of y: one identity
    allow = _elements(text, chains.pop().replace("-v4", "-ports-v4"))
    assert f"{xa} . sctp . 80" in allow, text
    assert not re.search(rf"{re.escape(xa)} \. (tcp|udp)", allow), allow
    for ref in MODEL_PODS:
        assert kernel_allows(c, "ingress", ref, "x/a", 132, 80) == ref.startswith("y/"), ref
        assert not kernel_allows(c, "ingress", ref, "x/a", 6, 80)
    assert f"{xa} comment" in _elements(text, "ingress-isolated-v4")


def test_sctp_named_port_and_range_in_kernel(c: ConformanceCluster) -> None:
    """Egress from x/a to ns=y on the named port serve-81-sctp and to ns=z on SCTP 85-90
    (endPort): the kernel allows exactly SCTP 81 towards y's pods (the name resolved on each
    destination pod) and SCTP 85-90 towards z's pods, as a ranged element; TCP and UDP from
    x/a stay closed."""
    apply(c, "metadata: {name: sctp-egress, namespace: x}\n"
             "spec:\n"
             "  podSelector: {matchLabels: {pod: a}}\n"
             "  policyTypes: [Egress]\n"
             "  egress:\n"
             "  - to: [{namespaceSelector: {matchLabels: {ns: y}}}]\n"
             "    ports: [{protocol: SCTP, port: serve-81-sctp}]\n"
             "  - to: [{namespaceSelector: {matchLabels: {ns: z}}}]\n"
             "    ports: [{protocol: SCTP, port: 85, endPort: 90}]")
    r = R(True)
    r.expect_all_egress("x/a", False)
    check(c, r)
    text = c.nft_list(c.pods["x/a"].node)
    listed = "".join(_elements(text, m.group(1))
                     for m in re.finditer(r"set (egress-to-id\d+-ports-v4) \{", text))
    xa = re.escape(c.ip("x/a"))
    assert re.search(rf"{xa} \. sctp \. 81\b", listed), text
    assert re.search(rf"{xa} \. sctp \. 85-90", listed), text
    assert not re.search(r"\. (tcp|udp) \.", listed), text
    for ref in MODEL_PODS:
        for port in (80, 81, 82, 84, 85, 90, 91):
            want = (ref.startswith("y/") and port == 81) or (ref.startswith("z/")
                                                              and 85 <= port <= 90)
            assert kernel_allows(c, "egress", ref, "x/a", 132, port) == want, (ref, port, text)
        assert not kernel_allows(c, "egress", ref, "x/a", 6, 81)


# --------------------------------------------------------------------------- the lab CLI


def _load_lab_cli():
    import importlib.machinery
    import importlib.util

    loader = importlib.machinery.SourceFileLoader("np_lab_cli", str(ROOT / "scripts" / "lab"))
    spec = importlib.util.spec_from_loader("np_lab_cli", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_lab_cli_up_apply_matrix_and_down_after_crash(tmp_path: Path) -> None:
    """`scripts/lab up` leaves a daemon-owned lab; `apply` and `matrix` talk to it; after
    the daemon is killed with SIGKILL, `down` still stops every process and removes every
    namespace of the lab."""
    lab_cli = _load_lab_cli()
    state_dir = tmp_path / "lab"
    prefix = f"npnftt{os.getpid() % 10000}-"
    base = [sys.executable, str(ROOT / "scripts" / "lab"), "--state-dir", str(state_dir)]

    def run(*args: str, check_rc: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([*base, *args], capture_output=True, text=True, timeout=180)
        if check_rc:
            assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc

    try:
        run("up", "--nodes", "2", "--prefix", prefix)
        state = lab_cli.read_state(state_dir)
        assert state["status"] == "ready"
        policy = tmp_path / "deny.yaml"
        policy.write_text("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n"
                          "metadata: {name: deny, namespace: x}\n"
                          "spec: {podSelector: {}, policyTypes: [Ingress]}\n")
        out = run("apply", str(policy)).stdout
        assert "networkpolicy x/deny created" in out
        out = run("matrix", "--port", "80", "--protocol", "tcp").stdout
        assert "TCP/80 IPv4: 48 reachable, 24 denied, as expected" in out, out
        agents = [a["pid"] for a in state["agents"]]
        assert all(Path(f"/proc/{pid}").exists() for pid in agents)
        os.kill(state["pid"], 9)  # the daemon crashes; agents and namespaces stay behind
        deadline = time.monotonic() + 10
        while Path(f"/proc/{state['pid']}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert prefix in listed
    finally:
        out = run("down", check_rc=False)
    assert out.returncode == 0, out.stdout + out.stderr
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert prefix not in listed
    for pid in agents:
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().split()[2] == "Z"
    assert not state_dir.exists() or not any(state_dir.iterdir())
