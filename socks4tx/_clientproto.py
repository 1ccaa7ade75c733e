"""
The client's protocol: one SOCKS4 request on a fresh connection to the
proxy, its reply (two for BIND), then the application's protocol on that
same connection.

This is the private half of L{socks4tx.client}; the errors are public and
re-exported there.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import NoProtocol
from twisted.internet.interfaces import (
    IAddress,
    IHalfCloseableProtocol,
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    IStreamClientEndpoint,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from .wire import BadReply, Reply, ReplyCode, ReplyParser, Request

# -- errors ---------------------------------------------------------------------


class SOCKSError(Exception):
    """The proxy did not open the tunnel: the base of this client's errors."""


class Rejected(SOCKSError):
    """
    The server answered with a reply other than 90.

    @ivar reply: that reply (its C{code}, and the C{port} and C{address}
        fields, which servers fill as they please on a rejection).
    """

    meaning = "request rejected"

    def __init__(self, reply: Reply) -> None:
        super().__init__(f"{reply.code.value} {self.meaning}")
        self.reply = reply


class RequestRejected(Rejected):
    """
    91: refused by the server's rules, or the destination could not be
    reached or resolved; for BIND also a timeout or the wrong peer.
    """

    meaning = "request rejected or failed"


class IdentdUnreachable(Rejected):
    """92: the server requires ident and could not ask this host's identd."""

    meaning = "rejected: the server cannot reach identd on this host"


class IdentMismatch(Rejected):
    """93: this host's identd named another user than the USERID sent."""

    meaning = "rejected: identd reports a different user-id"


class MalformedReply(SOCKSError):
    """What came back is not a SOCKS4 reply: the peer speaks something else."""


class ClosedBeforeReply(SOCKSError):
    """
    The connection to the proxy ended before the reply came.

    @ivar reason: why it ended, as given to C{connectionLost}.
    """

    def __init__(self, reason: Failure) -> None:
        super().__init__(
            f"the SOCKS server closed the connection before its reply: "
            f"{reason.getErrorMessage()}"
        )
        self.reason = reason


_REJECTIONS: dict[ReplyCode, type[Rejected]] = {
    ReplyCode.REJECTED: RequestRejected,
    ReplyCode.IDENTD_UNREACHABLE: IdentdUnreachable,
    ReplyCode.IDENT_MISMATCH: IdentMismatch,
}


# -- addresses ------------------------------------------------------------------


def announced_address(reply: Reply, proxy: IAddress) -> IPv4Address | IPv6Address:
    """
    Where a BIND's first reply says the application server must connect.
    DSTIP 0.0.0.0 means "the SOCKS server's own address": the address this
    client reached the proxy at (C{proxy}, the connection's C{getPeer()})
    stands in for it, IPv6 included.  Over a connection with no IP address
    (a UNIX socket) nothing better is known and 0.0.0.0 stays.
    """
    if reply.address != "0.0.0.0":
        return IPv4Address("TCP", reply.address, reply.port)
    if isinstance(proxy, IPv4Address):
        return IPv4Address("TCP", proxy.host, reply.port)
    if isinstance(proxy, IPv6Address):
        return IPv6Address("TCP", proxy.host, reply.port)
    return IPv4Address("TCP", reply.address, reply.port)


# -- the transport the application sees -----------------------------------------


@implementer(ITransport)
class _TunnelTransport:
    """
    The connection to the proxy as the application's protocol sees it: the
    same transport, except that L{getPeer} names the far end of the tunnel
    (as C{twisted.protocols.haproxy} rewrites the peer of the connections it
    unwraps), and that pausing also holds back the bytes that came in with
    the reply.  Everything else is the underlying transport's, and so are
    the interfaces it provides (as with C{policies.ProtocolWrapper}).
    """

    def __init__(
        self, protocol: SOCKS4ClientProtocol, transport: ITransport, peer: IAddress
    ) -> None:
        self._protocol = protocol
        self._transport = transport
        self._peer = peer
        directlyProvides(self, providedBy(transport))

    def getPeer(self) -> IAddress:
        """The destination, or for BIND the peer that the proxy accepted."""
        return self._peer

    def getHost(self) -> IAddress:
        """This end of the connection to the proxy."""
        return self._transport.getHost()

    def write(self, data: bytes) -> None:
        self._transport.write(data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self._transport.writeSequence(data)

    def loseConnection(self) -> None:
        self._transport.loseConnection()

    def pauseProducing(self) -> None:
        self._protocol.paused = True
        IPushProducer(self._transport).pauseProducing()

    def resumeProducing(self) -> None:
        self._protocol.paused = False
        IPushProducer(self._transport).resumeProducing()
        self._protocol.deliver(b"")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # ours, or Python's: never the transport's
            raise AttributeError(name)
        return getattr(self._transport, name)

    def __repr__(self) -> str:
        return f"<SOCKS4 tunnel to {self._peer} over {self._transport!r}>"


# -- the protocol ----------------------------------------------------------------


def _abort(transport: ITransport) -> None:
    """Drop the connection now; a transport without abortConnection closes."""
    abort = getattr(transport, "abortConnection", None)
    if abort is not None:
        abort()
    else:
        transport.loseConnection()


@implementer(IHalfCloseableProtocol)
class SOCKS4ClientProtocol(Protocol):
    """
    Sends one request, reads its replies, then steps aside: from the final
    90 on, the connection belongs to the protocol that the application's
    factory builds.

    The stages the caller waits on are Deferreds, in order: for CONNECT only
    L{opened} (fires with the application's protocol); for BIND first
    L{announced} (the address the application server must connect to), then
    L{opened}.  A failure fails the stage being waited on and drops the
    later ones unfired.  Cancelling a stage aborts the connection, or the
    connection attempt if the proxy isn't reached yet.

    It provides L{IHalfCloseableProtocol} from the start, because wrappers
    such as the endpoints' C{_WrappingProtocol} decide once, when they are
    built, whether to pass half-closes on; an application protocol without
    it sees a half-close as the end of the connection, as over TCP.
    """

    def __init__(
        self,
        request: Request,
        factory: IProtocolFactory,
        destination: IAddress | None,
    ) -> None:
        """
        @param destination: what the application's protocol is built for and
            sees as its peer; C{None} for BIND, whose peer comes in the
            second reply.
        """
        self._request = request
        self._factory = factory
        self._destination = destination
        self._parser = ReplyParser()
        self._connecting: Deferred[IProtocol] | None = None
        self.announced: Deferred[IPv4Address | IPv6Address] | None = None
        self.opened: Deferred[IProtocol] = Deferred(self._cancel)
        self._pending: list[Deferred[Any]] = [self.opened]
        if destination is None:
            self.announced = Deferred(self._cancel)
            self._pending.insert(0, self.announced)
        self._app: IProtocol | None = None
        #: Whether the application's protocol is connected and may get bytes.
        self._relaying = False
        self._held = b""
        self._lost = False
        #: Set by the tunnel transport while the application pauses reading.
        self.paused = False

    def connect_through(self, proxy: IStreamClientEndpoint) -> None:
        """Connect to the proxy; the stages report what happens next."""
        factory = _OneProtocolFactory(self, self._factory)
        self._connecting = maybeDeferred(proxy.connect, factory)
        self._connecting.addErrback(self._proxy_unreachable)

    def _proxy_unreachable(self, reason: Failure) -> None:
        self._abandon(reason)

    def _cancel(self, deferred: Deferred[Any]) -> None:
        """Give up: the Deferred then fails with C{CancelledError}."""
        self._pending = []
        if self.transport is not None:
            _abort(self.transport)
        elif self._connecting is not None:
            self._connecting.cancel()

    def _abandon(self, reason: Failure | Exception) -> None:
        """Fail the stage being waited on; the later ones never fire."""
        pending, self._pending = self._pending, []
        if pending:
            pending[0].errback(reason)

    # -- IProtocol --

    def connectionMade(self) -> None:
        assert self.transport is not None
        if not self._pending:  # cancelled while the endpoint was connecting
            _abort(self.transport)
            return
        self.transport.write(self._request.to_bytes())

    def dataReceived(self, data: bytes) -> None:
        if self._app is not None:
            self.deliver(data)
            return
        while self._pending:
            try:
                reply = self._parser.feed(data)
            except BadReply as e:
                self._abandon(MalformedReply(str(e)))
                assert self.transport is not None
                _abort(self.transport)
                return
            if reply is None:
                return
            data = self._parser.trailing
            self._parser = ReplyParser()
            self._replied(reply)
        if self._app is not None and data:
            self.deliver(data)

    def _replied(self, reply: Reply) -> None:
        assert self.transport is not None
        if reply.code is not ReplyCode.GRANTED:
            self._abandon(_REJECTIONS[reply.code](reply))
            self.transport.loseConnection()
        elif len(self._pending) > 1:
            stage = self._pending.pop(0)
            stage.callback(announced_address(reply, self.transport.getPeer()))
        else:
            peer = self._destination or IPv4Address("TCP", reply.address, reply.port)
            self._attach(peer)

    def _attach(self, peer: IAddress) -> None:
        """Build the application's protocol and hand it the connection."""
        assert self.transport is not None
        [opened] = self._pending
        self._pending = []
        try:
            app = self._factory.buildProtocol(peer)
            if app is None:
                raise NoProtocol()
            self._app = app
            app.makeConnection(_TunnelTransport(self, self.transport, peer))
        except BaseException:
            failure = Failure()
            _abort(self.transport)
            opened.errback(failure)
            return
        self._relaying = True
        opened.callback(app)

    def deliver(self, data: bytes) -> None:
        """
        Pass bytes to the application's protocol, unless it paused reading:
        the bytes that came in with the reply were read before it could.
        """
        self._held += data
        while self._held and self._relaying and not self.paused and not self._lost:
            assert self._app is not None
            data, self._held = self._held, b""
            self._app.dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        if self._app is not None:
            self._app.connectionLost(reason)
        else:
            self._abandon(ClosedBeforeReply(reason))

    # -- IHalfCloseableProtocol --

    def readConnectionLost(self) -> None:
        assert self.transport is not None
        if self._app is not None and IHalfCloseableProtocol.providedBy(self._app):
            self._app.readConnectionLost()
        else:
            # Before the reply, or an application that can't half-close:
            # the connection ends, as TCP ends it for such a protocol.
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        if self._app is not None and IHalfCloseableProtocol.providedBy(self._app):
            self._app.writeConnectionLost()


class _OneProtocolFactory(Factory):
    """
    Hands the proxy endpoint the one protocol made for this request, and
    passes start and stop on to the application's factory, as Twisted's
    endpoints do, so that its C{startFactory} and C{stopFactory} run around
    the connection as they would without a proxy.
    """

    def __init__(
        self, protocol: SOCKS4ClientProtocol, application: IProtocolFactory
    ) -> None:
        self._protocol: SOCKS4ClientProtocol | None = protocol
        self._application = application

    def doStart(self) -> None:
        self._application.doStart()

    def doStop(self) -> None:
        self._application.doStop()

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        protocol, self._protocol = self._protocol, None
        return protocol
