"""
The portable relay: two TCP streams spliced with Twisted's flow control.

Each transport is registered as the other's streaming producer (the pattern
of L{twisted.protocols.portforward}), so a side that reads slowly stops
reading from the side that writes to it and memory stays bounded whatever
the traffic.  End-of-file is passed on as a half-close; the relay is
finished when both connections are gone.

The relay sees each connection through a L{RelayEnd}: the protocol that owns
the connection forwards its events to it.  A faster relay can replace this
one by offering the same face (L{Relay.client}, L{Relay.server},
L{Relay.start}, L{Relay.started}, the byte counters and C{on_finished}):
L{socks4tx.splice.SpliceRelay} does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IReactorTime,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.tcp import Connection
from twisted.python.failure import Failure
from zope.interface import implementer


class Transport(TypingProtocol):
    """What the relay needs of a transport: a TCP connection, or a wrapper."""

    def write(self, data: bytes) -> None: ...
    def loseConnection(self) -> None: ...
    def abortConnection(self) -> None: ...
    def registerProducer(self, producer: Any, streaming: bool) -> None: ...
    def unregisterProducer(self) -> None: ...
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...


def write_now(transport: Any, data: bytes) -> None:
    """
    Write C{data} to C{transport}, sending it at once when nothing waits in
    Twisted's buffer.

    C{FileDescriptor.write} only buffers and asks the reactor to watch for
    writability: two C{epoll_ctl} calls and a reactor turn for every write,
    the largest cost of a short session.  When nothing is buffered, sending
    straight away keeps the order and saves them; what the socket doesn't
    take is buffered as usual.  Only for Twisted's own plain sockets (the
    buffer is L{twisted.internet.abstract.FileDescriptor}'s; TLS and
    wrappers write as they always do).
    """
    if (
        isinstance(transport, Connection)
        and not transport._tempDataLen
        and not transport.dataBuffer
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnecting
        and not getattr(transport, "TLS", False)
    ):
        try:
            sent = transport.socket.send(data)
        except OSError:
            sent = 0  # Twisted's own write will meet the error and report it
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


class RelayEnd:
    """
    One connection of a relay: what it reads is written to its peer.

    @ivar bytes_received: bytes read from this connection (and so written
        to the peer).
    """

    __slots__ = (
        "bytes_received",
        "lost",
        "peer",
        "read_done",
        "relay",
        "transport",
    )

    def __init__(self, relay: Relay, transport: Transport) -> None:
        self.relay = relay
        self.transport = transport
        self.peer: RelayEnd
        self.bytes_received = 0
        self.read_done = False
        self.lost = False

    def join(self, peer: RelayEnd) -> None:
        self.peer = peer

    def data_received(self, data: bytes) -> None:
        # The hot path: one call per read of up to 64 KiB.
        self.bytes_received += len(data)
        try:
            transport = self.peer.transport
        except AttributeError:
            return  # a read after the relay was released: nowhere to go
        write_now(transport, data)

    def read_connection_lost(self) -> None:
        """This side sent EOF: half-close the peer once its buffer is flushed."""
        if self.read_done:
            return
        self.read_done = True
        peer = self.peer
        if peer.lost:
            return
        # A consumer with a registered producer never closes: unregister
        # first (the producer, this side, has nothing more to give).
        peer.transport.unregisterProducer()
        if peer.read_done:
            self.relay.close()
            return
        lose_write = getattr(peer.transport, "loseWriteConnection", None)
        if lose_write is None:
            peer.transport.loseConnection()
        else:
            lose_write()

    def connection_lost(self) -> None:
        if self.lost:
            return
        self.lost = True
        self.read_done = True
        peer = self.peer
        if not peer.lost:
            # Deliver what is buffered for the peer, then close it.
            peer.transport.unregisterProducer()
            peer.transport.loseConnection()
        self.relay.end_lost()


def _finished_already(*args: object) -> None:
    """What a released relay calls instead of its owner."""


class Relay:
    """
    Relays bytes between a SOCKS client and its destination.

    @ivar client: the client's end; C{client.bytes_received} is "up".
    @ivar server: the destination's end; C{server.bytes_received} is "down".
    @ivar timed_out: the relay was closed by the idle timeout.
    """

    name = "portable"
    #: The class of the two ends (a faster relay has its own).
    end_class: type[RelayEnd] = RelayEnd

    def __init__(
        self,
        client: Transport,
        server: Transport,
        clock: IReactorTime,
        idle_timeout: float,
        on_finished: Callable[[Relay], None],
    ) -> None:
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.on_finished = on_finished
        self.client = self.end_class(self, client)
        self.server = self.end_class(self, server)
        self.client.join(self.server)
        self.server.join(self.client)
        self.timed_out = False
        self._quiet_since = clock.seconds()
        self._bytes_seen = 0
        self._idle_timer: IDelayedCall | None = None
        self._finished = False

    @property
    def bytes_up(self) -> int:
        return self.client.bytes_received

    @property
    def bytes_down(self) -> int:
        return self.server.bytes_received

    def start(self, pending: bytes = b"") -> None:
        """
        Join the two transports.

        @param pending: bytes the client sent behind its request, delivered
            to the destination first.
        """
        client, server = self.client.transport, self.server.transport
        client.registerProducer(server, True)
        server.registerProducer(client, True)
        if pending:
            self.client.data_received(pending)
        if self.idle_timeout > 0:
            self._schedule_idle_check()

    def started(self) -> None:
        """
        Called once both ends are joined and what came early is delivered:
        the moment a faster relay may take the connections over.
        """

    def close(self) -> None:
        """Close both connections after flushing what each has buffered."""
        for end in (self.client, self.server):
            if not end.lost:
                end.transport.unregisterProducer()
                end.transport.loseConnection()

    def abort(self) -> None:
        """Close both connections now, dropping buffered bytes."""
        for end in (self.client, self.server):
            if not end.lost:
                end.transport.abortConnection()

    def release(self) -> None:
        """Drop the links between the relay and its ends (a finished relay)."""
        self.on_finished = _finished_already
        for end in (self.client, self.server):
            del end.peer, end.relay

    def end_lost(self) -> None:
        if self._finished or not (self.client.lost and self.server.lost):
            return
        self._finished = True
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.cancel()
        self.on_finished(self)

    #: Idle checks per idle timeout.  Traffic is noticed by its byte counts,
    #: not timed per read (that would cost the hot path a clock call), so a
    #: session is closed after between 1 and 1 + 1/IDLE_CHECKS idle timeouts
    #: without a byte; never earlier.
    IDLE_CHECKS = 4

    def _schedule_idle_check(self) -> None:
        self._idle_timer = self.clock.callLater(
            self.idle_timeout / self.IDLE_CHECKS, self._check_idle
        )

    def _check_idle(self) -> None:
        now = self.clock.seconds()
        seen = self.bytes_up + self.bytes_down
        if seen != self._bytes_seen:
            self._bytes_seen = seen
            self._quiet_since = now
        elif now - self._quiet_since >= self.idle_timeout:
            self._idle_timer = None
            self.timed_out = True
            self.abort()
            return
        self._schedule_idle_check()


@implementer(IHalfCloseableProtocol)
class RemoteProtocol(Protocol):
    """
    The protocol of a connection the server made or accepted for a session
    (the CONNECT destination, the BIND peer): it feeds a L{RelayEnd} once
    joined, and remembers what happened before that.
    """

    end: RelayEnd | None = None
    _early: bytes = b""
    _eof = False
    _lost = False

    def attach(self, end: RelayEnd) -> None:
        self.end = end
        # From now on reads go straight to the relay: Twisted looks
        # dataReceived up on the instance for every read.
        self.dataReceived = end.data_received  # type: ignore[method-assign]
        if self._early:
            end.data_received(self._early)
            self._early = b""
            if not (self._lost or self._eof):
                self.transport.resumeProducing()  # type: ignore[union-attr]
        if self._lost:
            end.connection_lost()
        elif self._eof:
            end.read_connection_lost()

    def dataReceived(self, data: bytes) -> None:
        if self.end is not None:
            self.end.data_received(data)
        else:
            # Before the join (a few instructions at most) the transport is
            # paused: this is bounded by one read.
            self._early += data
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def readConnectionLost(self) -> None:
        if self.end is not None:
            self.end.read_connection_lost()
        else:
            self._eof = True

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.end is not None:
            self.end.connection_lost()
        else:
            self._lost = True
