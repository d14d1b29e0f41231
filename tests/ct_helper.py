"""Run by tests/test_conntrack.py inside a lab namespace (``ip netns exec``).

Applying a ruleset and cutting connections must happen in the node netns, where the forward
hook and the conntrack table of the lab live; the test process itself stays in its own
namespace. Commands (each prints one JSON line):

    ct_helper.py apply DIR              compile the manifests in DIR, make the kernel hold them
    ct_helper.py cut DIR                compile DIR, cut_disallowed with that ruleset
    ct_helper.py entries                this netns' conntrack entries as np_agent parses them
    ct_helper.py udp SRC SPORT DST PORT one datagram from a fixed source port, wait for its echo

``udp`` runs in a pod netns: a fixed source port makes repeated datagrams one conntrack flow,
so a test can show that the same flow survives a rule change and dies with its entry.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import sys

from np_agent.nft import layout
from np_agent.nft.verdict import Matcher
from np_agent.node import conntrack
from np_agent.policy.compiler import compile_state
from np_agent.policy.manifests import load_manifests
from np_agent.ruleset import Ruleset


def _ruleset(directory: str) -> Ruleset:
    result = load_manifests([directory])
    if result.errors:
        raise SystemExit(f"bad manifests: {result.errors}")
    return layout.ruleset(compile_state(result.state).elements)


def apply(directory: str) -> dict:
    from np_agent.nft.dataplane import Dataplane

    Dataplane().reconcile(_ruleset(directory))
    return {"ok": True}


def cut(directory: str) -> dict:
    return {"cut": conntrack.cut_disallowed(Matcher(_ruleset(directory)))}


def _text(version: int, value: int) -> str:
    return str(ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value))


def entries() -> list:
    out = []
    with conntrack.NetlinkSocket(conntrack.NETLINK_NETFILTER) as nl:
        for version in (4, 6):
            for e in conntrack.dump_entries(nl, version):
                out.append([e.proto, _text(version, e.src), _text(version, e.dst), e.dport])
    return out


def udp(src: str, sport: str, dst: str, port: str) -> dict:
    family = socket.AF_INET6 if ipaddress.ip_address(dst).version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((src, int(sport)))
        sock.settimeout(0.5)
        sock.sendto(b"ct-helper", (dst, int(port)))
        try:
            data = sock.recv(64)
        except OSError:
            return {"ok": False}
    return {"ok": data == b"ct-helper"}


COMMANDS = {"apply": apply, "cut": cut, "entries": entries, "udp": udp}


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    print(json.dumps(COMMANDS[argv[0]](*argv[1:])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
