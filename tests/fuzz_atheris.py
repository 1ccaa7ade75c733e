"""
Coverage-guided fuzzing of the SOCKS4 wire codec and the RFC 1413 answer
parser with atheris (libFuzzer for Python).  It checks the properties of
C{tests/test_fuzz.py} (which CI runs with hypothesis, for a bounded time):
only the codec's own errors, bounded buffering, results independent of the
split, round trips.  It is not part of the test suite.  To run it:

    pip install atheris
    python tests/fuzz_atheris.py -max_total_time=60

Any libFuzzer option may follow (C{-runs=N}, C{-max_len=4096}, a corpus
directory to keep what it finds).  C{SOCKS4TX_FUZZ_TARGET=request},
C{reply} or C{ident} fuzzes one target; by default the first byte of each
input picks one.  A finding is an uncaught exception or a failed assertion:
libFuzzer writes the input to C{crash-*}, and
C{python tests/fuzz_atheris.py crash-...} replays it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import atheris

HERE = Path(__file__).resolve().parent
# test_fuzz's checks, and socks4tx from this checkout when it isn't installed.
sys.path[:0] = [str(HERE), str(HERE.parent)]

with atheris.instrument_imports(include=["socks4tx"]):
    import socks4tx.identwire
    import socks4tx.wire  # noqa: F401

from test_fuzz import check_ident_parser, check_reply, check_request_parser  # noqa: E402

TARGETS = ("request", "reply", "ident")
TARGET = os.environ.get("SOCKS4TX_FUZZ_TARGET")


def one_input(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    target = TARGET or TARGETS[provider.ConsumeIntInRange(0, len(TARGETS) - 1)]
    if target == "request":
        max_userid = provider.ConsumeIntInRange(0, 300)
        max_hostname = provider.ConsumeIntInRange(0, 300)
        count = provider.ConsumeIntInRange(0, 8)
        cuts = [provider.ConsumeIntInRange(1, 1200) for _ in range(count)]
        payload = provider.ConsumeBytes(provider.remaining_bytes())
        check_request_parser(payload, cuts, max_userid, max_hostname)
    elif target == "reply":
        check_reply(provider.ConsumeBytes(provider.remaining_bytes()))
    elif target == "ident":
        count = provider.ConsumeIntInRange(0, 8)
        cuts = [provider.ConsumeIntInRange(1, 1200) for _ in range(count)]
        check_ident_parser(provider.ConsumeBytes(provider.remaining_bytes()), cuts)
    else:
        raise SystemExit(f"SOCKS4TX_FUZZ_TARGET must be one of {', '.join(TARGETS)}")


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
