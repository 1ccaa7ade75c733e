"""
The session record: the operator's account of who went where.

One C{twisted.logger} event per session, emitted when it ends, in namespace
C{socks4tx.session}.  Its fields are a public interface documented in the
README; keep them stable.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IAddress, ITransport
from twisted.logger import Logger

from socks4tx.wire import Request

log = Logger(namespace="socks4tx.session")


def address_host_port(address: IAddress) -> tuple[str | None, int | None]:
    """The host and port of an address; a UNIX socket has only a name."""
    if isinstance(address, (IPv4Address, IPv6Address)):
        return address.host, address.port
    if isinstance(address, UNIXAddress):
        name = address.name
        text = name.decode("utf-8", "replace") if isinstance(name, bytes) else name
        return f"unix:{text or ''}", None
    return None, None


def client_address(transport: ITransport) -> IAddress:
    """
    The client's address, for the session record: its peer address, but on
    a UNIX socket, where clients seldom bind a name, the listener's path
    when the peer has none (so the record says which socket it came in on).
    """
    peer: IAddress = transport.getPeer()
    if isinstance(peer, UNIXAddress) and not peer.name:
        host = transport.getHost()
        if isinstance(host, UNIXAddress):
            return host
    return peer


def describe(address: IAddress) -> str:
    """C{host:port}, C{[v6]:port} or C{unix:path}, for logs."""
    host, port = address_host_port(address)
    if port is None:
        return host or repr(address)
    if isinstance(address, IPv6Address):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


@dataclass
class Session:
    """What one session did; the fields of its log event."""

    client: str | None
    client_port: int | None
    started: float
    userid: str | None = None
    command: str | None = None
    dst_host: str | None = None
    dst_ip: str | None = None
    dst_port: int | None = None
    reply: int | None = None
    reason: str | None = None
    rule: str | None = None
    ident: str | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    duration: float = 0.0
    #: The relay that moved the bytes: "splice" or "portable" (None: none ran).
    relay: str | None = None

    def request(self, request: Request) -> None:
        """Record the request's fields."""
        self.userid = request.userid.decode("utf-8", "backslashreplace")
        self.command = request.command.label
        if request.hostname is not None:
            self.dst_host = request.hostname.decode("ascii")
        else:
            self.dst_ip = request.address
        self.dst_port = request.port

    def end(self, now: float) -> None:
        """Emit the log event, once the session is over."""
        self.duration = round(now - self.started, 6)
        # The text is made here with an f-string, braces escaped, rather than
        # by twisted.logger's str.format machinery: an event per session is
        # on the handshake's hot path, and this halves its cost.
        client = self.client
        if self.client_port is not None:
            client = f"{client}:{self.client_port}"
        text = (
            f"{client} {self.userid!r} {self.command}"
            f" {self.dst_host} {self.dst_ip}:{self.dst_port} reply={self.reply}"
            f" reason={self.reason} rule={self.rule} up={self.bytes_up}"
            f" down={self.bytes_down} {self.duration:.3f}s"
        )
        log.info(
            text.replace("{", "{{").replace("}", "}}"),
            client=self.client,
            client_port=self.client_port,
            userid=self.userid,
            command=self.command,
            dst_host=self.dst_host,
            dst_ip=self.dst_ip,
            dst_port=self.dst_port,
            reply=self.reply,
            reason=self.reason,
            rule=self.rule,
            ident=self.ident,
            bytes_up=self.bytes_up,
            bytes_down=self.bytes_down,
            duration=self.duration,
            relay=self.relay,
        )
