"""Disjoint intervals and boxes.

nftables interval sets (and concatenated interval sets) refuse overlapping elements, and
several policies routinely overlap (two rules allowing the same peer on port 80, an ipBlock
that contains a pod selected by another peer, ...). Everything that goes into an interval set
is therefore normalised here first: addresses and ports become integer intervals, and a set of
(address interval x port interval) rectangles becomes disjoint boxes. Each box remembers which
policy rules contributed to it, so element comments can name them.
"""

from __future__ import annotations

from collections.abc import Iterable

from np_agent.policy.model import IPNetwork

Interval = tuple[int, int]  # inclusive [lo, hi]
Refs = frozenset[str]


def network_interval(net: IPNetwork) -> Interval:
    return int(net.network_address), int(net.broadcast_address)


def subtract(base: Interval, holes: Iterable[Interval]) -> list[Interval]:
    """base minus every hole, as sorted disjoint intervals (ipBlock cidr minus except)."""
    out: list[Interval] = []
    lo, hi = base
    for hlo, hhi in sorted(holes):
        if hhi < lo or hlo > hi:
            continue
        if hlo > lo:
            out.append((lo, hlo - 1))
        lo = max(lo, hhi + 1)
        if lo > hi:
            return out
    out.append((lo, hi))
    return out


def union(items: Iterable[tuple[Interval, Refs]]) -> list[tuple[Interval, Refs]]:
    """Merge overlapping or adjacent intervals, uniting the refs of what merged."""
    out: list[tuple[Interval, Refs]] = []
    for (lo, hi), refs in sorted(items, key=lambda it: it[0]):
        if out and lo <= out[-1][0][1] + 1:
            (plo, phi), prefs = out[-1]
            out[-1] = ((plo, max(phi, hi)), prefs | refs)
        else:
            out.append(((lo, hi), refs))
    return out


Rect = tuple[Interval, Interval, Refs]  # (address interval, port interval, refs)


def disjoint_boxes(rects: Iterable[Rect]) -> list[Rect]:
    """Split overlapping rectangles into disjoint boxes covering exactly their union.

    Sweep over the port axis: between two consecutive port boundaries the set of active
    rectangles is constant, so their address intervals are united once per segment. Adjacent
    segments with the same address intervals are then merged back into one port range, which
    keeps the element count close to what a person would write by hand.
    """
    rects = list(rects)
    if not rects:
        return []
    bounds = sorted({p for _, (plo, phi), _ in rects for p in (plo, phi + 1)})
    starts: dict[int, list[int]] = {}
    for i, (_, (plo, _), _) in enumerate(rects):
        starts.setdefault(plo, []).append(i)
    active: set[int] = set()
    segments: list[tuple[Interval, list[tuple[Interval, Refs]]]] = []
    for seg_lo, next_bound in zip(bounds, bounds[1:], strict=False):
        active.update(starts.get(seg_lo, ()))
        active = {i for i in active if rects[i][1][1] >= seg_lo}
        if not active:
            continue
        merged = union((rects[i][0], rects[i][2]) for i in active)
        segments.append(((seg_lo, next_bound - 1), merged))
    boxes: list[Rect] = []
    current: tuple[Interval, list[tuple[Interval, Refs]]] | None = None
    for ports, addrs in segments:
        if (current is not None and current[0][1] + 1 == ports[0]
                and [a for a, _ in current[1]] == [a for a, _ in addrs]):
            joined = [(a, r1 | r2) for (a, r1), (_, r2) in zip(current[1], addrs, strict=True)]
            current = ((current[0][0], ports[1]), joined)
            continue
        if current is not None:
            boxes.extend((a, current[0], r) for a, r in current[1])
        current = (ports, addrs)
    if current is not None:
        boxes.extend((a, current[0], r) for a, r in current[1])
    return boxes
