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
from collections import Counter
from collections.abc import Callable, Iterable

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


#: Container types that a copy of themselves rebuilds at their present size.
_REBUILDABLE = (set, dict, Counter, list)
#: The reactor's per-descriptor containers (epoll, poll and select reactors)
#: and its heap of timed calls (a copy of a heap, in order, is a heap).
_REACTOR_CONTAINERS = ("_reads", "_writes", "_selectables", "_pendingTimedCalls")


def compact(owner: object, names: Iterable[str]) -> None:
    """
    Rebuild the sets and dicts C{owner.NAME} at their present size.

    CPython never shrinks a set or dict's table when items are removed, so
    one held for thousands of descriptors keeps its largest table, and
    allocations made while it grew pin heap pages that would otherwise be
    freed.  A copy is sized for what is left.  Only called when the server
    is idle, never while the containers are being iterated.
    """
    for name in names:
        value = getattr(owner, name, None)
        if type(value) in _REBUILDABLE:
            setattr(owner, name, type(value)(value))  # type: ignore[misc]


def release_memory(*compactions: tuple[object, Iterable[str]]) -> None:
    """Compact containers, collect once, then free heap pages to the system."""
    for owner, names in compactions:
        compact(owner, names)
    gc.collect()
    trim_heap()


class IdleRelease:
    """Calls L{release_memory} when the server is idle after a burst."""

    def __init__(
        self, clock: IReactorTime, *compactions: tuple[object, Iterable[str]]
    ) -> None:
        self.clock = clock
        self.compactions = ((clock, _REACTOR_CONTAINERS), *compactions)
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
        release_memory(*self.compactions)
