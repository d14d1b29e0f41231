"""Two nodes, one API server, `np-agent run --kubeconfig` on each: policies made through the
API are enforced on real cross-node packets, and stay enforced through what goes wrong in a
cluster (agent killed and restarted, API server gone and back with its history compacted).

ClusterLab: node netns joined by a switch netns, the fake API server in node-1's netns at
10.0.0.1, pods wired by np-cni with the conflist the agent wrote from its Node's podCIDRs.

    node-1: x/a  y/d          node-2: x/b  y/c         every pod serves TCP 80, 81 and UDP 80
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from conftest import eventually as _eventually
from np_lab.cluster import ClusterLab, ClusterPod

pytestmark = pytest.mark.kernel

PODS = {  # ref: (node, labels)
    "x/a": ("node-1", {"pod": "a"}),
    "y/d": ("node-1", {"pod": "d"}),
    "x/b": ("node-2", {"pod": "b"}),
    "y/c": ("node-2", {"pod": "c"}),
}
NAMESPACES = {"x": {"ns": "x"}, "y": {"ns": "y"}}
SERVED = (("tcp", 80), ("tcp", 81), ("udp", 80))
PROBE_TIMEOUT = 0.25
FAST_TIMEOUT = 0.05  # latency measurements: an allowed flow answers in about a millisecond
BOUND = 3.0  # seconds for a change to be enforced when no tighter bound is asked for

def eventually(fn: Callable[[], Any], timeout: float = BOUND, interval: float = 0.02,
               message: str | Callable[[], str] = "") -> Any:
    return _eventually(fn, timeout, interval, message)


# A flow: (src ref, dst ref, proto, port, IP version)
Flow = tuple[str, str, str, int, int]




@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterLab]:
    if os.geteuid() != 0:
        pytest.fail("kernel tests need root: they build network namespaces")
    with ClusterLab(2) as c:
        for name, labels in NAMESPACES.items():
            c.namespace(name, labels)
        for ref, (node, labels) in PODS.items():
            ns, name = ref.split("/")
            pod = c.add_pod(ns, name, node, dict(labels))
            for proto, port in SERVED:
                c.lab.serve(pod.target, proto, port)
        yield c
        prefix = c.lab.prefix
    leftovers = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert prefix not in leftovers


@pytest.fixture
def clean(cluster: ClusterLab) -> Iterator[ClusterLab]:
    """Each test starts from: no policies, original labels, every agent running and ready;
    its policies and labels are undone at the end, also on failure."""
    restore(cluster)
    try:
        yield cluster
    finally:
        restore(cluster)


def restore(c: ClusterLab) -> None:
    for np in c.api.list_objects("networkpolicies"):
        c.api.delete("networkpolicies", np["metadata"]["namespace"], np["metadata"]["name"])
    for name, labels in NAMESPACES.items():
        if (c.api.get("namespaces", "", name) or {}).get("metadata", {}).get("labels") != {
                "kubernetes.io/metadata.name": name, **labels}:
            c.namespace(name, labels)
    for ref, (_, labels) in PODS.items():
        ns, name = ref.split("/")
        if (c.api.get("pods", ns, name) or {}).get("metadata", {}).get("labels") != labels:
            c.label_pod(ref, dict(labels))
    for node in c.nodes:
        if node.agent is None or node.agent.poll() is not None:
            c.start_agent(node)
            c.wait_ready(node)
    # Everything open again (the previous test may have left rules being removed).
    wait_matrix(c, {f: True for f in ALL_TCP80}, timeout=10)


def pod(c: ClusterLab, ref: str) -> ClusterPod:
    return c.pods[ref]


def probe(c: ClusterLab, flows: list[Flow], timeout: float = PROBE_TIMEOUT) -> dict[Flow, bool]:
    """Probe every flow with real packets; sources in parallel, each source's flows at once."""
    by_src: dict[str, list[Flow]] = {}
    for f in flows:
        by_src.setdefault(f[0], []).append(f)

    def run(src: str) -> list[tuple[Flow, bool]]:
        fl = by_src[src]
        specs = [(getattr(pod(c, dst), "ipv4" if v == 4 else "ipv6"), proto, port)
                 for _, dst, proto, port, v in fl]
        return list(zip(fl, c.lab.probe_many(pod(c, src).target, specs, timeout), strict=True))

    with ThreadPoolExecutor(max_workers=len(by_src)) as pool:
        return {f: ok for part in pool.map(run, list(by_src)) for f, ok in part}


def wait_matrix(c: ClusterLab, expected: dict[Flow, bool], timeout: float = BOUND,
                since: float | None = None, probe_timeout: float = PROBE_TIMEOUT) -> float:
    """Poll until every flow behaves as expected; return when the probes that first showed
    the whole expected matrix were sent, in seconds after ``since`` (default: the call)."""
    t0 = time.monotonic() if since is None else since
    last: dict[Flow, bool] = {}
    while True:
        sent = time.monotonic()
        last = probe(c, list(expected), probe_timeout)
        if last == expected:
            return sent - t0
        if time.monotonic() - t0 > timeout:
            wrong = {f: ok for f, ok in last.items() if ok != expected[f]}
            logs = "\n".join(f"--- {n.name}\n" + c.agent_log(n)[-1500:] for n in c.nodes)
            pytest.fail(f"flows not as expected after {timeout} s (flow: seen): {wrong}\n{logs}")


def measure(c: ClusterLab, expected: dict[Flow, bool], since: float,
            timeout: float = BOUND) -> float:
    """wait_matrix with short probes (fine-grained latency), then confirmed with the normal
    probe timeout (a slow answer must not pass for a denied flow)."""
    took = wait_matrix(c, expected, timeout, since, probe_timeout=FAST_TIMEOUT)
    assert probe(c, list(expected)) == expected
    return took


def flows(src: str, dst: str, *specs: tuple[str, int], versions: tuple[int, ...] = (4, 6)
          ) -> list[Flow]:
    return [(src, dst, proto, port, v) for proto, port in specs for v in versions]


ALL_TCP80 = [(s, d, "tcp", 80, 4) for s in PODS for d in PODS if s != d]


def policy(ns: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


# x/a: ingress only from x/b on TCP 80
A_FROM_B_80 = policy("x", "a-from-b", {
    "podSelector": {"matchLabels": {"pod": "a"}},
    "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}],
                 "ports": [{"protocol": "TCP", "port": 80}]}]})
# y/c: egress only to pods labelled pod=b in namespaces labelled ns=x, TCP 80
C_TO_XB_80 = policy("y", "c-to-xb", {
    "podSelector": {"matchLabels": {"pod": "c"}}, "policyTypes": ["Egress"],
    "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"ns": "x"}},
                        "podSelector": {"matchLabels": {"pod": "b"}}}],
                "ports": [{"protocol": "TCP", "port": 80}]}]})


# ----------------------------------------------------------------------------- routing


def test_cross_node_pod_traffic_is_routed(clean: ClusterLab) -> None:
    c = clean
    cross = (flows("x/b", "x/a", ("tcp", 80), ("udp", 80)) + flows("x/a", "x/b", ("tcp", 81))
             + flows("y/d", "y/c", ("tcp", 80), ("udp", 80)) + flows("y/c", "y/d", ("tcp", 81)))
    assert probe(c, cross) == {f: True for f in cross}
    for node in c.nodes:
        other = next(n for n in c.nodes if n is not node)
        v4 = c.lab.run(node.netns, ["ip", "-4", "route"]).stdout
        v6 = c.lab.run(node.netns, ["ip", "-6", "route"]).stdout
        assert re.search(rf"^{re.escape(other.pod_cidrs[0])} via {other.address} dev eth1 "
                         r"proto 201\b", v4, re.M), v4
        assert re.search(rf"^{re.escape(other.pod_cidrs[1])} via fd00:0:0:ffff::{other.index} "
                         r"dev eth1 proto 201\b", v6, re.M), v6
        # its own pods: one /32 and /128 per pod through the pod's veth, not via the switch
        for p in (p for p in c.pods.values() if p.node == node.name):
            assert re.search(rf"^{re.escape(p.ipv4)} dev np\w+ ", v4, re.M), v4
            assert re.search(rf"^{re.escape(p.ipv6)} dev np\w+ ", v6, re.M), v6


# ----------------------------------------------------------------------------- policies


def test_policy_from_api_is_enforced_across_nodes_within_a_second(clean: ClusterLab) -> None:
    c = clean
    expected: dict[Flow, bool] = {}
    # node-1 enforces x/a's ingress (peers on node-2 and node-1)
    for f in flows("x/b", "x/a", ("tcp", 80)):
        expected[f] = True
    for f in flows("x/b", "x/a", ("tcp", 81), ("udp", 80)) + flows("y/c", "x/a", ("tcp", 80)):
        expected[f] = False
    expected[("y/d", "x/a", "tcp", 80, 4)] = False  # same node, other namespace
    # node-2 enforces y/c's egress (to node-1 and to node-2)
    expected.update({f: False for f in flows("y/c", "y/d", ("tcp", 80))})  # cross-node
    expected.update({f: True for f in flows("y/c", "x/b", ("tcp", 80))})
    expected.update({f: False for f in flows("y/c", "x/b", ("tcp", 81), versions=(4,))})
    # unselected pods stay open both ways
    expected.update({f: True for f in flows("x/a", "x/b", ("tcp", 80), ("udp", 80))})
    expected.update({f: True for f in flows("y/d", "x/b", ("tcp", 81), versions=(4,))})
    assert all(probe(c, list(expected)).values())  # all open before

    t0 = time.monotonic()
    c.api.create("networkpolicies", A_FROM_B_80)
    c.api.create("networkpolicies", C_TO_XB_80)
    elapsed = measure(c, expected, timeout=5, since=t0)
    total = time.monotonic() - t0
    print(f"\npolicy -> enforced on both nodes: {elapsed * 1000:.0f} ms "
          f"(confirmed after {total * 1000:.0f} ms)")
    assert elapsed < 1.0, f"enforced only after {elapsed:.2f} s"


def test_pod_and_namespace_label_changes_take_effect(clean: ClusterLab) -> None:
    c = clean
    c.api.create("networkpolicies", policy("x", "a-from-clients", {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}},
                              {"namespaceSelector": {"matchLabels": {"team": "blue"}}}],
                     "ports": [{"protocol": "TCP", "port": 80}]}]}))
    to_a = {"x/b": flows("x/b", "x/a", ("tcp", 80)), "y/c": flows("y/c", "x/a", ("tcp", 80)),
            "y/d": flows("y/d", "x/a", ("tcp", 80))}
    expected = {f: False for fl in to_a.values() for f in fl}
    wait_matrix(c, expected)

    t0 = time.monotonic()
    c.label_pod("x/b", {"pod": "b", "role": "client"})  # x/b (node-2) becomes a client
    expected.update({f: True for f in to_a["x/b"]})
    took_pod = measure(c, expected, since=t0)
    assert probe(c, flows("x/b", "x/a", ("tcp", 81))) == {
        f: False for f in flows("x/b", "x/a", ("tcp", 81))}  # still port 80 only

    t1 = time.monotonic()
    c.namespace("y", {"ns": "y", "team": "blue"})  # every pod of y, on both nodes
    expected.update({f: True for f in to_a["y/c"] + to_a["y/d"]})
    took_ns = measure(c, expected, since=t1)

    t2 = time.monotonic()
    c.label_pod("x/b", {"pod": "b"})  # and back
    c.namespace("y", {"ns": "y"})
    expected = {f: False for fl in to_a.values() for f in fl}
    took_back = measure(c, expected, since=t2)
    print(f"\npod label: {took_pod * 1000:.0f} ms, namespace label: {took_ns * 1000:.0f} ms, "
          f"both removed: {took_back * 1000:.0f} ms")
    assert max(took_pod, took_ns, took_back) < 1.0


def test_deleting_the_policy_restores_traffic(clean: ClusterLab) -> None:
    c = clean
    c.api.create("networkpolicies", policy("x", "deny-a", {
        "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"]}))
    to_a = flows("x/b", "x/a", ("tcp", 80), ("udp", 80)) + flows("y/d", "x/a", ("tcp", 81))
    wait_matrix(c, {f: False for f in to_a})
    t0 = time.monotonic()
    c.api.delete("networkpolicies", "x", "deny-a")
    took = measure(c, {f: True for f in to_a}, since=t0)
    print(f"\npolicy deleted -> traffic back: {took * 1000:.0f} ms")
    assert took < 1.0


def test_established_connection_cut_by_new_policy_allowed_one_survives(clean: ClusterLab
                                                                       ) -> None:
    c = clean
    a, b, cc = pod(c, "x/a"), pod(c, "x/b"), pod(c, "y/c")
    assert c.lab.connect_hold(b.target, a.ipv4, 80, "keep")
    assert c.lab.connect_hold(cc.target, a.ipv4, 80, "cut")
    try:
        assert c.lab.hold_send(b.target, "keep") and c.lab.hold_send(cc.target, "cut")
        c.api.create("networkpolicies", A_FROM_B_80)
        # node-1 removes the conntrack entry of y/c -> x/a: its next segment is dropped
        eventually(lambda: not c.lab.hold_send(cc.target, "cut", timeout=0.3),
                   message="the denied established connection still carries data")
        for _ in range(3):
            assert c.lab.hold_send(b.target, "keep"), "the allowed connection was cut"
        assert probe(c, [("y/c", "x/a", "tcp", 80, 4), ("x/b", "x/a", "tcp", 80, 4)]) == {
            ("y/c", "x/a", "tcp", 80, 4): False, ("x/b", "x/a", "tcp", 80, 4): True}
    finally:
        c.lab.hold_close(b.target, "keep")
        c.lab.hold_close(cc.target, "cut")


# ----------------------------------------------------------------------------- failures


class ContinuousProbe:
    """Probes flows that must stay denied, back to back (one thread per source), until
    stopped; records every success."""

    def __init__(self, c: ClusterLab, flows_: list[Flow], timeout: float = 0.02) -> None:
        self.c, self.timeout = c, timeout
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.count = 0
        self.leaks: list[tuple[float, Flow]] = []
        self.errors: list[BaseException] = []
        by_src: dict[str, list[Flow]] = {}
        for f in flows_:
            by_src.setdefault(f[0], []).append(f)
        self.threads = [threading.Thread(target=self._run, args=(fl,), daemon=True)
                        for fl in by_src.values()]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _run(self, fl: list[Flow]) -> None:
        src = pod(self.c, fl[0][0]).target
        specs = [(getattr(pod(self.c, dst), "ipv4" if v == 4 else "ipv6"), proto, port)
                 for _, dst, proto, port, v in fl]
        try:
            while not self.stop_event.is_set():
                results = self.c.lab.probe_many(src, specs, self.timeout)
                with self.lock:
                    self.count += len(results)
                    self.leaks += [(time.monotonic(), f) for f, ok in zip(fl, results,
                                                                          strict=True) if ok]
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.errors.append(e)

    def finish(self) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(10)


def test_agent_killed_keeps_enforcement_and_restart_resyncs_without_window(clean: ClusterLab
                                                                         ) -> None:
    c = clean
    node1 = c.node("node-1")
    c.api.create("networkpolicies", A_FROM_B_80)
    denied = flows("y/c", "x/a", ("tcp", 80)) + flows("y/d", "x/a", ("tcp", 80))
    denied_b = flows("x/b", "x/a", ("tcp", 81))
    allowed = flows("x/b", "x/a", ("tcp", 80))
    expected = {**{f: False for f in denied + denied_b}, **{f: True for f in allowed}}
    wait_matrix(c, expected)

    pid = node1.agent.pid
    c.stop_agent(node1, signal.SIGKILL)
    assert node1.agent is None and not os.path.exists(f"/proc/{pid}")  # gone, reaped
    # Dead agent: the kernel keeps enforcing, probed again and again.
    for _ in range(4):
        assert probe(c, list(expected)) == expected
    # A change made while it is dead: x/b may now use port 81 too (still not y/c, y/d).
    changed = policy("x", "a-from-b", {**A_FROM_B_80["spec"], "ingress": [
        {**A_FROM_B_80["spec"]["ingress"][0], "ports": [{"protocol": "TCP", "port": 80},
                                                        {"protocol": "TCP", "port": 81}]}]})
    c.api.update("networkpolicies", changed)
    assert probe(c, denied_b) == {f: False for f in denied_b}  # nobody to apply it

    watcher = ContinuousProbe(c, denied)
    watcher.start()
    try:
        eventually(lambda: watcher.count >= 8)
        t0 = time.monotonic()
        c.start_agent(node1)
        c.wait_ready(node1)
        ready = time.monotonic() - t0
        took = wait_matrix(c, {**{f: False for f in denied}, **{f: True for f in
                                                               allowed + denied_b}})
        before = watcher.count
        eventually(lambda: watcher.count >= before + 8)  # and some more after the resync
        with watcher.lock:
            leaks, probes = list(watcher.leaks), watcher.count
        # The restarted agent follows changes again, and the prober does see open flows.
        t1 = time.monotonic()
        c.api.delete("networkpolicies", "x", "a-from-b")
        eventually(lambda: {f for _, f in watcher.leaks} == set(denied), timeout=BOUND)
        reopened = min(t for t, _ in watcher.leaks[len(leaks):]) - t1
    finally:
        watcher.finish()
    assert not watcher.errors, watcher.errors
    assert leaks == [], f"denied flow got through during the restart: {leaks}"
    print(f"\nrestart: ready after {ready:.2f} s, change made while dead enforced "
          f"{took * 1000:.0f} ms after that; {probes} probes of denied flows, none passed; "
          f"policy deleted after restart -> first probe through {reopened * 1000:.0f} ms")
    assert probes >= 20
    assert reopened < 1.0


def test_api_server_away_and_back_with_compaction_converges(clean: ClusterLab) -> None:
    c = clean
    c.api.create("networkpolicies", A_FROM_B_80)
    before = {**{f: True for f in flows("x/b", "x/a", ("tcp", 80))},
              **{f: False for f in flows("y/c", "x/a", ("tcp", 80))},
              **{f: True for f in flows("x/a", "x/b", ("tcp", 80))},
              **{f: True for f in flows("y/d", "x/b", ("tcp", 80))}}
    wait_matrix(c, before)
    logs_at = {n.name: len(c.agent_log(n)) for n in c.nodes}

    c.api.go_away()
    try:
        # Away: the agents fail to reach it and keep enforcing what they had.
        eventually(lambda: all("API request failed" in c.agent_log(n)[logs_at[n.name]:]
                               for n in c.nodes), timeout=10)
        for _ in range(3):
            assert probe(c, list(before)) == before
        # Changes meanwhile: x/a now also admits namespace y; x/b gets isolated (node-2);
        # a pod label changes; then the history is compacted: resuming gets 410.
        c.api.update("networkpolicies", policy("x", "a-from-b", {
            **A_FROM_B_80["spec"], "ingress": [{
                "from": [{"podSelector": {"matchLabels": {"pod": "b"}}},
                         {"namespaceSelector": {"matchLabels": {"ns": "y"}}}],
                "ports": [{"protocol": "TCP", "port": 80}]}]}))
        c.api.create("networkpolicies", policy("x", "deny-b", {
            "podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"]}))
        c.api.compact()
        assert probe(c, list(before)) == before  # still the old state
    finally:
        t0 = time.monotonic()
        c.api.come_back()
    after = {**{f: True for f in flows("x/b", "x/a", ("tcp", 80))},
             **{f: True for f in flows("y/c", "x/a", ("tcp", 80))},
             **{f: False for f in flows("x/a", "x/b", ("tcp", 80))},
             **{f: False for f in flows("y/d", "x/b", ("tcp", 80))}}
    took = wait_matrix(c, after, timeout=20, since=t0)
    print(f"\nAPI back -> new state enforced on both nodes after {took:.2f} s "
          f"(backoff included)")
    for n in c.nodes:
        log = c.agent_log(n)[logs_at[n.name]:]
        assert "expired (410), relisting" in log, log[-2000:]
        assert re.search(r"networkpolicies: listed 2 objects", log), log[-2000:]


# ----------------------------------------------------------------------------- observability

_READYZ = ("import urllib.request\n"
           "print(urllib.request.urlopen('http://127.0.0.1:9490/readyz', timeout=2).status)")


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def test_metrics_and_readyz(clean: ClusterLab) -> None:
    c = clean
    c.api.create("networkpolicies", policy("x", "deny-a", {
        "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"]}))
    wait_matrix(c, {("x/b", "x/a", "tcp", 80, 4): False})
    denied: dict[str, float] = {}
    for node in c.nodes:
        text = c.metrics(node)
        assert metric(text, 'np_agent_objects{kind="pods"}') == len(PODS)
        assert metric(text, 'np_agent_objects{kind="namespaces"}') == len(NAMESPACES)
        assert metric(text, 'np_agent_objects{kind="networkpolicies"}') == 1
        assert metric(text, "np_agent_syncs_total") >= 1
        for hist in ("np_agent_transaction_seconds", "np_agent_event_to_kernel_seconds"):
            assert re.search(rf'^{hist}_bucket{{le="[0-9.]+"}} [0-9.]+$', text, re.M), text
            assert metric(text, f'{hist}_bucket{{le="+Inf"}}') == metric(text, f"{hist}_count")
            assert metric(text, f"{hist}_count") >= 1
        status = c.lab.run(node.netns, ["python3", "-c", _READYZ]).stdout.strip()
        assert status == "200"
        count = metric(text, "np_agent_event_to_kernel_seconds_count")
        mean = metric(text, "np_agent_event_to_kernel_seconds_sum") / count
        print(f"\n{node.name}: {count:.0f} event->kernel syncs, mean {mean * 1000:.1f} ms")
        assert metric(text, 'np_agent_lists_total{kind="pods"}') >= 1
        assert metric(text, "np_agent_sync_seconds_count") >= 1
        assert abs(metric(text, "np_agent_last_sync_timestamp_seconds") - time.time()) < 600
        assert re.search(r'^np_agent_build_info\{python="[0-9.]+",version="[^"]+"\} 1.0$',
                         text, re.M), text
        denied[node.name] = metric(text, 'np_agent_denied_packets_total'
                                         '{direction="ingress",family="ipv4"}')
    # x/b -> x/a was probed and dropped on x/a's node: its drop rule counted it
    assert sum(denied.values()) > 0, denied
