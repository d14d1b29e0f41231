"""np-cni invoked as a container runtime invokes it: CNI_* environment, config on stdin.

A node netns runs `np-agent run` (static manifests, its CNI socket); pods are empty netns that
np-cni wires with the reference host-local IPAM, alone or in a conflist chained with portmap.
Traffic is real; every test checks what is left behind.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from cni_helper import DENY_X, NET, NP_CNI, REF_PLUGINS, Node, ips_of
from np_cni.link import host_ifname
from np_lab import Lab

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    if os.geteuid() != 0:
        pytest.fail("CNI tests need root: they build network namespaces")
    assert NP_CNI.exists(), f"{NP_CNI} missing: install the project (scripts/setup)"
    with Lab() as lab:
        n = Node(lab)
        yield n
        n.set_policies()
    leftovers = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert lab.prefix not in leftovers


# ------------------------------------------------------------------ protocol


def test_version_and_clear_errors(node):
    rc, out = node.cni("VERSION", conf={"cniVersion": "1.1.0"})
    assert rc == 0 and out["supportedVersions"] == ["0.4.0", "1.0.0", "1.1.0"]
    proc = subprocess.run(["ip", "netns", "exec", node.lab.node_ns, str(NP_CNI)],
                          input=b"{not json", capture_output=True,
                          env={**os.environ, "CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1",
                               "CNI_NETNS": "/run/netns/x", "CNI_IFNAME": "eth0",
                               "CNI_PATH": str(REF_PLUGINS)})
    assert proc.returncode != 0 and json.loads(proc.stdout)["code"] == 6
    rc, out = node.cni("ADD", "c2", "nowhere", conf={**node.conf(), "cniVersion": "0.2.0"})
    assert rc != 0 and out["code"] == 1 and "0.2.0" in out["msg"]
    rc, out = node.cni("ADD", "c3", "nowhere",
                       conf={**node.conf(), "ipam": {"type": "no-such-ipam"}})
    assert rc != 0 and out["code"] == 7 and "no-such-ipam" in out["msg"]
    rc, out = node.cni("ADD", "c4", "", env_extra={"CNI_NETNS": ""})
    assert rc != 0 and out["code"] == 4 and "CNI_NETNS" in out["msg"]
    rc, out = node.cni("ADD", "c5", "missing-netns")
    assert rc != 0 and out["code"] == 3 and "does not exist" in out["msg"]
    assert "step 'veth'" in out["msg"]
    node.assert_nothing_left("c5")  # the IP host-local gave was released
    rc, out = node.cni("ADD", "../evil", "x")
    assert rc != 0 and out["code"] == 4


def test_add_wires_pod_and_traffic_flows(node):
    cid_a, ns_a, res = node.add("wa", ("x", "a"))
    assert res["cniVersion"] == "1.1.0"
    host_if = host_ifname(cid_a, "eth0")
    assert res["interfaces"][0]["name"] == host_if
    assert res["interfaces"][1] == {"name": "eth0", "mac": res["interfaces"][1]["mac"],
                                    "sandbox": f"/run/netns/{ns_a}"}
    v4, v6 = ips_of(res)
    assert {i["address"] for i in res["ips"]} == {f"{v4}/32", f"{v6}/128"}
    assert all(i["interface"] == 1 for i in res["ips"])
    assert {"dst": "0.0.0.0/0", "gw": "169.254.1.1"} in res["routes"]
    pod_addrs = node.lab.run(ns_a, ["ip", "addr", "show", "eth0"]).stdout
    assert f"{v4}/32" in pod_addrs and f"{v6}/128" in pod_addrs
    assert "default via 169.254.1.1 dev eth0" in node.lab.run(ns_a, ["ip", "route"]).stdout
    assert "default via fe80::1 dev eth0" in node.lab.run(ns_a, ["ip", "-6", "route"]).stdout
    routes = node.lab.run(node.lab.node_ns, ["ip", "route"]).stdout
    assert f"{v4} dev {host_if}" in routes
    assert f'"{host_if}" . {v4}' in node.nft()  # anti-spoofing knows the pod's address

    cid_b, _, res_b = node.add("wb", ("x", "b"))
    b4, b6 = ips_of(res_b)
    node.lab.serve("wa", "tcp", 80)
    node.lab.serve("wa", "udp", 53)
    assert node.lab.probe("wb", v4, "tcp", 80) and node.lab.probe("wb", v6, "tcp", 80)
    assert node.lab.probe("wb", v4, "udp", 53)
    assert node.lab.probe("node", v4, "tcp", 80)
    for cid, name in ((cid_a, "wa"), (cid_b, "wb")):
        assert node.cni("DEL", cid, node.lab._bare[name])[0] == 0
        node.assert_nothing_left(cid)


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0"])
def test_conflist_chained_with_portmap_and_bandwidth(node, version):
    """A runtime executes each plugin of the list with the previous result, DEL in reverse."""
    netns = node.lab.add_netns(f"pm{version[0]}")
    cid = f"pm-{uuid.uuid4().hex[:8]}"
    runtime = {"portMappings": [{"hostPort": 8080 + int(version[0]), "containerPort": 80,
                                 "protocol": "tcp"}]}
    shaping = {"bandwidth": {"ingressRate": 8_000_000, "ingressBurst": 1_000_000}}
    plugins = [(NP_CNI, {k: v for k, v in node.conf(version).items()
                         if k not in ("cniVersion", "name")}),
               (REF_PLUGINS / "portmap", {"type": "portmap", "capabilities":
                                          {"portMappings": True}, "runtimeConfig": runtime}),
               (REF_PLUGINS / "bandwidth", {"type": "bandwidth", "capabilities":
                                            {"bandwidth": True}, "runtimeConfig": shaping})]
    prev = None
    for path, plugin in plugins:
        conf = {"cniVersion": version, "name": NET, **plugin}
        if prev is not None:
            conf["prevResult"] = prev
        rc, prev = node.run_plugin(path, "ADD", conf, cid, netns, pod=("x", "d"))
        assert rc == 0, prev
    v4, _ = ips_of(prev)
    qdisc = node.lab.run(node.lab.node_ns, ["tc", "qdisc", "show", "dev",
                                            host_ifname(cid, "eth0")]).stdout
    assert "tbf" in qdisc  # bandwidth shaped the pod's ingress on our host veth
    if version == "0.4.0":
        assert {i["version"] for i in prev["ips"]} == {"4", "6"}
    node.lab.serve(f"pm{version[0]}", "tcp", 80)
    _, _, client = node.add(f"pc{version[0]}", ("x", "b"))
    # through the node's port mapping (DNAT by portmap), then our forward chain
    assert node.lab.probe(f"pc{version[0]}", "169.254.1.1", "tcp", 8080 + int(version[0]))
    # CHECK np-cni against the chain's final result (portmap 1.1.1's own CHECK is broken on
    # dual-stack: it looks for its IPv4 rules in the IPv6 table)
    conf = {"cniVersion": version, "name": NET, **plugins[0][1], "prevResult": prev}
    rc, out = node.run_plugin(NP_CNI, "CHECK", conf, cid, netns, pod=("x", "d"))
    assert rc == 0, out
    for path, plugin in reversed(plugins):
        conf = {"cniVersion": version, "name": NET, **plugin, "prevResult": prev}
        rc, out = node.run_plugin(path, "DEL", conf, cid, netns, pod=("x", "d"))
        assert rc == 0, out
    node.assert_nothing_left(cid)
    assert not node.lab.probe(f"pc{version[0]}", "169.254.1.1", "tcp", 8080 + int(version[0]))


def test_del_is_idempotent_and_readd_works(node):
    cid, netns, res = node.add("del1", ("y", "a"))
    assert node.cni("DEL", cid, netns)[0] == 0
    assert node.cni("DEL", cid, netns)[0] == 0  # again: nothing to do, still success
    node.assert_nothing_left(cid)
    rc, res2 = node.cni("ADD", cid, netns, pod=("y", "a"))  # same container, added again
    assert rc == 0, res2
    node.lab.serve("del1", "tcp", 80)
    _, _, client = node.add("del1c", ("y", "b"))
    assert node.lab.probe("del1c", ips_of(res2)[0], "tcp", 80)
    node.lab.run(node.lab.node_ns, ["true"])
    subprocess.run(["ip", "netns", "del", netns], check=True)  # the sandbox is gone first
    rc, out = node.cni("DEL", cid, netns)
    assert rc == 0, out
    node.assert_nothing_left(cid)


def test_check_reports_drift(node):
    cid, netns, res = node.add("chk", ("y", "b"))
    conf = {**node.conf(), "prevResult": res}
    rc, out = node.cni("CHECK", cid, netns, conf=conf, pod=("y", "b"))
    assert rc == 0, out
    v4, _ = ips_of(res)
    node.lab.run(netns, ["ip", "addr", "del", f"{v4}/32", "dev", "eth0"])
    rc, out = node.cni("CHECK", cid, netns, conf=conf, pod=("y", "b"))
    assert rc != 0 and out["code"] == 100 and v4 in out["msg"], out
    node.lab.run(node.lab.node_ns, ["ip", "link", "del", host_ifname(cid, "eth0")])
    rc, out = node.cni("CHECK", cid, netns, conf=conf, pod=("y", "b"))
    assert rc != 0 and "host interface" in out["msg"]
    assert node.cni("DEL", cid, netns)[0] == 0
    node.assert_nothing_left(cid)


def test_status_and_gc(node):
    assert node.cni("STATUS")[0] == 0
    rc, out = node.cni("STATUS", conf={**node.conf(), "agentSocket": "/nonexistent.sock"})
    assert rc != 0 and out["code"] == 50
    rc, out = node.cni("STATUS", conf={**node.conf(), "cniVersion": "1.0.0"})
    assert rc != 0 and out["code"] == 1
    kept, _, _ = node.add("gc1", ("y", "c"))
    gone = [node.add(f"gc{i}", ("y", "d"))[0] for i in (2, 3)]
    valid = [{"containerID": kept, "ifname": "eth0"}]
    rc, out = node.cni("GC", conf={**node.conf(), "cni.dev/valid-attachments": valid})
    assert rc == 0, out
    for cid in gone:
        node.assert_nothing_left(cid)
    assert host_ifname(kept, "eth0") in node.host_links()
    assert kept in node.allocations().values()
    assert node.cni("DEL", kept, node.lab._bare["gc1"])[0] == 0


# ------------------------------------------------------------------ default deny, spoofing


def test_deny_all_pod_is_closed_from_its_first_packet(node):
    node.set_policies(DENY_X)
    _, _, res_b = node.add("fb", ("x", "b"))
    netns_c = node.lab.add_netns("fc")
    node.lab.start_daemon("fc")  # the prober is ready before ADD returns
    cid_c = f"fc-{uuid.uuid4().hex[:8]}"
    rc, res_c = node.cni("ADD", cid_c, netns_c, pod=("x", "c"))
    assert rc == 0, res_c
    c4, c6 = ips_of(res_c)
    b4, _ = ips_of(res_b)
    node.lab.serve("fc", "tcp", 80)
    node.lab.serve("fb", "tcp", 80)
    assert not node.lab.probe("fb", c4, "tcp", 80)       # ingress denied, first try
    assert not node.lab.probe("fc", b4, "tcp", 80)       # egress denied
    assert not node.lab.probe("fb", c6, "tcp", 80)
    assert node.lab.probe("node", c4, "tcp", 80)         # its own node (kubelet) reaches it
    assert f"{c4} comment \"x/c by x/deny-all\"" in node.nft()
    node.set_policies()
    assert node.lab.probe("fb", c4, "tcp", 80)


def test_unknown_pod_is_denied_until_its_pod_object_arrives(node):
    netns = node.lab.add_netns("ghost")
    cid = f"ghost-{uuid.uuid4().hex[:8]}"
    rc, res = node.cni("ADD", cid, netns, pod=("x", "ghost"))
    assert rc == 0, res
    g4, _ = ips_of(res)
    _, _, res_b = node.add("gb", ("x", "b"))
    node.lab.serve("ghost", "tcp", 80)
    assert not node.lab.probe("gb", g4, "tcp", 80)
    assert "x/ghost (Pod not known yet)" in node.nft()
    node.set_policies("""apiVersion: v1
kind: Pod
metadata: {name: ghost, namespace: x, uid: uid-x-ghost}
spec: {nodeName: node-1}""")
    assert node.lab.probe("gb", g4, "tcp", 80)
    node.set_policies()


RAW_SPOOF = r"""
import socket, struct, sys
src, dst, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
payload = b"spoofed"
udp = struct.pack("!HHHH", 40000, port, 8 + len(payload), 0) + payload
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                 socket.inet_aton(src), socket.inet_aton(dst))
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
s.sendto(ip + udp, (dst, 0))
"""


def test_anti_spoofing_drops_forged_sources(node):
    _, ns_a, res_a = node.add("sa", ("y", "a"))
    _, _, res_b = node.add("sb", ("y", "b"))
    a4, _ = ips_of(res_a)
    b4, _ = ips_of(res_b)
    node.lab.serve("sb", "udp", 5353)
    node.lab.seen("sb", clear=True)
    for src in (a4, "10.244.1.250", "192.0.2.7"):  # own address, a neighbour's, an outsider's
        node.lab.run(ns_a, [sys.executable, "-c", RAW_SPOOF, src, b4, "5353"])
    deadline = time.monotonic() + 2
    peers: set[str] = set()
    while time.monotonic() < deadline and a4 not in peers:
        peers = {s["peer"] for s in node.lab.seen("sb")}
        time.sleep(0.05)
    assert a4 in peers  # the raw socket works: the pod's own source goes through
    assert "10.244.1.250" not in peers and "192.0.2.7" not in peers
    assert "counter packets 2" in node.nft().split("chain antispoof-v4")[1].split("}")[0]


# ------------------------------------------------------------------ robustness


def test_twenty_concurrent_adds_and_dels(node):
    names = [f"cc{i}" for i in range(20)]
    nets = {n: node.lab.add_netns(n) for n in names}
    cids = {n: f"{n}-{uuid.uuid4().hex[:8]}" for n in names}

    def add(n: str) -> tuple[int, Any]:
        return node.cni("ADD", cids[n], nets[n], pod=("y", f"p{n[2:]}"))

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(add, names))
    assert all(rc == 0 for rc, _ in results), [r for r in results if r[0]]
    addrs = [ips_of(res)[0] for _, res in results]
    assert len(set(addrs)) == 20
    assert len({host_ifname(c, "eth0") for c in cids.values()} & set(node.host_links())) == 20
    table = node.nft()
    assert all(f'"{host_ifname(c, "eth0")}" . {a}' in table
               for c, a in zip(cids.values(), addrs, strict=True))
    node.lab.serve("cc0", "tcp", 80)
    assert node.lab.probe("cc19", addrs[0], "tcp", 80)

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda n: node.cni("DEL", cids[n], nets[n]), names))
    assert all(rc == 0 for rc, _ in results), results
    for cid in cids.values():
        node.assert_nothing_left(cid)


class SlowAgent:
    """A stand-in agent that answers ADD late, to make a DEL race an ADD in flight."""

    def __init__(self, path: str, delay: float) -> None:
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(path)
        self.server.listen()
        self.delay = delay
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                req = json.loads(conn.makefile().readline())
                if req["op"] == "add":
                    time.sleep(self.delay)
                conn.sendall(b'{"ok": true, "pending": false}\n')

    def close(self) -> None:
        self.server.close()


def test_del_racing_add_leaves_nothing(node):
    path = str(node.dir / "slow.sock")
    slow = SlowAgent(path, 1.5)
    try:
        netns = node.lab.add_netns("race")
        cid = f"race-{uuid.uuid4().hex[:8]}"
        conf = {**node.conf(), "agentSocket": path}
        with ThreadPoolExecutor(2) as pool:
            adding = pool.submit(node.cni, "ADD", cid, netns, conf, pod=("y", "c"))
            time.sleep(0.5)  # ADD is waiting for the agent, holding the container's lock
            deleting = pool.submit(node.cni, "DEL", cid, netns, conf)
            assert adding.result()[0] == 0 and deleting.result()[0] == 0
        node.assert_nothing_left(cid)
    finally:
        slow.close()


def test_add_failure_undoes_everything_and_names_the_step(node):
    netns = node.lab.add_netns("fail1")
    rc, out = node.cni("ADD", "fail1", netns,
                       conf={**node.conf(), "agentSocket": str(node.dir / "absent.sock")})
    assert rc != 0 and out["code"] == 11 and "step 'dataplane'" in out["msg"], out
    node.assert_nothing_left("fail1")
    netns2 = node.lab.add_netns("fail2")
    node.lab.run(netns2, ["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "x0"])
    rc, out = node.cni("ADD", "fail2", netns2)
    assert rc != 0 and "step 'veth'" in out["msg"], out
    node.assert_nothing_left("fail2")
