"""Putting np-nft on a node and taking it off again: `np-agent install-cni` (the DaemonSet's
init container) and `np-agent uninstall-node`.

install-cni copies the static np-cni shim into the host's CNI bin directory, and the
reference plugins the conflist chains (portmap) or a runtime expects (loopback) where the
host lacks them. Every file is written to a temp name in the target directory, synced and
renamed: a runtime executing np-cni at that moment runs the old or the new binary, never
half of one. What it installed is recorded in a manifest in the state directory (plugin name
and SHA-256, not paths: the init container and the host see the directories under different
paths), so uninstall-node removes exactly that and leaves the plugins the host had on its
own, or has replaced since.

uninstall-node removes everything np-nft put on a node, and only that: the conflist the
agent wrote (recognised by its content), the shim (recognised by its marker string), the
plugins of the manifest, table inet np-nft, the routes tagged proto 201, the socket and run
directory, the state directory. It is idempotent and says what it removed or left.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from np_agent.node.atomic import replace_file
from np_agent.node.nodenet import CONFLIST_NAME, NETWORK_NAME

SHIM_NAME = "np-cni"
SHIM_MARKER = b"np-nft-cni-shim/1"  # MARKER in cni/shim/np-cni-shim.c
MANIFEST = "installed-cni.json"
DEFAULT_SHIM = Path("/usr/local/lib/np-nft/np-cni")  # where the image puts it
DEFAULT_PLUGINS = ("host-local", "portmap", "loopback")
# What the state directory holds (agent endpoints, spooled DELs, the install manifest);
# anything else found there is not ours and is left in place.
STATE_ENTRIES = ("endpoints", "pending-del", MANIFEST)
RUN_ENTRIES = ("cni.sock", "agent.pid")


class SetupError(RuntimeError):
    """A precondition of install-cni is not met; the message says which."""


def is_shim(path: Path) -> bool:
    """True when ``path`` is np-nft's shim (not another plugin that happens to be np-cni)."""
    try:
        return path.is_file() and SHIM_MARKER in path.read_bytes()
    except OSError:
        return False


def install_file(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` atomically, executable (0755), synced to disk."""
    with open(src, "rb") as data:
        replace_file(dst, data, 0o755)


def install_cni(bin_dir: Path, shim: Path, plugins_from: Path, plugins: list[str],
                state_dir: Path) -> list[str]:
    """Install the shim as ``bin_dir/np-cni`` and each missing plugin; return what was done."""
    if not shim.is_file():
        raise SetupError(f"shim {shim} not found (build it: musl-gcc -static -Os -o np-cni "
                         "cni/shim/np-cni-shim.c)")
    if not is_shim(shim):
        raise SetupError(f"{shim} is not the np-nft CNI shim (no {SHIM_MARKER.decode()} in it)")
    for name in plugins:
        if not name or "/" in name or name in (".", "..", SHIM_NAME):
            raise SetupError(f"invalid plugin name {name!r}")
        if not (plugins_from / name).is_file():
            raise SetupError(f"reference plugin {plugins_from / name} not found")
    bin_dir.mkdir(parents=True, exist_ok=True)
    install_file(shim, bin_dir / SHIM_NAME)
    done = [f"installed {shim} as {bin_dir / SHIM_NAME}"]
    ours = _installed_by_us(state_dir, bin_dir)
    for name in plugins:
        dst = bin_dir / name
        if dst.exists():
            done.append(f"kept {dst}" + (" (installed by np-nft earlier)" if name in ours else
                                         " (the host's own)"))
            continue
        install_file(plugins_from / name, dst)
        ours[name] = _sha256(dst)
        done.append(f"installed {plugins_from / name} as {dst}")
    _write_manifest(state_dir, {"plugins": ours})
    return done


def uninstall_node(conf_dir: Path, bin_dir: Path, run_dir: Path, state_dir: Path) -> list[str]:
    """Remove np-nft from this node (and network namespace); return what was done."""
    done = _remove_conflist(conf_dir / CONFLIST_NAME)
    done += _remove_binaries(bin_dir, state_dir)
    done += _remove_dataplane()
    done += _remove_dir(run_dir, RUN_ENTRIES)
    done += _remove_dir(state_dir, STATE_ENTRIES)
    return done


def _remove_conflist(path: Path) -> list[str]:
    """The conflist first: the runtime stops calling np-cni for new pods."""
    try:
        conf = json.loads(path.read_text())
    except FileNotFoundError:
        return [f"no {path}"]
    except (OSError, ValueError) as e:
        return [f"left {path}: unreadable, so not known to be np-nft's ({e})"]
    if not isinstance(conf, dict) or conf.get("name") != NETWORK_NAME or not any(
            isinstance(p, dict) and p.get("type") == "np-cni" for p in conf.get("plugins") or []):
        return [f"left {path}: not np-nft's"]
    path.unlink()
    return [f"removed {path}"]


def _remove_binaries(bin_dir: Path, state_dir: Path) -> list[str]:
    """The shim if it is ours, and the plugins the manifest says install-cni put there."""
    shim = bin_dir / SHIM_NAME
    if is_shim(shim):
        shim.unlink()
        done = [f"removed {shim}"]
    else:
        done = [f"left {shim}: not np-nft's shim" if shim.exists() else f"no {shim}"]
    for name in _installed_by_us(state_dir, bin_dir):
        (bin_dir / name).unlink()
        done.append(f"removed {bin_dir / name} (installed by np-nft)")
    return done


def _remove_dataplane() -> list[str]:
    """Table inet np-nft and the proto-201 routes, in the current network namespace."""
    from np_agent.nft.dataplane import Dataplane
    from np_agent.node.nodenet import ROUTE_PROTO, RouteManager
    from np_agent.ruleset import FAMILY, TABLE

    table = f"table {FAMILY} {TABLE}"
    done = [f"removed {table}" if Dataplane().remove(FAMILY, TABLE)
            else f"no {table}"]
    with RouteManager() as routes:
        flushed = routes.flush()
    done.append(f"removed routes proto {ROUTE_PROTO}: {', '.join(flushed)}" if flushed
                else f"no routes proto {ROUTE_PROTO}")
    return done


def _remove_dir(directory: Path, entries: tuple[str, ...]) -> list[str]:
    """Our entries, then the directory if nothing else is left in it."""
    if not directory.is_dir():
        return [f"no {directory}"]
    done = []
    for name in entries:
        path = directory / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        done.append(f"removed {path}")
    others = sorted(p.name for p in directory.iterdir())
    if others:
        return done + [f"left {directory}: holds {', '.join(others)}, not np-nft's"]
    try:
        directory.rmdir()
    except OSError as e:
        if e.errno != errno.EBUSY:
            raise
        # uninstall.yaml mounts it as a volume: emptied is all a container can do
        return done + [f"emptied {directory} (a mount point here: the folder stays)"]
    return done + [f"removed {directory}"]


def _installed_by_us(state_dir: Path, bin_dir: Path) -> dict[str, str]:
    """Plugins of the manifest still in ``bin_dir`` as install-cni wrote them: name ->
    SHA-256. One the host has replaced since (another hash) is the host's again."""
    try:
        manifest = json.loads((state_dir / MANIFEST).read_text())
        plugins = manifest.get("plugins") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    if not isinstance(plugins, dict):
        return {}
    return {name: digest for name, digest in plugins.items()
            if isinstance(name, str) and name and "/" not in name
            and name not in (".", "..", SHIM_NAME) and (bin_dir / name).is_file()
            and _sha256(bin_dir / name) == digest}


def _sha256(path: Path) -> str:
    """Identifies a plugin binary whatever path the directory is seen under."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_manifest(state_dir: Path, manifest: dict[str, Any]) -> None:
    """Atomically, like the binaries: a crash never leaves half a manifest."""
    state_dir.mkdir(parents=True, exist_ok=True)
    replace_file(state_dir / MANIFEST, json.dumps(manifest, indent=2).encode())
