"""Drift checks off the hot path (nft.dataplane.check_drift, node.engine.DriftChecker).

Each scenario runs in a network namespace of its own (the Dataplane works in the namespace of
its process): a script applies a ruleset there, then checks drift while the test's own
interferences happen; it reports how often the table was listed, so "no listing while nothing
committed" is observed, not assumed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest

pytestmark = pytest.mark.kernel

SCRIPT = r'''
import json, subprocess, sys
from np_agent.nft import layout
from np_agent.nft.dataplane import Dataplane
from np_agent.nft.generation import ruleset_generation
from np_agent.ruleset import isolated_set

dp = Dataplane()
listings = []
real_list = dp.nft.list_table
def counting(*a, **k):
    listings.append(1)
    return real_list(*a, **k)
dp.nft.list_table = counting
key = ((0x0A000001, 0x0A000001),)
desired = layout.ruleset({isolated_set("ingress", 4): {key: "x/a by x/deny"}})
out = {}
def step(name, action=None):
    if action:
        subprocess.run(action, shell=True, check=True)
    before = len(listings)
    out[name] = {"drift": dp.check_drift(), "listed": len(listings) - before}
g0 = ruleset_generation()
dp.reconcile(desired)
out["generation_moved"] = ruleset_generation() - g0
step("after_apply")
step("again")
step("other_table", "nft add table ip someone-else")
step("other_table_again")
step("element_deleted", "nft delete element inet np-nft ingress-isolated-v4 '{ 10.0.0.1 }'")
dp.reconcile(desired, verify=True)
step("repaired")
# a reconcile overlapping the listing makes the check void, not wrong
def overlapping(*a, **k):
    dp.reconcile(layout.ruleset({}), verify=False)
    return real_list(*a, **k)
subprocess.run("nft add table ip another", shell=True, check=True)
dp.nft.list_table = overlapping
out["overlap"] = {"drift": dp.check_drift()}
print(json.dumps(out))
'''


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"npl{uuid.uuid4().hex[:6]}-drift"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_drift_check_lists_only_when_something_committed(netns: str) -> None:
    proc = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", SCRIPT],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["generation_moved"] == 1  # one transaction, one generation
    # after our own commit the table is listed once (off the hot path), then nothing is
    # listed while nothing is committed: the generation answers
    assert r["after_apply"] == {"drift": False, "listed": 1}
    assert r["again"] == {"drift": False, "listed": 0}
    # someone else's commit: our table is listed once, found equal, then cheap again
    assert r["other_table"] == {"drift": False, "listed": 1}
    assert r["other_table_again"] == {"drift": False, "listed": 0}
    # an element of ours deleted by hand is drift; the verified reconcile repairs it
    assert r["element_deleted"] == {"drift": True, "listed": 1}
    assert r["repaired"]["drift"] is False
    assert r["overlap"] == {"drift": None}


def test_running_agent_repairs_drift_from_its_own_thread() -> None:
    """`np-agent run` (drift checked every 3 s): a chain flushed by hand is put back, and the
    checks are counted by result in /metrics."""
    from cni_helper import Node
    from np_lab import Lab

    with Lab() as lab:
        node = Node(lab)
        try:
            def nft(*args: str) -> str:
                return subprocess.run(["ip", "netns", "exec", lab.node_ns, "nft", *args],
                                      capture_output=True, text=True, check=True).stdout

            assert "ct state established,related accept" in nft("list", "chain", "inet",
                                                                 "np-nft", "forward")
            nft("flush", "chain", "inet", "np-nft", "forward")
            deadline = time.monotonic() + 15
            while "established,related" not in nft("list", "chain", "inet", "np-nft",
                                                    "forward"):
                assert time.monotonic() < deadline, node.agent_log.read_text()[-3000:]
                time.sleep(0.2)
            log = node.agent_log.read_text()
            assert "differs from what the agent applied" in log
            metrics = subprocess.run(
                ["ip", "netns", "exec", lab.node_ns, sys.executable, "-c",
                 "import urllib.request; print(urllib.request.urlopen("
                 "'http://127.0.0.1:9490/metrics').read().decode())"],
                capture_output=True, text=True, check=True).stdout
            assert 'np_agent_drift_checks_total{result="drift"}' in metrics, metrics
        finally:
            node.stop_agent()
