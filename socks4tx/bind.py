"""
The BIND listener: one socket that accepts exactly one connection, from the
application server named in the request, within a time limit.

The listener is closed on every path: on the first accept (matching or
not), at the timeout, and when the waiting L{Deferred} is cancelled because
the client left.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Collection

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IListeningPort,
    IReactorTCP,
    IReactorTime,
)
from twisted.internet.protocol import Protocol, ServerFactory

from socks4tx.relay import RemoteProtocol


class BindMismatch(Exception):
    """The inbound connection came from a host other than the one named."""

    def __init__(self, peer: IPv4Address) -> None:
        super().__init__(f"inbound connection from {peer.host}:{peer.port}")
        self.peer = peer


def route_source_address(destination: str) -> str | None:
    """
    The local address the kernel would use to reach C{destination}: where a
    BIND listener must be so that the application server can reach it.

    Connecting an unbound UDP socket sends no packet; it only asks for a
    route.  C{None} when there is no route.
    """
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect((destination, 9))
        address: str = probe.getsockname()[0]
        return address
    except OSError as error:
        if error.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EINVAL):
            return None
        raise
    finally:
        probe.close()


class _OneShotFactory(ServerFactory):
    noisy = False

    def __init__(self, listener: BindListener) -> None:
        self.listener = listener

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        return self.listener._accept(addr)


class BindListener:
    """
    Listen on C{interface}, any port, for one connection from one of
    C{allowed} (IPv4 addresses as strings).

    L{accepted} fires with the connected L{RemoteProtocol}, or fails with
    L{BindMismatch} or L{defer.TimeoutError}.
    """

    def __init__(
        self,
        reactor: IReactorTCP,
        clock: IReactorTime,
        interface: str,
        allowed: Collection[str],
        timeout: float,
    ) -> None:
        self._reactor = reactor
        self._clock = clock
        self._interface = interface
        self._allowed = frozenset(allowed)
        self._timeout = timeout
        self._port: IListeningPort | None = None
        self._timer: IDelayedCall | None = None
        self.accepted: defer.Deferred[RemoteProtocol] = defer.Deferred(self._cancel)

    def listen(self) -> IPv4Address:
        """Open the socket (raises L{CannotListenError}) and start the clock."""
        self._port = self._reactor.listenTCP(
            0, _OneShotFactory(self), backlog=1, interface=self._interface
        )
        self._timer = self._clock.callLater(self._timeout, self._timed_out)
        address = self._port.getHost()
        assert isinstance(address, IPv4Address)
        return address

    @property
    def open(self) -> bool:
        return self._port is not None

    def close(self) -> None:
        """Stop listening and stop the clock; idempotent."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._port is not None:
            port, self._port = self._port, None
            port.stopListening()

    def _accept(self, addr: IAddress | None) -> Protocol | None:
        if self._port is None or self.accepted.called:
            return None  # a second connection: refused
        self.close()
        if not isinstance(addr, IPv4Address) or addr.host not in self._allowed:
            if isinstance(addr, IPv4Address):
                self.accepted.errback(BindMismatch(addr))
            else:
                self.accepted.errback(BindMismatch(IPv4Address("TCP", "0.0.0.0", 0)))
            return None  # closes the inbound connection
        protocol = _InboundProtocol()
        protocol.listener = self
        return protocol

    def _connected(self, protocol: RemoteProtocol) -> None:
        if not self.accepted.called:
            self.accepted.callback(protocol)

    def _timed_out(self) -> None:
        self._timer = None
        self.close()
        if not self.accepted.called:
            self.accepted.errback(defer.TimeoutError(self._timeout, "BIND accept"))

    def _cancel(self, _: defer.Deferred[RemoteProtocol]) -> None:
        self.close()


class _InboundProtocol(RemoteProtocol):
    listener: BindListener

    def connectionMade(self) -> None:
        self.listener._connected(self)
