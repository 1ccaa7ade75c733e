"""
Tests for L{socks4tx.proxyheader}: the PROXY protocol listener wrapper, on
fake transports and a memory reactor (no sockets, no real time).

What Twisted's own C{haproxy:} wrapper gets wrong is each checked here: the
wrapped protocol is built only after the header, for the header's client;
bad, missing, late, LOCAL and UNKNOWN headers are logged and closed with
nothing built; short first reads are fine; half-close passes through.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fakes import (
    PROXY_ADDRESS,
    REJECTED,
    FakeReactor,
    FakeResolver,
    FakeTransport,
    connect_request,
)
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IAddress,
    IHalfCloseableProtocol,
    IListeningPort,
    IProtocolFactory,
    IStreamServerEndpoint,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from socks4tx.proxyheader import (
    DEFAULT_HEADER_TIMEOUT,
    ProxyHeaderEndpoint,
    ProxyHeaderFactory,
    ProxyHeaderProtocol,
    listen_description,
    proxy_header_endpoint,
    real_host,
)
from socks4tx.proxywire import Command, Family, ProxyHeader
from socks4tx.server import Settings, SOCKS4Factory

#: The balancer, as the socket sees it.
BALANCER = IPv4Address("TCP", "10.0.0.2", 40001)
#: This backend's own listening address, as the socket sees it.
BACKEND = IPv4Address("TCP", "10.0.0.9", 1080)
CLIENT = ("192.0.2.50", 51000)
FRONTEND = ("198.51.100.1", 1080)

V2_TCP4 = ProxyHeader(2, Command.PROXY, Family.TCP4, CLIENT, FRONTEND).to_bytes()
V1_TCP4 = ProxyHeader(1, Command.PROXY, Family.TCP4, CLIENT, FRONTEND).to_bytes()
V2_TCP6 = ProxyHeader(
    2, Command.PROXY, Family.TCP6, ("2001:db8::5", 51000), ("2001:db8::1", 1080)
).to_bytes()
V2_LOCAL = ProxyHeader(2, Command.LOCAL, Family.UNSPEC).to_bytes()
V1_UNKNOWN = b"PROXY UNKNOWN\r\n"
V2_UNSPEC = ProxyHeader(2, Command.PROXY, Family.UNSPEC).to_bytes()
V2_UNIX = ProxyHeader(2, Command.PROXY, Family.UNIX_STREAM).to_bytes()
V2_UDP = ProxyHeader(2, Command.PROXY, Family.UDP4).to_bytes()


# -- fakes --------------------------------------------------------------------


@implementer(IHalfCloseableProtocol)
class Recorder(Protocol):
    """A wrapped protocol that records what happens to it."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.events.append(("made", self.transport.getPeer(), self.transport.getHost()))

    def dataReceived(self, data: bytes) -> None:
        self.events.append(("data", data))

    def readConnectionLost(self) -> None:
        self.events.append(("eof",))

    def writeConnectionLost(self) -> None:
        self.events.append(("write-lost",))

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.events.append(("lost",))


class Plain(Protocol):
    """A wrapped protocol without half-close."""

    lost = False

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost = True


class Closer(Protocol):
    """A wrapped protocol that refuses at once (as SOCKS4Factory's over-limit)."""

    received = b""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class RecordingFactory(Factory):
    def __init__(self, protocol: type[Protocol] = Recorder) -> None:
        self.protocol = protocol
        self.addresses: list[IAddress | None] = []
        self.built: list[Any] = []
        self.starts = 0
        self.stops = 0

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        self.addresses.append(addr)
        protocol = self.protocol()
        self.built.append(protocol)
        return protocol

    def doStart(self) -> None:
        self.starts += 1

    def doStop(self) -> None:
        self.stops += 1


class Rig:
    """A ProxyHeaderFactory on a memory clock, and its connections."""

    def __init__(self, wrapped: Any = None, **options: Any) -> None:
        self.clock = MemoryReactorClock()
        self.wrapped = wrapped if wrapped is not None else RecordingFactory()
        self.factory = ProxyHeaderFactory(self.wrapped, self.clock, **options)
        self.events: list[LogEvent] = []

    def connect(self, peer: IAddress = BALANCER) -> tuple[Any, FakeTransport]:
        protocol = self.factory.buildProtocol(peer)
        transport = FakeTransport(protocol, BACKEND, peer)
        protocol.makeConnection(transport)
        return protocol, transport

    def proxy_events(self) -> list[LogEvent]:
        return [e for e in self.events if e.get("log_namespace") == "socks4tx.proxy"]

    def assert_refused(self, transport: FakeTransport, reason: str) -> LogEvent:
        """Closed, nothing built, one event with the balancer and C{reason}."""
        assert transport.closed or transport.lost
        assert transport.value() == b""
        assert self.wrapped.built == []
        events = self.proxy_events()
        assert len(events) == 1, [formatEvent(e) for e in events]
        event = events[0]
        assert event["reason"] == reason
        assert event["peer"] == f"{BALANCER.host}:{BALANCER.port}"
        assert reason in formatEvent(event)
        transport.deliver_close()
        assert len(self.proxy_events()) == 1
        self.assert_clean()
        return event

    def assert_clean(self) -> None:
        assert self.clock.getDelayedCalls() == []
        assert self.factory.pending == 0


@pytest.fixture
def rig() -> Iterator[Rig]:
    rig = Rig()
    globalLogPublisher.addObserver(rig.events.append)
    try:
        yield rig
    finally:
        globalLogPublisher.removeObserver(rig.events.append)


def split_points(data: bytes) -> list[list[bytes]]:
    """The data whole, byte by byte, and cut at every offset once."""
    splits = [[data], [data[i : i + 1] for i in range(len(data))]]
    splits += [[data[:i], data[i:]] for i in range(1, len(data))]
    return splits


# -- a valid header -------------------------------------------------------------


@pytest.mark.parametrize("header", [V2_TCP4, V1_TCP4], ids=["v2", "v1"])
def test_built_after_the_header_for_its_client(rig: Rig, header: bytes) -> None:
    """
    However the header and the bytes behind it are split, the wrapped
    protocol is built once the header is complete (never before), for the
    header's client, and then gets every byte behind the header, in order.
    """
    client = IPv4Address("TCP", *CLIENT)
    for pieces in split_points(header + b"first bytes"):
        rig.wrapped.built.clear()
        rig.wrapped.addresses.clear()
        protocol, transport = rig.connect()
        fed = 0
        for piece in pieces:
            protocol.dataReceived(piece)
            fed += len(piece)
            if fed < len(header):
                assert rig.wrapped.built == [], "built before the header"
        assert rig.wrapped.addresses == [client]
        [wrapped] = rig.wrapped.built
        assert wrapped.events[0] == ("made", client, IPv4Address("TCP", *FRONTEND))
        after = b"".join(event[1] for event in wrapped.events[1:])
        assert after == b"first bytes"
        assert rig.clock.getDelayedCalls() == []
        assert rig.factory.pending == 0
        transport.deliver_close()
    assert rig.proxy_events() == []


def test_bytes_behind_the_header_in_the_same_read(rig: Rig) -> None:
    protocol, _ = rig.connect()
    protocol.dataReceived(V2_TCP4 + b"\x04\x01payload")
    [wrapped] = rig.wrapped.built
    assert wrapped.events[1:] == [("data", b"\x04\x01payload")]
    protocol.dataReceived(b"more")
    assert wrapped.events[-1] == ("data", b"more")


def test_short_first_read(rig: Rig) -> None:
    """Twisted's wrapper drops a first read under 16 (v2) or 8 (v1) bytes."""
    for header in (V2_TCP4, V1_TCP4):
        protocol, _ = rig.connect()
        protocol.dataReceived(header[:3])
        protocol.dataReceived(header[3:])
    assert len(rig.wrapped.built) == 2


def test_ipv6_client(rig: Rig) -> None:
    protocol, _ = rig.connect()
    protocol.dataReceived(V2_TCP6)
    client = IPv6Address("TCP", "2001:db8::5", 51000)
    assert rig.wrapped.addresses == [client]
    assert protocol.getPeer() == client
    assert protocol.getHost() == IPv6Address("TCP", "2001:db8::1", 1080)


def test_addresses(rig: Rig) -> None:
    """
    getPeer: the client; getHost: the balancer's frontend (as Twisted's);
    real_host and socket_host: this backend's own socket address.
    """
    protocol, transport = rig.connect()
    assert protocol.spliceable_transport is None
    protocol.dataReceived(V2_TCP4)
    assert protocol.getPeer() == IPv4Address("TCP", *CLIENT)
    assert protocol.getHost() == IPv4Address("TCP", *FRONTEND)
    assert protocol.socket_host() == BACKEND
    assert protocol.socket_peer() == BALANCER
    assert real_host(protocol) == BACKEND
    assert real_host(transport) == BACKEND  # a transport without a header
    assert protocol.spliceable_transport is transport
    assert ITransport.providedBy(protocol)


def test_transport_calls_pass_through(rig: Rig) -> None:
    protocol, transport = rig.connect()
    protocol.dataReceived(V2_TCP4)
    protocol.write(b"reply")
    protocol.writeSequence([b" and", b" more"])
    assert transport.value() == b"reply and more"
    protocol.pauseProducing()
    assert transport.producerState == "paused"
    protocol.resumeProducing()
    assert transport.producerState == "producing"
    producer = Plain()
    protocol.registerProducer(producer, True)
    assert transport.producer is producer
    protocol.unregisterProducer()
    assert transport.producer is None
    protocol.setTcpKeepAlive(1)  # the rest of the face: the socket's
    assert transport.keepalive is True
    protocol.loseWriteConnection()
    assert transport.write_closed
    protocol.loseConnection()
    assert transport.closed and protocol.disconnecting


def test_abort(rig: Rig) -> None:
    protocol, transport = rig.connect()
    protocol.dataReceived(V2_TCP4)
    protocol.abortConnection()
    assert transport.closed


def test_connection_lost_reaches_the_wrapped_protocol(rig: Rig) -> None:
    protocol, transport = rig.connect()
    protocol.dataReceived(V2_TCP4)
    [wrapped] = rig.wrapped.built
    transport.deliver_close()
    assert wrapped.events[-1] == ("lost",)
    assert protocol.wrapped is None
    assert rig.proxy_events() == []


def test_wrapped_closes_at_once(rig: Rig) -> None:
    """
    A wrapped protocol that closes in connectionMade (over a limit) gets no
    bytes: a socket's transport stops reading on loseConnection.
    """
    rig.wrapped.protocol = Closer
    protocol, transport = rig.connect()
    protocol.dataReceived(V2_TCP4 + b"request")
    [closer] = rig.wrapped.built
    assert transport.closed
    assert closer.received == b""


def test_wrapped_factory_refuses(rig: Rig) -> None:
    rig.wrapped.buildProtocol = lambda addr: None
    protocol, transport = rig.connect()
    protocol.dataReceived(V2_TCP4)
    assert transport.closed
    assert rig.factory.pending == 0


# -- half-close -----------------------------------------------------------------


def test_half_close_forwarded(rig: Rig) -> None:
    protocol, transport = rig.connect()
    protocol.dataReceived(V2_TCP4)
    [wrapped] = rig.wrapped.built
    assert IHalfCloseableProtocol.providedBy(protocol)
    transport.deliver_eof()
    protocol.writeConnectionLost()
    assert wrapped.events[-2:] == [("eof",), ("write-lost",)]
    assert not transport.closed


def test_half_close_without_support_closes(rig: Rig) -> None:
    rig.wrapped.protocol = Plain
    protocol, transport = rig.connect()
    protocol.dataReceived(V2_TCP4)
    transport.deliver_eof()
    assert transport.closed
    other, other_transport = rig.connect()
    other.dataReceived(V2_TCP4)
    other.writeConnectionLost()
    assert other_transport.closed


# -- connections that are not served ---------------------------------------------


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (V2_LOCAL, "local"),
        (V1_UNKNOWN, "unknown"),
        (V2_UNSPEC, "unknown"),
        (V2_UNIX, "unsupported-family"),
        (V2_UDP, "unsupported-family"),
        (b"GET / HTTP/1.0\r\n", "invalid"),
        (b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00", "invalid"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n", "invalid"),
    ],
)
def test_refused_and_logged(rig: Rig, header: bytes, reason: str) -> None:
    protocol, transport = rig.connect()
    protocol.dataReceived(header + b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00")
    event = rig.assert_refused(transport, reason)
    assert rig.factory.refused == {reason: 1}
    # Health checks are routine; the rest deserves a look.
    routine = reason in ("local", "unknown")
    assert event["log_level"] == (LogLevel.info if routine else LogLevel.warn)
    # Nothing more is read from a refused connection.
    protocol.dataReceived(V2_TCP4)
    assert rig.wrapped.built == []


def test_local_from_a_loopback_balancer_is_not_a_loopback_client() -> None:
    """
    The built-in policy serves loopback clients; a health check from a
    balancer on this host must not become one.
    """
    reactor = FakeReactor()
    factory = SOCKS4Factory(reactor, Settings(), resolver=FakeResolver())
    wrapper = ProxyHeaderFactory(factory, reactor)
    balancer = IPv4Address("TCP", "127.0.0.1", 40000)
    protocol = wrapper.buildProtocol(balancer)
    transport = FakeTransport(protocol, PROXY_ADDRESS, balancer)
    protocol.makeConnection(transport)
    protocol.dataReceived(V2_LOCAL + connect_request("127.0.0.1", 22))
    assert transport.closed and transport.value() == b""
    assert len(factory.sessions) == 0
    assert reactor.tcpClients == []


def test_timeout(rig: Rig) -> None:
    protocol, transport = rig.connect()
    protocol.dataReceived(V2_TCP4[:10])
    rig.clock.advance(DEFAULT_HEADER_TIMEOUT - 0.1)
    assert not transport.closed
    rig.clock.advance(0.1)
    event = rig.assert_refused(transport, "timeout")
    assert "10 bytes received" in event["detail"]


def test_timeout_from_the_wrapped_settings() -> None:
    factory = SOCKS4Factory(
        MemoryReactorClock(),
        Settings(handshake_timeout=3, max_connections=7),
        resolver=FakeResolver(),
    )
    wrapper = ProxyHeaderFactory(factory, MemoryReactorClock())
    assert (wrapper.timeout, wrapper.max_pending) == (3, 7)
    assert ProxyHeaderFactory(factory, MemoryReactorClock(), 5, 9).timeout == 5


@pytest.mark.parametrize("how", ["close", "eof"])
def test_gone_before_the_header(rig: Rig, how: str) -> None:
    """A balancer's plain TCP check connects and leaves: logged, once."""
    protocol, transport = rig.connect()
    protocol.dataReceived(V1_TCP4[:20])
    if how == "eof":
        transport.deliver_eof()
        assert transport.closed
    else:
        transport.deliver_close()
    event = rig.assert_refused(transport, "incomplete")
    assert "20 bytes received" in event["detail"]


def test_cap_on_waiting_connections(rig: Rig) -> None:
    """
    Connections still waiting for a header are capped; past the cap a new
    one is closed unread and logged; once a header is read, room is made.
    """
    rig.factory.max_pending = 2
    first, _ = rig.connect()
    _, second_transport = rig.connect()
    assert rig.factory.pending == 2
    refused = rig.factory.buildProtocol(BALANCER)
    assert not isinstance(refused, ProxyHeaderProtocol)
    refused_transport = FakeTransport(refused, BACKEND, BALANCER)
    refused.makeConnection(refused_transport)
    assert refused_transport.closed and refused_transport.value() == b""
    [event] = rig.proxy_events()
    assert (event["reason"], event["peer"]) == ("too-many", "10.0.0.2:40001")
    assert rig.wrapped.built == []
    first.dataReceived(V2_TCP4)
    assert rig.factory.pending == 1
    third, _ = rig.connect()
    assert isinstance(third, ProxyHeaderProtocol)
    second_transport.deliver_close()
    assert rig.factory.pending == 1


def test_no_cap() -> None:
    rig = Rig(max_pending=0)
    for _ in range(5):
        protocol, _ = rig.connect()
        assert isinstance(protocol, ProxyHeaderProtocol)


def test_factory_start_and_stop_reach_the_wrapped_factory(rig: Rig) -> None:
    rig.factory.doStart()
    rig.factory.doStop()
    assert (rig.wrapped.starts, rig.wrapped.stops) == (1, 1)
    assert "(PROXY)" in rig.factory.logPrefix()


# -- with the SOCKS4 server -------------------------------------------------------


class Served:
    """A SOCKS4Factory behind the wrapper, on a fake reactor."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.reactor = FakeReactor()
        self.factory = SOCKS4Factory(
            self.reactor, settings or Settings(), resolver=FakeResolver()
        )
        self.wrapper = ProxyHeaderFactory(self.factory, self.reactor)
        self.events: list[LogEvent] = []

    def connect(
        self, header: bytes, balancer: IAddress = BALANCER
    ) -> tuple[Any, FakeTransport]:
        protocol = self.wrapper.buildProtocol(balancer)
        transport = FakeTransport(protocol, BACKEND, balancer)
        protocol.makeConnection(transport)
        protocol.dataReceived(header)
        return protocol, transport

    def sessions(self) -> list[LogEvent]:
        return [e for e in self.events if e.get("log_namespace") == "socks4tx.session"]


@pytest.fixture
def served() -> Iterator[Served]:
    served = Served()
    globalLogPublisher.addObserver(served.events.append)
    try:
        yield served
    finally:
        globalLogPublisher.removeObserver(served.events.append)


def test_rules_and_log_see_the_client(served: Served) -> None:
    """
    A remote client behind a loopback balancer is denied by the built-in
    loopback-only policy, and logged as itself.
    """
    balancer = IPv4Address("TCP", "127.0.0.1", 40000)
    request = connect_request("198.51.100.5", 80)
    _, transport = served.connect(V2_TCP4 + request, balancer)
    assert transport.value() == REJECTED
    transport.deliver_close()
    [session] = served.sessions()
    assert (session["client"], session["client_port"]) == CLIENT
    assert (session["reply"], session["reason"]) == (91, "rule")


def test_loopback_client_served(served: Served) -> None:
    header = ProxyHeader(
        2, Command.PROXY, Family.TCP4, ("127.0.0.2", 40500), FRONTEND
    ).to_bytes()
    _, transport = served.connect(header + connect_request("198.51.100.5", 80))
    [(host, port, _, _, _)] = served.reactor.tcpClients
    assert (host, port) == ("198.51.100.5", 80)
    transport.deliver_close()
    [session] = served.sessions()
    assert session["client"] == "127.0.0.2"


def test_per_source_limit_counts_the_client() -> None:
    served = Served(Settings(max_connections_per_source=1))
    served.connect(V2_TCP4)
    assert served.factory.sessions.by_source == {CLIENT[0]: 1}
    other = ProxyHeader(
        2, Command.PROXY, Family.TCP4, ("192.0.2.51", 1), FRONTEND
    ).to_bytes()
    served.connect(other)
    assert served.factory.sessions.by_source == {CLIENT[0]: 1, "192.0.2.51": 1}
    _, refused = served.connect(V2_TCP4)
    assert refused.closed
    assert served.factory.sessions.refused == 1


# -- endpoints ---------------------------------------------------------------------


@implementer(IStreamServerEndpoint)
class FakeEndpoint:
    def __init__(self) -> None:
        self.factories: list[IProtocolFactory] = []

    def listen(self, factory: IProtocolFactory) -> defer.Deferred[IListeningPort]:
        self.factories.append(factory)
        return defer.Deferred()


def test_proxy_header_endpoint_wraps_the_factory() -> None:
    inner = FakeEndpoint()
    clock = MemoryReactorClock()
    endpoint = proxy_header_endpoint(inner, clock)
    assert IStreamServerEndpoint.providedBy(endpoint)
    factory = RecordingFactory()
    endpoint.listen(factory)
    [wrapper] = inner.factories
    assert isinstance(wrapper, ProxyHeaderFactory)
    assert wrapper.wrapped_factory is factory and wrapper.clock is clock


def test_endpoint_takes_the_clock_of_the_factory() -> None:
    inner = FakeEndpoint()
    reactor = FakeReactor()
    factory = SOCKS4Factory(reactor, Settings(), resolver=FakeResolver())
    proxy_header_endpoint(inner).listen(factory)
    assert inner.factories[0].clock is reactor  # type: ignore[attr-defined]


def test_listen_description() -> None:
    reactor = FakeReactor()
    endpoint = listen_description(reactor, "haproxy:tcp:0:interface=127.0.0.1")
    assert isinstance(endpoint, ProxyHeaderEndpoint)
    factory = SOCKS4Factory(reactor, Settings(), resolver=FakeResolver())
    port = endpoint.listen(factory)
    [(number, wrapper, _, interface)] = reactor.tcpServers
    assert (number, interface) == (0, "127.0.0.1")
    assert isinstance(wrapper, ProxyHeaderFactory)
    assert wrapper.wrapped_factory is factory
    # The listening port is the socket's: the server records its real address.
    listening = port.result
    assert listening.getHost().host == "127.0.0.1"
    assert isinstance(
        listen_description(reactor, "HAProxy:tcp:1080"), ProxyHeaderEndpoint
    )
    assert listen_description(reactor, "tcp:1080") is None
    assert listen_description(reactor, "unix:/tmp/haproxy.sock") is None
    with pytest.raises(ValueError, match="haproxy:tcp:1080"):
        listen_description(reactor, "haproxy:")
