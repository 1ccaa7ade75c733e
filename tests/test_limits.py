"""
Connection limits, the drain at shutdown and destination safety, at the
protocol level.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fakes import (
    REJECTED,
    FakeTransport,
    Proxy,
    ScriptedPolicy,
    connect_request,
)
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock

from socks4tx.limits import (
    DESCRIPTORS_PER_SESSION,
    RESERVED_DESCRIPTORS,
    Sessions,
    default_max_connections,
    pipe_budget,
)
from socks4tx.rules import Decision
from socks4tx.server import SOCKS4Factory


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    with Proxy() as proxy:
        yield proxy


def connect(factory: SOCKS4Factory, host: str, port: int = 40000) -> FakeTransport:
    """A client connection from C{host}, made and left open."""
    peer = IPv4Address("TCP", host, port)
    protocol = factory.buildProtocol(peer)
    transport = FakeTransport(protocol, IPv4Address("TCP", "127.0.0.1", 1080), peer)
    protocol.makeConnection(transport)
    return transport


def limit_events(proxy: Proxy) -> list[object]:
    return [e for e in proxy.session_events() if e["reason"] == "limit"]


def test_per_source_limit(proxy: Proxy) -> None:
    proxy.start(max_connections=10, max_connections_per_source=2)
    # proxy.start made the first connection from 127.0.0.1
    second = connect(proxy.factory, "127.0.0.1", 40001)
    third = connect(proxy.factory, "127.0.0.1", 40002)
    assert not second.closed
    assert third.closed and third.value() == b""  # closed before reading
    assert [e["client_port"] for e in limit_events(proxy)] == [40002]
    other = connect(proxy.factory, "127.0.0.2")
    assert not other.closed
    # A session that ends frees its place.
    second.deliver_close()
    again = connect(proxy.factory, "127.0.0.1", 40003)
    assert not again.closed
    assert proxy.factory.sessions.refused == 1


def test_ipv4_mapped_clients_count_as_ipv4(proxy: Proxy) -> None:
    proxy.start(max_connections=10, max_connections_per_source=1)
    peer = IPv6Address("TCP", "::ffff:127.0.0.1", 40001)
    protocol = proxy.factory.buildProtocol(peer)
    transport = FakeTransport(protocol, IPv6Address("TCP", "::", 1080), peer)
    protocol.makeConnection(transport)
    assert transport.closed


def test_total_limit(proxy: Proxy) -> None:
    proxy.start(max_connections=2, max_connections_per_source=0)
    second = connect(proxy.factory, "127.0.0.2")
    third = connect(proxy.factory, "127.0.0.3")
    assert not second.closed and third.closed
    assert len(limit_events(proxy)) == 1


def test_sessions_count_until_their_log_event(proxy: Proxy) -> None:
    """A relayed session holds its place until both connections are gone."""
    proxy.start(max_connections=1)
    proxy.send(connect_request("127.0.0.1", 80))
    remote = proxy.connection_succeeds()
    proxy.client.deliver_close()
    assert not remote.lost
    assert len(proxy.factory.sessions) == 1
    assert connect(proxy.factory, "127.0.0.2").closed
    remote.deliver_close()
    proxy.settle()
    assert len(proxy.factory.sessions) == 0
    assert not connect(proxy.factory, "127.0.0.2").closed


def test_default_max_connections_from_the_open_file_limit() -> None:
    # 256 pipes (512 descriptors) set apart for the splice relay.
    assert pipe_budget(20000) == 256
    assert default_max_connections(20000) == (
        (20000 - RESERVED_DESCRIPTORS - 512) // DESCRIPTORS_PER_SESSION
    )
    assert default_max_connections(20000) == 6474
    assert pipe_budget(300) == 7
    assert default_max_connections(300) == (300 - 64 - 14) // 3
    assert pipe_budget(30) == 0
    assert default_max_connections(10) == 1


class FakeSession:
    def __init__(self, sessions: Sessions) -> None:
        self.sessions = sessions
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True
        self.sessions.remove(self, "127.0.0.1")


def test_drain_waits_for_sessions_then_aborts_the_rest() -> None:
    clock = Clock()
    sessions = Sessions(10, 10)
    quick, slow = FakeSession(sessions), FakeSession(sessions)
    sessions.add(quick, "127.0.0.1")
    sessions.add(slow, "127.0.0.1")
    drained = sessions.drain(clock, 5.0)
    sessions.remove(quick, "127.0.0.1")
    clock.advance(4.9)
    assert not drained.called and not slow.aborted
    clock.advance(0.1)
    assert slow.aborted and drained.called
    assert clock.getDelayedCalls() == []


def test_drain_with_nothing_running() -> None:
    assert Sessions(1, 1).drain(Clock(), 5.0).called


def test_drain_cancels_its_timer_when_sessions_end() -> None:
    clock = Clock()
    sessions = Sessions(10, 10)
    session = FakeSession(sessions)
    sessions.add(session, "127.0.0.1")
    drained = sessions.drain(clock, 5.0)
    sessions.remove(session, "127.0.0.1")
    assert drained.called and clock.getDelayedCalls() == []


# -- destination safety ------------------------------------------------------------

REMOTE_CLIENT = IPv4Address("TCP", "192.0.2.7", 40000)


@pytest.mark.parametrize("destination", ["127.0.0.1", "127.9.9.9", "169.254.169.254"])
def test_remote_clients_cannot_reach_loopback_or_link_local(
    proxy: Proxy, destination: str
) -> None:
    # A catch-all destination doesn't name it.
    proxy.start(
        policy=ScriptedPolicy(Decision(True, "f:1", explicit_destination=False)),
        peer=REMOTE_CLIENT,
    )
    proxy.send(connect_request(destination, 80))
    assert proxy.reactor.tcpClients == []
    proxy.assert_ended(REJECTED, 91, "destination-refused")


def test_a_rule_naming_the_destination_allows_it(proxy: Proxy) -> None:
    proxy.start(
        policy=ScriptedPolicy(Decision(True, "f:2", explicit_destination=True)),
        peer=REMOTE_CLIENT,
    )
    proxy.send(connect_request("169.254.169.254", 80))
    assert proxy.connect_attempt()[:2] == ("169.254.169.254", 80)


def test_loopback_clients_may_reach_loopback(proxy: Proxy) -> None:
    proxy.start(policy=ScriptedPolicy(Decision(True, "f:1")))
    proxy.send(connect_request("127.0.0.1", 80))
    assert proxy.connect_attempt()[:2] == ("127.0.0.1", 80)


def test_remote_clients_reach_ordinary_destinations(proxy: Proxy) -> None:
    proxy.start(policy=ScriptedPolicy(Decision(True, "f:1")), peer=REMOTE_CLIENT)
    proxy.send(connect_request("198.51.100.5", 80))
    assert proxy.connect_attempt()[:2] == ("198.51.100.5", 80)


def test_sessions_closed_by_a_shutdown_say_so(proxy: Proxy) -> None:
    proxy.start()
    proxy.send(connect_request("127.0.0.1", 80))
    remote = proxy.connection_succeeds()
    proxy.protocol.abort()
    proxy.client.deliver_close()
    remote.deliver_close()
    event = proxy.session()
    assert (event["reply"], event["reason"]) == (90, "shutdown")


def test_handshakes_closed_by_a_shutdown_say_so(proxy: Proxy) -> None:
    proxy.start()
    proxy.send(b"\x04\x01")
    proxy.protocol.abort()
    proxy.client.deliver_close()
    event = proxy.session()
    assert (event["reply"], event["reason"]) == (None, "shutdown")
