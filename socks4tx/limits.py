"""
Who is connected: the sessions in progress, counted in total and per
client address, so that limits hold, and drained at shutdown.

A session is counted from accept until its log event, so whatever it holds
on the way (a pending ident lookup, an outgoing connection, a BIND listener
and its inbound connection) is covered by the limits: a session holds at
most three descriptors.
"""

from __future__ import annotations

import resource
from collections import Counter
from typing import Protocol as TypingProtocol

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

#: Descriptors one session may hold: client, destination or BIND listener,
#: BIND inbound (an ident lookup comes and goes before the destination).
DESCRIPTORS_PER_SESSION = 3
#: Descriptors kept back for listeners, logs, name lookups and commands.
RESERVED_DESCRIPTORS = 64
DEFAULT_MAX_PER_SOURCE = 256
#: The splice relay's pipes (two descriptors each) take at most this share
#: of the open-file limit, and never more than L{MAX_PIPES}.
PIPE_SHARE = 40
MAX_PIPES = 256


class Session(TypingProtocol):
    def abort(self) -> None: ...


def raise_open_file_limit() -> tuple[int, int]:
    """
    Raise the soft RLIMIT_NOFILE to the hard one; (soft before, hard).
    An unlimited hard limit is left alone (the soft one is used as is).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return soft, hard


def open_file_limit() -> int:
    """The soft open-file limit now."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def pipe_budget(open_files: int | None = None) -> int:
    """
    Pipes the splice relay may hold at once: 1/40 of the open-file limit, at
    most 256 (512 descriptors under a limit of 20,000).  A session whose
    reader has stalled keeps its pipe full, so they are counted apart from
    the sessions' own descriptors.
    """
    if open_files is None:
        open_files = open_file_limit()
    return max(0, min(MAX_PIPES, open_files // PIPE_SHARE))


def default_max_connections(open_files: int | None = None) -> int:
    """
    As many sessions as the open-file limit can always hold, beside the
    splice relay's pipes (L{pipe_budget}, two descriptors each).
    """
    if open_files is None:
        open_files = open_file_limit()
    usable = open_files - RESERVED_DESCRIPTORS - 2 * pipe_budget(open_files)
    return max(1, usable // DESCRIPTORS_PER_SESSION)


class Sessions:
    """
    The sessions in progress.  L{admit} says whether one more from a source
    fits; L{add} and L{remove} keep count; L{drain} waits for them to end.

    @ivar max_total: sessions at once (0: no limit).
    @ivar max_per_source: sessions at once from one client address
        (0: no limit).
    """

    def __init__(self, max_total: int, max_per_source: int) -> None:
        self.max_total = max_total
        self.max_per_source = max_per_source
        self.active: set[Session] = set()
        self.by_source: Counter[str | None] = Counter()
        self.refused = 0
        self._drained: list[defer.Deferred[None]] = []

    def __len__(self) -> int:
        return len(self.active)

    def admit(self, source: str | None) -> bool:
        if self.max_total and len(self.active) >= self.max_total:
            return False
        return not (
            self.max_per_source
            and source is not None
            and self.by_source[source] >= self.max_per_source
        )

    def add(self, session: Session, source: str | None) -> None:
        self.active.add(session)
        self.by_source[source] += 1

    def remove(self, session: Session, source: str | None) -> None:
        if session not in self.active:
            return
        self.active.discard(session)
        self.by_source[source] -= 1
        if self.by_source[source] <= 0:
            del self.by_source[source]
        if not self.active:
            drained, self._drained = self._drained, []
            for waiting in drained:
                waiting.callback(None)

    def drain(self, clock: IReactorTime, grace: float) -> defer.Deferred[None]:
        """
        Fires once every session has ended, aborting those still running
        after C{grace} seconds.
        """
        if not self.active:
            return defer.succeed(None)
        done: defer.Deferred[None] = defer.Deferred()
        self._drained.append(done)
        timer = clock.callLater(grace, self._abort_all)
        done.addBoth(lambda result: timer.cancel() if timer.active() else None)
        return done

    def _abort_all(self) -> None:
        for session in list(self.active):
            session.abort()
