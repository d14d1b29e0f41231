"""NetworkPolicy semantics of the compiler, checked on the compiled sets (no root needed).

Each test states flows the API reference says are allowed or denied, and `lookup` walks the
compiled ruleset the way the kernel's chains do.
"""

from __future__ import annotations

import ipaddress
import itertools
from pathlib import Path

import pytest

from conftest import ROOT, load_yaml, pod_ip, upstream_model_yaml
from np_agent.nft import layout
from np_agent.policy.compiler import compile_state
from np_agent.policy.manifests import load_manifests
from np_agent.policy.model import ClusterState
from np_agent.ruleset import allow_ranges_set, isolated_set, pod_ifaces_set
from oracle import evaluate, lookup

PODS = [(ns, p) for ns in "xyz" for p in "abc"]


def with_policies(*policies: str, base: str | None = None) -> ClusterState:
    result = load_yaml(base or upstream_model_yaml(), *policies)
    assert not result.errors, result.errors
    return result.state


def reach(state: ClusterState, proto: str = "TCP", port: int = 80, version: int = 4,
          node: str | None = None) -> set[tuple[str, str]]:
    """The allowed (from, to) pairs among the 9 pods, as 'x/a' strings."""
    rs = layout.ruleset(compile_state(state, node).elements)
    out = set()
    for (sn, sp), (dn, dp) in itertools.product(PODS, PODS):
        if (sn, sp) == (dn, dp):
            continue
        if lookup(rs, pod_ip(sn, sp, version), pod_ip(dn, dp, version), proto, port):
            out.add((f"{sn}/{sp}", f"{dn}/{dp}"))
    return out


ALL = {(f"{a}/{b}", f"{c}/{d}") for (a, b), (c, d) in itertools.product(PODS, PODS)
       if (a, b) != (c, d)}


def without(*, to: set[str] = frozenset(), frm: set[str] = frozenset()) -> set:
    return {(s, d) for s, d in ALL if d not in to and s not in frm}


def policy(name: str, ns: str, spec: str) -> str:
    return f"""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: {name}, namespace: {ns}}}
spec:
{spec}"""


# ------------------------------------------------------------------ isolation basics


def test_no_policy_everything_open(upstream):
    assert reach(upstream) == ALL
    assert not compile_state(upstream).element_count()


def test_deny_all_ingress_in_namespace(upstream):
    state = with_policies(policy("deny", "x", "  podSelector: {}\n  ingress: []"))
    assert reach(state) == without(to={"x/a", "x/b", "x/c"})
    assert reach(state, "UDP", 53, 6) == without(to={"x/a", "x/b", "x/c"})


def test_ingress_absent_vs_empty_rule():
    """`ingress` absent with policyTypes Ingress denies; `ingress: [{}]` allows everything."""
    deny = with_policies(policy("p", "x", "  podSelector: {}\n  policyTypes: [Ingress]"))
    allow = with_policies(policy("p", "x", "  podSelector: {}\n  ingress: [{}]"))
    assert reach(deny) == without(to={"x/a", "x/b", "x/c"})
    assert reach(allow) == ALL
    assert reach(allow, "ICMP", 0) == ALL


def test_policy_types_default_egress_only_when_egress_rules():
    # No policyTypes, egress rules present: Ingress AND Egress (the API server's defaulting).
    state = with_policies(policy("p", "x", """  podSelector: {matchLabels: {pod: a}}
  egress: [{to: [{podSelector: {matchLabels: {pod: b}}}]}]"""))
    got = reach(state)
    assert ("x/a", "x/b") in got and ("x/a", "x/c") not in got and ("x/b", "x/a") not in got
    # egress: [] without policyTypes: Ingress only, egress stays open.
    state = with_policies(policy("p", "x", "  podSelector: {matchLabels: {pod: a}}\n  egress: []"))
    assert reach(state) == without(to={"x/a"})


def test_egress_only_policy_leaves_ingress_open():
    state = with_policies(policy("p", "x", """  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]"""))
    assert reach(state) == without(frm={"x/a"})


def test_multiple_policies_are_additive():
    state = with_policies(
        policy("p1", "x", """  podSelector: {matchLabels: {pod: a}}
  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]"""),
        policy("p2", "x", """  podSelector: {matchLabels: {pod: a}}
  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}]}]"""))
    into_a = {s for s, d in reach(state) if d == "x/a"}
    assert into_a == {"x/b", "y/a", "y/b", "y/c"}


# ------------------------------------------------------------------ selectors


def test_pod_selector_is_namespace_local():
    state = with_policies(policy("p", "x", """  podSelector: {matchLabels: {pod: a}}
  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]"""))
    assert {s for s, d in reach(state) if d == "x/a"} == {"x/b"}


def test_empty_namespace_selector_means_all_namespaces():
    state = with_policies(policy("p", "x", """  podSelector: {matchLabels: {pod: a}}
  ingress: [{from: [{namespaceSelector: {}}]}]"""))
    assert {s for s, d in reach(state) if d == "x/a"} == {f"{n}/{p}" for n, p in PODS} - {"x/a"}


def test_one_dash_and_vs_two_dashes_or():
    """The classic trap: one peer with both selectors is AND; two peers are OR."""
    and_ = with_policies(policy("p", "x", """  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {ns: y}}
      podSelector: {matchLabels: {pod: b}}"""))
    or_ = with_policies(policy("p", "x", """  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {ns: y}}
    - podSelector: {matchLabels: {pod: b}}"""))
    assert {s for s, d in reach(and_) if d == "x/a"} == {"y/b"}
    assert {s for s, d in reach(or_) if d == "x/a"} == {"y/a", "y/b", "y/c", "x/b"}


@pytest.mark.parametrize("expr,expected", [
    ("{key: pod, operator: In, values: [b, c]}", {"x/b", "x/c"}),
    ("{key: pod, operator: NotIn, values: [b]}", {"x/c"}),
    ("{key: pod, operator: Exists}", {"x/b", "x/c"}),
    ("{key: tier, operator: DoesNotExist}", {"x/b", "x/c"}),
    ("{key: tier, operator: Exists}", set()),
])
def test_match_expressions(expr, expected):
    state = with_policies(policy("p", "x", f"""  podSelector: {{matchLabels: {{pod: a}}}}
  ingress: [{{from: [{{podSelector: {{matchExpressions: [{expr}]}}}}]}}]"""))
    assert {s for s, d in reach(state) if d == "x/a"} == expected


def test_namespace_match_expressions_and_labels_together():
    state = with_policies(policy("p", "x", """  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - namespaceSelector:
        matchExpressions: [{key: ns, operator: In, values: [y, z]}]
        matchLabels: {ns: z}"""))
    assert {s for s, d in reach(state) if d == "x/a"} == {"z/a", "z/b", "z/c"}


def test_peer_selection_follows_namespace_label_default():
    """kubernetes.io/metadata.name is there even when the Namespace object omits it."""
    state = with_policies(policy("p", "x", """  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: z}}}]"""))
    assert {s for s, d in reach(state) if d == "x/a"} == {"z/a", "z/b", "z/c"}


# ------------------------------------------------------------------ ports


def test_ports_protocols_and_default_tcp():
    state = with_policies(policy("p", "x", """  podSelector: {matchLabels: {pod: a}}
  ingress:
  - ports: [{port: 80}, {protocol: UDP, port: 81}, {protocol: SCTP, port: 80}]"""))
    into_a = lambda proto, port: {s for s, d in reach(state, proto, port) if d == "x/a"}  # noqa: E731
    everyone = {f"{n}/{p}" for n, p in PODS} - {"x/a"}
    assert into_a("TCP", 80) == everyone
    assert into_a("TCP", 81) == set()
    assert into_a("UDP", 81) == everyone
    assert into_a("UDP", 80) == set()
    assert into_a("SCTP", 80) == everyone
    assert into_a("ICMP", 0) == set()


def test_end_port_range():
    state = with_policies(policy("p", "x", """  podSelector: {matchLabels: {pod: a}}
  ingress: [{ports: [{port: 3000, endPort: 3500}]}]"""))
    rs = layout.ruleset(compile_state(state).elements)
    a, b = pod_ip("x", "a"), pod_ip("x", "b")
    assert [lookup(rs, b, a, "TCP", p) for p in (2999, 3000, 3250, 3500, 3501)] == [
        False, True, True, True, False]


def test_protocol_without_port_allows_every_port():
    state = with_policies(policy("p", "x", """  podSelector: {matchLabels: {pod: a}}
  ingress: [{ports: [{protocol: UDP}]}]"""))
    rs = layout.ruleset(compile_state(state).elements)
    a, b = pod_ip("x", "a"), pod_ip("x", "b")
    assert lookup(rs, b, a, "UDP", 1) and lookup(rs, b, a, "UDP", 65535)
    assert not lookup(rs, b, a, "TCP", 80)


def test_named_port_ingress_resolved_on_destination_pod():
    base = upstream_model_yaml() + """
---
apiVersion: v1
kind: Pod
metadata: {name: d, namespace: x, labels: {pod: d}}
spec: {containers: [{name: c, ports: [{name: serve-80-tcp, containerPort: 8080}]}]}
status: {phase: Running, podIPs: [{ip: 10.244.1.1}]}"""
    state = with_policies(policy("p", "x", """  podSelector: {}
  ingress: [{ports: [{port: serve-80-tcp}]}]"""), base=base)
    rs = layout.ruleset(compile_state(state).elements)
    b = pod_ip("x", "b")
    assert lookup(rs, b, pod_ip("x", "a"), "TCP", 80)
    assert not lookup(rs, b, pod_ip("x", "a"), "TCP", 8080)
    assert lookup(rs, b, "10.244.1.1", "TCP", 8080)  # d names 8080 serve-80-tcp
    assert not lookup(rs, b, "10.244.1.1", "TCP", 80)


def test_named_port_missing_on_pod_matches_nothing():
    state = with_policies(policy("p", "x", """  podSelector: {matchLabels: {pod: a}}
  ingress: [{ports: [{port: no-such-port}]}]"""))
    assert reach(state) == without(to={"x/a"})


def test_named_port_wrong_protocol_matches_nothing():
    state = with_policies(policy("p", "x", """  podSelector: {matchLabels: {pod: a}}
  ingress: [{ports: [{port: serve-81-tcp, protocol: UDP}]}]"""))
    assert {s for s, d in reach(state, "UDP", 81) if d == "x/a"} == set()


def test_named_port_egress_resolved_per_destination_pod():
    base = upstream_model_yaml() + """
---
apiVersion: v1
kind: Pod
metadata: {name: d, namespace: y, labels: {pod: d}}
spec: {containers: [{name: c, ports: [{name: serve-80-tcp, containerPort: 9090}]}]}
status: {phase: Running, podIPs: [{ip: 10.244.1.1}]}"""
    state = with_policies(policy("p", "x", """  podSelector: {matchLabels: {pod: a}}
  egress:
  - to: [{namespaceSelector: {matchLabels: {ns: y}}}]
    ports: [{port: serve-80-tcp}]
  - to: [{ipBlock: {cidr: 10.244.0.16/28}}]
    ports: [{port: serve-81-tcp}]"""), base=base)
    rs = layout.ruleset(compile_state(state).elements)
    a = pod_ip("x", "a")
    assert lookup(rs, a, pod_ip("y", "b"), "TCP", 80)
    assert not lookup(rs, a, pod_ip("y", "b"), "TCP", 9090)
    assert lookup(rs, a, "10.244.1.1", "TCP", 9090)
    assert not lookup(rs, a, "10.244.1.1", "TCP", 80)
    # ipBlock + named port: only pods inside the block that declare the name (z/a..z/c: .16-.18)
    assert lookup(rs, a, pod_ip("z", "a"), "TCP", 81)
    assert not lookup(rs, a, pod_ip("y", "a"), "TCP", 81)
    assert not lookup(rs, a, "10.244.0.30", "TCP", 81)  # in the block, but no pod there


def test_named_port_egress_without_to_reaches_every_pod_with_that_name():
    state = with_policies(policy("p", "x", """  podSelector: {matchLabels: {pod: a}}
  egress: [{ports: [{port: serve-81-udp, protocol: UDP}]}]"""))
    assert {d for s, d in reach(state, "UDP", 81) if s == "x/a"} == (
        {f"{n}/{p}" for n, p in PODS} - {"x/a"})
    rs = layout.ruleset(compile_state(state).elements)
    assert not lookup(rs, pod_ip("x", "a"), "192.0.2.1", "UDP", 81)


# ------------------------------------------------------------------ ipBlock


def test_ipblock_with_except_and_pod_ips():
    state = with_policies(policy("p", "x", """  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{ipBlock: {cidr: 10.244.0.0/24, except: [10.244.0.12/30, 10.244.0.18/32]}}]"""))
    into_a = {s for s, d in reach(state) if d == "x/a"}
    # .12-.15 and .18 are excluded: x/c (12), y/a..y/c (13-15), z/c (18)
    assert into_a == {"x/b", "z/a", "z/b"}
    rs = layout.ruleset(compile_state(state).elements)
    assert lookup(rs, "10.244.0.200", pod_ip("x", "a"), "TCP", 1)
    assert not lookup(rs, "10.244.1.1", pod_ip("x", "a"), "TCP", 1)


def test_ipblock_ipv6_with_except():
    state = with_policies(policy("p", "x", """  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{ipBlock: {cidr: "fd00::/112", except: ["fd00::10/124"]}}]
    ports: [{port: 80}]"""))
    rs = layout.ruleset(compile_state(state).elements)
    a6 = pod_ip("x", "a", 6)
    assert lookup(rs, pod_ip("x", "b", 6), a6, "TCP", 80)  # fd00::b: in the block
    assert not lookup(rs, pod_ip("z", "a", 6), a6, "TCP", 80)  # fd00::10: in the except
    assert lookup(rs, "fd00::1", a6, "TCP", 80)
    assert not lookup(rs, "fd00::1f", a6, "TCP", 80)
    assert not lookup(rs, "fd00::1:1", a6, "TCP", 80)
    # The IPv4 side of the dual-stack pod is isolated and nothing v4 is allowed.
    assert not lookup(rs, pod_ip("x", "b"), pod_ip("x", "a"), "TCP", 80)


def test_egress_ipblock_to_pod_ip():
    state = with_policies(policy("p", "x", """  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress: [{to: [{ipBlock: {cidr: 10.244.0.16/32}}]}]"""))
    assert {d for s, d in reach(state) if s == "x/a"} == {"z/a"}


# ------------------------------------------------------------------ overlaps and attribution


def _assert_disjoint(rs):
    for name, spec in rs.sets.items():
        if not spec.interval:
            continue
        keys = list(rs.elements.get(name, {}))
        for k1, k2 in itertools.combinations(keys, 2):
            overlap = all(
                (f1 == f2) if isinstance(f1, int) else (f1[0] <= f2[1] and f2[0] <= f1[1])
                for f1, f2 in zip(k1, k2, strict=True))
            assert not overlap, (name, k1, k2)


def test_overlapping_rules_become_disjoint_elements_with_all_refs():
    state = with_policies(
        policy("wide", "x", """  podSelector: {matchLabels: {pod: a}}
  ingress: [{from: [{ipBlock: {cidr: 10.244.0.0/16}}], ports: [{port: 80, endPort: 90}]}]"""),
        policy("narrow", "x", """  podSelector: {matchLabels: {pod: a}}
  ingress: [{from: [{ipBlock: {cidr: 10.244.0.0/20}}], ports: [{port: 85, endPort: 100}]}]"""),
        policy("pods", "x", """  podSelector: {matchLabels: {pod: a}}
  ingress: [{from: [{podSelector: {}}], ports: [{port: 85, endPort: 100}]},
            {from: [{podSelector: {}}], ports: [{port: 95, endPort: 110}]}]"""))
    rs = layout.ruleset(compile_state(state).elements)
    _assert_disjoint(rs)
    comments = set(rs.elements[allow_ranges_set("ingress", 4)].values())
    assert any("x/narrow ingress[0]" in c and "x/wide ingress[0]" in c for c in comments)
    ports = [c for name, items in rs.elements.items() if name.startswith("ingress-from-id")
             for c in items.values()]
    assert "x/pods ingress[0], x/pods ingress[1]" in ports
    assert lookup(rs, pod_ip("x", "b"), pod_ip("x", "a"), "TCP", 95)
    assert lookup(rs, pod_ip("x", "b"), pod_ip("x", "a"), "TCP", 110)
    assert not lookup(rs, "10.244.99.9", pod_ip("x", "a"), "TCP", 95)
    assert lookup(rs, "10.244.99.9", pod_ip("x", "a"), "TCP", 85)
    assert lookup(rs, "10.244.9.9", pod_ip("x", "a"), "TCP", 95)


def test_isolation_comment_names_pod_and_policies():
    state = with_policies(policy("deny", "x", "  podSelector: {}\n  ingress: []"))
    rs = layout.ruleset(compile_state(state).elements)
    comments = rs.elements[isolated_set("ingress", 4)]
    assert sorted(comments.values()) == ["x/a by x/deny", "x/b by x/deny", "x/c by x/deny"]


# ------------------------------------------------------------------ pods that are never targets


def test_host_network_and_finished_pods_are_never_selected_or_isolated():
    base = upstream_model_yaml() + """
---
apiVersion: v1
kind: Pod
metadata: {name: hn, namespace: x, labels: {pod: a}}
spec: {hostNetwork: true}
status: {phase: Running, podIPs: [{ip: 10.0.0.5}]}
---
apiVersion: v1
kind: Pod
metadata: {name: done, namespace: x, labels: {pod: b}}
status: {phase: Succeeded, podIPs: [{ip: 10.244.3.3}]}"""
    state = with_policies(policy("p", "x", """  podSelector: {}
  ingress: [{from: [{podSelector: {matchLabels: {pod: a}}}]}]"""), base=base)
    rs = layout.ruleset(compile_state(state).elements)
    isolated = rs.elements[isolated_set("ingress", 4)]
    assert ((int_ip("10.0.0.5"),) * 1 and all(k[0][0] != int_ip("10.0.0.5") for k in isolated))
    assert all(k[0][0] != int_ip("10.244.3.3") for k in isolated)
    assert not lookup(rs, "10.0.0.5", pod_ip("x", "b"), "TCP", 80)  # hostNetwork is no peer


def int_ip(text: str) -> int:
    import ipaddress

    return int(ipaddress.ip_address(text))


def test_remote_pods_are_peers_but_not_isolated_here():
    base = upstream_model_yaml(nodes=("node-1", "node-2"))
    state = with_policies(policy("deny", "x", "  podSelector: {}\n  ingress: []"),
                          policy("allow", "y", """  podSelector: {}
  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: x}}}]}]"""), base=base)
    compiled = compile_state(state, "node-1")
    local = {r.pod.ref for r in compiled.pods}
    assert local == {"x/a", "x/c", "y/b", "z/a", "z/c"}  # every other pod is on node-1
    rs = layout.ruleset(compiled.elements)
    isolated = {k[0][0] for k in rs.elements[isolated_set("ingress", 4)]}
    assert int_ip(pod_ip("x", "b")) not in isolated  # x/b lives on node-2
    # y/b (local) admits x/b (remote) as a peer.
    assert lookup(rs, pod_ip("x", "b"), pod_ip("y", "b"), "TCP", 80)
    assert not lookup(rs, pod_ip("z", "a"), pod_ip("y", "b"), "TCP", 80)


# ------------------------------------------------------------------ fail closed on bad input


def test_invalid_policy_isolates_its_pods_and_leaves_others_alone():
    result = load_yaml(upstream_model_yaml(),
                       policy("bad", "x", """  podSelector: {matchLabels: {pod: a}}
  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/33}}]}]"""),
                       policy("good", "y", "  podSelector: {}\n  ingress: []"))
    assert len(result.errors) == 1 and "x/bad" in result.errors[0]
    assert "spec.ingress[0].from[0].ipBlock.cidr" in result.errors[0]
    compiled = compile_state(result.state)
    assert compiled.warnings and "x/bad" in compiled.warnings[0]
    got = reach(result.state)
    assert got == without(to={"x/a", "y/a", "y/b", "y/c"}, frm={"x/a"})


# ------------------------------------------------------------------ shared examples


EXAMPLES = ROOT / "examples"


def example_state(*names: str) -> ClusterState:
    result = load_manifests([EXAMPLES / n for n in names])
    assert not result.errors, result.errors
    return result.state


EXAMPLE_CLUSTER = """
apiVersion: v1
kind: Namespace
metadata: {name: app, labels: {application: demo-app}}
---
apiVersion: v1
kind: Namespace
metadata: {name: database}
---
apiVersion: v1
kind: Namespace
metadata: {name: other, labels: {project: myproject}}
""" + "".join(f"""---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {ns}, labels: {labels}}}
status: {{phase: Running, podIPs: [{{ip: {ip}}}]}}
""" for name, ns, labels, ip in [
    ("api", "app", "{component: api}", "10.244.0.2"),
    ("db", "app", "{component: database}", "10.244.0.3"),
    ("web", "default", "{app: web}", "10.244.0.4"),
    ("dbrole", "default", "{role: db}", "10.244.0.5"),
    ("front", "default", "{role: frontend}", "10.244.0.6"),
    ("proj", "other", "{x: y}", "10.244.0.7"),
    ("store", "database", "{}", "10.244.0.8"),
    ("appdb", "app", "{component: database, extra: x}", "10.244.0.9"),
])


def _example(name: str) -> ClusterState:
    result = load_yaml(EXAMPLE_CLUSTER, (EXAMPLES / "policies" / name).read_text())
    assert not result.errors, result.errors
    return result.state


def _agree(state: ClusterState, flows) -> None:
    rs = layout.ruleset(compile_state(state).elements)
    _assert_disjoint(rs)
    for src, dst, proto, port, want in flows:
        assert lookup(rs, src, dst, proto, port) == want, (src, dst, proto, port)
        assert evaluate(state, src, dst, proto, port) == want, (src, dst, proto, port)


def test_example_allow_all():
    _agree(_example("allow-all.yaml"), [
        ("10.244.0.4", "10.244.0.2", "TCP", 80, True), ("10.244.0.2", "8.8.8.8", "UDP", 53, True)])


def test_example_deny_all():
    _agree(_example("deny-all.yaml"), [
        ("10.244.0.4", "10.244.0.2", "TCP", 80, False), ("10.244.0.2", "10.244.0.4", "TCP", 80,
                                                         False),
        ("10.244.0.4", "10.244.0.5", "TCP", 80, True)])


def test_example_deny_ingress_web():
    _agree(_example("deny-ingress-web.yaml"), [
        ("10.244.0.5", "10.244.0.4", "TCP", 80, False), ("10.244.0.4", "10.244.0.5", "TCP", 80,
                                                         True)])


def test_example_cross_namespace_and():
    _agree(_example("cross-namespace-and.yaml"), [
        ("10.244.0.3", "10.244.0.8", "TCP", 5432, True),   # app/db: component=database in app
        ("10.244.0.9", "10.244.0.8", "UDP", 1, True),
        ("10.244.0.2", "10.244.0.8", "TCP", 5432, False),  # api is not component=database
        ("10.244.0.5", "10.244.0.8", "TCP", 5432, False)])  # right label? no, wrong namespace


def test_example_database_api():
    _agree(_example("database-api.yaml"), [
        ("10.244.0.2", "10.244.0.3", "TCP", 5432, True), ("10.244.0.3", "10.244.0.2", "TCP", 80,
                                                          True),
        ("10.244.0.4", "10.244.0.3", "TCP", 5432, False), ("10.244.0.3", "8.8.8.8", "UDP", 53,
                                                           False),
        ("10.244.0.4", "10.244.0.2", "TCP", 80, True)])


def test_example_full():
    _agree(_example("full-example.yaml"), [
        ("172.17.0.9", "10.244.0.5", "TCP", 80, True), ("172.17.1.9", "10.244.0.5", "TCP", 80,
                                                        False),
        ("10.244.0.7", "10.244.0.5", "TCP", 80, True), ("10.244.0.6", "10.244.0.5", "TCP", 80,
                                                        True),
        ("10.244.0.4", "10.244.0.5", "TCP", 80, False), ("10.244.0.6", "10.244.0.5", "TCP", 81,
                                                         False),
        ("10.244.0.5", "10.0.0.7", "TCP", 5978, True), ("10.244.0.5", "10.0.0.7", "TCP", 80,
                                                        False),
        ("10.244.0.5", "10.0.1.7", "TCP", 5978, False)])


def test_example_ipblock_except():
    _agree(_example("ipblock-except.yaml"), [
        ("172.17.0.1", "10.244.0.2", "TCP", 80, True), ("172.17.2.1", "10.244.0.2", "UDP", 9,
                                                        False),
        ("172.17.4.1", "10.244.0.2", "ICMP", 0, True), ("10.244.0.4", "10.244.0.2", "TCP", 80,
                                                        False)])


def test_example_port_443_same_ns():
    _agree(_example("port-443-same-ns.yaml"), [
        ("10.244.0.3", "10.244.0.2", "TCP", 443, True), ("10.244.0.3", "10.244.0.2", "TCP", 80,
                                                         False),
        ("10.244.0.4", "10.244.0.2", "TCP", 443, False)])


def test_example_port_range():
    _agree(_example("port-range.yaml"), [
        ("10.244.0.3", "10.244.0.2", "TCP", 3000, True), ("10.244.0.3", "10.244.0.2", "TCP", 3500,
                                                          True),
        ("10.244.0.3", "10.244.0.2", "TCP", 3501, False), ("10.244.0.3", "10.244.0.2", "UDP",
                                                           3000, False)])


def test_aks_demo_example_policies():
    base = (EXAMPLES / "aks-demo" / "00-cluster.yaml").read_text()
    ips = {"dbpod": "10.244.0.20", "apipod": "10.244.0.21", "apppod": "10.244.0.22"}
    for name, ip in ips.items():  # give the pods their IPs, as the runtime would
        base = base.replace(f"metadata: {{name: {name},",
                            f"status: {{phase: Running, podIPs: [{{ip: {ip}}}]}}\n"
                            f"metadata: {{name: {name},")
    policies = [(EXAMPLES / "aks-demo" / f).read_text() for f in
                ("01-dbpod-policy.yaml", "02-apipod-policy.yaml", "03-apppod-policy.yaml")]
    result = load_yaml(base, *policies)
    assert not result.errors, result.errors
    db, api, app = ips["dbpod"], ips["apipod"], ips["apppod"]
    _agree(result.state, [
        (api, db, "TCP", 80, True), (app, db, "TCP", 80, False), (db, api, "TCP", 80, False),
        (app, api, "TCP", 80, False),  # apppod may send to apipod, apipod admits only 10.0/16
        ("10.0.3.4", api, "TCP", 80, True), ("10.0.3.4", db, "TCP", 80, False),
        (api, app, "TCP", 80, False)])


def test_all_shared_example_files_parse():
    for path in sorted(Path(EXAMPLES).rglob("*.yaml")):
        result = load_manifests([path])
        assert not result.errors, (path, result.errors)


# ------------------------------------------------------------------ np-cni endpoints


def test_endpoints_give_local_pods_their_ips_and_unknown_pods_stay_denied():
    from np_cni.shared.endpoints import Endpoint

    base = upstream_model_yaml() + """
---
apiVersion: v1
kind: Pod
metadata: {name: new, namespace: x, labels: {pod: a}, uid: u-new}
spec: {nodeName: node-1}"""
    state = with_policies(policy("deny", "x", "  podSelector: {matchLabels: {pod: a}}\n"
                                              "  ingress: []"), base=base)
    eps = [Endpoint("c1", "eth0", "x", "new", "u-new", "np0123456789a", ("10.244.9.1",)),
           Endpoint("c2", "eth0", "x", "gone", "u-gone", "np0123456789b", ("10.244.9.2",)),
           Endpoint("c3", "eth0", "x", "new", "u-old", "np0123456789c", ("10.244.9.3",))]
    compiled = compile_state(state, "node-2", eps)  # no upstream pod is on node-2
    rs = layout.ruleset(compiled.elements)
    assert [r.pod.ref for r in compiled.pods] == ["x/new"]
    assert compiled.pods[0].pod.ips == (ipaddress.ip_address("10.244.9.1"),)
    assert not lookup(rs, pod_ip("x", "b"), "10.244.9.1", "TCP", 80)  # isolated by x/deny
    for ghost in ("10.244.9.2", "10.244.9.3"):  # unknown pod, and a stale sandbox (old uid)
        assert not lookup(rs, pod_ip("x", "b"), ghost, "TCP", 80)
        assert not lookup(rs, ghost, pod_ip("x", "b"), "TCP", 80)
    assert any("x/gone" in w for w in compiled.warnings)
    ifaces = rs.elements[pod_ifaces_set(4)]
    assert ifaces[("np0123456789a", (int_ip("10.244.9.1"),) * 2)] == "x/new"
    assert len(ifaces) == 3
