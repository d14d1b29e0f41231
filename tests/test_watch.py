"""np-agent's list-then-watch (kube.Reflector) against the fake API server, with the REAL
kubernetes client: pagination, ordered events, bookmarks, 410 Gone and relist, dropped and
silent connections, a vanishing API server and the backoff while it is gone; then the
NodeAgent fed by reflectors (no kernel: a recording dataplane).

No root needed: the fake API server listens on 127.0.0.1 in this process.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from kubernetes import client  # noqa: E402

from conftest import eventually
from np_agent.nft.dataplane import ApplyResult  # noqa: E402
from np_agent.node import kube  # noqa: E402
from np_agent.node.engine import NodeAgent  # noqa: E402
from np_agent.node.kube import Backoff, Reflector, WatchOptions  # noqa: E402
from np_cni.shared.endpoints import EndpointStore  # noqa: E402
from np_lab.fakeapi import FakeApiServer  # noqa: E402


def pod(name: str, ns: str = "x", ip: str = "10.1.0.1", node: str = "node-1",
        **labels: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i"}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}


def key(obj: dict[str, Any]) -> str:
    meta = obj["metadata"]
    return f"{meta['namespace']}/{meta['name']}" if meta.get("namespace") else meta["name"]


class Recorder:
    """A Handler that records every call and keeps the state it was told about."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[Any, ...]] = []
        self.state: dict[str, dict[str, dict[str, Any]]] = {}
        self.errors: list[tuple[float, Exception]] = []

    def replace(self, kind: str, items: list[dict[str, Any]]) -> None:
        with self.lock:
            self.calls.append(("replace", kind, [key(o) for o in items]))
            self.state[kind] = {key(o): o for o in items}

    def event(self, kind: str, type_: str, obj: dict[str, Any]) -> None:
        with self.lock:
            rv = int(obj["metadata"]["resourceVersion"])
            self.calls.append(("event", kind, type_, key(obj), rv))
            if type_ == "DELETED":
                self.state.setdefault(kind, {}).pop(key(obj), None)
            else:
                self.state.setdefault(kind, {})[key(obj)] = obj

    def on_error(self, kind: str, error: Exception) -> None:
        with self.lock:
            self.errors.append((time.monotonic(), error))

    def events(self) -> list[tuple[Any, ...]]:
        with self.lock:
            return [c for c in self.calls if c[0] == "event"]

    def replaces(self) -> list[tuple[Any, ...]]:
        with self.lock:
            return [c for c in self.calls if c[0] == "replace"]

    def versions(self, kind: str) -> dict[str, str]:
        with self.lock:
            return {k: o["metadata"]["resourceVersion"]
                    for k, o in self.state.get(kind, {}).items()}


def server_versions(fake: FakeApiServer, kind: str) -> dict[str, str]:
    return {key(o): o["metadata"]["resourceVersion"] for o in fake.list_objects(kind)}


def params(path: str) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(urlsplit(path).query).items()}


def watches(fake: FakeApiServer) -> list[dict[str, str]]:
    return [q for q in (params(p) for m, p in fake.request_log if m == "GET")
            if q.get("watch") == "true"]


def lists(fake: FakeApiServer) -> list[dict[str, str]]:
    return [q for q in (params(p) for m, p in fake.request_log if m == "GET")
            if q.get("watch") != "true"]


@pytest.fixture
def fake() -> Iterator[FakeApiServer]:
    with FakeApiServer(bookmark_interval=0.1) as server:
        yield server


@pytest.fixture
def list_fns(fake: FakeApiServer) -> Iterator[dict[str, Callable[..., Any]]]:
    api = client.ApiClient(fake.client_configuration())
    yield kube.list_functions(api)
    api.close()


@pytest.fixture
def reflect(fake: FakeApiServer, list_fns: dict[str, Callable[..., Any]]
            ) -> Iterator[Callable[..., Reflector]]:
    """reflect(kind, handler, **WatchOptions fields): a started Reflector, stopped at the end."""
    started: list[Reflector] = []

    def start(kind: str, handler: Any, **options: Any) -> Reflector:
        opts = WatchOptions(**{"read_timeout": 5.0, "connect_timeout": 1.0,
                               "backoff_initial": 0.05, "backoff_max": 0.5, **options})
        r = Reflector(kind, list_fns[kind], handler, threading.Event(), opts,
                      on_error=getattr(handler, "on_error", None))
        r.start()
        started.append(r)
        return r

    try:
        yield start
    finally:
        for r in started:
            r.stop_event.set()
        fake.drop_watches()  # readers blocked on a stream wake up at once
        for r in started:
            r.join(5)
        assert not any(r.is_alive() for r in started), "a reflector did not stop"


def synced(fake: FakeApiServer, r: Reflector, watches_open: int = 1) -> None:
    """Wait until the first list is done and the watch stream is open."""
    assert r.synced.wait(5), f"{r.kind} never listed"
    assert fake.wait_for_watches(watches_open), "the watch never opened"


# ----------------------------------------------------------------------------- backoff


def test_backoff_is_exponential_capped_and_jittered(monkeypatch: pytest.MonkeyPatch) -> None:
    ceilings = [min(30.0, 0.5 * 2 ** i) for i in range(12)]
    assert ceilings[:7] == [0.5, 1, 2, 4, 8, 16, 30]
    b = Backoff(0.5, 30.0)
    monkeypatch.setattr(kube.random, "uniform", lambda lo, hi: hi)
    assert [b.next() for _ in range(12)] == ceilings
    b.reset()
    monkeypatch.setattr(kube.random, "uniform", lambda lo, hi: lo)
    assert [b.next() for _ in range(12)] == [c / 2 for c in ceilings]  # full jitter: >= half
    monkeypatch.undo()
    b.reset()
    for _ in range(50):  # the real jitter stays within [ceiling/2, ceiling]
        for ceiling in ceilings:
            assert ceiling / 2 <= b.next() <= ceiling
        b.reset()


# ----------------------------------------------------------------------------- list + watch


def test_initial_list_is_paginated_and_delivered_whole(fake: FakeApiServer, reflect) -> None:
    for i in range(5):
        fake.create("pods", pod(f"p{i}", ns="x" if i < 3 else "y"))
    fake.create("namespaces", {"metadata": {"name": "x"}})  # another kind: not listed
    rec = Recorder()
    r = reflect("pods", rec, page_size=2)
    synced(fake, r)
    assert rec.replaces() == [("replace", "pods", ["x/p0", "x/p1", "x/p2", "y/p3", "y/p4"])]
    assert rec.events() == []
    assert r.lists == 1 and r.resource_version == str(fake.resource_version)
    pages = lists(fake)
    assert [q["limit"] for q in pages] == ["2", "2", "2"]
    assert ["continue" in q for q in pages] == [False, True, True]
    # The watch starts exactly where the list's snapshot is, with bookmarks.
    (w,) = watches(fake)
    assert w["resourceVersion"] == str(fake.resource_version)
    assert w["allowWatchBookmarks"] == "true"


def test_changes_arrive_as_events_in_order(fake: FakeApiServer, reflect) -> None:
    fake.create("pods", pod("before"))
    rec = Recorder()
    r = reflect("pods", rec)
    synced(fake, r)
    p = fake.create("pods", pod("p", app="web"))
    p["metadata"]["labels"] = {"app": "db"}
    fake.update("pods", p)
    fake.create("namespaces", {"metadata": {"name": "x"}})  # another kind: no event here
    fake.create("pods", pod("q"))
    fake.delete("pods", "x", "p")
    fake.delete("pods", "x", "before")
    expected = [("ADDED", "x/p"), ("MODIFIED", "x/p"), ("ADDED", "x/q"), ("DELETED", "x/p"),
                ("DELETED", "x/before")]
    eventually(lambda: len(rec.events()) >= len(expected), message=lambda: str(rec.calls))
    events = rec.events()
    assert [(e[2], e[3]) for e in events] == expected
    rvs = [e[4] for e in events]
    assert rvs == sorted(rvs) and len(set(rvs)) == len(rvs)
    assert rec.state["pods"]["x/q"]["metadata"]["name"] == "q"
    assert rec.versions("pods") == server_versions(fake, "pods")
    assert len(rec.replaces()) == 1 and r.lists == 1
    eventually(lambda: r.resource_version == str(fake.resource_version))


def test_bookmarks_advance_the_resource_version_without_events(fake: FakeApiServer,
                                                               reflect) -> None:
    fake.create("pods", pod("p"))
    rec = Recorder()
    r = reflect("pods", rec)
    synced(fake, r)
    listed_rv = int(r.resource_version)
    for i in range(3):  # other kinds move the global resourceVersion
        fake.create("namespaces", {"metadata": {"name": f"n{i}"}})
    eventually(lambda: r.resource_version == str(fake.resource_version))
    assert int(r.resource_version) == listed_rv + 3
    assert rec.events() == [] and len(rec.replaces()) == 1
    assert len(watches(fake)) == 1  # the same stream carried the bookmarks
    # A resumed watch starts from the bookmark, not from the list.
    fake.drop_watches()
    eventually(lambda: len(watches(fake)) == 2)
    assert watches(fake)[1]["resourceVersion"] == str(listed_rv + 3)
    assert r.lists == 1


def test_dropped_watch_resumes_from_last_resource_version(fake: FakeApiServer,
                                                          reflect) -> None:
    for i in range(3):
        fake.create("pods", pod(f"p{i}"))
    rec = Recorder()
    r = reflect("pods", rec)
    synced(fake, r)
    fake.create("pods", pod("seen"))
    eventually(lambda: rec.events())
    rv = r.resource_version
    assert rv == str(fake.resource_version)
    fake.clear_request_log()
    assert fake.drop_watches() == 1
    fake.create("pods", pod("made-while-dropped"))  # replayed by the resumed watch
    fake.delete("pods", "x", "p0")
    eventually(lambda: [e[2:4] for e in rec.events()][-2:] == [
        ("ADDED", "x/made-while-dropped"), ("DELETED", "x/p0")], message=lambda: str(rec.calls))
    assert rec.errors, "the dropped stream was not reported as a failure"
    assert lists(fake) == []  # no relist
    assert watches(fake)[0]["resourceVersion"] == rv
    assert r.lists == 1 and len(rec.replaces()) == 1
    assert rec.versions("pods") == server_versions(fake, "pods")


@pytest.mark.parametrize("mode", ["event", "http"])
def test_compaction_means_410_and_relist_without_losing_anything(fake: FakeApiServer, reflect,
                                                                 mode: str) -> None:
    fake.expired_watch_mode = mode
    for i in range(4):
        fake.create("pods", pod(f"p{i}", app="v1"))
    rec = Recorder()
    r = reflect("pods", rec, page_size=2)
    synced(fake, r)
    behind = r.resource_version
    # Changes the reflector cannot see (its stream is silent), then history is compacted
    # and the stream dropped: resuming from `behind` is impossible.
    fake.silent_watches(True)
    fake.create("pods", pod("p4"))
    p1 = fake.get("pods", "x", "p1")
    p1["metadata"]["labels"] = {"app": "v2"}
    fake.update("pods", p1)
    fake.delete("pods", "x", "p2")
    fake.create("pods", pod("p5"))
    fake.compact()
    fake.drop_watches()
    fake.silent_watches(False)
    eventually(lambda: r.lists == 2, message=lambda: f"lists={r.lists} log={fake.request_log}")
    assert len(rec.replaces()) == 2
    assert rec.replaces()[1] == ("replace", "pods", ["x/p0", "x/p1", "x/p3", "x/p4", "x/p5"])
    assert rec.versions("pods") == server_versions(fake, "pods")
    assert rec.state["pods"]["x/p1"]["metadata"]["labels"] == {"app": "v2"}
    # It tried to resume first, got 410, relisted, and watches from the new list.
    ws = watches(fake)
    assert any(w["resourceVersion"] == behind for w in ws[1:])
    eventually(lambda: watches(fake)[-1]["resourceVersion"] == str(fake.resource_version))
    # ... and keeps following changes.
    fake.delete("pods", "x", "p0")
    eventually(lambda: rec.events() and rec.events()[-1][2:4] == ("DELETED", "x/p0"))
    assert rec.versions("pods") == server_versions(fake, "pods")


def test_silent_watch_hits_read_timeout_and_recovers(fake: FakeApiServer, reflect) -> None:
    rec = Recorder()
    r = reflect("pods", rec, read_timeout=0.5, watch_timeout=30)
    synced(fake, r)
    rv = r.resource_version
    fake.silent_watches(True)
    t0 = time.monotonic()
    fake.create("pods", pod("unseen"))
    eventually(lambda: any("ReadTimeout" in type(e).__name__ for _, e in rec.errors),
               message=lambda: str(rec.errors))
    first_timeout = next(t for t, e in rec.errors if "ReadTimeout" in type(e).__name__)
    assert 0.4 < first_timeout - t0 < 2.0
    assert rec.events() == []  # a silent server delivers nothing
    fake.silent_watches(False)
    eventually(lambda: rec.events(), message=lambda: str(rec.calls))
    assert [e[2:4] for e in rec.events()] == [("ADDED", "x/unseen")]
    assert r.lists == 1 and lists(fake)[1:] == []  # resumed, never relisted
    assert all(w["resourceVersion"] == rv for w in watches(fake)[1:])


def test_api_server_away_backoff_then_resume(fake: FakeApiServer, reflect) -> None:
    fake.create("pods", pod("p"))
    rec = Recorder()
    initial, maximum = 0.05, 0.4
    r = reflect("pods", rec, backoff_initial=initial, backoff_max=maximum)
    synced(fake, r)
    rv = r.resource_version
    fake.go_away()
    try:
        eventually(lambda: len(rec.errors) >= 8, timeout=10, message=lambda: str(rec.errors))
        fake.create("pods", pod("made-while-away"))  # state kept; history intact
    finally:
        fake.clear_request_log()
        fake.come_back()
    times = [t for t, _ in rec.errors[:8]]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    for attempt, gap in enumerate(gaps):
        ceiling = min(maximum, initial * 2 ** attempt)
        # the wait is jittered within [ceiling/2, ceiling]; a refused connect costs little
        assert ceiling / 2 - 0.005 <= gap <= ceiling + 0.2, (attempt, gap, gaps)
    assert max(gaps) <= maximum + 0.2  # capped
    assert min(gaps[3:]) > initial  # grew
    eventually(lambda: rec.events(), timeout=5)
    assert [e[2:4] for e in rec.events()] == [("ADDED", "x/made-while-away")]
    assert r.lists == 1 and lists(fake) == []
    assert watches(fake)[0]["resourceVersion"] == rv


# ----------------------------------------------------------------------------- NodeAgent


class RecordingDataplane:
    """Stands in for the kernel: records every reconcile; ``delay`` plays a transaction."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.calls: list[tuple[Any, bool, Any]] = []
        self.lock = threading.Lock()

    def reconcile(self, ruleset: Any, verify: bool = True, delta: Any = None) -> ApplyResult:
        if self.delay:
            time.sleep(self.delay)
        with self.lock:
            self.calls.append((ruleset, verify, delta))
        return ApplyResult(1, 0, [], False, 0.0, 0.0, self.delay)

    def count(self) -> int:
        with self.lock:
            return len(self.calls)

    def last(self) -> Any:
        with self.lock:
            return self.calls[-1][0]


def isolated_v4(ruleset: Any) -> set[str]:
    return {str(ipaddress.IPv4Address(k[0][0]))
            for k in ruleset.elements.get("ingress-isolated-v4", {})}


@pytest.fixture
def agent_with(tmp_path: Path) -> Iterator[Callable[[RecordingDataplane], NodeAgent]]:
    agents: list[NodeAgent] = []

    def make(dataplane: RecordingDataplane) -> NodeAgent:
        agent = NodeAgent("node-1", EndpointStore(tmp_path / "endpoints"), dataplane=dataplane)
        agent.start()
        agents.append(agent)
        return agent

    try:
        yield make
    finally:
        for agent in agents:
            agent.stop()


DENY_X = {"metadata": {"name": "deny", "namespace": "x"},
          "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}


def test_agent_applies_nothing_before_every_kind_is_listed(fake: FakeApiServer, reflect,
                                                           agent_with) -> None:
    fake.create("namespaces", {"metadata": {"name": "x"}})
    fake.create("pods", pod("a", ip="10.1.0.1"))
    fake.create("networkpolicies", DENY_X)
    dp = RecordingDataplane()
    agent = agent_with(dp)
    ns, pods = reflect("namespaces", agent), reflect("pods", agent)
    synced(fake, ns, 2)
    assert pods.synced.wait(5)
    # A pod that appears after the pod list, before the policies are listed, must not be lost.
    fake.create("pods", pod("late", ip="10.1.0.2"))
    eventually(lambda: agent.metrics.registry.get_sample_value(
        "np_agent_watch_events_total", {"kind": "pods"}))  # None, then >= 1
    # Pods and namespaces without their policies would open pods that should be closed.
    outcome = agent.request_sync(wait=True, timeout=0.3)
    assert outcome.error == "timed out waiting for the dataplane" and outcome.result is None
    assert dp.count() == 0 and not agent.ready
    reflect("networkpolicies", agent)
    eventually(lambda: dp.count() >= 1)
    first = dp.calls[0]
    assert first[1] is True  # the first sync lists the kernel (a previous run's table)
    # The very first transaction already isolates both pods, the late one included.
    assert isolated_v4(first[0]) == {"10.1.0.1", "10.1.0.2"}
    assert agent.ready


def test_agent_coalesces_a_burst_of_events(fake: FakeApiServer, reflect, agent_with) -> None:
    fake.create("namespaces", {"metadata": {"name": "x"}})
    fake.create("networkpolicies", DENY_X)
    dp = RecordingDataplane(delay=0.02)  # a transaction takes some time
    agent = agent_with(dp)
    for kind in ("namespaces", "pods", "networkpolicies"):
        reflect(kind, agent)
    eventually(lambda: agent.ready)
    eventually(lambda: fake.watch_count() == 3)
    before = dp.count()
    ips = {f"10.1.{i // 200}.{i % 200 + 1}" for i in range(50)}
    for i, ip in enumerate(sorted(ips)):
        fake.create("pods", pod(f"p{i}", ip=ip))
    eventually(lambda: isolated_v4(dp.last()) == ips, timeout=10,
               message=lambda: f"{len(isolated_v4(dp.last()))} of 50 pods enforced")
    assert agent.metrics.registry.get_sample_value(
        "np_agent_watch_events_total", {"kind": "pods"}) == 50
    eventually(lambda: agent.applied_seq == agent._seq)  # every input marked is enforced
    syncs = dp.count() - before
    print(f"\n50 events -> {syncs} reconciles")
    assert 1 <= syncs <= 10, f"50 events cost {syncs} reconciles"
    assert isolated_v4(dp.last()) == ips
    assert agent.metrics.registry.get_sample_value("np_agent_objects", {"kind": "pods"}) == 50
