"""
The session record: the operator's account of who went where.

One C{twisted.logger} event per session, emitted when it ends, in namespace
C{socks4tx.session}.  Its fields are a public interface documented in the
README; keep them stable.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IAddress
from twisted.logger import Logger

from socks4tx.wire import Request

log = Logger(namespace="socks4tx.session")

SESSION_FORMAT = (
    "{client}:{client_port} {userid!r} {command} {dst_host} {dst_ip}:{dst_port}"
    " reply={reply} reason={reason} rule={rule} up={bytes_up} down={bytes_down}"
    " {duration:.3f}s"
)


def address_host_port(address: IAddress) -> tuple[str | None, int | None]:
    """The host and port of an address; a UNIX socket has only a name."""
    if isinstance(address, (IPv4Address, IPv6Address)):
        return address.host, address.port
    if isinstance(address, UNIXAddress):
        name = address.name
        text = name.decode("utf-8", "replace") if isinstance(name, bytes) else name
        return f"unix:{text or ''}", None
    return None, None


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
        fields = asdict(self)
        del fields["started"]
        log.info(SESSION_FORMAT, **fields)
