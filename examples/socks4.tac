"""
socks4tx as a .tac file: ``twistd -ny examples/socks4.tac``.

The options are those of ``twistd socks4``; here they come from the
environment variable SOCKS4TX_OPTIONS (split like a shell command line),
e.g. ``SOCKS4TX_OPTIONS="--listen tcp:1080:interface=127.0.0.1"``.  Edit
the list below to pin them in the file instead.
"""

import os
import shlex

from twisted.application import service
from twisted.python import usage

from socks4tx.tap import Options, makeService

options = Options()
try:
    options.parseOptions(shlex.split(os.environ.get("SOCKS4TX_OPTIONS", "")))
except usage.UsageError as error:
    raise SystemExit(f"SOCKS4TX_OPTIONS: {error}") from None

application = service.Application("socks4tx")
makeService(options).setServiceParent(application)
