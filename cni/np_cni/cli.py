"""np-cni: the CNI plugin a container runtime executes (CNI spec 1.1.0).

The runtime passes the command and the container in CNI_* environment variables and the
network configuration on stdin; the result or a CNI error goes to stdout as JSON.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from .spec import (
    SPEC_VERSION,
    SUPPORTED_VERSIONS,
    CniError,
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


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def run(environ: dict[str, str], stdin: bytes) -> int:
    version = SPEC_VERSION
    try:
        env = parse_env(environ)
        conf = parse_conf(stdin, env.command)
        version = conf.cni_version
        if env.command == "VERSION":
            _emit({"cniVersion": version, "supportedVersions": list(SUPPORTED_VERSIONS)})
            return 0
        from . import plugin  # the commands import the agent's endpoint store

        if env.command == "ADD":
            _emit(plugin.cmd_add(env, conf))
        elif env.command == "DEL":
            plugin.cmd_del(env, conf)
        elif env.command == "CHECK":
            plugin.cmd_check(env, conf)
        elif env.command == "STATUS":
            plugin.cmd_status(env, conf)
        else:
            plugin.cmd_gc(env, conf)
        return 0
    except CniError as e:
        _emit(e.to_json(version))
        return 1
    except Exception as e:  # noqa: BLE001 - the runtime must always get a CNI error object
        _emit(CniError(999, f"np-cni internal error: {type(e).__name__}: {e}").to_json(version))
        return 1


def main() -> int:
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
