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
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from np_agent.logs import configure
from np_agent.node.cniserver import CniServer
from np_agent.node.conntrack import ConntrackCutter
from np_agent.node.engine import NodeAgent, maintenance_loop
from np_agent.node.health import HealthServer
from np_agent.node.nodenet import NodeNetwork, RouteManager
from np_cni.shared.endpoints import EndpointStore

log = logging.getLogger("np_agent")


class Dispatch:
    """Routes each kind's list and events to whoever handles it."""

    def __init__(self, agent: NodeAgent, nodes: NodeNetwork) -> None:
        self.agent, self.nodes = agent, nodes

    def replace(self, kind: str, pages: Iterable[list[dict[str, Any]]]) -> None:
        (self.nodes if kind == "nodes" else self.agent).replace(kind, pages)

    def event(self, kind: str, type_: str, obj: dict[str, Any]) -> None:
        (self.nodes if kind == "nodes" else self.agent).event(kind, type_, obj)


def run(args: argparse.Namespace) -> int:
    configure(args.log_level, args.log_format, args.v)
    if args.pid_file:  # deprecated: only the old chroot wrapper needed it
        Path(args.pid_file).parent.mkdir(parents=True, exist_ok=True)
        Path(args.pid_file).write_text(f"{os.getpid()}\n")
    registry = CollectorRegistry()
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
                        alive=agent.alive,
                        ready=ready).start()
    for sig, flag in ((signal.SIGTERM, stop), (signal.SIGINT, stop), (signal.SIGHUP, reload)):
        signal.signal(sig, lambda *_, flag=flag: (flag.set(), wake.set()))
    routes = None
    try:
        if args.manifests:
            reload.set()
        else:
            from np_agent.node import kube

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
        maintenance_loop(agent, cni, stop, reload, wake, args.resync_interval,
                         args.manifests)
    finally:
        stop.set()
        cni.close()
        http.stop()
        agent.stop()
        if routes is not None:
            routes.close()
        log.info("stopped; the rules stay in force in the kernel")
    return 0
