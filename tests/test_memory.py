"""Giving memory back when the server falls idle after a burst."""

from __future__ import annotations

import ctypes.util
import heapq
import os
import subprocess
import sys
import textwrap
from collections import Counter, defaultdict

import pytest
from twisted.internet.base import DelayedCall
from twisted.internet.task import Clock

from socks4tx import memory
from tests.tools import missing


@pytest.fixture
def releases(monkeypatch: pytest.MonkeyPatch) -> list[None]:
    calls: list[None] = []
    monkeypatch.setattr(memory, "release_memory", lambda *_: calls.append(None))
    return calls


def test_released_once_idle_after_a_burst(releases: list[None]) -> None:
    clock = Clock()
    idle = memory.IdleRelease(clock)
    for _ in range(memory.RELEASE_AFTER_SESSIONS - 1):
        idle.session_ended(idle=False)
    idle.session_ended(idle=True)
    clock.advance(memory.RELEASE_DELAY)
    assert releases == [None]
    assert clock.getDelayedCalls() == []


def test_not_released_after_a_few_sessions(releases: list[None]) -> None:
    clock = Clock()
    idle = memory.IdleRelease(clock)
    for _ in range(10):
        idle.session_ended(idle=True)
    clock.advance(10)
    assert releases == []


def test_new_activity_postpones_the_release(releases: list[None]) -> None:
    clock = Clock()
    idle = memory.IdleRelease(clock)
    idle.ended = memory.RELEASE_AFTER_SESSIONS
    idle.session_ended(idle=True)
    clock.advance(memory.RELEASE_DELAY / 2)
    idle.session_ended(idle=False)  # busy again: not now
    clock.advance(memory.RELEASE_DELAY)
    assert releases == []
    idle.session_ended(idle=True)
    clock.advance(memory.RELEASE_DELAY)
    assert releases == [None]


def test_release_memory_runs() -> None:
    memory.release_memory()  # a full collection and malloc_trim, no error


class _Owner:
    def __init__(self) -> None:
        self.a_set = set(range(20_000))
        self.a_dict = dict.fromkeys(range(20_000))
        self.counts: Counter[str] = Counter({str(n): 1 for n in range(20_000)})
        self.other: defaultdict[int, int] = defaultdict(int, {1: 1})
        self.a_list = [1, 2]


def test_compact_shrinks_grown_containers_and_keeps_their_contents() -> None:
    owner = _Owner()
    for n in range(19_990):
        owner.a_set.discard(n)
        del owner.a_dict[n]
        del owner.counts[str(n)]
    grown = (
        sys.getsizeof(owner.a_set),
        sys.getsizeof(owner.a_dict),
        sys.getsizeof(owner.counts),
    )
    other, a_list = owner.other, owner.a_list
    memory.compact(owner, ["a_set", "a_dict", "counts", "other", "a_list", "absent"])
    assert owner.a_set == set(range(19_990, 20_000))
    assert owner.a_dict == dict.fromkeys(range(19_990, 20_000))
    assert type(owner.counts) is Counter
    assert owner.counts == Counter({str(n): 1 for n in range(19_990, 20_000)})
    now = (
        sys.getsizeof(owner.a_set),
        sys.getsizeof(owner.a_dict),
        sys.getsizeof(owner.counts),
    )
    assert all(after * 10 < before for before, after in zip(grown, now, strict=True))
    # A list is copied in order (the reactor's timed-call heap stays a heap).
    assert owner.a_list == [1, 2] and owner.a_list is not a_list
    # Types a copy would not rebuild faithfully are left alone.
    assert owner.other is other


def test_idle_release_compacts_the_reactor_and_the_given_owners(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[tuple[object, tuple[str, ...]]] = []
    monkeypatch.setattr(memory, "compact", lambda o, n: seen.append((o, tuple(n))))
    monkeypatch.setattr(memory, "trim_heap", lambda: None)
    clock, owner = Clock(), _Owner()
    idle = memory.IdleRelease(clock, (owner, ("a_set",)))
    idle.ended = memory.RELEASE_AFTER_SESSIONS
    idle.session_ended(idle=True)
    clock.advance(memory.RELEASE_DELAY)
    assert seen == [
        (clock, ("_reads", "_writes", "_selectables")),
        (owner, ("a_set",)),
    ]


class _TimedCalls:
    """The two attributes of C{ReactorBase} that L{drop_cancelled_calls} uses."""

    def __init__(self) -> None:
        self._pendingTimedCalls: list[DelayedCall] = []
        self._cancellations = 0

    def call_at(self, when: float) -> DelayedCall:
        call = DelayedCall(
            when, lambda: None, (), {}, self._cancelled, lambda _: None, lambda: 0.0
        )
        heapq.heappush(self._pendingTimedCalls, call)
        return call

    def _cancelled(self, call: DelayedCall) -> None:
        self._cancellations += 1


def test_drop_cancelled_calls_leaves_a_heap_of_the_live_ones() -> None:
    reactor = _TimedCalls()
    calls = [reactor.call_at(when) for when in (50, 10, 40, 30, 20, 60, 5)]
    for call in calls[1::2]:
        call.cancel()
    reactor._cancellations += 2  # two more cancelled calls still in _newTimedCalls
    memory.drop_cancelled_calls(reactor)
    live = reactor._pendingTimedCalls
    assert sorted(call.time for call in live) == [5, 20, 40, 50]
    assert [heapq.heappop(live).time for _ in range(4)] == [5, 20, 40, 50]
    assert reactor._cancellations == 2


def test_drop_cancelled_calls_knows_the_real_reactor() -> None:
    from twisted.internet import reactor

    # The attributes are private to Twisted: if they go, the release must
    # leave the reactor alone rather than fail, and this test says so.
    assert type(getattr(reactor, "_pendingTimedCalls", None)) is list
    assert type(getattr(reactor, "_cancellations", None)) is int
    memory.drop_cancelled_calls(reactor)
    memory.drop_cancelled_calls(object())  # no such attributes: nothing done


_JEMALLOC_CHILD = textwrap.dedent(
    """
    import gc, sys
    from socks4tx import memory

    def rss_kib():
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])

    before = rss_kib()
    burst = [str(n) * 3 for n in range(1_500_000)]
    during = rss_kib()
    del burst
    gc.collect()
    freed = rss_kib()
    memory.trim_heap()
    print(before, during, freed, rss_kib())
    """
)


def test_trim_heap_purges_jemalloc_when_it_is_the_allocator() -> None:
    library = ctypes.util.find_library("jemalloc")
    if library is None:
        missing("libjemalloc2 is not installed")
    env = dict(os.environ, PYTHONMALLOC="malloc", LD_PRELOAD=library)
    env.pop("MALLOC_CONF", None)
    output = subprocess.run(
        [sys.executable, "-c", _JEMALLOC_CHILD],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    before, during, freed, trimmed = (int(kib) for kib in output.split())
    grown = during - before
    assert grown > 50_000  # the burst took tens of MiB
    # jemalloc keeps most freed pages for seconds (its decay time)...
    assert freed - before > grown / 5
    # ...until trim_heap purges them.
    assert trimmed - before < grown / 10
