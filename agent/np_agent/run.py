"""`np-agent run`: wire the pieces of a node agent together and keep them running.

Sources (API watch, or static manifests) feed the NodeAgent; the CNI socket, the health and
metrics endpoint, the node's CNI conflist and routes hang off the same loop. Stopping the agent
(SIGTERM, SIGKILL, a crash) leaves the kernel's rules in force: there is no fail-open.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from .cniserver import CniServer
from .compiler import Delta
from .endpoints import EndpointStore
from .httpserver import HealthServer, Registry
from .manifests import load_manifests
from .node import NodeAgent
from .nodenet import (
    NodeInfo,
    RouteManager,
    conflist_for,
    desired_routes,
    parse_node,
    write_conflist,
)
from .ruleset import Ruleset

log = logging.getLogger("np_agent")


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

    def replace(self, kind: str, items: list[dict[str, Any]]) -> None:
        with self._lock:
            self.nodes = {}
            for raw in items:
                self._put(raw)
            self._apply()

    def event(self, kind: str, type_: str, raw: dict[str, Any]) -> None:
        with self._lock:
            if type_ == "DELETED":
                self.nodes.pop((raw.get("metadata") or {}).get("name", ""), None)
            else:
                self._put(raw)
            self._apply()

    def _put(self, raw: dict[str, Any]) -> None:
        try:
            info = parse_node(raw)
        except ValueError as e:
            log.error("invalid Node skipped: %s", e)
            return
        self.nodes[info.name] = info

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


class Dispatch:
    """Routes each kind's list and events to whoever handles it."""

    def __init__(self, agent: NodeAgent, nodes: NodeNetwork) -> None:
        self.agent, self.nodes = agent, nodes

    def replace(self, kind: str, items: list[dict[str, Any]]) -> None:
        (self.nodes if kind == "nodes" else self.agent).replace(kind, items)

    def event(self, kind: str, type_: str, obj: dict[str, Any]) -> None:
        (self.nodes if kind == "nodes" else self.agent).event(kind, type_, obj)


class ConntrackCutter:
    """Cuts established flows that a change no longer allows, in its own thread.

    A cut lists the conntrack table and needs a matcher over the whole ruleset; doing that in
    the sync thread would delay the next change's enforcement. The sync thread only hands
    over a snapshot of the elements (a dict copy, under a millisecond); bursts coalesce.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._latest: Ruleset | None = None
        threading.Thread(target=self._run, name="conntrack", daemon=True).start()

    def __call__(self, ruleset: Ruleset, delta: Delta) -> None:
        lost = any(not name.startswith("pod-ifaces") for name in delta.removed) or any(
            "isolated" in name for name in delta.added)
        if not lost:
            return
        snapshot = Ruleset(ruleset.table, ruleset.family, ruleset.sets, ruleset.chains,
                           {name: dict(items) for name, items in ruleset.elements.items()})
        with self._cond:
            self._latest = snapshot
            self._cond.notify()

    def _run(self) -> None:
        from .conntrack import cut_disallowed
        from .verdict import Matcher

        while True:
            with self._cond:
                while self._latest is None:
                    self._cond.wait()
                ruleset, self._latest = self._latest, None
            try:
                cut_disallowed(Matcher(ruleset))
            except Exception as e:  # noqa: BLE001 - never take the agent down
                log.error("cutting connections that are no longer allowed failed: %s", e)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s")
    for noisy in ("pyroute2", "urllib3", "kubernetes"):  # their debug output drowns ours
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.root.level))
    if args.pid_file:  # deprecated: only the old chroot wrapper needed it
        Path(args.pid_file).parent.mkdir(parents=True, exist_ok=True)
        Path(args.pid_file).write_text(f"{os.getpid()}\n")
    registry = Registry()
    agent = NodeAgent(args.node_name, EndpointStore(args.endpoints_dir), registry=registry,
                      after_sync=None if args.keep_established else ConntrackCutter())
    agent.start()
    stop, reload, wake = threading.Event(), threading.Event(), threading.Event()
    reflectors: list[Any] = []
    cni = CniServer(args.cni_socket, agent, plugin_dir=args.cni_plugin_dir,
                    pending_dir=args.pending_dir)
    # DELs the host's shim spooled while no agent ran: released before any ADD is served
    # (clients connecting meanwhile wait in the socket's backlog).
    cni.pending.replay()
    cni.serve_in_background()

    def ready() -> tuple[bool, str]:
        if not all(r.synced.is_set() for r in reflectors):
            return False, "waiting for the first list of every watched kind"
        return (agent.ready, "ready") if agent.ready else (False, "first sync not done yet")

    http = HealthServer(args.metrics_address, registry=registry,
                        alive=lambda: agent._thread is not None and agent._thread.is_alive(),
                        ready=ready).start()
    for sig, flag in ((signal.SIGTERM, stop), (signal.SIGINT, stop), (signal.SIGHUP, reload)):
        signal.signal(sig, lambda *_, flag=flag: (flag.set(), wake.set()))
    routes = None
    try:
        if args.manifests:
            reload.set()
        else:
            from . import kube

            routes = None if args.no_routes else RouteManager()
            nodes = NodeNetwork(args.node_name, None if args.no_cni_conf else
                                Path(args.cni_conf_dir), routes, args.cni_socket,
                                args.endpoints_dir, args.mtu)
            agent.on_ready(nodes.agent_ready)
            client = kube.api_client(args.kubeconfig)
            cni.pod_getter = kube.pod_getter(client)
            handler = Dispatch(agent, nodes)
            options = kube.WatchOptions(watch_timeout=args.watch_timeout,
                                        read_timeout=args.watch_timeout + 30.0)
            for kind, fn in kube.list_functions(client).items():
                reflectors.append(kube.Reflector(kind, fn, handler, stop, options))
            for r in reflectors:
                r.start()
        log.info("running on node %s (cni socket %s, metrics on %s)", args.node_name,
                 args.cni_socket, f"{http.host}:{http.port}")
        _loop(args, agent, cni, stop, reload, wake)
    finally:
        stop.set()
        cni.close()
        http.stop()
        agent.stop()
        if routes is not None:
            routes.close()
        log.info("stopped; the rules stay in force in the kernel")
    return 0


def _loop(args: argparse.Namespace, agent: NodeAgent, cni: CniServer, stop: threading.Event,
          reload: threading.Event, wake: threading.Event) -> None:
    next_check = time.monotonic() + args.resync_interval
    while not stop.is_set():
        if reload.is_set() and args.manifests:
            reload.clear()
            result = load_manifests(args.manifests)
            for err in result.errors:
                log.error("manifest skipped: %s", err)
            agent.set_state(result.state)
        wake.wait(max(0.0, next_check - time.monotonic()))
        wake.clear()
        if time.monotonic() >= next_check:
            agent.request_sync(wait=False, verify=True)  # drift check against the kernel
            cni.pending.replay()  # a DEL spooled while this agent was restarting
            next_check = time.monotonic() + args.resync_interval
