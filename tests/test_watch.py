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
import weakref
from collections.abc import Callable, Iterable, Iterator
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
    """A Handler that records every call and keeps the state it was told about. Like the
    real handlers it takes a list page by page and swaps it in only after the last page;
    ``on_page(kind, page)`` is called as each page arrives."""

    def __init__(self, on_page: Callable[[str, list[dict[str, Any]]], None] | None = None
                 ) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[Any, ...]] = []
        self.state: dict[str, dict[str, dict[str, Any]]] = {}
        self.errors: list[tuple[float, Exception]] = []
        self.pages: list[tuple[str, int]] = []  # (kind, items in the page), every list
        self.on_page = on_page

    def replace(self, kind: str, pages: Iterable[list[dict[str, Any]]]) -> None:
        listed: dict[str, dict[str, Any]] = {}
        for page in pages:
            with self.lock:
                self.pages.append((kind, len(page)))
            if self.on_page:
                self.on_page(kind, page)
            listed.update((key(o), o) for o in page)
        with self.lock:
            self.calls.append(("replace", kind, list(listed)))
            self.state[kind] = listed

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


def test_initial_list_is_paginated_and_delivered_page_by_page(fake: FakeApiServer, reflect,
                                                              list_fns) -> None:
    for i in range(5):
        fake.create("pods", pod(f"p{i}", ns="x" if i < 3 else "y"))
    fake.create("namespaces", {"metadata": {"name": "x"}})  # another kind: not listed
    seen: list[tuple[int, int]] = []  # (items in the page, list requests made by then)
    rec = Recorder(lambda kind, page: seen.append((len(page), len(lists(fake)))))
    r = reflect("pods", rec, page_size=2)
    synced(fake, r)
    assert rec.replaces() == [("replace", "pods", ["x/p0", "x/p1", "x/p2", "y/p3", "y/p4"])]
    # Each page reaches the handler before the next one is even asked for.
    assert seen == [(2, 1), (2, 2), (1, 3)]
    assert rec.events() == []
    assert r.lists == 1 and r.resource_version == str(fake.resource_version)
    pages = lists(fake)
    assert [q["limit"] for q in pages] == ["2", "2", "2"]
    assert ["continue" in q for q in pages] == [False, True, True]
    # The watch starts exactly where the list's snapshot is, with bookmarks.
    (w,) = watches(fake)
    assert w["resourceVersion"] == str(fake.resource_version)
    assert w["allowWatchBookmarks"] == "true"


def test_a_big_list_never_holds_more_than_one_page(fake: FakeApiServer, reflect,
                                                   list_fns) -> None:
    """N pages for N*limit pods; the handler gets at most ``limit`` raw objects at once, the
    previous page is emptied when the next arrives, and no response object outlives its
    page (its body is not cached in it)."""
    limit, n = 25, 8
    for i in range(n * limit):
        fake.create("pods", pod(f"p{i:03d}", ip=f"10.1.{i // 250}.{i % 250 + 1}"))
    responses: list[weakref.ref[Any]] = []
    real_list = list_fns["pods"]

    def list_pods(**kwargs: Any) -> Any:
        resp = real_list(**kwargs)
        if not kwargs.get("watch"):
            responses.append(weakref.ref(resp))
        return resp

    list_fns["pods"] = list_pods
    pages: list[list[dict[str, Any]]] = []
    problems: list[str] = []

    def on_page(kind: str, page: list[dict[str, Any]]) -> None:
        if len(page) > limit:
            problems.append(f"a page of {len(page)} items")
        if any(pages):
            problems.append("a previous page still holds its items")
        if any(ref() is not None for ref in responses):
            problems.append("a response is still alive")
        pages.append(page)  # the list object only: the reflector empties it

    rec = Recorder(on_page)
    r = reflect("pods", rec, page_size=limit)
    synced(fake, r)
    assert problems == []
    assert rec.pages == [("pods", limit)] * n and len(responses) == n
    assert not any(pages) and len(rec.state["pods"]) == n * limit


def test_relist_failing_midway_keeps_the_previous_state(fake: FakeApiServer, reflect,
                                                        list_fns, agent_with) -> None:
    """A relist (410) whose second page fails, first with an expired continue token (410
    again: relist at once), then with a dropped connection (backoff, relist): the agent
    keeps enforcing the previous complete state until a relist completes, never a part."""
    fake.create("namespaces", {"metadata": {"name": "x"}})
    fake.create("networkpolicies", DENY_X)
    old = {f"10.1.0.{i + 1}" for i in range(6)}
    for i in range(6):
        fake.create("pods", pod(f"p{i}", ip=f"10.1.0.{i + 1}"))
    dp = RecordingDataplane()
    agent = agent_with(dp)
    real_list = list_fns["pods"]
    pod_lists: list[int] = []  # pages requested, per list
    failures = [("expire", 2, 2), ("drop", 3, 2)]  # (how, list number, page number)
    held_at_failure: list[set[str]] = []

    def list_pods(**kwargs: Any) -> Any:
        if kwargs.get("watch"):
            return real_list(**kwargs)
        if "_continue" not in kwargs:
            pod_lists.append(0)
        pod_lists[-1] += 1
        if failures and failures[0][1:] == (len(pod_lists), pod_lists[-1]):
            how = failures.pop(0)[0]
            with agent._cond:
                held_at_failure.append({str(ip) for p in agent.compiler.state.pods.values()
                                        for ip in p.ips})
            if how == "drop":
                raise ConnectionResetError("connection reset by peer, mid-list")
            fake.create("namespaces", {"metadata": {"name": "other"}})
            fake.compact()  # the continue token is now too old: 410 Expired
        return real_list(**kwargs)

    list_fns["pods"] = list_pods
    for kind in ("namespaces", "networkpolicies"):
        reflect(kind, agent)
    r = reflect("pods", agent, page_size=2)
    eventually(lambda: dp.count() >= 1 and isolated_v4(dp.last()) == old)
    fake.silent_watches(True)  # changes the pods' watch does not see, then a compaction
    fake.delete("pods", "x", "p0")
    fake.create("pods", pod("p6", ip="10.1.0.7"))
    fake.compact()
    fake.drop_watches()
    fake.silent_watches(False)
    new = old - {"10.1.0.1"} | {"10.1.0.7"}
    eventually(lambda: r.lists == 2, timeout=10, message=lambda: f"{pod_lists} {failures}")
    eventually(lambda: isolated_v4(dp.last()) == new)
    assert failures == [] and pod_lists == [3, 2, 2, 3]  # the first and last are complete
    assert held_at_failure == [old, old]  # the half-read relists changed nothing
    assert all(isolated_v4(call[0]) in (old, new) for call in dp.calls)  # never a part
    assert set(agent.compiler.state.pods) == {f"x/p{i}" for i in range(1, 7)}


def test_handlers_keep_their_state_when_a_list_fails_midway(tmp_path: Path) -> None:
    """The handlers' side of the contract, without an API server: a page iterator that
    raises after a page leaves NodeAgent and NodeNetwork as they were."""
    from np_agent.node.nodenet import NodeNetwork

    def failing(page: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
        yield page
        raise ConnectionResetError("mid-list")

    agent = NodeAgent("node-1", EndpointStore(tmp_path / "ep"),
                      dataplane=RecordingDataplane())  # type: ignore[arg-type]  # not started
    with pytest.raises(ConnectionResetError):  # a first list: the kind stays unlisted
        agent.replace("pods", failing([pod("a")]))
    agent.replace("namespaces", [[{"metadata": {"name": "x"}}]])
    agent.replace("networkpolicies", [[DENY_X]])
    assert agent.compiler.state.pods == {}
    agent.replace("pods", [[pod("a")], [pod("b", ip="10.1.0.2")]])
    before, seq = dict(agent.compiler.state.pods), agent._seq
    assert set(before) == {"x/a", "x/b"}
    with pytest.raises(ConnectionResetError):  # a relist
        agent.replace("pods", failing([pod("c", ip="10.1.0.3")]))
    assert agent.compiler.state.pods == before and agent._seq == seq

    nodes = NodeNetwork("node-1", tmp_path / "net.d", None, "/run/cni.sock", "/ep", 1500)
    node = {"metadata": {"name": "node-1"}, "spec": {"podCIDRs": ["10.244.1.0/24"]}}
    nodes.replace("nodes", [[node], [{"metadata": {"name": "node-2"}}]])
    with pytest.raises(ConnectionResetError):
        nodes.replace("nodes", failing([{"metadata": {"name": "node-3"}}]))
    assert set(nodes.nodes) == {"node-1", "node-2"}


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
