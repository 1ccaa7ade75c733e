"""The session log event: its fields are a public interface (SPEC.md)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from fakes import SESSION_FIELDS, Proxy, connect_request
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent, capturedLogs, eventAsJSON, formatEvent

from socks4tx.session import Session, address_host_port, client_address, describe
from socks4tx.wire import Command, Request


def fields(event: LogEvent) -> set[str]:
    """The event's own fields, without twisted.logger's C{log_*} keys."""
    return {key for key in event if not key.startswith("log_")}


def test_field_names_are_exactly_specs() -> None:
    spec = {
        # SPEC.md, "The session log event":
        "client", "client_port", "userid", "command", "dst_host", "dst_ip",
        "dst_port", "reply", "reason", "rule", "ident", "bytes_up", "bytes_down",
        "duration",
    }  # fmt: skip
    # Issue 5 adds the relay that moved the bytes.
    assert spec | {"relay"} == SESSION_FIELDS


def ended(session: Session, now: float) -> LogEvent:
    with capturedLogs() as events:
        session.end(now)
    [event] = events
    return event


def test_event_of_a_session_that_never_sent_a_request() -> None:
    event = ended(Session("127.0.0.1", 5000, 10.0), 12.5)
    assert fields(event) == SESSION_FIELDS
    assert event["log_namespace"] == "socks4tx.session"
    assert event["log_level"].name == "info"
    assert {name: event[name] for name in SESSION_FIELDS} == {
        "client": "127.0.0.1",
        "client_port": 5000,
        "userid": None,
        "command": None,
        "dst_host": None,
        "dst_ip": None,
        "dst_port": None,
        "reply": None,
        "reason": None,
        "rule": None,
        "ident": None,
        "bytes_up": 0,
        "bytes_down": 0,
        "duration": 2.5,
        "relay": None,
    }
    formatEvent(event)  # formats without error


def test_event_of_a_socks4a_request() -> None:
    session = Session("::1", 6000, 0.0)
    session.request(Request(Command.BIND, 21, "0.0.0.1", b"bob", b"ftp.example"))
    session.dst_ip = "192.0.2.1"
    session.reply, session.reason = 91, "bind-mismatch"
    event = ended(session, 1.0)
    assert fields(event) == SESSION_FIELDS
    assert (event["command"], event["userid"]) == ("bind", "bob")
    assert (event["dst_host"], event["dst_ip"], event["dst_port"]) == (
        "ftp.example",
        "192.0.2.1",
        21,
    )
    text = formatEvent(event)
    assert "ftp.example" in text and "reply=91" in text and "bind-mismatch" in text


def test_event_as_a_json_line() -> None:
    """Every field survives JSON (the README's JSON-lines output)."""
    session = Session("127.0.0.1", 7000, 0.0)
    session.request(Request(Command.CONNECT, 80, "198.51.100.5", b"\xff"))
    session.reply, session.reason = 90, "relayed"
    session.bytes_up, session.bytes_down = 3, 4
    session.relay = "splice"
    event = ended(session, 0.25)
    record = json.loads(eventAsJSON(event))
    assert {name: record[name] for name in SESSION_FIELDS} == {
        "client": "127.0.0.1",
        "client_port": 7000,
        "userid": "\\xff",
        "command": "connect",
        "dst_host": None,
        "dst_ip": "198.51.100.5",
        "dst_port": 80,
        "reply": 90,
        "reason": "relayed",
        "rule": None,
        "ident": None,
        "bytes_up": 3,
        "bytes_down": 4,
        "duration": 0.25,
        "relay": "splice",
    }


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    with Proxy() as proxy:
        yield proxy


def test_server_event_has_exactly_the_fields(proxy: Proxy) -> None:
    proxy.start()
    proxy.send(connect_request())
    proxy.connection_succeeds()
    proxy.client.deliver_close()
    event = proxy.session()
    assert fields(event) == SESSION_FIELDS
    json.loads(eventAsJSON(event))


def test_server_event_of_a_rejected_session(proxy: Proxy) -> None:
    proxy.start()
    proxy.send(b"\x04\x09")
    event = proxy.session()
    assert fields(event) == SESSION_FIELDS
    assert event["reply"] == 91


@pytest.mark.parametrize(
    ("address", "host_port", "text"),
    [
        (IPv4Address("TCP", "127.0.0.1", 1080), ("127.0.0.1", 1080), "127.0.0.1:1080"),
        (IPv6Address("TCP", "::1", 1080), ("::1", 1080), "[::1]:1080"),
        (
            UNIXAddress(b"/run/socks.sock"),
            ("unix:/run/socks.sock", None),
            "unix:/run/socks.sock",
        ),
        (UNIXAddress("/run/s"), ("unix:/run/s", None), "unix:/run/s"),
        (UNIXAddress(None), ("unix:", None), "unix:"),
    ],
)
def test_addresses(
    address: IPv4Address | IPv6Address | UNIXAddress,
    host_port: tuple[str, int | None],
    text: str,
) -> None:
    assert address_host_port(address) == host_port
    assert describe(address) == text


def test_unknown_address_type() -> None:
    assert address_host_port(object()) == (None, None)  # type: ignore[arg-type]


def test_client_address_names_the_unix_socket_a_nameless_client_came_in_on() -> None:
    listener = UNIXAddress(b"/run/socks4tx.sock")
    nameless = StringTransport(peerAddress=UNIXAddress(b""), hostAddress=listener)
    assert client_address(nameless) == listener
    named_peer = UNIXAddress(b"/tmp/client.sock")
    named = StringTransport(peerAddress=named_peer, hostAddress=listener)
    assert client_address(named) == named_peer
    tcp_peer = IPv4Address("TCP", "127.0.0.1", 40000)
    tcp = StringTransport(peerAddress=tcp_peer)
    assert client_address(tcp) == tcp_peer


def test_session_text_of_a_unix_client_has_no_port() -> None:
    host, port = address_host_port(UNIXAddress(b"/run/socks4tx.sock"))
    session = Session(host, port, started=0.0)
    with capturedLogs() as events:
        session.end(1.0)
    [event] = events
    assert formatEvent(event).startswith("unix:/run/socks4tx.sock None ")
    assert event["client"] == "unix:/run/socks4tx.sock"
    assert event["client_port"] is None
