"""The node agent's engine: API objects + local endpoints -> one transaction at a time.

Inputs arrive from any thread (watch events, a relist, np-cni's requests, a periodic drift
check) and only mark work; one worker thread compiles (incrementally, NodeCompiler) and
applies. Requests that arrive while a sync runs are all served by the next one, so a burst of
events or of 20 ADDs costs a couple of transactions, not one each.

Nothing is applied before every kind has been listed once: a dataplane built from pods
without their policies would open pods that should be closed. While the API server is away
nothing changes, and the kernel keeps enforcing the last state.
"""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily

from np_agent.nft import layout
from np_agent.nft.dataplane import ApplyResult, Dataplane
from np_agent.policy.compiler import Compiled, NodeCompiler
from np_agent.policy.manifests import load_manifests
from np_agent.policy.model import PARSERS, ClusterState, ModelError, fail_closed_policy
from np_agent.ruleset import TABLE, Delta, Ruleset
from np_cni.shared.endpoints import EndpointStore

log = logging.getLogger("np_agent.node")

POLICY_KINDS = ("namespaces", "pods", "networkpolicies")
_KIND = {"namespaces": "Namespace", "pods": "Pod", "networkpolicies": "NetworkPolicy"}


@dataclass
class Outcome:
    generation: int
    result: ApplyResult | None = None
    error: str = ""


def _version() -> str:
    try:
        return importlib.metadata.version("np-nft")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return "unknown"


class Metrics:
    """The agent's metrics, in the agent's own registry (served by health.HealthServer).

    prometheus_client appends ``_total`` to counter names: ``np_agent_watch_events`` is
    exposed as ``np_agent_watch_events_total``, as README.md lists it.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.objects = Gauge("np_agent_objects", "API objects held, by kind", ["kind"],
                             registry=registry)
        self.events = Counter("np_agent_watch_events", "watch events received", ["kind"],
                              registry=registry)
        self.syncs = Counter("np_agent_syncs", "compile + apply rounds", registry=registry)
        self.errors = Counter("np_agent_errors", "failures, by stage", ["stage"],
                              registry=registry)
        self.elements = Gauge("np_agent_set_elements", "set elements enforced",
                              registry=registry)
        self.transaction = Histogram(
            "np_agent_transaction_seconds", "nftables transaction latency", registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self.cni = Histogram(
            "np_agent_cni_seconds", "CNI commands run for the node's shim, by command and "
            "exit code, from request to answer", ["command", "code"], registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10))
        self.drift_checks = Counter(
            "np_agent_drift_checks", "periodic checks of the kernel's table against what the "
            "agent applied: unchanged (ruleset generation unmoved, nothing listed), same "
            "(listed, equal), drift (listed, repaired), unknown (a sync overlapped)",
            ["result"], registry=registry)
        self.event_to_kernel = Histogram(
            "np_agent_event_to_kernel_seconds", "from a watch event's arrival to the end of "
            "the transaction that enforces it", registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.sync_seconds = Histogram(
            "np_agent_sync_seconds", "one sync: compile, diff and transaction",
            registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.last_sync = Gauge(
            "np_agent_last_sync_timestamp_seconds", "when the kernel last got what the agent "
            "wants (Unix time): alert when it lags", registry=registry)
        self.lists = Counter(
            "np_agent_lists", "full lists of a kind (the first one, then relists after a 410 "
            "or a lost watch)", ["kind"], registry=registry)
        self.build = Info("np_agent_build", "the running np-agent", registry=registry)
        self.build.info({"version": _version(), "python": platform.python_version()})


HEARTBEAT = 5.0  # seconds; an idle sync loop turns at least this often
STALL = 120.0  # seconds without a turn: not alive (a cold sync at 150,000 pods takes ~10 s)


class DeniedPackets:
    """``np_agent_denied_packets_total{direction,family}``: the counters of the drop rules,
    read from the kernel at each scrape (a few small chains, not the sets)."""

    def __init__(self, dataplane: Dataplane) -> None:
        self.dataplane = dataplane

    def collect(self) -> Iterable[CounterMetricFamily]:
        family = CounterMetricFamily(
            "np_agent_denied_packets", "new connections dropped by policy (isolated pod, no "
            "rule admits them), from the kernel's rule counters", labels=["direction", "family"])
        try:
            counts = self.dataplane.drop_counters()
        except Exception as e:  # noqa: BLE001 - a scrape must not fail for the kernel
            log.debug("denied packet counters unavailable: %s", e)
            counts = {}
        for (direction, version), packets in sorted(counts.items()):
            family.add_metric([direction, f"ipv{version}"], packets)
        yield family


class NodeAgent:
    def __init__(self, node_name: str | None, store: EndpointStore,
                 dataplane: Dataplane | None = None,
                 registry: CollectorRegistry | None = None,
                 after_sync: Callable[[Ruleset, Delta], None] | None = None) -> None:
        self.node_name = node_name
        self.store = store
        self.dataplane = dataplane or Dataplane()
        self.metrics = Metrics(registry if registry is not None else CollectorRegistry())
        self.after_sync = after_sync  # e.g. cutting conntrack entries no longer allowed
        self.compiler = NodeCompiler(node_name)
        self.ready = False
        self.applied_seq = 0  # sequence number of the newest input enforced
        self._seq = 0
        self._cond = threading.Condition()
        self._listed: dict[str, dict[str, Any]] = {}  # first lists, until all kinds are in
        self._loaded = False
        self._wanted = 0
        self._verify = True  # the first sync lists the kernel: it may hold a previous run's table
        self._pending_since: float | None = None
        self._last = Outcome(0)
        self._stop = False
        self._thread: threading.Thread | None = None
        # Pods read with GET ahead of their watch event (ref -> resourceVersion): watch
        # events older than that are not applied to them (see learn_pod).
        self._fetched_rv: dict[str, int] = {}
        self._ready_hooks: list[Callable[[], None]] = []
        self.heartbeat = time.monotonic()  # the sync loop's last turn (liveness)
        self.metrics.registry.register(DeniedPackets(self.dataplane))

    # ------------------------------------------------------------------ inputs

    def set_state(self, state: ClusterState) -> None:
        """A complete cluster state at once (static manifests)."""
        with self._cond:
            self.compiler.replace_state(state)
            self._loaded = True
            self._mark()

    def replace(self, kind: str, pages: Iterable[list[dict[str, Any]]]) -> None:
        """A full list of one kind (first list, or relist after 410), page by page.

        Each page is parsed as it arrives (no raw list is ever held whole: see kube.Handler)
        and outside the lock, so syncs and np-cni are not held up by a long list. The state
        changes only once the last page is in: a list that fails midway raises out of the
        iteration and leaves the previous state in force.
        """
        if kind not in POLICY_KINDS:
            return
        self.metrics.lists.labels(kind).inc()
        objects = {}
        for page in pages:
            for raw in page:
                obj = self._parse(kind, raw)
                if obj is not None:
                    objects[self._ref(kind, obj)] = obj
        with self._cond:
            self.metrics.objects.labels(kind).set(len(objects))
            if kind == "pods":
                self._fetched_rv.clear()  # a relist is a consistent snapshot: it rules
            if not self._loaded:
                self._listed[kind] = objects
                if all(k in self._listed for k in POLICY_KINDS):
                    state = ClusterState()
                    for group in self._listed.values():
                        for obj in group.values():
                            state.add(obj)
                    self.compiler.replace_state(state)
                    self._listed.clear()
                    self._loaded = True
                    self._mark()
                return
            current = self._current(kind)
            for ref in current.keys() - objects.keys():
                self._delete(kind, ref)
            for ref, obj in objects.items():
                if current.get(ref) != obj:
                    self._set(kind, obj)
            self._mark()

    def event(self, kind: str, type_: str, raw: dict[str, Any]) -> None:
        if kind not in POLICY_KINDS:
            return
        self.metrics.events.labels(kind).inc()
        log.debug("%s %s %s", type_, kind, (raw.get("metadata") or {}).get("name"))
        with self._cond:
            if not self._loaded:
                # This kind is listed but others are not yet: keep its first list current,
                # the state is built from it once every kind is in (an event dropped here
                # would be missing until the next relist).
                listed = self._listed.get(kind)
                if listed is not None:
                    if type_ == "DELETED":
                        listed.pop(self._raw_ref(kind, raw), None)
                    else:
                        obj = self._parse(kind, raw)
                        if obj is not None:
                            listed[self._ref(kind, obj)] = obj
                    self.metrics.objects.labels(kind).set(len(listed))
                return
            if self._older_than_fetched(kind, raw):
                log.debug("%s %s: older than the copy read with GET, skipped", type_,
                          self._raw_ref(kind, raw))
                return
            if type_ == "DELETED":
                self._delete(kind, self._raw_ref(kind, raw))
            else:
                obj = self._parse(kind, raw)
                if obj is None:
                    return
                self._set(kind, obj)
            self.metrics.objects.labels(kind).set(len(self._current(kind)))
            self._mark()

    def learn_pod(self, raw: dict[str, Any], uid: str) -> bool:
        """Put a Pod read with GET into the state ahead of its watch event; False (nothing
        changed) when it cannot be parsed or is not the pod with ``uid``.

        A watch that is behind then delivers events older than this copy: applying them
        would regress the pod (old labels, or a DELETED of its predecessor with the same
        name would make it unknown again) until the watch catches up. So events for it are
        skipped while their resourceVersion is numerically lower than the copy's, and the
        guard ends with the first event that is not older. resourceVersions are opaque by
        contract but are etcd revisions, one global increasing integer, in every API server
        this agent meets; a non-numeric one simply disables the guard (events win). A
        relist clears the guards: its snapshot is consistent, and the watch that follows it
        delivers every later change in order.
        """
        pod = self._parse("pods", raw)
        if pod is None or (uid and pod.uid and pod.uid != uid):
            return False
        rv = _resource_version(raw)
        with self._cond:
            if not self._loaded:
                listed = self._listed.get("pods")
                if listed is None:
                    return False  # the pods' first list is still to come and will hold it
                listed[pod.ref] = pod
                return True
            known = self.compiler.state.pods.get(pod.ref)
            if known is not None and known.uid == pod.uid:
                return True  # the watch delivered it meanwhile: its stream stays in order
            if rv is not None:
                self._fetched_rv[pod.ref] = rv
            self._set("pods", pod)
            self._mark()
        return True

    def _older_than_fetched(self, kind: str, raw: dict[str, Any]) -> bool:
        """True for a watch event older than the pod's GET copy (caller holds the lock)."""
        if kind != "pods" or not self._fetched_rv:
            return False
        ref = self._raw_ref(kind, raw)
        fetched = self._fetched_rv.get(ref)
        if fetched is None:
            return False
        rv = _resource_version(raw)
        if rv is not None and rv < fetched:
            return True
        del self._fetched_rv[ref]  # the watch has caught up with the copy
        return False

    def _parse(self, kind: str, raw: dict[str, Any]) -> Any:
        try:
            return PARSERS[_KIND[kind]](raw)
        except ModelError as e:
            self.metrics.errors.labels("parse").inc()
            log.error("invalid object skipped: %s", e)
            if kind == "networkpolicies":
                return fail_closed_policy(raw, e)
            return None

    @staticmethod
    def _ref(kind: str, obj: Any) -> str:
        return obj.name if kind == "namespaces" else obj.ref

    @staticmethod
    def _raw_ref(kind: str, raw: dict[str, Any]) -> str:
        meta = raw.get("metadata") or {}
        return meta.get("name", "") if kind == "namespaces" else (
            f"{meta.get('namespace') or 'default'}/{meta.get('name', '')}")

    def _current(self, kind: str) -> dict[str, Any]:
        state = self.compiler.state
        return {"namespaces": state.namespaces, "pods": state.pods,
                "networkpolicies": state.policies}[kind]

    def _set(self, kind: str, obj: Any) -> None:
        {"namespaces": self.compiler.set_namespace, "pods": self.compiler.set_pod,
         "networkpolicies": self.compiler.set_policy}[kind](obj)

    def _delete(self, kind: str, ref: str) -> None:
        {"namespaces": self.compiler.delete_namespace, "pods": self.compiler.delete_pod,
         "networkpolicies": self.compiler.delete_policy}[kind](ref)

    def _mark(self) -> None:
        """Record that something changed (caller holds the lock) and wake the worker."""
        self._seq += 1
        self._wanted += 1
        if self._pending_since is None:
            self._pending_since = time.monotonic()
        self._cond.notify_all()

    # ------------------------------------------------------------------ syncing

    def on_ready(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` once, from the sync thread, after the first successful sync (at
        once if that already happened): e.g. the CNI conflist is installed only then, so the
        runtime never calls np-cni before the agent can program pods."""
        with self._cond:
            if not self.ready:
                self._ready_hooks.append(hook)
                return
        hook()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._worker, name="sync", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread:
            self._thread.join(timeout=10)

    def request_sync(self, wait: bool = True, timeout: float | None = None,
                     verify: bool = False) -> Outcome:
        """Ask for a sync that starts after this call; with ``wait``, return its outcome."""
        with self._cond:
            self._wanted += 1
            generation = self._wanted
            self._verify |= verify
            self._cond.notify_all()
            if not wait:
                return Outcome(generation)
            deadline = None if timeout is None else time.monotonic() + timeout
            while self._last.generation < generation:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return Outcome(generation, error="timed out waiting for the dataplane")
                self._cond.wait(remaining)
            return self._last

    def alive(self) -> bool:
        """Liveness: the sync loop turned (idle, it wakes every HEARTBEAT seconds) or a sync
        started within STALL seconds. A thread that exists but hangs in a sync is not alive."""
        thread = self._thread
        return (thread is not None and thread.is_alive()
                and time.monotonic() - self.heartbeat < STALL)

    def _worker(self) -> None:
        while True:
            with self._cond:
                while not self._stop and (self._last.generation >= self._wanted
                                          or not self._loaded):
                    self.heartbeat = time.monotonic()
                    self._cond.wait(HEARTBEAT)
                if self._stop:
                    return
                self.heartbeat = time.monotonic()
                generation, verify, seq = self._wanted, self._verify, self._seq
                since, self._pending_since = self._pending_since, None
                self._verify = False
            outcome = self._sync(generation, verify, seq, since)
            with self._cond:
                self._last = outcome
                self._cond.notify_all()

    def _sync(self, generation: int, verify: bool, seq: int, since: float | None) -> Outcome:
        t0 = time.perf_counter()
        try:
            endpoints, errors = self.store.all()
            for err in errors:
                log.warning("endpoint skipped: %s", err)
            with self._cond:  # inputs mutate the compiler's state: compile under the lock
                self.compiler.set_endpoints(endpoints)
                delta = self.compiler.update()
            ruleset = layout.ruleset(self.compiler.current_elements())
            result = self.dataplane.reconcile(ruleset, verify=verify, delta=delta)
        except Exception as e:  # noqa: BLE001 - keep serving; the kernel keeps the last rules
            log.error("sync failed, the last applied rules stay in force: %s", e)
            log.debug("sync failure", exc_info=True)
            self.metrics.errors.labels("sync").inc()
            with self._cond:
                self._verify = True  # list the kernel next time: we do not know what it holds
            return Outcome(generation, error=str(e))
        self._became_ready()
        self.applied_seq = seq
        self.metrics.syncs.inc()
        self.metrics.sync_seconds.observe(time.perf_counter() - t0)
        self.metrics.last_sync.set_to_current_time()
        self.metrics.elements.set(ruleset.element_count())
        if result.changed:
            self.metrics.transaction.observe(result.transaction_seconds)
            if since is not None:
                self.metrics.event_to_kernel.observe(time.monotonic() - since)
            log.info("synced: +%d -%d elements%s, transaction %.1f ms, total %.1f ms",
                     result.added, result.removed,
                     f", chains {','.join(result.rewritten_chains)}"
                     if result.rewritten_chains else "", result.transaction_seconds * 1000,
                     (time.perf_counter() - t0) * 1000)
            if self.after_sync is not None and delta:
                try:
                    self.after_sync(ruleset, delta)
                except Exception as e:  # noqa: BLE001 - a hook never breaks enforcement
                    log.error("after-sync hook failed: %s", e)
                    log.debug("after-sync hook failure", exc_info=True)
                    self.metrics.errors.labels("after_sync").inc()
        return Outcome(generation, result=result)

    def _became_ready(self) -> None:
        with self._cond:
            self.ready = True
            hooks, self._ready_hooks = self._ready_hooks, []
        for hook in hooks:
            try:
                hook()
            except Exception as e:  # noqa: BLE001 - a hook never breaks enforcement
                log.error("ready hook failed: %s", e)

    # ------------------------------------------------------------------ queries

    def compiled(self) -> Compiled:
        with self._cond:
            return self.compiler.compiled()

    def is_pending(self, container_id: str, ifname: str) -> bool:
        """True when the pod of this attachment is unknown: it is denied both ways."""
        ep = self.store.get(container_id, ifname)
        if ep is None:
            return False
        with self._cond:
            pod = self.compiler.state.pods.get(ep.pod_ref)
        return pod is None or bool(pod.uid and ep.uid and pod.uid != ep.uid)


def _resource_version(raw: dict[str, Any]) -> int | None:
    """metadata.resourceVersion as an integer, None when absent or not numeric."""
    value = (raw.get("metadata") or {}).get("resourceVersion")
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


class DriftChecker:
    """The periodic drift check, off the sync thread: events are never queued behind a
    listing of the whole table (2.5 s at 70,000 elements). Only real drift costs the sync
    thread a verified reconcile; when syncs keep overlapping the check (a busy node), every
    ``MAX_UNKNOWN``-th check falls back to a verified sync, so drift is still repaired."""

    MAX_UNKNOWN = 3

    def __init__(self, agent: NodeAgent) -> None:
        self.agent = agent
        self._unknown = 0

    def check(self) -> str:
        agent = self.agent
        if not agent.ready:
            return "not ready"
        generation_before = agent.dataplane.known_generation()
        drift = agent.dataplane.check_drift()
        if drift is None:
            self._unknown += 1
            result = "unknown"
            if self._unknown >= self.MAX_UNKNOWN:
                self._unknown = 0
                agent.request_sync(wait=False, verify=True)
        else:
            self._unknown = 0
            if drift:
                result = "drift"
                log.warning("table %s differs from what the agent applied (edited by someone "
                            "else?): repairing it", TABLE)
                agent.request_sync(wait=False, verify=True)
            else:
                unmoved = generation_before is not None and (
                    generation_before == agent.dataplane.known_generation())
                result = "unchanged" if unmoved else "same"
        agent.metrics.drift_checks.labels(result).inc()
        return result


def maintenance_loop(agent: NodeAgent, cni: Any, stop: threading.Event,
                     reload: threading.Event, wake: threading.Event, resync_interval: float,
                     manifests: list[str] | None = None) -> None:
    """Until ``stop``: re-read static manifests on ``reload`` (SIGHUP), and every
    ``resync_interval`` check the kernel for drift and replay DELs the shim spooled while
    this agent was restarting. ``cni`` is the CNI server (its ``pending`` spool)."""
    next_check = time.monotonic() + resync_interval
    drift = DriftChecker(agent)
    while not stop.is_set():
        if reload.is_set() and manifests:
            reload.clear()
            result = load_manifests(manifests)
            for err in result.errors:
                log.error("manifest skipped: %s", err)
            agent.set_state(result.state)
        wake.wait(max(0.0, next_check - time.monotonic()))
        wake.clear()
        if time.monotonic() >= next_check:
            drift.check()  # against the kernel, in this thread, not the sync thread
            cni.pending.replay()  # a DEL spooled while this agent was restarting
            next_check = time.monotonic() + resync_interval
