"""nftables: the table's static layout, its text, the dataplane (diff + one atomic
transaction) and the verdict its chains give a flow.

Knows nftables, never what a NetworkPolicy is: it may import ``np_agent.ruleset`` (the
contract) and ``np_agent.memory``, never ``policy`` or ``node``.
"""
