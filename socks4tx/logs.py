"""
Log observers for twistd's C{--logger} option.

C{twistd --logger=socks4tx.logs.json_observer socks4} writes one JSON
object per line to the file named by the environment variable
C{SOCKS4TX_LOG_JSON}, or to standard output.  Each object carries the
event's own fields (for a session: those of L{socks4tx.session}) plus
C{log_time} (seconds since the epoch), C{log_level}, C{log_namespace} and
C{log_text} (the human-readable line); Twisted's internal keys are left
out so the lines read well with C{jq}.
"""

from __future__ import annotations

import json
import os
import sys
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    formatEvent,
)

LOG_JSON_ENV = "SOCKS4TX_LOG_JSON"
_DROPPED = frozenset(
    {"log_logger", "log_source", "log_format", "log_flattened", "log_trace", "log_io"}
)


def event_as_json_line(event: LogEvent) -> str:
    """One event as one line of JSON: its fields, level name and text."""
    record: dict[str, Any] = {
        key: value for key, value in event.items() if key not in _DROPPED
    }
    level = event.get("log_level")
    if level is not None:
        record["log_level"] = level.name
    failure = event.get("log_failure")
    if failure is not None:
        record["log_failure"] = failure.getTraceback()
    record["log_text"] = formatEvent(event)
    return json.dumps(record, default=repr, ensure_ascii=False) + "\n"


def json_observer() -> ILogObserver:
    """A JSON-lines observer; twistd calls it with no arguments."""
    path = os.environ.get(LOG_JSON_ENV)
    out: IO[str] = sys.stdout
    if path:
        try:
            out = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        except OSError as error:
            # twistd calls this before it starts anything: a clear exit.
            raise SystemExit(
                f"{LOG_JSON_ENV}: cannot open {path}: {error.strerror}"
            ) from None
    return FileLogObserver(out, event_as_json_line)
