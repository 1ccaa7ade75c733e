"""
The SOCKS4 and SOCKS4A wire format, without I/O.

Nothing here imports Twisted: the parser is fed bytes and answers with a
L{Request}, with C{None} ("need more"), or by raising a L{WireError} that
names the reply the server owes the client (or C{None}: no reply at all).
L{ReplyParser} is the client's side: it reads the server's 8-byte reply.
"""

from __future__ import annotations

import enum
import socket
import struct
from dataclasses import dataclass

SOCKS_VERSION = 4
REPLY_VERSION = 0
#: The fixed part of a request: VN, CD, DSTPORT, DSTIP.
HEADER = struct.Struct("!BBH4s")
REPLY = struct.Struct("!BBH4s")
DEFAULT_MAX_USERID = 255
DEFAULT_MAX_HOSTNAME = 255
#: The first bytes a SOCKS5 client sends start with version 5; this is the
#: SOCKS5 answer "no acceptable authentication method" (RFC 1928).
SOCKS5_NO_ACCEPTABLE_METHOD = b"\x05\xff"


class Command(enum.IntEnum):
    CONNECT = 1
    BIND = 2

    @property
    def label(self) -> str:
        """The lower-case name used in logs and rules (C{connect}, C{bind})."""
        return self.name.lower()


class ReplyCode(enum.IntEnum):
    GRANTED = 90
    REJECTED = 91
    IDENTD_UNREACHABLE = 92
    IDENT_MISMATCH = 93


class WireError(Exception):
    """
    A request that can't be served as sent.

    @ivar reply: the reply code owed to the client, or C{None} when the peer
        does not speak SOCKS4 and must not be answered in it.
    """

    reply: ReplyCode | None = ReplyCode.REJECTED


class VersionError(WireError):
    """The first byte is not 4: not a SOCKS4 client."""

    reply = None

    def __init__(self, version: int) -> None:
        super().__init__(f"unsupported SOCKS version {version}")
        self.version = version


class CommandError(WireError):
    def __init__(self, command: int) -> None:
        super().__init__(f"unknown command {command}")
        self.command = command


class FieldTooLong(WireError):
    def __init__(self, field: str, limit: int) -> None:
        super().__init__(f"{field} longer than {limit} bytes")
        self.field = field
        self.limit = limit


class BadHostname(WireError):
    def __init__(self, hostname: bytes) -> None:
        super().__init__(f"invalid SOCKS4A host name {hostname!r}")
        self.hostname = hostname


class BadReply(WireError):
    """A reply that a client cannot accept (wrong length or version)."""

    reply = None


def is_socks4a(address: str) -> bool:
    """True for DSTIP 0.0.0.x with x != 0: a host name follows the userid."""
    return _is_socks4a(pack_ipv4(address))


def _is_socks4a(packed: bytes) -> bool:
    return packed[:3] == b"\0\0\0" and packed[3] != 0


def pack_ipv4(address: str) -> bytes:
    """A dotted quad as 4 bytes; strict (C{inet_pton}), and fast."""
    try:
        return socket.inet_pton(socket.AF_INET, address)
    except OSError:
        raise ValueError(f"{address!r} is not an IPv4 address") from None


@dataclass(frozen=True)
class Request:
    """
    One SOCKS4 or SOCKS4A request.

    @ivar address: DSTIP as a dotted quad (C{0.0.0.x} for SOCKS4A).
    @ivar hostname: the SOCKS4A host name, or C{None} for plain SOCKS4.
    """

    command: Command
    port: int
    address: str
    userid: bytes = b""
    hostname: bytes | None = None

    def to_bytes(self) -> bytes:
        """The request as a client sends it."""
        packed = HEADER.pack(
            SOCKS_VERSION,
            self.command,
            self.port,
            pack_ipv4(self.address),
        )
        packed += self.userid + b"\0"
        if self.hostname is not None:
            packed += self.hostname + b"\0"
        return packed


@dataclass(frozen=True)
class Reply:
    """The 8-byte answer; C{port} and C{address} matter for BIND."""

    code: ReplyCode
    port: int = 0
    address: str = "0.0.0.0"

    def to_bytes(self) -> bytes:
        return REPLY.pack(
            REPLY_VERSION,
            self.code,
            self.port,
            pack_ipv4(self.address),
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Reply:
        """Parse exactly 8 bytes, as a client would."""
        if len(data) != REPLY.size:
            raise BadReply(f"a reply is {REPLY.size} bytes, got {len(data)}")
        version, code, port, address = REPLY.unpack(data)
        if version != REPLY_VERSION:
            raise BadReply(f"reply version {version}, expected {REPLY_VERSION}")
        try:
            reply_code = ReplyCode(code)
        except ValueError:
            raise BadReply(f"unknown reply code {code}") from None
        return cls(reply_code, port, socket.inet_ntoa(address))


class ReplyParser:
    """
    The client's side: an incremental reader of one 8-byte reply.

    L{feed} returns the L{Reply} once its 8 bytes are in and C{None} before;
    it raises L{BadReply} as soon as the first or second byte rules a SOCKS4
    reply out, so that a client talking to something else (an HTTP proxy's
    C{HTTP/1.1 400}, a SOCKS5 server) fails at once instead of waiting for
    bytes that may never come.  Bytes behind the reply are kept in
    L{trailing}: they belong to the relayed stream (or, after a BIND's first
    reply, to the second).
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._reply: Reply | None = None
        self.trailing = b""

    @property
    def reply(self) -> Reply | None:
        """The reply, once complete."""
        return self._reply

    def feed(self, data: bytes) -> Reply | None:
        if self._reply is not None:
            self.trailing += data
            return self._reply
        self._buffer += data
        buffer = self._buffer
        if buffer and buffer[0] != REPLY_VERSION:
            raise BadReply(f"reply version {buffer[0]}, expected {REPLY_VERSION}")
        if len(buffer) >= 2 and buffer[1] not in _REPLY_CODES:
            raise BadReply(f"unknown reply code {buffer[1]}")
        if len(buffer) < REPLY.size:
            return None
        self._reply = Reply.from_bytes(buffer[: REPLY.size])
        self.trailing = buffer[REPLY.size :]
        self._buffer = b""
        return self._reply


_REPLY_CODES = frozenset(ReplyCode)


def _check_hostname(hostname: bytes) -> None:
    """
    Accept what DNS and /etc/hosts can hold: printable ASCII without
    blanks.  Anything else can't name a host and is refused before any
    resolver sees it.
    """
    if not hostname or not all(0x21 <= byte < 0x7F for byte in hostname):
        raise BadHostname(hostname)


class RequestParser:
    """
    An incremental request parser with hard limits.

    Feed it bytes as they arrive; L{feed} returns the L{Request} once it is
    complete, C{None} while more is needed, and raises L{WireError} as soon
    as the bytes can no longer become a valid request, so that nothing is
    buffered beyond C{max_userid} and C{max_hostname}.  Bytes that arrived
    behind a complete request are kept in L{trailing}: they belong to the
    relayed stream.
    """

    def __init__(
        self,
        max_userid: int = DEFAULT_MAX_USERID,
        max_hostname: int = DEFAULT_MAX_HOSTNAME,
    ) -> None:
        self.max_userid = max_userid
        self.max_hostname = max_hostname
        self._buffer = b""
        self._request: Request | None = None
        self.trailing = b""

    @property
    def request(self) -> Request | None:
        """The request, once complete."""
        return self._request

    def feed(self, data: bytes) -> Request | None:
        if self._request is not None:
            self.trailing += data
            return self._request
        self._buffer += data
        request, consumed = self._parse()
        if request is not None:
            self._request = request
            self.trailing = self._buffer[consumed:]
            self._buffer = b""
        return request

    def _parse(self) -> tuple[Request | None, int]:
        buffer = self._buffer
        if buffer and buffer[0] != SOCKS_VERSION:
            raise VersionError(buffer[0])
        if len(buffer) >= 2 and buffer[1] not in (Command.CONNECT, Command.BIND):
            raise CommandError(buffer[1])
        if len(buffer) < HEADER.size:
            return None, 0
        _, command, port, packed_address = HEADER.unpack_from(buffer)
        address = socket.inet_ntoa(packed_address)
        userid, offset = self._field(buffer, HEADER.size, "USERID", self.max_userid)
        if userid is None:
            return None, 0
        hostname = None
        if _is_socks4a(packed_address):
            hostname, offset = self._field(
                buffer, offset, "host name", self.max_hostname
            )
            if hostname is None:
                return None, 0
            _check_hostname(hostname)
        return Request(Command(command), port, address, userid, hostname), offset

    @staticmethod
    def _field(
        buffer: bytes, start: int, name: str, limit: int
    ) -> tuple[bytes | None, int]:
        """A NUL-ended field at C{start}: (value, offset past the NUL)."""
        end = buffer.find(b"\0", start, start + limit + 1)
        if end == -1:
            if len(buffer) - start > limit:
                raise FieldTooLong(name, limit)
            return None, start
        return buffer[start:end], end + 1
