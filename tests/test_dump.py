"""`np-agent dump-rules --manifests`: what a user reads before anything is enforced.

Users' own manifests carry no status, so their pods have no IP: they are still listed, with
the policies that select them and each rule in words, and a note that their kernel elements
appear once they have an IP. Pods with IPs get the same lines above the table.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def dump(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "np_agent.cli", "dump-rules", *args],
                          capture_output=True, text=True, check=True)
    return proc.stdout


def test_demo_pods_without_ips_are_listed_with_what_they_allow():
    text = dump("--manifests", str(ROOT / "examples" / "aks-demo"))
    assert text.startswith("# np-nft: 3 pod(s) on this node (3 without an IP yet), 3 isolated")
    assert ("# pod backend/dbpod (no IP yet): ingress isolated by backend/dbpod-policy; "
            "egress isolated by backend/dbpod-policy") in text
    assert ("#   backend/dbpod-policy ingress[0]: from pods {run=apipod} in namespaces "
            "{kubernetes.io/metadata.name=frontend} on TCP 80") in text
    assert "#   backend/dbpod-policy egress: no rule: nothing allowed" in text
    assert "#   frontend/apipod-policy ingress[0]: from 10.0.0.0/16 on TCP 80" in text
    assert ("#   frontend/apppod-policy egress[0]: to pods {run=apipod} of this namespace on "
            "every port and protocol") in text
    assert text.count("(its kernel elements appear once it has an IP)") == 3


def test_words_for_ipblocks_named_ports_ranges_and_everyone(tmp_path: Path):
    (tmp_path / "all.yaml").write_text("""apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {app: a}}
spec: {containers: [{name: c, ports: [{name: http, containerPort: 80}]}]}
status: {phase: Running, podIPs: [{ip: 10.244.0.10}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: x}
spec:
  podSelector: {}
  ingress:
  - from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}, {namespaceSelector: {}}]
    ports: [{port: http}, {protocol: UDP, port: 5000, endPort: 5010}, {protocol: SCTP}]
  - {}
""")
    text = dump("--manifests", str(tmp_path))
    assert "# pod x/a (10.244.0.10): ingress isolated by x/p; egress open" in text
    assert ("#   x/p ingress[0]: from 10.0.0.0/8 except 10.1.0.0/16, every pod of every "
            "namespace on TCP port named http, UDP 5000-5010, SCTP (every port)") in text
    assert "#   x/p ingress[1]: from anywhere on every port and protocol" in text
    assert "its kernel elements" not in text
    pods = json.loads(dump("--manifests", str(tmp_path), "--json"))["pods"]
    assert pods[0]["allows"][1] == "x/p ingress[1]: from anywhere on every port and protocol"
