"""The framing np-cni-shim (cni/shim/np-cni-shim.c) speaks on np-agent's CNI socket.

The host has no Python, so /opt/cni/bin/np-cni is a small static C program that forwards
the runtime's request to the agent. The format is chosen to be trivial to produce and parse
in C, and to be told apart from the JSON-line protocol of the same socket (``{...}\\n``) by
its first line:

    request   b"NPCNI/1\\n"
              b"KEY=VALUE\\n" ...   CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME,
                                   CNI_ARGS, CNI_PATH, those that are set
              b"\\n"                end of the header
              stdin bytes          the network configuration, until the shim's SHUT_WR
              (the first sendmsg may carry one SCM_RIGHTS descriptor: the pod's netns)
    answer    b"<exit code>\\n" + the plugin's stdout, then the agent closes

A DEL the shim could not deliver is spooled to the pending directory in the request format
(without descriptor), so the same parser reads it back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

MAGIC = b"NPCNI/1\n"
KEYS = ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH")
MAX_HEADER = 64 * 1024
MAX_REQUEST = 16 * 1024 * 1024  # as the shim's MAX_STDIN: configs are KBs


class FramingError(ValueError):
    """The bytes are not a request in this format."""


@dataclass(frozen=True)
class ShimRequest:
    """One CNI invocation on the host, as np-cni's execute() takes it."""

    environ: dict[str, str]
    stdin: bytes

    @property
    def command(self) -> str:
        """CNI_COMMAND, "" when the shim sent none (np-cni answers that with error 4)."""
        return self.environ.get("CNI_COMMAND", "")


def parse_request(data: bytes) -> ShimRequest:
    """Split a complete request into its CNI_* variables and stdin; FramingError if it is
    not one. Unknown keys are ignored (a newer shim may send more)."""
    if not data.startswith(MAGIC):
        raise FramingError("does not start with the NPCNI/1 line")
    end = data.find(b"\n\n", len(MAGIC) - 1)
    if end < 0 or end > MAX_HEADER:
        raise FramingError("the header does not end with an empty line")
    environ: dict[str, str] = {}
    header = data[len(MAGIC):end]
    for line in header.split(b"\n") if header else []:
        key, sep, value = line.partition(b"=")
        if not sep or not key:
            raise FramingError(f"header line {line[:80]!r} is not KEY=VALUE")
        try:
            name, text = key.decode("ascii"), value.decode("utf-8")
        except UnicodeDecodeError:
            raise FramingError(f"header line {line[:80]!r} is not text") from None
        if name in KEYS:
            environ[name] = text
    return ShimRequest(environ, data[end + 2:])


def encode_request(environ: Mapping[str, str], stdin: bytes) -> bytes:
    """What the shim sends (tests and tools use it to speak for a shim)."""
    lines = [f"{k}={environ[k]}\n" for k in KEYS if k in environ]
    if any("\n" in line[:-1] for line in lines):
        raise FramingError("a CNI variable contains a newline")
    return MAGIC + "".join(lines).encode() + b"\n" + stdin


def encode_answer(code: int, stdout: str) -> bytes:
    """The exit code on its own line first: the shim parses it without any JSON."""
    return f"{code}\n".encode() + stdout.encode()
