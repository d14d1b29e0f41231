"""The CNI protocol surface: versions, error codes, environment and network configuration.

Everything a runtime hands np-cni is validated here, so a malformed config or a missing
variable becomes a CNI error with a sentence a person understands, before anything is touched.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SPEC_VERSION = "1.1.0"
SUPPORTED_VERSIONS = ("0.4.0", "1.0.0", "1.1.0")

# Well-known error codes of the CNI specification.
INCOMPATIBLE_VERSION = 1
UNKNOWN_CONTAINER = 3
INVALID_ENVIRONMENT = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
NOT_AVAILABLE = 50
# Plugin-specific codes (100+).
CHECK_FAILED = 100
ALREADY_ATTACHED = 101

DEFAULT_AGENT_SOCKET = "/run/np-nft/cni.sock"
DEFAULT_ENDPOINTS_DIR = "/var/lib/np-nft/endpoints"
DEFAULT_AGENT_TIMEOUT = 10.0


class CniError(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details

    def to_json(self, version: str) -> dict[str, Any]:
        out: dict[str, Any] = {"cniVersion": version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out


def version_key(v: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in v.split("."))
    except ValueError:
        return (-1,)


CNI_VARIABLES = ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS",
                 "CNI_PATH")


@dataclass
class Env:
    command: str
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: dict[str, str] = field(default_factory=dict)
    path: list[str] = field(default_factory=list)
    # The CNI_* variables as the runtime gave them: delegated plugins get them unchanged,
    # also when np-cni runs inside np-agent, whose own environment has none.
    variables: dict[str, str] = field(default_factory=dict)
    # Where this process reaches the pod's netns when that is not ``netns``: np-agent gets
    # it as a descriptor from the host's shim (/proc/<agent pid>/fd/<n>), because its
    # container does not see the runtime's netns paths. ``netns`` stays what the runtime
    # named: that is what results and endpoint records must show.
    netns_fd_path: str = ""

    @property
    def netns_here(self) -> str:
        """The path this process (and its children: ip, nsenter) opens the netns by."""
        return self.netns_fd_path or self.netns


REQUIRED = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "STATUS": ("CNI_PATH",),
    "GC": ("CNI_PATH",),
    "VERSION": (),
}


def parse_env(environ: Mapping[str, str]) -> Env:
    command = environ.get("CNI_COMMAND", "")
    if command not in REQUIRED:
        raise CniError(INVALID_ENVIRONMENT, f"unknown CNI_COMMAND {command!r}",
                       "expected one of " + ", ".join(REQUIRED))
    missing = [v for v in REQUIRED[command] if not environ.get(v)]
    if missing:
        raise CniError(INVALID_ENVIRONMENT, f"{command} needs {', '.join(missing)} in the "
                       "environment")
    args: dict[str, str] = {}
    for part in filter(None, environ.get("CNI_ARGS", "").split(";")):
        key, sep, value = part.partition("=")
        if not sep:
            raise CniError(INVALID_ENVIRONMENT, f"CNI_ARGS entry {part!r} is not KEY=VALUE")
        args[key] = value
    return Env(command, environ.get("CNI_CONTAINERID", ""), environ.get("CNI_NETNS", ""),
               environ.get("CNI_IFNAME", ""), args,
               [p for p in environ.get("CNI_PATH", "").split(os.pathsep) if p],
               {k: environ[k] for k in CNI_VARIABLES if k in environ})


@dataclass
class NetConf:
    cni_version: str
    name: str
    ipam: dict[str, Any]
    agent_socket: str
    agent_timeout: float
    endpoints_dir: Path
    mtu: int
    prev_result: dict[str, Any] | None
    raw: dict[str, Any]
    valid_attachments: list[tuple[str, str]] = field(default_factory=list)


def _field(raw: Mapping[str, Any], key: str, kind: type, default: Any) -> Any:
    value = raw.get(key, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise CniError(INVALID_CONFIG, f"network config field {key!r} must be a "
                       f"{kind.__name__}, got {value!r}")
    return value


def parse_conf(data: bytes, command: str) -> NetConf:
    """Parse and validate the network configuration a runtime wrote on stdin."""
    try:
        raw = json.loads(data or b"{}")
    except (ValueError, UnicodeDecodeError) as e:
        raise CniError(DECODE_FAILURE, f"network config on stdin is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise CniError(DECODE_FAILURE, "network config on stdin must be a JSON object")
    version = raw.get("cniVersion", "")
    if command == "VERSION":
        return NetConf(version or SPEC_VERSION, "", {}, "", 0, Path(), 0, None, raw)
    if version not in SUPPORTED_VERSIONS:
        raise CniError(INCOMPATIBLE_VERSION, f"cniVersion {version!r} is not supported",
                       "np-cni supports " + ", ".join(SUPPORTED_VERSIONS))
    if command in ("STATUS", "GC") and version_key(version) < (1, 1, 0):
        raise CniError(INCOMPATIBLE_VERSION, f"{command} needs cniVersion 1.1.0 or later, "
                       f"the config declares {version}")
    name = _field(raw, "name", str, "")
    if not name:
        raise CniError(INVALID_CONFIG, "network config needs a 'name'")
    ipam = _field(raw, "ipam", dict, {})
    if command != "STATUS" and not isinstance(ipam.get("type"), str):
        raise CniError(INVALID_CONFIG, "network config needs 'ipam' with a 'type' "
                       "(for example host-local)")
    mtu = _field(raw, "mtu", int, 1500)
    if not 576 <= mtu <= 65535:
        raise CniError(INVALID_CONFIG, f"mtu {mtu} out of range 576-65535")
    timeout = _field(raw, "agentTimeout", float, DEFAULT_AGENT_TIMEOUT)
    if not 0 < timeout <= 300:
        raise CniError(INVALID_CONFIG, f"agentTimeout {timeout} must be in (0, 300] seconds")
    prev = raw.get("prevResult")
    if prev is not None and not isinstance(prev, dict):
        raise CniError(INVALID_CONFIG, "prevResult must be an object")
    valid: list[tuple[str, str]] = []
    for i, a in enumerate(raw.get("cni.dev/valid-attachments") or []):
        if not isinstance(a, dict) or not isinstance(a.get("containerID"), str):
            raise CniError(INVALID_CONFIG, f"cni.dev/valid-attachments[{i}] needs a containerID")
        valid.append((a["containerID"], str(a.get("ifname", ""))))
    return NetConf(
        version, name, ipam, _field(raw, "agentSocket", str, DEFAULT_AGENT_SOCKET), timeout,
        Path(_field(raw, "endpointsDir", str, DEFAULT_ENDPOINTS_DIR)), mtu, prev, raw, valid)


# ----------------------------------------------------------------------- results


GATEWAY_V4 = "169.254.1.1"
GATEWAY_V6 = "fe80::1"


@dataclass
class Attachment:
    """What ADD built, in the terms of a CNI result."""

    host_if: str
    host_mac: str
    ifname: str
    pod_mac: str
    netns: str
    addresses: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]
    dns: dict[str, Any] = field(default_factory=dict)


def result_json(att: Attachment, version: str) -> dict[str, Any]:
    """A spec-conformant ADD result. 0.4.0 results also carry each IP's version."""
    ips, routes = [], []
    for addr in att.addresses:
        v4 = addr.version == 4
        entry: dict[str, Any] = {"address": str(addr), "gateway": GATEWAY_V4 if v4 else
                                 GATEWAY_V6, "interface": 1}
        if version == "0.4.0":
            entry["version"] = "4" if v4 else "6"
        ips.append(entry)
    if any(a.version == 4 for a in att.addresses):
        routes.append({"dst": "0.0.0.0/0", "gw": GATEWAY_V4})
    if any(a.version == 6 for a in att.addresses):
        routes.append({"dst": "::/0", "gw": GATEWAY_V6})
    out: dict[str, Any] = {
        "cniVersion": version,
        "interfaces": [{"name": att.host_if, "mac": att.host_mac},
                       {"name": att.ifname, "mac": att.pod_mac, "sandbox": att.netns}],
        "ips": ips, "routes": routes,
    }
    if att.dns:
        out["dns"] = att.dns
    return out
