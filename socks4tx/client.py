"""
A SOCKS4 and SOCKS4A client for Twisted: an endpoint for CONNECT, a
function for BIND, and the C{socks4:} endpoint string.

    proxy = TCP4ClientEndpoint(reactor, "127.0.0.1", 1080)
    endpoint = SOCKS4ClientEndpoint("example.com", 80, proxy, userid=b"alice")
    protocol = await endpoint.connect(factory)

or C{clientFromString(reactor, r"socks4:example.com:80:proxy=tcp\\:127.0.0.1\\:1080")}.

SOCKS4 carries IPv4 destinations only: an IPv4 literal goes as SOCKS4, a
name as SOCKS4A (the proxy resolves it) unless C{resolve_locally} is set,
and an IPv6 literal is refused with C{ValueError} before anything is sent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from twisted.internet.abstract import isIPv6Address
from twisted.internet.address import HostnameAddress, IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString
from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import (
    IAddress,
    IHostResolution,
    IProtocol,
    IProtocolFactory,
    IReactorCore,
    IReactorPluggableNameResolver,
    IReactorTime,
    IResolutionReceiver,
    IStreamClientEndpoint,
    IStreamClientEndpointStringParserWithReactor,
)
from twisted.plugin import IPlugin
from zope.interface import implementer

from ._clientproto import (
    ClosedBeforeReply,
    IdentdUnreachable,
    IdentMismatch,
    MalformedReply,
    Rejected,
    RequestRejected,
    SOCKS4ClientProtocol,
    SOCKSError,
)
from .wire import Command, Request, pack_ipv4

__all__ = [
    "ClosedBeforeReply",
    "IdentMismatch",
    "IdentdUnreachable",
    "MalformedReply",
    "PendingBind",
    "Rejected",
    "RequestRejected",
    "SOCKS4ClientEndpoint",
    "SOCKS4ClientParser",
    "SOCKSError",
    "bind",
]

_T = TypeVar("_T")

#: DSTIP of a SOCKS4A request: 0.0.0.x, x != 0, says "a host name follows".
_SOCKS4A_ADDRESS = "0.0.0.1"


@dataclass(frozen=True)
class _Destination:
    """A host and port as SOCKS4 can carry them, checked before any I/O."""

    host: str
    port: int
    #: The IPv4 literal, or None for a name.
    address: str | None
    #: The name as sent in a SOCKS4A request, or None for an IPv4 literal.
    hostname: bytes | None

    @classmethod
    def parse(cls, host: str, port: int) -> _Destination:
        if not 0 <= port <= 65535:
            raise ValueError(f"port {port} is not in 0-65535")
        try:
            packed = pack_ipv4(host)
        except ValueError:
            pass
        else:
            if packed[:3] == b"\0\0\0" and packed[3]:
                raise ValueError(
                    f"{host} can't be sent: DSTIP 0.0.0.x means SOCKS4A on the wire"
                )
            return cls(host, port, host, None)
        if isIPv6Address(host.removeprefix("[").removesuffix("]")):
            raise ValueError(f"{host!r} is an IPv6 address: SOCKS4 carries IPv4 only")
        try:
            hostname = host.encode("ascii") if host.isascii() else host.encode("idna")
        except UnicodeError as e:
            raise ValueError(f"{host!r} is not a valid host name: {e}") from None
        # What DNS and /etc/hosts can hold (the server's check too); a colon
        # would be a port, or an IPv6 address gone wrong.
        if not 0 < len(hostname) <= 255 or not all(
            0x21 <= byte < 0x7F and byte != 0x3A for byte in hostname
        ):
            raise ValueError(f"{host!r} is not a valid host name")
        return cls(host, port, None, hostname)


def _check_userid(userid: bytes) -> bytes:
    if b"\0" in userid:
        raise ValueError("a USERID can't contain NUL: it ends the field")
    return userid


@implementer(IResolutionReceiver)
class _FirstIPv4:
    """Collects a resolution's IPv4 addresses into a Deferred of the first."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._addresses: list[str] = []
        self.deferred: Deferred[str] = Deferred()

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:
        pass

    def addressResolved(self, address: IAddress) -> None:
        if isinstance(address, IPv4Address):
            self._addresses.append(address.host)

    def resolutionComplete(self) -> None:
        if self.deferred.called:  # cancelled meanwhile
            return
        if self._addresses:
            self.deferred.callback(self._addresses[0])
        else:
            self.deferred.errback(
                DNSLookupError(f"{self._name!r} has no IPv4 address for SOCKS4")
            )


def _resolve_ipv4(reactor: object, name: str, port: int) -> Deferred[str]:
    """
    The first IPv4 address of C{name}, from the reactor's resolver.  A
    lookup can't be stopped once started; cancelling fails the Deferred at
    once and its answer is ignored.
    """
    receiver = _FirstIPv4(name)
    IReactorPluggableNameResolver(reactor).nameResolver.resolveHostName(
        receiver, name, port, addressTypes=[IPv4Address], transportSemantics="TCP"
    )
    return receiver.deferred


@implementer(IStreamClientEndpoint)
class SOCKS4ClientEndpoint:
    """
    A connection to C{host}:C{port} through the SOCKS4 server that
    C{proxyEndpoint} reaches.

    The protocol is built with the destination as its address
    (C{IPv4Address}, or C{HostnameAddress} for a name the proxy resolves),
    and its transport's C{getPeer()} returns the same; C{getHost()} is this
    end of the connection to the proxy.  Half-close passes through when the
    proxy connection supports it.

    L{connect}'s Deferred fails with L{RequestRejected} (91),
    L{IdentdUnreachable} (92), L{IdentMismatch} (93), L{MalformedReply},
    L{ClosedBeforeReply}, or whatever the proxy endpoint fails with.
    Cancelling it aborts the attempt at any step (resolving, reaching the
    proxy, waiting for the reply) with C{CancelledError}.
    """

    def __init__(
        self,
        host: str,
        port: int,
        proxyEndpoint: IStreamClientEndpoint,
        userid: bytes = b"",
        reactor: IReactorTime | None = None,
        *,
        resolve_locally: bool = False,
        timeout: float | None = None,
    ) -> None:
        """
        @param host: an IPv4 literal (sent as SOCKS4) or a host name (sent
            as SOCKS4A); an IPv6 literal raises C{ValueError}.
        @param userid: the USERID field, an identification and not a
            secret (anyone on the path sees it).
        @param reactor: used only for C{resolve_locally} and C{timeout};
            the global reactor if not given.
        @param resolve_locally: resolve a host name here, with the
            reactor's C{nameResolver}, and send its first IPv4 address as
            plain SOCKS4, for servers without SOCKS4A (Dante, for one).
        @param timeout: seconds for the whole attempt, resolving and the
            proxy's reply included; then C{defer.TimeoutError}.  The proxy
            endpoint's own connect timeout applies within it.
        """
        self._destination = _Destination.parse(host, port)
        self._proxy = proxyEndpoint
        self._userid = _check_userid(userid)
        self._reactor = reactor
        self._resolve_locally = resolve_locally
        self._timeout = timeout

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        """CONNECT; fires with the protocol once the proxy said 90."""
        return self._open(Command.CONNECT, protocolFactory, _opened)

    def _open(
        self,
        command: Command,
        factory: IProtocolFactory,
        stage: Callable[[SOCKS4ClientProtocol], Deferred[_T]],
    ) -> Deferred[_T]:
        """
        Send one request and wait for C{stage} of its protocol.  Cancelling
        the result cancels the step under way: a lookup, through Deferred
        chaining, or the protocol's stage, which aborts the connection.
        """
        destination = self._destination
        if destination.address is not None:
            result = stage(self._request(command, factory, destination.address))
        elif not self._resolve_locally:
            result = stage(self._request(command, factory, None))
        else:
            result = _resolve_ipv4(
                self._get_reactor(), destination.host, destination.port
            ).addCallback(
                lambda address: stage(self._request(command, factory, address))
            )
        if self._timeout is not None:
            result.addTimeout(self._timeout, self._get_reactor())
        return result

    def _request(
        self, command: Command, factory: IProtocolFactory, address: str | None
    ) -> SOCKS4ClientProtocol:
        """Start one request to C{address}, or by name (SOCKS4A) if None."""
        port = self._destination.port
        hostname = None if address is not None else self._destination.hostname
        request = Request(
            command, port, address or _SOCKS4A_ADDRESS, self._userid, hostname
        )
        peer: IAddress | None = None
        if command is Command.CONNECT:
            peer = (
                IPv4Address("TCP", address, port)
                if address is not None
                else HostnameAddress(self._destination.hostname or b"", port)
            )
        protocol = SOCKS4ClientProtocol(request, factory, peer)
        protocol.connect_through(self._proxy)
        return protocol

    def _get_reactor(self) -> IReactorTime:
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        assert self._reactor is not None
        return self._reactor

    def __repr__(self) -> str:
        d = self._destination
        return f"<SOCKS4ClientEndpoint {d.host}:{d.port} via {self._proxy!r}>"


def _opened(protocol: SOCKS4ClientProtocol) -> Deferred[IProtocol]:
    return protocol.opened


@dataclass(frozen=True)
class PendingBind:
    """
    A BIND that the proxy accepted: it listens for the application server.

    @ivar announced: where the application server must connect: the first
        reply's address and port.  A server that announces 0.0.0.0 means
        "my own address"; it is replaced by the address this client reached
        the proxy at (its C{getPeer()} host, IPv4 or IPv6).
    @ivar connected: fires with the protocol the factory builds once the
        application server has connected and the proxy sent its second 90;
        that protocol's address and C{transport.getPeer()} are the peer the
        proxy accepted, from the second reply.  It fails with
        L{RequestRejected} when the proxy gives up (its BIND timeout, or a
        peer other than the one named), and cancelling it closes the
        connection to the proxy.
    """

    announced: IPv4Address | IPv6Address
    connected: Deferred[IProtocol]


def bind(
    proxyEndpoint: IStreamClientEndpoint,
    host: str,
    port: int,
    factory: IProtocolFactory,
    userid: bytes = b"",
    reactor: IReactorTime | None = None,
    *,
    resolve_locally: bool = False,
    timeout: float | None = None,
) -> Deferred[PendingBind]:
    """
    BIND: ask the proxy to accept one connection from the application
    server C{host} (the proxy lets only that host in), as active-mode FTP
    needs.  C{port} is the port of the primary connection to it, as the
    protocol asks.  Fires with a L{PendingBind} once the proxy listens; tell
    the application server its C{announced} address, then wait for its
    C{connected}.

    The arguments and failures are L{SOCKS4ClientEndpoint}'s; C{timeout}
    covers the wait for the first reply only (the second comes when the
    application server connects: put a timeout on C{connected} for that).
    """
    endpoint = SOCKS4ClientEndpoint(
        host,
        port,
        proxyEndpoint,
        userid,
        reactor,
        resolve_locally=resolve_locally,
        timeout=timeout,
    )
    return endpoint._open(Command.BIND, factory, _announced)


def _announced(protocol: SOCKS4ClientProtocol) -> Deferred[PendingBind]:
    assert protocol.announced is not None
    return protocol.announced.addCallback(
        lambda address: PendingBind(address, protocol.opened)
    )


@implementer(IPlugin, IStreamClientEndpointStringParserWithReactor)
class SOCKS4ClientParser:
    """
    The C{socks4:} client endpoint string, after Twisted's C{tls:} (which
    also takes its transport as a nested description)::

        socks4:HOST:PORT:proxy=DESCRIPTION[:userid=NAME][:resolve=local][:timeout=SECONDS]

    C{proxy} is the client endpoint description of the SOCKS server, with
    its colons escaped (C{proxy=tcp\\:127.0.0.1\\:1080}); C{HOST} and
    C{PORT} may also be given as C{host=} and C{port=}.  C{userid} is sent
    as UTF-8.  C{resolve=local} resolves a name here and sends SOCKS4; the
    default, C{resolve=proxy}, sends names as SOCKS4A.
    """

    prefix = "socks4"

    def parseStreamClient(
        self, reactor: IReactorCore, *args: object, **kwargs: object
    ) -> IStreamClientEndpoint:
        return _parse(reactor, *args, **kwargs)  # type: ignore[arg-type]


def _parse(
    reactor: Any,
    host: str,
    port: str,
    proxy: str | None = None,
    userid: str = "",
    resolve: str = "proxy",
    timeout: str | None = None,
) -> SOCKS4ClientEndpoint:
    if proxy is None:
        raise ValueError(
            "socks4: needs proxy=, the endpoint of the SOCKS server, "
            "e.g. proxy=tcp\\:127.0.0.1\\:1080"
        )
    if resolve not in ("proxy", "local"):
        raise ValueError(f"socks4: resolve={resolve!r}: 'proxy' or 'local'")
    return SOCKS4ClientEndpoint(
        host,
        int(port),
        clientFromString(reactor, proxy),
        userid.encode("utf-8"),
        reactor,
        resolve_locally=resolve == "local",
        timeout=None if timeout is None else float(timeout),
    )
