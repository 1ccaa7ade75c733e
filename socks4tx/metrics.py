"""
What the server tells a metrics collector about its sessions.

The server calls a L{SessionMetrics} at a handful of points of a session's
life; L{NullMetrics} (the default) ignores them, and
L{socks4tx.prometheus} counts them for Prometheus (C{--metrics}).  Keeping
the interface here keeps C{prometheus_client} an optional dependency.
"""

from __future__ import annotations

from typing import Protocol

from socks4tx.session import Session


class SessionMetrics(Protocol):
    def session_started(self) -> None:
        """A connection was admitted (it is now an active session)."""

    def session_ended(self, session: Session, admitted: bool) -> None:
        """
        A session ended (its log event was just emitted).  C{admitted} is
        false for a connection refused over a limit, which never started.
        """

    def handshake_finished(self, seconds: float) -> None:
        """The relay starts, C{seconds} after the connection was accepted."""

    def ident_finished(self, outcome: str) -> None:
        """
        An RFC 1413 lookup ended: C{"match"}, C{"mismatch"}, or the failure's
        outcome (C{"refused"}, C{"timeout"}, C{"closed"}, C{"malformed"},
        C{"port-mismatch"}, C{"ERROR:..."}, C{"no-address"}).
        """

    def bind_listener_opened(self) -> None:
        """A BIND listener started listening."""

    def bind_listener_closed(self) -> None:
        """A BIND listener was closed."""


class NullMetrics:
    """Counts nothing: the server without C{--metrics}."""

    def session_started(self) -> None:
        pass

    def session_ended(self, session: Session, admitted: bool) -> None:
        pass

    def handshake_finished(self, seconds: float) -> None:
        pass

    def ident_finished(self, outcome: str) -> None:
        pass

    def bind_listener_opened(self) -> None:
        pass

    def bind_listener_closed(self) -> None:
        pass
