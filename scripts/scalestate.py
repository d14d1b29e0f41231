"""Cluster states for scripts/bench_scale, as API objects, and the changes made to them.

Three presets, each a whole cluster as the API server holds it plus the events the benchmark
writes one at a time:

* ``large`` (:class:`LargeCluster`), a typical large cluster: 150,000 pods in 3,000
  namespaces, replicas of 15,000 Deployments (5 per namespace, 10 replicas each), 10,000
  NetworkPolicies of the common shapes, 1,364 nodes of at most 110 pods; the benchmark node
  hosts 110 of the pods. Pods are full objects of a few KB each, as the API returns them
  (managedFields, ownerReferences, containers with ports, env, probes, resources,
  volumeMounts, status with conditions and containerStatuses): what an agent lists and
  parses is the real volume, not the fields it needs.
* ``worst`` and ``small`` (:class:`BenchstateCluster`): the state of scripts/benchstate.py
  (one server pod that every policy selects), 30,000 pods / 3,000 policies and 5,000 pods /
  1,000 policies, the objects bench_agent publishes.

Nothing is random: two runs build identical objects, so runs of different agents compare.
Replicas of one Deployment share their spec, status and metadata sub-objects (they are equal
anyway): 150,000 pods then cost the benchmark process about 650 MB instead of several GB,
while the API server still sends every byte of every pod (7 KB each on average).
FakeApiServer.load stores them without copies.

Every change is chosen to be *relevant to the benchmark node*: it changes what some policy
selecting one of the node's pods admits. A change that leaves the node's rules alone makes
no transaction, hence no log line to time; it would measure nothing. This module never
imports np_agent beyond its model (benchstate), so it stays valid whatever the dataplane's
layout.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

Obj = dict[str, Any]
Getter = Callable[[str, str, str], "Obj | None"]  # (plural, namespace, name) -> object

BENCH_NODE = "bench-node"
CHANGE_KINDS = ("policy", "pod-add", "pod-delete", "pod-label", "ns-label")
META_NAME = "kubernetes.io/metadata.name"


@dataclass(frozen=True)
class Change:
    """One API write, and the watch event the agent will log for it."""

    kind: str  # one of CHANGE_KINDS
    verb: str  # create, update, delete
    plural: str
    namespace: str
    name: str
    obj: Obj | None = None  # the object to create or the new version (update)
    what: str = ""  # human-readable, for --verbose

    @property
    def event(self) -> str:
        """The watch event type the agent receives for this write."""
        return {"create": "ADDED", "update": "MODIFIED", "delete": "DELETED"}[self.verb]


@dataclass(frozen=True)
class Probe:
    """An allowed flow for the packet benchmark: client pod -> server pod on the node.

    The server is isolated by a policy and ``allowed`` is admitted for the client only by a
    pod-selector peer rule, so each new connection goes through the policy set lookups;
    ``denied`` is a port the server listens on that no rule opens to the client.
    """

    server: str  # namespace/name
    server_ip: str
    client: str
    client_ip: str
    allowed: int
    denied: int
    why: str


@dataclass
class Preset:
    """A cluster: its objects by kind, the node being measured, the changes, a probe."""

    name: str
    description: str
    node: str
    counts: dict[str, int]
    probe: Probe | None
    _added: list[tuple[str, str]] = field(default_factory=list)  # pods created by pod-add

    def objects(self) -> Iterator[tuple[str, Iterator[Obj]]]:
        """(plural, objects) for FakeApiServer.load; namespaces first, like a real cluster."""
        raise NotImplementedError

    def change(self, kind: str, step: int, get: Getter) -> Change | None:
        """The step-th change of a kind, built on the current objects (``get`` reads the API
        server); None when there is nothing left to do (a pod-delete without a pod-add)."""
        if kind == "pod-delete":
            if step >= len(self._added):
                return None
            ns, name = self._added[step]
            return Change(kind, "delete", "pods", ns, name, what=f"pod {ns}/{name} deleted")
        made = {"policy": self._policy_change, "pod-add": self._pod_add,
                "pod-label": self._pod_label, "ns-label": self._namespace_label}[kind](step, get)
        if kind == "pod-add":
            self._added.append((made.namespace, made.name))
        return made

    def _policy_change(self, step: int, get: Getter) -> Change:
        raise NotImplementedError

    def _pod_add(self, step: int, get: Getter) -> Change:
        raise NotImplementedError

    def _pod_label(self, step: int, get: Getter) -> Change:
        raise NotImplementedError

    def _namespace_label(self, step: int, get: Getter) -> Change:
        raise NotImplementedError


def _current(get: Getter, plural: str, namespace: str, name: str) -> Obj:
    """A copy of the object as the API server holds it, to edit and write back whole (as
    kubectl edit does: the watch event then carries the full object)."""
    obj = get(plural, namespace, name)
    if obj is None:
        raise LookupError(f"{plural} {namespace}/{name} is not in the API server")
    return obj


def _toggle_label(labels: dict[str, str], key: str, suffix: str) -> str:
    """Flip a label between its value and value+suffix (an operator taking a pod out of a
    Deployment's selector for debugging, and back); returns the new value."""
    value = labels[key]
    labels[key] = value[: -len(suffix)] if value.endswith(suffix) else value + suffix
    return labels[key]


# ------------------------------------------------------------------- the large cluster

APPS = ("web", "api", "auth", "cart", "search", "orders", "payments", "catalog", "users",
        "notify", "reports", "billing", "inventory", "shipping", "reviews", "ads", "recommend",
        "media", "chat", "gateway")
SYSTEM_NAMESPACES = {
    "kube-system": ("coredns", "metrics-server", "cluster-autoscaler", "ingress-nginx",
                    "external-dns"),
    "monitoring": ("prometheus", "alertmanager", "grafana", "kube-state-metrics", "loki"),
}
TEAMS = 40
ENVS = ("prod", "staging", "dev")
DEPLOYMENTS_PER_NAMESPACE = 5
REPLICAS = 10
PODS_PER_NODE = 110
HTTP, METRICS, GRPC, TLS = 8080, 9090, 9000, 8443
EPOCH = "2025-03-0{}T{:02d}:{:02d}:{:02d}Z"  # creation times, spread deterministically
_SUFFIX_CHARS = "bcdfghjklmnpqrstvwxz2456789"  # what the API server's name generator uses
_UID_NS = uuid.UUID("6f0e3c9a-4a55-4c1e-9a53-5c0d2b8e7f11")


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def _random_string(seed: str, n: int) -> str:
    """A Kubernetes-style generated name fragment (pod-template-hash, pod suffix)."""
    value, out = _digest(seed), []
    for _ in range(n):
        value, rem = divmod(value, len(_SUFFIX_CHARS))
        out.append(_SUFFIX_CHARS[rem])
    return "".join(out)


def _stamp(i: int) -> str:
    return EPOCH.format(1 + i % 9, i % 24, (i // 24) % 60, (i // 1440) % 60)


def _fields_v1(value: Any, depth: int = 3) -> Any:
    """managedFields' fieldsV1 for an object: the set of fields it names (lists of named
    things keyed by name, as the API server does), ``depth`` levels deep (deeper levels
    are left empty: the object stays a few KB, as most pods are)."""
    if depth <= 0:
        return {}
    if isinstance(value, dict):
        return {f"f:{k}": _fields_v1(v, depth - 1) for k, v in value.items()}
    if isinstance(value, list) and value and all(
            isinstance(v, dict) and "name" in v for v in value):
        return {f'k:{{"name":"{v["name"]}"}}': {".": {}, **_fields_v1(v, depth - 1)}
                for v in value}
    return {}


@dataclass(frozen=True)
class _Deployment:
    """The parts all replicas of one Deployment share."""

    index: int
    namespace: str
    app: str
    prefix: str  # <deployment>-<pod-template-hash>-
    labels: Obj
    annotations: Obj
    owners: list[Obj]
    managed: list[Obj]
    spec: Obj
    status: Obj
    created: str


class LargeCluster(Preset):
    """150,000 realistic pods, 10,000 policies of the common shapes (see the module doc).

    Namespace i (0 is kube-system, 1 monitoring, the others ns-NNNN) carries team-(i % 40),
    env prod/staging/dev (i % 3) and the metadata.name label, and runs 5 Deployments of 10
    replicas whose apps a0..a4 come from APPS. Its policies:

    * every namespace: ``default-deny-ingress`` (podSelector {}, Ingress, no rules);
    * i % 2 == 0: ``allow-prometheus-scrape``: every pod, from app=prometheus in namespace
      monitoring, named port ``metrics``;
    * i % 6 != 5: ``allow-<a0>-to-<a1>``: app a1 from app a0 (same namespace), on 8080, the
      named port ``http``, the range 8080-8089, or 8080 and the named port ``grpc`` (i % 4);
    * i % 3 == 1: ``allow-same-namespace``: every pod from every pod of the namespace, all
      ports;
    * i % 3 == 2: ``allow-from-team``: every pod, from every namespace labelled with the
      namespace's team, on 8080;
    * i % 6 == 5: ``allow-dns-egress`` (Egress): DNS (UDP and TCP 53) to k8s-app=kube-dns in
      kube-system, anything in the namespace, 443 to the internet (an ipBlock 0.0.0.0/0
      except the private ranges);
    * i % 6 == 0: ``allow-from-lb``: app a0 from 172.16.0.0/12 except two ranges, on 8443.

    3,000 namespaces make exactly 10,000 policies. Pod g (Deployment d, replica r,
    g = r * deployments + d) runs on node g % nodes at slot g // nodes: replicas spread over
    nodes, and node n's pods have 10.(64 + n // 256).(n % 256).(slot + 1) from its /24.
    Node 0 is the benchmark node.
    """

    def __init__(self, namespaces: int = 3000) -> None:
        if namespaces < 12:
            raise ValueError("the large preset needs at least 12 namespaces")
        self.n_namespaces = namespaces
        self.n_deployments = namespaces * DEPLOYMENTS_PER_NAMESPACE
        self.n_pods = self.n_deployments * REPLICAS
        self.n_nodes = math.ceil(self.n_pods / PODS_PER_NODE)
        self._templates: dict[int, _Deployment] = {}
        self._managed: dict[tuple[str, ...], list[Obj]] = {}
        self._local = [self._locate(g) for g in range(0, self.n_pods, self.n_nodes)]
        n_policies = sum(1 for _ in self._policies())
        probe = self._find_probe()
        super().__init__(
            "large",
            f"typical large cluster: {self.n_pods:,} pods ({len(self._local)} on {BENCH_NODE}) "
            f"in {namespaces:,} namespaces, {self.n_deployments:,} Deployments x {REPLICAS} "
            f"replicas, {n_policies:,} NetworkPolicies, {self.n_nodes:,} nodes",
            BENCH_NODE,
            {"namespaces": namespaces, "pods": self.n_pods, "networkpolicies": n_policies,
             "nodes": self.n_nodes, "local_pods": len(self._local)},
            probe)
        self._plan_changes()

    # ------------------------------------------------------------------ naming and placement

    def namespace_name(self, i: int) -> str:
        return ("kube-system", "monitoring")[i] if i < 2 else f"ns-{i:04d}"

    def namespace_index(self, name: str) -> int:
        return {"kube-system": 0, "monitoring": 1}.get(name) or int(name[3:])

    @staticmethod
    def team(i: int) -> str:
        return f"team-{i % TEAMS:02d}"

    def apps(self, i: int) -> tuple[str, ...]:
        if i < 2:
            return SYSTEM_NAMESPACES[self.namespace_name(i)]
        return tuple(APPS[(i * 3 + k * 4) % len(APPS)] for k in range(DEPLOYMENTS_PER_NAMESPACE))

    @staticmethod
    def node_name(n: int) -> str:
        return BENCH_NODE if n == 0 else f"node-{n:04d}"

    @staticmethod
    def pod_ip(node: int, slot: int) -> str:
        return f"10.{64 + node // 256}.{node % 256}.{slot + 1}"

    @staticmethod
    def node_ip(n: int) -> str:
        return f"192.168.{4 + n // 250}.{1 + n % 250}"

    def _locate(self, g: int) -> tuple[int, int]:
        """(deployment, replica) of pod g."""
        return g % self.n_deployments, g // self.n_deployments

    def _placement(self, d: int, r: int) -> tuple[int, int]:
        """(node, slot) of replica r of Deployment d."""
        g = r * self.n_deployments + d
        return g % self.n_nodes, g // self.n_nodes

    # ------------------------------------------------------------------ objects

    def objects(self) -> Iterator[tuple[str, Iterator[Obj]]]:
        yield "namespaces", (self._namespace(i) for i in range(self.n_namespaces))
        yield "nodes", (self._node(n) for n in range(self.n_nodes))
        yield "networkpolicies", self._policies()
        yield "pods", self._pods()

    def _namespace(self, i: int) -> Obj:
        name = self.namespace_name(i)
        return {"metadata": {
            "name": name, "uid": str(uuid.uuid5(_UID_NS, f"ns/{name}")),
            "creationTimestamp": _stamp(i),
            "labels": {"team": self.team(i), "env": ENVS[i % 3], META_NAME: name},
            "managedFields": [{"manager": "kubectl-create", "operation": "Update",
                               "apiVersion": "v1", "time": _stamp(i), "fieldsType": "FieldsV1",
                               "fieldsV1": {"f:metadata": {"f:labels": {
                                   ".": {}, "f:team": {}, "f:env": {},
                                   f"f:{META_NAME}": {}}}}}]},
            "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}

    def _node(self, n: int) -> Obj:
        name, cidr = self.node_name(n), f"{self.pod_ip(n, -1)}/24"
        zone = f"zone-{'abc'[n % 3]}"
        return {"metadata": {
            "name": name, "uid": str(uuid.uuid5(_UID_NS, f"node/{name}")),
            "creationTimestamp": _stamp(n),
            "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                       "kubernetes.io/arch": "amd64", "topology.kubernetes.io/zone": zone,
                       "node.kubernetes.io/instance-type": "m6i.4xlarge"}},
            "spec": {"podCIDR": cidr, "podCIDRs": [cidr], "providerID": f"aws:///{zone}/i-{n:017x}"},
            "status": {"addresses": [{"type": "InternalIP", "address": self.node_ip(n)},
                                     {"type": "Hostname", "address": name}],
                       "capacity": {"cpu": "16", "memory": "65536Mi", "pods": "110"},
                       "conditions": [{"type": "Ready", "status": "True",
                                       "reason": "KubeletReady"}]}}

    def _pods(self) -> Iterator[Obj]:
        for d in range(self.n_deployments):
            tpl = self._deployment(d)
            for r in range(REPLICAS):
                node, slot = self._placement(d, r)
                yield self._pod(tpl, r, node, self.pod_ip(node, slot))

    def _pod(self, tpl: _Deployment, r: int, node: int, ip: str) -> Obj:
        name = tpl.prefix + _random_string(f"{tpl.index}/{r}", 5)
        host = self.node_ip(node)
        return {
            "metadata": {"name": name, "generateName": tpl.prefix, "namespace": tpl.namespace,
                         "uid": str(uuid.uuid5(_UID_NS, f"pod/{tpl.namespace}/{name}")),
                         "creationTimestamp": tpl.created, "labels": tpl.labels,
                         "annotations": tpl.annotations, "ownerReferences": tpl.owners,
                         "managedFields": tpl.managed},
            "spec": {**tpl.spec, "nodeName": self.node_name(node)},
            "status": {**tpl.status, "hostIP": host, "hostIPs": [{"ip": host}], "podIP": ip,
                       "podIPs": [{"ip": ip}]},
        }

    def _deployment(self, d: int) -> _Deployment:
        """Deployment d's shared parts, built once (a changed pod needs them again)."""
        tpl = self._templates.get(d)
        if tpl is None:
            tpl = self._templates[d] = self._build_deployment(d)
        return tpl

    def _build_deployment(self, d: int) -> _Deployment:
        i, k = divmod(d, DEPLOYMENTS_PER_NAMESPACE)
        ns, app, team = self.namespace_name(i), self.apps(i)[k], self.team(i)
        pth = _random_string(f"template/{d}", 10)
        version = f"v1.{d % 17}.{d % 5}"
        labels = {"app": app, "pod-template-hash": pth, "version": version, "team": team}
        if app == "coredns":
            labels["k8s-app"] = "kube-dns"
        created = _stamp(d)
        containers = self._containers(d, app, team, version)
        sa_volume = f"kube-api-access-{_random_string(f'sa/{d}', 5)}"
        for c in containers:
            c["volumeMounts"].append({"name": sa_volume, "readOnly": True,
                                      "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"})
        spec = {
            "volumes": [
                {"name": "config", "configMap": {"name": f"{app}-config", "defaultMode": 420}},
                {"name": "tmp", "emptyDir": {}},
                {"name": sa_volume, "projected": {"defaultMode": 420, "sources": [
                    {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                    {"configMap": {"name": "kube-root-ca.crt",
                                   "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                    {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {
                        "apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}]}},
            ],
            "containers": containers,
            "restartPolicy": "Always", "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst", "serviceAccountName": app, "serviceAccount": app,
            "securityContext": {"runAsNonRoot": True, "fsGroup": 2000},
            "schedulerName": "default-scheduler",
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists",
                 "effect": "NoExecute", "tolerationSeconds": 300},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists",
                 "effect": "NoExecute", "tolerationSeconds": 300}],
            "priority": 0, "enableServiceLinks": True,
            "preemptionPolicy": "PreemptLowerPriority",
        }
        started = _stamp(d + 1)
        status = {
            "phase": "Running",
            "conditions": [
                {"type": t, "status": "True", "lastProbeTime": None,
                 "lastTransitionTime": started}
                for t in ("PodReadyToStartContainers", "Initialized", "Ready",
                          "ContainersReady", "PodScheduled")],
            "startTime": created, "qosClass": "Burstable",
            "containerStatuses": [
                {"name": c["name"], "state": {"running": {"startedAt": started}},
                 "lastState": {}, "ready": True, "restartCount": 0, "image": c["image"],
                 "imageID": f"{c['image'].split(':')[0]}@sha256:"
                            f"{hashlib.sha256(c['image'].encode()).hexdigest()}",
                 "containerID": "containerd://" + hashlib.sha256(
                     f"{d}/{c['name']}".encode()).hexdigest(),
                 "started": True}
                for c in containers],
        }
        rs = f"{app}-{pth}"
        owners = [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs,
                   "uid": str(uuid.uuid5(_UID_NS, f"rs/{ns}/{rs}")), "controller": True,
                   "blockOwnerDeletion": True}]
        annotations = {"kubectl.kubernetes.io/restartedAt": created,
                       "prometheus.io/scrape": "true", "prometheus.io/port": str(METRICS)}
        return _Deployment(d, ns, app, f"{app}-{pth}-", labels, annotations, owners,
                           self._managed_fields(labels, annotations, spec, status), spec,
                           status, created)

    def _containers(self, d: int, app: str, team: str, version: str) -> list[Obj]:
        """1 to 3 containers: the app (ports http/metrics, sometimes grpc or an unnamed 8443),
        an Envoy sidecar for a third of the Deployments, a log shipper for a seventh."""
        a = APPS.index(app) if app in APPS else d % 7
        if app == "coredns":
            ports = [{"name": "dns", "containerPort": 53, "protocol": "UDP"},
                     {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"},
                     {"name": "metrics", "containerPort": 9153, "protocol": "TCP"}]
        else:
            ports = [{"name": "http", "containerPort": HTTP, "protocol": "TCP"},
                     {"name": "metrics", "containerPort": METRICS, "protocol": "TCP"}]
            if a % 4 == 1:
                ports.append({"name": "grpc", "containerPort": GRPC, "protocol": "TCP"})
            if a % 5 == 2:
                ports.append({"containerPort": TLS, "protocol": "TCP"})
        probe = {"httpGet": {"path": "/healthz", "port": ports[0]["containerPort"],
                             "scheme": "HTTP"},
                 "timeoutSeconds": 1, "periodSeconds": 10, "successThreshold": 1,
                 "failureThreshold": 3}
        main = {
            "name": app, "image": f"registry.example.com/{team}/{app}:{version}",
            "args": [f"--config=/etc/{app}/config.yaml", "--log-format=json"],
            "ports": ports,
            "env": [{"name": "APP_NAME", "value": app},
                    {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {
                        "apiVersion": "v1", "fieldPath": "metadata.namespace"}}},
                    {"name": "POD_IP", "valueFrom": {"fieldRef": {
                        "apiVersion": "v1", "fieldPath": "status.podIP"}}},
                    {"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {
                        "name": f"{app}-db", "key": "password"}}},
],
            "resources": {"limits": {"cpu": "1", "memory": "512Mi"},
                          "requests": {"cpu": "100m", "memory": "256Mi"}},
            "livenessProbe": {**probe, "initialDelaySeconds": 10},
            "readinessProbe": {**probe, "httpGet": {**probe["httpGet"], "path": "/ready"}},
            "volumeMounts": [{"name": "config", "readOnly": True, "mountPath": f"/etc/{app}"},
                             {"name": "tmp", "mountPath": "/tmp"}],
            "terminationMessagePath": "/dev/termination-log",
            "terminationMessagePolicy": "File", "imagePullPolicy": "IfNotPresent",
            "securityContext": {"allowPrivilegeEscalation": False,
                                "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]}},
        }
        containers = [main]
        if d % 3 == 0:
            containers.append({
                "name": "envoy", "image": "docker.io/envoyproxy/envoy:v1.31.2",
                "args": ["-c", "/etc/envoy/envoy.yaml", "--service-cluster", app],
                "ports": [{"name": "envoy-admin", "containerPort": 15000, "protocol": "TCP"},
                          {"containerPort": 15001, "protocol": "TCP"}],
                "resources": {"limits": {"cpu": "500m", "memory": "256Mi"},
                              "requests": {"cpu": "50m", "memory": "64Mi"}},
                "readinessProbe": {"httpGet": {"path": "/ready", "port": 15000,
                                               "scheme": "HTTP"}, "periodSeconds": 5,
                                   "timeoutSeconds": 1, "successThreshold": 1,
                                   "failureThreshold": 3},
                "volumeMounts": [{"name": "config", "readOnly": True,
                                  "mountPath": "/etc/envoy"}],
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File", "imagePullPolicy": "IfNotPresent"})
        if d % 7 == 0:
            containers.append({
                "name": "log-shipper", "image": "cr.fluentbit.io/fluent/fluent-bit:3.1.9",
                "env": [{"name": "FLUENT_ELASTICSEARCH_HOST", "value": "logs.example.com"}],
                "resources": {"limits": {"memory": "128Mi"},
                              "requests": {"cpu": "20m", "memory": "32Mi"}},
                "volumeMounts": [{"name": "tmp", "readOnly": True, "mountPath": "/var/log/app"}],
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File", "imagePullPolicy": "IfNotPresent"})
        return containers

    def _managed_fields(self, labels: Obj, annotations: Obj, spec: Obj,
                        status: Obj) -> list[Obj]:
        """What kube-controller-manager and the kubelet own, shared by Deployments of the same
        shape (the field sets do not depend on the values)."""
        key = (*labels, *(c["name"] for c in spec["containers"]),
               *(p.get("name", str(p["containerPort"])) for c in spec["containers"]
                 for p in c.get("ports", ())))
        managed = self._managed.get(key)
        if managed is None:
            meta = {"f:generateName": {}, "f:labels": {".": {}, **_fields_v1(labels)},
                    "f:annotations": {".": {}, **_fields_v1(annotations)},
                    "f:ownerReferences": {".": {}, 'k:{"uid":"..."}': {}}}
            fields_spec = _fields_v1({k: v for k, v in spec.items() if k != "volumes"})
            fields_status = _fields_v1({k: v for k, v in status.items()
                                        if k not in ("containerStatuses", "conditions")})
            managed = self._managed[key] = [
                {"manager": "kube-controller-manager", "operation": "Update",
                 "apiVersion": "v1", "time": _stamp(len(self._managed)),
                 "fieldsType": "FieldsV1",
                 "fieldsV1": {"f:metadata": meta, "f:spec": fields_spec}},
                {"manager": "kubelet", "operation": "Update", "apiVersion": "v1",
                 "time": _stamp(len(self._managed) + 1), "fieldsType": "FieldsV1",
                 "fieldsV1": {"f:status": {**fields_status, "f:podIP": {}, "f:podIPs": {},
                                           "f:hostIP": {}, "f:hostIPs": {},
                                           "f:containerStatuses": {},
                                           "f:conditions": {}}},
                 "subresource": "status"}]
        return managed

    # ------------------------------------------------------------------ policies

    def _policies(self) -> Iterator[Obj]:
        for i in range(self.n_namespaces):
            yield from self._namespace_policies(i)

    def _namespace_policies(self, i: int) -> Iterator[Obj]:
        ns, apps = self.namespace_name(i), self.apps(i)
        a0, a1 = apps[0], apps[1]

        def policy(name: str, selector: Obj, ingress: list[Obj] | None = None,
                   egress: list[Obj] | None = None) -> Obj:
            types = (["Ingress"] if ingress is not None else []) + (
                ["Egress"] if egress is not None else [])
            spec: Obj = {"podSelector": selector, "policyTypes": types}
            if ingress:
                spec["ingress"] = ingress
            if egress:
                spec["egress"] = egress
            return {"metadata": {"name": name, "namespace": ns,
                                 "uid": str(uuid.uuid5(_UID_NS, f"netpol/{ns}/{name}")),
                                 "creationTimestamp": _stamp(i), "generation": 1,
                                 "labels": {"team": self.team(i)}},
                    "spec": spec}

        yield policy("default-deny-ingress", {}, ingress=[])
        if i % 2 == 0:
            yield policy("allow-prometheus-scrape", {}, ingress=[{
                "from": [{"namespaceSelector": {"matchLabels": {META_NAME: "monitoring"}},
                          "podSelector": {"matchLabels": {"app": "prometheus"}}}],
                "ports": [{"protocol": "TCP", "port": "metrics"}]}])
        if i % 6 != 5:
            ports = ([{"protocol": "TCP", "port": HTTP}],
                     [{"protocol": "TCP", "port": "http"}],
                     [{"protocol": "TCP", "port": HTTP, "endPort": HTTP + 9}],
                     [{"protocol": "TCP", "port": HTTP}, {"protocol": "TCP", "port": "grpc"}],
                     )[i % 4]
            yield policy(f"allow-{a0}-to-{a1}", {"matchLabels": {"app": a1}}, ingress=[{
                "from": [{"podSelector": {"matchLabels": {"app": a0}}}], "ports": ports}])
        if i % 3 == 1:
            yield policy("allow-same-namespace", {}, ingress=[{"from": [{"podSelector": {}}]}])
        if i % 3 == 2:
            yield policy("allow-from-team", {}, ingress=[{
                "from": [{"namespaceSelector": {"matchLabels": {"team": self.team(i)}}}],
                "ports": [{"protocol": "TCP", "port": HTTP}]}])
        if i % 6 == 5:
            yield policy("allow-dns-egress", {}, egress=[
                {"to": [{"namespaceSelector": {"matchLabels": {META_NAME: "kube-system"}},
                         "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
                 "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
                {"to": [{"podSelector": {}}]},
                {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": [
                    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]}}],
                 "ports": [{"protocol": "TCP", "port": 443}]}])
        if i % 6 == 0:
            yield policy("allow-from-lb", {"matchLabels": {"app": a0}}, ingress=[{
                "from": [{"ipBlock": {"cidr": "172.16.0.0/12",
                                      "except": ["172.16.5.0/24", "172.20.0.0/16"]}}],
                "ports": [{"protocol": "TCP", "port": TLS}]}])

    # ------------------------------------------------------------------ the probe

    def _find_probe(self) -> Probe | None:
        """A local pod of app a1 in a namespace where only allow-<a0>-to-<a1> admits other
        pods of the namespace (no same-namespace or team rule): clients of app a0 get 8080
        by a pod-selector peer, and the metrics port stays closed to them."""
        for d, r in self._local:
            i, k = divmod(d, DEPLOYMENTS_PER_NAMESPACE)
            if i < 2 or i % 6 not in (0, 3) or k != 1:
                continue
            client_d = i * DEPLOYMENTS_PER_NAMESPACE
            node, slot = self._placement(client_d, 0)
            if node == 0:
                continue
            server, client = self._deployment(d), self._deployment(client_d)
            server_node, server_slot = self._placement(d, r)
            return Probe(
                f"{server.namespace}/{self._pod(server, r, 0, '')['metadata']['name']}",
                self.pod_ip(server_node, server_slot),
                f"{client.namespace}/{self._pod(client, 0, node, '')['metadata']['name']}",
                self.pod_ip(node, slot), HTTP, METRICS,
                f"server app={server.app} selected by default-deny-ingress and "
                f"allow-{client.app}-to-{server.app}; client app={client.app} admitted by that "
                f"policy's podSelector peer; {METRICS} open only to prometheus")
        return None

    # ------------------------------------------------------------------ changes

    def _plan_changes(self) -> None:
        """Which objects each kind of change touches: all are peers of, or policies selecting,
        pods of the benchmark node, and none touches the probe's flow."""
        local_ns = sorted({d // DEPLOYMENTS_PER_NAMESPACE for d, _ in self._local} - {0, 1})
        probe_ns = (self.namespace_index(self.probe.server.split("/")[0])
                    if self.probe else -1)
        usable = [i for i in local_ns if i != probe_ns]
        # policies selecting every pod of a namespace the node has a pod in
        self.policy_targets = [(self.namespace_name(i), name) for i in usable
                               for name, cond in (("allow-from-team", i % 3 == 2),
                                                  ("allow-prometheus-scrape", i % 2 == 0))
                               if cond]
        team_ns = [i for i in usable if i % 3 == 2]
        local_apps = {(d // DEPLOYMENTS_PER_NAMESPACE, d % DEPLOYMENTS_PER_NAMESPACE)
                      for d, _ in self._local}
        # Deployments whose pods are peers of a policy selecting a local pod: prometheus
        # (every scrape policy), a0 where the node runs an a1 (allow-a0-to-a1), every
        # Deployment of a same-namespace namespace, of a namespace of a team some local
        # namespace admits (allow-from-team).
        a0_peers = [i * DEPLOYMENTS_PER_NAMESPACE for i in usable
                    if i % 6 != 5 and (i, 1) in local_apps]
        same_ns = [i * DEPLOYMENTS_PER_NAMESPACE + k for i in usable if i % 3 == 1
                   for k in range(DEPLOYMENTS_PER_NAMESPACE)]
        # teams some local namespace admits: a namespace moves between these only, so it
        # stays a peer of the node's policies (leaving one, joining another) however often
        # it is picked, and pod-adds in it stay relevant
        self.teams = sorted({self.team(i) for i in team_ns})
        if len(self.teams) < 2:  # a tiny trial cluster: moving needs somewhere to go
            self.teams.append(self.team(TEAMS - 1 if self.teams == [self.team(0)] else 0))
        self.team_namespaces = [i for i in range(2, self.n_namespaces)
                                if self.team(i) in self.teams and i != probe_ns]
        team_peers = [i * DEPLOYMENTS_PER_NAMESPACE + k for i in self.team_namespaces
                      for k in range(DEPLOYMENTS_PER_NAMESPACE)]
        prometheus = DEPLOYMENTS_PER_NAMESPACE  # monitoring's first Deployment
        self.add_targets = [group for group in ([prometheus], a0_peers, same_ns, team_peers)
                            if group]
        probe_client = self.probe.client if self.probe else ""
        self.label_targets = [
            (tpl.namespace, name)
            for d in (prometheus, *a0_peers)
            for tpl in [self._deployment(d)] for r in range(REPLICAS)
            for name in [tpl.prefix + _random_string(f"{d}/{r}", 5)]
            if f"{tpl.namespace}/{name}" != probe_client]

    def _policy_change(self, step: int, get: Getter) -> Change:
        """An operator's edit of a policy that selects the node's pods, cycling through: a
        new port instead of the old ones, one more port, one more peer (an address outside
        the cluster: a pod peer could already be admitted by another rule, changing
        nothing)."""
        ns, name = self.policy_targets[step % len(self.policy_targets)]
        obj = _current(get, "networkpolicies", ns, name)
        rule = obj["spec"]["ingress"][0]
        how = step % 3
        if how == 0:
            rule["ports"] = [{"protocol": "TCP", "port": 10000 + step}]
            what = f"ports -> {10000 + step}"
        elif how == 1:
            rule.setdefault("ports", []).append({"protocol": "TCP", "port": 20000 + step})
            what = f"port {20000 + step} added"
        else:
            cidr = f"198.18.{step // 256 % 256}.{step % 256}/32"
            rule["from"].append({"ipBlock": {"cidr": cidr}})
            what = f"peer {cidr} added"
        return Change("policy", "update", "networkpolicies", ns, name, obj,
                      f"policy {ns}/{name}: {what}")

    def _pod_add(self, step: int, get: Getter) -> Change:
        """A new replica (scale-up or a rollout's surge pod) of a Deployment whose pods the
        node's policies admit, on another node, with the next free address there."""
        group = self.add_targets[step % len(self.add_targets)]
        d = group[(step // len(self.add_targets) * 7919) % len(group)]
        node = 1 + step % (self.n_nodes - 1)
        slot = PODS_PER_NODE + step // (self.n_nodes - 1)
        if slot > 253:
            raise ValueError("too many pod-add changes for the free addresses of the nodes")
        pod = self._pod(self._deployment(d), REPLICAS + step, node, self.pod_ip(node, slot))
        meta = pod["metadata"]
        return Change("pod-add", "create", "pods", meta["namespace"], meta["name"], pod,
                      f"pod {meta['namespace']}/{meta['name']} added on {self.node_name(node)}")

    def _pod_label(self, step: int, get: Getter) -> Change:
        """A pod taken out of (or put back into) its Deployment's app label."""
        ns, name = self.label_targets[(step * 7) % len(self.label_targets)]
        obj = _current(get, "pods", ns, name)
        obj["metadata"]["labels"] = labels = dict(obj["metadata"]["labels"])
        value = _toggle_label(labels, "app", "-debug")
        return Change("pod-label", "update", "pods", ns, name, obj,
                      f"pod {ns}/{name}: app={value}")

    def _namespace_label(self, step: int, get: Getter) -> Change:
        """A namespace moved to another team: it leaves the peers of the policies admitting
        its old team and joins the new team's (both select pods of the node)."""
        i = self.team_namespaces[(step * 31) % len(self.team_namespaces)]
        ns = self.namespace_name(i)
        obj = _current(get, "namespaces", "", ns)
        labels = obj["metadata"]["labels"]
        labels["team"] = self.teams[(self.teams.index(labels["team"]) + 1) % len(self.teams)]
        return Change("ns-label", "update", "namespaces", "", ns, obj,
                      f"namespace {ns}: team={labels['team']}")


# ------------------------------------------------------------------- benchstate presets


class BenchstateCluster(Preset):
    """scripts/benchstate.py's state (1 server pod, every policy selects it), published as
    bench_agent does: the server on the benchmark node, the peers on another node."""

    OTHER = "other-node"

    def __init__(self, name: str, policies: int, pods: int) -> None:
        import benchstate  # beside this module; imports np_agent's model

        self.bs = benchstate
        self.state = benchstate.build_state(policies, pods)
        self.peer_namespaces = sorted(n for n in self.state.namespaces if n.startswith("peer-"))
        self.peers = sorted(r for r in self.state.pods if r.startswith("peer-"))
        allowed, denied = benchstate.probe_ports(policies)
        super().__init__(
            name, f"scripts/benchstate.py: {len(self.state.pods):,} pods (1 on {BENCH_NODE}) in "
                  f"{len(self.state.namespaces):,} namespaces, {len(self.state.policies):,} "
                  "NetworkPolicies all selecting the server pod",
            BENCH_NODE,
            {"namespaces": len(self.state.namespaces), "pods": len(self.state.pods),
             "networkpolicies": len(self.state.policies), "nodes": 0, "local_pods": 1},
            Probe(f"{benchstate.SERVER_NS}/server", benchstate.SERVER_IP,
                  f"{benchstate.CLIENT_NS}/client", benchstate.CLIENT_IP, allowed, denied,
                  "benchstate's client policy: server isolated by every policy, client admitted "
                  "by a podSelector+namespaceSelector peer on the allowed port only"))

    def _node_of(self, ref: str) -> str:
        return BENCH_NODE if ref == f"{self.bs.SERVER_NS}/server" else self.OTHER

    def objects(self) -> Iterator[tuple[str, Iterator[Obj]]]:
        bs = self.bs
        yield "namespaces", (bs.namespace_api(ns) for ns in self.state.namespaces.values())
        yield "networkpolicies", (bs.policy_api(p) for p in self.state.policies.values())
        yield "pods", (bs.pod_api(p, self._node_of(p.ref)) for p in self.state.pods.values())

    def _policy_change(self, step: int, get: Getter) -> Change:
        """benchstate.changed_policy: the edits bench_agent makes (client policies spared)."""
        pol = self.bs.changed_policy(self.state, step)
        self.state.add(pol)
        return Change("policy", "update", "networkpolicies", pol.namespace, pol.name,
                      self.bs.policy_api(pol), f"policy {pol.namespace}/{pol.name} edited")

    def _pod_add(self, step: int, get: Getter) -> Change:
        """A replica of a peer Deployment (same labels) with a new address, on another node."""
        n = (step * 7) % len(self.peer_namespaces)
        ns = self.peer_namespaces[n]
        index = int(ns[5:])
        twin = self.state.pods[f"{ns}/p{(step * 13) % self.bs.PODS_PER_NAMESPACE:02d}"]
        slot = self.bs.PODS_PER_NAMESPACE + step // len(self.peer_namespaces)
        pod = replace(twin, name=f"r{step:03d}", uid="",
                      ips=(ipaddress.ip_address(self.bs.peer_ip(index, slot)),))
        return Change("pod-add", "create", "pods", ns, pod.name, self.bs.pod_api(pod, self.OTHER),
                      f"pod {ns}/{pod.name} ({dict(pod.labels)}) added")

    def _pod_label(self, step: int, get: Getter) -> Change:
        """bench_agent's pod change: a peer moved to the next app (a0..a4)."""
        ns, name = self.peers[(step * 97) % len(self.peers)].split("/")
        obj = _current(get, "pods", ns, name)
        labels = obj["metadata"]["labels"]
        labels["app"] = f"a{(int(labels['app'][1:]) + 1) % self.bs.APPS}"
        return Change("pod-label", "update", "pods", ns, name, obj,
                      f"pod {ns}/{name}: app={labels['app']}")

    def _namespace_label(self, step: int, get: Getter) -> Change:
        """A peer namespace moved to the next team (t0..t9)."""
        ns = self.peer_namespaces[(step * 13) % len(self.peer_namespaces)]
        obj = _current(get, "namespaces", "", ns)
        labels = obj["metadata"]["labels"]
        labels["team"] = f"t{(int(labels['team'][1:]) + 1) % self.bs.TEAMS}"
        return Change("ns-label", "update", "namespaces", "", ns, obj,
                      f"namespace {ns}: team={labels['team']}")


PRESETS: dict[str, Callable[..., Preset]] = {
    "large": LargeCluster,
    "worst": lambda: BenchstateCluster("worst", 3000, 30000),
    "small": lambda: BenchstateCluster("small", 1000, 5000),
}
