"""np-cni's commands: ADD, DEL, CHECK, STATUS, GC (VERSION is answered in cli.py).

ADD wires the pod in an order that never lets it be open when it should be closed:

1. IPAM assigns the addresses (delegated plugin);
2. the veth pair is created and the pod side configured, the host side still DOWN;
3. the endpoint file is written (np_cni.shared.endpoints), so the agent knows the pod's IPs;
4. the agent is asked to program the pod and answers only once its policy (isolation, allow
   elements, anti-spoofing) is in the kernel; a pod whose Pod object the agent does not know
   yet is programmed as denied both ways;
5. only then does the host side come up and the routes appear: the first packet meets rules.

If any step fails, everything done before it is undone, and the error names the step.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Callable
from pathlib import Path
from typing import Any

from np_cni import agent, ipam, link
from np_cni.agent import AgentCall
from np_cni.shared.endpoints import Endpoint, EndpointError, EndpointStore, check_name
from np_cni.spec import (
    ALREADY_ATTACHED,
    CHECK_FAILED,
    INVALID_CONFIG,
    INVALID_ENVIRONMENT,
    IO_FAILURE,
    NOT_AVAILABLE,
    Attachment,
    CniError,
    Env,
    NetConf,
    result_json,
)


class _Undo:
    """Clean-up actions of a half-done ADD, run newest first, each one best-effort."""

    def __init__(self) -> None:
        self.actions: list[tuple[str, Callable[[], Any]]] = []

    def push(self, what: str, action: Callable[[], Any]) -> None:
        self.actions.append((what, action))

    def run(self) -> list[str]:
        failures = []
        for what, action in reversed(self.actions):
            try:
                action()
            except Exception as e:  # noqa: BLE001 - clean-up must go on whatever failed
                failures.append(f"{what}: {e}")
        return failures


def _store(conf: NetConf, env: Env) -> EndpointStore:
    try:
        check_name("CNI_CONTAINERID", env.container_id)
        check_name("CNI_IFNAME", env.ifname)
    except EndpointError as e:
        raise CniError(INVALID_ENVIRONMENT, str(e)) from None
    return EndpointStore(conf.endpoints_dir)


def _step(name: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except CniError as e:
        raise CniError(e.code, f"ADD failed at step '{name}': {e.msg}", e.details) from None
    except OSError as e:
        raise CniError(IO_FAILURE, f"ADD failed at step '{name}': {e}") from None


def _caller(conf: NetConf, call: AgentCall | None) -> AgentCall:
    """The given way to reach the agent (np-agent's direct call), else its socket."""
    return call if call is not None else agent.socket_call(conf.agent_socket)


def cmd_add(env: Env, conf: NetConf, call: AgentCall | None = None) -> dict[str, Any]:
    call = _caller(conf, call)
    if conf.prev_result:
        raise CniError(INVALID_CONFIG, "np-cni creates the pod's interface: it must be the "
                       "first plugin of the chain (it got a prevResult)")
    store = _store(conf, env)
    host_if = link.host_ifname(env.container_id, env.ifname)
    with store.lock(env.container_id):
        if store.get(env.container_id, env.ifname):
            raise CniError(ALREADY_ATTACHED, f"container {env.container_id} already has "
                           f"{env.ifname} on network {conf.name}", "call DEL first")
        undo = _Undo()
        try:
            result = _step("ipam", lambda: ipam.delegate("ADD", env, conf))
            undo.push("release IP", lambda: ipam.delegate("DEL", env, conf))
            addresses = ipam.parse_result(result, conf.ipam["type"]).addresses
            dns = (result or {}).get("dns") or {}
            undo.push("delete veth", lambda: link.delete(host_if))
            host_mac, pod_mac = _step("veth", lambda: link.create(
                env.netns_here, host_if, env.ifname, addresses, conf.mtu))
            ep = Endpoint(env.container_id, env.ifname, env.args.get("K8S_POD_NAMESPACE", ""),
                          env.args.get("K8S_POD_NAME", ""), env.args.get("K8S_POD_UID", ""),
                          host_if, tuple(str(a) for a in addresses), env.netns)
            # Undone newest first: the endpoint goes, then the agent is told to forget it.
            undo.push("tell the agent", lambda: _notify(conf, call, {
                "op": "del", "container_id": env.container_id, "ifname": env.ifname}))
            undo.push("remove endpoint", lambda: store.remove(env.container_id, env.ifname))
            _step("endpoint", lambda: store.save(ep))
            _step("dataplane", lambda: call(
                {"op": "add", "container_id": env.container_id, "ifname": env.ifname},
                conf.agent_timeout))
            _step("routes", lambda: link.activate(host_if, addresses))
        except BaseException as e:
            failures = undo.run()
            if failures and isinstance(e, CniError):
                e.details = (e.details + "; " if e.details else "") + "clean-up problems: " + (
                    "; ".join(failures))
            raise
    att = Attachment(host_if, host_mac, env.ifname, pod_mac, env.netns,
                     [ipaddress.ip_interface(f"{a}/{a.max_prefixlen}") for a in addresses], dns)
    return result_json(att, conf.cni_version)


def cmd_del(env: Env, conf: NetConf, call: AgentCall | None = None) -> None:
    """Idempotent: every step tolerates what is already gone (netns, veth, IP, endpoint)."""
    store = _store(conf, env)
    with store.lock(env.container_id):
        ep = store.get(env.container_id, env.ifname)
        link.delete(ep.host_if if ep else link.host_ifname(env.container_id, env.ifname))
        ipam.delegate("DEL", env, conf)
        store.remove(env.container_id, env.ifname)
    _notify(conf, _caller(conf, call), {"op": "del", "container_id": env.container_id,
                                        "ifname": env.ifname})


def _notify(conf: NetConf, call: AgentCall, payload: dict[str, Any]) -> None:
    """Tell the agent, when it is there. When it is not, it reads the endpoint directory at
    its start, so nothing is lost; removed pods are only denied until then."""
    with contextlib.suppress(CniError):
        call(payload, min(conf.agent_timeout, 5.0))


def cmd_check(env: Env, conf: NetConf, call: AgentCall | None = None) -> None:
    """Compare the attachment with prevResult (``call`` is unused: CHECK asks no agent)."""
    if not conf.prev_result:
        raise CniError(INVALID_CONFIG, "CHECK needs prevResult in the network config")
    ep = _store(conf, env).get(env.container_id, env.ifname)
    if ep is None:
        raise CniError(CHECK_FAILED, f"container {env.container_id} has no {env.ifname} "
                       f"attachment on network {conf.name}")
    problems = []
    if not link.link_exists(ep.host_if):
        problems.append(f"host interface {ep.host_if} is missing")
    if not Path(env.netns_here).exists():
        raise CniError(CHECK_FAILED, f"network namespace {env.netns} is gone")
    want = {ipaddress.ip_interface(ip["address"]).ip
            for ip in conf.prev_result.get("ips", [])}
    try:
        state = link.pod_state(env.netns_here, env.ifname)
    except CniError:
        state = None
        problems.append(f"interface {env.ifname} is missing in {env.netns}")
    if state is not None:
        have = {ipaddress.ip_address(a["local"]) for i in state["addrs"]
                for a in i.get("addr_info", []) if a.get("scope") == "global"}
        if want - have:
            problems.append(f"{env.ifname} lacks {', '.join(map(str, sorted(want - have)))}")
        if have - want:
            problems.append(f"{env.ifname} has unexpected "
                            f"{', '.join(map(str, sorted(have - want)))}")
        gateways = {r.get("gateway") for r in state["routes"] if r.get("dst") == "default"}
        for route in conf.prev_result.get("routes", []):
            if route.get("dst") in ("0.0.0.0/0", "::/0") and route.get("gw") not in gateways:
                problems.append(f"default route via {route.get('gw')} is missing")
    if problems:
        raise CniError(CHECK_FAILED, "attachment drifted: " + "; ".join(problems))
    ipam.delegate("CHECK", env, conf)


def cmd_status(env: Env, conf: NetConf, call: AgentCall | None = None) -> None:
    """Ready only when the agent answers and has its dataplane in place."""
    try:
        answer = _caller(conf, call)({"op": "status"}, min(conf.agent_timeout, 5.0))
    except CniError as e:
        raise CniError(NOT_AVAILABLE, e.msg, e.details) from None
    if not answer.get("ready"):
        raise CniError(NOT_AVAILABLE, f"np-agent is not ready: {answer.get('reason', '')}")


def cmd_gc(env: Env, conf: NetConf, call: AgentCall | None = None) -> None:
    """Release every attachment np-cni made on this network that the runtime did not list
    as valid: veth, IP and endpoint; then IPs the IPAM store still holds for unknown ones."""
    valid = set(conf.valid_attachments)
    valid_ids = {cid for cid, _ in valid}
    store = EndpointStore(conf.endpoints_dir)
    endpoints, _ = store.all()
    errors = []
    for ep in endpoints:
        if (ep.container_id, ep.ifname) in valid:
            continue
        try:
            with store.lock(ep.container_id):
                link.delete(ep.host_if)
                ipam.delegate("DEL", env, conf, ep.container_id, ep.ifname)
                store.remove(ep.container_id, ep.ifname)
        except CniError as e:  # GC goes on past failures, as the spec asks
            errors.append(f"{ep.container_id}/{ep.ifname}: {e.msg}")
    for cid, ifname in _host_local_allocations(conf):
        if cid not in valid_ids:
            try:
                ipam.delegate("DEL", env, conf, cid, ifname)
            except CniError as e:
                errors.append(f"{cid}/{ifname}: {e.msg}")
    _notify(conf, _caller(conf, call), {"op": "sync"})
    if errors:
        raise CniError(IO_FAILURE, "GC could not release everything", "; ".join(errors))


def _host_local_allocations(conf: NetConf) -> list[tuple[str, str]]:
    """host-local keeps one file per IP holding 'containerID\\nifname'; it has no GC itself."""
    if conf.ipam.get("type") != "host-local":
        return []
    directory = Path(conf.ipam.get("dataDir") or "/var/lib/cni/networks") / conf.name
    found = []
    for f in directory.glob("*") if directory.is_dir() else []:
        if f.name.startswith("last_reserved_ip") or f.name == "lock":
            continue
        lines = f.read_text().split()
        if lines:
            found.append((lines[0], lines[1] if len(lines) > 1 else "eth0"))
    return found
