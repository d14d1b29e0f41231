"""nftables text: the table as `nft list table inet np-nft` prints it, and every rule's text
derived from its libnftables JSON expression.

Each rule is written once, as JSON (nft.layout); ``rule_text`` renders it in nft syntax for
dump-rules, so the JSON the kernel gets and the text people read cannot disagree.
tests/test_kernel.py compares this text with the kernel's own listing. The renderer covers the
expressions np-nft's layout uses (payload, meta, ct, concatenations, set references, prefixes,
anonymous sets, bitmask tests, verdict maps, verdicts, counters) and fails loudly on others.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from np_agent.ruleset import (
    ADDRESS_TYPES,
    IFNAME_TYPE,
    PROTO_NAMES,
    PROTO_TYPE,
    Key,
    Ruleset,
    SetSpec,
)

Interval = tuple[int, int]
PRIORITY_NAMES = {0: "filter", -300: "raw"}  # as `nft list` names them
# meta keys nft prints without the "meta" keyword
_BARE_META = {"iifname", "oifname", "iif", "oif", "mark"}
_QUOTED_META = {"iifname", "oifname"}


class RenderError(ValueError):
    """An expression this renderer does not know: extend it rather than guess."""


def address_text(version: int, iv: Interval) -> str:
    """An interval as a person writes it: an address, a CIDR, or a range."""
    cls = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
    lo, hi = cls(iv[0]), cls(iv[1])
    if lo == hi:
        return str(lo)
    nets = list(ipaddress.summarize_address_range(lo, hi))
    return str(nets[0]) if len(nets) == 1 else f"{lo}-{hi}"


def _operand(x: Any) -> str:
    if isinstance(x, dict):
        (kind, body), = x.items()
        if kind == "payload":
            return f"{body['protocol']} {body['field']}"
        if kind == "meta":
            return body["key"] if body["key"] in _BARE_META else f"meta {body['key']}"
        if kind == "ct":
            return f"ct {body['key']}"
        if kind == "concat":
            return " . ".join(_operand(e) for e in body)
        if kind == "prefix":
            return f"{body['addr']}/{body['len']}"
        if kind == "set":
            return "{ " + ", ".join(_operand(e) for e in body) + " }"
        raise RenderError(f"no text for expression {kind!r}")
    if isinstance(x, list):
        return ",".join(_operand(e) for e in x)
    return str(x)


def _value(left: Any, right: Any) -> str:
    """The right-hand side; interface names are quoted, as nft lists them."""
    meta = left.get("meta", {}).get("key") if isinstance(left, dict) else None
    if meta in _QUOTED_META and isinstance(right, str) and not right.startswith("@"):
        return f'"{right}"'
    return _operand(right)


def _match(m: dict[str, Any]) -> str:
    left, right, op = m["left"], m["right"], m["op"]
    if isinstance(left, dict) and "&" in left:  # a bitmask test: "tcp flags != syn / fin,syn"
        field, mask = left["&"]
        return f"{_operand(field)} {op} {_operand(right)} / {_operand(mask)}"
    shown = "" if op in ("==", "in") else f"{op} "
    return f"{_operand(left)} {shown}{_value(left, right)}"


def _verdict_map(v: dict[str, Any]) -> str:
    if isinstance(v["data"], str):  # a named map: "@name"
        return f"{_operand(v['key'])} vmap {v['data']}"
    pairs = ", ".join(f"{k} : {_statement(d)}" for k, d in v["data"]["set"])
    return f"{_operand(v['key'])} vmap {{ {pairs} }}"


def _statement(st: dict[str, Any]) -> str:
    (kind, body), = st.items()
    if kind == "match":
        return _match(body)
    if kind in ("accept", "drop", "return", "continue"):
        return kind
    if kind in ("jump", "goto"):
        return f"{kind} {body['target']}"
    if kind == "counter":
        return "counter"
    if kind == "vmap":
        return _verdict_map(body)
    raise RenderError(f"no text for statement {kind!r}")


def rule_text(expr: tuple[Any, ...] | list[Any]) -> str:
    """One rule's libnftables JSON expression list in nft syntax, as the kernel lists it."""
    return " ".join(_statement(st) for st in expr)


def _field_text(ftype: str, value: Any) -> str:
    if ftype == IFNAME_TYPE:
        return f'"{value}"'
    if ftype == PROTO_TYPE:
        return PROTO_NAMES.get(value, str(value))
    lo, hi = value
    if ftype in ADDRESS_TYPES:
        return address_text(ADDRESS_TYPES[ftype], value)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def element_text(spec: SetSpec, key: Key, comment: str = "") -> str:
    """One element as nft lists it (a verdict map's target after the comment)."""
    fields = key[:len(spec.key_type)]
    text = " . ".join(_field_text(t, v) for t, v in zip(spec.key_type, fields, strict=True))
    if comment:
        text += f' comment "{comment}"'
    return f"{text} : goto {key[-1]}" if spec.verdict_map else text




def ruleset_text(rs: Ruleset) -> str:
    lines = [f"table {rs.family} {rs.table} {{"]
    for spec in rs.sets.values():
        kind, data = ("map", " : verdict") if spec.verdict_map else ("set", "")
        lines.append(f"\t{kind} {spec.name} {{")
        lines.append(f"\t\ttype {' . '.join(spec.key_type)}{data}")
        if spec.interval:
            lines.append("\t\tflags interval")
        if spec.counter:
            lines.append("\t\tcounter")
        elements = rs.elements.get(spec.name, {})
        if elements:
            items = [element_text(spec, k, c) for k, c in sorted(elements.items())]
            lines.append("\t\telements = { " + ",\n\t\t\t     ".join(items) + " }")
        lines.append("\t}\n")
    for chain in rs.chains:
        lines.append(f"\tchain {chain.name} {{")
        if chain.is_base:
            prio = PRIORITY_NAMES.get(chain.priority, str(chain.priority))
            lines.append(f"\t\ttype filter hook {chain.hook} priority {prio}; "
                         f"policy {chain.policy};")
        lines.extend(f'\t\t{rule_text(r.expr)} comment "{r.comment}"' for r in chain.rules)
        lines.append("\t}\n")
    lines[-1] = lines[-1].rstrip("\n")
    lines.append("}")
    return "\n".join(lines)
