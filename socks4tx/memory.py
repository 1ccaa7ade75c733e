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

import contextlib
import ctypes
import ctypes.util
import gc
import heapq
from collections import Counter
from collections.abc import Callable, Iterable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

#: Sessions that must have ended since the last release for an idle
#: moment to be worth a collection.
RELEASE_AFTER_SESSIONS = 1000
#: Seconds of idleness before releasing (a burst often comes in waves).
RELEASE_DELAY = 1.0


#: jemalloc's name for "every arena" in C{arena.<i>.purge}.
_JEMALLOC_ALL_ARENAS = 4096


def _heap_trimmer() -> Callable[[], None]:
    """
    What returns free heap pages to the system in this process: glibc's
    C{malloc_trim}, and jemalloc's purge of every arena when jemalloc is
    the allocator (loaded with C{LD_PRELOAD}; see the README).
    """
    steps: list[Callable[[], object]] = []
    with contextlib.suppress(OSError, AttributeError):
        jemalloc = ctypes.CDLL(None).mallctl
        jemalloc.restype = ctypes.c_int
        jemalloc.argtypes = [ctypes.c_char_p, *[ctypes.c_void_p] * 3, ctypes.c_size_t]
        purge = f"arena.{_JEMALLOC_ALL_ARENAS}.purge".encode()
        flush = b"thread.tcache.flush"
        steps.append(lambda: jemalloc(flush, None, None, None, 0))
        steps.append(lambda: jemalloc(purge, None, None, None, 0))
    name = ctypes.util.find_library("c")
    with contextlib.suppress(OSError, AttributeError):
        if name:
            trim = ctypes.CDLL(name).malloc_trim
            steps.append(lambda: trim(0))

    def release() -> None:
        for step in steps:
            step()

    return release


trim_heap = _heap_trimmer()


#: Container types that a copy of themselves rebuilds at their present size.
_REBUILDABLE = (set, dict, Counter, list)
#: The reactor's per-descriptor containers (epoll, poll and select reactors).
_REACTOR_CONTAINERS = ("_reads", "_writes", "_selectables")


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


def drop_cancelled_calls(reactor: object) -> None:
    """
    Rebuild the reactor's heap of timed calls without its cancelled ones.

    C{ReactorBase} leaves a cancelled call in its heap until the call's time
    comes, or until cancelled calls are more than 50 and half the heap.  A
    burst leaves a few dozen behind (a session's timeouts, cancelled when it
    ended, due minutes later), and each, with its bound methods and times,
    pins the allocator arena it was made in.  This is the compaction
    C{runUntilCurrent} does itself, done when the server is idle.
    """
    heap = getattr(reactor, "_pendingTimedCalls", None)
    cancellations = getattr(reactor, "_cancellations", None)
    if type(heap) is not list or type(cancellations) is not int:
        return
    live = [call for call in heap if not call.cancelled]
    heapq.heapify(live)
    reactor._pendingTimedCalls = live  # type: ignore[attr-defined]
    reactor._cancellations = max(0, cancellations - (len(heap) - len(live)))  # type: ignore[attr-defined]


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
        drop_cancelled_calls(self.clock)
        release_memory(*self.compactions)
