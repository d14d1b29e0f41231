"""Node networking: the CNI conflist for this node and routes to the other nodes' pods.

np-cni gives each pod an address from the node's ``spec.podCIDRs`` and routes it locally;
traffic to a pod on *another* node needs a route to that node's pod CIDR. Like kindnet's
"host-gw" mode, np-nft sends it straight to the other node's InternalIP, which must be on
the same L2 segment (no encapsulation, no overlay, nothing to decrypt when debugging).

Three pieces, each usable on its own:

* :func:`parse_node` turns a Kubernetes Node object into a small :class:`NodeInfo`;
* :func:`conflist_for` / :func:`write_conflist` produce this node's CNI configuration and
  write it only when it changes (container runtimes watch the directory and reload on every
  write, so rewriting an identical file is not free);
* :func:`desired_routes` / :class:`RouteManager` keep the routing table of the current network
  namespace in line with the cluster, touching only routes marked with :data:`ROUTE_PROTO`.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from socket import AF_INET, AF_INET6
from typing import Any

from np_agent.node.atomic import replace_file
from np_agent.policy.model import ModelError

log = logging.getLogger("np_agent.nodenet")

CONFLIST_NAME = "10-np-nft.conflist"
NETWORK_NAME = "np-nft"
DEFAULT_AGENT_TIMEOUT = 10

# Routing protocol number (rtm_protocol) marking the routes np-nft owns: `ip route` shows
# them as "proto 201". Values up to 99 and 186-192 are taken by iproute2's rt_protos
# (zebra 11, bird 12, babel 42, bgp 186, ...) and Calico/kube-router use low numbers;
# 201 is unassigned. Everything else in the table (proto kernel, boot, static, dhcp, ...)
# is never modified or removed, so the agent can share a node with other route owners.
ROUTE_PROTO = 201
MAIN_TABLE = 254
RTN_UNICAST = 1


# ----------------------------------------------------------------------
# Node objects
# ----------------------------------------------------------------------


@dataclass(frozen=True)
class NodeInfo:
    """What routing and CNI configuration need from a Node: its pod ranges and addresses.

    CIDRs and addresses are normalised strings (``ipaddress`` form), so comparisons between
    objects and against the kernel are exact.
    """

    name: str
    pod_cidrs: tuple[str, ...]
    internal_ips: tuple[str, ...]


def parse_node(obj: Mapping[str, Any]) -> NodeInfo:
    """Parse a Kubernetes Node; raise ModelError (a ValueError) naming node and field.

    ``spec.podCIDRs`` is authoritative; the older single ``spec.podCIDR`` is only read when
    the list is absent, as the API server keeps ``podCIDR == podCIDRs[0]``. A node the
    controller has not allocated a range to yet simply has no pod CIDRs.
    """
    if not isinstance(obj, Mapping):
        raise ModelError("Node", "?", "<object>", f"expected a mapping, got {type(obj).__name__}")
    meta = obj.get("metadata") or {}
    name = meta.get("name") if isinstance(meta, Mapping) else None
    if not isinstance(name, str) or not name:
        raise ModelError("Node", "?", "metadata.name", "missing or not a non-empty string")
    spec = _mapping(obj.get("spec"), name, "spec")
    status = _mapping(obj.get("status"), name, "status")
    return NodeInfo(name, _pod_cidrs(spec, name), _internal_ips(status, name))


def _mapping(value: Any, node: str, path: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ModelError("Node", node, path, f"expected a mapping, got {type(value).__name__}")
    return value


def _pod_cidrs(spec: Mapping[str, Any], node: str) -> tuple[str, ...]:
    raw = spec.get("podCIDRs")
    if raw is not None:
        if not isinstance(raw, list):
            raise ModelError("Node", node, "spec.podCIDRs", "expected a list of CIDRs")
        entries = [(f"spec.podCIDRs[{i}]", value) for i, value in enumerate(raw)]
    elif spec.get("podCIDR") is not None:
        entries = [("spec.podCIDR", spec["podCIDR"])]
    else:
        entries = []
    cidrs: list[str] = []
    for path, value in entries:
        cidr = _network(value, node, path)
        if cidr not in cidrs:
            cidrs.append(cidr)
    return tuple(cidrs)


def _network(value: Any, node: str, path: str) -> str:
    if not isinstance(value, str):
        raise ModelError("Node", node, path, f"expected a CIDR string, got {value!r}")
    try:
        return str(ipaddress.ip_network(value, strict=True))
    except ValueError as exc:
        raise ModelError("Node", node, path, f"invalid CIDR {value!r}: {exc}") from None


def _internal_ips(status: Mapping[str, Any], node: str) -> tuple[str, ...]:
    addresses = status.get("addresses")
    if addresses is None:
        return ()
    if not isinstance(addresses, list):
        raise ModelError("Node", node, "status.addresses", "expected a list")
    ips: list[str] = []
    for i, entry in enumerate(addresses):
        path = f"status.addresses[{i}]"
        if not isinstance(entry, Mapping):
            raise ModelError("Node", node, path, "expected a mapping with type and address")
        if entry.get("type") != "InternalIP":
            continue  # Hostname, ExternalIP, ...: not used for pod routes
        value = entry.get("address")
        try:
            ip = str(ipaddress.ip_address(value))  # type: ignore[arg-type]
        except ValueError:
            raise ModelError(
                "Node", node, f"{path}.address", f"invalid InternalIP {value!r}"
            ) from None
        if ip not in ips:
            ips.append(ip)
    return tuple(ips)


# ----------------------------------------------------------------------
# CNI configuration
# ----------------------------------------------------------------------


def conflist_for(
    node: NodeInfo,
    *,
    agent_socket: str,
    endpoints_dir: str,
    mtu: int = 1500,
    cni_version: str = "1.0.0",
    agent_timeout: float = DEFAULT_AGENT_TIMEOUT,
) -> dict[str, Any]:
    """The np-cni conflist for ``node``: np-cni with host-local over its pod CIDRs + portmap.

    One host-local range set per CIDR (not one set with several ranges), so a dual-stack node
    gets one address of each family per pod; the node's order is kept, because the first
    range gives the pod's primary IP. Raises ValueError for a node without pod CIDRs: a
    conflist with no ranges would make every pod ADD fail, better not to install one.
    """
    if not node.pod_cidrs:
        raise ValueError(f"Node {node.name}: spec.podCIDRs: no pod CIDR allocated yet")
    if not 576 <= mtu <= 65535:
        raise ValueError(f"mtu {mtu} out of range 576-65535")
    timeout: float = int(agent_timeout) if float(agent_timeout).is_integer() else agent_timeout
    return {
        "cniVersion": cni_version,
        "name": NETWORK_NAME,
        "plugins": [
            {
                "type": "np-cni",
                "mtu": mtu,
                "agentSocket": agent_socket,
                "agentTimeout": timeout,
                "endpointsDir": endpoints_dir,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": cidr}] for cidr in node.pod_cidrs],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def write_conflist(
    conf_dir: Path, conflist: dict[str, Any], filename: str = CONFLIST_NAME
) -> bool:
    """Install ``conflist`` as ``conf_dir/filename`` if its content differs; True if written.

    Runtimes (containerd, CRI-O) watch the directory and load any ``*.conflist`` they see,
    so the file is written to a temp name that they ignore (``.tmp`` suffix), synced, and
    renamed over the old one: they see either the old file or the complete new one. The
    comparison is on parsed JSON, so reformatting by hand does not cause rewrites.
    """
    conf_dir = Path(conf_dir)
    path = conf_dir / filename
    text = json.dumps(conflist, indent=2) + "\n"
    if _read_json(path) == json.loads(text):  # parsed form: tuples and lists compare equal
        return False
    conf_dir.mkdir(parents=True, exist_ok=True)
    replace_file(path, text.encode())
    log.info("wrote CNI configuration %s", path)
    return True


def _read_json(path: Path) -> Any:
    """The parsed file, or None when it is missing or unreadable (then it gets rewritten)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("replacing unreadable %s: %s", path, exc)
        return None


# ----------------------------------------------------------------------
# Routes to other nodes
# ----------------------------------------------------------------------


def desired_routes(local: NodeInfo, nodes: Iterable[NodeInfo]) -> dict[str, str]:
    """Pod CIDR of every other node -> that node's InternalIP of the same family.

    Skipped, with a log line: ourselves, nodes without a pod CIDR or without an InternalIP
    of the CIDR's family, a CIDR that overlaps one of ours (routing it away would cut off
    local pods) and a CIDR claimed by two nodes (the first by name wins, deterministically).
    """
    own = [ipaddress.ip_network(cidr) for cidr in local.pod_cidrs]
    routes: dict[str, str] = {}
    owners: dict[str, str] = {}
    for node in sorted(nodes, key=lambda n: n.name):
        if node.name == local.name:
            continue
        for cidr in node.pod_cidrs:
            gateway = _gateway_for(node, cidr, own)
            if gateway is None:
                continue
            if cidr in routes:
                log.warning("pod CIDR %s of node %s already belongs to node %s; ignored",
                            cidr, node.name, owners[cidr])
                continue
            routes[cidr], owners[cidr] = gateway, node.name
    return routes


def _gateway_for(
    node: NodeInfo, cidr: str, own: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> str | None:
    net = ipaddress.ip_network(cidr)
    if any(net.version == mine.version and net.overlaps(mine) for mine in own):
        log.warning("pod CIDR %s of node %s overlaps this node's pod CIDRs; no route",
                    cidr, node.name)
        return None
    for ip in node.internal_ips:
        if ipaddress.ip_address(ip).version == net.version:
            return ip
    log.info("node %s has no IPv%d InternalIP; no route to %s", node.name, net.version, cidr)
    return None


@dataclass(frozen=True)
class _Route:
    """An entry of the main table, reduced to what ownership and comparison need."""

    cidr: str
    gateway: str | None
    proto: int
    family: int


class RouteManager:
    """Keeps the routes np-nft owns (proto :data:`ROUTE_PROTO`) equal to a desired map.

    Works on the network namespace the process is in when the first call opens the netlink
    socket; the socket is kept for the life of the agent (call :meth:`close`). pyroute2 is
    imported there, not at module import, so the rest of the agent and its unit tests do not
    need it.

    Only routes carrying our protocol number are ever replaced or deleted. A desired route
    is skipped (logged, listed in :attr:`skipped`) when its gateway is not directly on-link
    (host-gw needs the nodes on one L2 segment) or when a route of another owner already
    covers the same destination: that one is left as it is.
    """

    def __init__(self, proto: int = ROUTE_PROTO, table: int = MAIN_TABLE) -> None:
        if not 0 < proto < 256 or proto in (2, 3, 4):  # kernel, boot, static
            raise ValueError(f"routing protocol {proto} is reserved or out of range")
        self.proto = proto
        self.table = table
        self.skipped: dict[str, str] = {}  # cidr -> reason, from the last sync()
        self._ipr: Any = None

    # -- lifecycle -----------------------------------------------------

    def _iproute(self) -> Any:
        if self._ipr is None:
            from pyroute2 import IPRoute  # lazy: only the long-running agent needs it

            self._ipr = IPRoute()
        return self._ipr

    def close(self) -> None:
        """Close the netlink socket; the routes stay in the kernel."""
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    def __enter__(self) -> RouteManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- operations ----------------------------------------------------

    def sync(self, desired: Mapping[str, str]) -> tuple[list[str], list[str]]:
        """Make our routes exactly ``desired`` (cidr -> gateway); return (added, removed).

        ``added`` lists CIDRs whose route was created or whose gateway changed, ``removed``
        the CIDRs of owned routes deleted (no longer desired, or now skipped). Unchanged
        routes are not rewritten, so a steady-state sync sends no change to the kernel.
        """
        wanted = {_canonical_cidr(cidr): str(ipaddress.ip_address(gw))
                  for cidr, gw in desired.items()}
        current = self._list()
        owned = {r.cidr: r for r in current if r.proto == self.proto}
        foreign = {r.cidr for r in current if r.proto != self.proto}
        self.skipped = {}
        added: list[str] = []
        for cidr, gateway in sorted(wanted.items()):
            if owned.get(cidr) is not None and owned[cidr].gateway == gateway:
                continue
            reason = self._skip_reason(cidr, gateway, foreign)
            if reason is None:
                reason = self._replace(cidr, gateway)
            if reason is None:
                added.append(cidr)
            else:
                self.skipped[cidr] = reason
                log.warning("no route to pod CIDR %s via %s: %s", cidr, gateway, reason)
        keep = set(wanted) - set(self.skipped)
        removed = [cidr for cidr in sorted(owned) if cidr not in keep and self._delete(owned[cidr])]
        if added or removed:
            log.info("node routes: added/changed %s, removed %s", added, removed)
        return added, removed

    def flush(self) -> list[str]:
        """Delete every route we own (node leaving np-nft); return their CIDRs."""
        owned = [r for r in self._list() if r.proto == self.proto]
        return [r.cidr for r in owned if self._delete(r)]

    def owned(self) -> dict[str, str | None]:
        """Our routes currently in the kernel: cidr -> gateway (for status and tests)."""
        return {r.cidr: r.gateway for r in self._list() if r.proto == self.proto}

    # -- netlink -------------------------------------------------------

    def _list(self) -> list[_Route]:
        ipr = self._iproute()
        routes = []
        for family in (AF_INET, AF_INET6):
            for msg in ipr.route("dump", family=family, table=self.table):
                if msg.get("table") != self.table:
                    continue  # older kernels ignore the table filter of a dump
                dst = msg.get("dst") or ("0.0.0.0" if family == AF_INET else "::")
                cidr = _canonical_cidr(f"{dst}/{msg['dst_len']}")
                routes.append(_Route(cidr, msg.get("gateway"), msg["proto"], family))
        return routes

    def _skip_reason(self, cidr: str, gateway: str, foreign: set[str]) -> str | None:
        """Why this route must not be installed, or None when it may."""
        if ipaddress.ip_network(cidr).version != ipaddress.ip_address(gateway).version:
            return "gateway and CIDR are of different IP families"
        if cidr in foreign:
            return "a route of another owner exists for this destination; left alone"
        return self._onlink_problem(gateway)

    def _onlink_problem(self, gateway: str) -> str | None:
        """None if ``gateway`` is a neighbour on a directly connected network."""
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            answers = list(self._iproute().route("get", dst=gateway))
        except NetlinkError as exc:
            return f"gateway unreachable ({exc})"
        for msg in answers:
            if msg["type"] != RTN_UNICAST:
                return "gateway is a local address of this node"
            if msg.get("gateway"):
                return f"gateway is not on-link (reached via {msg.get('gateway')})"
        return None

    def _replace(self, cidr: str, gateway: str) -> str | None:
        """Install or update the route; an error string instead of raising."""
        from pyroute2.netlink.exceptions import NetlinkError

        family = AF_INET if ipaddress.ip_network(cidr).version == 4 else AF_INET6
        try:
            self._iproute().route("replace", dst=cidr, gateway=gateway, proto=self.proto,
                                  table=self.table, family=family)
        except NetlinkError as exc:
            return f"kernel refused the route: {exc}"
        return None

    def _delete(self, route: _Route) -> bool:
        """Delete one of our routes; True if it was there. ``proto`` makes the kernel match
        only our route, never another owner's for the same destination."""
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            self._iproute().route("del", dst=route.cidr, proto=self.proto, table=self.table,
                                  family=route.family)
        except NetlinkError as exc:
            if exc.code == 3:  # ESRCH: already gone
                return False
            log.error("cannot delete route %s: %s", route.cidr, exc)
            return False
        return True


def _canonical_cidr(cidr: str) -> str:
    return str(ipaddress.ip_network(cidr, strict=False))


class NodeNetwork:
    """Watches Nodes: this node's conflist (from its podCIDRs) and routes to the others.

    The conflist is written only once the agent is ready (:meth:`agent_ready`, after its
    first successful sync): a runtime that finds it calls np-cni at once, and an ADD before
    the agent can program pods would fail, or wait, for nothing.
    """

    def __init__(self, node_name: str, conf_dir: Path | None, routes: RouteManager | None,
                 agent_socket: str, endpoints_dir: str, mtu: int) -> None:
        self.node_name, self.conf_dir, self.routes = node_name, conf_dir, routes
        self.agent_socket, self.endpoints_dir, self.mtu = agent_socket, endpoints_dir, mtu
        self.nodes: dict[str, NodeInfo] = {}
        self._lock = threading.Lock()
        self._agent_ready = False

    def agent_ready(self) -> None:
        """The agent applied its first sync: the conflist may go in now."""
        with self._lock:
            self._agent_ready = True
            self._apply()

    def replace(self, kind: str, pages: Iterable[list[dict[str, Any]]]) -> None:
        """A full list of Nodes, parsed page by page (see kube.Handler). The nodes are
        swapped in only once the last page is in: a list that fails midway raises out of
        the iteration and leaves the previous nodes, and so the routes, as they were."""
        nodes: dict[str, NodeInfo] = {}
        for page in pages:
            for raw in page:
                info = self._parse(raw)
                if info is not None:
                    nodes[info.name] = info
        with self._lock:
            self.nodes = nodes
            self._apply()

    def event(self, kind: str, type_: str, raw: dict[str, Any]) -> None:
        with self._lock:
            if type_ == "DELETED":
                self.nodes.pop((raw.get("metadata") or {}).get("name", ""), None)
            else:
                info = self._parse(raw)
                if info is not None:
                    self.nodes[info.name] = info
            self._apply()

    @staticmethod
    def _parse(raw: dict[str, Any]) -> NodeInfo | None:
        try:
            return parse_node(raw)
        except ValueError as e:
            log.error("invalid Node skipped: %s", e)
            return None

    def _apply(self) -> None:
        local = self.nodes.get(self.node_name)
        if local is None:
            log.warning("Node %s not found: no conflist, no routes yet", self.node_name)
            return
        if self.conf_dir is not None and local.pod_cidrs and self._agent_ready:
            conflist = conflist_for(local, agent_socket=self.agent_socket,
                                    endpoints_dir=self.endpoints_dir, mtu=self.mtu)
            if write_conflist(self.conf_dir, conflist):
                log.info("wrote CNI config for pod CIDRs %s to %s", ",".join(local.pod_cidrs),
                         self.conf_dir)
        if self.routes is not None:
            added, removed = self.routes.sync(desired_routes(local, self.nodes.values()))
            if added or removed:
                log.info("routes to other nodes: +%s -%s", added, removed)
