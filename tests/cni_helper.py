"""np-cni as a container runtime calls it, against `np-agent run` in a lab node netns.

Shared by tests/test_cni.py (the Python plugin) and tests/test_cni_shim.py (the host shim):
a node netns with the agent running on static manifests, its socket, endpoints, pending-DEL
and IPAM directories in the lab's work directory (nothing under /var or /run); pods are empty
netns the plugin wires.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from np_agent.ruleset import TABLE
from np_cni.link import host_ifname
from np_lab import Lab

REF_PLUGINS = Path("/usr/lib/cni")
NP_CNI = Path(sys.executable).parent / "np-cni"
NET = "np-test"
NODE = "node-1"

CLUSTER = """apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {ns: x}}
---
apiVersion: v1
kind: Namespace
metadata: {name: y, labels: {ns: y}}
""" + "".join(f"""---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {ns}, labels: {{pod: {name}}}, uid: uid-{ns}-{name}}}
spec:
  nodeName: {NODE}
  containers: [{{name: c, ports: [{{name: http, containerPort: 80}}]}}]
""" for ns in "xy" for name in ["a", "b", "c", "d"] + [f"p{i}" for i in range(20)])

DENY_X = """apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: x}
spec: {podSelector: {matchLabels: {pod: c}}, policyTypes: [Ingress, Egress]}
"""


class Node:
    """One node netns with np-agent running, and helpers to call np-cni like a runtime."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.dir = lab.workdir
        self.manifests = self.dir / "manifests"
        self.manifests.mkdir()
        (self.manifests / "cluster.yaml").write_text(CLUSTER)
        (self.manifests / "policies.yaml").write_text("")
        self.socket = str(self.dir / "cni.sock")
        self.endpoints = self.dir / "endpoints"
        self.ipam_dir = self.dir / "ipam"
        self.pending = self.dir / "pending-del"
        self.agent_log = self.dir / "agent.log"
        self.agent = self.start_agent()

    def start_agent(self) -> subprocess.Popen:
        """`np-agent run` in the node netns; returns once np-cni STATUS says ready."""
        log = open(self.agent_log, "ab")  # noqa: SIM115 - the process owns it
        proc = self.lab.spawn(self.lab.node_ns, [
            sys.executable, "-m", "np_agent.cli", "run", "--manifests", str(self.manifests),
            "--node-name", NODE, "--cni-socket", self.socket, "--endpoints-dir",
            str(self.endpoints), "--pending-dir", str(self.pending), "--cni-plugin-dir",
            str(REF_PLUGINS), "--resync-interval", "3", "--log-level", "debug"],
            stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.cni("STATUS")[0] == 0:
                self.agent = proc
                return proc
            time.sleep(0.1)
        raise AssertionError("agent not ready: " + self.agent_log.read_text()[-2000:])

    def stop_agent(self) -> None:
        """SIGTERM by PID (`ip netns exec` execs the agent: same PID), wait for the exit."""
        self.agent.send_signal(signal.SIGTERM)
        self.agent.wait(timeout=15)

    def conf(self, version: str = "1.1.0", **extra: Any) -> dict[str, Any]:
        return {"cniVersion": version, "name": NET, "type": "np-cni",
                "agentSocket": self.socket, "endpointsDir": str(self.endpoints),
                "agentTimeout": 10,
                "ipam": {"type": "host-local", "dataDir": str(self.ipam_dir),
                         "ranges": [[{"subnet": "10.244.1.0/24"}], [{"subnet": "fd00:1::/64"}]]},
                **extra}

    def run_plugin(self, plugin: Path, command: str, conf: dict[str, Any], cid: str = "",
                   netns: str = "", ifname: str = "eth0", pod: tuple[str, str] = ("x", "a"),
                   env_extra: dict[str, str] | None = None,
                   wrap: Sequence[str] = ()) -> tuple[int, Any]:
        """Execute ``plugin`` in the node netns as a runtime does (``wrap``: a command that
        execs its last argument, e.g. to give it a mount namespace of its own)."""
        env = {**os.environ, "CNI_COMMAND": command, "CNI_PATH": f"{REF_PLUGINS}:{NP_CNI.parent}"}
        if command not in ("VERSION", "STATUS", "GC"):
            env.update(CNI_CONTAINERID=cid, CNI_IFNAME=ifname,
                       CNI_ARGS=f"IgnoreUnknown=1;K8S_POD_NAMESPACE={pod[0]};"
                                f"K8S_POD_NAME={pod[1]};K8S_POD_UID=uid-{pod[0]}-{pod[1]}")
            if netns:
                env["CNI_NETNS"] = f"/run/netns/{netns}"
        env.update(env_extra or {})
        proc = subprocess.run(["ip", "netns", "exec", self.lab.node_ns, *wrap, str(plugin)],
                              input=json.dumps(conf).encode(), env=env, capture_output=True)
        out = proc.stdout.decode().strip()
        return proc.returncode, json.loads(out) if out else None

    def cni(self, command: str, cid: str = "", netns: str = "", conf: dict | None = None,
            **kw: Any) -> tuple[int, Any]:
        return self.run_plugin(NP_CNI, command, conf or self.conf(), cid, netns, **kw)

    def add(self, name: str, pod: tuple[str, str], **kw: Any) -> tuple[str, str, dict]:
        netns = self.lab.add_netns(name)
        cid = f"{name}-{uuid.uuid4().hex[:12]}"
        rc, result = self.cni("ADD", cid, netns, pod=pod, **kw)
        assert rc == 0, result
        return cid, netns, result

    def set_policies(self, *docs: str) -> None:
        (self.manifests / "policies.yaml").write_text("\n---\n".join(docs))
        self.agent.send_signal(signal.SIGHUP)  # ip netns exec execs the agent: same PID
        time.sleep(0.5)
        self.request({"op": "sync"})

    def request(self, payload: dict) -> dict:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(self.socket)
            s.sendall(json.dumps(payload).encode() + b"\n")
            return json.loads(s.makefile().readline())

    def nft(self) -> str:
        return self.lab.run(self.lab.node_ns, ["nft", "list", "table", "inet",
                                               TABLE]).stdout

    def host_links(self) -> list[str]:
        out = self.lab.run(self.lab.node_ns, ["ip", "-o", "link", "show"]).stdout
        return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()
                if line.split(":")[1].strip().startswith("np")]

    def allocations(self) -> dict[str, str]:
        """host-local's store: IP -> container id."""
        d = self.ipam_dir / NET
        return {f.name: f.read_text().split()[0] for f in d.glob("*")
                if d.is_dir() and f.name[0].isdigit() or ":" in f.name}

    def assert_nothing_left(self, cid: str, ifname: str = "eth0") -> None:
        self.request({"op": "sync"})
        assert host_ifname(cid, ifname) not in self.host_links()
        assert not (self.endpoints / f"{cid}_{ifname}.json").exists()
        assert cid not in self.allocations().values()
        assert host_ifname(cid, ifname) not in self.nft()


def ips_of(result: dict) -> tuple[str, str]:
    v4 = next(i["address"].split("/")[0] for i in result["ips"] if "." in i["address"])
    v6 = next(i["address"].split("/")[0] for i in result["ips"] if ":" in i["address"])
    return v4, v6
