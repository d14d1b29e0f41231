"""The node agent at run time: API watch, the engine (state -> coalesced syncs), the CNI
socket and the in-process plugin, node networking (conflist, routes), install/uninstall on a
node, conntrack cutting, health and metrics.

The top of the stack below the CLI: it may import ``policy``, ``ruleset``, ``nft`` and
``np_cni``; nothing below imports it.
"""
