"""Show what is enforced and why: a per-pod summary, then the table in nft syntax.

The table text has the shape `nft list table inet np-nft` prints, element comments included,
so what `dump-rules` shows is what an operator later finds in the kernel.
"""

from __future__ import annotations

from typing import Any

from np_agent.nft import layout
from np_agent.nft.dataplane import plan
from np_agent.nft.render import ruleset_text
from np_agent.policy.compiler import Compiled
from np_agent.policy.model import EGRESS, INGRESS
from np_agent.policy.words import policy_lines

MEMBERS_SHOWN = 5  # pods listed per identity; the peer maps list them all


def summary_lines(compiled: Compiled) -> list[str]:
    out = []
    for w in compiled.warnings:
        out.append(f"# WARNING: {w}")
    for rep in compiled.pods:
        ips = ", ".join(map(str, rep.pod.ips)) or "no IP yet"
        parts = [f"{d} isolated by {', '.join(refs)}" if refs else f"{d} open"
                 for d, refs in (("ingress", rep.ingress), ("egress", rep.egress))]
        out.append(f"# pod {rep.pod.ref} ({ips}): " + "; ".join(parts))
        for direction in (INGRESS, EGRESS):
            for policy in rep.selected:
                if direction in policy.policy_types:
                    out.extend(f"#   {line}" for line in policy_lines(policy, direction))
        if not rep.pod.ips and (rep.ingress or rep.egress):
            out.append("#   (its kernel elements appear once it has an IP)")
    for ident in compiled.identities:
        shown = ", ".join(ident.members[:MEMBERS_SHOWN])
        more = len(ident.members) - MEMBERS_SHOWN
        out.append(f"# identity {ident.number} ({len(ident.members)} pod(s), admitted by "
                   f"{', '.join(ident.rules)}): {shown}" + (f" +{more} more" if more > 0 else ""))
    isolated = sum(1 for r in compiled.pods if r.ingress or r.egress)
    waiting = sum(1 for r in compiled.pods if not r.pod.ips)
    out.insert(0, f"# np-nft: {len(compiled.pods)} pod(s) on this node"
                  + (f" ({waiting} without an IP yet)" if waiting else "")
                  + f", {isolated} isolated, {compiled.element_count()} set element(s)")
    return out


def dump_text(compiled: Compiled) -> str:
    table = ruleset_text(layout.ruleset(compiled.elements))
    return "\n".join(summary_lines(compiled)) + "\n\n" + table + "\n"


def dump_json(compiled: Compiled) -> dict[str, Any]:
    return {
        "pods": [{"pod": r.pod.ref, "ips": [str(ip) for ip in r.pod.ips],
                  "ingress_isolated_by": r.ingress, "egress_isolated_by": r.egress,
                  "allows": [line for d in (INGRESS, EGRESS) for p in r.selected
                             if d in p.policy_types for line in policy_lines(p, d)]}
                 for r in compiled.pods],
        "warnings": compiled.warnings,
        "identities": [{"identity": i.number, "admitted_by": i.rules, "pods": i.members}
                       for i in compiled.identities],
        # The batch that would build the table on an empty node, in libnftables JSON.
        "nftables": plan(layout.ruleset(compiled.elements), None).commands,
    }
