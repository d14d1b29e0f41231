"""np_agent.node.health: /healthz, /readyz, /metrics over a real socket on 127.0.0.1 (no root)."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from np_agent.node.engine import Metrics
from np_agent.node.health import CONTENT_TYPE, HealthServer, parse_address

README = Path(__file__).resolve().parent.parent / "README.md"


def fetch(server: HealthServer, path: str, method: str = "GET") -> tuple[int, str, str]:
    """(status, content type, body), HTTP errors included."""
    request = urllib.request.Request(server.url + path, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.headers["Content-Type"], err.read().decode()


@pytest.fixture
def state() -> dict[str, object]:
    return {"alive": True, "ready": (False, "first sync not applied yet")}


@pytest.fixture
def server(state: dict[str, object]) -> Iterator[HealthServer]:
    srv = HealthServer("127.0.0.1:0", registry=CollectorRegistry(), alive=lambda: state["alive"],
                       ready=lambda: state["ready"])  # type: ignore[arg-type,return-value]
    with srv.start():
        yield srv


def test_healthz(server: HealthServer, state: dict[str, object]) -> None:
    assert server.port > 0
    assert fetch(server, "/healthz") == (200, "text/plain; charset=utf-8", "ok")
    state["alive"] = False
    assert fetch(server, "/healthz")[:2] == (503, "text/plain; charset=utf-8")


def test_readyz_toggles_with_reason(server: HealthServer, state: dict[str, object]) -> None:
    assert fetch(server, "/readyz")[0::2] == (503, "first sync not applied yet")
    state["ready"] = True
    assert fetch(server, "/readyz")[0::2] == (200, "ok")
    state["ready"] = False
    assert fetch(server, "/readyz")[0::2] == (503, "not ready")


def test_failing_check_is_a_failure_with_its_text(server: HealthServer) -> None:
    def boom() -> bool:
        raise RuntimeError("netlink socket closed")

    server.ready = boom
    status, _, body = fetch(server, "/readyz?verbose=1")  # query strings are ignored
    assert status == 503 and "RuntimeError: netlink socket closed" in body


def test_unknown_path_is_404(server: HealthServer) -> None:
    assert fetch(server, "/nope") == (404, "text/plain; charset=utf-8", "not found: /nope\n")
    assert fetch(server, "/")[0] == 404


def test_head_answers_like_get_without_a_body(server: HealthServer) -> None:
    assert fetch(server, "/healthz", "HEAD") == (200, "text/plain; charset=utf-8", "")
    assert fetch(server, "/readyz", "HEAD")[0::2] == (503, "")
    assert fetch(server, "/metrics", "HEAD") == (200, CONTENT_TYPE, "")


def exercised_metrics(registry: CollectorRegistry) -> Metrics:
    """The agent's metrics with one sample in each, as the agent and the CNI server set them."""
    metrics = Metrics(registry)
    metrics.objects.labels("pods").set(3)
    metrics.events.labels("pods").inc()
    metrics.syncs.inc()
    metrics.errors.labels("sync").inc()
    metrics.elements.set(7)
    metrics.transaction.observe(0.003)
    metrics.cni.labels("ADD", "0").observe(0.02)
    metrics.event_to_kernel.observe(0.04)
    metrics.drift_checks.labels("unchanged").inc()
    metrics.sync_seconds.observe(0.01)
    metrics.last_sync.set_to_current_time()
    metrics.lists.labels("pods").inc()
    return metrics


# What README.md's "np-agent run" section lists: exposed name -> (type, labels).
README_METRICS = {
    "np_agent_objects": ("gauge", {"kind"}),
    "np_agent_watch_events_total": ("counter", {"kind"}),
    "np_agent_syncs_total": ("counter", set()),
    "np_agent_errors_total": ("counter", {"stage"}),
    "np_agent_set_elements": ("gauge", set()),
    "np_agent_drift_checks_total": ("counter", {"result"}),
    "np_agent_transaction_seconds": ("histogram", set()),
    "np_agent_cni_seconds": ("histogram", {"command", "code"}),
    "np_agent_event_to_kernel_seconds": ("histogram", set()),
    "np_agent_sync_seconds": ("histogram", set()),
    "np_agent_last_sync_timestamp_seconds": ("gauge", set()),
    "np_agent_lists_total": ("counter", {"kind"}),
    "np_agent_build_info": ("gauge", {"version", "python"}),  # an Info: a gauge of 1
}
# np_agent_denied_packets_total is read from the kernel by NodeAgent's own collector:
# tests/test_agent_e2e.py checks it on a running agent.


def test_metrics_exposition_has_every_readme_metric(server: HealthServer) -> None:
    exercised_metrics(server.registry)
    status, content_type, text = fetch(server, "/metrics")
    assert (status, content_type) == (200, CONTENT_TYPE)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    readme = README.read_text()
    for exposed, (kind, labels) in README_METRICS.items():
        assert exposed in readme
        family = families[exposed.removesuffix("_total")]  # the parser drops counters' _total
        assert family.type == kind, exposed
        assert family.samples, exposed
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == labels, sample
    # The CNI server's histogram, labelled by command and exit code.
    cni = families["np_agent_cni_seconds"]
    assert cni.type == "histogram"
    assert {(s.labels["command"], s.labels["code"]) for s in cni.samples} == {("ADD", "0")}
    # Exactly these series and no others (prometheus_client's `_created` ones are off).
    assert {s.name for f in families.values() for s in f.samples} == {
        "np_agent_objects", "np_agent_watch_events_total", "np_agent_syncs_total",
        "np_agent_errors_total", "np_agent_set_elements", "np_agent_drift_checks_total",
        "np_agent_last_sync_timestamp_seconds", "np_agent_lists_total", "np_agent_build_info",
        *(f"{h}_{suffix}" for h in ("np_agent_transaction_seconds", "np_agent_cni_seconds",
                                    "np_agent_event_to_kernel_seconds", "np_agent_sync_seconds")
          for suffix in ("bucket", "sum", "count"))}
    buckets = [s.labels["le"] for s in families["np_agent_transaction_seconds"].samples
               if s.name.endswith("_bucket")]
    assert buckets == ["0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25",
                       "0.5", "1.0", "2.5", "+Inf"]


def test_each_agent_has_its_own_registry() -> None:
    """Several agents in one process (the tests) must not collide in a shared registry."""
    first, second = exercised_metrics(CollectorRegistry()), exercised_metrics(CollectorRegistry())
    second.syncs.inc()
    assert first.registry.get_sample_value("np_agent_syncs_total") == 1
    assert second.registry.get_sample_value("np_agent_syncs_total") == 2


def test_address_parsing() -> None:
    assert parse_address("127.0.0.1:9090") == ("127.0.0.1", 9090)
    assert parse_address(":0") == ("", 0)
    assert parse_address("[::1]:8080") == ("::1", 8080)
    for bad in ("9090", "host:x", "::1:80", "h:70000"):
        with pytest.raises(ValueError, match="invalid listen address"):
            parse_address(bad)


def test_stop_releases_the_port() -> None:
    srv = HealthServer("127.0.0.1:0").start()
    url = srv.url
    srv.stop()
    srv.stop()  # idempotent
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url + "/healthz", timeout=2)
