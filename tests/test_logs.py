"""np-agent's log formats: text by default, one JSON object a line with --log-format json,
tracebacks kept; klog's -v accepted (4 and up is debug)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

from np_agent.logs import JsonFormatter, level_for


def test_json_lines_carry_level_logger_message_and_traceback():
    record = logging.LogRecord("np_agent.node", logging.ERROR, __file__, 1,
                               "sync failed: %s", ("boom",), None)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    assert "\n" not in line
    obj = json.loads(line)
    assert obj["level"] == "error" and obj["logger"] == "np_agent.node"
    assert obj["msg"] == "sync failed: boom"
    assert "RuntimeError: boom" in obj["traceback"]


def test_klog_verbosity_maps_to_levels():
    assert level_for("info", None) == logging.INFO
    assert level_for("warning", None) == logging.WARNING
    assert level_for("warning", 2) == logging.INFO
    assert level_for("info", 4) == logging.DEBUG


def test_run_accepts_the_flags():
    out = subprocess.run([sys.executable, "-m", "np_agent.cli", "run", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--log-format {text,json}" in out and "-v N, --v N" in out
