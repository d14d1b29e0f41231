"""Replace a file on the node so that no reader ever sees half of it, and a crash never
brings the old one back: temp file in the same folder, fsync, rename, fsync the folder.

The conflist, the shim and plugins in the CNI bin folder, and install-cni's record are all
read by other processes (the runtime) while the agent may be writing them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO


def replace_file(path: Path, content: bytes | BinaryIO, mode: int = 0o644) -> None:
    """Write ``content`` (bytes, or a binary file to copy) as ``path``, atomically."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            if isinstance(content, bytes):
                out.write(content)
            else:
                shutil.copyfileobj(content, out)
            out.flush()
            os.fchmod(out.fileno(), mode)
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
