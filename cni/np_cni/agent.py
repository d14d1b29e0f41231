"""Talk to np-agent over its unix socket: one JSON request line, one JSON answer line."""

from __future__ import annotations

import json
import socket
from typing import Any

from .spec import TRY_AGAIN_LATER, CniError


def request(path: str, payload: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Send one request and wait at most ``timeout`` seconds for the agent's answer."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(json.dumps(payload).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    except (OSError, TimeoutError) as e:
        raise CniError(TRY_AGAIN_LATER, f"np-agent did not answer on {path}: {e}",
                       "is the np-agent DaemonSet running on this node?") from None
    try:
        answer = json.loads(data)
    except ValueError:
        raise CniError(TRY_AGAIN_LATER, f"np-agent on {path} sent an unreadable answer",
                       data.decode(errors="replace")[:300]) from None
    if not answer.get("ok"):
        raise CniError(TRY_AGAIN_LATER, f"np-agent refused the request: "
                       f"{answer.get('error', 'no reason given')}")
    return answer
