"""The deployment manifests agree with the code: RBAC covers what the agent watches (and no
more), the containers' arguments are ones np-agent accepts, the paths np-cni uses are mounted,
nothing runs privileged. (The real API server and kubelet run them in tests/test_realnode.py;
the host-side np-cni, the C shim, is tested in tests/test_cni_shim.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from conftest import ROOT
from np_agent.cli import build_parser
from np_agent.node import kube

DAEMONSET = ROOT / "daemonset"


def _docs(name: str = "install.yaml") -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all((DAEMONSET / name).read_text()) if d]
    return {d["kind"]: d for d in docs}


def test_rbac_covers_every_watched_kind():
    rules = _docs()["ClusterRole"]["rules"]
    allowed = {(g, r) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]
               if {"list", "watch"} <= set(rule["verbs"])}
    groups = {"pods": "", "namespaces": "", "nodes": "", "networkpolicies": "networking.k8s.io"}
    assert {(groups[k], k) for k in kube.KINDS} <= allowed
    assert all(set(rule["verbs"]) <= {"get", "list", "watch"} for rule in rules)


def test_container_args_are_accepted_and_paths_mounted():
    spec = _docs()["DaemonSet"]["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True  # hostPID is no longer needed (the shim uses the socket)
    agent = spec["containers"][0]
    args = build_parser().parse_args(agent["args"])
    assert args.command == "run" and args.kubeconfig is None  # in-cluster configuration
    assert agent["env"][0]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    mounts = {m["mountPath"] for m in agent["volumeMounts"]}
    paths = [args.cni_conf_dir, str(Path(args.cni_socket).parent), args.endpoints_dir,
             args.pending_dir, "/var/lib/cni"]
    if args.pid_file:  # deprecated, but if it is written it must land on the host
        paths.append(str(Path(args.pid_file).parent))
    for path in paths:
        assert any(path == m or path.startswith(m + "/") for m in mounts), path
    conflist = json.loads((DAEMONSET / "10-np-nft.conflist").read_text())
    assert conflist["plugins"][0]["agentSocket"] == args.cni_socket
    assert conflist["plugins"][0]["endpointsDir"] == args.endpoints_dir



def test_least_privilege():
    """No privileged container, no hostPID; the agent adds only NET_ADMIN and SYS_ADMIN."""
    for name in ("install.yaml", "uninstall.yaml"):
        spec = _docs(name)["DaemonSet"]["spec"]["template"]["spec"]
        assert not spec.get("hostPID")
        for container in spec.get("initContainers", []) + spec["containers"]:
            ctx = container["securityContext"]
            assert not ctx.get("privileged") and ctx["allowPrivilegeEscalation"] is False
            assert ctx["capabilities"]["drop"] == ["ALL"]
            assert set(ctx["capabilities"].get("add", [])) <= {"NET_ADMIN", "SYS_ADMIN"}
    spec = _docs()["DaemonSet"]["spec"]["template"]["spec"]
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [{"operator": "Exists"}]


def test_init_and_uninstall_arguments_are_accepted():
    parser = build_parser()
    init = _docs()["DaemonSet"]["spec"]["template"]["spec"]["initContainers"][0]
    assert parser.parse_args(init["args"]).command == "install-cni"
    uninstall = _docs("uninstall.yaml")["DaemonSet"]["spec"]["template"]["spec"]
    assert parser.parse_args(uninstall["initContainers"][0]["args"]).command == "uninstall-node"
