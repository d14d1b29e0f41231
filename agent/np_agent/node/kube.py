"""List-then-watch of the API objects np-agent needs, with the real `kubernetes` client.

One ``Reflector`` thread per resource kind:

* list (paginated) to get a consistent snapshot and its resourceVersion, hand it over whole;
* watch from that resourceVersion with bookmarks, handing over each event; bookmarks only
  move the resourceVersion forward;
* ``410 Gone`` (an ERROR event or an HTTP 410: the resourceVersion was compacted away) means
  relist; any other failure (connection refused, dropped stream, a watch that stays silent
  past the read timeout) means retry the watch from the last resourceVersion, after a capped
  exponential backoff with jitter, so an API server coming back is not stampeded.

Responses are read raw (``_preload_content=False``) and parsed straight into the model: the
client's generated classes would hold every field of thousands of pods for nothing.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from np_agent.memory import release

log = logging.getLogger("np_agent.kube")

KINDS = ("namespaces", "pods", "networkpolicies", "nodes")


class Handler(Protocol):
    def replace(self, kind: str, items: list[dict[str, Any]]) -> None:
        """A full list. ``items`` is emptied after the call: keep what you need, not it."""
    def event(self, kind: str, type_: str, obj: dict[str, Any]) -> None: ...


@dataclass
class WatchOptions:
    page_size: int = 500
    watch_timeout: int = 300  # seconds the server keeps one watch open
    read_timeout: float = 90.0  # silence longer than this means a dead connection
    connect_timeout: float = 5.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0


class Backoff:
    """Capped exponential backoff with full jitter."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial, self.maximum, self.attempt = initial, maximum, 0

    def next(self) -> float:
        ceiling = min(self.maximum, self.initial * 2 ** self.attempt)
        self.attempt += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0


class Gone(Exception):
    """The resourceVersion is too old: relist."""


def list_functions(api_client: Any) -> dict[str, Callable[..., Any]]:
    from kubernetes import client

    core = client.CoreV1Api(api_client)
    net = client.NetworkingV1Api(api_client)
    return {"namespaces": core.list_namespace, "pods": core.list_pod_for_all_namespaces,
            "networkpolicies": net.list_network_policy_for_all_namespaces,
            "nodes": core.list_node}


def pod_getter(api_client: Any, timeout: float = 2.0) -> Callable[[str, str], dict[str, Any]]:
    """One GET of one pod, raw JSON, with a short timeout: np-cni's ADD waits for it (see
    cniserver: a pod the watch has not delivered yet). Raises on any failure."""
    from kubernetes import client

    core = client.CoreV1Api(api_client)

    def get(namespace: str, name: str) -> dict[str, Any]:
        resp = core.read_namespaced_pod(name, namespace, _preload_content=False,
                                        _request_timeout=(min(timeout, 1.0), timeout))
        return json.loads(resp.data)

    return get


class Reflector(threading.Thread):
    def __init__(self, kind: str, list_fn: Callable[..., Any], handler: Handler,
                 stop: threading.Event, options: WatchOptions | None = None,
                 on_error: Callable[[str, Exception], None] | None = None) -> None:
        super().__init__(name=f"watch-{kind}", daemon=True)
        self.kind, self.list_fn, self.handler, self.stop_event = kind, list_fn, handler, stop
        self.opts = options or WatchOptions()
        self.on_error = on_error
        self.resource_version: str | None = None
        self.synced = threading.Event()  # set after the first complete list
        self.lists = 0  # how many times we listed (1 + relists after 410)

    def run(self) -> None:
        from kubernetes.client.exceptions import ApiException

        backoff = Backoff(self.opts.backoff_initial, self.opts.backoff_max)
        while not self.stop_event.is_set():
            try:
                if self.resource_version is None:
                    self._list()
                self._watch()
                backoff.reset()
            except Gone:
                log.info("%s: resourceVersion %s expired (410), relisting", self.kind,
                         self.resource_version)
                self.resource_version = None
            except ApiException as e:
                if e.status == 410:
                    self.resource_version = None
                    continue
                self._failed(e, backoff)
            except Exception as e:  # noqa: BLE001 - connection errors come in many classes
                self._failed(e, backoff)

    def _failed(self, error: Exception, backoff: Backoff) -> None:
        delay = backoff.next()
        log.warning("%s: API request failed (%s: %s); retrying in %.1f s, the dataplane keeps "
                    "its rules", self.kind, type(error).__name__, str(error)[:200], delay)
        if self.on_error:
            self.on_error(self.kind, error)
        self.stop_event.wait(delay)

    def _timeouts(self, read: float) -> tuple[float, float]:
        return (self.opts.connect_timeout, read)

    def _list(self) -> None:
        items: list[dict[str, Any]] = []
        token: str | None = None
        rv = ""
        while True:
            kwargs: dict[str, Any] = {"limit": self.opts.page_size, "_preload_content": False,
                                      "_request_timeout": self._timeouts(60.0)}
            if token:
                kwargs["_continue"] = token
            resp = self.list_fn(**kwargs)
            data = json.loads(resp.data)
            items.extend(data.get("items") or [])
            meta = data.get("metadata") or {}
            rv = rv or meta.get("resourceVersion", "")
            token = meta.get("continue")
            if not token:
                break
        self.handler.replace(self.kind, items)
        count = len(items)
        items.clear()  # the raw list is the biggest thing this process ever holds
        release()
        self.resource_version = rv
        self.lists += 1
        self.synced.set()
        log.info("%s: listed %d objects at resourceVersion %s", self.kind, count, rv)

    def _watch(self) -> None:
        from kubernetes.watch.watch import iter_resp_lines

        resp = self.list_fn(watch=True, resource_version=self.resource_version,
                            allow_watch_bookmarks=True, timeout_seconds=self.opts.watch_timeout,
                            _preload_content=False,
                            _request_timeout=self._timeouts(self.opts.read_timeout))
        try:
            for line in iter_resp_lines(resp):
                if self.stop_event.is_set():
                    return
                if line.strip():
                    self._event(json.loads(line))
        finally:
            resp.close()
            resp.release_conn()

    def _event(self, ev: dict[str, Any]) -> None:
        type_, obj = ev.get("type"), ev.get("object") or {}
        if type_ == "ERROR":
            if obj.get("code") == 410:
                raise Gone()
            raise RuntimeError(f"watch error {obj.get('code')}: {obj.get('message')}")
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if type_ in ("ADDED", "MODIFIED", "DELETED"):
            self.handler.event(self.kind, type_, obj)
        if rv:
            self.resource_version = rv


def api_client(kubeconfig: str | None) -> Any:
    """In-cluster configuration by default; a kubeconfig file when given."""
    from kubernetes import client, config

    if kubeconfig:
        return config.new_client_from_config(config_file=kubeconfig)
    config.load_incluster_config()
    return client.ApiClient()
