"""NetworkPolicy semantics: parse objects into a model, compile it into set elements.

Pure: no kernel, no network, no threads. May import ``np_agent.ruleset`` (the contract it
fills) and ``np_cni.shared.endpoints`` (the attachments it compiles for); never ``nft`` or
``node``: what a rule looks like in nftables, or how it gets there, is not its business.
"""
