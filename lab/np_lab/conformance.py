"""The upstream NetworkPolicy test model on a ClusterLab, probed with real packets.

Kubernetes' own e2e NetworkPolicy suite (``test/e2e/network/netpol``) runs every case on one
model: namespaces ``x``, ``y``, ``z`` (labelled ``ns=x`` ... and, by the API server,
``kubernetes.io/metadata.name``), pods ``a``, ``b``, ``c`` in each (labelled ``pod=a`` ...),
each serving ports 80 and 81 on TCP and UDP behind the named ports ``serve-80-tcp``,
``serve-81-tcp``, ``serve-80-udp``, ``serve-81-udp``. A case applies policies, writes what it
expects as a *truth table* (from-pod x to-pod, per port and protocol) with helpers such as
``ExpectPeer`` and ``ExpectAllIngress``, probes every cell and prints expected, observed and
the comparison when they differ. This module is that model for np-nft:

* :class:`ConformanceCluster` -- a :class:`~np_lab.cluster.ClusterLab` (node netns, the
  fake API server, ``np-agent run`` per node, pods wired by np-cni as a kubelet would) that
  builds the model (:meth:`~ConformanceCluster.build_model`), applies manifests
  (:meth:`~ConformanceCluster.apply_object`), knows when the kernel enforces what the API
  holds (:meth:`~ConformanceCluster.wait_converged`) and probes a whole matrix at once
  (:meth:`~ConformanceCluster.probe_matrix`: one request per source pod, all sources in
  parallel, a short timeout for denied flows);
* :class:`TruthTable`, :class:`Reachability`, :class:`Peer` -- the upstream types, with the
  upstream printing (``.`` connected, ``X`` not; in the comparison ``X`` marks a cell that
  differs) and a combined view that marks differing cells.

SCTP ports are declared on the pods (``serve-80-sctp``, ``serve-81-sctp``) so that named SCTP
ports resolve, but not served: SCTP sockets cannot be opened on the kernels this runs on, so
SCTP rules are checked in the kernel's ruleset (:meth:`ConformanceCluster.nft_list`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

from np_agent.nft.dataplane import KernelTable, read_table
from np_agent.policy.compiler import compile_state
from np_agent.policy.manifests import LoadResult, add_object
from np_agent.policy.model import ClusterState
from np_cni.shared.endpoints import EndpointStore
from np_lab.canonical import canonical
from np_lab.cluster import ClusterLab, ClusterNode, ClusterPod
from np_lab.fakeapi import FakeApiError

NAMESPACES = ("x", "y", "z")
POD_NAMES = ("a", "b", "c")
PORTS = (80, 81)
PROTOCOLS = ("TCP", "UDP")  # served and probed
DECLARED_PROTOCOLS = ("TCP", "UDP", "SCTP")  # declared as container ports
MODEL_PODS = tuple(f"{ns}/{pod}" for ns in NAMESPACES for pod in POD_NAMES)

DENY_TIMEOUT = 0.3  # seconds a probe waits: an allowed flow answers in about a millisecond
SETTLE = 3.0  # seconds a validation keeps re-probing cells that differ (after convergence)
CONVERGE_TIMEOUT = 15.0
TABLE = ("inet", "np-nft")


def named_port(port: int, protocol: str) -> str:
    """The upstream model's name for a container port: ``serve-80-tcp``."""
    return f"serve-{port}-{protocol.lower()}"


MODEL_CONTAINER_PORTS = tuple((named_port(port, proto), port, proto)
                              for port in PORTS for proto in DECLARED_PROTOCOLS)


class Check(NamedTuple):
    """One port/protocol of a matrix."""

    protocol: str  # TCP or UDP
    port: int

    def __str__(self) -> str:
        return f"{self.protocol}/{self.port}"


TCP80, TCP81, UDP80, UDP81 = Check("TCP", 80), Check("TCP", 81), Check("UDP", 80), Check("UDP", 81)
ALL_CHECKS = (TCP80, TCP81, UDP80, UDP81)


# --------------------------------------------------------------------------- truth tables


class TruthTable:
    """from x to -> bool (or unknown), printed as the upstream e2e suite prints it."""

    def __init__(self, froms: Sequence[str], tos: Sequence[str] | None = None,
                 default: bool | None = None) -> None:
        self.froms = list(froms)
        self.tos = list(tos if tos is not None else froms)
        self.values: dict[tuple[str, str], bool] = {}
        if default is not None:
            self.set_all(default)

    def _check(self, frm: str, to: str) -> None:
        if frm not in self.froms or to not in self.tos:
            raise KeyError(f"no cell {frm} -> {to} in this table")

    def set(self, frm: str, to: str, value: bool) -> None:
        self._check(frm, to)
        self.values[(frm, to)] = bool(value)

    def set_all(self, value: bool) -> None:
        for frm in self.froms:
            for to in self.tos:
                self.values[(frm, to)] = bool(value)

    def set_all_from(self, frm: str, value: bool) -> None:
        for to in self.tos:
            self.set(frm, to, value)

    def set_all_to(self, to: str, value: bool) -> None:
        for frm in self.froms:
            self.set(frm, to, value)

    def get(self, frm: str, to: str) -> bool | None:
        return self.values.get((frm, to))

    def cells(self) -> Iterator[tuple[str, str]]:
        for frm in self.froms:
            for to in self.tos:
                yield frm, to

    def compare(self, other: TruthTable) -> TruthTable:
        """A table that is True where both tables agree (and both are known)."""
        out = TruthTable(self.froms, self.tos)
        for frm, to in self.cells():
            a, b = self.get(frm, to), other.get(frm, to)
            out.values[(frm, to)] = a is not None and a == b
        return out

    def pretty_print(self, indent: str = "", marks: Callable[[str, str], str] | None = None
                     ) -> str:
        """Upstream layout: ``-`` corner, one column per destination, ``.`` true, ``X``
        false, ``?`` unknown."""
        def mark(frm: str, to: str) -> str:
            if marks is not None:
                return marks(frm, to)
            value = self.get(frm, to)
            return "?" if value is None else ("." if value else "X")

        width = max([len(s) for s in self.froms + self.tos] + [3]) + 1
        lines = [indent + "-".ljust(width) + "".join(t.ljust(width) for t in self.tos).rstrip()]
        for frm in self.froms:
            row = frm.ljust(width) + "".join(mark(frm, to).ljust(width) for to in self.tos)
            lines.append(indent + row.rstrip())
        return "\n".join(lines)


@dataclass(frozen=True)
class Peer:
    """A set of pods, as upstream's ``Peer``: empty fields match anything."""

    namespace: str = ""
    pod: str = ""

    def matches(self, ref: str) -> bool:
        ns, _, name = ref.partition("/")
        return (not self.namespace or self.namespace == ns) and (not self.pod or self.pod == name)


@dataclass
class Summary:
    true_observed: int
    false_observed: int
    ignored: int
    wrong: list[tuple[str, str]]


class Reachability:
    """Expected and observed truth tables of one port/protocol (upstream ``Reachability``).

    Loopback (a pod to itself) is probed and printed but left out of the comparison, as
    upstream does (``ignoreLoopback``): such traffic never leaves the pod.
    """

    def __init__(self, pods: Sequence[str], default: bool = True,
                 froms: Sequence[str] | None = None, ignore_loopback: bool = True) -> None:
        self.froms = list(froms if froms is not None else pods)
        self.tos = list(pods)
        self.expected = TruthTable(self.froms, self.tos, default)
        self.observed = TruthTable(self.froms, self.tos)
        self.ignore_loopback = ignore_loopback

    # -- expectations, with the upstream names
    def expect(self, frm: str, to: str, connected: bool) -> None:
        self.expected.set(frm, to, connected)

    def expect_peer(self, frm: Peer, to: Peer, connected: bool) -> None:
        """Every pod matched by ``frm`` to every pod matched by ``to``."""
        for f in self.froms:
            if frm.matches(f):
                for t in self.tos:
                    if to.matches(t):
                        self.expected.set(f, t, connected)

    def expect_all_ingress(self, pod: str, connected: bool) -> None:
        """Everything into ``pod``."""
        self.expected.set_all_to(pod, connected)

    def expect_all_egress(self, pod: str, connected: bool) -> None:
        """Everything out of ``pod``."""
        self.expected.set_all_from(pod, connected)

    def observe(self, frm: str, to: str, connected: bool) -> None:
        self.observed.set(frm, to, connected)

    def copy(self) -> Reachability:
        r = Reachability(self.tos, froms=self.froms, ignore_loopback=self.ignore_loopback)
        r.expected.values = dict(self.expected.values)
        return r

    def is_loopback(self, frm: str, to: str) -> bool:
        return frm == to

    def summary(self) -> Summary:
        true_obs = false_obs = ignored = 0
        wrong = []
        for frm, to in self.expected.cells():
            obs = self.observed.get(frm, to)
            if self.ignore_loopback and self.is_loopback(frm, to):
                ignored += 1
                continue
            if obs is None or obs != self.expected.get(frm, to):
                wrong.append((frm, to))
            if obs:
                true_obs += 1
            elif obs is not None:
                false_obs += 1
        return Summary(true_obs, false_obs, ignored, wrong)

    def comparison(self) -> TruthTable:
        out = self.expected.compare(self.observed)
        if self.ignore_loopback:
            for frm, to in out.cells():
                if self.is_loopback(frm, to):
                    out.values[(frm, to)] = True
        return out

    def print_summary(self, expected: bool = True, observed: bool = True,
                      comparison: bool = True, indent: str = "  ") -> str:
        """Upstream ``PrintSummary``: the expected, observed and comparison tables."""
        s = self.summary()
        parts = [f"{indent}{len(s.wrong)} wrong, {s.true_observed} reachable, "
                 f"{s.false_observed} denied, {s.ignored} loopback ignored"]
        if expected:
            parts += [f"{indent}expected:", self.expected.pretty_print(indent)]
        if observed:
            parts += [f"{indent}observed:", self.observed.pretty_print(indent)]
        if comparison:
            parts += [f"{indent}comparison (X = differs):",
                      self.comparison().pretty_print(indent)]
        return "\n".join(parts)

    def combined(self, indent: str = "  ") -> str:
        """One table: each cell shows what was observed (``.`` reachable, ``X`` denied);
        a cell that differs from the expectation is bracketed: ``[X]``; loopback cells, not
        compared, are ``-``."""
        wrong = set(self.summary().wrong)

        def mark(frm: str, to: str) -> str:
            if self.ignore_loopback and self.is_loopback(frm, to):
                return " -"
            obs = self.observed.get(frm, to)
            m = "?" if obs is None else ("." if obs else "X")
            return f"[{m}]" if (frm, to) in wrong else f" {m}"

        return self.observed.pretty_print(indent, mark)


def same(r: Reachability, checks: Iterable[Check] = ALL_CHECKS) -> dict[Check, Reachability]:
    """One expectation for several port/protocols (independent copies)."""
    return {c: r.copy() for c in checks}


# --------------------------------------------------------------------------- the cluster


@dataclass
class MatrixTarget:
    """A row or column of a matrix: a pod, or a node (as a source only)."""

    name: str
    probe_target: str  # the Lab's probe target (a pod netns or a node netns)
    ipv4: str
    ipv6: str
    node: str
    is_node: bool = False


class ConformanceCluster(ClusterLab):
    """A ClusterLab that runs the upstream model (or any pods from manifests).

    Adds, on top of ClusterLab: manifests applied as kubectl + kubelet would, convergence
    checks against the kernel, and matrix probes.
    """

    def __init__(self, nodes: int = 2, prefix: str | None = None,
                 agent_args: tuple[str, ...] = (), kubeconfig: str | None = None) -> None:
        self.served: dict[str, list[Check]] = {}  # pod ref -> served TCP/UDP ports
        self.model_labels: dict[str, dict[str, str]] = {}  # ref / namespace -> labels
        self.model_ns_labels: dict[str, dict[str, str]] = {}
        super().__init__(nodes, agent_args=agent_args, prefix=prefix, kubeconfig=kubeconfig)

    # ------------------------------------------------------------------ the model

    def build_model(self) -> None:
        """Namespaces x, y, z and pods a, b, c in each, spread over the nodes, serving."""
        for ns in NAMESPACES:
            self.model_ns_labels[ns] = {"ns": ns}
            self.namespace(ns, {"ns": ns})
        jobs = []
        for i, ref in enumerate(MODEL_PODS):
            self.model_labels[ref] = {"pod": ref.split("/")[1]}
            jobs.append((ref, self.nodes[i % len(self.nodes)].name))
        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            list(pool.map(lambda job: self.add_serving_pod(
                job[0], job[1], dict(self.model_labels[job[0]]), MODEL_CONTAINER_PORTS), jobs))

    def add_serving_pod(self, ref: str, node: str, labels: dict[str, str],
                        ports: tuple[tuple[str, int, str], ...]) -> ClusterPod:
        """A pod through np-cni, serving every TCP and UDP port it declares."""
        ns, name = ref.split("/")
        pod = self.add_pod(ns, name, node, labels, ports)
        served = []
        for _pname, port, proto in ports:
            if proto in PROTOCOLS:
                self.lab.serve(pod.target, proto.lower(), port)
                served.append(Check(proto, port))
        self.served[ref] = served
        return pod

    def reset_model(self) -> None:
        """Delete every policy and put the model's labels back (only where they changed)."""
        for np in self.api.list_objects("networkpolicies"):
            meta = np["metadata"]
            with contextlib.suppress(FakeApiError):
                self.api.delete("networkpolicies", meta["namespace"], meta["name"])
        for ns, labels in self.model_ns_labels.items():
            want = {"kubernetes.io/metadata.name": ns, **labels}
            if (self.api.get("namespaces", "", ns) or {}).get("metadata", {}).get("labels") != want:
                self.namespace(ns, labels)
        for ref, labels in self.model_labels.items():
            ns, name = ref.split("/")
            if (self.api.get("pods", ns, name) or {}).get("metadata", {}).get("labels") != labels:
                self.label_pod(ref, dict(labels))

    def set_namespace_labels(self, ns: str, labels: dict[str, str]) -> None:
        """Replace a namespace's labels (kubernetes.io/metadata.name is always kept)."""
        self.namespace(ns, labels)

    def ip(self, ref: str, family: int = 4) -> str:
        pod = self.pods[ref]
        return pod.ipv4 if family == 4 else pod.ipv6

    # ------------------------------------------------------------------ manifests

    def apply_object(self, obj: Mapping[str, Any]) -> str:
        """Create or update one object as ``kubectl apply`` would; a new Pod is also started
        as a kubelet would (np-cni ADD on its node, servers on its declared ports)."""
        kind = obj.get("kind")
        meta = dict(obj.get("metadata") or {})
        name = meta.get("name", "")
        if kind == "NetworkPolicy":
            ns = meta.get("namespace") or "default"
            existed = self.api.get("networkpolicies", ns, name) is not None
            self.api.apply("networkpolicies", {**obj, "metadata": {**meta, "namespace": ns}})
            note = "" if any(r.startswith(f"{ns}/") for r in self.pods) else (
                f" (no pod of this lab is in namespace {ns}: it selects nothing)")
            return f"networkpolicy {ns}/{name} {'configured' if existed else 'created'}{note}"
        if kind == "Namespace":
            existed = self.api.get("namespaces", "", name) is not None
            self.namespace(name, dict(meta.get("labels") or {}))
            return f"namespace {name} {'configured' if existed else 'created'}"
        if kind == "Pod":
            ns = meta.get("namespace") or "default"
            ref = f"{ns}/{name}"
            labels = dict(meta.get("labels") or {})
            if ref in self.pods:
                self.label_pod(ref, labels)
                return f"pod {ref} configured (labels)"
            if self.api.get("namespaces", "", ns) is None:
                self.namespace(ns, {})
            spec = obj.get("spec") or {}
            node = spec.get("nodeName") or self._next_node()
            ports = tuple((p.get("name", ""), int(p["containerPort"]),
                           str(p.get("protocol", "TCP")).upper())
                          for c in spec.get("containers") or [] for p in c.get("ports") or [])
            pod = self.add_serving_pod(ref, node, labels, ports)
            return f"pod {ref} created on {node} ({pod.ipv4}, {pod.ipv6})"
        return f"{kind} {name}: ignored (the lab knows Namespace, Pod, NetworkPolicy)"

    def delete_object(self, obj: Mapping[str, Any]) -> str:
        kind = obj.get("kind")
        meta = obj.get("metadata") or {}
        name = meta.get("name", "")
        ns = meta.get("namespace") or "default"
        try:
            if kind == "NetworkPolicy":
                self.api.delete("networkpolicies", ns, name)
                return f"networkpolicy {ns}/{name} deleted"
            if kind == "Pod":
                if f"{ns}/{name}" not in self.pods:
                    return f"pod {ns}/{name}: not found"
                self.delete_pod(f"{ns}/{name}")
                self.served.pop(f"{ns}/{name}", None)
                return f"pod {ns}/{name} deleted"
            if kind == "Namespace":
                for ref in [r for r in self.pods if r.startswith(f"{name}/")]:
                    self.delete_pod(ref)
                    self.served.pop(ref, None)
                for np in self.api.list_objects("networkpolicies", name):
                    self.api.delete("networkpolicies", name, np["metadata"]["name"])
                self.api.delete("namespaces", "", name)
                return f"namespace {name} deleted"
        except FakeApiError as e:
            return f"{kind} {name}: {e.message}"
        return f"{kind} {name}: ignored"

    def _next_node(self) -> str:
        counts = {n.name: 0 for n in self.nodes}
        for pod in self.pods.values():
            counts[pod.node] += 1
        return min(counts, key=lambda n: (counts[n], n))

    # ------------------------------------------------------------------ state and kernel

    def api_state(self) -> ClusterState:
        """What the API server holds, parsed as the agents parse it."""
        result = LoadResult()
        for plural in ("namespaces", "pods", "networkpolicies"):
            for obj in self.api.list_objects(plural):
                add_object(result, obj, f"{plural}/{obj['metadata'].get('name')}")
        return result.state

    def kernel_table(self, node: ClusterNode) -> KernelTable | None:
        proc = self.lab.run(node.netns, ["nft", "-j", "list", "table", *TABLE], check=False)
        if proc.returncode != 0:
            return None
        return read_table(json.loads(proc.stdout)["nftables"])

    def nft_list(self, node: ClusterNode | str) -> str:
        """``nft list table inet np-nft`` in a node's netns, as text."""
        n = self.node(node) if isinstance(node, str) else node
        return self.lab.run(n.netns, ["nft", "list", "table", *TABLE]).stdout

    def divergence(self) -> list[str]:
        """How each node's kernel differs from what the API state means for it (set elements
        only, comments aside); empty once every agent enforces the current state."""
        state = self.api_state()
        out = []
        for node in self.nodes:
            endpoints, _ = EndpointStore(node.dir / "endpoints").all()
            want = canonical(compile_state(state, node.name, endpoints).elements, False)
            have = self.kernel_table(node)
            if have is None:
                out.append(f"{node.name}: no table {' '.join(TABLE)}")
                continue
            got = canonical({n: s.elements for n, s in have.sets.items()}, False)
            for name in want.keys() | got.keys():
                w, h = want.get(name, set()), got.get(name, set())
                if w != h:
                    out.append(f"{node.name} {name}: missing {len(w - h)}, extra {len(h - w)}")
        return out

    def kernel_isolated(self, direction: str, family: int = 4) -> set[str]:
        """Pods whose address is in ``<direction>-isolated-v4/v6`` on their own node."""
        tables = {n.name: self.kernel_table(n) for n in self.nodes}
        out = set()
        for ref, pod in self.pods.items():
            table = tables[pod.node]
            kset = table.sets.get(f"{direction}-isolated-v{family}") if table else None
            if kset is None:
                continue
            ip = int(ipaddress.ip_address(pod.ipv4 if family == 4 else pod.ipv6))
            if any(lo <= ip <= hi for (lo, hi), *_ in kset.elements):
                out.add(ref)
        return out

    def wait_converged(self, timeout: float = CONVERGE_TIMEOUT) -> None:
        """Wait until every node's kernel holds exactly what the API state compiles to.

        This is the barrier between "objects written" and "probe": a matrix that happens to
        look right before the agents caught up proves nothing.
        """
        deadline = time.monotonic() + timeout
        while True:
            diff = self.divergence()
            if not diff:
                return
            if time.monotonic() >= deadline:
                logs = "\n".join(f"--- {n.name} agent log (tail)\n{self.agent_log(n)[-2000:]}"
                                 for n in self.nodes)
                raise TimeoutError(f"kernel not converged after {timeout} s: {diff}\n{logs}")
            time.sleep(0.03)

    # ------------------------------------------------------------------ probing

    def pod_targets(self, refs: Iterable[str] | None = None) -> list[MatrixTarget]:
        refs = list(refs) if refs is not None else sorted(self.pods)
        return [MatrixTarget(r, self.pods[r].target, self.pods[r].ipv4, self.pods[r].ipv6,
                             self.pods[r].node) for r in refs]

    def node_targets(self) -> list[MatrixTarget]:
        return [MatrixTarget(n.name, n.target, n.address, f"fd00:0:0:ffff::{n.index}", n.name,
                             is_node=True) for n in self.nodes]

    def probe_matrix(self, checks: Sequence[Check], family: int = 4,
                     timeout: float = DENY_TIMEOUT, sources: Sequence[MatrixTarget] | None = None,
                     dests: Sequence[MatrixTarget] | None = None
                     ) -> dict[Check, TruthTable]:
        """Every source to every destination on every check, with real packets.

        One ``probe_many`` per source (its probes run concurrently inside the source's
        netns), all sources at once: a whole 9x9 matrix on four port/protocols costs about one
        probe timeout.
        """
        dests = list(dests) if dests is not None else self.pod_targets()
        sources = list(sources) if sources is not None else dests
        tables = {c: TruthTable([s.name for s in sources], [d.name for d in dests])
                  for c in checks}

        def run(src: MatrixTarget) -> None:
            plan = [(d, c) for d in dests for c in checks]
            specs = [(d.ipv4 if family == 4 else d.ipv6, c.protocol.lower(), c.port)
                     for d, c in plan]
            results = self.lab.probe_many(src.probe_target, specs, timeout)
            for (d, c), ok in zip(plan, results, strict=True):
                tables[c].values[(src.name, d.name)] = ok

        with ThreadPoolExecutor(max_workers=max(1, len(sources))) as pool:
            list(pool.map(run, sources))
        return tables

    def validate(self, expectations: Mapping[Check, Reachability], family: int = 4,
                 timeout: float = DENY_TIMEOUT, settle: float = SETTLE) -> bool:
        """Probe until the observations match the expectations or ``settle`` runs out; the
        observed tables are left in the Reachability objects. True when all match."""
        checks = list(expectations)
        first = next(iter(expectations.values()))
        targets = {t.name: t for t in self.pod_targets() + self.node_targets()}
        sources = [targets[f] for f in first.froms]
        dests = [targets[t] for t in first.tos]
        deadline = time.monotonic() + settle
        while True:
            observed = self.probe_matrix(checks, family, timeout, sources, dests)
            for c, r in expectations.items():
                r.observed.values = dict(observed[c].values)
            if all(not r.summary().wrong for r in expectations.values()):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def predict(self, check: Check, evaluate: Callable[..., bool], family: int = 4,
                sources: Sequence[MatrixTarget] | None = None,
                dests: Sequence[MatrixTarget] | None = None) -> Reachability:
        """Expected matrix from an evaluator ``evaluate(state, src_ip, dst_ip, proto, port)``
        (such as np_lab.reference) on the current API state. A node reaching a pod of its own
        node is always allowed (that traffic never crosses the forward hook, so kubelet
        probes work); a remote node is an ordinary source address."""
        dests = list(dests) if dests is not None else self.pod_targets()
        sources = list(sources) if sources is not None else dests
        state = self.api_state()
        r = Reachability([d.name for d in dests], froms=[s.name for s in sources])
        for s in sources:
            for d in dests:
                if s.is_node and s.node == d.node:
                    ok = True
                else:
                    src_ip = s.ipv4 if family == 4 else s.ipv6
                    dst_ip = d.ipv4 if family == 4 else d.ipv6
                    ok = evaluate(state, src_ip, dst_ip, check.protocol, check.port)
                r.expect(s.name, d.name, ok)
        return r


def render_matrices(expectations: Mapping[Check, Reachability], family: int = 4,
                    verbose: bool = False, title: str = "") -> str:
    """Text for a set of matrices: the combined view (``[ ]`` marks a differing cell) or, with
    ``verbose``, the upstream expected/observed/comparison tables."""
    out = [title] if title else []
    for check, r in expectations.items():
        s = r.summary()
        status = "as expected" if not s.wrong else f"{len(s.wrong)} DIFFER from expected"
        out.append(f"{check} IPv{family}: {s.true_observed} reachable, {s.false_observed} "
                   f"denied, {status}")
        out.append(r.print_summary() if verbose else r.combined())
    if not verbose:
        out.append("  (rows from, columns to; . reachable, X denied, [ ] differs from expected,"
                   " - a pod to itself, not compared)")
    return "\n".join(out)
