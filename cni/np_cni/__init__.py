"""np-cni: the CNI plugin of np-nft (spec 1.1.0). ``np_cni.shared`` holds what the agent
shares with it; the plugin imports nothing of ``np_agent``."""
