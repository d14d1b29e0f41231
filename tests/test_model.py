"""Parsing API objects: what is kept, defaults, and clear errors that name object and field."""

from __future__ import annotations

import gc
import ipaddress

import pytest

from conftest import load_yaml
from np_agent.policy.manifests import load_manifests
from np_agent.policy.model import (
    EGRESS,
    INGRESS,
    ContainerPort,
    ModelError,
    PolicyPort,
    parse_network_policy,
    parse_pod,
)

POD = """
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}, annotations: {big: blob}}
spec:
  nodeName: node-1
  containers:
  - name: c
    image: nginx
    ports:
    - {name: http, containerPort: 80}
    - {containerPort: 9000}
    - {name: dns, containerPort: 53, protocol: UDP}
status:
  phase: Running
  podIP: 10.1.0.5
  podIPs: [{ip: 10.1.0.5}, {ip: "fd00::5"}]
"""


def test_pod_keeps_what_enforcement_needs():
    pod = load_yaml(POD).state.pods["shop/web"]
    assert pod.labels == {"app": "web"}
    assert pod.ips == (ipaddress.ip_address("10.1.0.5"), ipaddress.ip_address("fd00::5"))
    assert pod.node_name == "node-1" and pod.phase == "Running" and not pod.host_network
    assert pod.ports == (ContainerPort("http", 80, "TCP"), ContainerPort("dns", 53, "UDP"))
    assert pod.named_port("http", "TCP") == 80 and pod.named_port("http", "UDP") is None


def test_pod_falls_back_to_pod_ip_and_defaults_namespace():
    pod = parse_pod({"kind": "Pod", "metadata": {"name": "p"}, "status": {"podIP": "10.0.0.1"}})
    assert pod.namespace == "default" and pod.ips == (ipaddress.ip_address("10.0.0.1"),)
    assert pod.phase == "Pending"


def test_namespace_gets_metadata_name_label():
    ns = load_yaml("kind: Namespace\nmetadata: {name: a, labels: {x: y}}").state.namespaces["a"]
    assert ns.labels == {"x": "y", "kubernetes.io/metadata.name": "a"}


def _np(spec: dict) -> dict:
    return {"kind": "NetworkPolicy", "metadata": {"name": "p", "namespace": "n"}, "spec": spec}


def test_policy_types_defaulting():
    assert parse_network_policy(_np({"podSelector": {}})).policy_types == {INGRESS}
    assert parse_network_policy(_np({"podSelector": {}, "egress": [{}]})).policy_types == {
        INGRESS, EGRESS}
    assert parse_network_policy(_np({"podSelector": {}, "egress": []})).policy_types == {INGRESS}
    assert parse_network_policy(_np({"podSelector": {}, "policyTypes": ["Egress"]})
                                ).policy_types == {EGRESS}


def test_ports_forms():
    pol = parse_network_policy(_np({"podSelector": {}, "ingress": [{"ports": [
        {"port": 80}, {"port": "http"}, {"port": "8080"}, {"protocol": "UDP"},
        {"protocol": "SCTP", "port": 1000, "endPort": 2000}]}]}))
    assert pol.ingress[0].ports == (PolicyPort("TCP", 80), PolicyPort("TCP", "http"),
                                    PolicyPort("TCP", 8080), PolicyPort("UDP"),
                                    PolicyPort("SCTP", 1000, 2000))


@pytest.mark.parametrize("spec,path,words", [
    ({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}]},
     "spec.ingress[0].from[0].ipBlock.cidr", "10.0.0.0/33"),
    ({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.1"}}]}]},
     "spec.ingress[0].from[0].ipBlock.cidr", "not a CIDR"),
    ({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8",
                                                            "except": ["11.0.0.0/16"]}}]}]},
     "spec.ingress[0].from[0].ipBlock.except[0]", "not inside"),
    ({"podSelector": {}, "egress": [{"ports": [{"protocol": "ICMP", "port": 1}]}]},
     "spec.egress[0].ports[0].protocol", "unknown protocol"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": 70000}]}]},
     "spec.ingress[0].ports[0].port", "out of range"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": 0}]}]},
     "spec.ingress[0].ports[0].port", "out of range"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": 90, "endPort": 80}]}]},
     "spec.ingress[0].ports[0].endPort", "below"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": "http", "endPort": 80}]}]},
     "spec.ingress[0].ports[0].endPort", "named port"),
    ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Equals",
                                            "values": ["b"]}]}},
     "spec.podSelector.matchExpressions[0].operator", "unknown operator 'Equals'"),
    ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}},
     "spec.podSelector.matchExpressions[0].values", "at least one"),
    ({"podSelector": {}, "ingress": [{"from": [{}]}]},
     "spec.ingress[0].from[0]", "needs podSelector"),
    ({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "1.0.0.0/8"},
                                                "podSelector": {}}]}]},
     "spec.ingress[0].from[0]", "cannot be combined"),
    ({"podSelector": {}, "policyTypes": ["Sideways"]}, "spec.policyTypes[0]", "unknown"),
    ({"podSelector": {}, "ingress": {"from": []}}, "spec.ingress", "expected a list"),
])
def test_invalid_policy_errors_name_object_and_field(spec, path, words):
    with pytest.raises(ModelError) as e:
        parse_network_policy(_np(spec))
    assert e.value.ref == "n/p" and e.value.path == path
    assert words in str(e.value) and str(e.value).startswith("NetworkPolicy n/p: " + path)


def test_invalid_pod_fields():
    with pytest.raises(ModelError, match=r"Pod default/p: status.podIPs\[0\].ip"):
        parse_pod({"metadata": {"name": "p"}, "status": {"podIPs": [{"ip": "300.1.1.1"}]}})
    with pytest.raises(ModelError, match="containerPort"):
        parse_pod({"metadata": {"name": "p"}, "spec": {"containers": [{"ports": [
            {"containerPort": 99999}]}]}})


def test_one_bad_object_does_not_affect_others(tmp_path):
    (tmp_path / "a.yaml").write_text(POD + "---\nkind: Pod\nmetadata: {name: broken}\n"
                                     "status: {podIPs: [{ip: nope}]}\n---\n"
                                     "kind: Deployment\nmetadata: {name: d}\n")
    (tmp_path / "b.yaml").write_text("key: [unclosed\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.json").write_text(
        '{"kind": "List", "items": [{"kind": "Namespace", "metadata": {"name": "shop"}}]}')
    result = load_manifests([tmp_path])
    assert set(result.state.pods) == {"shop/web"}
    assert set(result.state.namespaces) == {"shop"}
    assert len(result.errors) == 2
    assert any("default/broken" in e and "status.podIPs[0].ip" in e for e in result.errors)
    assert any("b.yaml" in e and "cannot parse" in e for e in result.errors)
    assert result.ignored and "Deployment" in result.ignored[0]


def test_missing_manifest_path_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_manifests([tmp_path / "nope"])


def test_replicas_share_one_label_map():
    """Pods with the same labels hold one shared, read-only map (memory at 150,000 pods)."""
    def pod(name: str, labels: dict[str, str]) -> dict:
        return {"kind": "Pod", "metadata": {"name": name, "namespace": "x", "labels": labels},
                "spec": {"containers": []}}

    a = parse_pod(pod("a", {"app": "web", "pod-template-hash": "5d8f"}))
    b = parse_pod(pod("b", {"pod-template-hash": "5d8f", "app": "web"}))
    c = parse_pod(pod("c", {"app": "db"}))
    assert a.labels == b.labels == {"app": "web", "pod-template-hash": "5d8f"}
    assert a.labels == dict(b.labels) and a.labels != c.labels
    assert gc.get_referents(a.labels)[0] is gc.get_referents(b.labels)[0]
    with pytest.raises(TypeError):
        a.labels["app"] = "x"  # type: ignore[index]
