"""A multi-node cluster in network namespaces: fake API server, np-agent per node, np-cni pods.

* N node namespaces joined by a switch namespace (a bridge), node i at 10.0.0.i/24;
* the fake API server listens inside node 1's namespace on 10.0.0.1 (reachable from every
  node over the switch, as a control-plane node's API server is);
* one `np-agent run --kubeconfig` per node, each with its own CNI socket, endpoints and CNI
  config directories (in the lab's work directory: nothing is written to /etc or /var);
* pods are created the way a kubelet and runtime do it: the Pod object first (Pending), then
  np-cni ADD with the conflist the agent wrote from the Node's podCIDR, then status.podIPs.

Everything lives in namespaces with the lab's prefix and goes away with close().
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from np_lab.fakeapi import FakeApiServer
from np_lab.netns import NODE, Lab

NP_CNI = Path(sys.executable).parent / "np-cni"
CNI_PATH = "/usr/lib/cni"
AGENT_DIR = Path(__file__).resolve().parents[2]


@dataclass
class ClusterPod:
    namespace: str
    name: str
    node: str
    target: str  # probe target name in the Lab
    netns: str
    container_id: str
    ipv4: str
    ipv6: str = ""
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass
class ClusterNode:
    name: str
    index: int
    netns: str
    target: str
    address: str
    pod_cidrs: tuple[str, ...]
    dir: Path
    agent: subprocess.Popen | None = None

    @property
    def conf_dir(self) -> Path:
        return self.dir / "net.d"

    @property
    def socket(self) -> str:
        return str(self.dir / "cni.sock")


class ClusterLab:
    def __init__(self, nodes: int = 2, agent_args: tuple[str, ...] = (),
                 prefix: str | None = None, kubeconfig: str | None = None) -> None:
        """``kubeconfig``: use that API server instead of an in-process fake one (the lab's
        Node, Namespace, Pod and NetworkPolicy objects are then created there)."""
        self.lab = Lab(prefix)
        try:
            self.nodes: list[ClusterNode] = []
            self._agent_args = agent_args
            self._node_prefix = "" if kubeconfig is None else self.lab.prefix
            self._build_nodes(nodes)
            self.api: Any
            if kubeconfig is None:
                self.api = FakeApiServer("10.0.0.1", netns=self.nodes[0].netns,
                                         bookmark_interval=1.0).start()
            else:
                from np_lab.kubeapi import KubeApi

                self.api = KubeApi(kubeconfig, self.nodes[0].netns, "10.0.0.1")
            self.kubeconfig = self.lab.workdir / "kubeconfig"
            self.api.kubeconfig(self.kubeconfig)
            for node in self.nodes:
                self.api.apply("nodes", self._node_object(node))
            self.pods: dict[str, ClusterPod] = {}
            for node in self.nodes:
                self.start_agent(node)
            for node in self.nodes:
                self.wait_ready(node)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ topology

    def _build_nodes(self, count: int) -> None:
        switch = self.lab.add_netns("sw")
        self.lab.run(switch, ["ip", "link", "add", "br0", "type", "bridge"])
        self.lab.run(switch, ["ip", "link", "set", "br0", "up"])
        for i in range(1, count + 1):
            if i == 1:
                netns, target = self.lab.node_ns, NODE
            else:
                target = f"n{i}"
                netns = self.lab.add_netns(target)
                self.lab.run(netns, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1",
                                     "net.ipv6.conf.all.forwarding=1",
                                     "net.ipv4.conf.all.rp_filter=0",
                                     "net.ipv4.conf.default.rp_filter=0",
                                     "net.ipv6.conf.default.accept_dad=0",
                                     "net.ipv6.conf.all.accept_dad=0"])
                self.lab.run(netns, ["ip", "link", "set", "lo", "up"])
            port = f"sw{i}"
            self.lab.run(switch, ["ip", "link", "add", port, "type", "veth", "peer", "name",
                                  "eth1", "netns", netns])
            self.lab.run(switch, ["ip", "link", "set", port, "master", "br0", "up"])
            self.lab.run(netns, ["ip", "addr", "add", f"10.0.0.{i}/24", "dev", "eth1"])
            self.lab.run(netns, ["ip", "addr", "add", f"fd00:0:0:ffff::{i}/64", "dev", "eth1",
                                 "nodad"])
            self.lab.run(netns, ["ip", "link", "set", "eth1", "up"])
            d = self.lab.workdir / f"node-{i}"
            d.mkdir()
            self.nodes.append(ClusterNode(f"{self._node_prefix}node-{i}", i, netns, target,
                                          f"10.0.0.{i}",
                                          (f"10.244.{i}.0/24", f"fd00:10:244:{i}::/64"), d))

    @staticmethod
    def _node_object(node: ClusterNode) -> dict[str, Any]:
        return {"metadata": {"name": node.name, "labels": {"kubernetes.io/hostname": node.name}},
                "spec": {"podCIDR": node.pod_cidrs[0], "podCIDRs": list(node.pod_cidrs)},
                "status": {"addresses": [
                    {"type": "InternalIP", "address": node.address},
                    {"type": "InternalIP", "address": f"fd00:0:0:ffff::{node.index}"},
                    {"type": "Hostname", "address": node.name}]}}

    def node(self, name: str) -> ClusterNode:
        return next(n for n in self.nodes if n.name == name)

    # ------------------------------------------------------------------ agents

    def start_agent(self, node: ClusterNode, *extra: str) -> subprocess.Popen:
        log = open(node.dir / "agent.log", "ab")  # noqa: SIM115 - the process owns it
        env = {**os.environ, "PYTHONPATH": str(AGENT_DIR)}
        node.agent = self.lab.spawn(node.netns, [
            sys.executable, "-m", "np_agent.cli", "run", "--kubeconfig", str(self.kubeconfig),
            "--node-name", node.name, "--cni-conf-dir", str(node.conf_dir),
            "--cni-socket", node.socket, "--endpoints-dir", str(node.dir / "endpoints"),
            "--pending-dir", str(node.dir / "pending-del"), "--cni-plugin-dir", CNI_PATH,
            "--metrics-address", "127.0.0.1:9490", "--watch-timeout", "10",
            "--resync-interval", "5", *self._agent_args, *extra],
            stdout=log, stderr=subprocess.STDOUT, env=env)
        return node.agent

    def stop_agent(self, node: ClusterNode, sig: int = signal.SIGTERM) -> None:
        if node.agent is not None and node.agent.poll() is None:
            node.agent.send_signal(sig)  # `ip netns exec` execs: this is the agent's PID
            node.agent.wait(timeout=15)
        node.agent = None

    def wait_ready(self, node: ClusterNode, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.lab.run(node.netns, ["python3", "-c", _READYZ], check=False)
            if out.returncode == 0 and (node.conf_dir / "10-np-nft.conflist").exists():
                return
            time.sleep(0.1)
        raise TimeoutError(f"agent on {node.name} not ready:\n" + self.agent_log(node)[-3000:])

    def agent_log(self, node: ClusterNode) -> str:
        return (node.dir / "agent.log").read_text(errors="replace")

    def metrics(self, node: ClusterNode) -> str:
        return self.lab.run(node.netns, ["python3", "-c", _METRICS]).stdout

    # ------------------------------------------------------------------ pods

    def add_pod(self, namespace: str, name: str, node: str, labels: dict[str, str],
                ports: tuple[tuple[str, int, str], ...] = ()) -> ClusterPod:
        """Create a pod as the kubelet would: object, CNI ADD, then status.podIPs."""
        n = self.node(node)
        containers = [{"name": "c", "image": "lab", "ports": [
            {"name": pname, "containerPort": port, "protocol": proto}
            for pname, port, proto in ports]}]
        obj = {"metadata": {"name": name, "namespace": namespace, "labels": labels},
               "spec": {"nodeName": node, "containers": containers},
               "status": {"phase": "Pending"}}
        created = self.api.create("pods", obj)
        target = f"{namespace}-{name}"[:20]
        netns = self.lab.add_netns(target)
        cid = f"{target}-{uuid.uuid4().hex[:10]}"
        result = self._cni_chain(n, "ADD", cid, netns, namespace, name,
                                 created["metadata"]["uid"])
        ips = [i["address"].split("/")[0] for i in result["ips"]]
        v4 = next(ip for ip in ips if "." in ip)
        v6 = next((ip for ip in ips if ":" in ip), "")
        created["status"] = {"phase": "Running", "podIP": v4,
                             "podIPs": [{"ip": ip} for ip in ips]}
        self.api.update("pods", created)
        pod = ClusterPod(namespace, name, node, target, netns, cid, v4, v6, result)
        self.pods[pod.ref] = pod
        return pod

    def delete_pod(self, ref: str) -> None:
        pod = self.pods.pop(ref)
        n = self.node(pod.node)
        self._cni_chain(n, "DEL", pod.container_id, pod.netns, pod.namespace, pod.name, "",
                        prev=pod.result)
        self.api.delete("pods", pod.namespace, pod.name)

    def _cni_chain(self, node: ClusterNode, command: str, cid: str, netns: str, namespace: str,
                   name: str, uid: str, prev: dict[str, Any] | None = None) -> dict[str, Any]:
        conflist = json.loads((node.conf_dir / "10-np-nft.conflist").read_text())
        plugins = conflist["plugins"] if command == "ADD" else list(reversed(conflist["plugins"]))
        result = prev
        for plugin in plugins:
            conf = {"cniVersion": conflist["cniVersion"], "name": conflist["name"], **plugin}
            if isinstance(conf.get("ipam"), dict) and conf["ipam"].get("type") == "host-local":
                # The one departure from the node's conflist: host-local keeps its state in
                # the lab, not in this machine's /var/lib/cni.
                conf["ipam"] = {**conf["ipam"], "dataDir": str(node.dir / "ipam")}
            if result is not None:
                conf["prevResult"] = result
            binary = NP_CNI if plugin["type"] == "np-cni" else Path(CNI_PATH) / plugin["type"]
            env = {**os.environ, "CNI_COMMAND": command, "CNI_CONTAINERID": cid,
                   "CNI_NETNS": f"/run/netns/{netns}", "CNI_IFNAME": "eth0",
                   "CNI_PATH": f"{CNI_PATH}:{NP_CNI.parent}",
                   "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};"
                               f"K8S_POD_NAME={name};K8S_POD_UID={uid}"}
            proc = subprocess.run(["ip", "netns", "exec", node.netns, str(binary)],
                                  input=json.dumps(conf).encode(), env=env, capture_output=True)
            out = json.loads(proc.stdout) if proc.stdout.strip() else None
            if proc.returncode != 0:
                raise RuntimeError(f"{plugin['type']} {command} failed: {out or proc.stderr}")
            if command == "ADD":
                result = out
        return result or {}

    # ------------------------------------------------------------------ objects

    def namespace(self, name: str, labels: dict[str, str]) -> None:
        self.api.apply("namespaces", {"metadata": {"name": name, "labels": {
            "kubernetes.io/metadata.name": name, **labels}}})

    def label_pod(self, ref: str, labels: dict[str, str]) -> None:
        ns, name = ref.split("/")
        obj = self.api.get("pods", ns, name)
        obj["metadata"]["labels"] = labels
        self.api.update("pods", obj)

    def close(self) -> None:
        for node in getattr(self, "nodes", []):
            with contextlib.suppress(Exception):  # close() goes on; the Lab kills by PID
                self.stop_agent(node)
        api = getattr(self, "api", None)
        if api is not None:
            if getattr(self, "_node_prefix", ""):  # a real API server: take our objects back
                for pod in list(getattr(self, "pods", {}).values()):
                    with contextlib.suppress(Exception):
                        api.delete("pods", pod.namespace, pod.name)
                for node in self.nodes:
                    with contextlib.suppress(Exception):
                        api.delete("nodes", "", node.name)
            api.stop()
        self.lab.close()

    def __enter__(self) -> ClusterLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_READYZ = ("import urllib.request,sys\n"
           "try: sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9490/readyz',"
           " timeout=1).status == 200 else 1)\n"
           "except Exception: sys.exit(1)")
_METRICS = ("import urllib.request\n"
            "print(urllib.request.urlopen('http://127.0.0.1:9490/metrics', timeout=2)"
            ".read().decode())")
