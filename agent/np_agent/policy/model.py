"""Typed, immutable view of the Kubernetes objects that enforcement needs.

The API's JSON/YAML shape is parsed once, here, into small frozen dataclasses. Everything
downstream (compiler, dump, agent) works on these and never on raw dicts, so a malformed
object is rejected at one place with an error that names the object and the field.
"""

from __future__ import annotations

import functools
import ipaddress
import sys
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

PROTOCOLS = ("TCP", "UDP", "SCTP")
SELECTOR_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
INGRESS = "Ingress"
EGRESS = "Egress"


class ModelError(ValueError):
    """An object that cannot be enforced as written; names the object and the field."""

    def __init__(self, kind: str, ref: str, path: str, message: str) -> None:
        self.kind, self.ref, self.path, self.message = kind, ref, path, message
        super().__init__(f"{kind} {ref}: {path}: {message}")


Labels = Mapping[str, str]
EMPTY_LABELS: Labels = MappingProxyType({})


class _LabelMap(dict):
    """A label map shared by every pod that has the same labels (weak-referenceable), with
    the one read-only view of it that those pods hold."""

    __slots__ = ("__weakref__", "view")


# Replicas of a Deployment carry the same labels: one dict for all of them, not one each (a
# cluster of 150,000 pods has a few thousand distinct label maps). Keys and values are
# interned strings. Entries go away with the last pod that uses them (map and view are a
# cycle: the garbage collector frees them). Pods share the view too, not only the map: one
# view per pod would be 150,000 objects more, and the compiler memoises by its identity.
_SHARED_LABELS: weakref.WeakValueDictionary[tuple[tuple[str, str], ...], _LabelMap] = (
    weakref.WeakValueDictionary())


def shared_labels(labels: Mapping[str, str]) -> Labels:
    """A read-only view of the one shared copy of these labels."""
    if not labels:
        return EMPTY_LABELS
    key = tuple(sorted(labels.items()))
    shared = _SHARED_LABELS.get(key)
    if shared is None:
        shared = _LabelMap((sys.intern(k), sys.intern(v)) for k, v in key)
        shared.view = MappingProxyType(shared)
        _SHARED_LABELS[key] = shared
    return shared.view


@dataclass(frozen=True)
class Requirement:
    """One matchExpressions entry."""

    key: str
    operator: str
    values: frozenset[str] = frozenset()

    def matches(self, labels: Labels) -> bool:
        present = self.key in labels
        if self.operator == "In":
            return present and labels[self.key] in self.values
        if self.operator == "NotIn":
            return not present or labels[self.key] not in self.values
        if self.operator == "Exists":
            return present
        return not present  # DoesNotExist


@dataclass(frozen=True)
class LabelSelector:
    """metav1.LabelSelector: all matchLabels and all matchExpressions must hold (AND).

    An empty selector matches everything.
    """

    match_labels: tuple[tuple[str, str], ...] = ()
    match_expressions: tuple[Requirement, ...] = ()

    def matches(self, labels: Labels) -> bool:
        return all(labels.get(k) == v for k, v in self.match_labels) and all(
            r.matches(labels) for r in self.match_expressions
        )

    def __str__(self) -> str:
        parts = [f"{k}={v}" for k, v in self.match_labels]
        for r in self.match_expressions:
            vals = ",".join(sorted(r.values))
            parts.append(f"{r.key} {r.operator} ({vals})" if vals else f"{r.key} {r.operator}")
        return "{" + ", ".join(parts) + "}"


@dataclass(frozen=True, slots=True)
class ContainerPort:
    name: str
    port: int
    protocol: str


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: Labels = field(default_factory=lambda: EMPTY_LABELS)


@dataclass(frozen=True, slots=True)
class Pod:
    """Only what enforcement needs of a Pod; slots, and strings and ports shared between
    replicas, because a node's agent holds every pod of the cluster (150,000)."""

    namespace: str
    name: str
    labels: Labels = field(default_factory=lambda: EMPTY_LABELS)
    ips: tuple[IPAddress, ...] = ()
    node_name: str = ""
    host_network: bool = False
    phase: str = "Running"
    ports: tuple[ContainerPort, ...] = ()
    uid: str = ""
    # "namespace/name", made once: every index of the agent is keyed on it, and a string
    # made per lookup would be one more copy per pod in each of them
    ref: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ref", f"{self.namespace}/{self.name}")

    @property
    def is_enforceable(self) -> bool:
        """A pod we can select or isolate: has an IP of its own and is not finished.

        hostNetwork pods share the node's address, so they are never selected (as upstream).
        Succeeded/Failed pods may have had their IP handed to a new pod already.
        """
        finished = self.phase in ("Succeeded", "Failed")
        return bool(self.ips) and not self.host_network and not finished

    def named_port(self, name: str, protocol: str) -> int | None:
        for p in self.ports:
            if p.name == name and p.protocol == protocol:
                return p.port
        return None


@dataclass(frozen=True)
class IPBlock:
    cidr: IPNetwork
    excepts: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True)
class Peer:
    """One element of from/to. Pod and namespace selectors in one peer are AND-ed."""

    pod_selector: LabelSelector | None = None
    namespace_selector: LabelSelector | None = None
    ip_block: IPBlock | None = None


@dataclass(frozen=True)
class PolicyPort:
    protocol: str = "TCP"
    port: int | str | None = None  # None: every port of the protocol; str: a named port
    end_port: int | None = None


@dataclass(frozen=True)
class Rule:
    """One ingress/egress rule. Empty peers: all peers. Empty ports: all ports and protocols."""

    peers: tuple[Peer, ...] = ()
    ports: tuple[PolicyPort, ...] = ()


@dataclass(frozen=True)
class NetworkPolicy:
    namespace: str
    name: str
    pod_selector: LabelSelector
    policy_types: frozenset[str]
    ingress: tuple[Rule, ...] = ()
    egress: tuple[Rule, ...] = ()
    invalid: str = ""  # set when the spec could not be parsed: the policy then fails closed

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass
class ClusterState:
    """Everything the compiler reads: plain collections, keyed for cheap lookups."""

    pods: dict[str, Pod] = field(default_factory=dict)  # "ns/name" -> Pod
    namespaces: dict[str, Namespace] = field(default_factory=dict)
    policies: dict[str, NetworkPolicy] = field(default_factory=dict)  # "ns/name" -> policy

    def add(self, obj: Pod | Namespace | NetworkPolicy) -> None:
        if isinstance(obj, Pod):
            self.pods[obj.ref] = obj
        elif isinstance(obj, Namespace):
            self.namespaces[obj.name] = obj
        else:
            self.policies[obj.ref] = obj


# --------------------------------------------------------------------------- parsing


class _Ctx:
    """Carries the object's identity so every error names it."""

    def __init__(self, kind: str, ref: str) -> None:
        self.kind, self.ref = kind, ref

    def error(self, path: str, message: str) -> ModelError:
        return ModelError(self.kind, self.ref, path, message)

    def mapping(self, value: Any, path: str) -> Mapping[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.error(path, f"expected an object, got {type(value).__name__}")
        return value

    def sequence(self, value: Any, path: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(path, f"expected a list, got {type(value).__name__}")
        return value

    def string(self, value: Any, path: str) -> str:
        if not isinstance(value, str):
            raise self.error(path, f"expected a string, got {value!r}")
        return value

    def labels(self, value: Any, path: str) -> Labels:
        raw = self.mapping(value, path)
        out = {}
        for k, v in raw.items():
            out[self.string(k, path)] = self.string(v, f"{path}.{k}")
        return MappingProxyType(out)


def _metadata(obj: Mapping[str, Any], kind: str, namespaced: bool) -> tuple[str, str, _Ctx]:
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping) or not isinstance(meta.get("name"), str) or not meta["name"]:
        raise ModelError(kind, "?", "metadata.name", "missing or not a string")
    name = meta["name"]
    namespace = meta.get("namespace") or ("default" if namespaced else "")
    if not isinstance(namespace, str):
        raise ModelError(kind, name, "metadata.namespace", "not a string")
    ref = f"{namespace}/{name}" if namespaced else name
    return namespace, name, _Ctx(kind, ref)


def parse_selector(ctx: _Ctx, raw: Any, path: str) -> LabelSelector:
    raw = ctx.mapping(raw, path)
    labels = ctx.labels(raw.get("matchLabels"), f"{path}.matchLabels")
    exprs = []
    for i, e in enumerate(ctx.sequence(raw.get("matchExpressions"), f"{path}.matchExpressions")):
        epath = f"{path}.matchExpressions[{i}]"
        e = ctx.mapping(e, epath)
        key = ctx.string(e.get("key"), f"{epath}.key")
        op = e.get("operator")
        if op not in SELECTOR_OPERATORS:
            raise ctx.error(f"{epath}.operator", f"unknown operator {op!r}, expected one of "
                            + ", ".join(SELECTOR_OPERATORS))
        values = [ctx.string(v, f"{epath}.values") for v in ctx.sequence(e.get("values"), epath)]
        if op in ("In", "NotIn") and not values:
            raise ctx.error(f"{epath}.values", f"operator {op} needs at least one value")
        if op in ("Exists", "DoesNotExist") and values:
            raise ctx.error(f"{epath}.values", f"operator {op} takes no values")
        exprs.append(Requirement(key, op, frozenset(values)))
    return LabelSelector(tuple(sorted(labels.items())), tuple(exprs))


def _ip(ctx: _Ctx, value: Any, path: str) -> IPAddress:
    try:
        return ipaddress.ip_address(ctx.string(value, path))
    except ValueError as e:
        raise ctx.error(path, str(e)) from None


def _network(ctx: _Ctx, value: Any, path: str) -> IPNetwork:
    text = ctx.string(value, path)
    if "/" not in text:
        raise ctx.error(path, f"{text!r} is not a CIDR (address/prefix-length)")
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError as e:
        raise ctx.error(path, str(e)) from None


def _port_number(ctx: _Ctx, value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ctx.error(path, f"port {value!r} out of range 1-65535")
    return value


def _protocol(ctx: _Ctx, value: Any, path: str) -> str:
    proto = "TCP" if value is None else value
    if proto not in PROTOCOLS:
        raise ctx.error(path, f"unknown protocol {proto!r}, expected one of {', '.join(PROTOCOLS)}")
    return proto


def parse_namespace(obj: Mapping[str, Any]) -> Namespace:
    _, name, ctx = _metadata(obj, "Namespace", namespaced=False)
    labels = dict(ctx.labels(obj["metadata"].get("labels"), "metadata.labels"))
    # The API server sets this label on every namespace; manifests often omit it.
    labels.setdefault("kubernetes.io/metadata.name", name)
    return Namespace(name, MappingProxyType(labels))


@functools.lru_cache(maxsize=16384)
def _shared_ports(ports: tuple[tuple[str, int, str], ...]) -> tuple[ContainerPort, ...]:
    """One tuple of named ports for all the replicas that declare the same ones (bounded:
    distinct port sets are few, and a miss only costs a copy)."""
    return tuple(ContainerPort(sys.intern(n), number, sys.intern(proto))
                 for n, number, proto in ports)


def parse_pod(obj: Mapping[str, Any]) -> Pod:
    namespace, name, ctx = _metadata(obj, "Pod", namespaced=True)
    labels = shared_labels(ctx.labels(obj["metadata"].get("labels"), "metadata.labels"))
    spec = ctx.mapping(obj.get("spec"), "spec")
    status = ctx.mapping(obj.get("status"), "status")
    ports: list[tuple[str, int, str]] = []
    for ci, c in enumerate(ctx.sequence(spec.get("containers"), "spec.containers")):
        c = ctx.mapping(c, f"spec.containers[{ci}]")
        for pi, p in enumerate(ctx.sequence(c.get("ports"), f"spec.containers[{ci}].ports")):
            path = f"spec.containers[{ci}].ports[{pi}]"
            p = ctx.mapping(p, path)
            number = _port_number(ctx, p.get("containerPort"), f"{path}.containerPort")
            proto = _protocol(ctx, p.get("protocol"), f"{path}.protocol")
            pname = p.get("name")
            if pname is not None:
                ports.append((ctx.string(pname, f"{path}.name"), number, proto))
    ips: list[IPAddress] = []
    for i, entry in enumerate(ctx.sequence(status.get("podIPs"), "status.podIPs")):
        entry = ctx.mapping(entry, f"status.podIPs[{i}]")
        ips.append(_ip(ctx, entry.get("ip"), f"status.podIPs[{i}].ip"))
    if not ips and status.get("podIP"):
        ips.append(_ip(ctx, status["podIP"], "status.podIP"))
    host_network = spec.get("hostNetwork", False)
    if not isinstance(host_network, bool):
        raise ctx.error("spec.hostNetwork", "expected true or false")
    node_name = spec.get("nodeName") or ""
    phase = status.get("phase") or "Pending"
    uid = obj["metadata"].get("uid") or ""
    return Pod(
        sys.intern(namespace), name, labels, tuple(dict.fromkeys(ips)),
        sys.intern(ctx.string(node_name, "spec.nodeName")),
        host_network, sys.intern(ctx.string(phase, "status.phase")), _shared_ports(tuple(ports)),
        ctx.string(uid, "metadata.uid"),
    )


def _parse_peer(ctx: _Ctx, raw: Any, path: str) -> Peer:
    raw = ctx.mapping(raw, path)
    pod_sel = raw.get("podSelector")
    ns_sel = raw.get("namespaceSelector")
    block = raw.get("ipBlock")
    if block is not None:
        if pod_sel is not None or ns_sel is not None:
            raise ctx.error(path, "ipBlock cannot be combined with podSelector or "
                            "namespaceSelector")
        block = ctx.mapping(block, f"{path}.ipBlock")
        cidr = _network(ctx, block.get("cidr"), f"{path}.ipBlock.cidr")
        excepts = []
        for i, e in enumerate(ctx.sequence(block.get("except"), f"{path}.ipBlock.except")):
            epath = f"{path}.ipBlock.except[{i}]"
            net = _network(ctx, e, epath)
            if net.version != cidr.version or not net.subnet_of(cidr):  # type: ignore[arg-type]
                raise ctx.error(epath, f"{net} is not inside {cidr}")
            excepts.append(net)
        return Peer(ip_block=IPBlock(cidr, tuple(excepts)))
    if pod_sel is None and ns_sel is None:
        raise ctx.error(path, "a peer needs podSelector, namespaceSelector or ipBlock")
    return Peer(
        pod_selector=None if pod_sel is None
        else parse_selector(ctx, pod_sel, f"{path}.podSelector"),
        namespace_selector=None if ns_sel is None
        else parse_selector(ctx, ns_sel, f"{path}.namespaceSelector"),
    )


def _parse_port(ctx: _Ctx, raw: Any, path: str) -> PolicyPort:
    raw = ctx.mapping(raw, path)
    proto = _protocol(ctx, raw.get("protocol"), f"{path}.protocol")
    port = raw.get("port")
    end = raw.get("endPort")
    if isinstance(port, str) and not port.isdigit():
        if end is not None:
            raise ctx.error(f"{path}.endPort", "endPort cannot be used with a named port")
        if not port:
            raise ctx.error(f"{path}.port", "empty port name")
        return PolicyPort(proto, port)
    if isinstance(port, str):  # "80" is an int-or-string holding a number
        port = int(port)
    if port is None:
        if end is not None:
            raise ctx.error(f"{path}.endPort", "endPort needs port")
        return PolicyPort(proto)
    port = _port_number(ctx, port, f"{path}.port")
    if end is not None:
        end = _port_number(ctx, end, f"{path}.endPort")
        if end < port:
            raise ctx.error(f"{path}.endPort", f"endPort {end} is below port {port}")
    return PolicyPort(proto, port, end)


def _parse_rules(ctx: _Ctx, raw: Any, path: str, peers_key: str) -> tuple[Rule, ...]:
    rules = []
    for i, r in enumerate(ctx.sequence(raw, path)):
        rpath = f"{path}[{i}]"
        r = ctx.mapping(r, rpath)
        peers = tuple(_parse_peer(ctx, p, f"{rpath}.{peers_key}[{j}]")
                      for j, p in enumerate(ctx.sequence(r.get(peers_key), f"{rpath}.{peers_key}")))
        ports = tuple(_parse_port(ctx, p, f"{rpath}.ports[{j}]")
                      for j, p in enumerate(ctx.sequence(r.get("ports"), f"{rpath}.ports")))
        rules.append(Rule(peers, ports))
    return tuple(rules)


def parse_network_policy(obj: Mapping[str, Any]) -> NetworkPolicy:
    namespace, name, ctx = _metadata(obj, "NetworkPolicy", namespaced=True)
    spec = ctx.mapping(obj.get("spec"), "spec")
    pod_selector = parse_selector(ctx, spec.get("podSelector"), "spec.podSelector")
    ingress = _parse_rules(ctx, spec.get("ingress"), "spec.ingress", "from")
    egress = _parse_rules(ctx, spec.get("egress"), "spec.egress", "to")
    raw_types = spec.get("policyTypes")
    if raw_types is None:
        # The API server's defaulting: Ingress always, Egress when egress rules exist.
        types = {INGRESS} | ({EGRESS} if egress else set())
    else:
        types = set()
        for i, t in enumerate(ctx.sequence(raw_types, "spec.policyTypes")):
            if t not in (INGRESS, EGRESS):
                raise ctx.error(f"spec.policyTypes[{i}]", f"unknown policy type {t!r}")
            types.add(t)
    return NetworkPolicy(namespace, name, pod_selector, frozenset(types), ingress, egress)


def fail_closed_policy(obj: Mapping[str, Any], error: ModelError) -> NetworkPolicy | None:
    """A stand-in for a policy we cannot parse: it isolates the pods it selects, both ways.

    Dropping a broken policy silently would open pods its author meant to close. When even the
    podSelector is unreadable there is nothing to isolate and the policy is only reported.
    """
    try:
        namespace, name, ctx = _metadata(obj, "NetworkPolicy", namespaced=True)
        spec = ctx.mapping(obj.get("spec"), "spec")
        selector = parse_selector(ctx, spec.get("podSelector"), "spec.podSelector")
    except ModelError:
        return None
    return NetworkPolicy(namespace, name, selector, frozenset({INGRESS, EGRESS}),
                         invalid=f"{error.path}: {error.message}")


PARSERS = {
    "Pod": parse_pod,
    "Namespace": parse_namespace,
    "NetworkPolicy": parse_network_policy,
}


def parse_object(obj: Mapping[str, Any]) -> Pod | Namespace | NetworkPolicy:
    """Parse one API object by its kind. Raises ModelError; callers decide what to skip."""
    kind = obj.get("kind")
    parser = PARSERS.get(kind)  # type: ignore[arg-type]
    if parser is None:
        raise ModelError(str(kind), "?", "kind", "not a Pod, Namespace or NetworkPolicy")
    return parser(obj)
