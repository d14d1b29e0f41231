"""IPAM delegation, as the reference plugins do it: run the plugin named in ipam.type.

The delegate gets the same environment and network configuration. If it does not speak the
configuration's cniVersion (Debian's reference plugins stop at 1.0.0), the highest version
both sides support is negotiated through its VERSION command, and its result is read in that
version. Its errors are passed through with their own code and message.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from np_cni.spec import (
    INCOMPATIBLE_VERSION,
    INVALID_CONFIG,
    IO_FAILURE,
    SUPPORTED_VERSIONS,
    CniError,
    Env,
    NetConf,
    version_key,
)

DELEGATE_TIMEOUT = 60.0


def find_plugin(name: str, cni_path: list[str]) -> Path:
    if "/" in name or not name:
        raise CniError(INVALID_CONFIG, f"invalid plugin name {name!r}")
    for directory in cni_path:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise CniError(INVALID_CONFIG, f"IPAM plugin {name!r} not found in CNI_PATH "
                   f"({os.pathsep.join(cni_path) or 'empty'})")


def _environ(command: str, env: Env) -> dict[str, str]:
    """The delegate's environment: ours without any CNI_* of our own, then the runtime's
    CNI_* variables (np-agent runs np-cni in-process: its environment has none, and its
    CNI_PATH is the agent's plugin directory). The netns as this process reaches it."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    environ.update(env.variables)
    environ["CNI_COMMAND"] = command
    environ["CNI_PATH"] = os.pathsep.join(env.path)
    if env.netns_here:
        environ["CNI_NETNS"] = env.netns_here
    return environ


def _run(plugin: Path, command: str, env: Env, conf: Mapping[str, Any],
         container_id: str | None = None, ifname: str | None = None) -> dict[str, Any] | None:
    environ = _environ(command, env)
    if container_id is not None:
        environ["CNI_CONTAINERID"] = container_id
    if ifname is not None:
        environ["CNI_IFNAME"] = ifname
    try:
        proc = subprocess.run([str(plugin)], input=json.dumps(conf).encode(), env=environ,
                              capture_output=True, timeout=DELEGATE_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CniError(IO_FAILURE, f"IPAM plugin {plugin.name} could not run: {e}") from None
    out = proc.stdout.strip()
    if proc.returncode != 0:
        try:
            err = json.loads(out)
            raise CniError(int(err.get("code", IO_FAILURE)), f"IPAM plugin {plugin.name}: "
                           f"{err.get('msg', '')}", str(err.get("details", "")))
        except (ValueError, AttributeError):
            raise CniError(IO_FAILURE, f"IPAM plugin {plugin.name} failed (exit "
                           f"{proc.returncode})", (proc.stderr or out).decode(errors="replace")
                           ) from None
    if not out:
        return None
    try:
        return json.loads(out)
    except ValueError:
        raise CniError(IO_FAILURE, f"IPAM plugin {plugin.name} printed something that is "
                       "not JSON", out.decode(errors="replace")[:500]) from None


def _negotiate(plugin: Path, env: Env, wanted: str) -> str:
    answer = _run(plugin, "VERSION", env, {"cniVersion": wanted}) or {}
    theirs = set(answer.get("supportedVersions", []))
    common = sorted((v for v in SUPPORTED_VERSIONS if v in theirs), key=version_key)
    usable = [v for v in common if version_key(v) <= version_key(wanted)]
    if not usable:
        raise CniError(INCOMPATIBLE_VERSION, f"IPAM plugin {plugin.name} supports none of "
                       f"{', '.join(SUPPORTED_VERSIONS)} up to {wanted}")
    return usable[-1]


def delegate(command: str, env: Env, conf: NetConf, container_id: str | None = None,
             ifname: str | None = None) -> dict[str, Any] | None:
    """Run the IPAM plugin with ``command``, downgrading cniVersion once if it refuses it."""
    plugin = find_plugin(conf.ipam["type"], env.path)
    stdin = {k: v for k, v in conf.raw.items() if k != "prevResult"}
    try:
        return _run(plugin, command, env, stdin, container_id, ifname)
    except CniError as e:
        if e.code != INCOMPATIBLE_VERSION:
            raise
    stdin["cniVersion"] = _negotiate(plugin, env, conf.cni_version)
    return _run(plugin, command, env, stdin, container_id, ifname)


@dataclass
class IpamResult:
    addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address]
    dns: dict[str, Any] = field(default_factory=dict)


def parse_result(result: dict[str, Any] | None, plugin: str) -> IpamResult:
    ips = (result or {}).get("ips") or []
    addresses = []
    for entry in ips:
        try:
            addresses.append(ipaddress.ip_interface(entry["address"]).ip)
        except (KeyError, TypeError, ValueError):
            raise CniError(IO_FAILURE, f"IPAM plugin {plugin} returned an invalid address: "
                           f"{entry!r}") from None
    if not addresses:
        raise CniError(IO_FAILURE, f"IPAM plugin {plugin} returned no address")
    return IpamResult(addresses, (result or {}).get("dns") or {})
