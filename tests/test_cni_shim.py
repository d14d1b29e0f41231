"""The host's np-cni: a static C shim that forwards CNI requests to np-agent's socket, where
np-cni's handler runs in-process (cni/shim/np-cni-shim.c, np_agent/cniserver.py).

Without root: the shim binary against a stand-in agent (framing, netns descriptor, errors
and the DEL spool when no agent answers), pending-DEL replay, install-cni. With root
(kernel): the shim executed as a runtime executes it, against `np-agent run` in a node netns
(tests/cni_helper.py), with real veths, IPAM and packets; agent stopped and restarted;
bad requests; uninstall-node in a netns of its own; a pod the watch has not delivered yet,
read from the fake API server on ADD.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from cni_helper import REF_PLUGINS, Node, ips_of
from conftest import ROOT, eventually
from np_agent.node.cniserver import _is_netns, _read_until, _receive_start
from np_agent.node.engine import NodeAgent
from np_agent.node.pending import PendingDels
from np_cni.link import host_ifname
from np_cni.shared.endpoints import EndpointStore
from np_cni.shared.shimproto import MAGIC, MAX_REQUEST, ShimRequest, encode_request, parse_request
from np_cni.spec import SUPPORTED_VERSIONS
from np_lab import Lab

SOURCE = ROOT / "cni" / "shim" / "np-cni-shim.c"
NP_AGENT = [sys.executable, "-m", "np_agent.cli"]
CONF = {"cniVersion": "0.4.0", "name": "np-test", "type": "np-cni",
        "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.9.0.0/24"}]]}}


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shim built with plain gcc, warnings as errors."""
    out = tmp_path_factory.mktemp("shim") / "np-cni"
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out), str(SOURCE)],
                   check=True)
    return out


def run_shim(shim: Path, environ: dict[str, str], stdin: bytes,
             timeout: float = 30) -> tuple[int, bytes, float]:
    """Execute the shim with exactly this environment; (exit code, stdout, seconds)."""
    t0 = time.monotonic()
    proc = subprocess.run([str(shim)], input=stdin, env=environ, capture_output=True,
                          timeout=timeout)
    return proc.returncode, proc.stdout, time.monotonic() - t0


def cni_env(tmp_path: Path, command: str, **extra: str) -> dict[str, str]:
    """A runtime's environment for the shim, pointed at the test's socket and spool."""
    return {"CNI_COMMAND": command, "CNI_CONTAINERID": "c0ffee", "CNI_IFNAME": "eth0",
            "CNI_PATH": "/opt/cni/bin", "CNI_ARGS": "K8S_POD_NAMESPACE=x;K8S_POD_NAME=a",
            "NP_NFT_CNI_SOCKET": str(tmp_path / "agent.sock"),
            "NP_NFT_PENDING_DIR": str(tmp_path / "pending"), **extra}


class StandIn:
    """A stand-in agent on a unix socket: records each request (bytes, whether a netns
    descriptor came with it) and answers ``answer``, or holds the connection open (None),
    or closes it without a word (b"")."""

    def __init__(self, path: Path, answer: bytes | None) -> None:
        self.answer = answer
        self.requests: list[tuple[bytes, list[bool]]] = []
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(path))
        self.server.listen()
        self.done = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                data, fds = _receive_start(conn)
                kinds = [_is_netns(fd) for fd in fds]
                for fd in fds:
                    os.close(fd)
                self.requests.append((_read_until(conn, data, MAX_REQUEST, None), kinds))
                if self.answer is None:
                    self.done.wait(30)
                else:
                    conn.sendall(self.answer)

    def close(self) -> None:
        self.done.set()
        self.server.close()


# ------------------------------------------------------------------ the binary alone


def test_version_is_answered_without_agent(shim: Path, tmp_path: Path) -> None:
    rc, out, _ = run_shim(shim, cni_env(tmp_path, "VERSION"), b'{"cniVersion": "1.0.0"}')
    assert rc == 0
    assert json.loads(out) == {"cniVersion": "1.0.0",
                               "supportedVersions": list(SUPPORTED_VERSIONS)}
    rc, out, _ = run_shim(shim, {"CNI_COMMAND": "VERSION"}, b"")
    assert rc == 0 and json.loads(out)["cniVersion"] == "1.1.0"


def test_request_framing_netns_descriptor_and_answer(shim: Path, tmp_path: Path) -> None:
    answer = {"cniVersion": "0.4.0", "ips": [{"address": "10.9.0.2/32"}]}
    agent = StandIn(tmp_path / "agent.sock", b"0\n" + json.dumps(answer).encode())
    try:
        big = {**CONF, "padding": "x" * 300_000}  # far beyond one socket buffer
        stdin = json.dumps(big).encode()
        env = cni_env(tmp_path, "ADD", CNI_NETNS="/proc/self/ns/net")
        rc, out, _ = run_shim(shim, env, stdin)
        assert rc == 0 and json.loads(out) == answer
        data, fds = agent.requests[-1]
        assert fds == [True]  # one descriptor, and it is a network namespace
        req = parse_request(data)
        assert req.stdin == stdin
        assert req.environ == {k: v for k, v in env.items() if k.startswith("CNI_")}
        assert data.startswith(MAGIC + b"CNI_COMMAND=ADD\n")

        agent.answer = b'7\n{"code": 7}\n'  # the plugin's exit code and stdout, verbatim
        rc, out, _ = run_shim(shim, cni_env(tmp_path, "DEL"), b"{}")
        assert rc == 7 and out == b'{"code": 7}\n'
        assert agent.requests[-1][1] == []  # no CNI_NETNS: no descriptor
    finally:
        agent.close()


def test_agent_unreachable_gives_cni_errors_and_leaves_nothing(shim: Path,
                                                              tmp_path: Path) -> None:
    stdin = json.dumps(CONF).encode()
    sock = tmp_path / "agent.sock"
    for command, code in (("ADD", 11), ("CHECK", 11), ("GC", 11), ("STATUS", 50)):
        rc, out, _ = run_shim(shim, cni_env(tmp_path, command, CNI_NETNS="/proc/self/ns/net"),
                              stdin)
        err = json.loads(out)
        assert rc == 1 and err["code"] == code and str(sock) in err["msg"], (command, err)
        assert err["cniVersion"] == "0.4.0"  # the version the config asked for
    assert not (tmp_path / "pending").exists()

    refused = socket.socket(socket.AF_UNIX)  # a stale socket: bound, nobody listening
    refused.bind(str(sock))
    rc, out, _ = run_shim(shim, cni_env(tmp_path, "ADD"), stdin)
    assert rc == 1 and "refused" in json.loads(out)["msg"]
    refused.close()
    sock.unlink()

    for answer, why in ((None, "no answer in time"), (b"", "without an answer"),
                        (b"garbage", "unreadable answer")):
        agent = StandIn(sock, answer)
        try:
            env = cni_env(tmp_path, "ADD", NP_NFT_CNI_TIMEOUT="1")
            rc, out, took = run_shim(shim, env, stdin)
            err = json.loads(out)
            assert rc == 1 and err["code"] == 11 and why in err["msg"], err
            assert took < 5
        finally:
            agent.close()
            sock.unlink()


def test_del_without_agent_succeeds_and_is_spooled(shim: Path, tmp_path: Path) -> None:
    stdin = json.dumps(CONF).encode()
    env = cni_env(tmp_path, "DEL", CNI_CONTAINERID="abc.1-2_3", CNI_NETNS="/proc/self/ns/net")
    rc, out, _ = run_shim(shim, env, stdin)
    assert rc == 0 and out == b""
    spooled = tmp_path / "pending" / "abc.1-2_3_eth0"
    req = parse_request(spooled.read_bytes())
    assert req.stdin == stdin and req.command == "DEL"
    assert req.environ["CNI_CONTAINERID"] == "abc.1-2_3"
    assert [p.name for p in spooled.parent.iterdir()] == [spooled.name]  # no temp file
    assert stat.S_IMODE(spooled.stat().st_mode) == 0o600

    # Also when the agent is there but never answers.
    agent = StandIn(tmp_path / "agent.sock", None)
    try:
        env = cni_env(tmp_path, "DEL", CNI_CONTAINERID="slow", NP_NFT_CNI_TIMEOUT="1")
        assert run_shim(shim, env, stdin)[:2] == (0, b"")
        assert (tmp_path / "pending" / "slow_eth0").exists()
    finally:
        agent.close()

    # An id that cannot be a file name is not spooled: DEL fails, so the runtime retries.
    for bad in ("../x", "", ".hidden", "a/b"):
        rc, out, _ = run_shim(shim, cni_env(tmp_path, "DEL", CNI_CONTAINERID=bad), stdin)
        assert rc == 1 and json.loads(out)["code"] == 11
    assert sorted(p.name for p in (tmp_path / "pending").iterdir()) == [
        "abc.1-2_3_eth0", "slow_eth0"]
    assert not (tmp_path / "x").exists()


def test_shim_builds_static_with_musl(tmp_path: Path) -> None:
    out = tmp_path / "np-cni"
    subprocess.run(["musl-gcc", "-static", "-Os", "-Wall", "-Wextra", "-Werror", "-o", str(out),
                    str(SOURCE)], check=True)
    headers = subprocess.run(["readelf", "-lW", str(out)], capture_output=True, text=True,
                             check=True).stdout
    assert "INTERP" not in headers and "DYNAMIC" not in headers  # runs on any host
    rc, stdout, _ = run_shim(out, {"CNI_COMMAND": "VERSION"}, b"{}")
    assert rc == 0 and json.loads(stdout)["supportedVersions"] == list(SUPPORTED_VERSIONS)


# ------------------------------------------------------------------ agent side, no kernel


def spool(directory: Path, cid: str, command: str = "DEL", stdin: bytes = b"{}") -> Path:
    """A spool file as the shim writes it."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{cid}_eth0"
    path.write_bytes(encode_request({"CNI_COMMAND": command, "CNI_CONTAINERID": cid,
                                     "CNI_IFNAME": "eth0"}, stdin))
    return path


def test_pending_replay_removes_done_keeps_retryable_sets_aside_broken(tmp_path: Path) -> None:
    seen: list[ShimRequest] = []
    outcomes = {"ok": (0, ""), "retry": (1, '{"code": 11, "msg": "busy"}'),
                "invalid": (1, '{"code": 7, "msg": "bad config"}')}

    def run(req: ShimRequest) -> tuple[int, str]:
        seen.append(req)
        cid = req.environ["CNI_CONTAINERID"]
        if cid == "boom":
            raise RuntimeError("handler crashed")
        return outcomes[cid]

    d = tmp_path / "pending"
    done, retry, invalid, boom = (spool(d, c) for c in ("ok", "retry", "invalid", "boom"))
    add = spool(d, "add", command="ADD")
    (d / "junk_eth0").write_bytes(b"\x00not a request")
    (d / ".tmp-half_eth0.123").write_bytes(b"NPCNI/1\n")  # a shim still writing: not read
    misnamed = d / "other_eth0"
    misnamed.write_bytes(done.read_bytes())  # a DEL of "ok" under another name
    pending = PendingDels(d, run)
    assert pending.replay() == 1
    assert {r.environ["CNI_CONTAINERID"] for r in seen} == {"ok", "retry", "invalid", "boom"}
    assert not done.exists() and retry.exists()
    assert sorted(p.name for p in (d / "broken").iterdir()) == sorted(
        p.name for p in (invalid, boom, add, misnamed, d / "junk_eth0"))
    assert (d / ".tmp-half_eth0.123").exists()
    assert PendingDels(tmp_path / "absent", run).replay() == 0


def raw_pod(rv: int, labels: dict[str, str], uid: str = "u1") -> dict[str, Any]:
    """Pod x/web as the API server sends it, at resourceVersion ``rv``."""
    return {"metadata": {"name": "web", "namespace": "x", "uid": uid, "labels": labels,
                         "resourceVersion": str(rv)},
            "spec": {"nodeName": "node-1"}, "status": {"podIPs": [{"ip": "10.1.0.5"}]}}


class NoKernel:
    """A dataplane for an agent that must not touch the kernel (it has no methods)."""


def test_pod_read_on_add_is_not_regressed_by_older_watch_events(tmp_path: Path) -> None:
    # Never started, never syncs: the test reads the state the next sync would apply.
    agent = NodeAgent("node-1", EndpointStore(tmp_path / "ep"),
                      dataplane=NoKernel())  # type: ignore[arg-type]
    agent.replace("namespaces", [[{"metadata": {"name": "x"}}]])  # one page
    agent.replace("pods", [])  # no page at all
    agent.replace("networkpolicies", [[]])  # one empty page

    def labels() -> dict[str, str] | None:
        pod = agent.compiler.state.pods.get("x/web")
        return None if pod is None else dict(pod.labels)

    assert not agent.learn_pod(raw_pod(10, {"app": "web"}, uid="u2"), "u1")  # another pod
    assert labels() is None
    assert agent.learn_pod(raw_pod(10, {"app": "web"}), "u1")
    agent.event("pods", "ADDED", raw_pod(8, {"app": "old"}))  # the watch, behind
    agent.event("pods", "DELETED", raw_pod(9, {}, uid="u0"))  # its predecessor going
    assert labels() == {"app": "web"}
    agent.event("pods", "MODIFIED", raw_pod(10, {"app": "web"}))  # caught up
    agent.event("pods", "MODIFIED", raw_pod(12, {"app": "new"}))
    assert labels() == {"app": "new"}
    agent.event("pods", "MODIFIED", raw_pod(11, {"app": "older"}))  # no guard any more
    assert labels() == {"app": "older"}
    assert agent.learn_pod(raw_pod(13, {"app": "known"}), "u1")  # known: the watch rules
    assert labels() == {"app": "older"}


def test_conflist_is_written_only_once_the_agent_is_ready(tmp_path: Path) -> None:
    from np_agent.run import NodeNetwork

    nodes = NodeNetwork("node-1", tmp_path / "net.d", None, "/run/np-nft/cni.sock",
                        "/var/lib/np-nft/endpoints", 1500)
    nodes.replace("nodes", [[{"metadata": {"name": "node-1"},
                              "spec": {"podCIDRs": ["10.244.3.0/24"]}}]])
    assert not (tmp_path / "net.d" / "10-np-nft.conflist").exists()  # not ready: no ADDs yet
    nodes.agent_ready()
    conf = json.loads((tmp_path / "net.d" / "10-np-nft.conflist").read_text())
    assert conf["plugins"][0]["ipam"]["ranges"] == [[{"subnet": "10.244.3.0/24"}]]


# ------------------------------------------------------------------ install-cni


def install(*args: str) -> subprocess.CompletedProcess:
    """`np-agent install-cni ARGS` as the init container runs it."""
    return subprocess.run([*NP_AGENT, "install-cni", *args], capture_output=True, text=True)


def test_install_cni_is_atomic_and_copies_only_missing_plugins(shim: Path,
                                                               tmp_path: Path) -> None:
    bin_dir, state = tmp_path / "bin", tmp_path / "state"
    bin_dir.mkdir()
    (bin_dir / "portmap").write_bytes(b"#!/bin/sh\n# the host's own portmap\n")
    args = ["--bin-dir", str(bin_dir), "--shim", str(shim), "--plugins-from", str(REF_PLUGINS),
            "--plugins", "host-local,portmap,loopback", "--state-dir", str(state)]
    proc = install(*args)
    assert proc.returncode == 0, proc.stderr
    assert f"installed {shim} as {bin_dir / 'np-cni'}" in proc.stdout
    assert f"kept {bin_dir / 'portmap'} (the host's own)" in proc.stdout
    assert (bin_dir / "np-cni").read_bytes() == shim.read_bytes()
    assert stat.S_IMODE((bin_dir / "np-cni").stat().st_mode) == 0o755
    for name in ("host-local", "loopback"):
        assert (bin_dir / name).read_bytes() == (REF_PLUGINS / name).read_bytes()
        assert os.access(bin_dir / name, os.X_OK)
    assert b"host's own" in (bin_dir / "portmap").read_bytes()
    assert sorted(json.loads((state / "installed-cni.json").read_text())["plugins"]) == [
        "host-local", "loopback"]

    # A runtime executing np-cni while it is reinstalled sees a whole binary every time
    # (an in-place copy would give ETXTBSY or a truncated file).
    stop, results = threading.Event(), []

    def execute() -> None:
        while not stop.is_set():
            p = subprocess.run([str(bin_dir / "np-cni")], input=b"{}", capture_output=True,
                               env={"CNI_COMMAND": "VERSION"})
            results.append((p.returncode, p.stdout))

    runner = threading.Thread(target=execute)
    runner.start()
    try:
        for _ in range(8):
            proc = install(*args)
            assert proc.returncode == 0, proc.stderr
            assert "(installed by np-nft earlier)" in proc.stdout
    finally:
        stop.set()
        runner.join()
    assert len(results) > 5
    assert all(rc == 0 and json.loads(out)["supportedVersions"] for rc, out in results)
    assert sorted(p.name for p in bin_dir.iterdir()) == ["host-local", "loopback", "np-cni",
                                                          "portmap"]  # no temp files left

    proc = install("--bin-dir", str(bin_dir), "--shim", str(tmp_path / "missing"))
    assert proc.returncode == 1 and "missing not found" in proc.stderr
    proc = install("--bin-dir", str(bin_dir), "--shim", str(REF_PLUGINS / "loopback"))
    assert proc.returncode == 1 and "not the np-nft CNI shim" in proc.stderr


# ------------------------------------------------------------------ with the agent (kernel)


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    """A node netns with `np-agent run`, for the whole module; nothing left afterwards."""
    if os.geteuid() != 0:
        pytest.fail("kernel tests need root: they build network namespaces")
    with Lab() as lab:
        yield Node(lab)
        prefix = lab.prefix
    assert prefix not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                        text=True).stdout


def via_shim(node: Node, shim: Path, command: str, cid: str = "", netns: str = "",
             conf: dict | None = None, **kw: Any) -> tuple[int, Any]:
    """Execute the shim in the node netns exactly as a runtime would (env + stdin)."""
    extra = {"NP_NFT_CNI_SOCKET": node.socket, "NP_NFT_PENDING_DIR": str(node.pending),
             **kw.pop("env_extra", {})}
    return node.run_plugin(shim, command, conf or node.conf(), cid, netns, env_extra=extra,
                           **kw)


def shim_add(node: Node, shim: Path, name: str, pod: tuple[str, str],
             **kw: Any) -> tuple[str, str, dict]:
    """A new pod netns wired through the shim: (container id, netns, ADD result)."""
    netns = node.lab.add_netns(name)
    cid = f"{name}-{uuid.uuid4().hex[:12]}"
    rc, result = via_shim(node, shim, "ADD", cid, netns, pod=pod, **kw)
    assert rc == 0, result
    return cid, netns, result


def hidden_netns(node: Node, netns: str) -> tuple[str, list[str]]:
    """A CNI_NETNS path only the shim's own mount namespace has (as with an agent in a
    container): a tmpfs over an empty directory, the pod's netns bind-mounted in it."""
    hidden = node.dir / f"hidden-{netns[-6:]}"
    hidden.mkdir(exist_ok=True)
    script = ('mount -t tmpfs np-test "$1" && touch "$1/ns" && mount --bind "$2" "$1/ns" && '
              'shift 2 && exec "$@"')
    wrap = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
            str(hidden), f"/run/netns/{netns}"]
    return str(hidden / "ns"), wrap


@pytest.mark.kernel
def test_add_check_del_through_the_shim_with_real_traffic(node: Node, shim: Path) -> None:
    netns_a = node.lab.add_netns("sa")
    path_a, wrap = hidden_netns(node, netns_a)
    assert not Path(path_a).exists()  # the agent cannot open what the runtime names
    cid_a = f"sa-{uuid.uuid4().hex[:12]}"
    rc, res_a = via_shim(node, shim, "ADD", cid_a, netns_a, pod=("x", "a"), wrap=wrap,
                         env_extra={"CNI_NETNS": path_a})
    assert rc == 0, res_a
    assert res_a["cniVersion"] == "1.1.0"
    assert res_a["interfaces"][0]["name"] == host_ifname(cid_a, "eth0")
    assert res_a["interfaces"][1]["sandbox"] == path_a  # the runtime's name, not /proc/...
    a4, a6 = ips_of(res_a)
    assert f"{a4}/32" in node.lab.run(netns_a, ["ip", "addr", "show", "eth0"]).stdout
    record = json.loads((node.endpoints / f"{cid_a}_eth0.json").read_text())
    assert record["netns"] == path_a and record["ips"] == [a4, a6]

    cid_b, netns_b, res_b = shim_add(node, shim, "sb", ("x", "b"))
    b4, b6 = ips_of(res_b)
    node.lab.serve("sa", "tcp", 80)
    node.lab.serve("sb", "tcp", 80)
    assert node.lab.probe("sb", a4, "tcp", 80) and node.lab.probe("sb", a6, "tcp", 80)
    assert node.lab.probe("sa", b4, "tcp", 80)
    assert f'"{host_ifname(cid_a, "eth0")}" . {a4}' in node.nft()

    rc, out = via_shim(node, shim, "CHECK", cid_b, netns_b, pod=("x", "b"),
                       conf={**node.conf(), "prevResult": res_b})
    assert rc == 0, out
    assert via_shim(node, shim, "STATUS")[0] == 0
    rc, out = via_shim(node, shim, "ADD", cid_b, netns_b, pod=("x", "b"))
    assert rc == 1 and out["code"] == 101  # np-cni's own errors come through unchanged

    for cid, netns in ((cid_a, netns_a), (cid_b, netns_b)):
        rc, out = via_shim(node, shim, "DEL", cid, netns)
        assert (rc, out) == (0, None)
        node.assert_nothing_left(cid)
    assert not list(node.pending.glob("*"))  # delivered, not spooled


@pytest.mark.kernel
def test_agent_down_add_fails_clean_del_is_replayed_at_restart(node: Node,
                                                               shim: Path) -> None:
    cid_gone, netns_gone, res = shim_add(node, shim, "dn1", ("y", "a"))
    v4, _ = ips_of(res)
    assert cid_gone in node.allocations().values()
    node.stop_agent()
    try:
        rc, out = via_shim(node, shim, "DEL", cid_gone, netns_gone)
        assert (rc, out) == (0, None)
        assert (node.pending / f"{cid_gone}_eth0").exists()
        assert cid_gone in node.allocations().values()  # released only by the agent

        netns_new = node.lab.add_netns("dn2")
        cid_new = f"dn2-{uuid.uuid4().hex[:8]}"
        rc, out = via_shim(node, shim, "ADD", cid_new, netns_new, pod=("y", "b"))
        assert rc == 1 and out["code"] == 11 and node.socket in out["msg"], out
        assert host_ifname(cid_new, "eth0") not in node.host_links()
        assert cid_new not in node.allocations().values()
        assert not (node.endpoints / f"{cid_new}_eth0.json").exists()
        links = node.lab.run(netns_new, ["ip", "-o", "link"]).stdout.splitlines()
        assert [line.split(":")[1].strip() for line in links] == ["lo"]  # no eth0 either
        rc, out = via_shim(node, shim, "STATUS")
        assert rc == 1 and out["code"] == 50
        (node.pending / "junk_eth0").write_bytes(b"not a request")
    finally:
        node.start_agent()
    # Replayed before the agent served anything (STATUS answered: it serves).
    assert not (node.pending / f"{cid_gone}_eth0").exists()
    assert (node.pending / "broken" / "junk_eth0").exists()
    node.assert_nothing_left(cid_gone)
    assert v4 not in node.allocations()
    assert node.agent.poll() is None


@pytest.mark.kernel
def test_del_spooled_while_the_agent_runs_is_replayed_by_the_next_request(node: Node,
                                                                           shim: Path) -> None:
    cid, netns, _ = shim_add(node, shim, "sp1", ("y", "d"))
    # The socket was away for a moment (the agent restarting): the DEL went to the spool.
    rc, out = via_shim(node, shim, "DEL", cid, netns,
                       env_extra={"NP_NFT_CNI_SOCKET": str(node.dir / "away.sock")})
    assert (rc, out) == (0, None) and (node.pending / f"{cid}_eth0").exists()
    assert cid in node.allocations().values()
    assert via_shim(node, shim, "STATUS")[0] == 0  # any request replays the spool first
    assert not (node.pending / f"{cid}_eth0").exists()
    node.assert_nothing_left(cid)


@pytest.mark.kernel
def test_twenty_concurrent_adds_and_dels_through_the_shim(node: Node, shim: Path) -> None:
    names = [f"sc{i}" for i in range(20)]
    nets = {n: node.lab.add_netns(n) for n in names}
    cids = {n: f"{n}-{uuid.uuid4().hex[:8]}" for n in names}

    def add(n: str) -> tuple[int, Any]:
        return via_shim(node, shim, "ADD", cids[n], nets[n], pod=("y", f"p{n[2:]}"))

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(add, names))
    assert all(rc == 0 for rc, _ in results), [r for r in results if r[0]]
    addrs = [ips_of(res)[0] for _, res in results]
    assert len(set(addrs)) == 20
    table = node.nft()
    assert all(f'"{host_ifname(c, "eth0")}" . {a}' in table
               for c, a in zip(cids.values(), addrs, strict=True))
    node.lab.serve("sc0", "tcp", 80)
    assert node.lab.probe("sc19", addrs[0], "tcp", 80)

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda n: via_shim(node, shim, "DEL", cids[n], nets[n]), names))
    assert all(rc == 0 for rc, _ in results), results
    for cid in cids.values():
        node.assert_nothing_left(cid)
    assert not list(node.pending.glob("*_eth0"))


def raw_exchange(path: str, payload: bytes, fds: list[int] | None = None) -> bytes:
    """Send raw bytes (the first one with ``fds``) to the agent's socket; all it answers."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(path)
        if fds:
            socket.send_fds(s, [payload[:1]], fds)
            payload = payload[1:]
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def shim_error(answer: bytes) -> dict[str, Any]:
    """The CNI error of a shim-protocol answer, which must say exit code 1."""
    code, _, out = answer.partition(b"\n")
    assert code == b"1", answer
    return json.loads(out)


@pytest.mark.kernel
def test_bad_requests_do_not_crash_the_agent(node: Node, shim: Path) -> None:
    sock = node.socket
    assert json.loads(raw_exchange(sock, b"garbage\n"))["ok"] is False
    assert json.loads(raw_exchange(sock, b'{"op": "nope"}\n'))["ok"] is False
    err = shim_error(raw_exchange(sock, MAGIC + b"CNI_COMMAND=ADD\n"))  # header never ends
    assert err["code"] == 4 and "malformed" in err["msg"]
    err = shim_error(raw_exchange(sock, MAGIC + b"no equals sign\n\n{}"))
    assert err["code"] == 4
    err = shim_error(raw_exchange(sock, MAGIC + b"CNI_COMMAND=\xff\n\n{}"))
    assert err["code"] == 4
    err = shim_error(raw_exchange(sock, MAGIC + b"\n{not json"))  # no CNI_COMMAND
    assert err["code"] == 4 and "CNI_COMMAND" in err["msg"]
    err = shim_error(raw_exchange(sock, MAGIC + b"X" * 100_000))
    assert err["code"] == 4
    with open("/etc/hostname", "rb") as f:  # a descriptor that is not a network namespace
        request = encode_request({"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "bad1",
                                  "CNI_IFNAME": "eth0", "CNI_NETNS": "/x", "CNI_PATH": "/x"},
                                 json.dumps(node.conf()).encode())
        err = shim_error(raw_exchange(sock, request, fds=[f.fileno(), f.fileno()]))
    assert err["code"] == 4 and "not a network namespace" in err["msg"]
    for partial in (b"", b"NPC", MAGIC[:-1]):
        raw_exchange(sock, partial)
    with socket.socket(socket.AF_UNIX) as s:  # a client that goes away mid-request
        s.connect(sock)
        s.sendall(MAGIC + b"CNI_COMMAND=ADD\n")
    assert node.agent.poll() is None
    fds = os.listdir(f"/proc/{node.agent.pid}/fd")
    targets = []
    for fd in fds:
        try:
            targets.append(os.readlink(f"/proc/{node.agent.pid}/fd/{fd}"))
        except OSError:
            continue
    assert "/etc/hostname" not in targets  # the descriptors that came along were closed
    assert via_shim(node, shim, "STATUS")[0] == 0
    cid, netns, _ = shim_add(node, shim, "bad2", ("y", "c"))
    assert via_shim(node, shim, "DEL", cid, netns)[0] == 0
    node.assert_nothing_left(cid)
    node.assert_nothing_left("bad1")


# ------------------------------------------------------------------ uninstall-node


@pytest.mark.kernel
def test_uninstall_node_removes_np_nft_and_nothing_else(shim: Path, tmp_path: Path) -> None:
    from np_agent.node.nodenet import NodeInfo, conflist_for, write_conflist

    conf_dir, bin_dir = tmp_path / "net.d", tmp_path / "bin"
    run_dir, state = tmp_path / "run-np-nft", tmp_path / "state-np-nft"
    with Lab() as lab:
        ns = lab.node_ns
        (tmp_path / "m.yaml").write_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: x}")
        lab.run(ns, [*NP_AGENT, "apply", "--manifests", str(tmp_path / "m.yaml")])
        lab.run(ns, ["ip", "link", "add", "uplink", "type", "veth", "peer", "name", "peer"])
        lab.run(ns, ["ip", "addr", "add", "10.123.0.1/24", "dev", "uplink"])
        lab.run(ns, ["ip", "link", "set", "uplink", "up"])
        lab.run(ns, ["ip", "link", "set", "peer", "up"])
        lab.run(ns, ["ip", "route", "add", "10.124.0.0/24", "via", "10.123.0.2", "proto", "201"])
        lab.run(ns, ["ip", "route", "add", "10.125.0.0/24", "via", "10.123.0.2"])
        write_conflist(conf_dir, conflist_for(NodeInfo("n", ("10.244.0.0/24",), ()),
                                              agent_socket="/x", endpoints_dir="/y"))
        (conf_dir / "05-other.conflist").write_text('{"name": "other", "plugins": []}')
        bin_dir.mkdir()
        (bin_dir / "portmap").write_text("#!/bin/sh\n")  # the host's own
        assert install("--bin-dir", str(bin_dir), "--shim", str(shim), "--plugins",
                       "host-local,portmap", "--state-dir", str(state)).returncode == 0
        run_dir.mkdir()
        (run_dir / "cni.sock").touch()
        (state / "endpoints" / ".locks").mkdir(parents=True)
        (state / "endpoints" / "c_eth0.json").write_text("{}")
        spool(state / "pending-del", "c")

        args = [*NP_AGENT, "uninstall-node", "--cni-conf-dir", str(conf_dir), "--bin-dir",
                str(bin_dir), "--run-dir", str(run_dir), "--state-dir", str(state)]
        out = lab.run(ns, args).stdout
        assert "removed table inet np-nft" in out and "10.124.0.0/24" in out
        assert "np-nft" not in lab.run(ns, ["nft", "list", "tables"]).stdout
        assert lab.run(ns, ["ip", "route", "show", "proto", "201"]).stdout == ""
        assert "10.125.0.0/24" in lab.run(ns, ["ip", "route"]).stdout  # not ours: kept
        assert [p.name for p in conf_dir.iterdir()] == ["05-other.conflist"]
        assert [p.name for p in bin_dir.iterdir()] == ["portmap"]
        assert not run_dir.exists() and not state.exists()

        again = lab.run(ns, args).stdout  # idempotent
        assert "removed" not in again and "no table inet np-nft" in again

        (bin_dir / "np-cni").write_text("#!/bin/sh\n# somebody else's np-cni\n")
        out = lab.run(ns, args).stdout
        assert f"left {bin_dir / 'np-cni'}: not np-nft's shim" in out
        assert (bin_dir / "np-cni").exists()


# ------------------------------------------------------------------ a pod the watch lacks


@pytest.mark.kernel
def test_add_reads_a_pod_the_watch_has_not_delivered(shim: Path) -> None:
    from np_lab.cluster import ClusterLab

    if os.geteuid() != 0:
        pytest.fail("kernel tests need root: they build network namespaces")
    with ClusterLab(1) as c:
        n = c.nodes[0]
        c.namespace("x", {"ns": "x"})
        client = c.add_pod("x", "client", n.name, {"role": "client"})
        other = c.add_pod("x", "other", n.name, {"role": "other"})
        for p in (client, other):
            c.lab.serve(p.target, "tcp", 80)
        c.api.create("networkpolicies", {
            "metadata": {"name": "web", "namespace": "x"},
            "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                     "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}],
                                  "ports": [{"port": 80}]}]}})
        eventually(lambda: metric(c, n, 'np_agent_objects{kind="networkpolicies"}') == 1)

        c.api.silent_watches(True)  # the watch is behind: it delivers nothing from here on
        created = c.api.create("pods", {
            "metadata": {"name": "web", "namespace": "x", "labels": {"app": "old"}},
            "spec": {"nodeName": n.name}, "status": {"phase": "Pending"}})
        created["metadata"]["labels"] = {"app": "web"}
        c.api.update("pods", created)  # two versions the watch has not seen
        c.api.clear_request_log()
        web = ClusterShim(c, shim, "x-web")
        rc, res = web.call("ADD", "x", "web", created["metadata"]["uid"])
        assert rc == 0, res
        gets = [p for m, p in c.api.request_log if m == "GET" and "pods/web" in p]
        assert len(gets) == 1, c.api.request_log
        web4 = ips_of(res)[0]
        c.lab.serve("x-web", "tcp", 80)

        def enforced() -> None:  # by its real labels: neither open nor denied both ways
            assert c.lab.probe(client.target, web4, "tcp", 80)
            assert not c.lab.probe(other.target, web4, "tcp", 80)
            assert c.lab.probe("x-web", client.ipv4, "tcp", 80)  # egress is not isolated
            assert "x/web (Pod not known yet)" not in nft(c)

        enforced()
        events = metric(c, n, 'np_agent_watch_events_total{kind="pods"}')
        c.api.silent_watches(False)  # the old versions arrive now, then the current one
        eventually(lambda: metric(c, n, 'np_agent_watch_events_total{kind="pods"}')
                   >= events + 2)
        enforced()
        assert "read from the API server ahead of its watch event" in c.agent_log(n)

        ghost = ClusterShim(c, shim, "x-ghost")  # not in the API at all: fails closed
        rc, res = ghost.call("ADD", "x", "ghost", "no-such-uid")
        assert rc == 0, res
        assert "x/ghost (Pod not known yet)" in nft(c)
        for s, name in ((web, "web"), (ghost, "ghost")):
            assert s.call("DEL", "x", name, "")[0] == 0


def metric(c: Any, node: Any, name: str) -> float:
    """One sample of the agent's /metrics (0 when absent)."""
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", c.metrics(node), re.M)
    return float(m.group(1)) if m else 0.0


def nft(c: Any) -> str:
    """The node's table as nft lists it."""
    return c.lab.run(c.nodes[0].netns, ["nft", "list", "table", "inet", "np-nft"]).stdout


class ClusterShim:
    """The shim called for one pod of a ClusterLab node, with the conflist the agent wrote."""

    def __init__(self, c: Any, shim: Path, target: str) -> None:
        self.c, self.shim, self.node = c, shim, c.nodes[0]
        self.netns = c.lab.add_netns(target)
        self.cid = f"{target}-{uuid.uuid4().hex[:10]}"

    def call(self, command: str, namespace: str, name: str, uid: str) -> tuple[int, Any]:
        conflist = json.loads((self.node.conf_dir / "10-np-nft.conflist").read_text())
        conf = {"cniVersion": conflist["cniVersion"], "name": conflist["name"],
                **conflist["plugins"][0]}
        conf["ipam"] = {**conf["ipam"], "dataDir": str(self.node.dir / "ipam")}
        env = {"PATH": os.environ["PATH"], "CNI_COMMAND": command, "CNI_CONTAINERID": self.cid,
               "CNI_NETNS": f"/run/netns/{self.netns}", "CNI_IFNAME": "eth0",
               "CNI_PATH": "/nonexistent",  # the agent uses its own plugin directory
               "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};"
                           f"K8S_POD_NAME={name};K8S_POD_UID={uid}",
               "NP_NFT_CNI_SOCKET": self.node.socket,
               "NP_NFT_PENDING_DIR": str(self.node.dir / "pending-del")}
        proc = subprocess.run(["ip", "netns", "exec", self.node.netns, str(self.shim)],
                              input=json.dumps(conf).encode(), env=env, capture_output=True)
        out = proc.stdout.decode().strip()
        return proc.returncode, json.loads(out) if out else None

