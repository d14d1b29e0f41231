"""np-cni: the CNI plugin binary. Its protocol is implemented in its own issue (#3)."""

from __future__ import annotations

import json
import sys


def main() -> int:
    # Until ADD/DEL/CHECK exist, answer every command with the CNI "not supported" error so a
    # runtime that finds this binary fails loudly instead of starting unprotected pods.
    json.dump({"cniVersion": "1.1.0", "code": 4, "msg": "np-cni is not implemented yet",
               "details": "the CNI protocol is tracked in issue #3"}, sys.stdout)
    sys.stdout.write("\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
