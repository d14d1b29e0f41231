"""np-agent's unix socket for np-cni: one JSON line in, one JSON line out.

Requests:
  {"op": "add", "container_id": ..., "ifname": ...}  program the pod np-cni just recorded;
      answered only after the transaction: {"ok": true, "pending": false}
  {"op": "del", ...} / {"op": "sync"}                   re-read the endpoints, reconcile
  {"op": "status"}                                      {"ok": true, "ready": bool, "reason": ..}
"""

from __future__ import annotations

import json
import logging
import os
import socketserver
import threading
from pathlib import Path
from typing import Any

from .endpoints import EndpointError
from .node import NodeAgent

log = logging.getLogger("np_agent.cni")
DEFAULT_SOCKET = "/run/np-nft/cni.sock"
ANSWER_TIMEOUT = 30.0


class _Handler(socketserver.StreamRequestHandler):
    server: CniServer

    def handle(self) -> None:
        line = self.rfile.readline(65536)
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError("not an object")
            answer = self.server.answer(req)
        except ValueError as e:
            answer = {"ok": False, "error": f"bad request: {e}"}
        self.wfile.write(json.dumps(answer).encode() + b"\n")


class CniServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    request_queue_size = 256  # a burst of ADDs connects at once (the default 5 refuses some)

    def __init__(self, path: str, agent: NodeAgent) -> None:
        self.agent = agent
        self.path = path
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).unlink(missing_ok=True)  # a previous agent's socket
        super().__init__(path, _Handler)
        os.chmod(path, 0o600)

    def answer(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if op == "status":
            if self.agent.ready:
                return {"ok": True, "ready": True}
            return {"ok": True, "ready": False, "reason": "first sync not done yet"}
        if op not in ("add", "del", "sync"):
            return {"ok": False, "error": f"unknown op {op!r}"}
        outcome = self.agent.request_sync(wait=True, timeout=ANSWER_TIMEOUT)
        if outcome.error:
            return {"ok": False, "error": outcome.error}
        if op != "add":
            return {"ok": True}
        try:
            pending = self.agent.is_pending(str(req.get("container_id", "")),
                                            str(req.get("ifname", "")))
        except EndpointError as e:
            return {"ok": False, "error": str(e)}
        if pending:
            log.warning("pod of container %s is not known yet: denied both ways until it is",
                        req.get("container_id"))
        return {"ok": True, "pending": pending}

    def serve_in_background(self) -> threading.Thread:
        t = threading.Thread(target=self.serve_forever, name="cni-socket", daemon=True)
        t.start()
        return t

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        Path(self.path).unlink(missing_ok=True)
