"""Network-namespace lab for tests and demos (fake node, routed pods)."""

from np_lab.netns import GATEWAY_V4, GATEWAY_V6, NODE, Lab, LabError, LabPod

__all__ = ["GATEWAY_V4", "GATEWAY_V6", "NODE", "Lab", "LabError", "LabPod"]
