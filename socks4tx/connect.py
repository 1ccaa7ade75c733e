"""
The outgoing connection of a CONNECT: one cancellable L{Deferred}.

L{twisted.internet.endpoints.TCP4ClientEndpoint} would do, but it wraps
the protocol in one of its own, which adds a call to every read of the
relay's hot path; this is the same contract without the wrapper.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.interfaces import IAddress, IConnector, IReactorTCP
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.python.failure import Failure

from socks4tx.relay import RemoteProtocol


class _Outgoing(RemoteProtocol):
    factory: _ConnectFactory

    def connectionMade(self) -> None:
        self.factory.connector = None  # (a cycle: connector.factory)
        connected = self.factory.connected
        if not connected.called:
            connected.callback(self)


class _ConnectFactory(ClientFactory):
    noisy = False

    def __init__(self) -> None:
        self.connector: IConnector | None = None
        self.connected: defer.Deferred[RemoteProtocol] = defer.Deferred(self._cancel)

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        protocol = _Outgoing()
        protocol.factory = self
        return protocol

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self.connector = None
        if not self.connected.called:
            self.connected.errback(reason)

    def _cancel(self, _: defer.Deferred[RemoteProtocol]) -> None:
        if self.connector is not None:
            self.connector.stopConnecting()


def connect_tcp(
    reactor: IReactorTCP,
    host: str,
    port: int,
    timeout: float,
    bind_address: tuple[str, int] | None = None,
) -> defer.Deferred[RemoteProtocol]:
    """
    Connect to C{host:port}.  The result fires with the connected
    L{RemoteProtocol} or fails (refused, unreachable, L{TimeoutError} after
    C{timeout}); cancelling it stops the attempt.
    """
    factory = _ConnectFactory()
    factory.connector = reactor.connectTCP(
        host, port, factory, timeout=timeout, bindAddress=bind_address
    )
    return factory.connected
