"""
Access decisions, without I/O.

A policy answers one question at the start of each session: may this
source reach this destination and port, under this user-id, with this
command?  The built-in policy serves loopback clients only, so a server
started without configuration is never an open relay.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass
from typing import Protocol

from socks4tx.wire import Command


@dataclass(frozen=True)
class Decision:
    """
    @ivar permit: whether the session may go on.
    @ivar rule: what decided, for the log (C{file:line} for a rules file).
    """

    permit: bool
    rule: str | None = None


class Policy(Protocol):
    def decide(
        self,
        source: str | None,
        destination: str,
        port: int,
        userid: bytes,
        command: Command,
    ) -> Decision: ...


def source_address(
    host: str | None,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """
    A client's address as rules see it: IPv4-mapped IPv6 becomes IPv4;
    C{None} for a client without an IP address (a UNIX socket).
    """
    if host is None:
        return None
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


@functools.lru_cache(maxsize=1024)
def is_local_client(host: str | None) -> bool:
    """Loopback (127.0.0.0/8, ::1) or a UNIX socket: a client on this host."""
    address = source_address(host)
    return address is None or address.is_loopback


class LoopbackOnly:
    """The built-in policy: clients on this host may go anywhere."""

    RULE = "builtin:loopback-only"

    def decide(
        self,
        source: str | None,
        destination: str,
        port: int,
        userid: bytes,
        command: Command,
    ) -> Decision:
        return Decision(is_local_client(source), self.RULE)
