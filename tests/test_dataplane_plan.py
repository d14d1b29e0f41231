"""The dataplane's diff, without a kernel: what one reconcile would send."""

from __future__ import annotations

import copy

from conftest import load_yaml, upstream_model_yaml
from np_agent.nft import layout
from np_agent.nft.dataplane import (
    KernelChain,
    KernelSet,
    expected_table,
    parse_element,
    plan,
    render_key,
)
from np_agent.policy.compiler import compile_state
from np_agent.ruleset import SetSpec, isolated_set
from test_compiler import policy

CONCAT = SetSpec("s", ("ipv4_addr", "ipv4_addr", "inet_proto", "inet_service"), interval=True)
CONCAT6 = SetSpec("s", ("ipv6_addr", "ipv6_addr", "inet_proto", "inet_service"), interval=True)


def test_render_and_parse_keys_round_trip():
    keys = [
        ((167772161, 167772161), (167772160, 167772415), 6, (80, 90)),     # prefix /24
        ((167772161, 167772161), (167772162, 167772168), 17, (53, 53)),    # range
        ((167772161, 167772161), (0, 2**32 - 1), 132, (0, 65535)),         # everything
    ]
    for key in keys:
        rendered = render_key(CONCAT, key)
        assert parse_element(CONCAT, {"elem": {"val": rendered, "comment": "c"}}) == (key, "c")
    assert render_key(CONCAT, keys[0]) == {"concat": [
        "10.0.0.1", {"prefix": {"addr": "10.0.0.0", "len": 24}}, "tcp", {"range": [80, 90]}]}
    assert render_key(CONCAT, keys[1])["concat"][1] == {"range": ["10.0.0.2", "10.0.0.8"]}
    six = ((1, 1), (0, 2**128 - 1), 6, (443, 443))
    assert render_key(CONCAT6, six) == {"concat": [
        "::1", {"prefix": {"addr": "::", "len": 0}}, "tcp", 443]}
    assert parse_element(CONCAT6, render_key(CONCAT6, six)) == (six, "")


def _desired():
    result = load_yaml(upstream_model_yaml(), policy("p", "x", """  podSelector: {}
  ingress: [{from: [{podSelector: {}}], ports: [{port: 80}]}]"""))
    return layout.ruleset(compile_state(result.state).elements)


def test_first_apply_builds_everything_in_one_batch():
    desired = _desired()
    p = plan(desired, None)
    verbs = [next(iter(c)) for c in p.commands]
    assert verbs[0] == "add" and "table" in p.commands[0]["add"]
    assert "delete" not in verbs and "flush" not in verbs
    assert p.added == desired.element_count() and p.removed == 0
    assert set(p.rewritten_chains) == {c.name for c in desired.chains}


def test_steady_state_is_a_no_op_and_changes_touch_only_elements():
    desired = _desired()
    kernel = expected_table(desired)
    p = plan(desired, kernel)
    assert (p.added, p.removed, p.rewritten_chains, p.rebuild) == (0, 0, [], False)

    changed = copy.deepcopy(desired)
    iso = isolated_set("ingress", 4)
    gone = next(iter(changed.elements[iso]))
    del changed.elements[iso][gone]
    p = plan(changed, kernel)
    assert (p.added, p.removed, p.rewritten_chains) == (0, 1, [])
    kinds = {(verb, next(iter(body))) for c in p.commands for verb, body in c.items()}
    assert kinds == {("add", "table"), ("delete", "element")}  # never a chain or the table


def test_comment_change_replaces_element():
    desired = _desired()
    kernel = expected_table(desired)
    iso = isolated_set("ingress", 4)
    key = next(iter(kernel.sets[iso].elements))
    kernel.sets[iso].elements[key] = "stale comment"
    p = plan(desired, kernel)
    assert (p.added, p.removed) == (1, 1)


def test_edited_chain_is_rewritten_not_deleted():
    desired = _desired()
    kernel = expected_table(desired)
    kernel.chains["forward"].comments.append("someone else's rule")
    p = plan(desired, kernel)
    assert p.rewritten_chains == ["forward"] and not p.rebuild
    assert {"flush": {"chain": {"family": "inet", "table": "np-nft", "name": "forward"}}} in (
        p.commands)
    assert not any("delete" in c for c in p.commands)


def test_incompatible_set_forces_rebuild_inside_the_same_batch():
    desired = _desired()
    kernel = expected_table(desired)
    kernel.sets[isolated_set("ingress", 4)].key_type = ("ipv6_addr",)
    p = plan(desired, kernel)
    assert p.rebuild and p.commands[0] == {"delete": {"table": {"family": "inet",
                                                                 "name": "np-nft"}}}
    assert p.added == desired.element_count()


def test_stale_objects_of_an_older_layout_are_removed():
    desired = _desired()
    kernel = expected_table(desired)
    kernel.chains["old-chain"] = KernelChain(None, None, None, ["x"])
    kernel.sets["old-set"] = KernelSet(("ipv4_addr",), False, {})
    p = plan(desired, kernel)
    assert {"delete": {"chain": {"family": "inet", "table": "np-nft", "name": "old-chain"}}} in (
        p.commands)
    assert {"delete": {"set": {"family": "inet", "table": "np-nft", "name": "old-set"}}} in (
        p.commands)
