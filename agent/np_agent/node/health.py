"""Health, readiness and Prometheus metrics over HTTP, with the standard library only.

The agent runs as a DaemonSet: the kubelet needs ``/healthz`` (liveness: is the main loop
still turning?) and ``/readyz`` (readiness: has the first ruleset reached the kernel?), and
operators want ``/metrics``. ``prometheus_client`` would be one more dependency on a node
component for three metric types, so this module carries a small registry that renders the
Prometheus text exposition format 0.0.4 itself.

Everything here is thread-safe: metrics are updated from the agent's threads while the
server's threads render them.
"""

from __future__ import annotations

import bisect
import logging
import math
import re
import socket
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger("np_agent.http")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
POLL_INTERVAL = 0.1  # seconds; how long stop() may wait for the serving thread
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0)

_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

LabelValues = tuple[str, ...]


# ----------------------------------------------------------------------
# Text format helpers
# ----------------------------------------------------------------------


def format_value(value: float) -> str:
    """A sample value as Prometheus writes it: Go float syntax, ``+Inf``, ``NaN``."""
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels_text(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    pairs = ",".join(f'{n}="{_escape_label(v)}"' for n, v in zip(names, values, strict=True))
    return "{" + pairs + "}"


# ----------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------


class Metric:
    """Common part: name, help, label names, and one value slot per label combination."""

    kind = "untyped"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        if not _METRIC_NAME.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        for label in labelnames:
            if not _LABEL_NAME.match(label) or label.startswith("__") or label == "le":
                raise ValueError(f"invalid label name {label!r} for metric {name}")
        if len(set(labelnames)) != len(labelnames):
            raise ValueError(f"duplicate label names for metric {name}: {labelnames}")
        self.name = name
        self.documentation = documentation
        self.labelnames: tuple[str, ...] = tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> LabelValues:
        """Label values in declaration order, from positional or keyword arguments."""
        if args and kwargs:
            raise ValueError(f"{self.name}: pass label values by position or by name, not both")
        if kwargs:
            if set(kwargs) != set(self.labelnames):
                raise ValueError(f"{self.name}: labels {sorted(kwargs)} do not match "
                                 f"{list(self.labelnames)}")
            args = [kwargs[name] for name in self.labelnames]
        if len(args) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {list(self.labelnames)}, "
                             f"got {len(args)} values")
        return tuple(str(v) for v in args)

    def _check_unlabelled(self) -> None:
        if self.labelnames:
            raise ValueError(f"{self.name} has labels {list(self.labelnames)}: use .labels()")

    def exposed_name(self) -> str:
        """The name in # HELP / # TYPE lines (counters add ``_total``)."""
        return self.name

    def samples(self) -> list[tuple[str, str, float]]:
        """(sample name, labels text, value) per line; subclasses implement."""
        raise NotImplementedError

    def render(self) -> str:
        name = self.exposed_name()
        lines = [f"# HELP {name} {_escape_help(self.documentation)}", f"# TYPE {name} {self.kind}"]
        lines += [f"{sample}{labels} {format_value(value)}"
                  for sample, labels, value in self.samples()]
        return "\n".join(lines) + "\n"


class CounterChild:
    """A counter bound to one set of label values (what ``Counter.labels()`` returns)."""

    def __init__(self, metric: Counter, key: LabelValues) -> None:
        self._metric, self._key = metric, key

    def inc(self, amount: float = 1.0) -> None:
        self._metric._inc(self._key, amount)


class GaugeChild:
    """A gauge bound to one set of label values."""

    def __init__(self, metric: Gauge, key: LabelValues) -> None:
        self._metric, self._key = metric, key

    def set(self, value: float) -> None:
        self._metric._set(self._key, value)

    def inc(self, amount: float = 1.0) -> None:
        self._metric._inc(self._key, amount)

    def dec(self, amount: float = 1.0) -> None:
        self._metric._inc(self._key, -amount)


class HistogramChild:
    """A histogram bound to one set of label values."""

    def __init__(self, metric: Histogram, key: LabelValues) -> None:
        self._metric, self._key = metric, key

    def observe(self, value: float) -> None:
        self._metric._observe(self._key, value)


class Counter(Metric):
    """A value that only goes up (events, packets, errors); exposed as ``<name>_total``."""

    kind = "counter"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name.removesuffix("_total"), documentation, labelnames)
        self._values: dict[LabelValues, float] = {} if labelnames else {(): 0.0}

    def labels(self, *values: Any, **named: Any) -> CounterChild:
        """The counter for these label values, by position or by name."""
        return CounterChild(self, self._key(values, named))

    def inc(self, amount: float = 1.0) -> None:
        self._check_unlabelled()
        self._inc((), amount)

    def _inc(self, key: LabelValues, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: counters cannot decrease (inc by {amount})")
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, *values: Any, **named: Any) -> float:
        with self._lock:
            return self._values.get(self._key(values, named), 0.0)

    def exposed_name(self) -> str:
        return f"{self.name}_total"

    def samples(self) -> list[tuple[str, str, float]]:
        with self._lock:
            items = sorted(self._values.items())
        return [(self.exposed_name(), _labels_text(self.labelnames, k), v) for k, v in items]


GaugeCallback = Callable[[], float | Mapping[LabelValues, float]]


class Gauge(Metric):
    """A value that goes up and down; either set by the agent or read from ``callback``.

    A callback is read at scrape time (sizes of things the agent already holds, no second
    copy to keep in step). Without labels it returns a number; with labels a mapping from
    label-value tuples to numbers. A failing callback loses its samples, not the scrape.
    """

    kind = "gauge"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                 callback: GaugeCallback | None = None) -> None:
        super().__init__(name, documentation, labelnames)
        self._callback = callback
        self._values: dict[LabelValues, float] = {} if labelnames else {(): 0.0}

    def labels(self, *values: Any, **named: Any) -> GaugeChild:
        """The gauge for these label values (not for callback gauges)."""
        if self._callback is not None:
            raise ValueError(f"{self.name} is read from a callback and cannot be set")
        return GaugeChild(self, self._key(values, named))

    def set(self, value: float) -> None:
        self._check_settable()
        self._set((), value)

    def inc(self, amount: float = 1.0) -> None:
        self._check_settable()
        self._inc((), amount)

    def dec(self, amount: float = 1.0) -> None:
        self._check_settable()
        self._inc((), -amount)

    def _check_settable(self) -> None:
        self._check_unlabelled()
        if self._callback is not None:
            raise ValueError(f"{self.name} is read from a callback and cannot be set")

    def _set(self, key: LabelValues, value: float) -> None:
        with self._lock:
            self._values[key] = float(value)

    def _inc(self, key: LabelValues, amount: float = 1.0) -> None:
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, *values: Any, **named: Any) -> float:
        with self._lock:
            return self._values.get(self._key(values, named), 0.0)

    def _current(self) -> list[tuple[LabelValues, float]]:
        if self._callback is None:
            with self._lock:
                return sorted(self._values.items())
        try:
            result = self._callback()
        except Exception:
            log.exception("gauge %s: callback failed", self.name)
            return []
        if isinstance(result, Mapping):
            return sorted((self._key(k, {}), float(v)) for k, v in result.items())
        return [((), float(result))]

    def samples(self) -> list[tuple[str, str, float]]:
        return [(self.name, _labels_text(self.labelnames, k), v) for k, v in self._current()]


class Histogram(Metric):
    """Distribution of observations (durations in seconds) in fixed cumulative buckets."""

    kind = "histogram"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                 buckets: Iterable[float] = DEFAULT_BUCKETS) -> None:
        super().__init__(name, documentation, labelnames)
        bounds = sorted({float(b) for b in buckets if not math.isinf(b)})
        if not bounds:
            raise ValueError(f"{name}: at least one finite bucket bound is needed")
        self.buckets: tuple[float, ...] = (*bounds, math.inf)
        # per label values: (count per bucket, non-cumulative; sum)
        self._data: dict[LabelValues, tuple[list[int], float]] = {}
        if not labelnames:
            self._data[()] = ([0] * len(self.buckets), 0.0)

    def labels(self, *values: Any, **named: Any) -> HistogramChild:
        """The histogram for these label values."""
        return HistogramChild(self, self._key(values, named))

    def observe(self, value: float) -> None:
        self._check_unlabelled()
        self._observe((), value)

    def _observe(self, key: LabelValues, value: float) -> None:
        if math.isnan(value):
            raise ValueError(f"{self.name}: cannot observe NaN")
        index = bisect.bisect_left(self.buckets, value)  # first bound >= value: le semantics
        with self._lock:
            counts, total = self._data.get(key) or ([0] * len(self.buckets), 0.0)
            counts[index] += 1
            self._data[key] = (counts, total + value)

    def samples(self) -> list[tuple[str, str, float]]:
        with self._lock:
            items = sorted((k, (list(c), s)) for k, (c, s) in self._data.items())
        out: list[tuple[str, str, float]] = []
        names = (*self.labelnames, "le")
        for key, (counts, total) in items:
            running = 0
            for bound, count in zip(self.buckets, counts, strict=True):
                running += count
                labels = _labels_text(names, (*key, format_value(bound)))
                out.append((f"{self.name}_bucket", labels, running))
            plain = _labels_text(self.labelnames, key)
            out += [(f"{self.name}_sum", plain, total), (f"{self.name}_count", plain, running)]
        return out


class Registry:
    """The metrics one process exposes, rendered in registration order."""

    def __init__(self) -> None:
        self._metrics: dict[str, Metric] = {}
        self._lock = threading.Lock()

    def register(self, metric: Metric) -> Metric:
        with self._lock:
            name = metric.exposed_name()
            if name in self._metrics:
                raise ValueError(f"metric {name} is already registered")
            self._metrics[name] = metric
        return metric

    def counter(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Counter:
        metric = Counter(name, documentation, labelnames)
        self.register(metric)
        return metric

    def gauge(self, name: str, documentation: str, labelnames: Sequence[str] = (),
              callback: GaugeCallback | None = None) -> Gauge:
        metric = Gauge(name, documentation, labelnames, callback)
        self.register(metric)
        return metric

    def histogram(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                  buckets: Iterable[float] = DEFAULT_BUCKETS) -> Histogram:
        metric = Histogram(name, documentation, labelnames, buckets)
        self.register(metric)
        return metric

    def render(self) -> str:
        """The whole exposition, in text format 0.0.4."""
        with self._lock:
            metrics = list(self._metrics.values())
        return "".join(metric.render() for metric in metrics)


# ----------------------------------------------------------------------
# HTTP server
# ----------------------------------------------------------------------

# ready() may answer a bare bool or (ready, reason) so /readyz can say what is missing.
ReadyCheck = Callable[[], bool | tuple[bool, str]]


def parse_address(address: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``:port`` (all interfaces) -> (host, port)."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"invalid listen address {address!r}: expected host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"invalid listen address {address!r}: write IPv6 hosts as [addr]:port")
    return host, int(port_text)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], family: int, owner: HealthServer) -> None:
        self.address_family = family
        self.owner = owner
        super().__init__(addr, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 10  # a stuck client must not hold a thread forever
    server_version = "np-agent"

    def do_GET(self) -> None:
        self._respond(head=False)

    def do_HEAD(self) -> None:
        self._respond(head=True)

    def _respond(self, head: bool) -> None:
        status, content_type, body = self.server.owner.handle(self.path.split("?", 1)[0])
        data = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class HealthServer:
    """``/healthz``, ``/readyz`` and ``/metrics`` on one address, served from daemon threads.

    ``alive()`` should report whether the agent's main loop is still making progress (the
    kubelet restarts the pod when it is not); ``ready()`` whether the node enforces policy
    yet. Both run on each request, so they must be cheap and must not block.
    """

    def __init__(self, address: str, *, registry: Registry | None = None,
                 alive: Callable[[], bool] = lambda: True,
                 ready: ReadyCheck = lambda: True) -> None:
        self.host, self.requested_port = parse_address(address)
        self.registry = registry if registry is not None else Registry()
        self.alive = alive
        self.ready = ready
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> HealthServer:
        """Bind and serve in a daemon thread; returns self (for ``with ... .start()``)."""
        if self._server is not None:
            raise RuntimeError("server already started")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._server = _Server((self.host, self.requested_port), family, self)
        # A short poll interval keeps stop() (agent shutdown, tests) quick.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(POLL_INTERVAL,),
                                        name="np-agent-http", daemon=True)
        self._thread.start()
        log.info("serving /healthz /readyz /metrics on %s:%d", self.host or "*", self.port)
        return self

    @property
    def port(self) -> int:
        """The bound port (the real one when 0 was asked for)."""
        if self._server is None:
            raise RuntimeError("server not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = self.host or "127.0.0.1"
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def stop(self) -> None:
        """Stop serving and close the socket; safe to call twice."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> HealthServer:
        return self if self._server is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- request handling (also callable without a socket) -------------

    def handle(self, path: str) -> tuple[int, str, str]:
        """(status, content type, body) for ``path``."""
        if path == "/healthz":
            ok, reason = _check(self.alive, "main loop stalled")
            return (200 if ok else 503), "text/plain; charset=utf-8", ("ok" if ok else reason)
        if path == "/readyz":
            ok, reason = _check(self.ready, "not ready")
            return (200 if ok else 503), "text/plain; charset=utf-8", ("ok" if ok else reason)
        if path == "/metrics":
            return 200, CONTENT_TYPE, self.registry.render()
        return 404, "text/plain; charset=utf-8", f"not found: {path}\n"


def _check(probe: Callable[[], Any], default_reason: str) -> tuple[bool, str]:
    """Run a health callable; an exception is a failure whose text is the reason."""
    try:
        result = probe()
    except Exception as exc:
        log.exception("health check failed")
        return False, f"{default_reason}: {type(exc).__name__}: {exc}"
    if isinstance(result, tuple):
        ok, reason = result
        return bool(ok), str(reason) or default_reason
    return bool(result), default_reason
