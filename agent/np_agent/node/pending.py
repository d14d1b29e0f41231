"""DELs the host's np-cni shim could not deliver, replayed when np-agent is back.

A pod's DEL must succeed even while the agent restarts, or the kubelet keeps the pod in
Terminating. The shim then writes the request (shimproto format, no netns descriptor) to
``<dir>/<containerid>_<ifname>`` (temp file + rename) and exits 0. The agent replays every
spooled DEL in-process at start, before it serves ADDs, and whenever a shim request or a
periodic resync comes: np-cni's DEL is idempotent, so replaying one that half happened, or
that raced a later DEL, is harmless. Afterwards the IP is released, the endpoint file and
the spool file are gone.

A spool file that cannot be parsed, or whose DEL can never succeed (invalid config or
environment), is moved to ``<dir>/broken/`` with a log line: it must never stop the agent,
nor be retried forever. Other failures (an IPAM plugin erroring) keep it for the next round.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from np_cni.shared.endpoints import check_name
from np_cni.shared.shimproto import MAX_REQUEST, FramingError, ShimRequest, parse_request

log = logging.getLogger("np_agent.pending")

DEFAULT_DIR = Path("/var/lib/np-nft/pending-del")
BROKEN = "broken"
# np-cni error codes that replaying again cannot fix: incompatible version, invalid
# environment, decode failure, invalid config.
PERMANENT = {1, 4, 6, 7}

Runner = Callable[[ShimRequest], tuple[int, str]]


class PendingDels:
    """The spool directory and how to run one request from it (the agent's in-process
    np-cni; a stand-in in tests)."""

    def __init__(self, directory: Path | str, run: Runner) -> None:
        self.dir = Path(directory)
        self.run = run
        self._lock = threading.Lock()  # one replay at a time; others wait for it to finish

    def replay(self) -> int:
        """Replay every spooled DEL; return how many succeeded. Never raises."""
        with self._lock:
            try:
                paths = sorted(p for p in self.dir.iterdir()
                               if p.is_file() and not p.name.startswith("."))
            except FileNotFoundError:
                return 0
            except OSError as e:
                log.error("cannot list pending DELs in %s: %s", self.dir, e)
                return 0
            return sum(self._replay_one(p) for p in paths)

    def _replay_one(self, path: Path) -> bool:
        """Run one spooled DEL; decide from its outcome whether the file goes, stays for
        another try, or is set aside."""
        try:
            req = self._load(path)
        except (OSError, ValueError) as e:  # FramingError, EndpointError
            self._set_aside(path, str(e))
            return False
        try:
            code, out = self.run(req)
        except Exception as e:  # noqa: BLE001 - a bad spool file never takes the agent down
            self._set_aside(path, f"{type(e).__name__}: {e}")
            return False
        if code == 0:
            path.unlink(missing_ok=True)
            log.info("replayed pending DEL of container %s ifname %s: IP released, endpoint "
                     "removed", req.environ.get("CNI_CONTAINERID"), req.environ.get("CNI_IFNAME"))
            return True
        error = _error(out)
        if error.get("code") in PERMANENT:
            self._set_aside(path, str(error.get("msg", out)))
        else:
            log.warning("pending DEL %s failed, kept for the next replay: %s", path.name,
                        error.get("msg", out.strip()))
        return False

    @staticmethod
    def _load(path: Path) -> ShimRequest:
        """Parse a spool file, refusing anything a shim would not have written there."""
        if path.stat().st_size > MAX_REQUEST:
            raise FramingError("larger than any request")
        req = parse_request(path.read_bytes())
        if req.command != "DEL":
            raise FramingError(f"holds a {req.command or 'command-less'} request, not a DEL")
        cid = check_name("container id", req.environ.get("CNI_CONTAINERID", ""))
        ifname = check_name("ifname", req.environ.get("CNI_IFNAME", ""))
        if path.name != f"{cid}_{ifname}":
            raise FramingError(f"is named for another attachment than {cid}/{ifname}")
        return req

    def _set_aside(self, path: Path, why: str) -> None:
        """Keep the evidence for a person, out of the way of the next replay."""
        broken = self.dir / BROKEN
        try:
            broken.mkdir(mode=0o700, exist_ok=True)
            os.replace(path, broken / path.name)
            log.error("pending DEL %s cannot be replayed (%s): moved to %s", path.name, why,
                      broken)
        except OSError as e:
            log.error("pending DEL %s cannot be replayed (%s) nor moved aside: %s",
                      path.name, why, e)


def _error(out: str) -> dict:
    """The CNI error object np-cni printed, or an empty one."""
    try:
        value = json.loads(out)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
