"""The cluster state the benchmarks measure: 1,000 policies on one server pod, 5,000 peers.

Shared by ``bench_packets`` (packet path) and ``bench_program`` (programming time) so both
measure the same ruleset. The state is built directly as np_agent.policy.model objects: parsing
thousands of YAML documents would only measure PyYAML.

Shape, chosen to look like a busy namespace rather than a best case for the compiler:

* peers live in ``peer-000``.. namespaces, 50 pods each, at 10.100.<ns>.<1..50> (namespaces
  past 255 continue in 10.101.x.x, ...). Namespaces carry ``team`` (10 teams) and ``env``
  (prod/staging). Pods carry ``app`` (5 deployments of 10 pods created one after another,
  so their IPs are contiguous) and ``shard`` (pod index mod 5, so interleaved IPs: a
  selector on it yields one address interval per pod, the expensive case);
* the server pod (``bench/server``) declares named ports http=8080/TCP, metrics=9090/TCP
  and dns=53/UDP; the client pod (``loadgen/client``) is in a namespace no peer selector
  matches, so it is allowed only where a policy names it;
* policy i (``bench/allow-NNNN``) selects the server (by ``app``, by ``tier`` or by a
  matchExpressions ``In``) and allows one peer group on ports chosen by ``i % 20``: its own
  TCP port (10000+i), a TCP range, a UDP port (number or name), a named port, two ports, or
  an ipBlock with an except. Policies with ``i % 100 == 37`` also allow the client pod on
  their own port; policies with ``i % 100 == 99`` add Egress (DNS to team t0), so the server
  is isolated both ways. Nothing here is random: two runs build identical states.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import math
import subprocess
import sys
from dataclasses import replace
from types import MappingProxyType

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

SERVER_NS = "bench"
CLIENT_NS = "loadgen"
SERVER_IP = "10.200.0.10"
CLIENT_IP = "10.200.0.20"
PODS_PER_NAMESPACE = 50
TEAMS = 10
APPS = 5  # deployments per namespace, PODS_PER_NAMESPACE // APPS pods each
SHARDS = 5
CLIENT_POLICY_MOD = 37  # policies with i % 100 == 37 also allow the client
MIN_POLICIES = 100  # so that every kind of policy, and a client policy, exists

SERVER_PORTS = (ContainerPort("http", 8080, "TCP"), ContainerPort("metrics", 9090, "TCP"),
                ContainerPort("dns", 53, "UDP"))


def _labels(**kv: str) -> MappingProxyType[str, str]:
    return MappingProxyType(dict(kv))


def _sel(**kv: str) -> LabelSelector:
    return LabelSelector(tuple(sorted(kv.items())))


def peer_ip(ns_index: int, pod_index: int) -> str:
    """10.100.<ns>.<pod+1>, continuing into 10.101.x.x after 256 namespaces."""
    return f"10.{100 + ns_index // 256}.{ns_index % 256}.{pod_index + 1}"


def policy_port(i: int) -> int:
    """The TCP port policy i allows when its kind uses a port of its own."""
    return 10000 + i


def client_policy(n_policies: int) -> int:
    """The client-allowing policy nearest the middle: its port is the one probed, so in the
    linear chain the client's rule sits mid-way, like an average connection's."""
    middle = n_policies // 2
    return middle - middle % 100 + CLIENT_POLICY_MOD


def probe_ports(n_policies: int) -> tuple[int, int]:
    """(allowed, denied) server ports for the client.

    The denied port belongs to the next policy: the server listens there and other peers
    are allowed to it, so a refusal can only come from the client not being in its peers.
    """
    i = client_policy(n_policies)
    return policy_port(i), policy_port(i + 1)


def _server_selector(i: int) -> LabelSelector:
    kind = i % 3
    if kind == 0:
        return _sel(app="server")
    if kind == 1:
        return _sel(tier="backend")
    return LabelSelector(match_expressions=(
        Requirement("app", "In", frozenset({"server", "server-canary"})),))


def _peer_group(i: int, n_namespaces: int) -> Peer:
    """Who policy i lets in: mostly one deployment of one team, sometimes wider."""
    team = f"t{i % TEAMS}"
    app = f"a{(i // TEAMS) % APPS}"
    kind = (i // 7) % 8
    if kind < 5:  # one deployment in every namespace of a team (contiguous IPs)
        return Peer(_sel(app=app), _sel(team=team))
    if kind == 5:  # one shard in every namespace of a team (interleaved IPs)
        return Peer(_sel(shard=f"s{i % SHARDS}"), _sel(team=team))
    if kind == 6:  # one deployment in one named namespace
        ns = f"peer-{i % n_namespaces:03d}"
        return Peer(_sel(app=app), _sel(**{"kubernetes.io/metadata.name": ns}))
    # one deployment in every prod namespace of a team, by expression
    return Peer(_sel(app=app), LabelSelector(
        (("team", team),), (Requirement("env", "In", frozenset({"prod"})),)))


def _ip_block(i: int, n_namespaces: int) -> Peer:
    """A namespace's /24 minus a /27, or an external /24 minus a /28."""
    if i % 2 == 0:
        ns = i % n_namespaces
        net = ipaddress.ip_network(f"{peer_ip(ns, 0)}/24", strict=False)
        hole = ipaddress.ip_network(f"{net.network_address + 32}/27")
    else:
        net = ipaddress.ip_network(f"192.168.{i % 256}.0/24")
        hole = ipaddress.ip_network(f"192.168.{i % 256}.16/28")
    return Peer(ip_block=IPBlock(net, (hole,)))


def _ports(i: int) -> tuple[PolicyPort, ...]:
    kind = i % 20
    if kind == 0:
        return (PolicyPort("TCP", "http"),)
    if kind == 1:
        base = 20000 + 10 * (i // 20)
        return (PolicyPort("TCP", base, base + 9),)
    if kind == 2:
        return (PolicyPort("UDP", "dns" if (i // 20) % 2 else 30000 + i),)
    if kind == 4:
        return (PolicyPort("TCP", policy_port(i)), PolicyPort("TCP", "metrics"))
    return (PolicyPort("TCP", policy_port(i)),)


def make_policy(i: int, n_namespaces: int) -> NetworkPolicy:
    """Policy number i of the benchmark state (see the module docstring)."""
    peers = [_ip_block(i, n_namespaces) if i % 20 == 3 else _peer_group(i, n_namespaces)]
    if i % 100 == CLIENT_POLICY_MOD:
        peers.append(Peer(_sel(app="load-client"), _sel(team="loadgen")))
    ingress = (Rule(tuple(peers), _ports(i)),)
    types = {INGRESS}
    egress: tuple[Rule, ...] = ()
    if i % 100 == 99:
        types.add(EGRESS)
        egress = (Rule((Peer(_sel(app="a0"), _sel(team="t0")),), (PolicyPort("UDP", 53),)),)
    return NetworkPolicy(SERVER_NS, f"allow-{i:04d}", _server_selector(i), frozenset(types),
                         ingress, egress)


def build_state(n_policies: int = 1000, n_peers: int = 5000, server_ip: str = SERVER_IP,
                client_ip: str = CLIENT_IP) -> ClusterState:
    """The benchmark's ClusterState; every pod is on the one node being programmed."""
    if n_policies < MIN_POLICIES:
        raise ValueError(f"need at least {MIN_POLICIES} policies, got {n_policies}")
    if n_peers < PODS_PER_NAMESPACE:
        raise ValueError(f"need at least {PODS_PER_NAMESPACE} peers, got {n_peers}")
    state = ClusterState()
    n_namespaces = -(-n_peers // PODS_PER_NAMESPACE)
    if n_namespaces > 256 * 100:
        raise ValueError(f"too many peers for 10.100.0.0-10.199.255.255: {n_peers}")
    meta = "kubernetes.io/metadata.name"
    for name, labels in ((SERVER_NS, {"team": "platform", "env": "prod"}),
                         (CLIENT_NS, {"team": "loadgen", "env": "bench"})):
        state.add(Namespace(name, _labels(**labels, **{meta: name})))
    state.add(Pod(SERVER_NS, "server", _labels(app="server", tier="backend"),
                  (ipaddress.ip_address(server_ip),), ports=SERVER_PORTS))
    state.add(Pod(CLIENT_NS, "client", _labels(app="load-client"),
                  (ipaddress.ip_address(client_ip),)))
    per_app = PODS_PER_NAMESPACE // APPS
    for n in range(n_namespaces):
        ns = f"peer-{n:03d}"
        env = "prod" if n % 2 == 0 else "staging"
        state.add(Namespace(ns, _labels(team=f"t{n % TEAMS}", env=env, **{meta: ns})))
        for k in range(min(PODS_PER_NAMESPACE, n_peers - n * PODS_PER_NAMESPACE)):
            labels = _labels(app=f"a{k // per_app}", shard=f"s{k % SHARDS}")
            state.add(Pod(ns, f"p{k:02d}", labels, (ipaddress.ip_address(peer_ip(n, k)),)))
    for i in range(n_policies):
        state.add(make_policy(i, n_namespaces))
    return state


def changed_policy(state: ClusterState, step: int) -> NetworkPolicy:
    """A single-policy edit, as an operator would make one: step picks the policy and the kind.

    The kinds cycle through: a new port, a different peer deployment, a different team, an
    extra port range, and a peer narrowed to one namespace. Client-allowing policies are
    skipped so the probed flow never changes under a running benchmark.
    """
    names = sorted(state.policies)
    idx = (step * 389 + 11) % len(names)
    while idx % 100 == CLIENT_POLICY_MOD:
        idx = (idx + 1) % len(names)
    pol = state.policies[names[idx]]
    rule = pol.ingress[0]
    kind = step % 5
    if kind == 0:
        rule = replace(rule, ports=(PolicyPort("TCP", 40000 + step),))
    elif kind == 1:
        rule = replace(rule, peers=(Peer(_sel(app=f"a{(step + 2) % APPS}"),
                                         _sel(team=f"t{step % TEAMS}")),))
    elif kind == 2:
        rule = replace(rule, peers=(Peer(_sel(app="a1"), _sel(team=f"t{(step + 5) % TEAMS}")),))
    elif kind == 3:
        base = 41000 + 10 * step
        rule = replace(rule, ports=(*rule.ports, PolicyPort("TCP", base, base + 4)))
    else:
        ns = f"peer-{step % 100:03d}"
        rule = replace(rule, peers=(Peer(_sel(app="a3"),
                                         _sel(**{"kubernetes.io/metadata.name": ns})),))
    return replace(pol, ingress=(rule, *pol.ingress[1:]))


# ----------------------------------------------------------------- shared by both scripts


def nft_python() -> str:
    """A Python that can import the nftables bindings, for the process inside the node netns.

    They come from Debian's python3-nftables, so a pyenv or venv interpreter running the
    benchmark may lack them while /usr/bin/python3 has them.
    """
    if importlib.util.find_spec("nftables") is not None:
        return sys.executable
    system = "/usr/bin/python3"
    probe = subprocess.run([system, "-c", "import nftables"], capture_output=True, check=False)
    if probe.returncode != 0:
        raise RuntimeError("no Python with the nftables bindings: apt-get install python3-nftables")
    return system


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: with 20 samples p99 is the maximum, which is what we want
    to see rather than an interpolation between the two slowest."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


# ---------------------------------------------------------------- API objects (bench_agent)


def _selector_api(sel: LabelSelector) -> dict:
    out: dict = {}
    if sel.match_labels:
        out["matchLabels"] = dict(sel.match_labels)
    if sel.match_expressions:
        out["matchExpressions"] = [
            {"key": r.key, "operator": r.operator, **({"values": sorted(r.values)}
                                                      if r.values else {})}
            for r in sel.match_expressions]
    return out


def _peer_api(peer: Peer) -> dict:
    if peer.ip_block is not None:
        return {"ipBlock": {"cidr": str(peer.ip_block.cidr),
                            "except": [str(e) for e in peer.ip_block.excepts]}}
    out = {}
    if peer.pod_selector is not None:
        out["podSelector"] = _selector_api(peer.pod_selector)
    if peer.namespace_selector is not None:
        out["namespaceSelector"] = _selector_api(peer.namespace_selector)
    return out


def _port_api(port: PolicyPort) -> dict:
    out: dict = {"protocol": port.protocol}
    if port.port is not None:
        out["port"] = port.port
    if port.end_port is not None:
        out["endPort"] = port.end_port
    return out


def policy_api(pol: NetworkPolicy) -> dict:
    """A model NetworkPolicy back in API shape, to publish it to an API server."""
    def rules(rs: tuple[Rule, ...], key: str) -> list[dict]:
        return [{key: [_peer_api(p) for p in r.peers], "ports": [_port_api(p) for p in r.ports]}
                for r in rs]
    return {"metadata": {"name": pol.name, "namespace": pol.namespace},
            "spec": {"podSelector": _selector_api(pol.pod_selector),
                     "policyTypes": sorted(pol.policy_types),
                     "ingress": rules(pol.ingress, "from"), "egress": rules(pol.egress, "to")}}


def pod_api(pod: Pod, node: str) -> dict:
    ports = [{"name": p.name, "containerPort": p.port, "protocol": p.protocol}
             for p in pod.ports]
    return {"metadata": {"name": pod.name, "namespace": pod.namespace,
                         "labels": dict(pod.labels)},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "bench",
                                                       "ports": ports}]},
            "status": {"phase": "Running", "podIP": str(pod.ips[0]),
                       "podIPs": [{"ip": str(ip)} for ip in pod.ips]}}


def namespace_api(ns: Namespace) -> dict:
    return {"metadata": {"name": ns.name, "labels": dict(ns.labels)}}
