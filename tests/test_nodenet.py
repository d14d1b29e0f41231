"""np_agent.node.nodenet: Node parsing, the CNI conflist, routes to other nodes' pod CIDRs.

Unit tests need no root. The kernel test builds two network namespaces joined by a veth
("node" 10.0.0.1/24 + fc00::1/64, "node-2" 10.0.0.2/24 + fc00::2/64) and runs RouteManager
inside the node netns through tests/nodenet_helper.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from np_agent.node.nodenet import (
    ROUTE_PROTO,
    NodeInfo,
    conflist_for,
    desired_routes,
    parse_node,
    write_conflist,
)
from np_cni.spec import parse_conf
from np_lab import Lab

ROOT = Path(__file__).resolve().parent.parent
HELPER = Path(__file__).resolve().parent / "nodenet_helper.py"


def node_obj(name: str = "n1", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": name}, "spec": spec,
        "status": {"addresses": [
            {"type": "Hostname", "address": name},
            {"type": "InternalIP", "address": "172.18.0.2"},
            {"type": "ExternalIP", "address": "203.0.113.9"},
            {"type": "InternalIP", "address": "FC00:F853:CCD:E793::2"},
        ]},
    }


# ----------------------------------------------------------------------
# parse_node
# ----------------------------------------------------------------------


def test_parse_node_dual_stack() -> None:
    node = parse_node(node_obj(podCIDR="10.244.1.0/24",
                               podCIDRs=["10.244.1.0/24", "fd00:10:244:1::/64"]))
    assert node == NodeInfo("n1", ("10.244.1.0/24", "fd00:10:244:1::/64"),
                            ("172.18.0.2", "fc00:f853:ccd:e793::2"))


def test_parse_node_pod_cidr_fallback_and_unallocated() -> None:
    assert parse_node(node_obj(podCIDR="10.244.3.0/24")).pod_cidrs == ("10.244.3.0/24",)
    bare = parse_node({"metadata": {"name": "new"}})
    assert bare == NodeInfo("new", (), ())


@pytest.mark.parametrize(("obj", "message"), [
    (node_obj(podCIDRs=["10.244.1.0/24", "10.244.2.1/24"]),
     "Node n1: spec.podCIDRs[1]: invalid CIDR '10.244.2.1/24'"),
    (node_obj(podCIDR="banana"), "Node n1: spec.podCIDR: invalid CIDR 'banana'"),
    (node_obj(podCIDRs="10.244.1.0/24"), "Node n1: spec.podCIDRs: expected a list"),
    (node_obj(podCIDRs=[24]), "Node n1: spec.podCIDRs[0]: expected a CIDR string"),
    ({"metadata": {"name": "n2"}, "status": {"addresses": [
        {"type": "InternalIP", "address": "10.0.0.300"}]}},
     "Node n2: status.addresses[0].address: invalid InternalIP '10.0.0.300'"),
    ({"metadata": {"name": "n2"}, "status": {"addresses": {"x": 1}}},
     "Node n2: status.addresses: expected a list"),
    ({"metadata": {"name": "n2"}, "spec": []}, "Node n2: spec: expected a mapping"),
    ({"metadata": {}}, "Node ?: metadata.name: missing"),
])
def test_parse_node_errors_name_node_and_field(obj: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_node(obj)
    assert str(err.value).startswith(message)


# ----------------------------------------------------------------------
# conflist_for / write_conflist
# ----------------------------------------------------------------------


def test_conflist_matches_the_shipped_daemonset_file() -> None:
    node = NodeInfo("n1", ("10.244.1.0/24", "fd00:10:244:1::/64"), ("172.18.0.2",))
    conf = conflist_for(node, agent_socket="/run/np-nft/cni.sock",
                        endpoints_dir="/var/lib/np-nft/endpoints")
    shipped = json.loads((ROOT / "daemonset" / "10-np-nft.conflist").read_text())
    assert conf == shipped


def test_conflist_is_accepted_by_np_cni() -> None:
    node = NodeInfo("n1", ("10.244.7.0/24",), ())
    conf = conflist_for(node, agent_socket="/tmp/a.sock", endpoints_dir="/tmp/ep", mtu=1450,
                        cni_version="1.1.0")
    plugin = conf["plugins"][0]
    # What a runtime hands the plugin: its entry plus the list's name and version.
    net = parse_conf(json.dumps({**plugin, "name": conf["name"],
                                 "cniVersion": conf["cniVersion"]}).encode(), "ADD")
    assert (net.mtu, net.agent_socket, str(net.endpoints_dir)) == (1450, "/tmp/a.sock", "/tmp/ep")
    assert net.ipam == {"type": "host-local", "ranges": [[{"subnet": "10.244.7.0/24"}]]}
    assert conf["plugins"][1] == {"type": "portmap", "capabilities": {"portMappings": True}}


def test_conflist_refuses_node_without_pod_cidr_and_bad_mtu() -> None:
    with pytest.raises(ValueError, match="Node new: spec.podCIDRs: no pod CIDR"):
        conflist_for(NodeInfo("new", (), ()), agent_socket="s", endpoints_dir="e")
    with pytest.raises(ValueError, match="mtu 100"):
        conflist_for(NodeInfo("n", ("10.0.0.0/24",), ()), agent_socket="s", endpoints_dir="e",
                     mtu=100)


def _conf(cidr: str = "10.244.1.0/24") -> dict[str, Any]:
    return conflist_for(NodeInfo("n1", (cidr,), ()), agent_socket="/s", endpoints_dir="/e")


def test_write_conflist_creates_dir_and_writes_only_on_change(tmp_path: Path) -> None:
    conf_dir = tmp_path / "etc" / "cni" / "net.d"
    path = conf_dir / "10-np-nft.conflist"
    assert write_conflist(conf_dir, _conf()) is True
    assert json.loads(path.read_text()) == _conf()
    assert path.stat().st_mode & 0o777 == 0o644
    before = path.stat()

    assert write_conflist(conf_dir, _conf()) is False
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)

    assert write_conflist(conf_dir, _conf("10.244.9.0/24")) is True
    assert json.loads(path.read_text())["plugins"][0]["ipam"]["ranges"] == [
        [{"subnet": "10.244.9.0/24"}]]
    assert path.stat().st_ino != before.st_ino  # renamed into place, not rewritten in place
    assert sorted(p.name for p in conf_dir.iterdir()) == ["10-np-nft.conflist"]  # no temp


def test_write_conflist_compares_content_not_text(tmp_path: Path) -> None:
    path = tmp_path / "10-np-nft.conflist"
    path.write_text(json.dumps(_conf(), separators=(",", ":")))  # same JSON, other layout
    assert write_conflist(tmp_path, _conf()) is False
    path.write_text("{not json")  # garbage is replaced
    assert write_conflist(tmp_path, _conf()) is True
    assert json.loads(path.read_text()) == _conf()
    assert write_conflist(tmp_path, _conf(), filename="99-other.conflist") is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["10-np-nft.conflist",
                                                          "99-other.conflist"]


# ----------------------------------------------------------------------
# desired_routes
# ----------------------------------------------------------------------


def test_desired_routes_per_family() -> None:
    local = NodeInfo("n1", ("10.244.1.0/24", "fd00:10:244:1::/64"), ("10.0.0.1", "fc00::1"))
    nodes = [
        local,
        NodeInfo("n2", ("10.244.2.0/24", "fd00:10:244:2::/64"), ("10.0.0.2", "fc00::2")),
        NodeInfo("n3", ("10.244.3.0/24", "fd00:10:244:3::/64"), ("10.0.0.3",)),  # v4 IP only
        NodeInfo("n4", (), ("10.0.0.4",)),  # no podCIDR yet
        NodeInfo("n5", ("fd00:10:244:5::/64",), ("10.0.0.5", "fc00::5", "fc00::55")),
    ]
    assert desired_routes(local, nodes) == {
        "10.244.2.0/24": "10.0.0.2",
        "fd00:10:244:2::/64": "fc00::2",
        "10.244.3.0/24": "10.0.0.3",
        "fd00:10:244:5::/64": "fc00::5",
    }


def test_desired_routes_skips_overlap_with_us_and_duplicates() -> None:
    local = NodeInfo("n1", ("10.244.1.0/24",), ("10.0.0.1",))
    nodes = [
        NodeInfo("n3", ("10.244.2.0/24",), ("10.0.0.3",)),  # same CIDR as n2: n2 wins (name)
        NodeInfo("n2", ("10.244.2.0/24",), ("10.0.0.2",)),
        NodeInfo("n4", ("10.244.0.0/16",), ("10.0.0.4",)),  # covers our own range
    ]
    assert desired_routes(local, nodes) == {"10.244.2.0/24": "10.0.0.2"}
    assert desired_routes(local, []) == {}


# ----------------------------------------------------------------------
# RouteManager in a network namespace
# ----------------------------------------------------------------------


def _ip(lab: Lab, netns: str, *commands: str) -> None:
    for command in commands:
        lab.run(netns, ["ip", *command.split()])


def _steps(lab: Lab, steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run RouteManager steps inside the node netns, one process, one netlink socket."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT / "agent"), env.get("PYTHONPATH")) if p)
    proc = lab.run(lab.node_ns, [sys.executable, str(HELPER)], input=json.dumps(steps), env=env)
    return json.loads(proc.stdout)


def _routes(lab: Lab) -> str:
    return lab.run(lab.node_ns, ["ip", "route"]).stdout + lab.run(
        lab.node_ns, ["ip", "-6", "route"]).stdout


@pytest.mark.kernel
def test_route_manager_in_netns() -> None:
    if os.geteuid() != 0:
        pytest.fail("kernel tests need root: they build network namespaces")
    with Lab() as lab:
        peer = lab.add_netns("node-2")
        _ip(lab, lab.node_ns,
            f"link add eth1 type veth peer name eth1 netns {peer}",
            "addr add 10.0.0.1/24 dev eth1", "addr add fc00::1/64 dev eth1 nodad",
            "link set eth1 up",
            # foreign routes: one elsewhere, one on a destination we will be asked for
            "route add 192.168.50.0/24 via 10.0.0.2",
            "route add 10.244.9.0/24 via 10.0.0.2 proto static")
        _ip(lab, peer, "addr add 10.0.0.2/24 dev eth1", "addr add fc00::2/64 dev eth1 nodad",
            "link set eth1 up", "link set lo up")
        foreign = ["192.168.50.0/24 via 10.0.0.2 dev eth1",
                   "10.244.9.0/24 via 10.0.0.2 dev eth1 proto static"]

        desired = {"10.244.2.0/24": "10.0.0.2", "fd00:10:244:2::/64": "fc00::2",
                   "10.244.3.0/24": "10.9.9.9",   # no on-link route to the gateway
                   "10.244.4.0/24": "10.0.0.1",   # our own address
                   "10.244.5.0/24": "192.168.50.7",  # reached through a router, not on-link
                   "10.244.9.0/24": "10.0.0.2"}   # taken by the foreign static route
        first, again, moved, gone = _steps(lab, [
            {"sync": desired},
            {"sync": desired},
            {"sync": {**desired, "10.244.2.0/24": "10.0.0.3"}},  # gateway moved, still on-link
            {"sync": {"fd00:10:244:2::/64": "fc00::2"}},          # node 10.244.2.0/24 left
        ])
        assert first["added"] == ["10.244.2.0/24", "fd00:10:244:2::/64"]
        assert first["removed"] == []
        assert sorted(first["skipped"]) == ["10.244.3.0/24", "10.244.4.0/24", "10.244.5.0/24",
                                            "10.244.9.0/24"]
        assert "unreachable" in first["skipped"]["10.244.3.0/24"]
        assert "local address" in first["skipped"]["10.244.4.0/24"]
        assert "not on-link" in first["skipped"]["10.244.5.0/24"]
        assert "another owner" in first["skipped"]["10.244.9.0/24"]
        assert first["owned"] == {"10.244.2.0/24": "10.0.0.2", "fd00:10:244:2::/64": "fc00::2"}
        assert (again["added"], again["removed"]) == ([], [])  # idempotent, nothing sent
        assert moved["added"] == ["10.244.2.0/24"]
        assert moved["owned"]["10.244.2.0/24"] == "10.0.0.3"
        assert gone["removed"] == ["10.244.2.0/24"]
        assert gone["owned"] == {"fd00:10:244:2::/64": "fc00::2"}

        table = _routes(lab)
        assert f"fd00:10:244:2::/64 via fc00::2 dev eth1 proto {ROUTE_PROTO}" in table
        assert "10.244.2.0/24" not in table and "10.244.3.0/24" not in table
        assert "10.244.4.0/24" not in table and "10.244.5.0/24" not in table
        for line in foreign:
            assert line in table

        # In the shape `ip route` prints, then flush removes ours and only ours.
        _steps(lab, [{"sync": {"10.244.2.0/24": "10.0.0.2"}}])
        assert f"10.244.2.0/24 via 10.0.0.2 dev eth1 proto {ROUTE_PROTO}" in _routes(lab)
        (flushed,) = _steps(lab, [{"flush": True}])
        assert flushed == {"removed": ["10.244.2.0/24"], "owned": {}}
        table = _routes(lab)
        assert f"proto {ROUTE_PROTO}" not in table
        for line in foreign:
            assert line in table


def test_pyroute2_not_imported_by_module() -> None:
    """The module stays importable where pyroute2 is absent (CLI tools, unit tests)."""
    code = "import sys, np_agent.node.nodenet; print('pyroute2' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "agent")})
    assert out.stdout.strip() == "False"
