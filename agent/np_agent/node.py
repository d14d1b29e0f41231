"""The node agent's engine: cluster state + local endpoints -> one reconcile at a time.

Requests to sync (a changed cluster state, np-cni's ADD/DEL, a periodic drift check) are
coalesced: whoever asks while a sync is running waits for the next one, which then serves
all of them with one compile and one nftables transaction. A burst of 20 ADDs therefore costs
a couple of transactions, not twenty.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from .compiler import Compiled, compile_state
from .dataplane import ApplyResult, Dataplane
from .endpoints import EndpointStore
from .model import ClusterState

log = logging.getLogger("np_agent.node")


class SyncError(RuntimeError):
    pass


@dataclass
class Outcome:
    generation: int
    result: ApplyResult | None = None
    error: str = ""


class NodeAgent:
    def __init__(self, node_name: str | None, store: EndpointStore,
                 dataplane: Dataplane | None = None) -> None:
        self.node_name = node_name
        self.store = store
        self.dataplane = dataplane or Dataplane()
        self._state = ClusterState()
        self._state_loaded = False
        self.compiled: Compiled | None = None
        self.ready = False
        self._cond = threading.Condition()
        self._wanted = 0
        self._verify = True  # the first sync lists the kernel: it may hold a previous run's table
        self._last = Outcome(0)
        self._stop = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ inputs

    def set_state(self, state: ClusterState) -> None:
        """A new cluster state from the source (API watch or manifests)."""
        with self._cond:
            self._state = state
            self._state_loaded = True
        self.request_sync(wait=False)

    # ------------------------------------------------------------------ syncing

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

    def _worker(self) -> None:
        while True:
            with self._cond:
                while not self._stop and (self._last.generation >= self._wanted
                                          or not self._state_loaded):
                    self._cond.wait()
                if self._stop:
                    return
                generation, verify, state = self._wanted, self._verify, self._state
                self._verify = False
            outcome = self._sync(generation, state, verify)
            with self._cond:
                self._last = outcome
                self._cond.notify_all()

    def _sync(self, generation: int, state: ClusterState, verify: bool) -> Outcome:
        t0 = time.perf_counter()
        try:
            endpoints, errors = self.store.all()
            for err in errors:
                log.warning("endpoint skipped: %s", err)
            compiled = compile_state(state, self.node_name, endpoints)
            result = self.dataplane.reconcile(compiled.ruleset, verify=verify)
        except Exception as e:  # noqa: BLE001 - keep serving; the kernel keeps the last rules
            log.error("sync failed, the last applied rules stay in force: %s", e)
            with self._cond:
                self._verify = True  # list the kernel next time: we do not know what it holds
            return Outcome(generation, error=str(e))
        self.compiled = compiled
        self.ready = True
        if result.changed:
            log.info("synced: %d pods, +%d -%d elements%s, transaction %.1f ms, total %.1f ms",
                     len(compiled.pods), result.added, result.removed,
                     f", chains {','.join(result.rewritten_chains)}"
                     if result.rewritten_chains else "", result.transaction_seconds * 1000,
                     (time.perf_counter() - t0) * 1000)
        return Outcome(generation, result=result)

    # ------------------------------------------------------------------ queries

    def is_pending(self, container_id: str, ifname: str) -> bool:
        """True when the pod of this attachment is unknown: it is denied both ways."""
        ep = self.store.get(container_id, ifname)
        if ep is None:
            return False
        with self._cond:
            pod = self._state.pods.get(ep.pod_ref)
        return pod is None or bool(pod.uid and ep.uid and pod.uid != ep.uid)
