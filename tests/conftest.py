"""Shared fixtures: small clusters written the way users write manifests."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # oracle.py, helpers

from np_agent.policy.manifests import LoadResult, add_object  # noqa: E402
from np_agent.policy.model import ClusterState  # noqa: E402


def eventually(fn: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01,
               message: str | Callable[[], str] = "") -> Any:
    """Poll ``fn`` until it returns something truthy; fail with ``message`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            pytest.fail(f"not true within {timeout} s: {text or fn}")
        time.sleep(interval)


def load_yaml(*texts: str, base: ClusterState | None = None) -> LoadResult:
    """Parse YAML documents into a LoadResult (errors kept, like `np-agent --manifests`)."""
    result = LoadResult()
    if base is not None:
        for group in (base.namespaces, base.pods, base.policies):
            for obj in group.values():
                result.state.add(obj)
    for text in texts:
        for i, doc in enumerate(yaml.safe_load_all(text)):
            if doc is not None:
                add_object(result, doc, f"doc[{i}]")
    return result


def upstream_model_yaml(nodes: tuple[str, ...] = ("node-1",)) -> str:
    """The upstream e2e model: namespaces x, y, z; pods a, b, c; ports 80/81 TCP/UDP/SCTP."""
    docs = []
    for n, ns in enumerate("xyz"):
        docs.append(f"""
apiVersion: v1
kind: Namespace
metadata: {{name: {ns}, labels: {{ns: {ns}}}}}""")
        for i, pod in enumerate("abc"):
            host = 10 + 3 * n + i
            node = nodes[(3 * n + i) % len(nodes)]
            docs.append(f"""
apiVersion: v1
kind: Pod
metadata: {{name: {pod}, namespace: {ns}, labels: {{pod: {pod}}}}}
spec:
  nodeName: {node}
  containers:
  - name: c
    ports:
    - {{name: serve-80-tcp, containerPort: 80, protocol: TCP}}
    - {{name: serve-81-tcp, containerPort: 81, protocol: TCP}}
    - {{name: serve-80-udp, containerPort: 80, protocol: UDP}}
    - {{name: serve-81-udp, containerPort: 81, protocol: UDP}}
    - {{name: serve-80-sctp, containerPort: 80, protocol: SCTP}}
status:
  phase: Running
  podIPs: [{{ip: 10.244.0.{host}}}, {{ip: "fd00::{host:x}"}}]""")
    return "\n---".join(docs)


def pod_ip(ns: str, pod: str, version: int = 4) -> str:
    host = 10 + 3 * "xyz".index(ns) + "abc".index(pod)
    return f"10.244.0.{host}" if version == 4 else f"fd00::{host:x}"


@pytest.fixture
def upstream() -> ClusterState:
    result = load_yaml(upstream_model_yaml())
    assert not result.errors
    return result.state
