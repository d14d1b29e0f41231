"""np-agent explain: is this connection allowed, and why, in one sentence and some detail.

The answer is read from the compiled elements with the same walk the conntrack cutter uses
(nft.verdict: egress on the source, then ingress on the destination, the peer's identity
chain, then the address ranges), so it is what the kernel decides for the first packet, not a
second reading of the policies. The element that admits the packet names the policy rule
(its comment); a pod no element admits names the policies that isolate it, and the nearest
misses (the rules that admit this peer on other ports).

Offline (``--manifests``), pods without an IP (manifests have no status) are given
placeholder addresses from 240.0.0.0/4 (reserved, never a pod's) so that selectors can be
explained; ipBlock rules are then judged against those placeholders, and the output says so.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace

from np_agent.nft import layout
from np_agent.nft.verdict import Matcher
from np_agent.policy.compiler import compile_state
from np_agent.policy.model import PROTOCOLS, ClusterState, IPAddress, Pod
from np_agent.ruleset import PROTO_NUMBERS

PLACEHOLDERS = ipaddress.ip_network("240.0.0.0/4")


class ExplainError(ValueError):
    """A question explain cannot answer as asked (unknown pod, bad port, mixed families)."""


@dataclass(frozen=True)
class End:
    """One end of the connection: what the user named, its address, the pod behind it."""

    name: str
    ip: IPAddress
    pod: Pod | None


@dataclass
class Explanation:
    allowed: bool
    lines: list[str]  # the first starts with "allowed" or "denied"


def parse_port(text: str) -> tuple[int, str]:
    """``80/TCP``, ``53/udp`` or ``80`` (TCP)."""
    number, _, proto = text.partition("/")
    proto = (proto or "TCP").upper()
    if proto not in PROTOCOLS:
        raise ExplainError(f"--port {text}: protocol must be one of {', '.join(PROTOCOLS)}")
    try:
        port = int(number)
    except ValueError:
        raise ExplainError(f"--port {text}: expected PORT[/PROTOCOL], e.g. 80/TCP") from None
    if not 1 <= port <= 65535:
        raise ExplainError(f"--port {text}: the port must be 1-65535")
    return port, proto


def with_placeholders(state: ClusterState) -> tuple[ClusterState, list[str]]:
    """Pods that may run but have no IP get one from 240.0.0.0/4 (offline only)."""
    hosts = PLACEHOLDERS.hosts()
    pods, given = {}, []
    for ref, pod in sorted(state.pods.items()):
        if not pod.ips and not pod.host_network and pod.phase not in ("Succeeded", "Failed"):
            pod = replace(pod, ips=(next(hosts),), phase="Running")
            given.append(f"{ref}={pod.ips[0]}")
        pods[ref] = pod
    return ClusterState(pods, state.namespaces, state.policies), given


def resolve(state: ClusterState, name: str, version: int | None = None) -> End:
    """``NS/POD`` (its address of ``version`` if given) or an IP address."""
    if "/" in name and not _is_ip(name):
        pod = state.pods.get(name)
        if pod is None:
            raise ExplainError(f"no pod {name} in the state (NAMESPACE/NAME)")
        ips = [ip for ip in pod.ips if version is None or ip.version == version]
        if not ips:
            raise ExplainError(f"pod {name} has no IPv{version or ''} address")
        return End(name, ips[0], pod)
    if not _is_ip(name):
        raise ExplainError(f"{name!r} is neither NAMESPACE/POD nor an IP address")
    ip = ipaddress.ip_address(name)
    owner = next((p for p in state.pods.values() if ip in p.ips), None)
    return End(name if owner is None else f"{owner.ref} ({ip})", ip, owner)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def explain(state: ClusterState, src_name: str, dst_name: str, port: int, proto: str,
            node_name: str | None = None) -> Explanation:
    src = resolve(state, src_name)
    dst = resolve(state, dst_name, src.ip.version)
    if src.ip.version != dst.ip.version:
        raise ExplainError(f"{src.name} and {dst.name} are of different IP versions")
    matcher = Matcher(layout.ruleset(compile_state(state, node_name).elements))
    number, version = PROTO_NUMBERS[proto.lower()], src.ip.version
    what = f"{src.name} -> {dst.name} on {proto} {port}"
    steps = [_direction(matcher, "egress", version, src, dst, number, port, proto),
             _direction(matcher, "ingress", version, dst, src, number, port, proto)]
    allowed = all(ok for ok, _, _ in steps)
    assert allowed == matcher.allowed(src.ip, dst.ip, version, number, port)  # one walk
    if allowed:
        first = f"allowed: {what}: " + "; ".join(s for _, s, _ in steps)
    else:
        first = f"denied: {what}: " + next(s for ok, s, _ in steps if not ok)
    return Explanation(allowed, [first] + [line for _, _, detail in steps for line in detail])


def _direction(matcher: Matcher, direction: str, version: int, me: End, peer: End, proto: int,
               port: int, proto_name: str) -> tuple[bool, str, list[str]]:
    """(allowed, sentence, details) for one direction, ``me`` being the pod it is about."""
    sets = matcher.direction(direction, version)
    mine, theirs = int(me.ip), int(peer.ip)
    isolated = sets.isolated_by(mine)
    if isolated is None:
        return True, f"{me.name} is not isolated for {direction}", []
    by = isolated.split(" by ", 1)[-1]
    why = sets.admits(mine, theirs, proto, port)
    if why is not None:
        return True, f"{direction} allowed by {why}", [
            f"  {direction}: {me.name} is isolated by {by}; {why} admits {peer.name}"]
    detail = [f"  {direction}: {me.name} is isolated by {by}; no rule of those admits "
              f"{peer.name} on {proto_name} {port}"]
    for p, lo, hi, rule in sets.near(mine, theirs):
        ports = "every protocol" if p == 0 else (
            f"{_proto_name(p)} {lo}" if lo == hi else f"{_proto_name(p)} {lo}-{hi}")
        detail.append(f"  nearest miss: {rule} admits {peer.name} on {ports}")
    side = "to" if direction == "egress" else "from"
    return False, (f"{me.name} is isolated for {direction} by {by} and none of their rules "
                   f"admits {side} {peer.name} on {proto_name} {port}"), detail


def _proto_name(number: int) -> str:
    return next((name.upper() for name, n in PROTO_NUMBERS.items() if n == number), str(number))
