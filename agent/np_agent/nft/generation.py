"""The kernel's nftables ruleset generation (NFT_MSG_GETGEN).

Every committed nftables transaction in a network namespace, by anyone, increments it. If it
has not moved since our last transaction (or since our last look at the table), nothing in
the kernel's ruleset can have changed, our table included, and a drift check needs no listing
of 70,000 elements: one netlink round trip answers it.
"""

from __future__ import annotations

import socket
import struct

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_GETGEN = 16
NFTA_GEN_ID = 1
NLM_F_REQUEST = 0x1
NLMSG_ERROR = 2
_HDR = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, seq, pid
_NFGEN = struct.Struct("=BBH")  # nfgenmsg: family, version, res_id
_NLA = struct.Struct("=HH")  # nlattr: length, type
TIMEOUT = 5.0


def ruleset_generation() -> int:
    """The current generation of this network namespace's nftables ruleset."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as s:
        s.settimeout(TIMEOUT)
        s.bind((0, 0))
        request = _NFGEN.pack(socket.AF_UNSPEC, 0, 0)
        s.send(_HDR.pack(_HDR.size + len(request), NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETGEN,
                         NLM_F_REQUEST, 1, 0) + request)
        data = s.recv(65536)
    length, mtype, _, _, _ = _HDR.unpack_from(data)
    if mtype == NLMSG_ERROR:
        err = -struct.unpack_from("=i", data, _HDR.size)[0]
        raise OSError(err, "NFT_MSG_GETGEN refused")
    offset = _HDR.size + _NFGEN.size
    while offset + _NLA.size <= length:
        alen, atype = _NLA.unpack_from(data, offset)
        if atype & 0x3FFF == NFTA_GEN_ID:
            return struct.unpack_from(">I", data, offset + _NLA.size)[0]
        if alen < _NLA.size:
            break
        offset += (alen + 3) & ~3
    raise OSError("NFT_MSG_GETGEN: no generation in the answer")
