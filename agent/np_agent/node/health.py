"""Health, readiness and Prometheus metrics over HTTP.

The agent runs as a DaemonSet: the kubelet needs ``/healthz`` (liveness: is the main loop
still turning?) and ``/readyz`` (readiness: has the first ruleset reached the kernel?), and
operators want ``/metrics``. The metrics are ``prometheus_client``'s, kept in a
``CollectorRegistry`` the agent owns (not the process-wide default registry: tests run several
agents in one process) and rendered by its ``generate_latest``. The two probes are not
metrics, so a small standard-library server answers them itself and hands ``/metrics`` over.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, disable_created_metrics, generate_latest

log = logging.getLogger("np_agent.http")

# generate_latest() writes the text format 0.0.4 for names like ours; say so, as this server
# always has and as prometheus_client's own handler does when a scraper asks for nothing else
# (its CONTENT_TYPE_LATEST became "version=1.0.0" in 0.23, which older Prometheus servers
# do not know).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TEXT = "text/plain; charset=utf-8"
POLL_INTERVAL = 0.1  # seconds; how long stop() may wait for the serving thread

# prometheus_client adds a `<name>_created` series to every counter and histogram: series the
# agent never exposed and no one asked for. The switch is process-wide; one agent per process.
disable_created_metrics()

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
    daemon_threads = True  # a scrape in progress must not keep the agent from exiting
    allow_reuse_address = True  # a restarted agent rebinds at once, despite TIME_WAIT

    def __init__(self, addr: tuple[str, int], family: int, owner: HealthServer) -> None:
        self.address_family = family  # set before binding: "[::1]:9490" needs AF_INET6
        self.owner = owner
        super().__init__(addr, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 10  # a stuck client must not hold a thread forever
    server_version = "np-agent"

    def do_GET(self) -> None:
        self._respond(head=False)

    def do_HEAD(self) -> None:  # same status and headers as GET, no body
        self._respond(head=True)

    def _respond(self, head: bool) -> None:
        status, content_type, body = self.server.owner.handle(self.path.split("?", 1)[0])
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # not on stderr: probes are chatty
        log.debug("%s %s", self.address_string(), format % args)


class HealthServer:
    """``/healthz``, ``/readyz`` and ``/metrics`` on one address, served from daemon threads.

    ``alive()`` should report whether the agent's main loop is still making progress (the
    kubelet restarts the pod when it is not); ``ready()`` whether the node enforces policy
    yet. Both run on each request, so they must be cheap and must not block.
    """

    def __init__(self, address: str, *, registry: CollectorRegistry | None = None,
                 alive: Callable[[], bool] = lambda: True,
                 ready: ReadyCheck = lambda: True) -> None:
        self.host, self.requested_port = parse_address(address)
        self.registry = registry if registry is not None else CollectorRegistry()
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

    def handle(self, path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for ``path``; also callable without a socket."""
        if path == "/healthz":
            ok, reason = _check(self.alive, "main loop stalled")
        elif path == "/readyz":
            ok, reason = _check(self.ready, "not ready")
        elif path == "/metrics":
            return 200, CONTENT_TYPE, generate_latest(self.registry)
        else:
            return 404, TEXT, f"not found: {path}\n".encode()
        return (200 if ok else 503), TEXT, ("ok" if ok else reason).encode()


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
