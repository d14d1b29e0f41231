"""Random clusters: the compiled sets must decide every flow exactly as the API reference does.

`evaluate` (tests/oracle.py) reads the policies directly; `lookup` walks the compiled sets.
Hundreds of random policies with overlapping peers, ipBlocks with excepts, port ranges and
named ports exercise the disjoint-box normalisation far beyond the hand-written cases.
"""

from __future__ import annotations

import ipaddress
import itertools
import random
from dataclasses import replace
from types import MappingProxyType

import pytest

from np_agent.nft import layout
from np_agent.policy.compiler import NodeCompiler, compile_state
from np_agent.policy.model import (
    EGRESS,
    INGRESS,
    ClusterState,
    ContainerPort,
    IPBlock,
    LabelSelector,
    Namespace,
    NetworkPolicy,
    Peer,
    Pod,
    PolicyPort,
    Requirement,
    Rule,
)
from np_cni.shared.endpoints import Endpoint
from np_lab.canonical import canonical
from oracle import evaluate, lookup
from test_compiler import _assert_disjoint

LABELS = {"app": ["a", "b", "c"], "tier": ["web", "db"]}
PROTOS = ["TCP", "UDP", "SCTP"]
PORTS = [80, 81, 443, 8080]


def _selector(rng: random.Random) -> LabelSelector:
    labels, exprs = [], []
    for key, values in LABELS.items():
        roll = rng.random()
        if roll < 0.3:
            labels.append((key, rng.choice(values)))
        elif roll < 0.45:
            op = rng.choice(["In", "NotIn", "Exists", "DoesNotExist"])
            vals = frozenset(rng.sample(values, rng.randint(1, len(values)))) if op in (
                "In", "NotIn") else frozenset()
            exprs.append(Requirement(key, op, vals))
    return LabelSelector(tuple(labels), tuple(exprs))


def _labels(rng: random.Random) -> MappingProxyType:
    return MappingProxyType({k: rng.choice(v) for k, v in LABELS.items() if rng.random() < 0.8})


def _ip_block(rng: random.Random, version: int) -> IPBlock:
    if version == 4:
        base = ipaddress.ip_network(f"10.244.0.{rng.randrange(0, 256)}/{rng.randint(24, 32)}",
                                    strict=False)
    else:
        base = ipaddress.ip_network(f"fd00::{rng.randrange(0, 256):x}/{rng.randint(120, 128)}",
                                    strict=False)
    subnets = list(base.subnets(new_prefix=min(base.max_prefixlen, base.prefixlen + 2)))
    excepts = tuple(rng.sample(subnets, rng.randint(0, min(2, len(subnets) - 1))))
    return IPBlock(base, excepts)


def _port(rng: random.Random) -> PolicyPort:
    proto = rng.choice(PROTOS)
    roll = rng.random()
    if roll < 0.15:
        return PolicyPort(proto)
    if roll < 0.35:
        return PolicyPort(proto, rng.choice(["http", "alt", "missing"]))
    start = rng.choice(PORTS)
    return PolicyPort(proto, start, start + rng.choice([0, 0, 1, 100]) if rng.random() < 0.4
                      else None)


def _rule(rng: random.Random) -> Rule:
    peers = []
    for _ in range(rng.choice([0, 1, 1, 2, 3])):
        roll = rng.random()
        if roll < 0.3:
            peers.append(Peer(ip_block=_ip_block(rng, rng.choice([4, 4, 6]))))
        elif roll < 0.55:
            peers.append(Peer(pod_selector=_selector(rng)))
        elif roll < 0.75:
            peers.append(Peer(namespace_selector=_selector(rng)))
        else:
            peers.append(Peer(pod_selector=_selector(rng), namespace_selector=_selector(rng)))
    ports = tuple(_port(rng) for _ in range(rng.choice([0, 1, 1, 2])))
    return Rule(tuple(peers), ports)


def random_state(seed: int, n_pods: int = 14, n_policies: int = 8) -> ClusterState:
    rng = random.Random(seed)
    state = ClusterState()
    for ns in ("x", "y", "z"):
        state.add(Namespace(ns, MappingProxyType({"kubernetes.io/metadata.name": ns,
                                                  **_labels(rng)})))
    hosts = rng.sample(range(1, 255), n_pods)
    for i, host in enumerate(hosts):
        ports = []
        if rng.random() < 0.7:
            ports.append(ContainerPort("http", rng.choice(PORTS), rng.choice(PROTOS)))
        if rng.random() < 0.4:
            ports.append(ContainerPort("alt", rng.choice(PORTS), "TCP"))
        ips = (ipaddress.ip_address(f"10.244.0.{host}"), ipaddress.ip_address(f"fd00::{host:x}"))
        state.add(Pod(rng.choice("xyz"), f"p{i}", _labels(rng), ips, ports=tuple(ports),
                      host_network=rng.random() < 0.05))
    for i in range(n_policies):
        types = rng.choice([{INGRESS}, {EGRESS}, {INGRESS, EGRESS}])
        state.add(NetworkPolicy(
            rng.choice("xyz"), f"pol{i}", _selector(rng), frozenset(types),
            tuple(_rule(rng) for _ in range(rng.choice([0, 1, 2, 3]))),
            tuple(_rule(rng) for _ in range(rng.choice([0, 1, 2, 3])))))
    return state


@pytest.mark.parametrize("seed", range(60))
def test_compiled_sets_agree_with_the_api_reference(seed):
    state = random_state(seed)
    rs = layout.ruleset(compile_state(state).elements)
    _assert_disjoint(rs)
    rng = random.Random(seed)
    addrs = [str(ip) for pod in state.pods.values() for ip in pod.ips]
    addrs += ["10.244.1.7", "192.0.2.1", "fd00::1:1", "2001:db8::1"]
    pairs = [(s, d) for s, d in itertools.product(addrs, addrs)
             if s != d and ipaddress.ip_address(s).version == ipaddress.ip_address(d).version]
    for src, dst in rng.sample(pairs, min(len(pairs), 300)):
        proto = rng.choice(PROTOS + ["ICMP"])
        port = rng.choice(PORTS + [rng.randint(1, 65535)])
        want = evaluate(state, src, dst, proto, port)
        assert lookup(rs, src, dst, proto, port) == want, (seed, src, dst, proto, port, want)


def _mutate(rng: random.Random, nc: NodeCompiler, step: int) -> None:
    state = nc.state
    roll = rng.random()
    pods = sorted(state.pods)
    if roll < 0.3 and pods:  # a pod's labels, IPs or ports change
        pod = state.pods[rng.choice(pods)]
        host = rng.randrange(1, 255)
        nc.set_pod(replace(pod, labels=_labels(rng), ports=(
            ContainerPort("http", rng.choice(PORTS), "TCP"),) if rng.random() < 0.5 else (),
            ips=pod.ips if rng.random() < 0.5 else (
                ipaddress.ip_address(f"10.244.1.{host}"),
                ipaddress.ip_address(f"fd00::1:{host:x}"))))
    elif roll < 0.4 and pods:
        nc.delete_pod(rng.choice(pods))
    elif roll < 0.5:
        host = rng.randrange(1, 255)
        nc.set_pod(Pod(rng.choice("xyz"), f"new{step}", _labels(rng),
                       (ipaddress.ip_address(f"10.244.2.{host}"),),
                       ports=(ContainerPort("alt", 81, "TCP"),)))
    elif roll < 0.7:
        types = rng.choice([{INGRESS}, {EGRESS}, {INGRESS, EGRESS}])
        name = rng.choice(sorted(state.policies) or ["x/pol0"]).split("/")[1]
        nc.set_policy(NetworkPolicy(rng.choice("xyz"), name, _selector(rng), frozenset(types),
                                    tuple(_rule(rng) for _ in range(rng.choice([0, 1, 2]))),
                                    tuple(_rule(rng) for _ in range(rng.choice([0, 1, 2])))))
    elif roll < 0.8 and state.policies:
        nc.delete_policy(rng.choice(sorted(state.policies)))
    elif roll < 0.9:
        name = rng.choice("xyz")
        nc.set_namespace(Namespace(name, MappingProxyType(
            {"kubernetes.io/metadata.name": name, **_labels(rng)})))
    else:  # np-cni wires a pod (with its own IPs) or unwires one
        eps = dict(nc.endpoints)
        if eps and rng.random() < 0.4:
            eps.pop(rng.choice(sorted(eps)))
        else:
            ref = rng.choice(pods + ["x/ghost"])
            host = rng.randrange(1, 255)
            ns, name = ref.split("/")
            eps[(f"c{step}", "eth0")] = Endpoint(f"c{step}", "eth0", ns, name, "",
                                                 f"np{step:011d}", (f"10.244.3.{host}",))
        nc.set_endpoints(eps.values())


@pytest.mark.parametrize("seed", range(25))
def test_incremental_updates_equal_a_fresh_compile(seed):
    """After every change, the incrementally kept elements equal a compile from scratch, and
    the deltas handed out add up to them (they are what the kernel receives)."""
    rng = random.Random(1000 + seed)
    nc = NodeCompiler(None)
    nc.replace_state(random_state(seed))
    kernel: dict[str, dict] = {}
    for step in range(40):
        delta = nc.update()
        for name, items in delta.removed.items():
            for key, comment in items.items():
                assert kernel[name].pop(key) == comment
        for name, items in delta.added.items():
            for key, comment in items.items():
                assert key not in kernel.setdefault(name, {})
                kernel[name][key] = comment
        fresh = canonical(compile_state(nc.state, None, nc.endpoints.values()).elements)
        got = {n: dict(v) for n, v in nc.elements.items() if v}
        assert canonical(got) == fresh, (seed, step)
        assert canonical({n: v for n, v in kernel.items() if v}) == fresh, (seed, step)
        _mutate(rng, nc, step)
