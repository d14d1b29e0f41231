"""np-agent: Kubernetes NetworkPolicy enforced with nftables, one agent per node.

The tree is the pipeline, each layer importing only the ones below it (tests/test_layers.py):

    API objects -> policy (model, compiler: pure)  -> ruleset (the contract: plain data)
                -> nft (layout, render, diff + one atomic transaction) -> kernel

* ``policy/``  NetworkPolicy semantics: objects -> the elements each set must hold;
* ``ruleset``  the contract between them: a table, its sets and chains by name, elements;
* ``nft/``     nftables: the static layout, its text, the dataplane, the kernel's verdict;
* ``node/``    the running agent: API watch, the engine, the CNI socket, node networking,
               conntrack cutting, health and metrics;
* ``cli``, ``dump``, ``run``: commands, presentation and wiring, on top of all of them.

``memory`` is a leaf utility. The CNI plugin is ``np_cni`` (beside it, importing none of it);
what both share, the endpoint records and the socket protocols, is ``np_cni.shared``.
"""
