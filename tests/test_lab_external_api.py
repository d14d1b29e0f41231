"""The lab on an API server given by a kubeconfig (`scripts/lab up --kubeconfig`).

A FakeApiServer on this process's loopback stands in for a real API server: the lab's nodes
cannot reach it directly (their namespaces have no route out), so this proves the relay, the
agents' rewritten kubeconfig and the client-side object API, with real packets at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import eventually
from np_lab.cluster import ClusterLab
from np_lab.fakeapi import FakeApiServer

pytestmark = pytest.mark.kernel


def test_cluster_lab_on_an_api_server_given_by_kubeconfig(tmp_path):
    if os.geteuid() != 0:
        pytest.fail("needs root: builds network namespaces")
    with FakeApiServer() as api:
        kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
        with ClusterLab(2, kubeconfig=kubeconfig) as c:
            prefix = c.lab.prefix
            assert sorted(n["metadata"]["name"] for n in api.list_objects("nodes")) == [
                f"{prefix}node-1", f"{prefix}node-2"]
            c.namespace("x", {"ns": "x"})
            a = c.add_pod("x", "a", c.nodes[0].name, {"pod": "a"})
            b = c.add_pod("x", "b", c.nodes[1].name, {"pod": "b"})
            assert api.get("pods", "x", "a")["status"]["podIPs"][0]["ip"] == a.ipv4
            c.lab.serve(a.target, "tcp", 80)
            assert c.lab.probe(b.target, a.ipv4, "tcp", 80)  # routed across the lab's nodes
            c.api.create("networkpolicies", {
                "metadata": {"name": "deny", "namespace": "x"},
                "spec": {"podSelector": {"matchLabels": {"pod": "a"}},
                         "policyTypes": ["Ingress"]}})
            eventually(lambda: not c.lab.probe(b.target, a.ipv4, "tcp", 80, timeout=0.3),
                       timeout=5, message="the policy was never enforced")
            c.api.delete("networkpolicies", "x", "deny")
            eventually(lambda: c.lab.probe(b.target, a.ipv4, "tcp", 80), timeout=5)
        assert api.list_objects("nodes") == []  # the lab took its nodes and pods back
        assert api.list_objects("pods") == []


def test_lab_cli_up_with_kubeconfig(tmp_path):
    """`scripts/lab up --kubeconfig`: the whole upstream model on that server, enforced."""
    root = Path(__file__).resolve().parent.parent
    base = [sys.executable, str(root / "scripts" / "lab"), "--state-dir", str(tmp_path / "s")]
    prefix = f"npkc{os.getpid() % 10000}-"
    policy = tmp_path / "deny.yaml"
    policy.write_text("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n"
                      "metadata: {name: deny, namespace: x}\n"
                      "spec: {podSelector: {}, policyTypes: [Ingress]}\n")

    def run(*args: str) -> str:
        proc = subprocess.run([*base, *args], capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    with FakeApiServer() as api:
        kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
        try:
            assert api.url in run("up", "--prefix", prefix, "--kubeconfig", kubeconfig)
            assert len(api.list_objects("pods")) == 9  # the model lives on that server
            run("apply", str(policy))
            assert api.get("networkpolicies", "x", "deny") is not None
            assert "48 reachable, 24 denied, as expected" in run("matrix")
        finally:
            run("down")
        assert api.list_objects("nodes") == [] and api.list_objects("pods") == []
