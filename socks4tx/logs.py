"""
Log observers for twistd's C{--logger} option.

C{twistd --logger=socks4tx.logs.json_observer socks4} writes one JSON
object per line (no record separator) to the file named by the
environment variable C{SOCKS4TX_LOG_JSON}, or to standard output.
"""

from __future__ import annotations

import os
import sys
from typing import IO

from twisted.logger import ILogObserver, jsonFileLogObserver

LOG_JSON_ENV = "SOCKS4TX_LOG_JSON"


def json_observer() -> ILogObserver:
    """A JSON-lines observer; twistd calls it with no arguments."""
    path = os.environ.get(LOG_JSON_ENV)
    out: IO[str] = open(path, "a", encoding="utf-8") if path else sys.stdout  # noqa: SIM115
    return jsonFileLogObserver(out, recordSeparator="")
