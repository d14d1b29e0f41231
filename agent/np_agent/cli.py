"""np-agent: compile NetworkPolicies into nftables and enforce them on this node."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from np_agent.nft import layout
from np_agent.node.cniserver import DEFAULT_PLUGIN_DIR, DEFAULT_SOCKET
from np_agent.node.pending import DEFAULT_DIR as DEFAULT_PENDING_DIR
from np_agent.policy.compiler import compile_state
from np_agent.policy.manifests import LoadResult, load_manifests
from np_cni.shared.endpoints import DEFAULT_DIR

EXIT_OK, EXIT_ERROR, EXIT_INVALID = 0, 1, 2


def _load(args: argparse.Namespace) -> LoadResult:
    result = load_manifests(args.manifests)
    for err in result.errors:
        print(f"np-agent: error: {err}", file=sys.stderr)
    return result


def cmd_dump_rules(args: argparse.Namespace) -> int:
    from np_agent.dump import dump_json, dump_text

    result = _load(args)
    compiled = compile_state(result.state, args.node_name)
    if args.json:
        json.dump(dump_json(compiled), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(dump_text(compiled))
    return EXIT_INVALID if result.errors else EXIT_OK


def cmd_explain(args: argparse.Namespace) -> int:
    from np_agent.explain import ExplainError, explain, parse_port, with_placeholders

    result = _load(args)
    state, placeholders = with_placeholders(result.state)
    try:
        port, proto = parse_port(args.port)
        answer = explain(state, args.source, args.destination, port, proto, args.node_name)
    except ExplainError as e:
        print(f"np-agent: error: {e}", file=sys.stderr)
        return EXIT_INVALID
    print("\n".join(answer.lines))
    if placeholders:
        print(f"  (no IP in the manifests, placeholders used: {', '.join(placeholders)}; "
              "ipBlock rules are judged against them)")
    return EXIT_INVALID if result.errors else EXIT_OK


def cmd_apply(args: argparse.Namespace) -> int:
    from np_agent.nft.dataplane import Dataplane
    from np_agent.nft.libnft import NftError

    result = _load(args)
    compiled = compile_state(result.state, args.node_name)
    for w in compiled.warnings:
        print(f"np-agent: warning: {w}", file=sys.stderr)
    try:
        applied = Dataplane().reconcile(layout.ruleset(compiled.elements))
    except NftError as e:
        print(f"np-agent: error: the kernel refused the ruleset, nothing changed: {e}",
              file=sys.stderr)
        return EXIT_ERROR
    enforced = [r for r in compiled.pods if r.pod.ips]  # pods without an IP have no elements
    isolated = sum(1 for r in enforced if r.ingress or r.egress)
    print(f"applied: {len(enforced)} local pod(s), {isolated} isolated; "
          f"{applied.added} element(s) added, {applied.removed} removed"
          + (f", chains written: {', '.join(applied.rewritten_chains)}"
             if applied.rewritten_chains else "")
          + f"; transaction {applied.transaction_seconds * 1000:.1f} ms")
    return EXIT_INVALID if result.errors else EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    import os

    from np_agent.run import run

    args.node_name = args.node_name or os.environ.get("NODE_NAME")
    if not args.node_name:
        print("np-agent: error: run needs --node-name or NODE_NAME (the downward API)",
              file=sys.stderr)
        return EXIT_ERROR
    return run(args)


def cmd_remove(args: argparse.Namespace) -> int:
    from np_agent.nft.dataplane import Dataplane
    from np_agent.ruleset import FAMILY, TABLE

    removed = Dataplane().remove(FAMILY, TABLE)
    print(f"table {FAMILY} {TABLE} " + ("deleted" if removed else "not present"))
    return EXIT_OK


def cmd_install_cni(args: argparse.Namespace) -> int:
    from pathlib import Path

    from np_agent.node.nodesetup import SetupError, install_cni

    plugins = [p.strip() for p in args.plugins.split(",") if p.strip()]
    try:
        done = install_cni(Path(args.bin_dir), Path(args.shim), Path(args.plugins_from),
                           plugins, Path(args.state_dir))
    except SetupError as e:
        print(f"np-agent: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    print("\n".join(done))
    return EXIT_OK


def cmd_uninstall_node(args: argparse.Namespace) -> int:
    from pathlib import Path

    from np_agent.node.nodesetup import uninstall_node

    print("\n".join(uninstall_node(Path(args.cni_conf_dir), Path(args.bin_dir),
                                   Path(args.run_dir), Path(args.state_dir))))
    return EXIT_OK


def _manifest_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifests", nargs="+", required=True, metavar="PATH",
                   help="YAML/JSON files or directories (searched recursively) holding Pods, "
                        "Namespaces and NetworkPolicies; multi-document YAML and `kind: List` "
                        "are read. Pods carry their IPs in status.podIPs.")
    p.add_argument("--node-name", default=None, metavar="NAME",
                   help="this node's name: pods whose spec.nodeName names another node are only "
                        "peers, their isolation is left to their node (default: every pod is "
                        "local)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="np-agent",
        description="Enforce Kubernetes NetworkPolicy with nftables (table inet np-nft).",
        epilog="Exit status: 0 ok, 1 failure (nothing applied), 2 some objects were invalid "
               "(reported on stderr; the rest was applied, invalid policies fail closed).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("dump-rules", help="print the ruleset the manifests would enforce",
                       description="Compile the manifests and print, without touching the "
                                   "kernel, a per-pod summary and the nftables table annotated "
                                   "with the policies behind every element.")
    _manifest_args(p)
    p.add_argument("--json", action="store_true",
                   help="machine-readable output: pods, warnings and the libnftables JSON batch")
    p.set_defaults(func=cmd_dump_rules)

    p = sub.add_parser(
        "explain", help="is a connection allowed, and why",
        description="Say whether the first packet of a connection is allowed, in one sentence "
                    "(the first line starts with 'allowed' or 'denied'), naming the policy rule "
                    "that admits it, or the policies that isolate the pod and the nearest "
                    "misses. The answer is read from the compiled elements with the kernel's "
                    "own walk. Pods without an IP get a placeholder from 240.0.0.0/4.",
        epilog="example: np-agent explain --manifests examples/aks-demo "
               "--from frontend/apipod --to backend/dbpod --port 80/TCP")
    _manifest_args(p)
    p.add_argument("--from", dest="source", required=True, metavar="NS/POD|IP",
                   help="the connection's source")
    p.add_argument("--to", dest="destination", required=True, metavar="NS/POD|IP",
                   help="the connection's destination")
    p.add_argument("--port", required=True, metavar="PORT[/PROTO]",
                   help="destination port and protocol, e.g. 80/TCP, 53/UDP (default TCP)")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("apply", help="enforce the manifests in this network namespace",
                       description="Compile the manifests and make table inet np-nft in the "
                                   "current network namespace match, in one atomic nftables "
                                   "transaction that changes only what differs. Needs root "
                                   "(CAP_NET_ADMIN).")
    _manifest_args(p)
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("run", help="run the node agent (watch the API, program the node)",
                       description="The long-running node agent (a DaemonSet): watches Pods, "
                                   "Namespaces, NetworkPolicies and Nodes, programs this "
                                   "node's dataplane incrementally, writes the CNI conflist "
                                   "from the Node's podCIDRs, routes other nodes' pod CIDRs via "
                                   "their InternalIP, answers np-cni on a unix socket, serves "
                                   "/healthz /readyz /metrics. Stopping it leaves the rules in "
                                   "force.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--kubeconfig", metavar="FILE",
                     help="kubeconfig to reach the API server (default: in-cluster config)")
    src.add_argument("--manifests", nargs="+", metavar="PATH",
                     help="instead of the API server: a static cluster state (files or "
                          "directories of Pods, Namespaces, NetworkPolicies), re-read on SIGHUP")
    p.add_argument("--node-name", default=None, metavar="NAME",
                   help="this node's name (default: $NODE_NAME, from the downward API)")
    p.add_argument("--cni-conf-dir", default="/etc/cni/net.d", metavar="DIR",
                   help="where the CNI conflist for np-cni is written, atomically and only "
                        "when it changes (default: %(default)s)")
    p.add_argument("--no-cni-conf", action="store_true",
                   help="do not write the CNI conflist (it is managed elsewhere)")
    p.add_argument("--no-routes", action="store_true",
                   help="do not program routes to other nodes' pod CIDRs")
    p.add_argument("--mtu", type=int, default=1500, help="pod veth MTU in the conflist "
                                                         "(default: %(default)s)")
    p.add_argument("--cni-socket", default=DEFAULT_SOCKET, metavar="PATH",
                   help="unix socket np-cni (the host's shim, or the Python plugin) talks to "
                        "(default: %(default)s)")
    p.add_argument("--endpoints-dir", default=str(DEFAULT_DIR), metavar="DIR",
                   help="where np-cni records pod attachments (default: %(default)s)")
    p.add_argument("--cni-plugin-dir", default=DEFAULT_PLUGIN_DIR, metavar="DIR",
                   help="CNI_PATH for the CNI commands the agent runs for the host's shim: "
                        "the IPAM plugin (host-local) comes from the agent's image, not from "
                        "the host (default: %(default)s)")
    p.add_argument("--pending-dir", default=str(DEFAULT_PENDING_DIR), metavar="DIR",
                   help="where the shim spools DELs while the agent is down; they are "
                        "replayed at start and on every shim request (default: %(default)s)")
    p.add_argument("--metrics-address", default=":9490", metavar="HOST:PORT",
                   help="address of /healthz, /readyz and /metrics (default: %(default)s)")
    p.add_argument("--keep-established", action="store_true",
                   help="do not cut established connections that a policy change no longer "
                        "allows (by default their conntrack entries are deleted)")
    p.add_argument("--resync-interval", type=float, default=60.0, metavar="SECONDS",
                   help="how often the kernel is checked for drift (someone else editing "
                        "table inet np-nft) and drift repaired: free while nothing committed "
                        "to nftables (ruleset generation), else the table is listed in a "
                        "thread of its own, never delaying events (default: %(default)s)")
    p.add_argument("--watch-timeout", type=int, default=300, metavar="SECONDS",
                   help="server-side length of one watch; a connection silent for this plus "
                        "30 s is considered dead (default: %(default)s)")
    p.add_argument("--pid-file", metavar="FILE",
                   help="deprecated, no longer needed (the old chroot wrapper used it; the "
                        "shim talks to the socket): still accepted, writes the agent's PID")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"], help="default: %(default)s")
    p.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="text (key=value, the default) or one JSON object a line")
    p.add_argument("-v", "--v", type=int, default=None, metavar="N",
                   help="klog-style verbosity, as the kubelet takes it: 4 and up is debug "
                        "(overrides --log-level)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("remove", help="delete table inet np-nft from this network namespace",
                       description="Uninstall: delete np-nft's table. Pods are open afterwards.")
    p.set_defaults(func=cmd_remove)
    _install_parsers(sub)
    return parser


def _install_parsers(sub: Any) -> None:
    from np_agent.node.nodesetup import DEFAULT_PLUGINS, DEFAULT_SHIM

    p = sub.add_parser("install-cni", help="install the np-cni shim on the host (init "
                                           "container)",
                       description="Install the static np-cni shim as BIN_DIR/np-cni and the "
                                   "reference plugins BIN_DIR lacks, each atomically (temp "
                                   "file, fsync, rename). What was installed is recorded in "
                                   "STATE_DIR for uninstall-node.")
    p.add_argument("--bin-dir", required=True, metavar="DIR",
                   help="the host's CNI bin directory, e.g. /host/opt/cni/bin")
    p.add_argument("--shim", default=str(DEFAULT_SHIM), metavar="PATH",
                   help="the shim binary to install (default: %(default)s)")
    p.add_argument("--plugins-from", default=DEFAULT_PLUGIN_DIR, metavar="DIR",
                   help="where the reference plugins are (default: %(default)s)")
    p.add_argument("--plugins", default=",".join(DEFAULT_PLUGINS), metavar="LIST",
                   help="comma-separated plugins to copy where BIN_DIR lacks them "
                        "(default: %(default)s; empty: none)")
    p.add_argument("--state-dir", default="/var/lib/np-nft", metavar="DIR",
                   help="np-nft's state directory on the host (default: %(default)s)")
    p.set_defaults(func=cmd_install_cni)

    p = sub.add_parser("uninstall-node", help="remove np-nft from this node",
                       description="Remove the conflist np-nft wrote, the np-cni shim (only if "
                                   "it is np-nft's), the plugins install-cni installed, table "
                                   "inet np-nft and the proto 201 routes of this network "
                                   "namespace, the run and state directories. Idempotent. "
                                   "Stop the agent first (it would write the conflist again). "
                                   "Pods wired by np-cni are not touched.")
    p.add_argument("--cni-conf-dir", default="/etc/cni/net.d", metavar="DIR",
                   help="default: %(default)s")
    p.add_argument("--bin-dir", default="/opt/cni/bin", metavar="DIR",
                   help="default: %(default)s")
    p.add_argument("--run-dir", default="/run/np-nft", metavar="DIR",
                   help="default: %(default)s")
    p.add_argument("--state-dir", default="/var/lib/np-nft", metavar="DIR",
                   help="default: %(default)s")
    p.set_defaults(func=cmd_uninstall_node)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FileNotFoundError as e:
        print(f"np-agent: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except PermissionError as e:
        print(f"np-agent: error: {e} (np-agent apply needs root)", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
