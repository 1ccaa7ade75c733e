"""
Fakes for protocol-level tests: a reactor, transports and a resolver that
the test drives by hand, and L{Proxy}, which runs one SOCKS4 session on
them and captures its log event.

Nothing here sends a packet or waits for real time.  (The server's own
route lookup for BIND and its local-address probe open and close a socket
without traffic.)
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IAddress, IListeningPort
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.names import dns
from twisted.python.failure import Failure
from zope.interface import implementer

from socks4tx.rules import Decision, Policy
from socks4tx.server import Settings, SOCKS4Factory, SOCKS4Server
from socks4tx.wire import Command, Reply, ReplyCode, Request

SESSION_NAMESPACE = "socks4tx.session"
#: The session event's fields, exactly SPEC.md's "The session log event".
SESSION_FIELDS = frozenset(
    {
        "client",
        "client_port",
        "userid",
        "command",
        "dst_host",
        "dst_ip",
        "dst_port",
        "reply",
        "reason",
        "rule",
        "ident",
        "bytes_up",
        "bytes_down",
        "duration",
        "relay",
    }
)

PROXY_ADDRESS = IPv4Address("TCP", "127.0.0.1", 1080)
CLIENT_ADDRESS = IPv4Address("TCP", "127.0.0.1", 50123)
#: The local end of the outgoing socket in tests that complete a CONNECT.
OUTGOING_ADDRESS = IPv4Address("TCP", "192.0.2.7", 41234)


def reply_bytes(code: ReplyCode, port: int = 0, address: str = "0.0.0.0") -> bytes:
    return Reply(code, port, address).to_bytes()


GRANTED_BYTES_PREFIX = bytes([0, ReplyCode.GRANTED])
REJECTED = reply_bytes(ReplyCode.REJECTED)


def connect_request(
    address: str = "198.51.100.5",
    port: int = 80,
    userid: bytes = b"alice",
    hostname: bytes | None = None,
) -> bytes:
    return Request(Command.CONNECT, port, address, userid, hostname).to_bytes()


def bind_request(
    address: str = "127.0.0.1",
    port: int = 21,
    userid: bytes = b"alice",
    hostname: bytes | None = None,
) -> bytes:
    return Request(Command.BIND, port, address, userid, hostname).to_bytes()


class FakeTransport(StringTransport):
    """
    A L{StringTransport} with the behaviour of Twisted's TCP transports
    where the server relies on it: unregistering a producer never raises,
    C{loseWriteConnection} exists, keepalive can be set, and producing can
    be resumed after C{loseConnection} (a no-op on a real transport).

    Closing is not delivered by itself: L{deliver_close} (or
    L{settle}) calls the protocol's C{connectionLost}, as the reactor would
    once the buffer is flushed.  Writes after that still land in L{value},
    so a test sees anything written to a closed connection.
    """

    def __init__(
        self,
        protocol: Protocol | None,
        host: IAddress,
        peer: IAddress,
    ) -> None:
        super().__init__(host, peer, lenient=True)
        self.protocol = protocol  # type: ignore[assignment]
        self.write_closed = False
        self.keepalive: bool | None = None
        self.lost = False
        self.producers: list[Any] = []

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        super().registerProducer(producer, streaming)
        self.producers.append(producer)

    def unregisterProducer(self) -> None:
        self.producer = None
        self.streaming = None

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def setTcpKeepAlive(self, enabled: int) -> None:
        self.keepalive = bool(enabled)

    @property
    def closed(self) -> bool:
        """The owner asked to close (or abort) this connection."""
        return bool(self.disconnecting or self.disconnected)

    def deliver_close(self, reason: type[Exception] = ConnectionDone) -> None:
        """The connection is gone: tell the protocol, once."""
        if self.lost:
            return
        self.lost = True
        self.connected = False
        self.producerState = "stopped"
        assert self.protocol is not None
        self.protocol.connectionLost(Failure(reason()))

    def deliver_eof(self) -> None:
        """The peer shut down its write side."""
        self.protocol.readConnectionLost()  # type: ignore[attr-defined]

    def receive(self, data: bytes) -> None:
        """Bytes arrive from the peer."""
        assert not self.lost
        self.protocol.dataReceived(data)


def settle(*transports: FakeTransport) -> None:
    """Deliver C{connectionLost} to every transport its owner closed."""
    progress = True
    while progress:
        progress = False
        for transport in transports:
            if transport.closed and not transport.lost:
                transport.deliver_close()
                progress = True


@implementer(IListeningPort)
class FakePort:
    """A listening port that knows its address and whether it was stopped."""

    def __init__(self, address: IPv4Address) -> None:
        self.address = address
        self.stopped = False

    def startListening(self) -> None:
        pass

    def stopListening(self) -> defer.Deferred[None]:
        self.stopped = True
        return defer.succeed(None)

    def getHost(self) -> IPv4Address:
        return self.address


class FakeReactor(MemoryReactorClock):
    """
    A L{MemoryReactorClock} whose TCP ports report the interface they were
    asked for and a real-looking port number, and remember being stopped.
    """

    FIRST_PORT = 50000

    def __init__(self) -> None:
        super().__init__()
        self.ports: list[FakePort] = []

    def listenTCP(  # type: ignore[override]
        self, port: int, factory: Any, backlog: int = 50, interface: str = ""
    ) -> FakePort:
        self.tcpServers.append((port, factory, backlog, interface))
        number = port or self.FIRST_PORT + len(self.ports)
        listening = FakePort(IPv4Address("TCP", interface or "0.0.0.0", number))
        self.ports.append(listening)
        return listening


class FakeResolver:
    """An IResolver's lookupAddress, answered by the test."""

    def __init__(self) -> None:
        self.lookups: list[tuple[str, Any, defer.Deferred[Any]]] = []

    def lookupAddress(self, name: str, timeout: Any = None) -> defer.Deferred[Any]:
        lookup: defer.Deferred[Any] = defer.Deferred()
        self.lookups.append((name, timeout, lookup))
        return lookup

    def answer(self, *addresses: str, index: int = -1) -> None:
        name, _, lookup = self.lookups[index]
        lookup.callback(a_records(name, *addresses))


LookupResult = tuple[list[dns.RRHeader], list[Any], list[Any]]


def a_records(name: str, *addresses: str) -> LookupResult:
    """A lookupAddress result: A records (IPv6 literals become AAAA)."""
    answers = []
    for address in addresses:
        if ipaddress.ip_address(address).version == 4:
            record: Any = dns.Record_A(address, 60)
            answers.append(dns.RRHeader(name.encode(), dns.A, dns.IN, 60, record))
        else:
            record = dns.Record_AAAA(address, 60)
            answers.append(dns.RRHeader(name.encode(), dns.AAAA, dns.IN, 60, record))
    return answers, [], []


class ScriptedPolicy:
    """
    A policy that records its questions and answers each with one
    decision; it names the event commands a rules file may carry.
    """

    def __init__(self, decision: Decision) -> None:
        self.decision = decision
        self.questions: list[tuple[object, ...]] = []
        self.no_identd_command = "no-identd %a"
        self.bad_id_command = "bad-id %U %u"

    def decide(
        self,
        source: str | None,
        destination: str,
        port: int,
        userid: bytes,
        command: Command,
    ) -> Decision:
        self.questions.append((source, destination, port, userid, command))
        return self.decision


class Proxy:
    """
    One SOCKS4 session on fakes: L{start} builds the server side of a client
    connection; helpers drive the outgoing connection, the BIND inbound
    connection and the clock; L{session} is the one log event.

    Use it as a context manager: it captures log events while open.
    """

    #: The class of the connections the helpers hand to the server (the
    #: outgoing connection, BIND inbound connections); a test may put a
    #: subclass of L{FakeTransport} here to watch them from the start.
    transport_class: type[FakeTransport] = FakeTransport

    def __init__(self) -> None:
        self.events: list[LogEvent] = []
        self.reactor = FakeReactor()
        self.resolver = FakeResolver()
        self.remotes: list[FakeTransport] = []
        self.inbound: list[FakeTransport] = []
        #: The outgoing connect attempt ended (succeeded or failed).
        self.connect_done = False

    def __enter__(self) -> Proxy:
        globalLogPublisher.addObserver(self.events.append)
        return self

    def __exit__(self, *exc_info: object) -> None:
        globalLogPublisher.removeObserver(self.events.append)

    def start(
        self,
        settings: Settings | None = None,
        policy: Policy | None = None,
        peer: IAddress = CLIENT_ADDRESS,
        **options: Any,
    ) -> SOCKS4Server:
        if settings is None:
            options.setdefault("listening", {("127.0.0.1", 1080)})
            settings = Settings(**options)
        self.factory = SOCKS4Factory(self.reactor, settings, policy, self.resolver)
        self.protocol = self.factory.buildProtocol(peer)
        self.client = FakeTransport(self.protocol, PROXY_ADDRESS, peer)
        self.protocol.makeConnection(self.client)
        return self.protocol

    # -- the client -----------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.client.receive(data)

    def client_leaves(self) -> None:
        self.client.deliver_close()

    # -- the outgoing connection (CONNECT) --------------------------------------

    def connect_attempt(self) -> tuple[str, int, Any, float, Any]:
        assert len(self.reactor.tcpClients) == 1, self.reactor.tcpClients
        return self.reactor.tcpClients[0]  # type: ignore[no-any-return]

    def connection_succeeds(
        self, local: IPv4Address = OUTGOING_ADDRESS
    ) -> FakeTransport:
        host, port, factory, _, _ = self.connect_attempt()
        destination = IPv4Address("TCP", host, port)
        protocol = factory.buildProtocol(destination)
        remote = self.transport_class(protocol, local, destination)
        self.connect_done = True
        protocol.makeConnection(remote)
        self.remotes.append(remote)
        return remote

    def connection_fails(self, error: Exception | None = None) -> None:
        _, _, factory, _, _ = self.connect_attempt()
        self.connect_done = True
        factory.clientConnectionFailed(
            self.reactor.connectors[0], Failure(error or ConnectionRefusedError())
        )

    # -- the BIND listener --------------------------------------------------

    def listener(self) -> tuple[FakePort, Any, int, str]:
        assert len(self.reactor.tcpServers) == 1, self.reactor.tcpServers
        port, factory, backlog, interface = self.reactor.tcpServers[0]
        assert port == 0
        return self.reactor.ports[0], factory, backlog, interface

    def peer_connects(self, host: str, port: int = 20) -> FakeTransport | None:
        listening, factory, _, _ = self.listener()
        peer = IPv4Address("TCP", host, port)
        protocol = factory.buildProtocol(peer)
        if protocol is None:
            return None
        inbound = self.transport_class(protocol, listening.getHost(), peer)
        protocol.makeConnection(inbound)
        self.inbound.append(inbound)
        return inbound

    # -- checks ---------------------------------------------------------------

    def settle(self) -> None:
        settle(self.client, *self.remotes, *self.inbound)

    def session_events(self) -> list[LogEvent]:
        return [e for e in self.events if e.get("log_namespace") == SESSION_NAMESPACE]

    def session(self) -> LogEvent:
        """The one session event (delivering pending closes first)."""
        self.settle()
        events = self.session_events()
        assert len(events) == 1, events
        return events[0]

    def assert_ended(
        self,
        written: bytes,
        reply: int | None,
        reason: str | set[str],
    ) -> LogEvent:
        """
        The client got exactly C{written}, was closed, and the session was
        logged once with C{reply} and C{reason}; nothing is left running.
        """
        assert self.client.value() == written, (self.client.value(), written)
        assert self.client.closed or self.client.lost, "client not closed"
        event = self.session()
        got = (event["reply"], event["reason"])
        assert event["reply"] == reply, (got, reply, reason)
        if isinstance(reason, str):
            assert event["reason"] == reason, (got, reply, reason)
        else:
            assert event["reason"] in reason, (got, reply, reason)
        self.assert_clean()
        return event

    def assert_clean(self) -> None:
        """
        No timer, no listener, no pending connect, no open connection and no
        pending lookup left; no error logged.
        """
        failures = [e for e in self.events if "log_failure" in e]
        assert failures == [], [formatEvent(e) for e in failures]
        calls = self.reactor.getDelayedCalls()
        assert calls == [], f"delayed calls left: {calls}"
        assert all(port.stopped for port in self.reactor.ports), "listener left open"
        if self.reactor.connectors and not self.connect_done:
            assert all(c.stoppedConnecting for c in self.reactor.connectors), (
                "pending connect not stopped"
            )
        for transport in (self.client, *self.remotes, *self.inbound):
            assert transport.lost, f"connection left open: {transport.getPeer()}"
        for name, _, lookup in self.resolver.lookups:
            assert lookup.called, f"lookup of {name} left pending"
