"""List-then-watch of the API objects np-agent needs, with the real `kubernetes` client.

One ``Reflector`` thread per resource kind:

* list (paginated) to get a consistent snapshot and its resourceVersion, handed over page by
  page as it arrives (``Handler.replace``): the handler parses each page into the model and
  swaps the whole in once the last page is in;
* watch from that resourceVersion with bookmarks, handing over each event; bookmarks only
  move the resourceVersion forward;
* ``410 Gone`` (an ERROR event or an HTTP 410: the resourceVersion, or a list's continue
  token, was compacted away) means relist; any other failure (connection refused, dropped
  stream, a watch that stays silent past the read timeout) means retry the watch from the
  last resourceVersion, after a capped exponential backoff with jitter, so an API server
  coming back is not stampeded.

Responses are read raw (``_preload_content=False``) and parsed straight into the model: the
client's generated classes would hold every field of thousands of pods for nothing. At most
one page of raw JSON is alive at a time: 150,000 pods as dicts are gigabytes, a page of 500
is a few megabytes, and the parsed model of all of them a small fraction of that.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from np_agent.memory import gc_paused, release

log = logging.getLogger("np_agent.kube")

KINDS = ("namespaces", "pods", "networkpolicies", "nodes")


Page = list[dict[str, Any]]


class Handler(Protocol):
    def replace(self, kind: str, pages: Iterable[Page]) -> None:
        """A full list of ``kind`` (first list, or relist after 410), one page at a time.

        Pages are fetched as the handler iterates, and each is emptied when the next one is
        asked for: parse it and keep the parsed objects, never the page. Iterating raises
        when the API fails midway; the handler must then leave its previous state as it was
        (the relist that follows hands over a complete list), so the new state is swapped in
        only after the last page: a partial list would drop pods and policies, i.e. open.
        """

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
        return json.loads(read_body(core.read_namespaced_pod(
            name, namespace, _preload_content=False,
            _request_timeout=(min(timeout, 1.0), timeout))))

    return get


def read_body(resp: Any) -> bytes:
    """The body of a raw (``_preload_content=False``) response, and the connection back to
    the pool. ``resp.read()``, not ``resp.data``: that one keeps the bytes in the response."""
    try:
        return resp.read()
    finally:
        resp.release_conn()


class Listing:
    """One paginated list call, fetched page by page as :meth:`pages` is iterated.

    ``resource_version`` is the snapshot's (the first page's: every page of a list is served
    from the same snapshot); ``complete`` turns true only after the last page.
    """

    def __init__(self, list_fn: Callable[..., Any], page_size: int,
                 timeouts: tuple[float, float]) -> None:
        self.list_fn, self.page_size, self.timeouts = list_fn, page_size, timeouts
        self.resource_version = ""
        self.items = 0
        self.pages_read = 0
        self.complete = False

    def pages(self) -> Iterator[Page]:
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"limit": self.page_size, "_preload_content": False,
                                      "_request_timeout": self.timeouts}
            if token:
                kwargs["_continue"] = token
            body = read_body(self.list_fn(**kwargs))
            with gc_paused():  # from decoding to freeing: the page's lifetime, not the I/O
                data = json.loads(body)
                del body
                meta = data.get("metadata") or {}
                page: Page = data.get("items") or []
                del data  # the page list is all that stays of the response
                if not self.resource_version:
                    self.resource_version = meta.get("resourceVersion", "")
                token = meta.get("continue")
                self.items += len(page)
                self.pages_read += 1
                yield page
                page.clear()  # parsed by now: its dicts go before the next page is read
                del page
            if not token:
                break
        self.complete = True


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
                if e.status == 410:  # a watch, or a list's continue token, expired
                    log.info("%s: 410 Gone (%s), relisting", self.kind, e.reason)
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
        """Hand the handler a full list, page by page; on any failure (raised from the page
        iterator through the handler) nothing here changes and the caller relists."""
        listing = Listing(self.list_fn, self.opts.page_size, self._timeouts(60.0))
        pages = listing.pages()
        try:
            self.handler.replace(self.kind, pages)
            for _ in pages:  # a handler that ignored the kind: the snapshot still has to end
                pass
        finally:
            pages.close()
            release()  # the pages' dicts were freed one by one: give the heap back
        if not listing.complete:
            raise RuntimeError(f"{self.kind}: the handler stopped a list midway")
        self.resource_version = listing.resource_version
        self.lists += 1
        self.synced.set()
        log.info("%s: listed %d objects in %d pages at resourceVersion %s", self.kind,
                 listing.items, listing.pages_read, listing.resource_version)

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
