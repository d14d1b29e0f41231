"""Network-namespace lab: a fake Kubernetes node with routed pods.

Tests and the demo need real packets going through real nftables rules, but
the machine is shared, so everything lives in throw-away network namespaces:

* one *node* netns (``<prefix>node``) that forwards between pods, and
* one netns per pod (``<prefix>p-<name>``), wired Calico/ptp-style: a veth
  whose host side stays in the node netns and whose pod side is ``eth0``.
  The pod owns a /32 (/128) and routes everything via the link-local
  gateway 169.254.1.1 / fe80::1, which every host veth carries.  The node
  has a /32 (/128) route per pod, so all pod-to-pod traffic is *routed*
  through the node netns, where the dataplane's forward hooks see it.

The root network namespace is never touched: veths are created inside the
node netns, and ``close()`` (also run from ``atexit``) deletes every
namespace this lab created.

Reachability is probed by a small daemon per namespace (see ``podd``) that
the lab talks to over a Unix control socket, so a probe costs a socket
round trip rather than a process start.
"""

from __future__ import annotations

import atexit
import ipaddress
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

# Directory that contains the ``np_agent`` package; the daemon child needs it
# on PYTHONPATH when the package is not installed.
AGENT_DIR = Path(__file__).resolve().parents[2]
RUN_DIR = Path("/tmp")
NETNS_DIR = Path("/run/netns")

NODE = "node"
GATEWAY_V4 = "169.254.1.1"
GATEWAY_V6 = "fe80::1"
HOST_IF_PREFIX = "veth"
IFNAMSIZ = 15

DAEMON_START_TIMEOUT = 10.0
DAEMON_STOP_TIMEOUT = 3.0
# Slack on top of a probe's own timeout for the control-socket round trip.
CONTROL_SLACK = 5.0
PROBE_THREADS = 64  # must match podd.MAX_PROBE_THREADS for batching math

_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,30}$")
_POD_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")


class LabError(RuntimeError):
    """A lab command or daemon request failed."""


@dataclass(frozen=True)
class LabPod:
    """A pod namespace and the node-side wiring that routes to it."""

    name: str
    netns: str
    ipv4: str | None
    ipv6: str | None
    host_if: str
    index: int

    @property
    def ips(self) -> list[str]:
        """The pod's addresses (v4 first), handy for building probe lists."""
        return [ip for ip in (self.ipv4, self.ipv6) if ip]


# A probe/serve endpoint: a LabPod, its name, or the string "node".
Target = LabPod | str
# (dst_ip, proto, port) or (dst_ip, proto, port, source_ip)
ProbeSpec = tuple[str, str, int] | tuple[str, str, int, str | None]


@dataclass
class _Daemon:
    key: str
    netns: str
    proc: subprocess.Popen
    sock_path: Path
    log_path: Path
    log_file: IO[bytes]


def _default_prefix() -> str:
    return f"npl{secrets.token_hex(3)}-"


def _check_ip(value: str | None, version: int) -> str | None:
    """Normalise an address so later comparisons and rules are exact."""
    if value is None:
        return None
    try:
        addr = ipaddress.ip_address(value)
    except ValueError as exc:
        raise LabError(f"invalid IP address {value!r}") from exc
    if addr.version != version:
        raise LabError(f"{value!r} is not an IPv{version} address")
    return str(addr)


def _command_error(cmd: Sequence[str], proc: subprocess.CompletedProcess) -> LabError:
    stderr = proc.stderr if isinstance(proc.stderr, str) else (proc.stderr or b"").decode()
    stdout = proc.stdout if isinstance(proc.stdout, str) else (proc.stdout or b"").decode()
    detail = (stderr or stdout).strip()
    return LabError(f"command {' '.join(cmd)!r} failed (rc={proc.returncode}): {detail}")


def _exec(cmd: Sequence[str], *, input_text: str | None = None) -> str:
    """Run a command, raising LabError with its stderr on failure."""
    proc = subprocess.run(list(cmd), input=input_text, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise _command_error(cmd, proc)
    return proc.stdout


class Lab:
    """A node netns plus pod netns; use as a context manager.

    Every namespace name starts with ``prefix`` (random by default) so that
    parallel labs on a shared machine never collide and leftovers are easy
    to attribute.
    """

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix if prefix is not None else _default_prefix()
        if not _PREFIX_RE.match(self.prefix):
            raise LabError(f"invalid lab prefix {self.prefix!r}")
        self.node_ns = f"{self.prefix}{NODE}"
        self.workdir = RUN_DIR / self.prefix.rstrip("-_.")
        self._pods: dict[str, LabPod] = {}
        self._bare: dict[str, str] = {}  # unwired pod namespaces (for a CNI plugin), by name
        self._namespaces: list[str] = []
        self._daemons: dict[str, _Daemon] = {}
        self._spawned: list[subprocess.Popen] = []
        self._lock = threading.RLock()
        self._closed = False
        self._own_workdir = False
        atexit.register(self.close)
        try:
            self.workdir.mkdir(mode=0o700)  # fails if another lab owns it
            self._own_workdir = True
            self._setup_node()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------
    # Context manager / lifecycle
    # ------------------------------------------------------------------

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop our processes and delete our namespaces; safe to repeat.

        Every step is attempted even if an earlier one fails, so a broken
        lab still leaves nothing behind; failures are raised at the end.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        errors: list[str] = []
        for proc in self._spawned:
            _stop_process(proc)
        for daemon in self._daemons.values():
            _stop_process(daemon.proc)
            daemon.log_file.close()
        for netns in reversed(self._namespaces):
            try:
                self._delete_netns(netns)
            except LabError as exc:
                errors.append(str(exc))
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        atexit.unregister(self.close)
        if errors:
            raise LabError("lab cleanup incomplete: " + "; ".join(errors))

    @staticmethod
    def _delete_netns(netns: str) -> None:
        if (NETNS_DIR / netns).exists():
            _exec(["ip", "netns", "del", netns])

    def _check_open(self) -> None:
        if self._closed:
            raise LabError("lab is closed")

    # ------------------------------------------------------------------
    # Commands inside namespaces
    # ------------------------------------------------------------------

    def run(
        self, netns: str, argv: Sequence[str], check: bool = True, **kw: Any
    ) -> subprocess.CompletedProcess:
        """Run ``argv`` inside ``netns``; raise LabError (with stderr) on failure.

        Output is captured as text unless the caller overrides it via ``kw``.
        """
        cmd = ["ip", "netns", "exec", netns, *argv]
        kw.setdefault("capture_output", not ("stdout" in kw or "stderr" in kw))
        kw.setdefault("text", True)
        proc = subprocess.run(cmd, check=False, **kw)
        if check and proc.returncode != 0:
            raise _command_error(cmd, proc)
        return proc

    def spawn(self, netns: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen:
        """Start a long-running process in ``netns``; close() stops it by PID."""
        self._check_open()
        proc = subprocess.Popen(["ip", "netns", "exec", netns, *argv], **kw)
        self._spawned.append(proc)
        return proc

    def _ip(self, netns: str, commands: Sequence[str]) -> None:
        """Apply several ``ip`` commands in one process (``ip -batch``)."""
        _exec(["ip", "-n", netns, "-batch", "-"], input_text="\n".join(commands) + "\n")

    def _sysctl(self, netns: str, settings: dict[str, str]) -> None:
        args = [f"{key}={value}" for key, value in settings.items()]
        self.run(netns, ["sysctl", "-q", "-w", *args])

    def _add_netns(self, netns: str) -> None:
        _exec(["ip", "netns", "add", netns])
        # Record right away so close() deletes it even if wiring fails.
        self._namespaces.append(netns)

    # ------------------------------------------------------------------
    # Topology
    # ------------------------------------------------------------------

    def _setup_node(self) -> None:
        self._add_netns(self.node_ns)
        self._ip(self.node_ns, ["link set lo up"])
        self._sysctl(
            self.node_ns,
            {
                "net.ipv4.ip_forward": "1",
                "net.ipv6.conf.all.forwarding": "1",
                # Kernel reverse-path filtering would hide whether the
                # dataplane's own anti-spoofing works; keep it off explicitly.
                "net.ipv4.conf.all.rp_filter": "0",
                "net.ipv4.conf.default.rp_filter": "0",
                # New host veths inherit this: no 1s tentative link-local.
                "net.ipv6.conf.default.accept_dad": "0",
                "net.ipv6.conf.all.accept_dad": "0",
            },
        )

    @property
    def pods(self) -> dict[str, LabPod]:
        """Pods by name (a copy)."""
        return dict(self._pods)

    def pod(self, name: str) -> LabPod:
        try:
            return self._pods[name]
        except KeyError:
            raise LabError(f"no pod named {name!r}") from None

    def add_pod(self, name: str, ipv4: str | None, ipv6: str | None = None) -> LabPod:
        """Create a pod netns routed through the node netns."""
        self._check_open()
        pod = self._new_pod(name, _check_ip(ipv4, 4), _check_ip(ipv6, 6))
        self._add_netns(pod.netns)
        self._ip(pod.netns, ["link set lo up"])
        # eth0 is created in this netns by the veth command below, so it
        # inherits "default" and skips DAD (addresses usable immediately).
        self._sysctl(
            pod.netns,
            {
                "net.ipv6.conf.default.accept_dad": "0",
                "net.ipv6.conf.all.accept_dad": "0",
            },
        )
        self._ip(self.node_ns, self._node_side_commands(pod))
        self._ip(pod.netns, self._pod_side_commands(pod))
        self._ip(self.node_ns, self._node_route_commands(pod))
        self._pods[name] = pod
        return pod

    def add_netns(self, name: str) -> str:
        """An empty pod network namespace, for a CNI plugin to wire; a probe target by name."""
        self._check_open()
        if not _POD_NAME_RE.match(name) or name == NODE or name in self._pods or (
                name in self._bare):
            raise LabError(f"invalid or duplicate pod name {name!r}")
        netns = f"{self.prefix}p-{name}"
        self._add_netns(netns)
        self._bare[name] = netns
        return netns

    def _new_pod(self, name: str, ipv4: str | None, ipv6: str | None) -> LabPod:
        if not _POD_NAME_RE.match(name) or name == NODE:
            raise LabError(f"invalid pod name {name!r} (DNS label, not {NODE!r})")
        if name in self._pods:
            raise LabError(f"pod {name!r} already exists")
        if ipv4 is None and ipv6 is None:
            raise LabError(f"pod {name!r} needs an IPv4 or IPv6 address")
        used = {ip for pod in self._pods.values() for ip in pod.ips}
        for ip in (ipv4, ipv6):
            if ip in used:
                raise LabError(f"address {ip} already used by another pod")
        index = len(self._pods)
        host_if = f"{HOST_IF_PREFIX}{index}-{name}"[:IFNAMSIZ]
        netns = f"{self.prefix}p-{name}"
        return LabPod(name, netns, ipv4, ipv6, host_if, index)

    def _node_side_commands(self, pod: LabPod) -> list[str]:
        cmds = [
            f"link add {pod.host_if} type veth peer name eth0 netns {pod.netns}",
            f"link set {pod.host_if} up",
        ]
        if pod.ipv4:
            # Same gateway address on every host veth: the node answers ARP
            # for it on whichever veth the pod asks.
            cmds.append(f"addr add {GATEWAY_V4}/32 dev {pod.host_if}")
        if pod.ipv6:
            cmds.append(f"addr add {GATEWAY_V6}/64 dev {pod.host_if} nodad")
        return cmds

    def _pod_side_commands(self, pod: LabPod) -> list[str]:
        cmds = ["link set eth0 up"]
        if pod.ipv4:
            cmds += [
                f"addr add {pod.ipv4}/32 dev eth0",
                f"route add {GATEWAY_V4} dev eth0 scope link",
                f"route add default via {GATEWAY_V4} dev eth0",
            ]
        if pod.ipv6:
            cmds += [
                f"addr add {pod.ipv6}/128 dev eth0 nodad",
                f"route add ::/0 via {GATEWAY_V6} dev eth0",
            ]
        return cmds

    def _node_route_commands(self, pod: LabPod) -> list[str]:
        cmds = []
        if pod.ipv4:
            cmds.append(f"route add {pod.ipv4}/32 dev {pod.host_if}")
        if pod.ipv6:
            cmds.append(f"route add {pod.ipv6}/128 dev {pod.host_if}")
        return cmds

    # ------------------------------------------------------------------
    # Daemons
    # ------------------------------------------------------------------

    def _resolve_target(self, target: Target) -> tuple[str, str]:
        """Map a target to (daemon key, netns)."""
        if isinstance(target, LabPod):
            target = target.name
        if target == NODE:
            return NODE, self.node_ns
        if target in self._bare:
            return f"pod-{target}", self._bare[target]
        pod = self.pod(target)
        return f"pod-{pod.name}", pod.netns

    def start_daemon(self, target: Target) -> int:
        """Ensure the podd daemon for ``target`` is running; return its PID."""
        key, netns = self._resolve_target(target)
        with self._lock:
            self._check_open()
            daemon = self._daemons.get(key)
            if daemon is None or daemon.proc.poll() is not None:
                daemon = self._launch_daemon(key, netns)
                self._daemons[key] = daemon
        return daemon.proc.pid

    def _launch_daemon(self, key: str, netns: str) -> _Daemon:
        sock_path = self.workdir / f"{key}.sock"
        log_path = self.workdir / f"{key}.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(AGENT_DIR), env.get("PYTHONPATH")) if p)
        argv = [
            "ip", "netns", "exec", netns,
            sys.executable, "-m", "np_lab.podd",
            "--control", str(sock_path),
            "--parent-pid", str(os.getpid()),
        ]  # fmt: skip
        log_file = open(log_path, "ab")  # noqa: SIM115 - closed in close()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            close_fds=True,
        )
        daemon = _Daemon(key, netns, proc, sock_path, log_path, log_file)
        try:
            self._wait_ready(daemon)
        except BaseException:
            _stop_process(proc)
            log_file.close()
            raise
        return daemon

    def _wait_ready(self, daemon: _Daemon) -> None:
        deadline = time.monotonic() + DAEMON_START_TIMEOUT
        while time.monotonic() < deadline:
            if daemon.proc.poll() is not None:
                raise LabError(
                    f"podd {daemon.key} exited rc={daemon.proc.returncode}: "
                    f"{_tail(daemon.log_path)}"
                )
            try:
                if _control_request(daemon.sock_path, {"op": "ping"}, 1.0).get("ok"):
                    return
            except OSError:
                pass
            time.sleep(0.02)
        raise LabError(f"podd {daemon.key} not ready: {_tail(daemon.log_path)}")

    def request(
        self, target: Target, req: dict[str, Any], timeout: float = CONTROL_SLACK
    ) -> dict[str, Any]:
        """Send one raw request to the target's daemon (started if needed)."""
        key, _ = self._resolve_target(target)
        self.start_daemon(target)
        daemon = self._daemons[key]
        try:
            reply = _control_request(daemon.sock_path, req, timeout)
        except (OSError, ValueError) as exc:
            raise LabError(
                f"podd {key} request {req.get('op')!r} failed: {exc}; log: {_tail(daemon.log_path)}"
            ) from exc
        if reply.get("bad_request"):
            raise LabError(f"podd {key} rejected {req!r}: {reply.get('error')}")
        return reply

    # ------------------------------------------------------------------
    # Serving and probing
    # ------------------------------------------------------------------

    def serve(self, target: Target, proto: str, port: int, family: int = 0) -> None:
        """Listen on ``port`` in the target netns (family 0 = IPv4 and IPv6)."""
        reply = self.request(
            target, {"op": "serve", "proto": proto, "port": port, "family": family}
        )
        if not reply.get("ok"):
            raise LabError(f"serve {proto}/{port} failed: {reply.get('error')}")

    def probe_detail(
        self,
        src: Target,
        dst_ip: str,
        proto: str,
        port: int,
        timeout: float = 0.5,
        source_ip: str | None = None,
    ) -> dict[str, Any]:
        """Like probe() but returns ``{"ok": bool, "error": str}`` for messages."""
        req = _probe_request(dst_ip, proto, port, timeout, source_ip)
        reply = self.request(src, {"op": "probe", **req}, timeout + CONTROL_SLACK)
        return {"ok": bool(reply.get("ok")), "error": reply.get("error", "")}

    def probe(
        self,
        src: Target,
        dst_ip: str,
        proto: str,
        port: int,
        timeout: float = 0.5,
        source_ip: str | None = None,
    ) -> bool:
        """True if ``src`` gets an application reply from dst_ip:port."""
        return self.probe_detail(src, dst_ip, proto, port, timeout, source_ip)["ok"]

    def probe_many(
        self, src: Target, probes: Sequence[ProbeSpec], timeout: float = 0.5
    ) -> list[bool]:
        """Run probes concurrently from ``src``; results in input order."""
        reqs = []
        for spec in probes:
            dst_ip, proto, port, source_ip = _unpack_spec(spec)
            reqs.append(_probe_request(dst_ip, proto, port, timeout, source_ip))
        batches = max(1, -(-len(reqs) // PROBE_THREADS))
        reply = self.request(
            src, {"op": "probe_many", "probes": reqs}, timeout * batches + CONTROL_SLACK
        )
        return [bool(result.get("ok")) for result in reply["results"]]

    # ------------------------------------------------------------------
    # Held (established) TCP connections
    # ------------------------------------------------------------------

    def connect_hold(
        self,
        src: Target,
        dst_ip: str,
        port: int,
        hold_id: str,
        timeout: float = 0.5,
        source_ip: str | None = None,
    ) -> bool:
        """Open and keep a TCP connection from ``src`` (replaces same id)."""
        req = _probe_request(dst_ip, "tcp", port, timeout, source_ip)
        reply = self.request(
            src, {"op": "connect_hold", "id": hold_id, **req}, timeout + CONTROL_SLACK
        )
        return bool(reply.get("ok"))

    def hold_send(self, src: Target, hold_id: str, timeout: float = 0.5) -> bool:
        """True if the held connection still carries data both ways."""
        reply = self.request(
            src,
            {"op": "hold_send", "id": hold_id, "timeout": timeout},
            timeout + CONTROL_SLACK,
        )
        return bool(reply.get("ok"))

    def hold_close(self, src: Target, hold_id: str) -> None:
        self.request(src, {"op": "hold_close", "id": hold_id})

    def seen(self, target: Target, clear: bool = False) -> list[dict[str, Any]]:
        """Peers that reached the target's servers: ``{"proto", "peer", "port"}``.

        Lets anti-spoofing tests check whether a spoofed datagram arrived,
        since its reply can never come back to the sender.
        """
        return list(self.request(target, {"op": "seen", "clear": clear})["seen"])


# ----------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------


def _probe_request(
    dst_ip: str, proto: str, port: int, timeout: float, source_ip: str | None = None
) -> dict[str, Any]:
    if proto not in ("tcp", "udp"):
        raise LabError(f"unknown proto {proto!r} (tcp or udp)")
    req: dict[str, Any] = {
        "proto": proto,
        "host": dst_ip,
        "port": int(port),
        "timeout": timeout,
    }
    if source_ip:
        req["src"] = source_ip
    return req


def _unpack_spec(spec: ProbeSpec) -> tuple[str, str, int, str | None]:
    if len(spec) == 3:
        dst_ip, proto, port = spec  # type: ignore[misc]
        return dst_ip, proto, port, None
    if len(spec) == 4:
        return spec  # type: ignore[return-value]
    raise LabError(f"probe spec must be (dst_ip, proto, port[, source_ip]): {spec!r}")


def _control_request(path: Path, req: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One JSON line out, one JSON line back, over the daemon's Unix socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("daemon closed the control connection")
            buf += chunk
    return json.loads(buf)


def _stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, always by PID of a process we started."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(DAEMON_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:].strip() or "(empty log)"
    except OSError:
        return "(no log)"
