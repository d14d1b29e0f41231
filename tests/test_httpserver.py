"""np_agent.node.health: /healthz, /readyz, /metrics over a real socket on 127.0.0.1 (no root)."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from np_agent.node.health import (
    CONTENT_TYPE,
    Counter,
    HealthServer,
    Registry,
    format_value,
    parse_address,
)


def fetch(server: HealthServer, path: str) -> tuple[int, str, str]:
    """(status, content type, body), HTTP errors included."""
    try:
        with urllib.request.urlopen(server.url + path, timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.headers["Content-Type"], err.read().decode()


@pytest.fixture
def state() -> dict[str, object]:
    return {"alive": True, "ready": (False, "first sync not applied yet")}


@pytest.fixture
def server(state: dict[str, object]) -> Iterator[HealthServer]:
    registry = Registry()
    srv = HealthServer("127.0.0.1:0", registry=registry, alive=lambda: state["alive"],
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
    assert fetch(server, "/nope")[0] == 404
    assert fetch(server, "/")[0] == 404


def test_metrics_exposition(server: HealthServer) -> None:
    reg = server.registry
    syncs = reg.counter("npnft_syncs", "Transactions applied.", ["result"])
    syncs.labels(result="ok").inc()
    syncs.labels("ok").inc(2)
    syncs.labels(result='err"or\n').inc()
    pods = reg.gauge("npnft_pods", "Pods wired on this node.")
    pods.set(5)
    pods.dec()
    reg.gauge("npnft_set_elements", "Elements per set.", ["set"],
              callback=lambda: {("ingress-allow-v4",): 12, ("egress-allow-v4",): 3})
    hist = reg.histogram("npnft_sync_seconds", "Sync duration.\nSeconds.", buckets=(0.1, 1, 0.5))
    for value in (0.05, 0.1, 0.7, 3):
        hist.observe(value)
    lat = reg.histogram("npnft_cni_seconds", "CNI request duration.", ["command"], buckets=(1,))
    lat.labels(command="ADD").observe(0.5)

    status, content_type, text = fetch(server, "/metrics")
    assert (status, content_type) == (200, CONTENT_TYPE)
    assert text == """\
# HELP npnft_syncs_total Transactions applied.
# TYPE npnft_syncs_total counter
npnft_syncs_total{result="err\\"or\\n"} 1.0
npnft_syncs_total{result="ok"} 3.0
# HELP npnft_pods Pods wired on this node.
# TYPE npnft_pods gauge
npnft_pods 4.0
# HELP npnft_set_elements Elements per set.
# TYPE npnft_set_elements gauge
npnft_set_elements{set="egress-allow-v4"} 3.0
npnft_set_elements{set="ingress-allow-v4"} 12.0
# HELP npnft_sync_seconds Sync duration.\\nSeconds.
# TYPE npnft_sync_seconds histogram
npnft_sync_seconds_bucket{le="0.1"} 2.0
npnft_sync_seconds_bucket{le="0.5"} 2.0
npnft_sync_seconds_bucket{le="1.0"} 3.0
npnft_sync_seconds_bucket{le="+Inf"} 4.0
npnft_sync_seconds_sum 3.85
npnft_sync_seconds_count 4.0
# HELP npnft_cni_seconds CNI request duration.
# TYPE npnft_cni_seconds histogram
npnft_cni_seconds_bucket{command="ADD",le="1.0"} 1.0
npnft_cni_seconds_bucket{command="ADD",le="+Inf"} 1.0
npnft_cni_seconds_sum{command="ADD"} 0.5
npnft_cni_seconds_count{command="ADD"} 1.0
"""
    _check_parses(text)


def _check_parses(text: str) -> None:
    """Every sample line is `name{labels} value` with a float value; TYPE precedes samples."""
    typed: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
        elif not line.startswith("#"):
            name_labels, value = line.rsplit(" ", 1)
            float(value.replace("Inf", "inf"))
            name = name_labels.split("{", 1)[0]
            assert any(name == t or name.startswith(t + "_") for t in typed), line


def test_unlabelled_counter_starts_at_zero_and_total_suffix_not_doubled() -> None:
    reg = Registry()
    reg.counter("npnft_errors_total", "Errors.")
    assert "npnft_errors_total 0.0\n" in reg.render()
    with pytest.raises(ValueError, match="already registered"):
        reg.counter("npnft_errors", "Again.")


def test_metric_misuse_is_rejected() -> None:
    counter = Counter("c", "C.", ["a"])
    with pytest.raises(ValueError, match="use .labels"):
        counter.inc()
    with pytest.raises(ValueError, match="do not match"):
        counter.labels(b="x")
    with pytest.raises(ValueError, match="cannot decrease"):
        counter.labels("x").inc(-1)
    with pytest.raises(ValueError, match="invalid metric name"):
        Counter("bad-name", "x")
    with pytest.raises(ValueError, match="invalid label name"):
        Counter("c", "x", ["le"])
    gauge = Registry().gauge("g", "G.", callback=lambda: 1.0)
    with pytest.raises(ValueError, match="callback"):
        gauge.set(2)


def test_failing_gauge_callback_does_not_break_the_scrape() -> None:
    reg = Registry()
    reg.gauge("broken", "Fails.", callback=lambda: 1 / 0)
    reg.gauge("fine", "Works.").set(1)
    assert reg.render() == ("# HELP broken Fails.\n# TYPE broken gauge\n"
                            "# HELP fine Works.\n# TYPE fine gauge\nfine 1.0\n")


def test_concurrent_updates_are_not_lost() -> None:
    reg = Registry()
    counter = reg.counter("hits", "Hits.", ["t"])
    hist = reg.histogram("lat", "Latency.", buckets=(1,))

    def work() -> None:
        for _ in range(2000):
            counter.labels("x").inc()
            hist.observe(0.5)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counter.value("x") == 16000
    assert 'lat_bucket{le="1.0"} 16000.0\n' in reg.render()


def test_format_and_address_parsing() -> None:
    assert [format_value(v) for v in (1, 0.25, float("inf"), float("nan"))] == [
        "1.0", "0.25", "+Inf", "NaN"]
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
