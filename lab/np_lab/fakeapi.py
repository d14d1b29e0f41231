"""An in-process fake Kubernetes API server that speaks the real wire protocol.

Why: np-agent's watchers must survive what real API servers do to them -- paginated
lists, watches resumed from a resourceVersion, compaction (``410 Gone``), bookmarks,
server-side watch timeouts, dropped connections, an API server that disappears and
comes back, half-dead connections that go silent.  Mocking the ``kubernetes`` client
would only test our idea of the client; this server lets tests run the REAL client
(urllib3, chunked transfer encoding, ``Watch.stream``) against controllable failures.

Scope: the four resources np-agent reads (pods, namespaces, nodes, networkpolicies),
JSON only, no auth, no discovery, plain HTTP on loopback.  Standard library only, so the
module imports without the ``kubernetes`` package (only :meth:`FakeApiServer.client_configuration`
needs it).

Semantics, as close to kube-apiserver + etcd as tests need:

* One global, monotonically increasing resourceVersion (like the etcd revision); every
  mutation bumps it and appends one event to a bounded history (``history_size``).
* LIST returns the current rv in ``metadata.resourceVersion``; ``limit``/``continue``
  paginate over a consistent snapshot at the first page's rv (rebuilt from the history);
  a continue token older than the compaction point gets ``410 Expired``. The snapshot's
  sorted keys are kept between pages, so a page costs O(limit), not a sort of every object
  (150,000 pods in pages of 500 would otherwise take minutes).
* WATCH from ``resourceVersion=RV`` replays every event with rv > RV; RV older than the
  history gets a 410 ``ERROR`` event (or an HTTP 410, ``expired_watch_mode="http"``).
  RV absent or ``"0"`` starts with synthetic ``ADDED`` events for the current objects.
  ``allowWatchBookmarks`` sends periodic ``BOOKMARK`` events, ``timeoutSeconds`` ends the
  stream cleanly.  With selectors, an object that starts (stops) matching is reported as
  ``ADDED`` (``DELETED``), as the real watch cache does.
* Selectors: ``labelSelector`` (=, ==, !=, in, notin, exists, !exists) and
  ``fieldSelector`` on ``metadata.name``, ``metadata.namespace`` and, for pods,
  ``spec.nodeName`` and ``status.phase``.
* Writes: the test-side API (:meth:`FakeApiServer.create`, ``update``, ``delete``,
  ``apply``) plays kubectl/kubelet; POST/PUT/DELETE on the REST paths work too (PUT
  checks metadata.resourceVersion, 409 on a stale one).  Deletion is immediate.
  :meth:`FakeApiServer.load` stores many objects at once, without copies or events, for
  benchmarks that start the server with a cluster's worth of state.

Failure knobs: :meth:`~FakeApiServer.compact`, :meth:`~FakeApiServer.drop_watches`,
:meth:`~FakeApiServer.go_away` / :meth:`~FakeApiServer.come_back`,
:meth:`~FakeApiServer.silent_watches`, ``expired_watch_mode``, ``history_size``,
``bookmark_interval``; for assertions :attr:`~FakeApiServer.request_log`,
:meth:`~FakeApiServer.watch_count`, :meth:`~FakeApiServer.wait_for_watches`.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import collections
import contextlib
import copy
import ipaddress
import json
import os
import re
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

__all__ = ["KINDS", "FakeApiError", "FakeApiServer", "KindInfo"]

Obj = dict[str, Any]
Key = tuple[str, str]  # (namespace, name); namespace "" for cluster-scoped objects


@dataclass(frozen=True)
class KindInfo:
    """How one resource is addressed and labelled on the wire."""

    plural: str
    kind: str
    api_version: str  # "v1" or "group/version"
    namespaced: bool
    # Extra field selectors the real server supports for this resource (beyond metadata.*).
    fields: tuple[str, ...] = ()

    @property
    def prefix(self) -> tuple[str, ...]:
        """Path segments before the resource part: ("api", "v1") or ("apis", group, version)."""
        if "/" in self.api_version:
            return ("apis", *self.api_version.split("/"))
        return ("api", self.api_version)


KINDS: dict[str, KindInfo] = {
    "pods": KindInfo("pods", "Pod", "v1", True, ("spec.nodeName", "status.phase")),
    "namespaces": KindInfo("namespaces", "Namespace", "v1", False, ("status.phase",)),
    "nodes": KindInfo("nodes", "Node", "v1", False),
    "networkpolicies": KindInfo("networkpolicies", "NetworkPolicy", "networking.k8s.io/v1", True),
}


class FakeApiError(Exception):
    """An API error with the HTTP code and Status reason the real server would use."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(f"{code} {reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message

    def status(self) -> Obj:
        """The ``Status`` object the server sends for this error."""
        return _status(self.code, self.reason, self.message)


def _status(code: int, reason: str, message: str) -> Obj:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


@dataclass(frozen=True)
class _Event:
    """One mutation.  ``prev`` is the state before it, so a past snapshot can be rebuilt."""

    rv: int
    plural: str
    type: str  # ADDED, MODIFIED, DELETED
    obj: Obj
    prev: Obj | None


# ----------------------------------------------------------------------------- selectors

_Requirement = Callable[[dict[str, str]], bool]
_LABEL_RE = re.compile(
    r"""^\s*(?:
        (?P<notexists>!\s*(?P<nk>[\w./-]+))
      | (?P<setk>[\w./-]+)\s+(?P<op>in|notin)\s*\((?P<values>[^)]*)\)
      | (?P<k>[\w./-]+)\s*(?P<cmp>==|=|!=)\s*(?P<v>[\w.-]*)
      | (?P<exists>[\w./-]+)
    )\s*$""",
    re.VERBOSE,
)


def _split_selector(text: str) -> list[str]:
    """Split on commas that are not inside ``in (...)`` value lists."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p for p in parts if p.strip()]


def _parse_label_selector(text: str) -> list[_Requirement]:
    reqs: list[_Requirement] = []
    for part in _split_selector(text):
        m = _LABEL_RE.match(part)
        if not m:
            raise FakeApiError(400, "BadRequest", f"unable to parse requirement: {part!r}")
        if m["notexists"]:
            reqs.append(lambda lb, k=m["nk"]: k not in lb)
        elif m["setk"]:
            values = {v.strip() for v in m["values"].split(",") if v.strip()}
            if m["op"] == "in":
                reqs.append(lambda lb, k=m["setk"], vs=values: lb.get(k) in vs)
            else:
                reqs.append(lambda lb, k=m["setk"], vs=values: lb.get(k) not in vs)
        elif m["k"]:
            if m["cmp"] == "!=":
                reqs.append(lambda lb, k=m["k"], v=m["v"]: lb.get(k) != v)
            else:
                reqs.append(lambda lb, k=m["k"], v=m["v"]: lb.get(k) == v)
        else:
            reqs.append(lambda lb, k=m["exists"]: k in lb)
    return reqs


def _field_value(obj: Obj, path: str) -> str:
    cur: Any = obj
    for part in path.split("."):
        cur = cur.get(part) if isinstance(cur, dict) else None
    return "" if cur is None else str(cur)


def _parse_field_selector(text: str, info: KindInfo) -> list[Callable[[Obj], bool]]:
    reqs: list[Callable[[Obj], bool]] = []
    for part in _split_selector(text):
        m = re.match(r"^\s*([\w.]+)\s*(==|=|!=)\s*(.*?)\s*$", part)
        if not m:
            raise FakeApiError(400, "BadRequest", f"invalid field selector: {part!r}")
        path, op, value = m.groups()
        allowed = ("metadata.name", "metadata.namespace", *info.fields)
        if path not in allowed:
            raise FakeApiError(
                400, "BadRequest", f'field label not supported: {path} for "{info.kind}"'
            )
        if op == "!=":
            reqs.append(lambda o, p=path, v=value: _field_value(o, p) != v)
        else:
            reqs.append(lambda o, p=path, v=value: _field_value(o, p) == v)
    return reqs


@dataclass
class _Query:
    """Where a LIST/WATCH looks: one resource, optionally one namespace, selectors."""

    info: KindInfo
    namespace: str | None  # None: all namespaces (or cluster-scoped)
    labels: list[_Requirement] = field(default_factory=list)
    fields: list[Callable[[Obj], bool]] = field(default_factory=list)

    def matches(self, obj: Obj | None) -> bool:
        if obj is None:
            return False
        meta = obj.get("metadata", {})
        if self.namespace is not None and meta.get("namespace", "") != self.namespace:
            return False
        lb = meta.get("labels") or {}
        return all(r(lb) for r in self.labels) and all(r(obj) for r in self.fields)

    @property
    def has_selectors(self) -> bool:
        return bool(self.labels or self.fields)


# ----------------------------------------------------------------------------- watches


@dataclass(eq=False)  # hashed by identity: kept in a set
class _Watch:
    """Bookkeeping for one open watch, so knobs can find and abort it."""

    conn: socket.socket
    plural: str
    aborted: bool = False


# ----------------------------------------------------------------------------- server


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _fill_required(plural: str, obj: Obj) -> None:
    """Fill fields the real API server requires, so tests can write short manifests.

    A real server rejects a pod without containers; the ``kubernetes`` client (pydantic
    models) refuses to deserialize one.  Tests care about labels, IPs and nodes, so a
    missing container list gets a pause container instead of an error.
    """
    if plural == "pods":
        spec = obj.setdefault("spec", {})
        if not spec.get("containers"):
            spec["containers"] = [{"name": "main", "image": "registry.k8s.io/pause:3.10"}]


def _jsoncopy(obj: Obj) -> Obj:
    """Deep copy that also proves the object is JSON (what the wire would carry)."""
    return json.loads(json.dumps(obj))


class _HTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer knowing its FakeApiServer and its address family."""

    daemon_threads = True
    allow_reuse_address = True  # come_back() rebinds the same port right away

    def __init__(self, addr: tuple[str, int], fake: FakeApiServer, family: int) -> None:
        self.address_family = family
        self.fake = fake
        super().__init__(addr, _Handler)


class FakeApiServer:
    """A fake kube-apiserver for tests; see the module docstring for semantics.

    Thread safety: one Condition (``_cond``) guards all state; watch handlers wait on it
    for new events, mutations notify it.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        history_size: int = 1000,
        bookmark_interval: float = 1.0,
        expired_watch_mode: Literal["event", "http"] = "event",
        start_resource_version: int = 1,
        netns: str | None = None,
    ) -> None:
        """Create the server (not listening until :meth:`start`).

        ``host`` must be a loopback address: this server has no authentication. With
        ``netns`` (a lab's own network namespace) it listens inside that namespace instead,
        on an address of that namespace, so agents running there (and on lab nodes linked
        to it) reach it.
        ``expired_watch_mode``: how a watch from a compacted rv fails -- ``"event"`` (HTTP
        200, then an ERROR event with a 410 Status, like the watch cache) or ``"http"``
        (HTTP 410 on the request itself, like a watch served from etcd).
        """
        if netns is None and host != "localhost" and not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"FakeApiServer listens on loopback only, not {host!r}")
        self.host = host
        self.netns = netns
        self._family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._port = port
        self.history_size = history_size
        self.bookmark_interval = bookmark_interval
        self.expired_watch_mode = expired_watch_mode

        self._cond = threading.Condition()
        self._objects: dict[str, dict[Key, Obj]] = {k: {} for k in KINDS}
        self._rv = start_resource_version
        self._compacted_rv = start_resource_version  # events with rv > this are retained
        self._history: collections.deque[_Event] = collections.deque()
        self._watches: set[_Watch] = set()
        self._conns: set[socket.socket] = set()
        self._silent = False
        self._closing = False
        self._request_log: list[tuple[str, str]] = []
        # plural -> (rv, sorted keys, objects in that order): the snapshot a paginated LIST
        # walks. A snapshot at an rv never changes (stored objects are replaced, never
        # edited), so it stays valid for every page of that list.
        self._snapshots: dict[str, tuple[int, list[Key], list[Obj]]] = {}

        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        """The bound port (stable across go_away/come_back)."""
        return self._port

    @property
    def url(self) -> str:
        """Base URL for clients, e.g. ``http://127.0.0.1:PORT``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._port}"

    def start(self) -> FakeApiServer:
        """Bind and serve in a daemon thread.  Returns self for chaining."""
        with self._cond:
            self._closing = False
        self._listen()
        return self

    def stop(self) -> None:
        """Stop listening, close every connection (watches end at once), wait for handlers."""
        self._shutdown_http()

    def __enter__(self) -> FakeApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def go_away(self) -> None:
        """Simulate the API server disappearing: stop listening, drop all connections.

        New connections are refused until :meth:`come_back`; state is kept.
        """
        self._shutdown_http()

    def come_back(self) -> None:
        """Listen again on the same port with the same state (after :meth:`go_away`)."""
        with self._cond:
            self._closing = False
        self._listen()

    def _listen(self) -> None:
        if self._httpd is not None:
            raise RuntimeError("FakeApiServer is already listening")
        if self.netns is not None:
            from np_lab.nsenter import in_netns

            with in_netns(self.netns):
                httpd = _HTTPServer((self.host, self._port), self, self._family)
        else:
            httpd = _HTTPServer((self.host, self._port), self, self._family)
        self._port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"fakeapi:{self._port}",
            daemon=True,
        )
        self._thread.start()

    def _shutdown_http(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        with self._cond:
            self._closing = True
            for w in self._watches:
                w.aborted = True
            for conn in list(self._conns):
                _abort_socket(conn)
            self._cond.notify_all()
            # Handlers notice the closed sockets quickly; wait so that "stopped" means
            # no handler thread is still touching state or sockets.
            deadline = time.monotonic() + 5
            while self._conns and time.monotonic() < deadline:
                self._cond.wait(0.05)

    # ------------------------------------------------------------------ client helpers

    def kubeconfig(self, path: str | os.PathLike[str]) -> str:
        """Write a kubeconfig for this server (plain http, no auth); return its path.

        Usable with ``kubernetes.config.load_kube_config(config_file=path)``.  JSON is
        valid YAML, so no YAML library is needed here.
        """
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {}}],
            "contexts": [
                {"name": "fake", "context": {"cluster": "fake", "user": "fake"}},
            ],
            "current-context": "fake",
        }
        with open(path, "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2)
        return os.fspath(path)

    def client_configuration(self) -> Any:
        """A ``kubernetes.client.Configuration`` pointing at this server (no proxy)."""
        from kubernetes import client  # imported lazily: the server itself is stdlib-only

        cfg = client.Configuration()
        cfg.host = self.url
        cfg.proxy = None  # an HTTP(S)_PROXY in the environment must not capture loopback
        return cfg

    # ------------------------------------------------------------------ state API (test side)

    @staticmethod
    def _info(plural: str) -> KindInfo:
        try:
            return KINDS[plural]
        except KeyError:
            raise ValueError(f"unknown kind {plural!r}; expected one of {sorted(KINDS)}") from None

    @staticmethod
    def _key(info: KindInfo, namespace: str | None, name: str) -> Key:
        return (namespace or "default") if info.namespaced else "", name

    def create(self, kind: str, obj: Obj) -> Obj:
        """Create an object (like ``kubectl create``); returns the stored copy.

        Fills apiVersion/kind, metadata.uid (if absent), creationTimestamp,
        resourceVersion, generation; namespaced objects without a namespace go to
        ``default``.  Raises :class:`FakeApiError` 409 if it exists.
        """
        info = self._info(kind)
        new = _jsoncopy(obj)
        _fill_required(kind, new)
        meta = new.setdefault("metadata", {})
        with self._cond:
            key = self._admit(kind, info, new)
            meta["creationTimestamp"] = _now()
            meta["generation"] = 1
            return self._commit(kind, key, "ADDED", new, None)

    def _admit(self, kind: str, info: KindInfo, obj: Obj) -> Key:
        """A new object's key, after the checks and defaults every create makes (caller
        holds the lock): a name, not yet stored, namespace as the kind wants, type meta."""
        meta = obj["metadata"]
        name = meta.get("name")
        if not name:
            raise FakeApiError(422, "Invalid", f"{kind}: metadata.name: Required value")
        key = self._key(info, meta.get("namespace"), name)
        if key in self._objects[kind]:
            raise FakeApiError(409, "AlreadyExists", f'{kind} "{name}" already exists')
        if info.namespaced:
            meta["namespace"] = key[0]
        else:
            meta.pop("namespace", None)
        obj["apiVersion"] = info.api_version
        obj["kind"] = info.kind
        meta.setdefault("uid", str(uuid.uuid4()))
        return key

    def update(self, kind: str, obj: Obj, *, check_resource_version: bool = False) -> Obj:
        """Replace an existing object (spec and status, like PUT); returns the stored copy.

        Last write wins unless ``check_resource_version`` (then a stale
        metadata.resourceVersion gets 409 Conflict, like a real PUT).  uid and
        creationTimestamp are kept; generation bumps when ``spec`` changes.
        """
        info = self._info(kind)
        new = _jsoncopy(obj)
        _fill_required(kind, new)
        meta = new.setdefault("metadata", {})
        name = meta.get("name", "")
        with self._cond:
            key = self._key(info, meta.get("namespace"), name)
            old = self._objects[kind].get(key)
            if old is None:
                raise FakeApiError(404, "NotFound", f'{kind} "{name}" not found')
            old_meta = old["metadata"]
            if (
                check_resource_version
                and meta.get("resourceVersion")
                and meta["resourceVersion"] != old_meta["resourceVersion"]
            ):
                raise FakeApiError(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on {kind} "{name}": the object has been '
                    "modified; please apply your changes to the latest version and try again",
                )
            if info.namespaced:
                meta["namespace"] = key[0]
            new["apiVersion"] = info.api_version
            new["kind"] = info.kind
            meta["uid"] = old_meta["uid"]
            meta["creationTimestamp"] = old_meta["creationTimestamp"]
            gen = old_meta.get("generation", 1)
            meta["generation"] = gen + 1 if new.get("spec") != old.get("spec") else gen
            return self._commit(kind, key, "MODIFIED", new, old)

    def apply(self, kind: str, obj: Obj) -> Obj:
        """Create or update (convenience for tests that do not care which)."""
        info = self._info(kind)
        meta = obj.get("metadata", {})
        with self._cond:
            exists = (
                self._key(info, meta.get("namespace"), meta.get("name", "")) in self._objects[kind]
            )
            return self.update(kind, obj) if exists else self.create(kind, obj)

    def delete(self, kind: str, namespace: str, name: str) -> Obj:
        """Delete at once (no graceful termination); returns the last state.

        The DELETED event carries that last state with a new resourceVersion, as etcd
        does.  Raises :class:`FakeApiError` 404 if absent.
        """
        info = self._info(kind)
        with self._cond:
            key = self._key(info, namespace, name)
            old = self._objects[kind].get(key)
            if old is None:
                raise FakeApiError(404, "NotFound", f'{kind} "{name}" not found')
            return self._commit(kind, key, "DELETED", copy.deepcopy(old), old)

    def load(self, kind: str, objs: Iterable[Obj]) -> int:
        """Store many new objects at once, as a server that already held them would;
        returns how many.

        For benchmarks with a large cluster's worth of state, where :meth:`create` (a JSON
        copy in, a deep copy out, one event each) would cost minutes and gigabytes. The
        objects are stored as given, not copied: they may share sub-objects (replicas of a
        Deployment sharing their spec), but each needs its own top-level dict and
        ``metadata`` (apiVersion, kind, resourceVersion and the defaults of :meth:`create`
        are written into them), and the caller must not modify them afterwards. No events
        are recorded: the history is compacted past them (watches from an older
        resourceVersion get 410 and relist, as after an etcd compaction). Raises
        :class:`FakeApiError` 409 on an existing name, leaving the objects before it loaded.
        """
        info = self._info(kind)
        count = 0
        with self._cond:
            store = self._objects[kind]
            try:
                for obj in objs:
                    meta = obj.setdefault("metadata", {})
                    _fill_required(kind, obj)
                    key = self._admit(kind, info, obj)
                    meta.setdefault("creationTimestamp", _now())
                    self._rv += 1
                    meta["resourceVersion"] = str(self._rv)
                    store[key] = obj
                    count += 1
            finally:
                self._history.clear()
                self._compacted_rv = self._rv
                self._cond.notify_all()
        return count

    def get(self, kind: str, namespace: str, name: str) -> Obj | None:
        """A copy of the stored object, or None."""
        info = self._info(kind)
        with self._cond:
            obj = self._objects[kind].get(self._key(info, namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def list_objects(self, kind: str, namespace: str | None = None) -> list[Obj]:
        """Copies of the stored objects of a kind (optionally one namespace), sorted."""
        info = self._info(kind)
        with self._cond:
            query = _Query(info, namespace if info.namespaced else None)
            return [copy.deepcopy(o) for _, o in self._sorted(self._objects[kind], query)]

    @property
    def resource_version(self) -> int:
        """The current global resourceVersion (rv of the last mutation)."""
        with self._cond:
            return self._rv

    def _commit(self, kind: str, key: Key, type_: str, new: Obj, old: Obj | None) -> Obj:
        """Bump the rv, store, record the event, wake watchers.  Caller holds the lock."""
        self._rv += 1
        new["metadata"]["resourceVersion"] = str(self._rv)
        if type_ == "DELETED":
            del self._objects[kind][key]
        else:
            self._objects[kind][key] = new
        self._history.append(_Event(self._rv, kind, type_, new, old))
        while len(self._history) > max(self.history_size, 0):
            self._compacted_rv = self._history.popleft().rv
        self._cond.notify_all()
        return copy.deepcopy(new)

    # ------------------------------------------------------------------ failure knobs

    def compact(self) -> None:
        """Drop all event history: any watch or continue token from an older rv gets 410.

        Watches that are open and caught up keep running, as with etcd compaction.
        """
        with self._cond:
            self._history.clear()
            self._compacted_rv = self._rv
            self._cond.notify_all()

    def drop_watches(self) -> int:
        """Abruptly close every open watch connection (no final chunk); returns how many."""
        with self._cond:
            for w in self._watches:
                w.aborted = True
                _abort_socket(w.conn)
            self._cond.notify_all()
            return len(self._watches)

    def silent_watches(self, silent: bool = True) -> None:
        """Make watches (open and new) send nothing at all -- no events, no bookmarks, no
        timeout close -- like a half-dead connection, so only a client read timeout notices.

        ``silent_watches(False)`` lets still-open watches resume where they were.
        """
        with self._cond:
            self._silent = silent
            self._cond.notify_all()

    def watch_count(self) -> int:
        """Number of watch streams currently open."""
        with self._cond:
            return len(self._watches)

    def wait_for_watches(self, n: int, timeout: float = 5.0) -> bool:
        """Wait until exactly ``n`` watches are open (tests use it to avoid sleeping)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._watches) != n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
            return True

    @property
    def request_log(self) -> list[tuple[str, str]]:
        """(method, path?query) of every request received, oldest first (a copy)."""
        with self._cond:
            return list(self._request_log)

    def clear_request_log(self) -> None:
        """Forget logged requests (to assert on what happens next only)."""
        with self._cond:
            self._request_log.clear()

    # ------------------------------------------------------------------ internals: reads

    @staticmethod
    def _sorted(objs: dict[Key, Obj], query: _Query) -> list[tuple[Key, Obj]]:
        """Matching objects in etcd key order (namespace, name)."""
        return sorted((kv for kv in objs.items() if query.matches(kv[1])), key=lambda kv: kv[0])

    def _state_at(self, plural: str, rv: int) -> dict[Key, Obj]:
        """The objects of a kind as they were at ``rv`` (>= compaction point), from history."""
        state = dict(self._objects[plural])
        info = KINDS[plural]
        for ev in reversed(self._history):
            if ev.rv <= rv:
                break
            if ev.plural != plural:
                continue
            meta = ev.obj["metadata"]
            key = self._key(info, meta.get("namespace"), meta["name"])
            if ev.prev is None:
                state.pop(key, None)
            else:
                state[key] = ev.prev
        return state

    def _list(self, query: _Query, params: dict[str, str]) -> Obj:
        """A LIST response (caller holds the lock)."""
        info = query.info
        limit_s = params.get("limit", "")
        try:
            limit = int(limit_s) if limit_s else 0
        except ValueError:
            raise FakeApiError(400, "BadRequest", f"invalid limit {limit_s!r}") from None
        after: Key | None = None
        token = params.get("continue", "")
        if token:
            rv, after = _decode_continue(token)
            if rv < self._compacted_rv:
                raise FakeApiError(
                    410,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent "
                    "list result. You can start a new list without the continue parameter.",
                )
        else:
            rv = self._rv
        keys, objs = self._snapshot(info.plural, rv)
        lo, hi = 0, len(keys)
        if query.namespace is not None and info.namespaced:  # keys sort by namespace first
            lo = bisect.bisect_left(keys, (query.namespace, ""))
            hi = bisect.bisect_left(keys, (query.namespace + "\0", ""), lo)
        start = lo if after is None else bisect.bisect_right(keys, after, lo, hi)
        meta: Obj = {"resourceVersion": str(rv)}
        if not query.has_selectors:  # every object in [start, hi) matches
            end = hi if limit <= 0 else min(hi, start + limit)
            page = list(range(start, end))
            if end < hi:
                meta["remainingItemCount"] = hi - end
        else:
            page = []
            end = start
            while end < hi and (limit <= 0 or len(page) < limit):
                if query.matches(objs[end]):
                    page.append(end)
                end += 1
            while end < hi and not query.matches(objs[end]):
                end += 1
        if end < hi:
            meta["continue"] = _encode_continue(rv, keys[page[-1]])
        return {
            "kind": f"{info.kind}List",
            "apiVersion": info.api_version,
            "metadata": meta,
            "items": [objs[i] for i in page],
        }

    def _snapshot(self, plural: str, rv: int) -> tuple[list[Key], list[Obj]]:
        """The objects of a kind at ``rv``, sorted by key (caller holds the lock): built once
        per list, then every page of it is a bisect away."""
        cached = self._snapshots.get(plural)
        if cached is not None and cached[0] == rv:
            return cached[1], cached[2]
        state = self._objects[plural] if rv == self._rv else self._state_at(plural, rv)
        keys = sorted(state)
        objs = [state[k] for k in keys]
        self._snapshots[plural] = (rv, keys, objs)
        return keys, objs

    def _events_since(self, pos: int, query: _Query) -> list[tuple[str, Obj]]:
        """Events after ``pos`` visible through ``query`` (caller holds the lock).

        With selectors, transitions into/out of the selection become ADDED/DELETED.
        """
        plural = query.info.plural
        newer: list[_Event] = []
        for ev in reversed(self._history):
            if ev.rv <= pos:
                break
            if ev.plural == plural:
                newer.append(ev)
        out: list[tuple[str, Obj]] = []
        for ev in reversed(newer):
            if ev.type == "DELETED":
                if query.matches(ev.obj):
                    out.append(("DELETED", ev.obj))
                continue
            now_in, was_in = query.matches(ev.obj), query.matches(ev.prev)
            if now_in and was_in:
                out.append(("MODIFIED", ev.obj))
            elif now_in:
                out.append(("ADDED", ev.obj))
            elif was_in:
                out.append(("DELETED", ev.obj))
        return out

    # ------------------------------------------------------------------ internals: watch

    def _watch(self, handler: _Handler, query: _Query, params: dict[str, str]) -> None:
        """Serve one watch stream until timeout, abort, client disconnect or 410."""
        rv_s = params.get("resourceVersion", "")
        try:
            rv = int(rv_s) if rv_s else 0
        except ValueError:
            raise FakeApiError(
                400, "BadRequest", f"resourceVersion: Invalid value: {rv_s!r}"
            ) from None
        timeout_s = params.get("timeoutSeconds", "")
        try:
            timeout = float(timeout_s) if timeout_s else None
        except ValueError:
            raise FakeApiError(400, "BadRequest", f"invalid timeoutSeconds {timeout_s!r}") from None
        bookmarks = params.get("allowWatchBookmarks", "").lower() in ("true", "1")
        info = query.info

        def bookmark(at: int) -> Obj:
            return {
                "type": "BOOKMARK",
                "object": {
                    "kind": info.kind,
                    "apiVersion": info.api_version,
                    "metadata": {"resourceVersion": str(at)},
                },
            }

        def expired(at: int) -> Obj:
            return {
                "type": "ERROR",
                "object": _status(
                    410, "Expired", f"too old resource version: {at} ({self._compacted_rv})"
                ),
            }

        out: list[Obj] = []
        finished = False  # send what is in `out`, then end the stream cleanly
        with self._cond:
            if rv == 0:
                out = [
                    {"type": "ADDED", "object": o}
                    for _, o in self._sorted(self._objects[info.plural], query)
                ]
                pos = self._rv
            elif rv < self._compacted_rv and self.expired_watch_mode == "http":
                raise FakeApiError(
                    410, "Expired", f"too old resource version: {rv} ({self._compacted_rv})"
                )
            else:
                pos = rv  # the loop below reports 410 if pos is below the compaction point
            if self._silent:
                out = []  # a silent server does not even replay the initial state
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.send_header("Cache-Control", "no-cache, private")
        handler.end_headers()
        # Registered only now: a knob that aborts "open watches" must find ones whose
        # response has started, or the client would see a request without a response
        # (urllib3 then silently retries it) instead of a broken stream.
        watch = _Watch(handler.connection, info.plural)
        with self._cond:
            self._watches.add(watch)
            self._cond.notify_all()
        try:
            start = time.monotonic()
            deadline = start + timeout if timeout is not None else None
            next_bookmark = start + self.bookmark_interval
            while True:
                for ev in out:
                    handler.write_chunk(json.dumps(ev).encode() + b"\n")
                if finished:
                    handler.write_chunk(b"")  # clean end of the chunked stream
                    return
                out = []
                with self._cond:
                    while not out and not finished:
                        if watch.aborted or self._closing:
                            handler.close_connection = True
                            return
                        now = time.monotonic()
                        wait = 0.2  # also the granularity of client-disconnect checks
                        if not self._silent:
                            if pos < self._compacted_rv:  # fell behind a compaction
                                out, finished = [expired(pos)], True
                                break
                            out = [
                                {"type": t, "object": o} for t, o in self._events_since(pos, query)
                            ]
                            pos = self._rv
                            if out:
                                break
                            if deadline is not None and now >= deadline:
                                finished = True
                                if bookmarks:
                                    out = [bookmark(pos)]
                                break
                            if bookmarks and now >= next_bookmark:
                                out = [bookmark(pos)]
                                next_bookmark = now + self.bookmark_interval
                                break
                            if deadline is not None:
                                wait = min(wait, deadline - now)
                            if bookmarks:
                                wait = min(wait, next_bookmark - now)
                        self._cond.wait(max(wait, 0.001))
                        if _peer_closed(handler.connection):
                            handler.close_connection = True
                            return
        except OSError:  # client went away or drop_watches() shut the socket down
            handler.close_connection = True
        finally:
            with self._cond:
                self._watches.discard(watch)
                self._cond.notify_all()

    # ------------------------------------------------------------------ internals: HTTP

    def _log_request(self, method: str, path: str) -> None:
        with self._cond:
            self._request_log.append((method, path))

    def _register_conn(self, conn: socket.socket) -> bool:
        with self._cond:
            if self._closing:
                return False
            self._conns.add(conn)
            return True

    def _unregister_conn(self, conn: socket.socket) -> None:
        with self._cond:
            self._conns.discard(conn)
            self._cond.notify_all()

    def _dispatch(self, handler: _Handler, method: str) -> None:
        split = urlsplit(handler.path)
        params = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        try:
            info, namespace, name, sub = _route(split.path)
            if method == "GET":
                watch = params.get("watch", "").lower() in ("true", "1")
                if name is None:
                    query = _Query(info, namespace)
                    query.labels = _parse_label_selector(params.get("labelSelector", ""))
                    query.fields = _parse_field_selector(params.get("fieldSelector", ""), info)
                    if watch:
                        self._watch(handler, query, params)
                        return
                    with self._cond:
                        body = json.dumps(self._list(query, params)).encode()
                    handler.send_json(200, body)
                    return
                with self._cond:
                    obj = self._objects[info.plural].get(self._key(info, namespace, name))
                    if obj is None:
                        raise FakeApiError(404, "NotFound", f'{info.plural} "{name}" not found')
                    body = json.dumps(obj).encode()
                handler.send_json(200, body)
                return
            body_obj = handler.read_json() if method in ("POST", "PUT") else None
            if method == "POST" and name is None:
                meta = body_obj.setdefault("metadata", {})
                if info.namespaced:
                    if namespace is None:
                        raise FakeApiError(405, "MethodNotAllowed", "POST needs a namespace")
                    if meta.setdefault("namespace", namespace) != namespace:
                        raise FakeApiError(
                            400, "BadRequest", "the namespace of the object does not match"
                        )
                handler.send_json(201, json.dumps(self.create(info.plural, body_obj)).encode())
            elif method == "PUT" and name is not None:
                meta = body_obj.setdefault("metadata", {})
                if meta.get("name") != name:
                    raise FakeApiError(400, "BadRequest", "the name of the object does not match")
                if info.namespaced:
                    meta["namespace"] = namespace
                if sub == "status":  # status subresource: only status changes
                    current = self.get(info.plural, namespace or "", name)
                    if current is None:
                        raise FakeApiError(404, "NotFound", f'{info.plural} "{name}" not found')
                    current["status"] = body_obj.get("status", {})
                    current["metadata"]["resourceVersion"] = meta.get("resourceVersion")
                    body_obj = current
                updated = self.update(info.plural, body_obj, check_resource_version=True)
                handler.send_json(200, json.dumps(updated).encode())
            elif method == "DELETE" and name is not None:
                last = self.delete(info.plural, namespace or "", name)
                if info.plural in ("pods", "namespaces"):  # these return the object
                    handler.send_json(200, json.dumps(last).encode())
                else:
                    status = {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "metadata": {},
                        "status": "Success",
                        "details": {
                            "name": name,
                            "kind": info.plural,
                            "uid": last["metadata"]["uid"],
                        },
                    }
                    handler.send_json(200, json.dumps(status).encode())
            else:
                raise FakeApiError(405, "MethodNotAllowed", f"{method} not allowed here")
        except FakeApiError as e:
            handler.send_json(e.code, json.dumps(e.status()).encode())


def _route(path: str) -> tuple[KindInfo, str | None, str | None, str | None]:
    """Map a REST path to (resource, namespace, name, subresource)."""
    segs = [s for s in path.split("/") if s]
    for info in KINDS.values():
        n = len(info.prefix)
        if tuple(segs[:n]) != info.prefix:
            continue
        rest = segs[n:]
        if (
            info.namespaced
            and len(rest) >= 3
            and rest[0] == "namespaces"
            and rest[2] == info.plural
        ):
            if len(rest) <= 5 and (len(rest) < 5 or rest[4] == "status"):
                return (
                    info,
                    rest[1],
                    rest[3] if len(rest) > 3 else None,
                    rest[4] if len(rest) > 4 else None,
                )
        elif rest and rest[0] == info.plural and len(rest) <= 3:
            if info.namespaced and len(rest) > 1:
                continue
            if len(rest) < 3 or rest[2] == "status":
                return (
                    info,
                    None,
                    rest[1] if len(rest) > 1 else None,
                    rest[2] if len(rest) > 2 else None,
                )
    raise FakeApiError(404, "NotFound", f"the server could not find the requested resource {path}")


def _encode_continue(rv: int, after: Key) -> str:
    raw = json.dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": list(after)}).encode()
    return base64.urlsafe_b64encode(raw).decode()


def _decode_continue(token: str) -> tuple[int, Key]:
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
        return int(data["rv"]), (str(data["start"][0]), str(data["start"][1]))
    except (ValueError, KeyError, IndexError, TypeError, binascii.Error):
        raise FakeApiError(400, "BadRequest", "continue key is not valid") from None


def _abort_socket(conn: socket.socket) -> None:
    """Shut a connection down both ways: the peer sees EOF, our blocked reads return."""
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)


def _peer_closed(conn: socket.socket) -> bool:
    """True if the client closed its end (EOF or reset), checked without blocking."""
    try:
        readable, _, _ = select.select([conn], [], [], 0)
        if not readable:
            return False
        return conn.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive, as the client's urllib3 pool expects."""

    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        self._registered = self.server.fake._register_conn(self.connection)
        if not self._registered:
            self.close_connection = True

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        if self._registered:
            self.server.fake._unregister_conn(self.connection)

    def handle(self) -> None:
        if not self._registered:
            return
        with contextlib.suppress(OSError):
            super().handle()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests assert on ``request_log`` instead of reading stderr."""

    def _serve(self, method: str) -> None:
        self.server.fake._log_request(method, self.path)
        try:
            self.server.fake._dispatch(self, method)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def read_json(self) -> Obj:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            obj = json.loads(raw or b"{}")
        except ValueError:
            raise FakeApiError(400, "BadRequest", "body is not JSON") from None
        if not isinstance(obj, dict):
            raise FakeApiError(400, "BadRequest", "body is not a JSON object")
        return obj

    def send_json(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def write_chunk(self, data: bytes) -> None:
        """One chunk, sent at once (wfile is unbuffered): each watch event is flushed."""
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()
