"""Show what is enforced and why: a per-pod summary, then the table in nft syntax.

The table text has the shape `nft list table inet np-nft` prints, element comments included,
so what `dump-rules` shows is what an operator later finds in the kernel.
"""

from __future__ import annotations

from typing import Any

from .compiler import Compiled, address_text
from .dataplane import plan
from .ruleset import ADDRESS_TYPES, IFNAME_TYPE, PROTO_NAMES, PROTO_TYPE, Key, Ruleset, SetSpec

PRIORITY_NAMES = {0: "filter", -300: "raw"}  # as `nft list` names them


def _field_text(ftype: str, value: Any) -> str:
    if ftype == IFNAME_TYPE:
        return f'"{value}"'
    if ftype == PROTO_TYPE:
        return PROTO_NAMES.get(value, str(value))
    lo, hi = value
    if ftype in ADDRESS_TYPES:
        return address_text(ADDRESS_TYPES[ftype], value)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def element_text(spec: SetSpec, key: Key) -> str:
    return " . ".join(_field_text(t, v) for t, v in zip(spec.key_type, key, strict=True))


def ruleset_text(rs: Ruleset) -> str:
    lines = [f"table {rs.family} {rs.table} {{"]
    for spec in rs.sets.values():
        lines.append(f"\tset {spec.name} {{")
        lines.append(f"\t\ttype {' . '.join(spec.key_type)}")
        if spec.interval:
            lines.append("\t\tflags interval")
        if spec.counter:
            lines.append("\t\tcounter")
        elements = rs.elements.get(spec.name, {})
        if elements:
            items = [f'{element_text(spec, k)} comment "{c}"' if c else element_text(spec, k)
                     for k, c in sorted(elements.items())]
            lines.append("\t\telements = { " + ",\n\t\t\t     ".join(items) + " }")
        lines.append("\t}\n")
    for chain in rs.chains:
        lines.append(f"\tchain {chain.name} {{")
        if chain.is_base:
            prio = PRIORITY_NAMES.get(chain.priority, str(chain.priority))
            lines.append(f"\t\ttype filter hook {chain.hook} priority {prio}; "
                         f"policy {chain.policy};")
        lines.extend(f'\t\t{r.text} comment "{r.comment}"' for r in chain.rules)
        lines.append("\t}\n")
    lines[-1] = lines[-1].rstrip("\n")
    lines.append("}")
    return "\n".join(lines)


def summary_lines(compiled: Compiled) -> list[str]:
    out = []
    for w in compiled.warnings:
        out.append(f"# WARNING: {w}")
    for rep in compiled.pods:
        ips = ", ".join(map(str, rep.pod.ips))
        parts = [f"{d} isolated by {', '.join(refs)}" if refs else f"{d} open"
                 for d, refs in (("ingress", rep.ingress), ("egress", rep.egress))]
        out.append(f"# pod {rep.pod.ref} ({ips}): " + "; ".join(parts))
    isolated = sum(1 for r in compiled.pods if r.ingress or r.egress)
    out.insert(0, f"# np-nft: {len(compiled.pods)} pod(s) on this node, {isolated} isolated, "
                  f"{compiled.ruleset.element_count()} set element(s)")
    return out


def dump_text(compiled: Compiled) -> str:
    return "\n".join(summary_lines(compiled)) + "\n\n" + ruleset_text(compiled.ruleset) + "\n"


def dump_json(compiled: Compiled) -> dict[str, Any]:
    return {
        "pods": [{"pod": r.pod.ref, "ips": [str(ip) for ip in r.pod.ips],
                  "ingress_isolated_by": r.ingress, "egress_isolated_by": r.egress}
                 for r in compiled.pods],
        "warnings": compiled.warnings,
        # The batch that would build the table on an empty node, in libnftables JSON.
        "nftables": plan(compiled.ruleset, None).commands,
    }
