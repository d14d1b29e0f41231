"""Tests of the netns lab itself (needs root: creates network namespaces).

Every other dataplane test trusts the lab's answer to "can A reach B?", so
this checks that the wiring really routes pod traffic through the node netns,
that probes tell open from closed ports, and that nothing is left behind.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from np_lab import Lab, LabError, LabPod

pytestmark = pytest.mark.kernel

A4, A6 = "10.244.0.10", "fd00::10"
B4, B6 = "10.244.0.11", "fd00::11"


def _require_root() -> None:
    # Deliberately a failure, not a skip: a skipped lab test would let the
    # whole dataplane suite "pass" without exercising anything.
    if os.geteuid() != 0:
        pytest.fail("tests/test_lab.py must run as root (network namespaces)")


def _netns_names() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _lab_leftovers(prefix: str) -> list[str]:
    return [name for name in _netns_names() if name.startswith(prefix)]


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    _require_root()
    with Lab() as lab:
        lab.add_pod("a", A4, A6)
        b = lab.add_pod("b", B4, B6)
        lab.serve(b, "tcp", 80)
        lab.serve(b, "udp", 53)
        yield lab
    assert _lab_leftovers(lab.prefix) == []


@pytest.fixture
def a(lab: Lab) -> LabPod:
    return lab.pod("a")


@pytest.fixture
def b(lab: Lab) -> LabPod:
    return lab.pod("b")


def test_topology(lab: Lab, a: LabPod, b: LabPod) -> None:
    assert lab.node_ns == f"{lab.prefix}node"
    assert a.netns.startswith(lab.prefix) and b.netns.startswith(lab.prefix)
    assert len(a.host_if) <= 15 and a.host_if != b.host_if
    assert {lab.node_ns, a.netns, b.netns} <= set(_netns_names())
    routes = lab.run(lab.node_ns, ["ip", "route", "show", B4]).stdout
    assert f"dev {b.host_if}" in routes


@pytest.mark.parametrize("dst", [B4, B6], ids=["v4", "v6"])
@pytest.mark.parametrize("proto,port", [("tcp", 80), ("udp", 53)])
def test_pod_to_pod(lab: Lab, a: LabPod, dst: str, proto: str, port: int) -> None:
    result = lab.probe_detail(a, dst, proto, port)
    assert result["ok"], result


@pytest.mark.parametrize("dst", [B4, B6], ids=["v4", "v6"])
def test_node_to_pod(lab: Lab, dst: str) -> None:
    assert lab.probe("node", dst, "tcp", 80)
    assert lab.probe("node", dst, "udp", 53)


@pytest.mark.parametrize("dst", [B4, B6], ids=["v4", "v6"])
def test_closed_ports_unreachable(lab: Lab, a: LabPod, dst: str) -> None:
    assert not lab.probe(a, dst, "tcp", 81)
    assert not lab.probe(a, dst, "udp", 54)


def test_probe_many_keeps_order(lab: Lab, a: LabPod) -> None:
    probes = [
        (B4, "tcp", 80), (B4, "tcp", 81), (B6, "udp", 53),
        (B6, "udp", 54), (B6, "tcp", 80), ("10.244.0.99", "tcp", 80),
    ]  # fmt: skip
    assert lab.probe_many(a, probes, timeout=0.3) == [
        True, False, True, False, True, False,
    ]  # fmt: skip


def test_traffic_is_routed_through_node(lab: Lab, a: LabPod) -> None:
    """A drop in the node's forward hook must cut pod-to-pod traffic.

    This is the property the dataplane relies on; also proves that held
    connections notice a cut.
    """
    table = "inet npl_lab_test"
    assert lab.connect_hold(a, B4, 80, "h1")
    assert lab.hold_send(a, "h1")
    rules = (
        f"table {table} {{\n chain drop_b {{\n"
        "  type filter hook forward priority 0;\n"
        f"  ip daddr {B4} drop\n  ip6 daddr {B6} drop\n }}\n}}\n"
    )
    lab.run(lab.node_ns, ["nft", "-f", "-"], input=rules)
    try:
        assert not lab.probe(a, B4, "tcp", 80, timeout=0.3)
        assert not lab.probe(a, B6, "udp", 53, timeout=0.3)
        assert not lab.hold_send(a, "h1", timeout=0.3)
    finally:
        lab.run(lab.node_ns, ["nft", "delete", "table", *table.split()])
        lab.hold_close(a, "h1")
    assert lab.probe(a, B4, "tcp", 80)


def test_spoofed_source_reaches_server(lab: Lab, a: LabPod, b: LabPod) -> None:
    """Spoofed probes get no reply, but the server records what arrived."""
    lab.seen(b, clear=True)
    assert not lab.probe(a, B4, "udp", 53, timeout=0.3, source_ip="10.244.0.99")
    assert lab.probe(a, B6, "udp", 53, source_ip=A6)
    peers = {entry["peer"] for entry in lab.seen(b, clear=True)}
    assert {"10.244.0.99", A6} <= peers


def test_run_reports_stderr(lab: Lab, a: LabPod) -> None:
    with pytest.raises(LabError, match="boom"):
        lab.run(a.netns, ["sh", "-c", "echo boom >&2; exit 3"])
    assert lab.run(a.netns, ["true"], check=False).returncode == 0


def test_invalid_pods_rejected(lab: Lab) -> None:
    with pytest.raises(LabError):
        lab.add_pod("dup", B4)  # address already used
    with pytest.raises(LabError):
        lab.add_pod("Bad_Name", "10.244.0.50")
    with pytest.raises(LabError):
        lab.add_pod("c", "fd00::50")  # v6 given as ipv4


def test_close_removes_everything() -> None:
    _require_root()
    lab = Lab()
    pod = lab.add_pod("x", "10.244.1.10", "fd00:1::10")
    pids = [lab.start_daemon(pod), lab.start_daemon("node")]
    assert lab.probe("node", pod.ipv4, "tcp", 9) is False
    assert lab.workdir.exists() and len(_lab_leftovers(lab.prefix)) == 2
    lab.close()
    lab.close()  # idempotent
    assert _lab_leftovers(lab.prefix) == []
    assert not lab.workdir.exists()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(LabError):
        lab.add_pod("y", "10.244.1.11")
