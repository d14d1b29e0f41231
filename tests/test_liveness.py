"""Liveness is a heartbeat of the sync loop, not a check that its thread exists: a loop that
hangs (in a sync that never returns, say) fails /healthz, so the kubelet restarts the agent."""

from __future__ import annotations

import time
from pathlib import Path

from np_agent.node import engine
from np_agent.node.engine import NodeAgent
from np_cni.shared.endpoints import EndpointStore


class _Dataplane:
    """Enough of a Dataplane for an agent that never syncs."""

    def drop_counters(self) -> dict:
        return {}


def test_heartbeat_turns_while_idle_and_stops_when_the_loop_hangs(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(engine, "HEARTBEAT", 0.05)
    monkeypatch.setattr(engine, "STALL", 0.5)
    agent = NodeAgent("node-1", EndpointStore(tmp_path), dataplane=_Dataplane())  # type: ignore[arg-type]
    assert not agent.alive()  # no loop yet
    agent.start()
    try:
        time.sleep(1.0)  # idle for twice STALL: the loop's own turns keep it alive
        assert agent.alive()
        with agent._cond:  # the loop cannot turn while something holds its lock
            time.sleep(0.8)
            assert not agent.alive()
        time.sleep(0.2)
        assert agent.alive()
    finally:
        agent.stop()
    assert not agent.alive()
