"""The fake API server, driven by the REAL kubernetes client (no mocks).

Why: np-agent's watch tests trust this fake to behave like kube-apiserver on the wire.
These tests pin that down with the client np-agent uses: pagination, watch resume,
bookmarks, 410 Gone, timeouts, dropped connections, a vanishing server, silent streams.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import urllib3  # noqa: E402  (a dependency of kubernetes)
from kubernetes import client, config, watch  # noqa: E402
from kubernetes.client.rest import ApiException  # noqa: E402
from kubernetes.watch.watch import iter_resp_lines  # noqa: E402

from np_lab.fakeapi import FakeApiError, FakeApiServer  # noqa: E402


def pod(name: str, ns: str = "default", node: str = "node-1", **labels: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"nodeName": node},
        "status": {"podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}]},
    }


@pytest.fixture
def fake() -> Iterator[FakeApiServer]:
    with FakeApiServer(bookmark_interval=0.1) as server:
        yield server


@pytest.fixture
def api_client(fake: FakeApiServer) -> Iterator[Any]:
    ac = client.ApiClient(fake.client_configuration())
    yield ac
    ac.close()


@pytest.fixture
def core(api_client: Any) -> Any:
    return client.CoreV1Api(api_client)


@pytest.fixture
def net(api_client: Any) -> Any:
    return client.NetworkingV1Api(api_client)


def when_watching(fake: FakeApiServer, fn: Callable[[], None], n: int = 1) -> threading.Thread:
    """Run ``fn`` in a thread once ``n`` watches are open (the test thread is reading)."""

    def run() -> None:
        assert fake.wait_for_watches(n), "watch never opened"
        fn()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def raw_events(resp: Any) -> Iterator[dict[str, Any]]:
    for line in iter_resp_lines(resp):
        if line:
            yield json.loads(line)


# ----------------------------------------------------------------------------- lists


def test_list_pagination_is_a_consistent_snapshot(fake: FakeApiServer, core: Any) -> None:
    for i in range(5):
        fake.create("pods", pod(f"p{i}", ns="a" if i < 3 else "b"))
    first = core.list_pod_for_all_namespaces(limit=2)
    assert [p.metadata.name for p in first.items] == ["p0", "p1"]
    assert first.metadata.remaining_item_count == 3
    assert first.metadata.resource_version == str(fake.resource_version)

    # Changes after the first page do not leak into later pages (same snapshot) ...
    fake.create("pods", pod("p2b", ns="a"))
    fake.delete("pods", "b", "p4")
    names = [p.metadata.name for p in first.items]
    token = first.metadata.var_continue
    while token:
        page = core.list_pod_for_all_namespaces(limit=2, _continue=token)
        assert page.metadata.resource_version == first.metadata.resource_version
        names += [p.metadata.name for p in page.items]
        token = page.metadata.var_continue
    assert names == ["p0", "p1", "p2", "p3", "p4"]
    # ... and a fresh list sees them.
    names = [p.metadata.name for p in core.list_pod_for_all_namespaces().items]
    assert names == ["p0", "p1", "p2", "p2b", "p3"]
    assert [p.metadata.name for p in core.list_namespaced_pod("a", limit=10).items] == [
        "p0",
        "p1",
        "p2",
        "p2b",
    ]


def test_continue_token_older_than_compaction_is_410(fake: FakeApiServer, core: Any) -> None:
    for i in range(3):
        fake.create("pods", pod(f"p{i}"))
    first = core.list_namespaced_pod("default", limit=1)
    fake.create("pods", pod("late"))
    fake.compact()
    with pytest.raises(ApiException) as exc:
        core.list_namespaced_pod("default", limit=1, _continue=first.metadata.var_continue)
    assert exc.value.status == 410
    assert json.loads(exc.value.body)["reason"] == "Expired"


def test_list_kinds_get_and_field_selectors(fake: FakeApiServer, core: Any, net: Any) -> None:
    fake.create("namespaces", {"metadata": {"name": "x", "labels": {"team": "a"}}})
    fake.create("nodes", {"metadata": {"name": "node-1"}})
    fake.create("nodes", {"metadata": {"name": "node-2"}})
    fake.create("pods", pod("a", ns="x", node="node-1"))
    fake.create("pods", pod("b", ns="x", node="node-2"))
    fake.create(
        "networkpolicies",
        {"metadata": {"name": "deny", "namespace": "x"}, "spec": {"podSelector": {}}},
    )

    nps = net.list_network_policy_for_all_namespaces()
    assert [(p.metadata.namespace, p.metadata.name) for p in nps.items] == [("x", "deny")]
    assert nps.items[0].kind == "NetworkPolicy"
    assert net.read_namespaced_network_policy("deny", "x").metadata.generation == 1
    assert net.list_namespaced_network_policy("y").items == []

    nodes = core.list_node(field_selector="metadata.name=node-2").items
    assert [n.metadata.name for n in nodes] == ["node-2"]
    pods = core.list_pod_for_all_namespaces(field_selector="spec.nodeName=node-1").items
    assert [p.metadata.name for p in pods] == ["a"]
    assert core.list_namespace(label_selector="team in (a,b)").items[0].metadata.name == "x"
    assert core.list_namespace(label_selector="team!=a").items == []

    got = core.read_namespaced_pod("b", "x")
    assert got.spec.node_name == "node-2"
    assert got.status.pod_ips[0].ip == "10.0.0.1"
    assert core.read_namespace("x").metadata.uid
    with pytest.raises(ApiException) as exc:
        core.read_namespaced_pod("nope", "x")
    assert exc.value.status == 404
    with pytest.raises(ApiException) as exc:
        core.list_pod_for_all_namespaces(field_selector="spec.bogus=1")
    assert exc.value.status == 400


def test_test_side_api_sets_metadata(fake: FakeApiServer) -> None:
    rv0 = fake.resource_version
    created = fake.create("pods", {"metadata": {"name": "p"}})
    assert created["apiVersion"] == "v1" and created["kind"] == "Pod"
    assert created["metadata"]["namespace"] == "default"
    assert created["metadata"]["resourceVersion"] == str(rv0 + 1)
    assert created["metadata"]["uid"] and created["metadata"]["creationTimestamp"]
    with pytest.raises(FakeApiError) as exc:
        fake.create("pods", {"metadata": {"name": "p"}})
    assert exc.value.code == 409
    created["metadata"]["labels"] = {"app": "web"}
    updated = fake.update("pods", created)
    assert updated["metadata"]["uid"] == created["metadata"]["uid"]
    assert int(updated["metadata"]["resourceVersion"]) == rv0 + 2
    assert fake.get("pods", "default", "p")["metadata"]["labels"] == {"app": "web"}
    last = fake.delete("pods", "default", "p")
    assert int(last["metadata"]["resourceVersion"]) == rv0 + 3
    assert fake.get("pods", "default", "p") is None
    with pytest.raises(ValueError):
        FakeApiServer(host="0.0.0.0")


def test_http_writes(fake: FakeApiServer, core: Any) -> None:
    created = core.create_namespaced_pod(
        "default",
        {"metadata": {"name": "w"}, "spec": {"containers": [{"name": "c", "image": "i"}]}},
    )
    assert fake.get("pods", "default", "w")["metadata"]["uid"] == created.metadata.uid
    body = core.read_namespaced_pod("w", "default").to_dict()
    fake.update("pods", {**fake.get("pods", "default", "w"), "status": {"phase": "Running"}})
    with pytest.raises(ApiException) as exc:  # stale resourceVersion: optimistic concurrency
        core.replace_namespaced_pod("w", "default", body)
    assert exc.value.status == 409
    core.delete_namespaced_pod("w", "default")
    assert fake.get("pods", "default", "w") is None
    assert ("DELETE", "/api/v1/namespaces/default/pods/w") in fake.request_log


# ----------------------------------------------------------------------------- watches


def test_watch_from_list_rv_sees_changes_in_order(fake: FakeApiServer, core: Any) -> None:
    fake.create("pods", pod("before"))
    listed = core.list_pod_for_all_namespaces()

    def mutate() -> None:
        p = fake.create("pods", pod("p", app="web"))
        p["metadata"]["labels"]["app"] = "db"
        fake.update("pods", p)
        fake.delete("pods", "default", "p")

    when_watching(fake, mutate)
    w = watch.Watch()
    seen = []
    last_rv = int(listed.metadata.resource_version)
    for ev in w.stream(
        core.list_pod_for_all_namespaces,
        resource_version=listed.metadata.resource_version,
        timeout_seconds=10,
    ):
        obj = ev["object"]
        seen.append((ev["type"], obj.metadata.name, obj.metadata.labels["app"]))
        assert int(obj.metadata.resource_version) > last_rv
        last_rv = int(obj.metadata.resource_version)
        if len(seen) == 3:
            w.stop()
    assert seen == [("ADDED", "p", "web"), ("MODIFIED", "p", "db"), ("DELETED", "p", "db")]
    # The DELETED event carried the last state with a NEW resourceVersion.
    assert int(w.resource_version) == fake.resource_version
    assert fake.wait_for_watches(0)


def test_watch_resume_replays_history_with_increasing_rvs(fake: FakeApiServer, core: Any) -> None:
    rv = fake.resource_version
    for i in range(3):
        fake.create("pods", pod(f"p{i}"))
    fake.create("namespaces", {"metadata": {"name": "other-kind"}})  # not in a pod watch
    fake.delete("pods", "default", "p1")
    resp = core.list_pod_for_all_namespaces(
        watch=True, resource_version=str(rv), timeout_seconds=1, _preload_content=False
    )
    events = list(raw_events(resp))
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "p0"),
        ("ADDED", "p1"),
        ("ADDED", "p2"),
        ("DELETED", "p1"),
    ]
    rvs = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
    assert rvs == sorted(rvs) and len(set(rvs)) == 4


def test_watch_without_rv_starts_with_current_state(fake: FakeApiServer, core: Any) -> None:
    fake.create("nodes", {"metadata": {"name": "node-1"}})
    fake.create("nodes", {"metadata": {"name": "node-2"}})
    when_watching(fake, lambda: fake.delete("nodes", "", "node-2"))
    w = watch.Watch()
    seen = []
    for ev in w.stream(core.list_node, field_selector="metadata.name=node-2", timeout_seconds=10):
        seen.append((ev["type"], ev["object"].metadata.name))
        if ev["type"] == "DELETED":
            w.stop()
    assert seen == [("ADDED", "node-2"), ("DELETED", "node-2")]


def test_watch_selector_transitions(fake: FakeApiServer, net: Any) -> None:
    np = {"metadata": {"name": "p", "namespace": "x", "labels": {"on": "yes"}}, "spec": {}}
    fake.create("networkpolicies", np)
    rv = str(fake.resource_version)

    def mutate() -> None:
        cur = fake.get("networkpolicies", "x", "p")
        cur["metadata"]["labels"] = {"on": "no"}
        fake.update("networkpolicies", cur)
        cur["metadata"]["labels"] = {"on": "yes"}
        fake.update("networkpolicies", cur)

    when_watching(fake, mutate)
    w = watch.Watch()
    seen = []
    for ev in w.stream(
        net.list_namespaced_network_policy,
        "x",
        label_selector="on=yes",
        resource_version=rv,
        timeout_seconds=10,
    ):
        seen.append(ev["type"])
        if len(seen) == 2:
            w.stop()
    assert seen == ["DELETED", "ADDED"]


def test_bookmarks(fake: FakeApiServer, core: Any) -> None:
    fake.create("namespaces", {"metadata": {"name": "a"}})
    rv = str(fake.resource_version)
    resp = core.list_namespace(
        watch=True,
        resource_version=rv,
        allow_watch_bookmarks=True,
        timeout_seconds=1,
        _preload_content=False,
    )
    start = time.monotonic()
    events = list(raw_events(resp))
    assert 0.9 < time.monotonic() - start < 3
    assert len(events) >= 3 and {e["type"] for e in events} == {"BOOKMARK"}
    bm = events[-1]["object"]  # one right before the timeout close
    assert bm == {"kind": "Namespace", "apiVersion": "v1", "metadata": {"resourceVersion": rv}}

    # Through Watch.stream: the bookmark advances the client's resume point.
    when_watching(fake, lambda: fake.create("nodes", {"metadata": {"name": "n"}}))
    w = watch.Watch()
    for ev in w.stream(
        core.list_namespace, resource_version=rv, allow_watch_bookmarks=True, timeout_seconds=10
    ):
        if ev["type"] == "BOOKMARK" and int(w.resource_version) > int(rv):
            w.stop()
    assert int(w.resource_version) == fake.resource_version


def test_no_bookmarks_unless_asked(fake: FakeApiServer, core: Any) -> None:
    resp = core.list_namespace(
        watch=True, resource_version="1", timeout_seconds=1, _preload_content=False
    )
    assert list(raw_events(resp)) == []


def test_watch_from_compacted_rv_gets_410(fake: FakeApiServer, core: Any) -> None:
    fake.create("pods", pod("a"))
    old = str(fake.resource_version)
    fake.create("pods", pod("b"))
    fake.compact()

    # Raw: an ERROR event carrying a 410 Status, then the stream ends.
    resp = core.list_pod_for_all_namespaces(
        watch=True, resource_version=old, _preload_content=False
    )
    assert resp.status == 200
    events = list(raw_events(resp))
    assert len(events) == 1 and events[0]["type"] == "ERROR"
    status = events[0]["object"]
    assert status["code"] == 410 and status["reason"] == "Expired"
    assert status["message"].startswith(f"too old resource version: {old} (")

    # Watch.stream retries once, then raises ApiException(410).
    with pytest.raises(ApiException) as exc:
        list(watch.Watch().stream(core.list_pod_for_all_namespaces, resource_version=old))
    assert exc.value.status == 410
    assert sum(1 for m, p in fake.request_log if "watch=true" in p) == 3

    # The other flavour: HTTP 410 on the request itself.
    fake.expired_watch_mode = "http"
    with pytest.raises(ApiException) as exc:
        list(watch.Watch().stream(core.list_pod_for_all_namespaces, resource_version=old))
    assert exc.value.status == 410

    # The current rv is not "too old": a fresh watch from it works.
    fresh = core.list_pod_for_all_namespaces(
        watch=True,
        resource_version=str(fake.resource_version),
        timeout_seconds=1,
        _preload_content=False,
    )
    assert list(raw_events(fresh)) == []


def test_bounded_history_expires_old_rvs(core: Any) -> None:
    with FakeApiServer(history_size=3) as small:
        c = client.CoreV1Api(client.ApiClient(small.client_configuration()))
        rv = str(small.resource_version)
        for i in range(5):
            small.create("namespaces", {"metadata": {"name": f"n{i}"}})
        with pytest.raises(ApiException) as exc:
            list(watch.Watch().stream(c.list_namespace, resource_version=rv, timeout_seconds=5))
        assert exc.value.status == 410
        recent = str(small.resource_version - 3)
        resp = c.list_namespace(
            watch=True, resource_version=recent, timeout_seconds=1, _preload_content=False
        )
        assert [e["object"]["metadata"]["name"] for e in raw_events(resp)] == ["n2", "n3", "n4"]


def test_open_watch_survives_compaction(fake: FakeApiServer, core: Any) -> None:
    def mutate() -> None:
        fake.compact()
        fake.create("namespaces", {"metadata": {"name": "after"}})

    when_watching(fake, mutate)
    w = watch.Watch()
    rv = str(fake.resource_version)
    for ev in w.stream(core.list_namespace, resource_version=rv, timeout_seconds=10):
        assert (ev["type"], ev["object"].metadata.name) == ("ADDED", "after")
        w.stop()


def test_timeout_seconds_ends_stream(fake: FakeApiServer, core: Any) -> None:
    start = time.monotonic()
    events = list(watch.Watch().stream(core.list_pod_for_all_namespaces, timeout_seconds=1))
    assert events == []
    assert 0.9 < time.monotonic() - start < 3
    assert fake.wait_for_watches(0)


def test_drop_watches_ends_streams_abruptly(fake: FakeApiServer, core: Any) -> None:
    dropped: list[int] = []
    when_watching(fake, lambda: dropped.append(fake.drop_watches()), n=2)
    errors: list[BaseException] = []

    def read() -> None:
        resp = core.list_namespace(watch=True, resource_version="1", _preload_content=False)
        try:
            list(raw_events(resp))
        except urllib3.exceptions.ProtocolError as e:  # no final chunk: premature end
            errors.append(e)

    readers = [threading.Thread(target=read) for _ in range(2)]
    for t in readers:
        t.start()
    for t in readers:
        t.join(5)
    assert dropped == [2]
    assert len(errors) == 2
    assert fake.wait_for_watches(0)
    # The server itself is fine.
    assert core.list_namespace().items == []


def test_go_away_and_come_back(fake: FakeApiServer, core: Any) -> None:
    fake.create("namespaces", {"metadata": {"name": "kept"}})
    port, rv = fake.port, fake.resource_version
    ended: list[str] = []

    def read() -> None:
        resp = core.list_namespace(watch=True, resource_version=str(rv), _preload_content=False)
        try:
            list(raw_events(resp))
            ended.append("clean")
        except urllib3.exceptions.ProtocolError:
            ended.append("dropped")

    reader = threading.Thread(target=read)
    reader.start()
    assert fake.wait_for_watches(1)
    fake.go_away()
    reader.join(5)
    assert ended == ["dropped"]
    assert fake.watch_count() == 0

    cfg = fake.client_configuration()
    cfg.retries = 0
    offline = client.CoreV1Api(client.ApiClient(cfg))
    with pytest.raises(urllib3.exceptions.HTTPError) as exc:
        offline.list_namespace(_request_timeout=(1, 1))
    assert "refused" in str(exc.value).lower()

    fake.create("namespaces", {"metadata": {"name": "made-while-away"}})
    fake.come_back()
    assert fake.port == port
    names = [n.metadata.name for n in core.list_namespace().items]
    assert names == ["kept", "made-while-away"]
    assert core.list_namespace().metadata.resource_version == str(rv + 1)


def test_silent_watch_trips_client_read_timeout(fake: FakeApiServer, core: Any) -> None:
    rv = str(fake.resource_version)
    fake.silent_watches(True)
    fake.create("namespaces", {"metadata": {"name": "unseen"}})
    start = time.monotonic()
    with pytest.raises(urllib3.exceptions.ReadTimeoutError):
        for _ in watch.Watch().stream(
            core.list_namespace,
            resource_version=rv,
            allow_watch_bookmarks=True,
            timeout_seconds=1,  # a silent server ignores this too
            _request_timeout=(1, 0.5),
        ):
            pytest.fail("a silent watch delivered an event")
    assert time.monotonic() - start < 2
    assert fake.wait_for_watches(0)  # the server notices the client hung up

    fake.silent_watches(False)
    events = list(watch.Watch().stream(core.list_namespace, resource_version=rv, timeout_seconds=1))
    assert [e["object"].metadata.name for e in events] == ["unseen"]


def test_kubeconfig_and_stop_closes_watches(tmp_path: Any) -> None:
    fake = FakeApiServer().start()
    path = fake.kubeconfig(tmp_path / "kubeconfig")
    config.load_kube_config(config_file=path)
    try:
        api = client.CoreV1Api()
        fake.create("namespaces", {"metadata": {"name": "kc"}})
        assert [n.metadata.name for n in api.list_namespace().items] == ["kc"]
        resp = api.list_namespace(watch=True, resource_version="1", _preload_content=False)
        assert fake.wait_for_watches(1)
        start = time.monotonic()
        fake.stop()
        assert time.monotonic() - start < 2
        assert fake.watch_count() == 0
        with pytest.raises(urllib3.exceptions.ProtocolError):
            list(raw_events(resp))
    finally:
        fake.stop()
        client.Configuration.set_default(None)
