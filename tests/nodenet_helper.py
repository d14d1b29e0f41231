"""Run RouteManager inside a network namespace for tests/test_nodenet.py.

Usage: ``ip netns exec NS python nodenet_helper.py`` with a JSON list of steps on stdin,
each ``{"sync": {cidr: gateway}}`` or ``{"flush": true}``. All steps share one RouteManager
(one netlink socket, as in the agent). Prints a JSON list with one result per step.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from np_agent.node.nodenet import RouteManager


def main() -> None:
    steps: list[dict[str, Any]] = json.load(sys.stdin)
    results = []
    with RouteManager() as routes:
        for step in steps:
            if "sync" in step:
                added, removed = routes.sync(step["sync"])
                results.append({"added": added, "removed": removed, "skipped": routes.skipped,
                                "owned": routes.owned()})
            else:
                results.append({"removed": routes.flush(), "owned": routes.owned()})
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
