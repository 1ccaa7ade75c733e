"""
BIND on fakes: the two replies, the peer check, the timeout, the client
leaving, and the listener closed on every path.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fakes import (
    REJECTED,
    FakeReactor,
    Proxy,
    bind_request,
    reply_bytes,
)
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import CannotListenError
from twisted.internet.task import Clock

from socks4tx.bind import BindListener, BindMismatch, route_source_address
from socks4tx.wire import ReplyCode

LISTENER_PORT = FakeReactor.FIRST_PORT


def first_reply(address: str = "127.0.0.1") -> bytes:
    return reply_bytes(ReplyCode.GRANTED, LISTENER_PORT, address)


def second_reply(host: str, port: int) -> bytes:
    return reply_bytes(ReplyCode.GRANTED, port, host)


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    with Proxy() as proxy:
        yield proxy


def test_bind_full_flow(proxy: Proxy) -> None:
    proxy.start(bind_address="127.0.0.1", bind_timeout=60.0)
    proxy.send(bind_request("127.0.0.1", 21, b"ftpuser"))
    listening, _, backlog, interface = proxy.listener()
    assert (interface, backlog) == ("127.0.0.1", 1)
    assert proxy.client.value() == first_reply()
    assert not listening.stopped
    assert len(proxy.reactor.getDelayedCalls()) == 1

    proxy.reactor.advance(59)
    inbound = proxy.peer_connects("127.0.0.1", 20)
    assert inbound is not None
    assert listening.stopped
    assert proxy.reactor.getDelayedCalls() == []
    assert proxy.client.value() == first_reply() + second_reply("127.0.0.1", 20)
    assert inbound.keepalive is True

    inbound.receive(b"file contents")
    proxy.send(b"ack")
    assert proxy.client.value().endswith(b"file contents")
    assert inbound.value() == b"ack"
    assert proxy.client.producer is inbound
    assert inbound.producer is proxy.client
    inbound.deliver_eof()
    assert proxy.client.write_closed
    proxy.client.deliver_eof()
    event = proxy.session()
    assert event["command"] == "bind"
    assert (event["dst_ip"], event["dst_port"]) == ("127.0.0.1", 21)
    assert event["userid"] == "ftpuser"
    assert (event["reply"], event["reason"]) == (90, "relayed")
    assert (event["bytes_up"], event["bytes_down"]) == (3, 13)
    proxy.assert_clean()


def test_bind_listens_where_the_route_to_the_server_leaves(proxy: Proxy) -> None:
    """Without --bind-address: the local address of the route to DSTIP."""
    proxy.start()
    proxy.send(bind_request("127.0.0.1", 21))
    _, _, _, interface = proxy.listener()
    assert interface == route_source_address("127.0.0.1") == "127.0.0.1"
    assert proxy.client.value() == first_reply("127.0.0.1")


def test_bind_wildcard_address_announced_as_zero(proxy: Proxy) -> None:
    """DSTIP 0.0.0.0 in the first reply: use the SOCKS server's address."""
    proxy.start(bind_address="0.0.0.0")
    proxy.send(bind_request("127.0.0.1", 21))
    assert proxy.listener()[3] == "0.0.0.0"
    assert proxy.client.value() == first_reply("0.0.0.0")


def test_bytes_sent_while_waiting_reach_the_peer(proxy: Proxy) -> None:
    proxy.start(bind_address="127.0.0.1")
    proxy.send(bind_request("127.0.0.1", 21) + b"early")
    proxy.send(b" bytes")
    inbound = proxy.peer_connects("127.0.0.1", 20)
    assert inbound is not None
    assert inbound.value() == b"early bytes"


def test_bind_peer_mismatch(proxy: Proxy) -> None:
    """Another host connects: it is refused, the client gets 91 and is closed."""
    proxy.start(bind_address="127.0.0.1")
    proxy.send(bind_request("127.0.0.1", 21))
    listening = proxy.listener()[0]
    assert proxy.peer_connects("127.0.0.2", 20) is None
    assert listening.stopped
    assert proxy.client.closed
    proxy.assert_ended(first_reply() + REJECTED, 91, "bind-mismatch")


def test_bind_second_inbound_refused(proxy: Proxy) -> None:
    proxy.start(bind_address="127.0.0.1")
    proxy.send(bind_request("127.0.0.1", 21))
    assert proxy.peer_connects("127.0.0.1", 20) is not None
    assert proxy.peer_connects("127.0.0.1", 21) is None
    assert proxy.client.value() == first_reply() + second_reply("127.0.0.1", 20)


def test_bind_timeout(proxy: Proxy) -> None:
    proxy.start(bind_address="127.0.0.1", bind_timeout=30.0)
    proxy.send(bind_request("127.0.0.1", 21))
    proxy.reactor.advance(29.9)
    assert not proxy.client.closed
    proxy.reactor.advance(0.1)
    assert proxy.listener()[0].stopped
    proxy.assert_ended(first_reply() + REJECTED, 91, "timeout")


def test_client_leaves_during_bind_wait(proxy: Proxy) -> None:
    """No second reply; listener and timer gone; reply is the first 90."""
    proxy.start(bind_address="127.0.0.1")
    proxy.send(bind_request("127.0.0.1", 21))
    proxy.client_leaves()
    assert proxy.listener()[0].stopped
    proxy.assert_ended(first_reply(), 90, "client-gone")


def test_bind_dstip_zero(proxy: Proxy) -> None:
    """No application server named: the peer can't be checked."""
    proxy.start(bind_address="127.0.0.1")
    proxy.send(bind_request("0.0.0.0", 21))
    proxy.assert_ended(REJECTED, 91, "bad-request")
    assert proxy.reactor.tcpServers == []


def test_bind_denied_by_rules(proxy: Proxy) -> None:
    proxy.start(bind_address="127.0.0.1", peer=IPv4Address("TCP", "10.1.2.3", 4000))
    proxy.send(bind_request("127.0.0.1", 21))
    proxy.assert_ended(REJECTED, 91, "rule")
    assert proxy.reactor.tcpServers == []


def test_bind_cannot_listen(proxy: Proxy) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise CannotListenError("127.0.0.1", 0, OSError("no"))

    proxy.reactor.listenTCP = refuse  # type: ignore[method-assign,assignment]
    proxy.start(bind_address="127.0.0.1")
    proxy.send(bind_request("127.0.0.1", 21))
    proxy.assert_ended(REJECTED, 91, "bind-failed")


# -- SOCKS4A BIND ---------------------------------------------------------------


def test_bind_4a_peer_checked_against_resolved_addresses(proxy: Proxy) -> None:
    proxy.start(bind_address="127.0.0.1")
    proxy.send(bind_request("0.0.0.1", 21, hostname=b"ftp.example"))
    assert proxy.reactor.tcpServers == []
    proxy.resolver.answer("127.0.0.5", "127.0.0.1")
    assert proxy.client.value() == first_reply()
    inbound = proxy.peer_connects("127.0.0.1", 2020)
    assert inbound is not None
    assert proxy.client.value() == first_reply() + second_reply("127.0.0.1", 2020)
    inbound.deliver_close()
    event = proxy.session()
    assert (event["dst_host"], event["dst_ip"]) == ("ftp.example", "127.0.0.5")
    assert (event["reply"], event["reason"]) == (90, "relayed")
    proxy.assert_clean()


def test_bind_4a_mismatch(proxy: Proxy) -> None:
    proxy.start(bind_address="127.0.0.1")
    proxy.send(bind_request("0.0.0.1", 21, hostname=b"ftp.example"))
    proxy.resolver.answer("127.0.0.5")
    assert proxy.peer_connects("127.0.0.1", 20) is None
    proxy.assert_ended(first_reply() + REJECTED, 91, "bind-mismatch")


def test_bind_4a_unresolvable(proxy: Proxy) -> None:
    proxy.start(bind_address="127.0.0.1", resolve_timeout=2.0)
    proxy.send(bind_request("0.0.0.1", 21, hostname=b"slow.example"))
    proxy.reactor.advance(2)
    proxy.assert_ended(REJECTED, 91, "resolve-failed")
    assert proxy.reactor.tcpServers == []


# -- the listener on its own -------------------------------------------------------


class Accepting:
    def __init__(self, allowed: tuple[str, ...] = ("192.0.2.1",)) -> None:
        self.reactor = FakeReactor()
        self.clock = Clock()
        self.listener = BindListener(
            self.reactor, self.clock, "127.0.0.1", allowed, 5.0
        )
        self.results: list[object] = []
        self.listener.accepted.addBoth(self.results.append)

    def connect(self, address: IPv4Address | IPv6Address) -> object:
        factory = self.reactor.tcpServers[0][1]
        return factory.buildProtocol(address)


def test_listener_mismatch_fails_with_peer() -> None:
    accepting = Accepting()
    address = accepting.listener.listen()
    assert address == IPv4Address("TCP", "127.0.0.1", LISTENER_PORT)
    assert accepting.connect(IPv4Address("TCP", "192.0.2.9", 1234)) is None
    [failure] = accepting.results
    assert isinstance(failure.value, BindMismatch)  # type: ignore[attr-defined]
    assert failure.value.peer.host == "192.0.2.9"  # type: ignore[attr-defined]
    assert accepting.reactor.ports[0].stopped
    assert not accepting.listener.open
    assert accepting.clock.getDelayedCalls() == []


def test_listener_ipv6_peer_is_a_mismatch() -> None:
    accepting = Accepting()
    accepting.listener.listen()
    assert accepting.connect(IPv6Address("TCP", "::1", 1234)) is None
    [failure] = accepting.results
    assert isinstance(failure.value, BindMismatch)  # type: ignore[attr-defined]


def test_listener_timeout() -> None:
    accepting = Accepting()
    accepting.listener.listen()
    accepting.clock.advance(5)
    [failure] = accepting.results
    assert isinstance(failure.value, defer.TimeoutError)  # type: ignore[attr-defined]
    assert accepting.reactor.ports[0].stopped
    assert accepting.connect(IPv4Address("TCP", "192.0.2.1", 1)) is None


def test_listener_cancel_closes() -> None:
    accepting = Accepting()
    accepting.listener.listen()
    accepting.listener.accepted.cancel()
    [failure] = accepting.results
    assert isinstance(failure.value, defer.CancelledError)  # type: ignore[attr-defined]
    assert accepting.reactor.ports[0].stopped
    assert accepting.clock.getDelayedCalls() == []
    accepting.listener.close()  # idempotent


def test_route_source_address_of_loopback() -> None:
    assert route_source_address("127.0.0.1") == "127.0.0.1"


def test_bind_no_route_to_the_application_server(
    proxy: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("socks4tx.server.route_source_address", lambda address: None)
    proxy.start()
    proxy.send(bind_request("198.51.100.5", 21))
    proxy.assert_ended(REJECTED, 91, "bind-failed")
    assert proxy.reactor.tcpServers == []
