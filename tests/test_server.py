"""
The handshake and CONNECT, driven on fakes: every row of SPEC.md's table
"Replies and closes" that does not need BIND or ident, each with its exact
reply bytes, the close, one session log event and nothing left running.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fakes import (
    CLIENT_ADDRESS,
    OUTGOING_ADDRESS,
    REJECTED,
    Proxy,
    ScriptedPolicy,
    connect_request,
    reply_bytes,
)
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import (
    ConnectionRefusedError,
    NoRouteError,
    TimeoutError,
)
from twisted.internet.interfaces import IAddress
from twisted.logger import formatEvent
from twisted.names.error import DNSNameError

from socks4tx.rules import Decision, LoopbackOnly, parse_rules
from socks4tx.server import HOLD_LIMIT
from socks4tx.wire import Command, ReplyCode

GRANTED = reply_bytes(ReplyCode.GRANTED, OUTGOING_ADDRESS.port, OUTGOING_ADDRESS.host)


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    with Proxy() as proxy:
        yield proxy


# -- the request arriving ---------------------------------------------------


def test_request_byte_by_byte(proxy: Proxy) -> None:
    """A request in 1-byte pieces is served once its last byte arrives."""
    proxy.start()
    request = connect_request("198.51.100.5", 8080, b"alice")
    for index in range(len(request) - 1):
        proxy.send(request[index : index + 1])
        assert proxy.client.value() == b""
        assert proxy.reactor.tcpClients == []
        assert not proxy.client.closed
    proxy.send(request[-1:])
    host, port, _, timeout, bind = proxy.connect_attempt()
    assert (host, port, timeout, bind) == ("198.51.100.5", 8080, 120.0, None)
    # 90 only once the outgoing connection is established, never before.
    assert proxy.client.value() == b""
    proxy.connection_succeeds()
    assert proxy.client.value() == GRANTED
    assert not proxy.client.closed


def test_trailing_bytes_relayed_first(proxy: Proxy) -> None:
    """
    Bytes right behind the request, and bytes sent while the CONNECT is
    pending, reach the destination first, in order, unparsed.
    """
    proxy.start()
    proxy.send(connect_request() + b"GET / ")
    proxy.send(b"HTTP/1.0\r\n")
    # Another request while the first is decided is payload, not a request.
    proxy.send(connect_request("203.0.113.9", 25))
    assert len(proxy.reactor.tcpClients) == 1
    assert proxy.client.value() == b""
    remote = proxy.connection_succeeds()
    assert remote.value() == b"GET / HTTP/1.0\r\n" + connect_request("203.0.113.9", 25)
    assert proxy.client.value() == GRANTED
    remote.receive(b"HTTP/1.0 200 OK\r\n")
    assert proxy.client.value() == GRANTED + b"HTTP/1.0 200 OK\r\n"
    assert len(proxy.reactor.tcpClients) == 1


def test_held_bytes_are_bounded(proxy: Proxy) -> None:
    """
    A client that keeps sending while its CONNECT is pending is paused once
    HOLD_LIMIT bytes are held, and resumed when the relay starts.
    """
    proxy.start()
    proxy.send(connect_request())
    chunk = b"x" * 4096
    sent = 0
    while sent < HOLD_LIMIT:
        assert proxy.client.producerState == "producing"
        proxy.send(chunk)
        sent += len(chunk)
    assert proxy.client.producerState == "paused"
    remote = proxy.connection_succeeds()
    assert remote.value() == b"x" * sent
    assert proxy.client.producerState == "producing"


def test_session_event_for_relayed_connect(proxy: Proxy) -> None:
    proxy.start()
    proxy.send(connect_request("198.51.100.5", 80, b"alice") + b"abc")
    proxy.reactor.advance(2)
    remote = proxy.connection_succeeds()
    proxy.send(b"de")
    remote.receive(b"12345678")
    proxy.reactor.advance(1.5)
    proxy.client.deliver_eof()
    remote.deliver_eof()
    proxy.settle()
    assert proxy.client.value() == GRANTED + b"12345678"
    assert remote.value() == b"abcde"
    event = proxy.session()
    assert event["client"] == CLIENT_ADDRESS.host
    assert event["client_port"] == CLIENT_ADDRESS.port
    assert event["userid"] == "alice"
    assert event["command"] == "connect"
    assert event["dst_host"] is None
    assert (event["dst_ip"], event["dst_port"]) == ("198.51.100.5", 80)
    assert (event["reply"], event["reason"]) == (90, "relayed")
    assert event["rule"] == "builtin:loopback-only"
    assert event["ident"] is None
    assert (event["bytes_up"], event["bytes_down"]) == (5, 8)
    assert event["duration"] == pytest.approx(3.5)
    proxy.assert_clean()


def test_keepalive_on_both_sides(proxy: Proxy) -> None:
    proxy.start()
    proxy.send(connect_request())
    remote = proxy.connection_succeeds()
    assert proxy.client.keepalive is True
    assert remote.keepalive is True


def test_no_keepalive(proxy: Proxy) -> None:
    proxy.start(keepalive=False)
    proxy.send(connect_request())
    remote = proxy.connection_succeeds()
    assert proxy.client.keepalive is None
    assert remote.keepalive is None


def test_outgoing_address(proxy: Proxy) -> None:
    proxy.start(outgoing_address="192.0.2.7", connect_timeout=7.0)
    proxy.send(connect_request())
    _, _, _, timeout, bind = proxy.connect_attempt()
    assert (timeout, bind) == (7.0, ("192.0.2.7", 0))


# -- the handshake timeout ------------------------------------------------------


@pytest.mark.parametrize("partial", [b"", b"\x04", connect_request()[:-1]])
def test_handshake_timeout(proxy: Proxy, partial: bytes) -> None:
    """An incomplete request at the handshake timeout: no reply, close."""
    proxy.start(handshake_timeout=5.0)
    proxy.send(partial)
    proxy.reactor.advance(4.9)
    assert not proxy.client.closed
    proxy.reactor.advance(0.1)
    proxy.assert_ended(b"", None, "timeout")


def test_handshake_timer_stops_with_the_request(proxy: Proxy) -> None:
    proxy.start(handshake_timeout=5.0)
    proxy.send(connect_request())
    proxy.reactor.advance(60)
    assert not proxy.client.closed
    proxy.connection_succeeds()
    assert proxy.client.value() == GRANTED
    assert proxy.reactor.getDelayedCalls() == []


# -- bad requests -------------------------------------------------------------


def test_socks5_client_told_no_acceptable_method(proxy: Proxy) -> None:
    proxy.start()
    proxy.send(b"\x05\x01\x00")
    proxy.assert_ended(b"\x05\xff", None, "bad-request")
    messages = [
        formatEvent(e)
        for e in proxy.events
        if e.get("log_namespace") != "socks4tx.session"
    ]
    assert any("SOCKS5" in message for message in messages), messages
    assert proxy.reactor.tcpClients == []


@pytest.mark.parametrize("first", [b"G", b"\x00", b"\x03", b"\xff"])
def test_bad_version_no_reply(proxy: Proxy, first: bytes) -> None:
    proxy.start()
    proxy.send(first + b"ET / HTTP/1.1\r\n\r\n")
    proxy.assert_ended(b"", None, "bad-request")


@pytest.mark.parametrize("command", [0, 3, 0x5A, 0xFF])
def test_unknown_command(proxy: Proxy, command: int) -> None:
    """91 as soon as the CD byte is known, before the rest arrives."""
    proxy.start()
    proxy.send(b"\x04")
    proxy.send(bytes([command]))
    proxy.assert_ended(REJECTED, 91, "bad-request")
    assert proxy.reactor.tcpClients == []


def test_oversize_userid(proxy: Proxy) -> None:
    """91 once USERID passes its limit, without waiting for its NUL."""
    proxy.start(max_userid=16)
    header = connect_request(userid=b"")[:-1]
    proxy.send(header + b"u" * 16)
    assert proxy.client.value() == b""
    proxy.send(b"u")
    proxy.assert_ended(REJECTED, 91, {"bad-request", "limit"})
    assert proxy.reactor.tcpClients == []


def test_userid_at_its_limit(proxy: Proxy) -> None:
    proxy.start(max_userid=16)
    proxy.send(connect_request(userid=b"u" * 16))
    proxy.connect_attempt()


def test_oversize_hostname(proxy: Proxy) -> None:
    proxy.start(max_hostname=10)
    request = connect_request("0.0.0.1", hostname=b"")[:-1]
    proxy.send(request + b"h" * 11)
    proxy.assert_ended(REJECTED, 91, {"bad-request", "limit"})
    assert proxy.resolver.lookups == []


def test_invalid_hostname(proxy: Proxy) -> None:
    proxy.start()
    proxy.send(connect_request("0.0.0.1", hostname=b"bad name"))
    proxy.assert_ended(REJECTED, 91, "bad-request")
    assert proxy.resolver.lookups == []


def test_connect_to_dstip_zero(proxy: Proxy) -> None:
    proxy.start()
    proxy.send(connect_request("0.0.0.0", 80))
    proxy.assert_ended(REJECTED, 91, "bad-request")
    assert proxy.reactor.tcpClients == []


def test_nothing_parsed_after_a_rejection(proxy: Proxy) -> None:
    proxy.start()
    proxy.send(b"\x04\x07" + connect_request())
    proxy.send(connect_request())
    proxy.assert_ended(REJECTED, 91, "bad-request")
    assert proxy.reactor.tcpClients == []


# -- destinations refused for safety, rules -------------------------------------


def test_own_listener_refused(proxy: Proxy) -> None:
    proxy.start(listening={("127.0.0.1", 1080)})
    proxy.send(connect_request("127.0.0.1", 1080))
    event = proxy.assert_ended(REJECTED, 91, "destination-refused")
    assert (event["dst_ip"], event["dst_port"]) == ("127.0.0.1", 1080)
    assert proxy.reactor.tcpClients == []


@pytest.mark.parametrize("wildcard", ["0.0.0.0", "::"])
def test_own_wildcard_listener_refused(proxy: Proxy, wildcard: str) -> None:
    """A wildcard listener is reached through any local address."""
    proxy.start(listening={(wildcard, 1080)})
    proxy.send(connect_request("127.0.0.1", 1080))
    proxy.assert_ended(REJECTED, 91, "destination-refused")
    assert proxy.reactor.tcpClients == []


def test_own_listener_by_name_refused(proxy: Proxy) -> None:
    proxy.start(listening={("127.0.0.1", 1080)})
    proxy.send(connect_request("0.0.0.1", 1080, hostname=b"localhost"))
    proxy.resolver.answer("127.0.0.1")
    event = proxy.assert_ended(REJECTED, 91, "destination-refused")
    assert (event["dst_host"], event["dst_ip"]) == ("localhost", "127.0.0.1")
    assert proxy.reactor.tcpClients == []


def test_other_port_on_own_address_allowed(proxy: Proxy) -> None:
    proxy.start(listening={("127.0.0.1", 1080)})
    proxy.send(connect_request("127.0.0.1", 1081))
    assert proxy.connect_attempt()[:2] == ("127.0.0.1", 1081)


def test_non_loopback_client_denied(proxy: Proxy) -> None:
    proxy.start(peer=IPv4Address("TCP", "10.1.2.3", 40000))
    proxy.send(connect_request("198.51.100.5", 80))
    event = proxy.assert_ended(REJECTED, 91, "rule")
    assert event["rule"] == "builtin:loopback-only"
    assert event["client"] == "10.1.2.3"
    assert proxy.reactor.tcpClients == []


@pytest.mark.parametrize(
    "peer",
    [
        IPv6Address("TCP", "::1", 40000),
        IPv6Address("TCP", "::ffff:127.0.0.1", 40000),
        UNIXAddress(b"/run/socks4.sock"),
    ],
)
def test_local_clients_permitted(proxy: Proxy, peer: IAddress) -> None:
    proxy.start(peer=peer)
    proxy.send(connect_request())
    proxy.connection_succeeds()
    assert proxy.client.value() == GRANTED


@pytest.mark.parametrize(
    "peer",
    [
        IPv6Address("TCP", "2001:db8::1", 40000),
        IPv6Address("TCP", "::ffff:10.1.2.3", 40000),
    ],
)
def test_remote_ipv6_clients_denied(proxy: Proxy, peer: IAddress) -> None:
    proxy.start(peer=peer)
    proxy.send(connect_request())
    proxy.assert_ended(REJECTED, 91, "rule")


@pytest.mark.parametrize("permit", [True, False])
def test_policy_decides_on_the_resolved_destination(proxy: Proxy, permit: bool) -> None:
    policy = ScriptedPolicy(Decision(permit, "rules:12"))
    proxy.start(policy=policy)
    proxy.send(connect_request("0.0.0.1", 443, b"bob", hostname=b"example.com"))
    assert policy.questions == []  # resolve first, then decide
    proxy.resolver.answer("203.0.113.10")
    assert policy.questions == [
        ("127.0.0.1", "203.0.113.10", 443, b"bob", Command.CONNECT)
    ]
    if permit:
        proxy.connection_succeeds()
        proxy.client.deliver_close()
        event = proxy.session()
    else:
        event = proxy.assert_ended(REJECTED, 91, "rule")
        assert proxy.reactor.tcpClients == []
    assert event["rule"] == "rules:12"


class Broken:
    def decide(self, *args: object) -> Decision:
        raise RuntimeError("bug in a policy")


def test_unexpected_error_rejects_and_is_logged(proxy: Proxy) -> None:
    """dataReceived never raises: an internal error is a 91 and a log."""
    proxy.start(policy=Broken())
    proxy.send(connect_request())
    assert proxy.client.value() == REJECTED
    assert proxy.client.closed
    event = proxy.session()
    assert (event["reply"], event["reason"]) == (91, "internal-error")
    failures = [e for e in proxy.events if "log_failure" in e]
    assert len(failures) == 1
    assert failures[0]["log_failure"].check(RuntimeError)
    assert proxy.reactor.getDelayedCalls() == []


# -- SOCKS4A ------------------------------------------------------------------


def test_4a_resolved(proxy: Proxy) -> None:
    proxy.start(resolve_timeout=3.0)
    proxy.send(connect_request("0.0.0.1", 443, hostname=b"example.com") + b"hi")
    [(name, timeout, _)] = proxy.resolver.lookups
    assert name == "example.com"
    assert timeout == (3.0,)
    assert proxy.reactor.tcpClients == []
    proxy.resolver.answer("203.0.113.10", "203.0.113.11")
    assert proxy.connect_attempt()[:2] == ("203.0.113.10", 443)
    remote = proxy.connection_succeeds()
    assert remote.value() == b"hi"
    assert proxy.client.value() == GRANTED
    proxy.client.deliver_close()
    event = proxy.session()
    assert (event["dst_host"], event["dst_ip"]) == ("example.com", "203.0.113.10")
    assert (event["reply"], event["reason"]) == (90, "relayed")
    proxy.assert_clean()


def test_4a_ip_literal_needs_no_lookup(proxy: Proxy) -> None:
    proxy.start()
    proxy.send(connect_request("0.0.0.9", 80, hostname=b"198.51.100.77"))
    assert proxy.resolver.lookups == []
    assert proxy.connect_attempt()[:2] == ("198.51.100.77", 80)


def test_4a_name_resolving_to_this_network_refused(proxy: Proxy) -> None:
    proxy.start()
    proxy.send(connect_request("0.0.0.1", 80, hostname=b"zero.example"))
    proxy.resolver.answer("0.0.0.0")
    proxy.assert_ended(REJECTED, 91, "destination-refused")
    assert proxy.reactor.tcpClients == []


def test_4a_resolve_failed(proxy: Proxy) -> None:
    proxy.start()
    proxy.send(connect_request("0.0.0.1", 80, hostname=b"nx.example"))
    proxy.resolver.lookups[0][2].errback(DNSNameError("nx.example"))
    event = proxy.assert_ended(REJECTED, 91, "resolve-failed")
    assert event["dst_host"] == "nx.example"
    assert proxy.reactor.tcpClients == []


def test_4a_no_ipv4_address(proxy: Proxy) -> None:
    proxy.start()
    proxy.send(connect_request("0.0.0.1", 80, hostname=b"v6only.example"))
    proxy.resolver.answer("2001:db8::1")
    proxy.assert_ended(REJECTED, 91, "resolve-failed")
    assert proxy.reactor.tcpClients == []


def test_4a_resolve_timeout(proxy: Proxy) -> None:
    proxy.start(resolve_timeout=3.0)
    proxy.send(connect_request("0.0.0.1", 80, hostname=b"slow.example"))
    proxy.reactor.advance(2.9)
    assert not proxy.client.closed
    proxy.reactor.advance(0.1)
    proxy.assert_ended(REJECTED, 91, "resolve-failed")
    assert proxy.reactor.tcpClients == []


def test_4a_answer_after_rejection_is_ignored(proxy: Proxy) -> None:
    """The timed-out lookup was cancelled; nothing more happens."""
    proxy.start(resolve_timeout=3.0)
    proxy.send(connect_request("0.0.0.1", 80, hostname=b"slow.example"))
    proxy.reactor.advance(3)
    proxy.assert_ended(REJECTED, 91, "resolve-failed")
    assert proxy.resolver.lookups[0][2].called
    assert proxy.reactor.tcpClients == []


def test_client_leaves_during_resolve(proxy: Proxy) -> None:
    proxy.start()
    proxy.send(connect_request("0.0.0.1", 80, hostname=b"slow.example"))
    proxy.client_leaves()
    proxy.assert_ended(b"", None, "client-gone")
    assert proxy.reactor.tcpClients == []


# -- connecting ---------------------------------------------------------------


@pytest.mark.parametrize(
    "error", [ConnectionRefusedError(), NoRouteError(), TimeoutError()]
)
def test_connect_failed(proxy: Proxy, error: Exception) -> None:
    proxy.start()
    proxy.send(connect_request("198.51.100.5", 9) + b"payload")
    proxy.connection_fails(error)
    event = proxy.assert_ended(REJECTED, 91, "connect-failed")
    assert (event["bytes_up"], event["bytes_down"]) == (0, 0)


def test_client_leaves_during_connect(proxy: Proxy) -> None:
    """No reply, the connect attempt is stopped, reason client-gone."""
    proxy.start()
    proxy.send(connect_request())
    proxy.client_leaves()
    assert proxy.reactor.connectors[0].stoppedConnecting
    proxy.assert_ended(b"", None, "client-gone")


def test_client_half_closes_during_connect(proxy: Proxy) -> None:
    """
    A client that sends its request and its payload, then shuts down its
    write side (``printf ... | nc -N``) before the answer, has not left: it
    still gets the reply and the destination's answer.
    """
    proxy.start()
    proxy.send(connect_request() + b"GET / HTTP/1.0\r\n\r\n")
    proxy.client.deliver_eof()
    assert not proxy.client.closed
    remote = proxy.connection_succeeds()
    assert remote.value() == b"GET / HTTP/1.0\r\n\r\n"
    assert remote.write_closed
    remote.receive(b"HTTP/1.0 200 OK\r\n\r\n")
    remote.deliver_eof()
    assert proxy.client.value() == GRANTED + b"HTTP/1.0 200 OK\r\n\r\n"
    event = proxy.session()
    assert (event["reply"], event["reason"]) == (90, "relayed")
    proxy.assert_clean()


def test_client_half_closes_during_resolve(proxy: Proxy) -> None:
    """EOF before the request is even decided, with nothing to relay."""
    proxy.start()
    proxy.send(connect_request("0.0.0.1", 80, hostname=b"slow.example"))
    proxy.client.deliver_eof()
    proxy.client.deliver_close()
    proxy.assert_ended(b"", None, "client-gone")


def test_client_leaves_before_request(proxy: Proxy) -> None:
    proxy.start()
    proxy.send(b"\x04\x01")
    proxy.client_leaves()
    event = proxy.assert_ended(b"", None, "client-gone")
    assert event["command"] is None


def test_unicode_userid_logged_safely(proxy: Proxy) -> None:
    proxy.start(peer=IPv4Address("TCP", "10.1.2.3", 40000))
    proxy.send(connect_request(userid="émile".encode() + b"\xff"))
    event = proxy.assert_ended(REJECTED, 91, "rule")
    assert event["userid"] == "émile\\xff"


@pytest.mark.parametrize("text", ["", "# only a comment\n", "#NO_IDENTD: true\n"])
def test_rules_file_without_rules_denies_everyone(proxy: Proxy, text: str) -> None:
    """An empty rule set is the default deny, not the built-in policy."""
    rules = parse_rules(text, "empty.conf")
    assert len(rules) == 0
    proxy.start(policy=rules)  # the client is on 127.0.0.1
    proxy.send(connect_request())
    event = proxy.assert_ended(REJECTED, 91, "rule")
    assert proxy.reactor.tcpClients == []
    assert event["rule"] != LoopbackOnly.RULE
