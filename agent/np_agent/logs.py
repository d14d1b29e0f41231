"""How np-agent writes its log: text (the default, key=value) or one JSON object a line.

``-v N`` is accepted as the kubelet and kube-proxy take it (klog): 0-3 info, 4 and up debug,
so DaemonSet arguments copied from other components work.
"""

from __future__ import annotations

import json
import logging

TEXT_FORMAT = "%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s"
NOISY = ("pyroute2", "urllib3", "kubernetes")  # their debug output drowns ours


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg, and the traceback when there is
    one (error paths log it at debug level: ``log.debug(..., exc_info=True)``)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": self.formatTime(record), "level": record.levelname.lower(),
               "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out)


def level_for(log_level: str, verbosity: int | None) -> int:
    """``--log-level``, unless klog's ``-v`` is given (4 and up: debug)."""
    if verbosity is not None:
        return logging.DEBUG if verbosity >= 4 else logging.INFO
    return getattr(logging, log_level.upper())


def configure(log_level: str, log_format: str, verbosity: int | None = None) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json"
                         else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level_for(log_level, verbosity))
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
