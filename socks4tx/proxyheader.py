"""
Listening behind a load balancer: the PROXY protocol (C{--listen haproxy:...}).

Twisted's own C{haproxy:} wrapper builds the server's protocol at accept,
with the balancer's address, and connects it before the header is read; it
drops bad headers without a word, rejects a header whose first read is
short, serves v2 LOCAL and v1 UNKNOWN connections as the balancer itself
(a loopback client when the balancer is local) and loses half-close.  This
one reads the header first (L{socks4tx.proxywire}), with a timeout and a
cap on connections still waiting for theirs, and only then builds the
wrapped protocol for the client the header names, so that everything keyed
on the client's address (rules, per-source limits, the session log, ident)
sees the client.  Connections it won't serve are logged (namespace
C{socks4tx.proxy}, fields C{peer} and C{reason}) and closed, and nothing is
built for them.

As Twisted's does, the wrapper answers C{getPeer()} with the header's
source and C{getHost()} with its destination (the balancer's frontend);
L{real_host} gives the local address of the socket itself, which is where
BIND listeners and ident lookups must come from.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IListeningPort,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
    ITransport,
)
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from socks4tx.proxywire import (
    DEFAULT_MAX_V2_LENGTH,
    Command,
    Family,
    HeaderParser,
    ProxyHeader,
    ProxyHeaderError,
)
from socks4tx.session import describe

log = Logger(namespace="socks4tx.proxy")

#: Seconds a balancer has to send the header, when the wrapped factory has
#: no C{settings.handshake_timeout}.
DEFAULT_HEADER_TIMEOUT = 30.0
#: Connections at once still waiting for their header, when the wrapped
#: factory has no C{settings.max_connections}.
DEFAULT_MAX_PENDING = 1024
#: The endpoint description prefix handled by L{listen_description}.
PREFIX = "haproxy"


def real_host(transport: ITransport) -> IAddress:
    """
    The local address of the socket under C{transport}: for a PROXY
    connection the backend's own address, not the balancer's frontend that
    C{getHost()} reports; for any other transport its C{getHost()}.
    Wrappers around this one (TLS) pass the question down.
    """
    socket_host = getattr(transport, "socket_host", None)
    if callable(socket_host):
        host: IAddress = socket_host()
        return host
    return transport.getHost()


def refusal_reason(header: ProxyHeader) -> str | None:
    """
    Why a valid header can't be served (None: it can).  The spec's fallback
    for these is the real connection's endpoints, which would make the
    balancer the client: a loopback client when it runs on this host.
    """
    if header.command is Command.LOCAL:
        return "local"
    if header.family is Family.UNSPEC:
        return "unknown"
    if header.source is None:
        return "unsupported-family"
    return None


def header_address(address: tuple[str, int], family: Family) -> IAddress:
    """A header's C{(host, port)} as the Twisted address of its family."""
    host, port = address
    if family is Family.TCP6:
        return IPv6Address("TCP", host, port)
    return IPv4Address("TCP", host, port)


#: Refusals that are routine (a balancer's health checks): info, not warn.
ROUTINE_REFUSALS = frozenset({"local", "unknown"})


def _log_refused(peer: IAddress | None, reason: str, detail: str) -> None:
    """The one event of a connection closed without being served."""
    level = LogLevel.info if reason in ROUTINE_REFUSALS else LogLevel.warn
    log.emit(
        level,
        "PROXY connection from {peer} closed: {reason} ({detail})",
        peer=describe(peer) if peer is not None else None,
        reason=reason,
        detail=detail,
    )


@implementer(IHalfCloseableProtocol, ITransport)
class ProxyHeaderProtocol(Protocol):
    """
    One connection from the balancer.  Until its header is read it is a
    protocol of its own; then it is the transport of the wrapped protocol,
    built for the header's client, and passes everything through, half-close
    included.

    @ivar header: the header, once read and accepted.
    @ivar wrapped: the wrapped factory's protocol, once built.
    """

    factory: ProxyHeaderFactory
    header: ProxyHeader | None = None
    wrapped: IProtocol | None = None
    disconnecting = False

    def __init__(self, factory: ProxyHeaderFactory) -> None:
        self.factory = factory
        self._parser: HeaderParser | None = HeaderParser(factory.max_v2_length)
        self._timer: IDelayedCall | None = None
        self._waiting = False
        self._peer: IAddress | None = None
        self._host: IAddress | None = None

    def logPrefix(self) -> str:
        wrapped_prefix = getattr(self.wrapped, "logPrefix", None)
        name = wrapped_prefix() if callable(wrapped_prefix) else "connection"
        return f"{name} (PROXY)"

    # -- as a protocol, until the header is read ---------------------------

    def makeConnection(self, transport: ITransport) -> None:
        # Whatever the socket's transport provides (ITCPTransport, ...), this
        # one provides too, for the wrapped protocol (as ProtocolWrapper).
        directlyProvides(self, providedBy(transport))
        super().makeConnection(transport)

    def connectionMade(self) -> None:
        self._waiting = True
        self.factory.pending += 1
        self._timer = self.factory.clock.callLater(
            self.factory.timeout, self._timed_out
        )

    def dataReceived(self, data: bytes) -> None:
        if self.wrapped is not None:
            self.wrapped.dataReceived(data)
            return
        if self._parser is None:
            return  # refused; closing
        try:
            header, remaining = self._parser.feed(data)
        except ProxyHeaderError as error:
            self._refuse("invalid", str(error))
            return
        if header is not None:
            self._header_received(header, remaining)

    def _header_received(self, header: ProxyHeader, remaining: bytes) -> None:
        self._stop_waiting()
        self._parser = None
        reason = refusal_reason(header)
        if reason is not None:
            self._refuse(
                reason, f"v{header.version} {header.command.name} {header.family.name}"
            )
            return
        assert header.source is not None and header.destination is not None
        self.header = header
        self._peer = header_address(header.source, header.family)
        self._host = header_address(header.destination, header.family)
        protocol = self.factory.wrapped_factory.buildProtocol(self._peer)
        if protocol is None:
            self.loseConnection()  # the wrapped factory's own refusal
            return
        self.wrapped = protocol
        protocol.makeConnection(self)
        if remaining and not self.disconnecting:
            protocol.dataReceived(remaining)

    def _timed_out(self) -> None:
        self._timer = None
        self._refuse("timeout", f"no complete header within {self.factory.timeout} s")

    def _refuse(self, reason: str, detail: str, close: bool = True) -> None:
        """Log why, close, and build nothing."""
        self._stop_waiting()
        if self._parser is not None:
            detail = f"{detail}; {self._parser.buffered} bytes received"
        self._parser = None
        self.factory.refused[reason] += 1
        _log_refused(self.socket_peer(), reason, detail)
        if close:
            self.loseConnection()

    def _stop_waiting(self) -> None:
        """The header wait is over: cancel the timer, leave the count."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._waiting:
            self._waiting = False
            self.factory.pending -= 1

    def readConnectionLost(self) -> None:
        if self.wrapped is None:
            if self._parser is not None:
                self._refuse("incomplete", "EOF before a complete header")
            return
        half_closeable = IHalfCloseableProtocol(self.wrapped, None)
        if half_closeable is not None:
            half_closeable.readConnectionLost()
        else:
            self.loseConnection()

    def writeConnectionLost(self) -> None:
        half_closeable = IHalfCloseableProtocol(self.wrapped, None)
        if half_closeable is not None:
            half_closeable.writeConnectionLost()
        else:
            self.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._parser is not None:
            self._refuse("incomplete", "closed before a complete header", False)
        self.connected = 0
        wrapped, self.wrapped = self.wrapped, None
        if wrapped is not None:
            wrapped.connectionLost(reason)

    # -- as the wrapped protocol's transport -------------------------------

    @property
    def _socket(self) -> Any:
        """The transport of the socket itself."""
        return self.transport

    @property
    def spliceable_transport(self) -> ITransport | None:
        """
        The socket's own transport, once the header is consumed (None
        before): this wrapper holds no bytes of its own, so a zero-copy
        relay may take that socket over.
        """
        if self.wrapped is None:
            return None
        return self.transport

    def socket_host(self) -> IAddress:
        """The socket's own local address (this backend's), see L{real_host}."""
        host: IAddress = self._socket.getHost()
        return host

    def socket_peer(self) -> IAddress | None:
        """The socket's own peer: the balancer."""
        if self.transport is None:
            return None
        peer: IAddress = self._socket.getPeer()
        return peer

    def getPeer(self) -> IAddress:
        """The header's source: the client."""
        if self._peer is not None:
            return self._peer
        peer: IAddress = self._socket.getPeer()
        return peer

    def getHost(self) -> IAddress:
        """The header's destination: the balancer's frontend address."""
        if self._host is not None:
            return self._host
        return self.socket_host()

    def write(self, data: bytes) -> None:
        self._socket.write(data)

    def writeSequence(self, data: Any) -> None:
        self._socket.writeSequence(data)

    def loseConnection(self) -> None:
        self.disconnecting = True
        self._socket.loseConnection()

    def abortConnection(self) -> None:
        self.disconnecting = True
        self._socket.abortConnection()

    def loseWriteConnection(self) -> None:
        self._socket.loseWriteConnection()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._socket.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._socket.unregisterProducer()

    def pauseProducing(self) -> None:
        self._socket.pauseProducing()

    def resumeProducing(self) -> None:
        self._socket.resumeProducing()

    def stopProducing(self) -> None:
        self._socket.stopProducing()

    def __getattr__(self, name: str) -> Any:
        # The rest of the socket transport's face (setTcpKeepAlive,
        # setTcpNoDelay, getHandle, ...), as ProtocolWrapper does.
        if name.startswith("__") or name == "transport":
            raise AttributeError(name)
        return getattr(self.transport, name)


class _TooMany(Protocol):
    """A connection over the cap on waiting headers: logged, closed, unread."""

    def __init__(self, factory: ProxyHeaderFactory) -> None:
        self.factory = factory

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.factory.refused["too-many"] += 1
        _log_refused(
            self.transport.getPeer(),
            "too-many",
            f"{self.factory.pending} connections already wait for a header",
        )
        self.transport.loseConnection()


class ProxyHeaderFactory(ServerFactory):
    """
    Wraps C{wrapped_factory} so that its protocols are built only for
    connections with a valid PROXY header, for the client it names.

    @param timeout: seconds for the header (default: the wrapped factory's
        C{settings.handshake_timeout}, else L{DEFAULT_HEADER_TIMEOUT}).
    @param max_pending: connections at once still waiting for their header,
        refused past it (default: the wrapped factory's
        C{settings.max_connections}, else L{DEFAULT_MAX_PENDING}; 0: no cap).
    @ivar pending: connections waiting for their header now.
    @ivar refused: connections closed without being served, by reason.
    """

    noisy = False

    def __init__(
        self,
        wrapped_factory: IProtocolFactory,
        clock: IReactorTime,
        timeout: float | None = None,
        max_pending: int | None = None,
        max_v2_length: int = DEFAULT_MAX_V2_LENGTH,
    ) -> None:
        self.wrapped_factory = wrapped_factory
        self.clock = clock
        settings = getattr(wrapped_factory, "settings", None)
        if timeout is None:
            timeout = getattr(settings, "handshake_timeout", DEFAULT_HEADER_TIMEOUT)
        if max_pending is None:
            max_pending = getattr(settings, "max_connections", DEFAULT_MAX_PENDING)
        self.timeout: float = timeout
        self.max_pending: int = max_pending
        self.max_v2_length = max_v2_length
        self.pending = 0
        self.refused: Counter[str] = Counter()

    def logPrefix(self) -> str:
        wrapped_prefix = getattr(self.wrapped_factory, "logPrefix", None)
        if callable(wrapped_prefix):
            return f"{wrapped_prefix()} (PROXY)"
        return f"{type(self.wrapped_factory).__name__} (PROXY)"

    def doStart(self) -> None:
        self.wrapped_factory.doStart()
        super().doStart()

    def doStop(self) -> None:
        self.wrapped_factory.doStop()
        super().doStop()

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        if self.max_pending and self.pending >= self.max_pending:
            return _TooMany(self)
        return ProxyHeaderProtocol(self)


@implementer(IStreamServerEndpoint)
class ProxyHeaderEndpoint:
    """Listens on C{wrapped} with each factory wrapped in L{ProxyHeaderFactory}."""

    def __init__(
        self, wrapped: IStreamServerEndpoint, clock: IReactorTime | None = None
    ) -> None:
        self.wrapped = wrapped
        self.clock = clock

    def listen(
        self, protocolFactory: IProtocolFactory
    ) -> defer.Deferred[IListeningPort]:
        clock = self.clock or getattr(protocolFactory, "clock", None)
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        return self.wrapped.listen(ProxyHeaderFactory(protocolFactory, clock))


def proxy_header_endpoint(
    wrapped: IStreamServerEndpoint, clock: IReactorTime | None = None
) -> IStreamServerEndpoint:
    """
    C{wrapped}, speaking the PROXY protocol (v1 and v2) on every connection.
    The header timeout comes from C{clock} (default: the listening
    factory's C{clock}, as L{socks4tx.server.SOCKS4Factory} has).
    """
    return ProxyHeaderEndpoint(wrapped, clock)


def listen_description(reactor: Any, description: str) -> IStreamServerEndpoint | None:
    """
    The endpoint for C{haproxy:REST} (REST: any server endpoint description,
    such as C{tcp:1080:interface=10.0.0.5}), with this module's wrapper in
    place of Twisted's; None for any other description.
    """
    kind, _, rest = description.partition(":")
    if kind.lower() != PREFIX:
        return None
    if not rest:
        raise ValueError(
            f"{description!r}: haproxy: wraps an endpoint, as in haproxy:tcp:1080"
        )
    return proxy_header_endpoint(serverFromString(reactor, rest), clock=reactor)
