"""
The RFC 1413 ident client: one lookup, one L{Deferred}, one timeout.

Twisted's own C{twisted.protocols.ident} mixes bytes and str on Python 3
and has no timeout, hence this.  The lookup connects from the local address
that the SOCKS client reached, because identd answers about the connection
between exactly those two hosts, and a multi-homed proxy would otherwise
ask from an address the client's host may not route back to.
"""

from __future__ import annotations

import ipaddress

from twisted.internet import defer
from twisted.internet.error import ConnectError, TimeoutError
from twisted.internet.interfaces import (
    IAddress,
    IConnector,
    IDelayedCall,
    IReactorTCP,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.python.failure import Failure

from socks4tx.identwire import (
    IdentAnswerParser,
    IdentErrorAnswer,
    IdentPortMismatch,
    IdentProtocolError,
    IdentUser,
    check_ports,
    format_query,
)

IDENT_PORT = 113
DEFAULT_TIMEOUT = 15.0

#: Outcomes of a failed lookup, besides C{"ERROR:<type>"} for an ERROR answer.
REFUSED = "refused"
TIMEOUT = "timeout"
CLOSED = "closed"
MALFORMED = "malformed"
PORT_MISMATCH = "port-mismatch"


class IdentLookupFailed(Exception):
    """
    The lookup gave no user: identd can't vouch for the client.

    @ivar outcome: C{"refused"} (no connection to identd), C{"timeout"},
        C{"closed"} (closed before a whole answer line), C{"malformed"},
        C{"port-mismatch"}, or C{"ERROR:<type>"} for an ERROR answer, such as
        C{"ERROR:NO-USER"}.
    @ivar detail: a human-readable explanation for the log.
    @ivar answer: the ERROR answer, for C{"ERROR:..."} outcomes.
    """

    def __init__(
        self, outcome: str, detail: str, answer: IdentErrorAnswer | None = None
    ) -> None:
        super().__init__(outcome, detail)
        self.outcome = outcome
        self.detail = detail
        self.answer = answer

    def __str__(self) -> str:
        return f"{self.outcome}: {self.detail}"


def _plain(host: str) -> str:
    """An IPv4-mapped IPv6 address as plain IPv4: the socket family that works."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return str(address.ipv4_mapped)
    return host


class _IdentProtocol(Protocol):
    """Sends the query and hands every byte of the answer to the lookup."""

    def __init__(self, lookup: _Lookup) -> None:
        self.lookup = lookup

    def connectionMade(self) -> None:
        self.lookup.connected(self)

    def dataReceived(self, data: bytes) -> None:
        self.lookup.received(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lookup.lost(reason)


class _Lookup(ClientFactory):
    """
    One lookup's state.  The result fires only once the connection is
    gone (or was never made), so a fired result leaves nothing behind;
    cancelling it aborts the connection or the connect at once.
    """

    noisy = False

    def __init__(
        self,
        clock: IReactorTime,
        port_on_server: int,
        port_on_client: int,
        timeout: float,
    ) -> None:
        self.ports = (port_on_server, port_on_client)
        self.query = format_query(port_on_server, port_on_client)
        self.parser = IdentAnswerParser()
        self.result: defer.Deferred[IdentUser] = defer.Deferred(self._cancel)
        self.connector: IConnector | None = None
        self.transport: ITCPTransport | None = None
        # What the result will be once the connection is closed.
        self.outcome: IdentUser | IdentLookupFailed | None = None
        self.done = False
        self.timer: IDelayedCall = clock.callLater(timeout, self._timed_out, timeout)

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        return _IdentProtocol(self)

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        if reason.check(TimeoutError):
            self._finish(IdentLookupFailed(TIMEOUT, "connecting to identd timed out"))
        else:
            self._finish(IdentLookupFailed(REFUSED, str(reason.value)))

    def connected(self, protocol: _IdentProtocol) -> None:
        transport: ITCPTransport = protocol.transport  # type: ignore[assignment]
        self.transport = transport
        if self.done:
            transport.abortConnection()
        else:
            transport.write(self.query)

    def received(self, data: bytes) -> None:
        if self.outcome is not None:
            return
        try:
            answer = self.parser.feed(data)
        except IdentProtocolError as error:
            self._close(IdentLookupFailed(MALFORMED, str(error)))
            return
        if answer is None:
            return
        try:
            check_ports(answer, *self.ports)
        except IdentPortMismatch as error:
            self._close(IdentLookupFailed(PORT_MISMATCH, str(error)))
            return
        if isinstance(answer, IdentErrorAnswer):
            self._close(
                IdentLookupFailed(
                    f"ERROR:{answer.error}",
                    f"identd answered ERROR : {answer.error}",
                    answer,
                )
            )
        else:
            self._close(answer)

    def lost(self, reason: Failure) -> None:
        self.transport = None
        outcome = self.outcome
        if outcome is None:
            outcome = IdentLookupFailed(
                CLOSED,
                f"identd closed the connection after {self.parser.buffered} bytes"
                " without a complete answer",
            )
        self._finish(outcome)

    def _close(self, outcome: IdentUser | IdentLookupFailed) -> None:
        """Settle on C{outcome}, and close; the result fires once closed."""
        self.outcome = outcome
        if self.transport is not None:
            self.transport.loseConnection()

    def _timed_out(self, timeout: float) -> None:
        if self.transport is None:
            self._finish(IdentLookupFailed(TIMEOUT, f"no connection in {timeout}s"))
            self._stop_connecting()
            return
        if self.outcome is None:
            self.outcome = IdentLookupFailed(TIMEOUT, f"no answer in {timeout}s")
        # The close after an answer hung: abort it, keep the answer.
        self._abort()

    def _cancel(self, _: defer.Deferred[IdentUser]) -> None:
        self.done = True
        self._stop_timer()
        self._stop_connecting()
        self._abort()

    def _stop_connecting(self) -> None:
        if self.transport is None and self.connector is not None:
            self.connector.stopConnecting()

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()

    def _stop_timer(self) -> None:
        if self.timer.active():
            self.timer.cancel()

    def _finish(self, outcome: IdentUser | IdentLookupFailed) -> None:
        if self.done:
            return
        self.done = True
        self._stop_timer()
        if isinstance(outcome, IdentUser):
            self.result.callback(outcome)
        else:
            self.result.errback(outcome)


def lookup_ident(
    reactor: IReactorTCP,
    client_host: str,
    client_port: int,
    server_port: int,
    local_host: str | None,
    *,
    identd_port: int = IDENT_PORT,
    timeout: float = DEFAULT_TIMEOUT,
) -> defer.Deferred[IdentUser]:
    """
    Ask the identd on C{client_host} who owns the connection from
    C{client_port} there to C{server_port} here.

    @param reactor: provides L{IReactorTCP} and L{IReactorTime}.
    @param local_host: the local address the SOCKS client reached, bound as
        the lookup's source; C{None} leaves it to the kernel.  IPv4-mapped
        IPv6 addresses are used as IPv4.
    @param timeout: seconds for the whole lookup, connect and answer.
    @return: fires with the L{IdentUser} once the connection to identd is
        closed (comparing its user-id with USERID is the caller's job), or
        fails with L{IdentLookupFailed}.  Cancelling it stops the connect
        or aborts the connection and its timer.
    """
    clock: IReactorTime = reactor  # type: ignore[assignment]
    lookup = _Lookup(clock, client_port, server_port, timeout)
    bind = None if local_host is None else (_plain(local_host), 0)
    try:
        lookup.connector = reactor.connectTCP(
            _plain(client_host), identd_port, lookup, timeout=timeout, bindAddress=bind
        )
    except ConnectError as error:
        lookup._finish(IdentLookupFailed(REFUSED, str(error)))
    return lookup.result
