"""Per-namespace serve/probe daemon for the netns lab.

One ``podd`` process runs inside each lab network namespace (started with
``ip netns exec``).  Starting a process per probe would make reachability
matrices slow, so the test process instead talks to a long-lived daemon over
a Unix control socket: filesystem sockets are reachable across network
namespaces, while the daemon's TCP/UDP sockets live in the pod's netns.

Protocol: the client sends one JSON object per line and receives one JSON
object per line.  Every reply has ``"ok"``; request-level failures (unknown
op, missing field, unexpected exception) also carry ``"bad_request": true``
so the client can tell "the probe failed" from "the request was wrong".

Ops:
  ping                                  readiness check
  serve {proto, port, family}           listen (tcp: answer every read with
                                        b"ok"; udp: echo datagrams)
  probe {proto, host, port, timeout, src?}
  probe_many {probes: [probe, ...]}     concurrent probes, list of results
  connect_hold {host, port, id, timeout, src?}
  hold_send {id, timeout}               send a byte on a held connection
  hold_close {id}
  seen {clear?}                         peers our servers got traffic from
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import struct
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

# Not exported by the Python 3.11 socket module; value from <linux/in.h>.
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
# Values from <linux/in.h> / <linux/in6.h>; Python 3.11 lacks IPV6_TRANSPARENT.
IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT = getattr(socket, "IPV6_TRANSPARENT", 75)
MAX_SEEN = 10000
TCP_REPLY = b"ok"
MAX_PROBE_THREADS = 64
WATCHDOG_INTERVAL = 0.5

Reply = dict[str, Any]


class BadRequest(Exception):
    """The request itself is malformed (as opposed to a failed probe)."""


# --------------------------------------------------------------------------
# Address helpers
# --------------------------------------------------------------------------


def _resolve(host: str, port: int, sock_type: int) -> tuple[int, tuple]:
    """Resolve a numeric host to (family, sockaddr); keeps IPv6 scope ids."""
    infos = socket.getaddrinfo(host, port, type=sock_type, flags=socket.AI_NUMERICHOST)
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


def _client_socket(
    proto: str, host: str, port: int, src: str | None
) -> tuple[socket.socket, tuple]:
    """Create a (optionally source-bound) client socket for host:port."""
    sock_type = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    family, sockaddr = _resolve(host, port, sock_type)
    sock = socket.socket(family, sock_type)
    try:
        if src:
            # Transparent sockets may bind *and send from* an address the pod
            # does not own, which anti-spoofing tests need (IP_FREEBIND only
            # allows the bind; the route lookup would still fail).
            if family == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
            _, src_addr = _resolve(src, 0, sock_type)
            sock.bind(src_addr)
    except BaseException:
        sock.close()
        raise
    return sock, sockaddr


def _error_text(exc: BaseException) -> str:
    """Short, stable error text ("timeout", "ConnectionRefusedError: ...")."""
    if isinstance(exc, socket.timeout | TimeoutError):
        return "timeout"
    return f"{type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------


def _listen_socket(proto: str, family: int, port: int) -> socket.socket:
    """Bind one listening socket; v6 sockets are V6ONLY so v4 gets its own."""
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    sock_type = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    sock = socket.socket(af, sock_type)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if af == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(("0.0.0.0" if family == 4 else "::", port))
        if proto == "tcp":
            sock.listen(128)
        elif family == 4:
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
    except BaseException:
        sock.close()
        raise
    return sock


class SeenLog:
    """Peers that reached our servers, so tests can see what got *in*.

    A spoofed-source probe can never get its reply back, so the only way to
    tell whether the dataplane let it through is to look at the server.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: list[Reply] = []

    def add(self, proto: str, peer: tuple, port: int) -> None:
        entry = {"proto": proto, "peer": _plain_ip(peer[0]), "port": port}
        with self._lock:
            if len(self._entries) < MAX_SEEN:
                self._entries.append(entry)

    def take(self, clear: bool) -> list[Reply]:
        with self._lock:
            entries = list(self._entries)
            if clear:
                self._entries.clear()
        return entries


SEEN = SeenLog()


def _plain_ip(addr: str) -> str:
    """Strip the %scope of link-local peers for stable comparisons."""
    return addr.split("%", 1)[0]


def _tcp_conn_loop(conn: socket.socket) -> None:
    """Answer every chunk with b"ok" until the peer closes.

    Keeping the connection open (instead of reply-and-close) is what lets
    tests check whether an established connection survives a policy change.
    """
    with conn:
        while True:
            try:
                data = conn.recv(4096)
                if not data:
                    return
                conn.sendall(TCP_REPLY)
            except OSError:
                return


def _tcp_accept_loop(sock: socket.socket) -> None:
    port = sock.getsockname()[1]
    while True:
        try:
            conn, peer = sock.accept()
        except OSError:
            return
        SEEN.add("tcp", peer, port)
        threading.Thread(target=_tcp_conn_loop, args=(conn,), daemon=True).start()


def _udp_reply_cmsg(family: int, ancdata: list) -> list:
    """Build ancillary data so the echo leaves from the address it hit.

    Without this the kernel picks a source by route, which can differ from
    the probed address on multi-address hosts; a connected UDP client would
    then ignore the reply and report a false negative.
    """
    for level, ctype, data in ancdata:
        if family == 4 and level == socket.IPPROTO_IP and ctype == IP_PKTINFO:
            _ifindex, _spec_dst, dst = struct.unpack("i4s4s", data[:12])
            pkt = struct.pack("i4s4s", 0, dst, b"\0" * 4)
            return [(socket.IPPROTO_IP, IP_PKTINFO, pkt)]
        if family == 6 and level == socket.IPPROTO_IPV6 and ctype == socket.IPV6_PKTINFO:
            dst, ifindex = struct.unpack("16si", data[:20])
            if not dst.startswith(b"\xfe\x80"):
                ifindex = 0  # only link-local needs the interface pinned
            pkt = struct.pack("16si", dst, ifindex)
            return [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, pkt)]
    return []


def _udp_echo_loop(sock: socket.socket, family: int) -> None:
    port = sock.getsockname()[1]
    while True:
        try:
            data, ancdata, _flags, peer = sock.recvmsg(65535, 256)
            SEEN.add("udp", peer, port)
            sock.sendmsg([data], _udp_reply_cmsg(family, ancdata), 0, peer)
        except OSError:
            if sock.fileno() < 0:
                return
            continue  # e.g. peer unreachable; keep serving


class Servers:
    """Listening sockets keyed by (proto, port, family); serve is idempotent."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._socks: dict[tuple[str, int, int], socket.socket] = {}

    def serve(self, proto: str, port: int, family: int) -> Reply:
        families = [4, 6] if family == 0 else [family]
        started: list[int] = []
        errors: dict[int, str] = {}
        with self._lock:
            for fam in families:
                key = (proto, port, fam)
                if key in self._socks:
                    started.append(fam)
                    continue
                try:
                    self._socks[key] = self._start(proto, port, fam)
                    started.append(fam)
                except OSError as exc:
                    errors[fam] = _error_text(exc)
        # Dual-stack requests tolerate one family failing (e.g. IPv6
        # disabled in the netns); an explicit family must succeed.
        if not started:
            return {"ok": False, "error": json.dumps(errors)}
        return {"ok": True, "families": started, "errors": errors}

    def _start(self, proto: str, port: int, family: int) -> socket.socket:
        sock = _listen_socket(proto, family, port)
        if proto == "tcp":
            target, args = _tcp_accept_loop, (sock,)
        else:
            target, args = _udp_echo_loop, (sock, family)
        threading.Thread(target=target, args=args, daemon=True).start()
        return sock


# --------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------


def probe_tcp(host: str, port: int, timeout: float, src: str | None) -> Reply:
    """Reachable only if the server's reply arrives (RST/timeout -> False)."""
    deadline = time.monotonic() + timeout
    try:
        sock, addr = _client_socket("tcp", host, port, src)
        with sock:
            sock.settimeout(timeout)
            sock.connect(addr)
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.sendall(b"hi")
            data = sock.recv(64)
    except OSError as exc:
        return {"ok": False, "error": _error_text(exc)}
    if not data:
        return {"ok": False, "error": "closed without reply"}
    return {"ok": True}


def probe_udp(host: str, port: int, timeout: float, src: str | None) -> Reply:
    """Send a nonce and wait for the echo; ICMP unreachable -> False."""
    nonce = os.urandom(8).hex().encode()
    deadline = time.monotonic() + timeout
    try:
        sock, addr = _client_socket("udp", host, port, src)
        with sock:
            sock.connect(addr)
            sock.send(nonce)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return {"ok": False, "error": "timeout"}
                sock.settimeout(remaining)
                if sock.recv(65535) == nonce:
                    return {"ok": True}
    except OSError as exc:
        return {"ok": False, "error": _error_text(exc)}


def probe(req: dict[str, Any]) -> Reply:
    proto = req.get("proto", "tcp")
    try:
        host, port = str(req["host"]), int(req["port"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BadRequest(f"probe needs host and port: {exc}") from exc
    timeout = float(req.get("timeout", 0.5))
    src = req.get("src")
    if proto == "tcp":
        return probe_tcp(host, port, timeout, src)
    if proto == "udp":
        return probe_udp(host, port, timeout, src)
    raise BadRequest(f"unknown proto {proto!r}")


def probe_many(probes: list[dict[str, Any]]) -> list[Reply]:
    if not probes:
        return []
    for item in probes:  # validate up front so bad input is not a "False"
        if "host" not in item or "port" not in item:
            raise BadRequest(f"probe needs host and port: {item!r}")
        if item.get("proto", "tcp") not in ("tcp", "udp"):
            raise BadRequest(f"unknown proto in {item!r}")
    workers = min(MAX_PROBE_THREADS, len(probes))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(probe, probes))


# --------------------------------------------------------------------------
# Held connections
# --------------------------------------------------------------------------


class Holds:
    """Long-lived TCP client connections, to test established-flow handling."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conns: dict[str, socket.socket] = {}

    def connect(self, req: dict[str, Any]) -> Reply:
        hold_id = str(req.get("id", ""))
        if not hold_id or "host" not in req or "port" not in req:
            raise BadRequest("connect_hold needs id, host and port")
        if req.get("proto", "tcp") != "tcp":
            raise BadRequest("connect_hold supports tcp only")
        self.close(hold_id)
        timeout = float(req.get("timeout", 0.5))
        try:
            sock, addr = _client_socket("tcp", str(req["host"]), int(req["port"]), req.get("src"))
        except OSError as exc:
            return {"ok": False, "error": _error_text(exc)}
        try:
            sock.settimeout(timeout)
            sock.connect(addr)
        except OSError as exc:
            sock.close()
            return {"ok": False, "error": _error_text(exc)}
        with self._lock:
            self._conns[hold_id] = sock
        return {"ok": True}

    def send(self, req: dict[str, Any]) -> Reply:
        hold_id = str(req.get("id", ""))
        with self._lock:
            sock = self._conns.get(hold_id)
        if sock is None:
            raise BadRequest(f"no held connection {hold_id!r}")
        timeout = float(req.get("timeout", 0.5))
        try:
            if not _drain(sock):
                return {"ok": False, "error": "closed by peer"}
            sock.settimeout(timeout)
            sock.sendall(b"x")
            data = sock.recv(64)
        except OSError as exc:
            return {"ok": False, "error": _error_text(exc)}
        if not data:
            return {"ok": False, "error": "closed by peer"}
        return {"ok": True}

    def close(self, hold_id: str) -> Reply:
        with self._lock:
            sock = self._conns.pop(hold_id, None)
        if sock is not None:
            sock.close()
        return {"ok": True, "existed": sock is not None}


def _drain(sock: socket.socket) -> bool:
    """Discard late replies from an earlier timed-out send.

    Returns False if the peer has closed the connection.
    """
    sock.setblocking(False)
    try:
        while True:
            if not sock.recv(4096):
                return False
    except BlockingIOError:
        return True
    finally:
        sock.setblocking(True)


# --------------------------------------------------------------------------
# Control socket
# --------------------------------------------------------------------------


class Daemon:
    def __init__(self) -> None:
        self.servers = Servers()
        self.holds = Holds()

    def handle(self, req: dict[str, Any]) -> Reply | list[Reply]:
        op = req.get("op")
        if op == "ping":
            return {"ok": True, "pid": os.getpid()}
        if op == "serve":
            return self._serve(req)
        if op == "probe":
            return probe(req)
        if op == "probe_many":
            return {"ok": True, "results": probe_many(list(req.get("probes", [])))}
        if op == "connect_hold":
            return self.holds.connect(req)
        if op == "hold_send":
            return self.holds.send(req)
        if op == "hold_close":
            return self.holds.close(str(req.get("id", "")))
        if op == "seen":
            return {"ok": True, "seen": SEEN.take(bool(req.get("clear", False)))}
        raise BadRequest(f"unknown op {op!r}")

    def _serve(self, req: dict[str, Any]) -> Reply:
        proto = req.get("proto", "tcp")
        family = int(req.get("family", 0))
        if proto not in ("tcp", "udp") or family not in (0, 4, 6):
            raise BadRequest(f"bad serve request {req!r}")
        try:
            port = int(req["port"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BadRequest("serve needs port") from exc
        return self.servers.serve(proto, port, family)

    def dispatch(self, line: bytes) -> Reply | list[Reply]:
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise BadRequest("request must be a JSON object")
            return self.handle(req)
        except (BadRequest, ValueError) as exc:
            return {"ok": False, "bad_request": True, "error": str(exc)}
        except Exception as exc:  # report it; never let one request kill the daemon
            return {"ok": False, "bad_request": True, "error": _error_text(exc)}

    def client_loop(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as stream:
            for line in stream:
                if not line.strip():
                    continue
                reply = self.dispatch(line)
                stream.write(json.dumps(reply).encode() + b"\n")
                stream.flush()


def _watch_parent(parent_pid: int) -> None:
    """Exit when the lab process dies so no daemon outlives a crashed test."""
    while True:
        if os.getppid() != parent_pid:
            os._exit(0)
        time.sleep(WATCHDOG_INTERVAL)


def _bind_control(path: str) -> socket.socket:
    if os.path.exists(path):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(64)
    return sock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--control", required=True, help="Unix control socket path")
    parser.add_argument(
        "--parent-pid",
        type=int,
        default=None,
        help="exit when our parent is no longer this pid (default: current ppid)",
    )
    args = parser.parse_args(argv)

    parent_pid = args.parent_pid if args.parent_pid is not None else os.getppid()
    control = _bind_control(args.control)

    def on_term(_signum: int, _frame: object) -> None:
        with contextlib.suppress(OSError):
            os.unlink(args.control)
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()

    daemon = Daemon()
    while True:
        conn, _ = control.accept()
        threading.Thread(target=daemon.client_loop, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
