"""
Tests for L{socks4tx.client}: the protocol on L{MemoryReactorClock} and
L{StringTransport} (every reply, split or with bytes behind it, each failure,
cancellation at each step), then against a real C{twistd socks4} on the real
reactor (trial's janitor fails a test that leaves a connection or a timer
behind).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import twisted.test
from blackbox import REPO, ThreadedServer, TwistdProcess, free_port
from conftest import StartServer
from hypothesis import given
from hypothesis import strategies as st
from identd import FakeIdentd, silent, user
from twisted.internet import defer, reactor, task
from twisted.internet.address import HostnameAddress, IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    serverFromString,
    wrapClientTLS,
)
from twisted.internet.error import (
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    DNSLookupError,
    NoProtocol,
)
from twisted.internet.interfaces import (
    IAddress,
    IHalfCloseableProtocol,
    IHostnameResolver,
    IHostResolution,
    IProtocol,
    IPushProducer,
    IResolutionReceiver,
    ITCPTransport,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial import unittest
from zope.interface import implementer

from socks4tx._clientproto import announced_address
from socks4tx.client import (
    ClosedBeforeReply,
    IdentdUnreachable,
    IdentMismatch,
    MalformedReply,
    PendingBind,
    Rejected,
    RequestRejected,
    SOCKS4ClientEndpoint,
    SOCKS4ClientParser,
    SOCKSError,
    bind,
)
from socks4tx.wire import Command, Reply, ReplyCode, Request

PROXY = IPv4Address("TCP", "127.0.0.1", 1080)
LOCAL = IPv4Address("TCP", "127.0.0.1", 50123)
GRANTED = Reply(ReplyCode.GRANTED, 41234, "192.0.2.99").to_bytes()


def reply(code: ReplyCode, port: int = 0, address: str = "0.0.0.0") -> bytes:
    return Reply(code, port, address).to_bytes()


# -- an application protocol that writes down what happens to it ---------------


class Recorder(Protocol):
    """Records every call, in order; C{addr} is what buildProtocol got."""

    def __init__(self, addr: IAddress | None = None) -> None:
        self.addr = addr
        self.events: list[tuple[Any, ...]] = []
        self.received = b""
        self.lost: Deferred[None] = Deferred()
        self.reason: Failure | None = None
        self.made: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.events.append(("made", self.transport.getPeer()))
        self.made.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.events.append(("data", data))
        self.received += data

    def connectionLost(self, reason: Failure = ConnectionDone) -> None:  # type: ignore[assignment]
        self.events.append(("lost", reason.type))
        self.reason = reason
        self.lost.callback(None)


class EchoRecorder(Recorder):
    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        assert self.transport is not None
        self.transport.write(data)


@implementer(IHalfCloseableProtocol)
class HalfCloseRecorder(Recorder):
    def readConnectionLost(self) -> None:
        self.events.append(("read-lost",))

    def writeConnectionLost(self) -> None:
        self.events.append(("write-lost",))


class RecorderFactory(Factory):
    """Builds L{Recorder}s (or C{protocol}) and keeps them."""

    def __init__(self, protocol: type[Recorder] = Recorder) -> None:
        self.kind = protocol
        self.built: list[Recorder] = []
        self.starts = self.stops = 0

    def startFactory(self) -> None:
        self.starts += 1

    def stopFactory(self) -> None:
        self.stops += 1

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        protocol = self.kind(addr)
        self.built.append(protocol)
        return protocol


# -- the harness: a real TCP4ClientEndpoint on MemoryReactorClock --------------


class Harness:
    """
    One client on a fake reactor; L{accept} plays the proxy accepting the
    connection (through the endpoint's own wrapping protocol), L{send}
    plays the proxy's bytes, L{close} its close.
    """

    def __init__(self, host: str = "192.0.2.9", port: int = 80, **kwargs: Any) -> None:
        self.reactor = MemoryReactorClock()
        self.proxy = TCP4ClientEndpoint(self.reactor, PROXY.host, PROXY.port)
        self.factory = RecorderFactory(kwargs.pop("protocol", Recorder))
        userid = kwargs.pop("userid", b"alice")
        self.endpoint = SOCKS4ClientEndpoint(
            host, port, self.proxy, userid, self.reactor, **kwargs
        )
        self.transport = StringTransport(hostAddress=LOCAL, peerAddress=PROXY)
        #: The endpoint's wrapping protocol around ours, as the reactor sees it.
        self.wrapper: Any = None

    def connect(self) -> Deferred[IProtocol]:
        return self.endpoint.connect(self.factory)

    def accept(self, peer: IAddress = PROXY) -> Any:
        """The proxy accepts: the request is written to L{transport}."""
        host, port, factory, _, _ = self.reactor.tcpClients[-1]
        assert (host, port) == (PROXY.host, PROXY.port)
        self.transport = StringTransport(hostAddress=LOCAL, peerAddress=peer)
        self.wrapper = factory.buildProtocol(PROXY)
        assert self.wrapper is not None
        self.wrapper.makeConnection(self.transport)
        return self.wrapper

    def sent(self) -> bytes:
        data: bytes = self.transport.value()
        self.transport.clear()
        return data

    def send(self, data: bytes) -> None:
        assert self.wrapper is not None
        self.wrapper.dataReceived(data)

    def close(self, reason: type[Exception] = ConnectionDone) -> None:
        assert self.wrapper is not None
        self.wrapper.connectionLost(Failure(reason()))

    @property
    def app(self) -> Recorder:
        [app] = self.factory.built
        return app


def outcome(d: Deferred[Any]) -> Any:
    """What C{d} fired with (a Failure for an error), or C{None} if it hasn't."""
    results: list[Any] = []

    def keep(result: Any) -> Any:
        results.append(result)
        return result

    d.addBoth(keep)
    return results[0] if results else None


def failure_of(d: Deferred[Any], kind: type[BaseException]) -> Failure:
    """The Failure C{d} failed with, checked to be a C{kind}, then handled."""
    result = outcome(d)
    assert isinstance(result, Failure), f"expected {kind.__name__}, got {result!r}"
    assert result.check(kind), result
    d.addErrback(lambda _: None)
    return result


# -- what is sent --------------------------------------------------------------


def test_ipv4_literal_is_socks4() -> None:
    h = Harness("192.0.2.9", 8080, userid=b"alice")
    h.connect()
    h.accept()
    assert h.sent() == Request(Command.CONNECT, 8080, "192.0.2.9", b"alice").to_bytes()


def test_name_is_socks4a() -> None:
    h = Harness("example.com", 443, userid=b"")
    h.connect()
    h.accept()
    assert h.sent() == b"\x04\x01\x01\xbb\x00\x00\x00\x01\x00example.com\x00"


def test_idn_is_sent_as_idna() -> None:
    h = Harness("bücher.example", 80)
    h.connect()
    h.accept()
    assert h.sent().endswith(b"\0xn--bcher-kva.example\0")


def test_resolve_locally_sends_socks4() -> None:
    """MemoryReactor's resolver answers 127.0.0.1 for every name."""
    h = Harness("example.com", 80, userid=b"", resolve_locally=True)
    d = h.connect()
    h.accept()
    assert h.sent() == Request(Command.CONNECT, 80, "127.0.0.1").to_bytes()
    h.send(GRANTED)
    assert outcome(d) is h.app
    assert h.app.addr == IPv4Address("TCP", "127.0.0.1", 80)


def test_resolve_locally_ipv4_literal_needs_no_lookup() -> None:
    h = Harness("192.0.2.9", 80, resolve_locally=True)
    h.reactor.installNameResolver(PendingResolver())
    h.connect()
    h.accept()
    assert h.sent()[:8] == b"\x04\x01\x00\x50\xc0\x00\x02\x09"


@pytest.mark.parametrize(
    "host",
    ["::1", "2001:db8::1", "[::1]", "::ffff:127.0.0.1"],
)
def test_ipv6_literal_refused(host: str) -> None:
    with pytest.raises(ValueError, match="IPv4 only"):
        SOCKS4ClientEndpoint(host, 80, TCP4ClientEndpoint(MemoryReactorClock(), "h", 1))


@pytest.mark.parametrize(
    ("host", "port", "userid", "message"),
    [
        ("0.0.0.1", 80, b"", "SOCKS4A"),
        ("example.com", 65536, b"", "port"),
        ("example.com", -1, b"", "port"),
        ("", 80, b"", "host name"),
        ("a b", 80, b"", "host name"),
        ("example.com:80", 80, b"", "host name"),
        ("fe80::1%lo", 80, b"", "IPv4 only"),
        ("x" * 256, 80, b"", "host name"),
        ("example.com", 80, b"al\0ice", "NUL"),
    ],
)
def test_bad_arguments_refused_up_front(
    host: str, port: int, userid: bytes, message: str
) -> None:
    proxy = TCP4ClientEndpoint(MemoryReactorClock(), "h", 1)
    with pytest.raises(ValueError, match=message):
        SOCKS4ClientEndpoint(host, port, proxy, userid)


# -- the reply -----------------------------------------------------------------


def test_granted() -> None:
    h = Harness("192.0.2.9", 80)
    d = h.connect()
    h.accept()
    assert outcome(d) is None
    h.send(GRANTED)
    assert outcome(d) is h.app
    assert h.app.addr == IPv4Address("TCP", "192.0.2.9", 80)
    assert h.app.events == [("made", IPv4Address("TCP", "192.0.2.9", 80))]
    assert not h.transport.disconnecting


def test_socks4a_peer_is_the_name() -> None:
    h = Harness("example.com", 80)
    d = h.connect()
    h.accept()
    h.send(GRANTED)
    assert outcome(d) is h.app
    assert h.app.addr == HostnameAddress(b"example.com", 80)
    assert h.app.events[0] == ("made", HostnameAddress(b"example.com", 80))


@given(
    cuts=st.lists(st.integers(1, 7), max_size=7, unique=True),
    trailing=st.binary(max_size=20),
)
def test_reply_in_any_pieces_with_trailing_bytes(
    cuts: list[int], trailing: bytes
) -> None:
    """The reply may come split; bytes behind it are the application's."""
    h = Harness()
    d = h.connect()
    h.accept()
    data = GRANTED + trailing
    bounds = [0, *sorted(cuts), len(data)]
    for start, end in itertools.pairwise(bounds):
        if start < 8:
            assert outcome(d) is None
        h.send(data[start:end])
    assert outcome(d) is h.app
    assert h.app.received == trailing
    h.send(b"more")
    assert h.app.received == trailing + b"more"


def test_trailing_bytes_come_after_the_deferred_fires() -> None:
    """As on any endpoint: connectionMade, the Deferred, then data."""
    h = Harness()
    d = h.connect()

    def fired(app: IProtocol) -> None:
        assert isinstance(app, Recorder)
        app.events.append(("fired",))

    d.addCallback(fired)
    h.accept()
    h.send(GRANTED + b"hello")
    assert [e[0] for e in h.app.events] == ["made", "fired", "data"]


def test_paused_application_gets_trailing_bytes_on_resume() -> None:
    class Pausing(Recorder):
        def connectionMade(self) -> None:
            super().connectionMade()
            IPushProducer(self.transport).pauseProducing()

    h = Harness(protocol=Pausing)
    d = h.connect()
    h.accept()
    h.send(GRANTED + b"early")
    assert outcome(d) is h.app
    assert h.app.received == b""
    assert h.transport.producerState == "paused"
    IPushProducer(h.app.transport).resumeProducing()
    assert h.transport.producerState == "producing"
    assert h.app.received == b"early"


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (ReplyCode.REJECTED, RequestRejected),
        (ReplyCode.IDENTD_UNREACHABLE, IdentdUnreachable),
        (ReplyCode.IDENT_MISMATCH, IdentMismatch),
    ],
)
def test_rejections(code: ReplyCode, error: type[Rejected]) -> None:
    h = Harness()
    d = h.connect()
    h.accept()
    h.send(reply(code, 1, "192.0.2.1") + b"ignored")
    failure = failure_of(d, error)
    assert isinstance(failure.value, Rejected)
    assert isinstance(failure.value, SOCKSError)
    assert failure.value.reply == Reply(code, 1, "192.0.2.1")
    assert str(code.value) in str(failure.value)
    assert h.factory.built == []
    assert h.transport.disconnecting
    h.close()  # the proxy's close that follows changes nothing


@pytest.mark.parametrize(
    "data",
    [
        b"H",  # HTTP/1.1 400 ...: fails on the first byte
        b"\x05\xff",  # a SOCKS5 server
        b"\x00\x00",  # version fine, code unknown
        b"\x00\x59",
        b"\x00\x5e",
    ],
)
def test_malformed_reply_fails_at_once(data: bytes) -> None:
    h = Harness()
    d = h.connect()
    h.accept()
    h.send(data)
    failure_of(d, MalformedReply)
    assert h.transport.disconnected  # aborted
    assert h.factory.built == []


@pytest.mark.parametrize("received", [b"", b"\x00\x5a\x00"])
def test_closed_before_reply(received: bytes) -> None:
    h = Harness()
    d = h.connect()
    h.accept()
    h.send(received)
    h.close(ConnectionLost)
    failure = failure_of(d, ClosedBeforeReply)
    assert failure.value.reason.check(ConnectionLost)  # type: ignore[union-attr]
    assert h.factory.built == []


def test_eof_before_reply_closes() -> None:
    """Half-close support never keeps a handshake waiting on a dead server."""
    h = Harness()
    d = h.connect()
    wrapper = h.accept()
    assert IHalfCloseableProtocol.providedBy(wrapper)
    wrapper.readConnectionLost()
    assert h.transport.disconnecting
    h.close()
    failure_of(d, ClosedBeforeReply)


def test_proxy_unreachable() -> None:
    h = Harness()
    d = h.connect()
    connector = h.reactor.connectors[-1]
    _, _, factory, _, _ = h.reactor.tcpClients[-1]
    factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
    failure_of(d, ConnectionRefusedError)


def test_factory_returns_none() -> None:
    h = Harness()
    h.factory.buildProtocol = lambda addr: None  # type: ignore[method-assign]
    d = h.connect()
    h.accept()
    h.send(GRANTED)
    failure_of(d, NoProtocol)
    assert h.transport.disconnected


def test_factory_raises() -> None:
    h = Harness()

    def boom(addr: IAddress | None) -> Protocol:
        raise ZeroDivisionError()

    h.factory.buildProtocol = boom  # type: ignore[method-assign]
    d = h.connect()
    h.accept()
    h.send(GRANTED)
    failure_of(d, ZeroDivisionError)
    assert h.transport.disconnected


def test_connection_made_raises() -> None:
    class Broken(Recorder):
        def connectionMade(self) -> None:
            raise ZeroDivisionError()

    h = Harness(protocol=Broken)
    d = h.connect()
    h.accept()
    h.send(GRANTED + b"dropped")
    failure_of(d, ZeroDivisionError)
    assert h.transport.disconnected
    h.close()
    assert h.app.events == [("lost", ConnectionDone)]


# -- after the reply: the tunnel -----------------------------------------------


def test_tunnel_transport() -> None:
    h = Harness("192.0.2.9", 80)
    h.connect()
    h.accept()
    h.send(GRANTED)
    transport = h.app.transport
    assert transport is not None
    assert ITransport.providedBy(transport)
    assert IPushProducer.providedBy(transport)
    assert transport.getPeer() == IPv4Address("TCP", "192.0.2.9", 80)
    assert transport.getHost() == LOCAL
    h.sent()
    transport.write(b"a")
    transport.writeSequence([b"b", b"c"])
    assert h.sent() == b"abc"
    assert transport.producerState == "producing"  # type: ignore[attr-defined]
    transport.loseConnection()
    assert h.transport.disconnecting
    h.close()
    assert h.app.events[-1] == ("lost", ConnectionDone)
    with pytest.raises(AttributeError):
        transport._private  # type: ignore[attr-defined]  # noqa: B018


def test_half_close_passes_through() -> None:
    h = Harness(protocol=HalfCloseRecorder)
    h.connect()
    wrapper = h.accept()
    h.send(GRANTED)
    wrapper.readConnectionLost()
    wrapper.writeConnectionLost()
    assert h.app.events[1:] == [("read-lost",), ("write-lost",)]
    assert not h.transport.disconnecting


def test_half_close_without_support_ends_the_connection() -> None:
    h = Harness(protocol=Recorder)
    h.connect()
    wrapper = h.accept()
    h.send(GRANTED)
    wrapper.readConnectionLost()
    wrapper.writeConnectionLost()
    assert h.transport.disconnecting
    h.close()
    assert h.app.events[1:] == [("lost", ConnectionDone)]


# -- cancellation and timeouts -------------------------------------------------


def assert_nothing_left(h: Harness) -> None:
    assert h.reactor.getDelayedCalls() == []


def test_cancel_while_connecting_to_the_proxy() -> None:
    h = Harness()
    d = h.connect()
    d.cancel()
    failure_of(d, CancelledError)
    assert h.reactor.connectors[-1].stoppedConnecting
    assert_nothing_left(h)


def test_cancel_while_waiting_for_the_reply() -> None:
    h = Harness()
    d = h.connect()
    h.accept()
    h.send(b"\x00\x5a")
    d.cancel()
    failure_of(d, CancelledError)
    assert h.transport.disconnected  # aborted
    h.send(b"\x00\x00\x00\x00\x00\x00")  # late bytes: ignored
    h.close(ConnectionLost)
    assert h.factory.built == []
    assert_nothing_left(h)


def test_cancel_after_success_does_nothing() -> None:
    h = Harness()
    d = h.connect()
    h.accept()
    h.send(GRANTED)
    d.cancel()
    assert outcome(d) is h.app
    assert not h.transport.disconnecting


@implementer(IHostResolution)
class PendingResolution:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        raise NotImplementedError()


@implementer(IHostnameResolver)
class PendingResolver:
    """A resolver whose answers the test gives."""

    def __init__(self) -> None:
        self.receivers: list[IResolutionReceiver] = []

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Any = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        resolution = PendingResolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        self.receivers.append(resolutionReceiver)
        return resolution


def test_cancel_while_resolving() -> None:
    h = Harness("example.com", 80, resolve_locally=True)
    resolver = PendingResolver()
    h.reactor.installNameResolver(resolver)
    d = h.connect()
    d.cancel()
    failure_of(d, CancelledError)
    [receiver] = resolver.receivers
    receiver.addressResolved(IPv4Address("TCP", "192.0.2.1", 80))
    receiver.resolutionComplete()  # too late: nothing happens
    assert h.reactor.tcpClients == []


def test_resolve_locally_ignores_ipv6_and_fails_without_ipv4() -> None:
    h = Harness("example.com", 80, resolve_locally=True)
    resolver = PendingResolver()
    h.reactor.installNameResolver(resolver)
    d = h.connect()
    [receiver] = resolver.receivers
    receiver.addressResolved(IPv6Address("TCP", "2001:db8::1", 80))
    receiver.resolutionComplete()
    failure_of(d, DNSLookupError)
    assert h.reactor.tcpClients == []


def test_timeout_while_waiting_for_the_reply() -> None:
    h = Harness(timeout=5)
    d = h.connect()
    h.accept()
    h.reactor.advance(4.9)
    assert outcome(d) is None
    h.reactor.advance(0.1)
    failure_of(d, defer.TimeoutError)
    assert h.transport.disconnected
    assert_nothing_left(h)


def test_timeout_while_connecting_to_the_proxy() -> None:
    h = Harness(timeout=5)
    d = h.connect()
    h.reactor.advance(5)
    failure_of(d, defer.TimeoutError)
    assert h.reactor.connectors[-1].stoppedConnecting
    assert_nothing_left(h)


def test_timeout_while_resolving() -> None:
    h = Harness("example.com", 80, resolve_locally=True, timeout=5)
    h.reactor.installNameResolver(PendingResolver())
    d = h.connect()
    h.reactor.advance(5)
    failure_of(d, defer.TimeoutError)
    assert_nothing_left(h)


def test_timeout_cancelled_on_success() -> None:
    h = Harness(timeout=5)
    d = h.connect()
    h.accept()
    h.send(GRANTED)
    assert outcome(d) is h.app
    assert_nothing_left(h)


# -- BIND ----------------------------------------------------------------------


class BindHarness(Harness):
    def bind(
        self, host: str = "192.0.2.21", port: int = 21, **kwargs: Any
    ) -> Deferred[PendingBind]:
        return bind(
            self.proxy, host, port, self.factory, b"alice", self.reactor, **kwargs
        )


def test_bind_request() -> None:
    h = BindHarness()
    h.bind("192.0.2.21", 21)
    h.accept()
    assert h.sent() == Request(Command.BIND, 21, "192.0.2.21", b"alice").to_bytes()


def test_bind_socks4a_request() -> None:
    h = BindHarness()
    h.bind("ftp.example", 21)
    h.accept()
    assert (
        h.sent()
        == Request(Command.BIND, 21, "0.0.0.1", b"alice", b"ftp.example").to_bytes()
    )


@given(
    cuts=st.lists(st.integers(1, 15), max_size=15, unique=True),
    trailing=st.binary(max_size=20),
)
def test_bind_both_replies_in_any_pieces(cuts: list[int], trailing: bytes) -> None:
    h = BindHarness()
    d = h.bind()
    h.accept()
    first = reply(ReplyCode.GRANTED, 40000, "192.0.2.1")
    second = reply(ReplyCode.GRANTED, 50000, "192.0.2.21")
    data = first + second + trailing
    bounds = [0, *sorted(cuts), len(data)]
    pending: PendingBind | None = None
    for start, end in itertools.pairwise(bounds):
        h.send(data[start:end])
        if pending is None and end >= 8:
            pending = outcome(d)
            assert isinstance(pending, PendingBind)
            assert pending.announced == IPv4Address("TCP", "192.0.2.1", 40000)
    assert pending is not None
    app = outcome(pending.connected)
    assert app is h.app
    peer = IPv4Address("TCP", "192.0.2.21", 50000)
    assert h.app.addr == peer
    assert h.app.events[0] == ("made", peer)
    assert h.app.received == trailing


def test_bind_announced_zero_means_the_proxy() -> None:
    h = BindHarness()
    d = h.bind()
    h.accept(peer=IPv4Address("TCP", "192.0.2.80", 1080))
    h.send(reply(ReplyCode.GRANTED, 40000, "0.0.0.0"))
    pending = outcome(d)
    assert pending.announced == IPv4Address("TCP", "192.0.2.80", 40000)


def test_announced_address() -> None:
    zero = Reply(ReplyCode.GRANTED, 4000, "0.0.0.0")
    assert announced_address(zero, IPv6Address("TCP", "2001:db8::8", 1080)) == (
        IPv6Address("TCP", "2001:db8::8", 4000)
    )
    from twisted.internet.address import UNIXAddress

    assert announced_address(zero, UNIXAddress(b"/run/socks")) == IPv4Address(
        "TCP", "0.0.0.0", 4000
    )
    given_ = Reply(ReplyCode.GRANTED, 4000, "192.0.2.3")
    assert announced_address(given_, IPv4Address("TCP", "192.0.2.80", 1)) == (
        IPv4Address("TCP", "192.0.2.3", 4000)
    )


def test_bind_first_reply_rejected() -> None:
    h = BindHarness()
    d = h.bind()
    h.accept()
    h.send(reply(ReplyCode.REJECTED))
    failure_of(d, RequestRejected)
    assert h.transport.disconnecting


def test_bind_second_reply_rejected() -> None:
    h = BindHarness()
    d = h.bind()
    h.accept()
    h.send(reply(ReplyCode.GRANTED, 40000, "192.0.2.1"))
    pending = outcome(d)
    h.send(reply(ReplyCode.REJECTED))
    failure_of(pending.connected, RequestRejected)
    assert h.factory.built == []
    assert h.transport.disconnecting


def test_bind_closed_before_second_reply() -> None:
    h = BindHarness()
    d = h.bind()
    h.accept()
    h.send(reply(ReplyCode.GRANTED, 40000, "192.0.2.1"))
    pending = outcome(d)
    h.close()
    failure_of(pending.connected, ClosedBeforeReply)


def test_bind_cancel_before_first_reply() -> None:
    h = BindHarness()
    d = h.bind()
    h.accept()
    d.cancel()
    failure_of(d, CancelledError)
    assert h.transport.disconnected


def test_bind_cancel_while_waiting_for_the_peer() -> None:
    h = BindHarness()
    d = h.bind(timeout=5)
    h.accept()
    h.send(reply(ReplyCode.GRANTED, 40000, "192.0.2.1"))
    pending = outcome(d)
    assert_nothing_left(h)  # the timeout covered the first reply only
    pending.connected.cancel()
    failure_of(pending.connected, CancelledError)
    assert h.transport.disconnected
    h.close(ConnectionLost)
    assert h.factory.built == []


def test_bind_cancel_from_the_announcement_callback() -> None:
    """The second reply, in the same read, finds nobody waiting."""
    h = BindHarness()
    d = h.bind()
    cancelled: list[Failure] = []

    def cancel(pending: PendingBind) -> None:
        pending.connected.cancel()
        pending.connected.addErrback(cancelled.append)

    d.addCallback(cancel)
    h.accept()
    h.send(
        reply(ReplyCode.GRANTED, 40000, "192.0.2.1")
        + reply(ReplyCode.GRANTED, 5, "192.0.2.21")
    )
    assert h.transport.disconnected
    assert h.factory.built == []
    [failure] = cancelled
    assert failure.check(CancelledError)


# -- the endpoint string -------------------------------------------------------


def parse(*args: str, **kwargs: str) -> Harness:
    """Parse a description into a Harness, as clientFromString would."""
    h = Harness()
    endpoint = SOCKS4ClientParser().parseStreamClient(h.reactor, *args, **kwargs)
    assert isinstance(endpoint, SOCKS4ClientEndpoint)
    h.endpoint = endpoint
    return h


def test_parse_positional() -> None:
    h = parse("example.com", "80", proxy="tcp:127.0.0.1:1080", userid="alice")
    h.connect()
    h.accept()
    assert (
        h.sent()
        == Request(Command.CONNECT, 80, "0.0.0.1", b"alice", b"example.com").to_bytes()
    )


def test_parse_keywords() -> None:
    h = parse(host="192.0.2.9", port="80", proxy="tcp:127.0.0.1:1080")
    h.connect()
    h.accept()
    assert h.sent() == Request(Command.CONNECT, 80, "192.0.2.9").to_bytes()


def test_parse_userid_is_utf8() -> None:
    h = parse("192.0.2.9", "80", proxy="tcp:127.0.0.1:1080", userid="zoë")
    h.connect()
    h.accept()
    assert h.sent()[8:] == "zoë".encode() + b"\0"


def test_parse_resolve_local() -> None:
    h = parse("example.com", "80", proxy="tcp:127.0.0.1:1080", resolve="local")
    h.connect()
    h.accept()
    assert h.sent() == Request(Command.CONNECT, 80, "127.0.0.1").to_bytes()


def test_parse_timeout() -> None:
    h = parse("192.0.2.9", "80", proxy="tcp:127.0.0.1:1080", timeout="2.5")
    d = h.connect()
    h.reactor.advance(2.5)
    failure_of(d, defer.TimeoutError)


@pytest.mark.parametrize(
    ("args", "kwargs", "error"),
    [
        (("example.com", "80"), {}, ValueError),
        (("example.com", "80"), {"proxy": "tcp:h:1", "resolve": "dns"}, ValueError),
        (("example.com", "http"), {"proxy": "tcp:h:1"}, ValueError),
        (("::1", "80"), {"proxy": "tcp:h:1"}, ValueError),
        (("example.com",), {"proxy": "tcp:h:1"}, TypeError),
        (("example.com", "80"), {"proxy": "tcp:h:1", "colour": "red"}, TypeError),
    ],
)
def test_parse_errors(
    args: tuple[str, ...], kwargs: dict[str, str], error: type[Exception]
) -> None:
    with pytest.raises(error):
        SOCKS4ClientParser().parseStreamClient(MemoryReactorClock(), *args, **kwargs)


# -- against a real twistd socks4 ----------------------------------------------

IO_TIMEOUT = 10.0


async def until(predicate: Callable[[], object], timeout: float = IO_TIMEOUT) -> None:
    """Let the reactor run until C{predicate()} holds."""
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"{predicate} still false after {timeout} s")
        await task.deferLater(reactor, 0.01)


async def rejection(d: Deferred[Any], kind: type[Exception]) -> Exception:
    try:
        result = await d
    except kind as e:
        return e
    raise AssertionError(f"expected {kind.__name__}, got {result!r}")


def proxy_of(server: TwistdProcess) -> TCP4ClientEndpoint:
    return TCP4ClientEndpoint(reactor, server.host, server.port, timeout=IO_TIMEOUT)


class AgainstSocks4tx(unittest.TestCase):
    """The client against C{twistd socks4}: every reply it can give."""

    timeout = 30

    @pytest.fixture(autouse=True)
    def fixtures(
        self, start_server: StartServer, echo: ThreadedServer, tmp_path: Path
    ) -> None:
        self.start_server = start_server
        self.echo = echo
        self.tmp_path = tmp_path

    def endpoint(
        self,
        server: TwistdProcess,
        host: str = "127.0.0.1",
        port: int = 0,
        **kwargs: Any,
    ) -> SOCKS4ClientEndpoint:
        return SOCKS4ClientEndpoint(
            host,
            port or self.echo.port,
            proxy_of(server),
            kwargs.pop("userid", b"alice"),
            reactor,
            timeout=kwargs.pop("timeout", IO_TIMEOUT),
            **kwargs,
        )

    async def echoes(self, protocol: Recorder, data: bytes = b"hello") -> None:
        """C{data} comes back through the tunnel; then close it."""
        assert protocol.transport is not None
        protocol.transport.write(data)
        await until(lambda: protocol.received == data)
        protocol.transport.loseConnection()
        await protocol.lost

    async def test_connect(self) -> None:
        server = self.start_server()
        factory = RecorderFactory()
        protocol = await self.endpoint(server).connect(factory)
        [app] = factory.built
        assert protocol is app
        assert app.transport is not None
        peer = IPv4Address("TCP", "127.0.0.1", self.echo.port)
        assert app.transport.getPeer() == peer
        here = app.transport.getHost()
        assert isinstance(here, IPv4Address)
        assert here.port != server.port
        assert (factory.starts, factory.stops) == (1, 0)
        await self.echoes(app)
        await until(lambda: factory.stops == 1)  # after connectionLost
        assert factory.starts == 1

    async def test_half_close_through_the_proxy(self) -> None:
        """Our EOF reaches the echo server, which answers, then closes."""
        server = self.start_server()
        factory = RecorderFactory(HalfCloseRecorder)
        await self.endpoint(server).connect(factory)
        [app] = factory.built
        transport = ITCPTransport(app.transport)
        transport.write(b"last words")
        transport.loseWriteConnection()
        await until(lambda: ("read-lost",) in app.events)
        assert app.received == b"last words"
        assert ("write-lost",) in app.events
        transport.loseConnection()
        await app.lost

    # Twisted's ssl: server endpoint still hands pyOpenSSL its own key types.
    @pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")
    async def test_tls_through_the_tunnel(self) -> None:
        """
        The tunnel is a transport like any other: wrapClientTLS layers TLS
        to the destination on it, here with the name checked against the
        certificate of a server that the SOCKS server reached by that name.
        """
        pem = FilePath(twisted.test.__file__).sibling("server.pem")
        far = RecorderFactory(EchoRecorder)
        listening = await serverFromString(
            reactor, f"ssl:0:interface=127.0.0.1:privateKey={pem.path}"
        ).listen(far)
        self.addCleanup(listening.stopListening)
        server = self.start_server()
        options = optionsForClientTLS(
            "localhost", trustRoot=Certificate.loadPEM(pem.getContent())
        )
        address = listening.getHost()
        assert isinstance(address, IPv4Address)
        port = address.port
        endpoint = wrapClientTLS(options, self.endpoint(server, "localhost", port))
        factory = RecorderFactory()
        await endpoint.connect(factory)
        [app] = factory.built
        assert app.addr == HostnameAddress(b"localhost", port)
        await self.echoes(app, b"over TLS")
        await far.built[0].lost

    async def test_socks4a_by_name(self) -> None:
        server = self.start_server(json_log=True)
        factory = RecorderFactory()
        await self.endpoint(server, "localhost").connect(factory)
        app = factory.built[0]
        assert app.addr == HostnameAddress(b"localhost", self.echo.port)
        assert app.transport is not None
        client_port = app.transport.getHost().port  # type: ignore[attr-defined]
        await self.echoes(app)
        event = server.wait_for_session(client_port)
        assert (event["dst_host"], event["dst_ip"]) == ("localhost", "127.0.0.1")
        assert event["userid"] == "alice"

    async def test_resolve_locally(self) -> None:
        server = self.start_server(json_log=True)
        factory = RecorderFactory()
        endpoint = self.endpoint(server, "localhost", resolve_locally=True)
        await endpoint.connect(factory)
        app = factory.built[0]
        assert app.addr == IPv4Address("TCP", "127.0.0.1", self.echo.port)
        assert app.transport is not None
        client_port = app.transport.getHost().port  # type: ignore[attr-defined]
        await self.echoes(app)
        event = server.wait_for_session(client_port)
        assert (event["dst_host"], event["dst_ip"]) == (None, "127.0.0.1")

    async def bind_flow(self, server: TwistdProcess) -> PendingBind:
        """BIND, connect as the application server, talk both ways, close."""
        factory = RecorderFactory()
        pending = await bind(
            proxy_of(server),
            "127.0.0.1",
            21,
            factory,
            b"alice",
            reactor,
            timeout=IO_TIMEOUT,
        )
        assert isinstance(pending.announced, IPv4Address)
        assert pending.announced.host == "127.0.0.1"
        assert pending.announced.port not in (0, server.port)
        assert factory.built == []
        # the application server connects to the announced address
        far = RecorderFactory()
        far_end = TCP4ClientEndpoint(
            reactor, pending.announced.host, pending.announced.port, timeout=IO_TIMEOUT
        )
        await far_end.connect(far)
        protocol = await pending.connected.addTimeout(IO_TIMEOUT, reactor)
        [app] = factory.built
        [application_server] = far.built
        assert protocol is app
        assert application_server.transport is not None
        assert app.transport is not None
        here = ITCPTransport(application_server.transport).getHost()
        peer = IPv4Address("TCP", "127.0.0.1", here.port)
        assert app.addr == peer
        assert app.transport.getPeer() == peer
        app.transport.write(b"to the server")
        application_server.transport.write(b"to the client")
        await until(lambda: far.built[0].received == b"to the server")
        await until(lambda: app.received == b"to the client")
        application_server.transport.loseConnection()
        await app.lost
        await far.built[0].lost
        return pending

    async def test_bind(self) -> None:
        await self.bind_flow(self.start_server())

    async def test_bind_announcing_zero_means_the_proxy(self) -> None:
        """--bind-address 0.0.0.0 announces 0.0.0.0; the client substitutes."""
        server = self.start_server("--bind-address", "0.0.0.0")
        await self.bind_flow(server)

    async def test_bind_wrong_peer(self) -> None:
        """The application server named is 127.0.0.2; 127.0.0.1 connects: 91."""
        server = self.start_server()
        factory = RecorderFactory()
        pending = await bind(
            proxy_of(server), "127.0.0.2", 21, factory, reactor=reactor
        )
        intruder = RecorderFactory()
        await TCP4ClientEndpoint(
            reactor, "127.0.0.1", pending.announced.port, bindAddress=("127.0.0.1", 0)
        ).connect(intruder)
        error = await rejection(pending.connected, RequestRejected)
        assert isinstance(error, RequestRejected)
        assert error.reply.code == ReplyCode.REJECTED
        await intruder.built[0].lost
        assert factory.built == []

    async def test_91_denied_by_the_rules(self) -> None:
        rules = self.tmp_path / "rules.conf"
        rules.write_text("deny 0.0.0.0 0.0.0.0\n")
        server = self.start_server("--rules", str(rules), json_log=True)
        factory = RecorderFactory()
        error = await rejection(self.endpoint(server).connect(factory), RequestRejected)
        assert isinstance(error, RequestRejected)
        assert error.reply.code == 91
        assert factory.built == []
        await until(lambda: factory.stops == 1)
        assert factory.starts == 1
        await until(server.session_events)
        [event] = server.session_events()
        assert (event["reason"], event["rule"]) == ("rule", f"{rules}:1")

    async def test_91_destination_refused(self) -> None:
        server = self.start_server()
        endpoint = self.endpoint(server, port=free_port())
        await rejection(endpoint.connect(RecorderFactory()), RequestRejected)

    async def test_92_identd_unreachable(self) -> None:
        nobody = str(free_port())
        server = self.start_server("--ident", "required", "--ident-port", nobody)
        endpoint = self.endpoint(server)
        error = await rejection(endpoint.connect(RecorderFactory()), IdentdUnreachable)
        assert isinstance(error, IdentdUnreachable)
        assert error.reply.code == 92

    async def test_93_ident_mismatch(self) -> None:
        with FakeIdentd(user(b"mallory")) as identd:
            server = self.start_server(
                "--ident", "required", "--ident-port", str(identd.port)
            )
            endpoint = self.endpoint(server, userid=b"alice")
            error = await rejection(endpoint.connect(RecorderFactory()), IdentMismatch)
            assert isinstance(error, IdentMismatch)
            assert error.reply.code == 93
            await until(
                lambda: identd.queries and identd.queries[0].client_closed.is_set()
            )

    async def waiting_server(self, identd: FakeIdentd) -> TwistdProcess:
        """A server that waits (on a silent identd) before it replies."""
        return self.start_server(
            "--ident", "required", "--ident-port", str(identd.port),
            "--ident-timeout", "30",
            json_log=True,
        )  # fmt: skip

    async def test_cancel_while_the_server_decides(self) -> None:
        with FakeIdentd(silent()) as identd:
            server = await self.waiting_server(identd)
            d = self.endpoint(server).connect(RecorderFactory())
            await until(lambda: identd.queries)
            d.cancel()
            await rejection(d, CancelledError)
            # the server saw the client go, and gave up on identd
            await until(lambda: identd.queries[0].client_closed.is_set())
            await until(lambda: server.session_events())
            [event] = server.session_events()
            assert (event["reason"], event["reply"]) == ("client-gone", None)

    async def test_timeout_while_the_server_decides(self) -> None:
        with FakeIdentd(silent()) as identd:
            server = await self.waiting_server(identd)
            d = self.endpoint(server, timeout=0.5).connect(RecorderFactory())
            await rejection(d, defer.TimeoutError)
            await until(lambda: server.session_events())
            [event] = server.session_events()
            assert event["reason"] == "client-gone"


# -- the endpoint string, end to end: a program of its own ---------------------

CLIENT_PROGRAM = """
import sys
from twisted.internet import defer, task
from twisted.internet.endpoints import clientFromString
from twisted.internet.protocol import Factory, Protocol


class Once(Protocol):
    def connectionMade(self):
        self.received = b""
        self.done = defer.Deferred()
        self.transport.write(b"ping")

    def dataReceived(self, data):
        self.received += data
        if len(self.received) >= 4:
            self.done.callback(self.received)


async def main(reactor, description):
    endpoint = clientFromString(reactor, description)
    protocol = await endpoint.connect(Factory.forProtocol(Once))
    echoed = await protocol.done
    print(type(endpoint).__name__, echoed, protocol.transport.getPeer())
    protocol.transport.loseConnection()


task.react(lambda reactor: defer.ensureDeferred(main(reactor, sys.argv[1])))
"""


def run_client(description: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), *filter(None, [env.get("PYTHONPATH")])]
    )
    return subprocess.run(
        [sys.executable, "-c", CLIENT_PROGRAM, description],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env=env,
    )


def test_client_from_string(
    start_server: StartServer, echo: ThreadedServer, tmp_path: Path
) -> None:
    server = start_server()
    description = (
        f"socks4:localhost:{echo.port}"
        f":proxy=tcp\\:127.0.0.1\\:{server.port}:userid=alice:timeout=10"
    )
    result = run_client(description, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split("\n")[0] == (
        f"SOCKS4ClientEndpoint b'ping' HostnameAddress(hostname=b'localhost', "
        f"port={echo.port})"
    )


def test_client_from_string_rejected(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server()
    description = (
        f"socks4:127.0.0.1:{free_port()}:proxy=tcp\\:127.0.0.1\\:{server.port}"
    )
    result = run_client(description, tmp_path)
    assert result.returncode == 1
    assert "socks4tx._clientproto.RequestRejected: 91 request rejected or failed" in (
        result.stderr
    )
