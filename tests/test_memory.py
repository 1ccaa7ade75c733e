"""Giving memory back when the server falls idle after a burst."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from socks4tx import memory


@pytest.fixture
def releases(monkeypatch: pytest.MonkeyPatch) -> list[None]:
    calls: list[None] = []
    monkeypatch.setattr(memory, "release_memory", lambda: calls.append(None))
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
