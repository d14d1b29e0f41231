"""Talk to np-agent: over its unix socket (one JSON request line, one JSON answer line), or,
when np-cni runs inside np-agent (requests from the host's shim), by a direct call.

Both are an :data:`AgentCall`: ``call(payload, timeout) -> answer``. The commands in
plugin.py take one, so the in-process path never goes through the socket it is being served
on (no extra connection, no chance of waiting on itself).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from typing import Any

from np_cni.spec import TRY_AGAIN_LATER, CniError

AgentCall = Callable[[dict[str, Any], float], dict[str, Any]]


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
    return checked(answer)


def checked(answer: dict[str, Any]) -> dict[str, Any]:
    """The answer itself when the agent accepted the request; its refusal as a CNI error."""
    if not answer.get("ok"):
        raise CniError(TRY_AGAIN_LATER, f"np-agent refused the request: "
                       f"{answer.get('error', 'no reason given')}")
    return answer


def socket_call(path: str) -> AgentCall:
    """The standalone plugin's way: a connection to the agent's socket per request."""
    return lambda payload, timeout: request(path, payload, timeout)


def direct_call(answer: Callable[[dict[str, Any], float], dict[str, Any]]) -> AgentCall:
    """Inside np-agent: the socket server's answer function, called in this thread."""
    return lambda payload, timeout: checked(answer(payload, timeout))
