"""A lab on an API server of your own (`scripts/lab up --kubeconfig FILE`).

The lab's nodes are network namespaces with no route out (nothing in the machine's own
namespace is changed to give them one), so their agents cannot dial the API server directly.
``TcpProxy`` listens inside the first node's namespace and relays each connection from this
process, which can reach the server. TLS stays end to end: the agents' kubeconfig keeps the
server's CA and credentials and names the server (``tls-server-name``) while dialling the relay.

``KubeApi`` gives the lab the same small object API as the in-process ``FakeApiServer``
(create/update/apply/delete/get/list_objects), through the `kubernetes` client.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from np_lab.nsenter import in_netns

PATHS = {  # kind -> (collection path, namespaced)
    "namespaces": ("/api/v1/namespaces", False),
    "nodes": ("/api/v1/nodes", False),
    "pods": ("/api/v1/namespaces/{ns}/pods", True),
    "networkpolicies": ("/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies", True),
}
KIND_NAMES = {"namespaces": ("v1", "Namespace"), "nodes": ("v1", "Node"),
              "pods": ("v1", "Pod"), "networkpolicies": ("networking.k8s.io/v1", "NetworkPolicy")}


class ApiError(RuntimeError):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"API server answered {status}: {text[:300]}")
        self.status = status


class TcpProxy:
    """Relays connections accepted inside a lab namespace to an address this process reaches."""

    def __init__(self, netns: str, listen_host: str, target: tuple[str, int]) -> None:
        self.target = target
        with in_netns(netns):  # the listening socket lives in the lab namespace
            self._server = socket.create_server((listen_host, 0))
        self.address = (listen_host, self._server.getsockname()[1])
        self._closed = False
        threading.Thread(target=self._accept, name="api-relay", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                inner, _ = self._server.accept()
            except OSError:
                return
            try:
                outer = socket.create_connection(self.target, timeout=10)
            except OSError:
                inner.close()
                continue
            outer.settimeout(None)
            for a, b in ((inner, outer), (outer, inner)):
                threading.Thread(target=_pump, args=(a, b), daemon=True).start()

    def close(self) -> None:
        self._closed = True
        self._server.close()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


class KubeApi:
    """Objects on a real (or any) API server, as plain dicts in API shape."""

    def __init__(self, kubeconfig: str | Path, relay_netns: str, relay_host: str) -> None:
        from kubernetes import config

        self.source = Path(kubeconfig)
        self.client = config.new_client_from_config(config_file=str(self.source))
        server = urlsplit(self.client.configuration.host)
        port = server.port or (443 if server.scheme == "https" else 80)
        self.proxy = TcpProxy(relay_netns, relay_host, (server.hostname or "", port))
        self.url = self.client.configuration.host

    # ------------------------------------------------------------------ the agents' view

    def kubeconfig(self, path: str | Path) -> str:
        """A copy of the user's kubeconfig whose server is the relay inside the lab."""
        raw = yaml.safe_load(self.source.read_text())
        ctx_name = raw.get("current-context")
        context = next(c["context"] for c in raw["contexts"] if c["name"] == ctx_name)
        cluster = next(c["cluster"] for c in raw["clusters"] if c["name"] == context["cluster"])
        original = urlsplit(cluster["server"])
        host, port = self.proxy.address
        cluster["server"] = f"{original.scheme}://{host}:{port}"
        if original.scheme == "https":
            cluster.setdefault("tls-server-name", original.hostname)
        for section in ("clusters", "users"):  # relative file paths stay valid
            for entry in raw.get(section, []):
                for key, value in list(entry.get(section[:-1], {}).items()):
                    if key.endswith(("-authority", "-certificate", "-key")) and isinstance(
                            value, str) and not value.startswith("/"):
                        entry[section[:-1]][key] = str(self.source.parent / value)
        Path(path).write_text(yaml.safe_dump(raw))
        return str(path)

    # ------------------------------------------------------------------ objects

    def _call(self, method: str, path: str, body: dict | None = None,
              query: dict | None = None) -> dict[str, Any] | None:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        params = self.client.param_serialize(method, path, query_params=list((query or {}).items()),
                                             header_params=headers, body=body,
                                             auth_settings=["BearerToken"])
        resp = self.client.call_api(*params, _request_timeout=30)
        data = resp.read()
        if resp.status == 404 and method == "GET":
            return None
        if not 200 <= resp.status < 300:
            raise ApiError(resp.status, data.decode(errors="replace"))
        return json.loads(data) if data else None

    @staticmethod
    def _path(kind: str, namespace: str, name: str | None = None) -> str:
        collection, namespaced = PATHS[kind]
        path = collection.format(ns=namespace) if namespaced else collection
        return f"{path}/{name}" if name else path

    def _typed(self, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        api_version, kind_name = KIND_NAMES[kind]
        return {"apiVersion": api_version, "kind": kind_name, **obj}

    def create(self, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        ns = obj["metadata"].get("namespace", "default")
        return self._call("POST", self._path(kind, ns), self._typed(kind, obj)) or {}

    def update(self, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        current = self.get(kind, meta.get("namespace", ""), meta["name"])
        body = self._typed(kind, obj)
        if current is not None:  # replace needs the resourceVersion it replaces
            body["metadata"] = {**meta, "resourceVersion":
                                current["metadata"]["resourceVersion"]}
        result = self._call("PUT", self._path(kind, meta.get("namespace", "default"),
                                              meta["name"]), body) or {}
        if kind == "pods" and "status" in obj:  # status is its own subresource
            body = {**result, "status": obj["status"]}
            result = self._call("PUT", self._path(kind, meta.get("namespace", "default"),
                                                  meta["name"]) + "/status", body) or result
        return result

    def apply(self, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        if self.get(kind, meta.get("namespace", ""), meta["name"]) is None:
            return self.create(kind, obj)
        return self.update(kind, obj)

    def delete(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        return self._call("DELETE", self._path(kind, namespace or "default", name)) or {}

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self._call("GET", self._path(kind, namespace or "default", name))

    def list_objects(self, kind: str, namespace: str | None = None) -> list[dict[str, Any]]:
        collection, namespaced = PATHS[kind]
        if namespaced and namespace is None:  # every namespace: the collection without one
            collection = collection.replace("/namespaces/{ns}", "")
        path = collection.format(ns=namespace) if namespaced else collection
        items = (self._call("GET", path) or {}).get("items") or []
        api_version, kind_name = KIND_NAMES[kind]
        return [{"apiVersion": api_version, "kind": kind_name, **item} for item in items]

    def stop(self) -> None:
        self.proxy.close()
        self.client.close()
