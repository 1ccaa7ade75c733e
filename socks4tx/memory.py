"""
Giving memory back after a burst of sessions.

A finished session is freed by reference counting (the server breaks its
reference cycles), but what a burst leaves behind (objects that reached
the collector's oldest generation, and pages the C allocator keeps) stays
until the next full collection, which an idle process never reaches.  When
the server falls idle after many sessions, it collects once and asks glibc
to return free pages to the system.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

#: Sessions that must have ended since the last release for an idle
#: moment to be worth a collection.
RELEASE_AFTER_SESSIONS = 1000
#: Seconds of idleness before releasing (a burst often comes in waves).
RELEASE_DELAY = 1.0


def _malloc_trim() -> Callable[[], None]:
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    if trim is None:
        return lambda: None
    return lambda: trim(0)


trim_heap = _malloc_trim()


def release_memory() -> None:
    """One full collection, then free heap pages back to the system."""
    gc.collect()
    trim_heap()


class IdleRelease:
    """Calls L{release_memory} when the server is idle after a burst."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.ended = 0
        self._pending: IDelayedCall | None = None

    def session_ended(self, idle: bool) -> None:
        self.ended += 1
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
            self._pending = None
        if idle and self.ended >= RELEASE_AFTER_SESSIONS:
            self._pending = self.clock.callLater(RELEASE_DELAY, self._release)

    def _release(self) -> None:
        self._pending = None
        self.ended = 0
        release_memory()
