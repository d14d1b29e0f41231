"""Cut established connections that the ruleset in force no longer allows.

The forward chain accepts ``ct state established,related`` before any policy: that is what
makes replies work and keeps the per-packet cost flat. The flip side is that removing an
allowance does not touch connections that are already open; they live as long as their
conntrack entry (five days for an established TCP connection). So after a policy change the
agent dumps the conntrack table of its network namespace over netlink, asks
``verdict.Matcher`` whether the first packet of each connection would still be accepted, and
deletes the entries of those that would not. The next packet of such a connection finds no
entry, is taken for a new connection, meets the policy chains and is dropped.

Call it only after the new ruleset is in the kernel: an entry deleted earlier would be
re-created by its next packet under the old rules.

The netlink messages are written here with ``struct`` (ctnetlink, NETLINK_NETFILTER; and
rtnetlink for the node's addresses) rather than through pyroute2: pyroute2 0.9 costs about
0.3 ms to decode one dumped entry and 0.5 ms per delete request (an asyncio round trip each),
i.e. seconds per policy change on a busy node, where this codec dumps 10,000 entries and
deletes thousands in tens of milliseconds. It also keeps the agent free of a dependency that
is slow to import. Deletes echo the kernel's own encoding of the original tuple back to it,
so every protocol conntrack tracks is deleted exactly, without this module knowing its
attributes.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from np_agent.nft.verdict import Matcher
from np_agent.ruleset import ISOLATION_SETS, Delta, Ruleset, is_allow_set

log = logging.getLogger("np_agent.conntrack")

# ------------------------------------------------------------------ netlink constants
# <linux/netlink.h>, <linux/netfilter/nfnetlink.h>, <linux/netfilter/nfnetlink_conntrack.h>,
# <linux/rtnetlink.h>, <linux/if_addr.h>

NETLINK_ROUTE = 0
NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10  # ACKs without a copy of the request: more of them fit the buffer
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF

NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_GET = 1
IPCTNL_MSG_CT_DELETE = 2
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_ID, CTA_ZONE = 1, 2, 12, 18
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMPV6_TYPE = 5, 8

RTM_GETADDR = 22
IFA_ADDRESS, IFA_LOCAL = 1, 2

FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}
VERSIONS = {socket.AF_INET: 4, socket.AF_INET6: 6}
ICMP_PROTOS = (1, 58)

_HDR = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, seq, pid
_NFGEN = struct.Struct("=BBH")  # nfgenmsg: family, version, res_id (big endian, 0)
_IFADDR = struct.Struct("=BBBBI")  # ifaddrmsg: family, prefixlen, flags, scope, index
_NLA = struct.Struct("=HH")  # nlattr: length, type
_ERR = struct.Struct("=i")  # nlmsgerr.error (negative errno, 0 = ACK)
_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")

RECV_BUFFER = 1 << 16  # the kernel sends at most 32 KiB per datagram
DELETE_CHUNK = 64  # requests per send: their ACKs must fit the socket's receive buffer
SOCKET_TIMEOUT = 10.0  # never hang the agent on a kernel that does not answer

# Connections to or from these never cross the forward hook (input/output of the node).
LOOPBACK = {4: (0x7F000000, 0x7FFFFFFF), 6: (1, 1)}


class NetlinkError(OSError):
    """The kernel refused a request; ``errno`` is its error."""


# ------------------------------------------------------------------ netlink codec


def _align(n: int) -> int:
    return (n + 3) & ~3


def nla(atype: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    data = _NLA.pack(_NLA.size + len(payload), atype) + payload
    return data + b"\0" * (_align(len(data)) - len(data))


def attributes(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type without flags, payload start, payload end) of each attribute in buf[start:end]."""
    while start + _NLA.size <= end:
        length, atype = _NLA.unpack_from(buf, start)
        if length < _NLA.size:
            return
        yield atype & NLA_TYPE_MASK, start + _NLA.size, start + length
        start += _align(length)


@dataclass(frozen=True)
class Message:
    mtype: int
    flags: int
    seq: int
    buf: bytes
    start: int  # payload (after nlmsghdr) within buf
    end: int


class NetlinkSocket:
    """A netlink socket to the kernel: requests out, replies matched by sequence number."""

    def __init__(self, protocol: int) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol)
        try:
            self.sock.settimeout(SOCKET_TIMEOUT)
            self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            self.sock.bind((0, 0))
        except BaseException:
            self.sock.close()
            raise
        self._seq = int(time.time()) & 0xFFFFFF

    def __enter__(self) -> NetlinkSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def message(self, mtype: int, flags: int, payload: bytes) -> tuple[int, bytes]:
        """(sequence number, encoded message)."""
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq, _HDR.pack(_HDR.size + len(payload), mtype, flags, self._seq, 0) + payload

    def receive(self) -> Iterator[Message]:
        """The messages of one datagram from the kernel."""
        buf = self.sock.recv(RECV_BUFFER)
        pos = 0
        while pos + _HDR.size <= len(buf):
            length, mtype, flags, seq, _ = _HDR.unpack_from(buf, pos)
            if length < _HDR.size:
                break
            yield Message(mtype, flags, seq, buf, pos + _HDR.size, pos + length)
            pos += _align(length)

    def dump(self, mtype: int, payload: bytes) -> Iterator[Message]:
        """Send a dump request and yield its messages until NLMSG_DONE."""
        seq, data = self.message(mtype, NLM_F_REQUEST | NLM_F_DUMP, payload)
        self.sock.send(data)
        while True:
            for msg in self.receive():
                if msg.seq != seq:
                    continue
                if msg.mtype == NLMSG_DONE:
                    if msg.flags & NLM_F_DUMP_INTR:
                        log.debug("netlink dump was interrupted by changes; entries created "
                                  "meanwhile are checked at the next pass")
                    return
                if msg.mtype == NLMSG_ERROR:
                    _raise_error(msg)
                yield msg

    def requests(self, messages: list[tuple[int, bytes]]) -> dict[int, int]:
        """Send acknowledged requests in chunks; errno per sequence number (0 = done)."""
        results: dict[int, int] = {}
        for i in range(0, len(messages), DELETE_CHUNK):
            chunk = messages[i:i + DELETE_CHUNK]
            self.sock.send(b"".join(data for _, data in chunk))
            waiting = {seq for seq, _ in chunk}
            while waiting:
                for msg in self.receive():
                    if msg.mtype == NLMSG_ERROR and msg.seq in waiting:
                        waiting.discard(msg.seq)
                        results[msg.seq] = -_ERR.unpack_from(msg.buf, msg.start)[0]
        return results


def _raise_error(msg: Message) -> None:
    code = -_ERR.unpack_from(msg.buf, msg.start)[0]
    if code:
        raise NetlinkError(code, os.strerror(code))


# ------------------------------------------------------------------ conntrack entries


@dataclass(frozen=True)
class Entry:
    """One conntrack entry: what the forward hook judged, and what identifies it.

    ``src``/``dst``/``dport`` are the first packet as the forward hook saw it: after DNAT
    (prerouting) and before SNAT (postrouting). Without NAT that is the original direction;
    with a hostPort DNAT it is the pod's address and container port, which is what the policy
    chains judged, so the destination is read from the reply tuple's source. ``dport`` is 0
    for ICMP: allow elements carry TCP/UDP/SCTP only, so only allow-all admits it.
    """

    version: int
    proto: int
    src: int
    dst: int
    dport: int
    icmp_type: int | None
    orig: bytes  # the kernel's encoding of CTA_TUPLE_ORIG, echoed back to delete the entry
    ct_id: int | None
    zone: int | None

    def describe(self) -> str:
        """``proto src -> dst:port`` as a person reads it (for logs)."""
        family = FAMILIES[self.version]
        size = 4 if self.version == 4 else 16
        src = socket.inet_ntop(family, self.src.to_bytes(size, "big"))
        dst = socket.inet_ntop(family, self.dst.to_bytes(size, "big"))
        return f"proto {self.proto} {src} -> {dst} port {self.dport}"


@dataclass
class _Tuple:
    src: int = 0
    dst: int = 0
    proto: int = 0
    sport: int = 0
    icmp_type: int | None = None


_IP_ATTRS = {CTA_IP_V4_SRC: "src", CTA_IP_V6_SRC: "src", CTA_IP_V4_DST: "dst",
             CTA_IP_V6_DST: "dst"}


def _parse_tuple(buf: bytes, start: int, end: int) -> _Tuple:
    t = _Tuple()
    for atype, s, e in attributes(buf, start, end):
        if atype == CTA_TUPLE_IP:
            for ip_type, a, b in attributes(buf, s, e):
                if ip_type in _IP_ATTRS:
                    setattr(t, _IP_ATTRS[ip_type], int.from_bytes(buf[a:b], "big"))
        elif atype == CTA_TUPLE_PROTO:
            for p_type, a, _ in attributes(buf, s, e):
                if p_type == CTA_PROTO_NUM:
                    t.proto = buf[a]
                elif p_type == CTA_PROTO_SRC_PORT:
                    t.sport = _BE16.unpack_from(buf, a)[0]
                elif p_type in (CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMPV6_TYPE):
                    t.icmp_type = buf[a]
    return t


def parse_entry(msg: Message, version: int) -> Entry | None:
    """A dumped IPCTNL_MSG_CT_NEW message -> Entry (None without both tuples)."""
    buf = msg.buf
    orig = reply = None
    ct_id = zone = None
    for atype, s, e in attributes(buf, msg.start + _NFGEN.size, msg.end):
        if atype == CTA_TUPLE_ORIG:
            orig = (s, e)
        elif atype == CTA_TUPLE_REPLY:
            reply = (s, e)
        elif atype == CTA_ID:
            ct_id = _BE32.unpack_from(buf, s)[0]
        elif atype == CTA_ZONE:
            zone = _BE16.unpack_from(buf, s)[0]
    if orig is None or reply is None:
        return None
    o, r = _parse_tuple(buf, *orig), _parse_tuple(buf, *reply)
    dport = 0 if o.proto in ICMP_PROTOS else r.sport
    return Entry(version, o.proto, o.src, r.src, dport, o.icmp_type, buf[orig[0]:orig[1]],
                 ct_id, zone)


def dump_entries(nl: NetlinkSocket, version: int) -> Iterator[Entry]:
    """Every conntrack entry of one address family in the current network namespace."""
    mtype = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
    for msg in nl.dump(mtype, _NFGEN.pack(FAMILIES[version], 0, 0)):
        entry = parse_entry(msg, version)
        if entry is not None:
            yield entry


def delete_request(nl: NetlinkSocket, entry: Entry) -> tuple[int, bytes]:
    """IPCTNL_MSG_CT_DELETE for exactly this entry: its original tuple as the kernel encoded
    it, its zone, and its id, so that a connection re-created with the same tuple meanwhile
    (it then passed the new rules) is left alone. A delete without a tuple would flush the
    whole table, hence the assertion."""
    assert entry.orig, "a conntrack delete without a tuple flushes the table"
    payload = _NFGEN.pack(FAMILIES[entry.version], 0, 0)
    payload += nla(CTA_TUPLE_ORIG | NLA_F_NESTED, entry.orig)
    if entry.zone is not None:
        payload += nla(CTA_ZONE, _BE16.pack(entry.zone))
    if entry.ct_id is not None:
        payload += nla(CTA_ID, _BE32.pack(entry.ct_id))
    mtype = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE
    return nl.message(mtype, NLM_F_REQUEST | NLM_F_ACK, payload)


def delete_entries(nl: NetlinkSocket, entries: list[Entry]) -> tuple[int, int]:
    """(deleted, already gone). Any error other than "no such entry" is raised."""
    requests = [delete_request(nl, e) for e in entries]
    results = nl.requests(requests)
    deleted = gone = 0
    verbose = log.isEnabledFor(logging.DEBUG)
    for (seq, _), entry in zip(requests, entries, strict=True):
        code = results[seq]
        if code == 0:
            deleted += 1
            if verbose:
                log.debug("conntrack: cut %s", entry.describe())
        elif code == errno.ENOENT:
            gone += 1
        else:
            raise NetlinkError(code, f"deleting conntrack entry {entry.describe()}: "
                                     f"{os.strerror(code)}")
    return deleted, gone


# ------------------------------------------------------------------ the node's addresses


def node_addresses() -> dict[int, set[int]]:
    """Addresses of the current network namespace's interfaces, per IP version (rtnetlink
    RTM_GETADDR). IFA_LOCAL is the local address of a point-to-point link (IFA_ADDRESS is
    then the peer); without it IFA_ADDRESS is the local one."""
    out: dict[int, set[int]] = {4: set(), 6: set()}
    with NetlinkSocket(NETLINK_ROUTE) as nl:
        for msg in nl.dump(RTM_GETADDR, _IFADDR.pack(socket.AF_UNSPEC, 0, 0, 0, 0)):
            family = msg.buf[msg.start]
            if family not in VERSIONS:
                continue
            attrs = {t: msg.buf[s:e] for t, s, e in
                     attributes(msg.buf, msg.start + _IFADDR.size, msg.end)}
            addr = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
            if addr:
                out[VERSIONS[family]].add(int.from_bytes(addr, "big"))
    return out


def _parse_addresses(addresses: Iterable[str]) -> dict[int, set[int]]:
    import ipaddress

    out: dict[int, set[int]] = {4: set(), 6: set()}
    for a in addresses:
        ip = ipaddress.ip_address(a)
        out[ip.version].add(int(ip))
    return out


# ------------------------------------------------------------------ the cut


@dataclass
class CutStats:
    """What one pass saw, for the summary log line."""

    checked: int = 0
    local: int = 0  # to or from the node itself: never policed by the forward chain
    allowed: int = 0
    deleted: int = 0
    gone: int = 0  # not allowed, but vanished before the delete (closed, timed out)


def _is_local(addr: int, version: int, local: dict[int, set[int]]) -> bool:
    lo, hi = LOOPBACK[version]
    return addr in local[version] or lo <= addr <= hi


def _doomed(nl: NetlinkSocket, matcher: Matcher, version: int, local: dict[int, set[int]],
            stats: CutStats) -> list[Entry]:
    """The entries of one family that the matcher would not allow as new connections."""
    out = []
    for entry in dump_entries(nl, version):
        stats.checked += 1
        if _is_local(entry.src, version, local) or _is_local(entry.dst, version, local):
            stats.local += 1
        elif matcher.allowed(entry.src, entry.dst, version, entry.proto, entry.dport,
                             icmp_type=entry.icmp_type):
            stats.allowed += 1
        else:
            out.append(entry)
    return out


def cut_disallowed(matcher: Matcher, local_addresses: Iterable[str] | None = None,
                   versions: Iterable[int] = (4, 6)) -> int:
    """Delete the conntrack entries of the current network namespace that ``matcher`` (built
    from the ruleset now in force) would not allow as new connections; return how many.

    ``local_addresses`` are the node's own addresses (default: read from its interfaces):
    connections to or from them are input/output, never forwarded nor policed, so they are
    never cut (kubelet probes of an isolated pod, for one). Entries between addresses that
    are not pods need no special case: nothing isolates them, so the matcher allows them.
    """
    started = time.monotonic()
    local = node_addresses() if local_addresses is None else _parse_addresses(local_addresses)
    stats = CutStats()
    with NetlinkSocket(NETLINK_NETFILTER) as nl:
        for version in versions:
            # Collect first, delete after the dump: deleting while the kernel walks its hash
            # table could make the dump skip entries.
            doomed = _doomed(nl, matcher, version, local, stats)
            deleted, gone = delete_entries(nl, doomed)
            stats.deleted += deleted
            stats.gone += gone
    log.log(logging.INFO if stats.deleted else logging.DEBUG,
            "conntrack: %d entries checked, %d node-local, %d still allowed, %d cut, "
            "%d already gone, in %.3f s", stats.checked, stats.local, stats.allowed,
            stats.deleted, stats.gone, time.monotonic() - started)
    return stats.deleted


class ConntrackCutter:
    """Cuts established flows that a change no longer allows, in its own thread.

    A cut lists the conntrack table and needs a matcher over the whole ruleset; doing that in
    the sync thread would delay the next change's enforcement. The sync thread only hands
    over a snapshot of the elements (a dict copy, under a millisecond); bursts coalesce.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._latest: Ruleset | None = None
        threading.Thread(target=self._run, name="conntrack", daemon=True).start()

    def __call__(self, ruleset: Ruleset, delta: Delta) -> None:
        lost = any(is_allow_set(name) for name in delta.removed) or any(
            name in ISOLATION_SETS for name in delta.added)
        if not lost:
            return
        snapshot = Ruleset(ruleset.table, ruleset.family, ruleset.sets, ruleset.chains,
                           {name: dict(items) for name, items in ruleset.elements.items()})
        with self._cond:
            self._latest = snapshot
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._latest is None:
                    self._cond.wait()
                ruleset, self._latest = self._latest, None
            try:
                cut_disallowed(Matcher(ruleset))
            except Exception as e:  # noqa: BLE001 - never take the agent down
                log.error("cutting connections that are no longer allowed failed: %s", e)
                log.debug("conntrack cut failure", exc_info=True)
