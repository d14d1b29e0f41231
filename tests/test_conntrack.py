"""Connections a policy change no longer allows are cut; the others keep working.

``ct state established,related accept`` comes before any policy, so without help a held TCP
connection, or a UDP flow reusing its source port, outlives the policy that allowed it. The
kernel tests show that first (the flows survive the new ruleset), then that
``conntrack.cut_disallowed`` in the node netns ends exactly those flows: the still-allowed
connections to another pod, connections from the node itself (never policed) and a flow
DNATed through a "service" address are judged as the forward hook judged them.

The codec tests (no root) check the netlink parsing and the delete request on hand-built
messages, NAT and ICMP included; a kernel test checks the parser against the conntrack CLI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from np_agent.node import conntrack
from np_lab import Lab

kernel = pytest.mark.kernel

ROOT = Path(__file__).resolve().parent.parent
HELPER = ROOT / "tests" / "ct_helper.py"
PODS = {"a": ("10.244.0.10", "fd00::10"), "b": ("10.244.0.11", "fd00::11"),
        "c": ("10.244.0.12", "fd00::12")}
SERVICE = ("10.96.0.10", 8080)  # DNATed to b:80 in the node netns, like a ClusterIP
SERVICE_NAT = f"""table ip svc {{
  chain pre {{
    type nat hook prerouting priority dstnat; policy accept;
    ip daddr {SERVICE[0]} tcp dport {SERVICE[1]} dnat to {PODS["b"][0]}:80
  }}
}}"""


def ip(pod: str, version: int = 4) -> str:
    return PODS[pod][0 if version == 4 else 1]


def cluster_yaml() -> str:
    docs = ["apiVersion: v1\nkind: Namespace\nmetadata: {name: x}"]
    for name, (v4, v6) in PODS.items():
        docs.append(f"""apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: x, labels: {{pod: {name}}}}}
spec: {{nodeName: node-1, containers: [{{name: c}}]}}
status: {{phase: Running, podIPs: [{{ip: {v4}}}, {{ip: "{v6}"}}]}}""")
    return "\n---\n".join(docs)


def allow_a(selector: str) -> str:
    """Pods matching ``selector`` accept pod a on TCP and UDP 80, nobody else."""
    return f"""apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: allow-a, namespace: x}}
spec:
  podSelector: {selector}
  ingress:
  - from: [{{podSelector: {{matchLabels: {{pod: a}}}}}}]
    ports: [{{protocol: TCP, port: 80}}, {{protocol: UDP, port: 80}}]"""


BEFORE = [allow_a("{matchExpressions: [{key: pod, operator: In, values: [b, c]}]}")]
AFTER = [allow_a("{matchLabels: {pod: c}}"),  # b no longer accepts a
         """apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-b, namespace: x}
spec: {podSelector: {matchLabels: {pod: b}}, policyTypes: [Ingress]}"""]


# ------------------------------------------------------------------ lab plumbing


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.fail("kernel tests need root: they build network namespaces")
    with Lab() as lab:
        for name, (v4, v6) in PODS.items():
            pod = lab.add_pod(name, v4, v6)
            if name != "a":
                lab.serve(pod, "tcp", 80)
                lab.serve(pod, "udp", 80)
        lab.run(lab.node_ns, ["nft", "-f", "-"], input=SERVICE_NAT)
        yield lab
    leftovers = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert lab.prefix not in leftovers


def helper(lab: Lab, netns: str, *args: str) -> object:
    """Run tests/ct_helper.py inside ``netns``; its one JSON line."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'agent'}{os.pathsep}{ROOT / 'tests'}"}
    proc = lab.run(netns, [sys.executable, str(HELPER), *args], env=env)
    return json.loads(proc.stdout)


def write_manifests(directory: Path, policies: list[str]) -> str:
    directory.mkdir(exist_ok=True)
    (directory / "cluster.yaml").write_text(cluster_yaml())
    (directory / "policies.yaml").write_text("\n---\n".join(policies))
    return str(directory)


def enforce(lab: Lab, tmp_path: Path, policies: list[str]) -> str:
    """Apply cluster + policies in the node netns; the manifest directory (for ``cut``)."""
    directory = write_manifests(tmp_path / f"m{len(list(tmp_path.iterdir()))}", policies)
    helper(lab, lab.node_ns, "apply", directory)
    return directory


def udp_flow(lab: Lab, version: int, sport: int) -> bool:
    """One datagram a -> b:80 from a fixed source port: every call is the same flow."""
    return helper(lab, lab.pod("a").netns, "udp", ip("a", version), str(sport),
                  ip("b", version), "80")["ok"]


def cli_flows(lab: Lab) -> set[tuple[int, str, str, int]]:
    """TCP/UDP entries per the conntrack CLI, as the forward hook saw them:
    (proto, original source, reply source = destination after DNAT, reply source port)."""
    out = set()
    for family in ("ipv4", "ipv6"):
        text = lab.run(lab.node_ns, ["conntrack", "-L", "-f", family]).stdout
        for line in text.splitlines():
            words = line.split()
            if not words or words[0] not in ("tcp", "udp"):
                continue
            kv: dict[str, list[str]] = {}
            for w in words:
                if "=" in w:
                    k, v = w.split("=", 1)
                    kv.setdefault(k, []).append(v)
            out.add((int(words[1]), kv["src"][0], kv["src"][1], int(kv["sport"][1])))
    return out


def flows_between(flows: set[tuple[int, str, str, int]], src: str, dst: str) -> set:
    return {f for f in flows if f[1] == src and f[2] == dst}


# ------------------------------------------------------------------ kernel tests


@kernel
def test_policy_change_cuts_exactly_the_flows_it_disallows(lab: Lab, tmp_path: Path):
    a = lab.pod("a")
    enforce(lab, tmp_path, BEFORE)
    holds = {"b4": ip("b", 4), "b6": ip("b", 6), "c4": ip("c", 4), "c6": ip("c", 6)}
    for hold_id, dst in holds.items():
        assert lab.connect_hold(a, dst, 80, hold_id), hold_id
    assert lab.connect_hold(a, SERVICE[0], SERVICE[1], "svc")  # DNATed to b:80
    assert lab.connect_hold("node", ip("b", 4), 80, "node-b")  # output path: never policed
    assert lab.connect_hold("node", ip("b", 6), 80, "node-b6")
    assert udp_flow(lab, 4, 40000) and udp_flow(lab, 6, 40001)

    after = enforce(lab, tmp_path, AFTER)
    assert not lab.probe(a, ip("b", 4), "tcp", 80)  # the new rules are in force...
    assert not lab.probe(a, ip("b", 6), "udp", 80)
    for hold_id in ("b4", "b6", "svc"):  # ...yet established flows survive them
        assert lab.hold_send(a, hold_id), f"{hold_id} should survive without a cut"
    assert udp_flow(lab, 4, 40000) and udp_flow(lab, 6, 40001)
    assert flows_between(cli_flows(lab), ip("a"), ip("b"))

    node_flows = {f for f in cli_flows(lab)
                  if f[2] in (ip("b", 4), ip("b", 6)) and f[1] not in PODS["a"]}
    assert len(node_flows) == 2  # node -> b over IPv4 and IPv6

    cut = helper(lab, lab.node_ns, "cut", after)["cut"]
    assert cut >= 5  # b4, b6, svc, two UDP flows (and closed probes still in TIME_WAIT)
    # Checked before anything is sent again: a cut TCP entry would be re-created by the next
    # packet (conntrack picks up mid-stream connections), which the output path never polices.
    flows = cli_flows(lab)
    assert node_flows <= flows

    for hold_id in ("b4", "b6", "svc"):
        assert not lab.hold_send(a, hold_id), f"{hold_id} should be cut"
    assert not udp_flow(lab, 4, 40000) and not udp_flow(lab, 6, 40001)
    for version in (4, 6):
        assert not flows_between(flows, ip("a", version), ip("b", version)), version
        assert flows_between(flows, ip("a", version), ip("c", version)), version
    for hold_id in ("c4", "c6"):  # still allowed: untouched
        assert lab.hold_send(a, hold_id), hold_id
    assert lab.hold_send("node", "node-b") and lab.hold_send("node", "node-b6")
    assert lab.probe(a, ip("c", 6), "tcp", 80)
    assert helper(lab, lab.node_ns, "cut", after)["cut"] == 0  # nothing left to cut


@kernel
def test_dump_parses_entries_as_the_conntrack_cli_shows_them(lab: Lab, tmp_path: Path):
    a = lab.pod("a")
    enforce(lab, tmp_path, BEFORE)
    assert lab.connect_hold(a, SERVICE[0], SERVICE[1], "svc2")
    assert lab.connect_hold(a, ip("c", 6), 80, "c6-2")
    assert lab.probe(a, ip("c", 4), "udp", 80)
    ours = {tuple(e) for e in helper(lab, lab.node_ns, "entries") if e[0] in (6, 17)}
    theirs = cli_flows(lab)
    assert ours == theirs
    assert (6, ip("a"), ip("b"), 80) in ours  # the DNATed flow, judged after DNAT


# ------------------------------------------------------------------ codec tests (no root)

NESTED = conntrack.NLA_F_NESTED


def _tuple(version: int, src: bytes, dst: bytes, proto: bytes) -> bytes:
    s, d = ((conntrack.CTA_IP_V4_SRC, conntrack.CTA_IP_V4_DST) if version == 4
            else (conntrack.CTA_IP_V6_SRC, conntrack.CTA_IP_V6_DST))
    addrs = conntrack.nla(s, src) + conntrack.nla(d, dst)
    return (conntrack.nla(conntrack.CTA_TUPLE_IP | NESTED, addrs)
            + conntrack.nla(conntrack.CTA_TUPLE_PROTO | NESTED, proto))


def _ports(proto: int, sport: int, dport: int) -> bytes:
    return (conntrack.nla(conntrack.CTA_PROTO_NUM, bytes([proto]))
            + conntrack.nla(conntrack.CTA_PROTO_SRC_PORT, sport.to_bytes(2, "big"))
            + conntrack.nla(conntrack.CTA_PROTO_DST_PORT, dport.to_bytes(2, "big")))


def _message(orig: bytes, reply: bytes, extra: bytes = b"") -> conntrack.Message:
    body = (conntrack._NFGEN.pack(2, 0, 0) + conntrack.nla(conntrack.CTA_TUPLE_ORIG | NESTED, orig)
            + conntrack.nla(conntrack.CTA_TUPLE_REPLY | NESTED, reply) + extra)
    return conntrack.Message(0x100, 0, 1, body, 0, len(body))


def _v4(text: str) -> bytes:
    return bytes(int(x) for x in text.split("."))


def test_parse_judges_a_dnat_flow_by_its_destination_after_dnat():
    orig = _tuple(4, _v4("10.244.0.10"), _v4("10.96.0.10"), _ports(6, 40000, 8080))
    reply = _tuple(4, _v4("10.244.0.11"), _v4("10.244.0.10"), _ports(6, 80, 40000))
    extra = (conntrack.nla(conntrack.CTA_ID, (1234).to_bytes(4, "big"))
             + conntrack.nla(conntrack.CTA_ZONE, (7).to_bytes(2, "big")))
    entry = conntrack.parse_entry(_message(orig, reply, extra), 4)
    assert entry is not None
    assert (entry.proto, entry.src, entry.dst, entry.dport) == (
        6, int.from_bytes(_v4("10.244.0.10"), "big"), int.from_bytes(_v4("10.244.0.11"), "big"),
        80)
    assert (entry.ct_id, entry.zone, entry.orig) == (1234, 7, orig)
    assert entry.describe() == "proto 6 10.244.0.10 -> 10.244.0.11 port 80"


def test_icmp_entries_have_no_port_and_keep_their_type():
    src, dst = bytes(15) + b"\x10", bytes(15) + b"\x11"
    icmp = (conntrack.nla(conntrack.CTA_PROTO_NUM, bytes([58]))
            + conntrack.nla(7, (99).to_bytes(2, "big"))  # CTA_PROTO_ICMPV6_ID
            + conntrack.nla(conntrack.CTA_PROTO_ICMPV6_TYPE, bytes([128]))
            + conntrack.nla(9, bytes([0])))  # CTA_PROTO_ICMPV6_CODE
    reply_icmp = icmp.replace(bytes([128]), bytes([129]))
    entry = conntrack.parse_entry(_message(_tuple(6, src, dst, icmp),
                                           _tuple(6, dst, src, reply_icmp)), 6)
    assert entry is not None
    assert (entry.proto, entry.dport, entry.icmp_type) == (58, 0, 128)


def test_delete_request_echoes_the_tuple_and_pins_id_and_zone():
    orig = _tuple(4, _v4("10.0.0.1"), _v4("10.0.0.2"), _ports(17, 1, 2))
    entry = conntrack.Entry(4, 17, 1, 2, 2, None, orig, ct_id=5, zone=3)
    nl = conntrack.NetlinkSocket.__new__(conntrack.NetlinkSocket)  # encoding needs no socket
    nl._seq = 41
    seq, data = conntrack.delete_request(nl, entry)
    length, mtype, flags, hdr_seq, _ = conntrack._HDR.unpack_from(data, 0)
    assert (seq, hdr_seq, length) == (42, 42, len(data))
    assert mtype == (conntrack.NFNL_SUBSYS_CTNETLINK << 8) | conntrack.IPCTNL_MSG_CT_DELETE
    assert flags == conntrack.NLM_F_REQUEST | conntrack.NLM_F_ACK
    start = conntrack._HDR.size + conntrack._NFGEN.size
    attrs = {t: data[s:e] for t, s, e in conntrack.attributes(data, start, len(data))}
    assert attrs == {conntrack.CTA_TUPLE_ORIG: orig, conntrack.CTA_ZONE: b"\x00\x03",
                     conntrack.CTA_ID: b"\x00\x00\x00\x05"}
    with pytest.raises(AssertionError):  # a delete without a tuple would flush everything
        conntrack.delete_request(nl, conntrack.Entry(4, 17, 1, 2, 2, None, b"", None, None))
