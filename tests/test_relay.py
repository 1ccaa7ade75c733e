"""
The portable relay: flow control, half-close both ways, closing after a
flush, the idle timeout and byte counters, through the server (a granted
CONNECT) and on the relay's own face.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fakes import (
    CLIENT_ADDRESS,
    OUTGOING_ADDRESS,
    PROXY_ADDRESS,
    FakeTransport,
    Proxy,
    connect_request,
    reply_bytes,
)
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock

from socks4tx.relay import Relay, RelayEnd, RemoteProtocol
from socks4tx.server import SOCKS4Server
from socks4tx.wire import ReplyCode

GRANTED = reply_bytes(ReplyCode.GRANTED, OUTGOING_ADDRESS.port, OUTGOING_ADDRESS.host)
DESTINATION = IPv4Address("TCP", "198.51.100.5", 80)


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    with Proxy() as proxy:
        yield proxy


def relaying(proxy: Proxy, **settings: object) -> FakeTransport:
    """A granted CONNECT; returns the destination's transport."""
    proxy.start(**settings)
    proxy.send(connect_request(DESTINATION.host, DESTINATION.port))
    remote = proxy.connection_succeeds()
    assert proxy.client.value() == GRANTED
    proxy.client.clear()
    return remote


def test_both_protocols_half_closeable() -> None:
    assert IHalfCloseableProtocol.implementedBy(SOCKS4Server)
    assert IHalfCloseableProtocol.implementedBy(RemoteProtocol)


def test_each_side_is_the_others_streaming_producer(proxy: Proxy) -> None:
    remote = relaying(proxy)
    assert proxy.client.producer is remote
    assert proxy.client.streaming is True
    assert remote.producer is proxy.client
    assert remote.streaming is True


def test_relays_both_ways(proxy: Proxy) -> None:
    remote = relaying(proxy)
    for index in range(3):
        proxy.send(b"up%d" % index)
        remote.receive(b"down%d" % index)
    assert remote.value() == b"up0up1up2"
    assert proxy.client.value() == b"down0down1down2"
    assert not proxy.client.closed
    assert not remote.closed


def test_client_half_close(proxy: Proxy) -> None:
    """
    The client shuts down its write side: the destination gets EOF once its
    buffer is flushed and can still answer; then its EOF ends the session.
    """
    remote = relaying(proxy)
    proxy.send(b"request")
    proxy.client.deliver_eof()
    assert remote.write_closed
    assert remote.producer is None  # else it would never close
    assert not remote.closed
    assert not proxy.client.closed
    remote.receive(b"answer")
    assert proxy.client.value() == b"answer"
    remote.deliver_eof()
    assert proxy.client.closed and not proxy.client.disconnected
    assert remote.closed and not remote.disconnected
    event = proxy.session()
    assert (event["reply"], event["reason"]) == (90, "relayed")
    assert (event["bytes_up"], event["bytes_down"]) == (7, 6)
    proxy.assert_clean()


def test_destination_half_close(proxy: Proxy) -> None:
    remote = relaying(proxy)
    remote.receive(b"banner")
    remote.deliver_eof()
    assert proxy.client.write_closed
    assert proxy.client.producer is None
    assert not proxy.client.closed
    assert not remote.closed
    proxy.send(b"late request")
    assert remote.value() == b"late request"
    proxy.client.deliver_eof()
    assert proxy.client.closed
    assert remote.closed
    event = proxy.session()
    assert (event["reply"], event["reason"]) == (90, "relayed")
    assert (event["bytes_up"], event["bytes_down"]) == (12, 6)
    proxy.assert_clean()


def test_client_lost_closes_destination_after_flush(proxy: Proxy) -> None:
    remote = relaying(proxy)
    proxy.send(b"last words")
    proxy.client.deliver_close()
    # loseConnection (flushes), not abortConnection (drops the buffer).
    assert remote.disconnecting and not remote.disconnected
    assert remote.producer is None
    assert remote.value() == b"last words"
    assert proxy.session_events() == []  # not over until both are gone
    remote.deliver_close()
    event = proxy.session()
    assert (event["reply"], event["reason"]) == (90, "relayed")
    assert event["bytes_up"] == 10
    proxy.assert_clean()


def test_destination_lost_closes_client_after_flush(proxy: Proxy) -> None:
    remote = relaying(proxy)
    remote.receive(b"goodbye")
    remote.deliver_close()
    assert proxy.client.value() == b"goodbye"
    assert proxy.client.disconnecting and not proxy.client.disconnected
    assert proxy.client.producer is None
    proxy.settle()
    event = proxy.session()
    assert (event["reply"], event["reason"]) == (90, "relayed")
    assert (event["bytes_up"], event["bytes_down"]) == (0, 7)
    proxy.assert_clean()


def test_lost_after_half_close(proxy: Proxy) -> None:
    remote = relaying(proxy)
    proxy.client.deliver_eof()
    proxy.client.deliver_close()
    assert remote.closed
    remote.deliver_close()
    event = proxy.session()
    assert event["reason"] == "relayed"
    proxy.assert_clean()


def test_no_idle_timer_by_default(proxy: Proxy) -> None:
    relaying(proxy)
    assert proxy.reactor.getDelayedCalls() == []


def test_idle_timeout_closes_both(proxy: Proxy) -> None:
    """
    Closed after between 1 and 1.25 idle timeouts without a byte (traffic
    is noticed at checks every quarter timeout), never earlier.
    """

    def pump(seconds: float) -> None:
        for _ in range(round(seconds / 0.1)):
            proxy.reactor.advance(0.1)

    remote = relaying(proxy, idle_timeout=10.0)
    pump(6)
    proxy.send(b"x")
    pump(6)  # 6 s since the last byte
    assert not proxy.client.closed and not remote.closed
    remote.receive(b"y")  # at 12 s
    pump(10)  # 10 s since the last byte: not closed before the timeout
    assert not proxy.client.closed and not remote.closed
    pump(2.5)  # 12.5 s since: closed by now
    assert proxy.client.closed and remote.closed
    event = proxy.session()
    assert (event["reply"], event["reason"]) == (90, "timeout")
    assert (event["bytes_up"], event["bytes_down"]) == (1, 1)
    assert 22.0 <= event["duration"] <= 24.5
    proxy.assert_clean()


def test_idle_timer_cancelled_when_session_ends(proxy: Proxy) -> None:
    remote = relaying(proxy, idle_timeout=10.0)
    assert len(proxy.reactor.getDelayedCalls()) == 1
    remote.deliver_close()
    proxy.settle()
    event = proxy.session()
    assert event["reason"] == "relayed"
    proxy.assert_clean()


# -- the relay's own face ---------------------------------------------------------


class Ends:
    """A relay between two fake transports, fed by hand."""

    def __init__(self, idle_timeout: float = 0.0) -> None:
        self.clock = Clock()
        self.client = FakeTransport(Protocol(), PROXY_ADDRESS, CLIENT_ADDRESS)
        self.server = FakeTransport(Protocol(), OUTGOING_ADDRESS, DESTINATION)
        self.finished: list[Relay] = []
        self.relay = Relay(
            self.client, self.server, self.clock, idle_timeout, self.finished.append
        )


def test_pending_bytes_go_first_and_count() -> None:
    ends = Ends()
    ends.relay.start(b"pending")
    ends.relay.client.data_received(b"+more")
    assert ends.server.value() == b"pending+more"
    assert ends.relay.bytes_up == 12
    assert ends.relay.bytes_down == 0


def test_finished_once_when_both_ends_lost() -> None:
    ends = Ends(idle_timeout=5.0)
    ends.relay.start()
    ends.relay.server.data_received(b"abc")
    ends.relay.client.connection_lost()
    assert ends.server.disconnecting
    assert ends.finished == []
    ends.relay.server.connection_lost()
    ends.relay.server.connection_lost()
    assert ends.finished == [ends.relay]
    assert ends.relay.bytes_down == 3
    assert not ends.relay.timed_out
    assert ends.clock.getDelayedCalls() == []


def test_both_eofs_close_both() -> None:
    ends = Ends()
    ends.relay.start()
    ends.relay.client.read_connection_lost()
    assert ends.server.write_closed and not ends.server.disconnecting
    ends.relay.client.read_connection_lost()  # a repeat changes nothing
    ends.relay.server.read_connection_lost()
    assert ends.client.disconnecting and ends.server.disconnecting


class NoHalfClose(FakeTransport):
    """A transport that can't shut down only its write side."""

    loseWriteConnection = None  # type: ignore[assignment]


def test_eof_closes_a_peer_without_half_close() -> None:
    ends = Ends()
    ends.server = NoHalfClose(Protocol(), OUTGOING_ADDRESS, DESTINATION)
    ends.relay = Relay(ends.client, ends.server, ends.clock, 0, ends.finished.append)
    ends.relay.start()
    ends.relay.client.read_connection_lost()
    assert ends.server.disconnecting


def test_abort_drops_buffers() -> None:
    ends = Ends()
    ends.relay.start()
    ends.relay.abort()
    assert ends.client.disconnected and ends.server.disconnected


def test_idle_timeout_marks_timed_out() -> None:
    ends = Ends(idle_timeout=3.0)
    ends.relay.start()
    ends.clock.advance(3)
    assert ends.relay.timed_out
    assert ends.client.disconnected and ends.server.disconnected
    assert ends.clock.getDelayedCalls() == []


# -- RemoteProtocol before it is joined ------------------------------------------


class Recorder(RelayEnd):
    """A RelayEnd that records what it is told."""

    def __init__(self) -> None:
        self.calls: list[object] = []

    def data_received(self, data: bytes) -> None:
        self.calls.append(data)

    def read_connection_lost(self) -> None:
        self.calls.append("eof")

    def connection_lost(self) -> None:
        self.calls.append("lost")


def remote_protocol() -> tuple[RemoteProtocol, FakeTransport]:
    protocol = RemoteProtocol()
    transport = FakeTransport(protocol, OUTGOING_ADDRESS, DESTINATION)
    protocol.makeConnection(transport)
    return protocol, transport


def test_remote_bytes_before_join_are_kept_and_reading_paused() -> None:
    protocol, transport = remote_protocol()
    protocol.dataReceived(b"early")
    assert transport.producerState == "paused"
    end = Recorder()
    protocol.attach(end)
    assert end.calls == [b"early"]
    assert transport.producerState == "producing"
    protocol.dataReceived(b"later")
    assert end.calls == [b"early", b"later"]


def test_remote_eof_before_join() -> None:
    protocol, _ = remote_protocol()
    protocol.dataReceived(b"bye")
    protocol.readConnectionLost()
    end = Recorder()
    protocol.attach(end)
    assert end.calls == [b"bye", "eof"]


def test_remote_lost_before_join() -> None:
    protocol, transport = remote_protocol()
    transport.deliver_close()
    end = Recorder()
    protocol.attach(end)
    assert end.calls == ["lost"]
