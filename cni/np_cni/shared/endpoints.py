"""Local endpoints: the pod attachments np-cni created on this node.

np-cni writes one small JSON file per attachment (container id + interface) when ADD has
wired a pod, and removes it on DEL/GC. The agent reads them: they tell it which pod IPs live
behind which host veth *before* the kubelet publishes ``status.podIPs``, which is what lets a
new pod be enforced before its first packet, and what anti-spoofing is keyed on.

Files rather than agent memory, so that nothing is lost when the agent restarts or is not
running while pods come and go: the directory is the truth, both processes read it.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_DIR = Path("/var/lib/np-nft/endpoints")
# np-cni names every pod's host-side veth HOST_IFNAME_PREFIX<hash>; the agent's anti-spoofing
# chain takes every interface with this prefix for a pod's.
HOST_IFNAME_PREFIX = "np"
# CNI_CONTAINERID: "alphanumeric, plus underscore, dot and hyphen"; interface names likewise.
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class EndpointError(ValueError):
    pass


def check_name(kind: str, value: str) -> str:
    if not _SAFE.match(value or "") or len(value) > 256:
        raise EndpointError(f"invalid {kind} {value!r}: letters, digits, '_', '.', '-' only")
    return value


@dataclass(frozen=True)
class Endpoint:
    container_id: str
    ifname: str
    namespace: str  # the Kubernetes namespace of the pod
    pod: str
    uid: str
    host_if: str
    ips: tuple[str, ...]
    netns: str = ""

    @property
    def pod_ref(self) -> str:
        return f"{self.namespace}/{self.pod}"

    @property
    def filename(self) -> str:
        return f"{self.container_id}_{self.ifname}.json"

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "ips": list(self.ips)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Endpoint:
        raw = json.loads(text)
        return cls(**{**raw, "ips": tuple(raw["ips"])})


class EndpointStore:
    def __init__(self, directory: Path | str = DEFAULT_DIR) -> None:
        self.dir = Path(directory)

    def _path(self, container_id: str, ifname: str) -> Path:
        check_name("container id", container_id)
        check_name("interface name", ifname)
        return self.dir / f"{container_id}_{ifname}.json"

    def save(self, ep: Endpoint) -> None:
        """Write atomically (temp file + rename): a reader never sees half a file."""
        path = self._path(ep.container_id, ep.ifname)
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(ep.to_json())
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, container_id: str, ifname: str) -> Endpoint | None:
        try:
            return Endpoint.from_json(self._path(container_id, ifname).read_text())
        except FileNotFoundError:
            return None

    def remove(self, container_id: str, ifname: str) -> None:
        self._path(container_id, ifname).unlink(missing_ok=True)

    def all(self) -> tuple[list[Endpoint], list[str]]:
        """Every endpoint, and an error line for each file that cannot be read."""
        endpoints, errors = [], []
        if not self.dir.is_dir():
            return endpoints, errors
        for path in sorted(self.dir.glob("*.json")):
            try:
                endpoints.append(Endpoint.from_json(path.read_text()))
            except FileNotFoundError:
                continue  # removed by a concurrent DEL
            except (ValueError, TypeError, KeyError) as e:
                errors.append(f"{path}: unreadable endpoint file: {e}")
        return endpoints, errors

    @contextmanager
    def lock(self, container_id: str) -> Iterator[None]:
        """Serialise ADD, DEL and GC of one container across processes (flock)."""
        check_name("container id", container_id)
        lock_dir = self.dir / ".locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        path = lock_dir / f"{container_id}.lock"
        with open(path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
