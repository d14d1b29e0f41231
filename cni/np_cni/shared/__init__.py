"""What np-cni and np-agent share, in one place: the endpoint records (one file per pod
attachment, written by the plugin, read by the agent) and the shim's socket protocol.

It imports nothing of either side.
"""
