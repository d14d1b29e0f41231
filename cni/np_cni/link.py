"""Veth wiring with iproute2, in the routed ("ptp"/Calico) layout.

Pod side: ``eth0`` holds the pod's /32 (/128) and routes everything via the link-local gateway
169.254.1.1 (fe80::1). Node side: the host veth ``np<hash>`` holds that gateway address, and a
/32 (/128) route per pod IP points at it. All pod traffic is routed by the node, so it crosses
the node's forward hook, where the policy chains are.

iproute2 rather than pyroute2: a CNI plugin is a fresh process per call, and importing pyroute2
alone costs ~95 ms of a 100 ms ADD budget; two `ip -batch` runs cost a few milliseconds and
their commands can be read in the error message when something fails.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import subprocess
from pathlib import Path

from np_cni.shared.endpoints import HOST_IFNAME_PREFIX
from np_cni.spec import GATEWAY_V4, GATEWAY_V6, IO_FAILURE, UNKNOWN_CONTAINER, CniError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def host_ifname(container_id: str, ifname: str) -> str:
    """Deterministic and unique per attachment, so DEL and GC find it without any state."""
    digest = hashlib.sha256(f"{container_id}/{ifname}".encode()).hexdigest()
    return HOST_IFNAME_PREFIX + digest[:11]


def _ip(args: list[str], batch: list[str] | None = None, netns: str | None = None) -> str:
    cmd = (["nsenter", f"--net={netns}"] if netns else []) + ["ip", *args]
    if batch is not None:
        cmd += ["-batch", "-"]
    proc = subprocess.run(cmd, input="\n".join(batch or []) + "\n", capture_output=True,
                          text=True)
    if proc.returncode != 0:
        where = f" in {netns}" if netns else ""
        shown = "; ".join(batch) if batch else " ".join(args)
        raise CniError(IO_FAILURE, f"ip{where} failed: {proc.stderr.strip()}", shown)
    return proc.stdout


def _sysctl(path: str, value: str) -> None:
    p = Path("/proc/sys") / path
    if p.read_text().strip() != value:
        p.write_text(value)


def link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def create(netns: str, host_if: str, ifname: str, addresses: list[IPAddress], mtu: int) -> tuple[
        str, str]:
    """Create the veth pair and configure the pod side. The host side stays down: it is
    brought up by activate() only once the agent has programmed the pod's policy."""
    if not Path(netns).exists():
        raise CniError(UNKNOWN_CONTAINER, f"network namespace {netns} does not exist")
    delete(host_if)  # left by an ADD of this very attachment that crashed half-way
    _ip(["link", "add", host_if, "mtu", str(mtu), "type", "veth", "peer", "name", ifname,
         "mtu", str(mtu), "netns", netns])
    pod = ["link set lo up"]
    for addr in addresses:
        if addr.version == 4:
            pod.append(f"addr add {addr}/32 dev {ifname}")
        else:
            pod.append(f"addr add {addr}/128 dev {ifname} nodad")
    pod.append(f"link set {ifname} up")
    if any(a.version == 4 for a in addresses):
        pod += [f"route add {GATEWAY_V4} dev {ifname} scope link",
                f"route add default via {GATEWAY_V4} dev {ifname}"]
    if any(a.version == 6 for a in addresses):
        pod.append(f"route add ::/0 via {GATEWAY_V6} dev {ifname}")
    pod.append(f"link show dev {ifname}")
    out = _ip([], pod, netns)
    return _mac(host_if), _mac_from(out)


def activate(host_if: str, addresses: list[IPAddress]) -> None:
    """Node side: gateway addresses, forwarding, routes to the pod, link up."""
    _sysctl("net/ipv4/ip_forward", "1")
    if any(a.version == 6 for a in addresses):
        _sysctl("net/ipv6/conf/all/forwarding", "1")
    cmds = [f"addr add {GATEWAY_V4}/32 dev {host_if}",
            f"addr add {GATEWAY_V6}/64 dev {host_if} nodad",
            f"link set {host_if} up"]
    for addr in addresses:
        cmds.append(f"route replace {addr}/{addr.max_prefixlen} dev {host_if}")
    _ip([], cmds)


def delete(host_if: str) -> bool:
    """Remove the pair (its routes go with it). False when it was already gone."""
    if not link_exists(host_if):
        return False
    try:
        _ip(["link", "del", host_if])
    except CniError:
        if link_exists(host_if):
            raise
    return True


def _mac(name: str) -> str:
    return Path("/sys/class/net", name, "address").read_text().strip()


def _mac_from(ip_link_output: str) -> str:
    m = re.search(r"link/ether ([0-9a-f:]{17})", ip_link_output)
    return m.group(1) if m else ""


def pod_state(netns: str, ifname: str) -> dict:
    """Addresses and routes of the pod interface, as `ip -j` reports them (for CHECK)."""
    addrs = json.loads(_ip(["-j", "addr", "show", "dev", ifname], netns=netns) or "[]")
    routes = json.loads(_ip(["-j", "route", "show", "dev", ifname], netns=netns) or "[]")
    routes6 = json.loads(_ip(["-j", "-6", "route", "show", "dev", ifname], netns=netns) or "[]")
    return {"addrs": addrs, "routes": routes + routes6}
