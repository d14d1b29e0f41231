"""`np-agent explain`: allowed or denied, and why, from the compiled elements.

The verdict is the kernel's walk (nft.verdict), so on random clusters it must equal the
independent reference evaluator for every probed flow; the reasons name the rule that admits
a flow, or the policies that isolate the pod and the nearest misses.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from np_agent.explain import ExplainError, explain, parse_port
from oracle import evaluate
from test_property import random_state

DEMO = Path(__file__).resolve().parent.parent / "examples" / "aks-demo"


def np_explain(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "np_agent.cli", "explain", "--manifests",
                           str(DEMO), *args], capture_output=True, text=True)


def test_demo_allowed_names_the_rules_on_both_sides():
    out = np_explain("--from", "frontend/apipod", "--to", "backend/dbpod", "--port", "80/TCP")
    assert out.returncode == 0, out.stderr
    first = out.stdout.splitlines()[0]
    assert first == ("allowed: frontend/apipod -> backend/dbpod on TCP 80: egress allowed by "
                     "frontend/apipod-policy egress[0]; ingress allowed by "
                     "backend/dbpod-policy ingress[0]")
    assert "placeholders used: backend/dbpod=240.0.0.1" in out.stdout


def test_demo_denied_names_the_isolating_policy_and_the_nearest_miss():
    out = np_explain("--from", "frontend/apipod", "--to", "backend/dbpod", "--port", "443")
    lines = out.stdout.splitlines()
    assert lines[0] == ("denied: frontend/apipod -> backend/dbpod on TCP 443: backend/dbpod is "
                        "isolated for ingress by backend/dbpod-policy and none of their rules "
                        "admits from frontend/apipod on TCP 443")
    assert ("  nearest miss: backend/dbpod-policy ingress[0] admits frontend/apipod on TCP 80"
            in lines)
    out = np_explain("--from", "frontend/apppod", "--to", "backend/dbpod", "--port", "80/TCP")
    assert out.stdout.startswith("denied: frontend/apppod -> backend/dbpod on TCP 80: "
                                 "frontend/apppod is isolated for egress by "
                                 "frontend/apppod-policy")


def test_an_address_outside_the_cluster_through_an_ipblock():
    out = np_explain("--from", "10.0.3.4", "--to", "frontend/apipod", "--port", "80")
    assert out.stdout.startswith("allowed: 10.0.3.4 -> frontend/apipod on TCP 80: 10.0.3.4 is "
                                 "not isolated for egress; ingress allowed by "
                                 "frontend/apipod-policy ingress[0]")


@pytest.mark.parametrize("args, message", [
    (("--port", "80/ICMP"), "protocol must be one of TCP, UDP, SCTP"),
    (("--port", "http"), "expected PORT[/PROTOCOL]"),
    (("--port", "70000"), "the port must be 1-65535"),
    (("--from", "nope/pod"), "no pod nope/pod"),
    (("--from", "fd00::1"), "pod backend/dbpod has no IPv6 address"),
    (("--to", "dbpod"), "is neither NAMESPACE/POD nor an IP address"),
])
def test_bad_questions_get_clear_errors(args, message):
    base = {"--from": "frontend/apipod", "--to": "backend/dbpod", "--port": "80"}
    base.update(dict(zip(args[::2], args[1::2], strict=True)))
    out = np_explain(*[x for kv in base.items() for x in kv])
    assert out.returncode == 2
    assert message in out.stderr, out.stderr


@pytest.mark.parametrize("seed", range(12))
def test_explain_verdict_equals_the_reference(seed):
    state = random_state(seed)
    rng = random.Random(seed)
    refs = sorted(r for r, p in state.pods.items() if p.ips and p.is_enforceable)
    for _ in range(25):
        src, dst = rng.sample(refs, 2)
        port, proto = rng.choice([80, 81, 443, 8080]), rng.choice(["TCP", "UDP", "SCTP"])
        answer = explain(state, src, dst, port, proto)
        s = next(ip for ip in state.pods[src].ips if ip.version == 4)
        d = next(ip for ip in state.pods[dst].ips if ip.version == 4)
        assert answer.allowed == evaluate(state, str(s), str(d), proto, port), answer.lines
        assert answer.lines[0].startswith("allowed: " if answer.allowed else "denied: ")


def test_port_syntax():
    assert parse_port("80/TCP") == (80, "TCP")
    assert parse_port("53/udp") == (53, "UDP")
    assert parse_port("80") == (80, "TCP")
    with pytest.raises(ExplainError):
        parse_port("0")
