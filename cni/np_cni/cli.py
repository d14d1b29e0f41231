"""np-cni: the CNI plugin a container runtime executes (CNI spec 1.1.0).

The runtime passes the command and the container in CNI_* environment variables and the
network configuration on stdin; the result or a CNI error goes to stdout as JSON.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from np_cni.agent import AgentCall
from np_cni.spec import (
    SPEC_VERSION,
    SUPPORTED_VERSIONS,
    CniError,
    Env,
    NetConf,
    parse_conf,
    parse_env,
)

HELP = """np-cni: CNI plugin of np-nft (spec {spec}; configs declaring {versions}).

Run by a container runtime, not by hand: CNI_COMMAND=ADD|DEL|CHECK|STATUS|GC|VERSION and
CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME, CNI_ARGS, CNI_PATH in the environment, the network
configuration on stdin. Network configuration keys beyond the standard ones:
  ipam           delegated IPAM plugin config, e.g. {{"type": "host-local", "ranges": ...}}
  agentSocket    np-agent's unix socket (default /run/np-nft/cni.sock)
  agentTimeout   seconds to wait for np-agent to program a pod (default 10)
  endpointsDir   where attachments are recorded (default /var/lib/np-nft/endpoints)
  mtu            veth MTU (default 1500)
"""


@dataclass(frozen=True)
class InProcess:
    """How np-agent runs np-cni inside itself for the host's shim.

    ``call`` reaches the agent directly instead of through its socket; ``netns_fd_path`` is
    where the agent reaches the pod's netns (the descriptor the shim sent); endpoints go to
    the agent's own directory, the one it reads, whatever the network config says.
    """

    call: AgentCall
    netns_fd_path: str = ""
    endpoints_dir: str = ""


def execute(environ: Mapping[str, str], stdin: bytes,
            inproc: InProcess | None = None) -> tuple[int, str]:
    """Run one CNI command; return the exit code and what the plugin prints on stdout.

    Returned rather than written so np-agent can send it back to the shim; the console
    script (:func:`run`) writes it.
    """
    version = SPEC_VERSION
    try:
        env = parse_env(environ)
        conf = parse_conf(stdin, env.command)
        version = conf.cni_version
        if env.command == "VERSION":
            return 0, _json({"cniVersion": version,
                             "supportedVersions": list(SUPPORTED_VERSIONS)})
        call = None
        if inproc is not None:
            env.netns_fd_path, call = inproc.netns_fd_path, inproc.call
            if inproc.endpoints_dir:
                conf.endpoints_dir = Path(inproc.endpoints_dir)
        return 0, _command(env, conf, call)
    except CniError as e:
        return 1, _json(e.to_json(version))
    except Exception as e:  # noqa: BLE001 - the runtime must always get a CNI error object
        return 1, _json(CniError(999, f"np-cni internal error: {type(e).__name__}: {e}")
                        .to_json(version))


def _command(env: Env, conf: NetConf, call: AgentCall | None) -> str:
    """Dispatch to plugin.py; only ADD prints a result."""
    from np_cni import plugin  # the commands import the agent's endpoint store

    if env.command == "ADD":
        return _json(plugin.cmd_add(env, conf, call))
    handler = {"DEL": plugin.cmd_del, "CHECK": plugin.cmd_check,
               "STATUS": plugin.cmd_status, "GC": plugin.cmd_gc}[env.command]
    handler(env, conf, call)
    return ""


def _json(obj: dict[str, Any]) -> str:
    """One JSON document per line, as runtimes read plugin output."""
    return json.dumps(obj) + "\n"


def run(environ: dict[str, str], stdin: bytes) -> int:
    """The console script's way: execute, write the output on stdout, return the code."""
    code, out = execute(environ, stdin)
    if out:
        sys.stdout.write(out)
        sys.stdout.flush()
    return code


def main() -> int:
    """The console script: the runtime's environment and stdin."""
    if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help", "help"):
        print(HELP.format(spec=SPEC_VERSION, versions=", ".join(SUPPORTED_VERSIONS)))
        return 0
    if "CNI_COMMAND" not in os.environ and sys.stdin.isatty():
        print(HELP.format(spec=SPEC_VERSION, versions=", ".join(SUPPORTED_VERSIONS)),
              file=sys.stderr)
        return 1
    return run(dict(os.environ), sys.stdin.buffer.read())


if __name__ == "__main__":
    sys.exit(main())
