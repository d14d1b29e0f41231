"""np-agent's unix socket for np-cni. Two protocols, told apart by the first line.

JSON lines (the Python np-cni, on hosts that have Python): one request line, one answer line.
  {"op": "add", "container_id": ..., "ifname": ...}  program the pod np-cni just recorded;
      answered only after the transaction: {"ok": true, "pending": false}
  {"op": "del", ...} / {"op": "sync"}                   re-read the endpoints, reconcile
  {"op": "status"}                                      {"ok": true, "ready": bool, "reason": ..}

The host shim (cni/shim/np-cni-shim.c, framing in shimproto.py): a whole CNI request (CNI_*
variables, the config, the pod's netns as a descriptor), answered with the exit code and the
plugin's stdout. np-cni's command handler runs here, in this connection's thread, with the
agent's own plugin directory as CNI_PATH, reaching the agent by a direct call to
:meth:`CniServer.answer` and the netns through ``/proc/<agent pid>/fd/<n>`` (the agent's
container does not see the host's netns paths; subprocesses like ip and nsenter can open
that). Spooled DELs (pending.py) are replayed before each shim request is served.

An ADD whose pod the watch does not know yet is answered after ONE GET of that pod, when an
API server is configured (:attr:`CniServer.pod_getter`): the pod is enforced by its real
labels when ADD returns, instead of denied both ways until its watch event comes.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import json
import logging
import os
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from np_agent.node.engine import NodeAgent
from np_agent.node.pending import DEFAULT_DIR as DEFAULT_PENDING_DIR
from np_agent.node.pending import PendingDels
from np_cni.agent import direct_call
from np_cni.cli import InProcess, execute
from np_cni.shared.endpoints import EndpointError
from np_cni.shared.shimproto import (
    MAGIC,
    MAX_REQUEST,
    FramingError,
    ShimRequest,
    encode_answer,
    parse_request,
)
from np_cni.spec import INVALID_ENVIRONMENT, CniError

log = logging.getLogger("np_agent.cni")
DEFAULT_SOCKET = "/run/np-nft/cni.sock"
DEFAULT_PLUGIN_DIR = "/usr/lib/cni"
ANSWER_TIMEOUT = 30.0
READ_TIMEOUT = 30.0  # a client that does not finish sending its request in this is dropped
CLOSE_GRACE = 8.0  # under the DaemonSet's terminationGracePeriodSeconds (10)
MAX_JSON_LINE = 65536
MAX_FDS = 4  # one is expected; more are closed
NS_GET_NSTYPE = 0xB703  # linux/nsfs.h
CLONE_NEWNET = 0x40000000

PodGetter = Callable[[str, str], dict[str, Any]]


def _receive_start(sock: socket.socket) -> tuple[bytes, list[int]]:
    """The first bytes and the descriptors that came with them (close-on-exec), read with
    recvmsg: a plain read would make the kernel drop the shim's netns descriptor."""
    fds = array.array("i")
    data, ancdata, _flags, _ = sock.recvmsg(
        MAX_JSON_LINE, socket.CMSG_SPACE(MAX_FDS * fds.itemsize), socket.MSG_CMSG_CLOEXEC)
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    while data and len(data) < len(MAGIC) and MAGIC.startswith(data):
        more = sock.recv(len(MAGIC))  # the magic line came in pieces: enough to decide
        if not more:
            break
        data += more
    return data, list(fds)


def _read_until(sock: socket.socket, data: bytes, limit: int, stop: bytes | None) -> bytes:
    """Read on until ``stop`` is seen (JSON line) or EOF (shim request); FramingError past
    ``limit`` bytes, so a client cannot make the agent buffer without bound."""
    chunks = [data]
    size = len(data)
    while stop is None or stop not in chunks[-1]:
        chunk = sock.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise FramingError(f"request larger than {limit} bytes")
    return b"".join(chunks)


def _is_netns(fd: int) -> bool:
    """True when the descriptor is a network namespace (nsfs ioctl), not any other file."""
    try:
        return fcntl.ioctl(fd, NS_GET_NSTYPE) == CLONE_NEWNET
    except OSError:
        return False


class _Handler(socketserver.BaseRequestHandler):
    """One connection, on its own thread (ThreadingUnixStreamServer)."""

    server: CniServer

    def handle(self) -> None:
        """Counted, so that the agent lets requests in progress finish when it stops."""
        with self.server.in_flight():
            self._handle()

    def _handle(self) -> None:
        """Tell the protocols apart by the first bytes; never let a request raise."""
        sock: socket.socket = self.request
        sock.settimeout(READ_TIMEOUT)
        fds: list[int] = []
        try:
            data, fds = _receive_start(sock)
            if data.startswith(MAGIC):
                self.server.serve_shim(sock, data, fds)
            else:
                self._serve_json(sock, data)
        except (OSError, TimeoutError) as e:
            log.debug("CNI client went away: %s", e)
        except Exception as e:  # noqa: BLE001 - a bad request never takes the agent down
            log.error("CNI request failed: %s: %s", type(e).__name__, e)
        finally:
            for fd in fds:
                os.close(fd)

    def _serve_json(self, sock: socket.socket, data: bytes) -> None:
        """The Python np-cni's protocol: one JSON line each way."""
        try:
            line = _read_until(sock, data, MAX_JSON_LINE, b"\n")
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError("not an object")
            answer = self.server.answer(req)
        except ValueError as e:
            answer = {"ok": False, "error": f"bad request: {e}"}
        sock.sendall(json.dumps(answer).encode() + b"\n")


class CniServer(socketserver.ThreadingUnixStreamServer):
    """The agent's CNI socket: both protocols, in-process np-cni, pending DELs."""

    daemon_threads = True
    request_queue_size = 256  # a burst of ADDs connects at once (the default 5 refuses some)

    def __init__(self, path: str, agent: NodeAgent, plugin_dir: str = DEFAULT_PLUGIN_DIR,
                 pending_dir: Path | str = DEFAULT_PENDING_DIR) -> None:
        """Bind (replacing a previous agent's socket, 0600: root's runtime only); serving
        starts with serve_in_background(), after the caller replayed the pending DELs."""
        self.agent = agent
        self.path = path
        self.plugin_dir = plugin_dir
        self.pending = PendingDels(pending_dir, lambda req: self.run_cni(req, None))
        self.pod_getter: PodGetter | None = None  # set when an API server is configured
        self._active = 0
        self._idle = threading.Condition()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).unlink(missing_ok=True)  # a previous agent's socket
        super().__init__(path, _Handler)
        os.chmod(path, 0o600)

    # ------------------------------------------------------------------ JSON protocol

    def answer(self, req: dict[str, Any], timeout: float = ANSWER_TIMEOUT) -> dict[str, Any]:
        """Answer one JSON request (also called directly by in-process np-cni)."""
        op = req.get("op")
        if op == "status":
            if self.agent.ready:
                return {"ok": True, "ready": True}
            return {"ok": True, "ready": False, "reason": "first sync not done yet"}
        if op not in ("add", "del", "sync"):
            return {"ok": False, "error": f"unknown op {op!r}"}
        cid, ifname = str(req.get("container_id", "")), str(req.get("ifname", ""))
        if op == "add":
            self._learn_unknown_pod(cid, ifname)
        elif op == "del" or not self.agent.ready:
            # A removal is not waited for: the address it frees is handed out again only by
            # an ADD, and every ADD waits for a sync that includes this one. Before the first
            # sync, that sync reads the endpoints anyway.
            self.agent.request_sync(wait=False)
            return {"ok": True}
        outcome = self.agent.request_sync(wait=True, timeout=min(timeout, ANSWER_TIMEOUT))
        if outcome.error:
            return {"ok": False, "error": outcome.error}
        if op != "add":
            return {"ok": True}
        try:
            pending = self.agent.is_pending(cid, ifname)
        except EndpointError as e:
            return {"ok": False, "error": str(e)}
        if pending:
            log.warning("pod of container %s is not known yet: denied both ways until it is",
                        cid)
        return {"ok": True, "pending": pending}

    def _learn_unknown_pod(self, container_id: str, ifname: str) -> None:
        """GET the pod of a new attachment the watch has not delivered yet, so the sync that
        answers ADD enforces its real labels. Any failure leaves it pending (denied both
        ways), as without an API server."""
        getter = self.pod_getter
        if getter is None:
            return
        try:
            ep = self.agent.store.get(container_id, ifname)
            if ep is None or not ep.pod or not self.agent.is_pending(container_id, ifname):
                return
        except (EndpointError, OSError):
            return  # answered below with the same error
        try:
            raw = getter(ep.namespace or "default", ep.pod)
        except Exception as e:  # noqa: BLE001 - API errors come in many classes
            log.warning("pod %s (container %s) is not known yet and GET failed: %s; denied "
                        "both ways until its watch event", ep.pod_ref, container_id,
                        str(e)[:200])
            return
        if self.agent.learn_pod(raw, ep.uid):
            log.info("pod %s read from the API server ahead of its watch event", ep.pod_ref)
        else:
            log.warning("pod %s from the API server is not the one of container %s (UID "
                        "%s expected): denied both ways", ep.pod_ref, container_id, ep.uid)

    # ------------------------------------------------------------------ shim protocol

    def serve_shim(self, sock: socket.socket, data: bytes, fds: list[int]) -> None:
        """Read the rest of a shim request, run it, send "<code>\\n<stdout>". ``fds`` stay
        the caller's to close."""
        netns_fd = fds[0] if fds else None
        try:
            req = parse_request(_read_until(sock, data, MAX_REQUEST, None))
            if netns_fd is not None and not _is_netns(netns_fd):
                raise CniError(INVALID_ENVIRONMENT, "the descriptor sent with the request is "
                               "not a network namespace")
            self.pending.replay()
            code, out = self.run_cni(req, netns_fd)
        except FramingError as e:
            code, out = 1, _error(INVALID_ENVIRONMENT, f"malformed request from the np-cni "
                                  f"shim: {e}")
        except CniError as e:
            code, out = 1, _error(e.code, e.msg)
        sock.sendall(encode_answer(code, out))

    def run_cni(self, req: ShimRequest, netns_fd: int | None) -> tuple[int, str]:
        """np-cni's command handler, in this thread, for a request from the host."""
        environ = {**req.environ, "CNI_PATH": self.plugin_dir}
        fd_path = f"/proc/{os.getpid()}/fd/{netns_fd}" if netns_fd is not None else ""
        t0 = time.perf_counter()
        code, out = execute(environ, req.stdin, InProcess(
            direct_call(self.answer), fd_path, str(self.agent.store.dir)))
        took = time.perf_counter() - t0
        self.agent.metrics.cni.labels(req.command, str(code)).observe(took)
        log.log(logging.INFO if code == 0 else logging.WARNING,
                "np-cni %s container %s ifname %s: exit %d in %.1f ms%s", req.command,
                req.environ.get("CNI_CONTAINERID", "-"), req.environ.get("CNI_IFNAME", "-"),
                code, took * 1000, f": {out.strip()}" if code else "")
        return code, out

    def serve_in_background(self) -> threading.Thread:
        """Accept connections from now on, in a thread of its own."""
        t = threading.Thread(target=self.serve_forever, name="cni-socket", daemon=True)
        t.start()
        return t

    @contextlib.contextmanager
    def in_flight(self) -> Iterator[None]:
        """Count a request being served, so close() can let it finish."""
        with self._idle:
            self._active += 1
        try:
            yield
        finally:
            with self._idle:
                self._active -= 1
                self._idle.notify_all()

    def close(self, grace: float = CLOSE_GRACE) -> None:
        """Stop accepting (new shim requests get "try again", DELs are spooled), then give
        the requests being served up to ``grace`` seconds: an ADD cut off mid-way would
        leave its half-built pod to the runtime's DEL. The agent must still sync meanwhile,
        so stop it only after this."""
        self.shutdown()
        self.server_close()
        Path(self.path).unlink(missing_ok=True)
        with self._idle:
            if not self._idle.wait_for(lambda: self._active == 0, timeout=grace):
                log.warning("stopping with %d CNI request(s) still being served", self._active)


def _error(code: int, msg: str) -> str:
    """A CNI error object for the shim to print; the version the runtime asked for is not
    known when the request itself is unreadable."""
    return json.dumps(CniError(code, msg).to_json("1.1.0")) + "\n"
