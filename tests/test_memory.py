"""Giving memory back when the server falls idle after a burst."""

from __future__ import annotations

import sys
from collections import Counter, defaultdict

import pytest
from twisted.internet.task import Clock

from socks4tx import memory


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
        (clock, ("_reads", "_writes", "_selectables", "_pendingTimedCalls")),
        (owner, ("a_set",)),
    ]
