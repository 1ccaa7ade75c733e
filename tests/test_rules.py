"""The built-in policy: loopback clients (and UNIX sockets) only."""

from __future__ import annotations

import ipaddress

import pytest

from socks4tx.rules import Decision, LoopbackOnly, is_local_client, source_address
from socks4tx.wire import Command


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", ipaddress.IPv4Address("127.0.0.1")),
        ("10.1.2.3", ipaddress.IPv4Address("10.1.2.3")),
        ("::1", ipaddress.IPv6Address("::1")),
        ("2001:db8::7", ipaddress.IPv6Address("2001:db8::7")),
        # IPv4-mapped IPv6 is matched as IPv4.
        ("::ffff:127.0.0.1", ipaddress.IPv4Address("127.0.0.1")),
        ("::ffff:10.1.2.3", ipaddress.IPv4Address("10.1.2.3")),
        # A scope id names an interface, not a different host.
        ("fe80::1%eth0", ipaddress.IPv6Address("fe80::1")),
    ],
)
def test_source_address(
    host: str, expected: ipaddress.IPv4Address | ipaddress.IPv6Address
) -> None:
    assert source_address(host) == expected


@pytest.mark.parametrize("host", [None, "unix:/run/socks.sock", "unix:", ""])
def test_source_address_without_ip(host: str | None) -> None:
    assert source_address(host) is None


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "127.255.0.9", "::1", "::ffff:127.0.0.1", None, "unix:/run/s"],
)
def test_local_clients(host: str | None) -> None:
    assert is_local_client(host)


@pytest.mark.parametrize(
    "host",
    [
        "10.1.2.3",
        "192.0.2.1",
        "0.0.0.0",
        "::",
        "::ffff:10.1.2.3",
        "2001:db8::1",
        "fe80::1%eth0",
    ],
)
def test_remote_clients(host: str) -> None:
    assert not is_local_client(host)


@pytest.mark.parametrize("command", list(Command))
def test_loopback_only_permits_local_clients_anywhere(command: Command) -> None:
    decision = LoopbackOnly().decide("127.0.0.1", "198.51.100.5", 25, b"", command)
    assert decision == Decision(True, "builtin:loopback-only")


def test_loopback_only_denies_remote_clients() -> None:
    decision = LoopbackOnly().decide(
        "::ffff:10.1.2.3", "127.0.0.1", 80, b"root", Command.CONNECT
    )
    assert decision == Decision(False, "builtin:loopback-only")


def test_loopback_only_permits_unix_socket_clients() -> None:
    decision = LoopbackOnly().decide(None, "198.51.100.5", 80, b"", Command.CONNECT)
    assert decision.permit
