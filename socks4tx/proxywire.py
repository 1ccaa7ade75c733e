"""
The PROXY protocol header, versions 1 and 2, without I/O.

A load balancer such as HAProxy (C{send-proxy}, C{send-proxy-v2}) sends
this header first on every connection it makes to a backend: it names the
client the connection is relayed for.  L{HeaderParser} is fed bytes as they
arrive and answers C{(header, bytes after it)}, C{(None, b"")} while more is
needed, or raises L{ProxyHeaderError} as soon as the bytes can no longer
begin a valid header, so that it never holds more than L{V1_MAX_SIZE}
(version 1) or 16 + C{max_v2_length} bytes (version 2).  Nothing here
imports Twisted.

It follows https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt.
A header parses to a L{ProxyHeader} with a usable C{source} for TCP over
IPv4 or IPv6 (v1 C{TCP4}/C{TCP6}, v2 C{PROXY} over C{INET}/C{INET6}
C{STREAM}).  The spec's other valid headers parse too, with no addresses:
v2 C{LOCAL} (a balancer's health check), v1 C{UNKNOWN}, v2 C{AF_UNSPEC},
and v2 UDP and UNIX families, which the spec lets a receiver treat as
C{UNSPEC} (section 2.2: "falls back to the UNSPEC mode").  For all of them
the spec's fallback is the real connection's endpoints, which is the
balancer's own address: what to do with them is the caller's choice (the
server closes them).  Version 2 TLVs are skipped, within the length cap.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import struct
from dataclasses import dataclass

#: A version 1 header is one line starting with this.
V1_PREFIX = b"PROXY "
#: The longest version 1 line, CRLF included ("PROXY UNKNOWN" with two
#: full IPv6 addresses and ports).
V1_MAX_SIZE = 107
#: The 12 bytes a version 2 header starts with.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: Signature, version and command, family and protocol, length.
V2_FIXED = struct.Struct("!12sBBH")
#: The longest address block plus TLVs accepted after the fixed 16 bytes.
#: The field allows 65535; HAProxy sends a few hundred bytes at most.
DEFAULT_MAX_V2_LENGTH = 4096

_V1_PROTOCOLS = (b"TCP4 ", b"TCP6 ", b"UNKNOWN")
_NOT_PRINTABLE = re.compile(rb"[^\x20-\x7e]")
_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")
_IPV4_BLOCK = struct.Struct("!4s4sHH")
_IPV6_BLOCK = struct.Struct("!16s16sHH")
_UNIX_ADDRESS_LENGTH = 216


class ProxyHeaderError(Exception):
    """Bytes that are not, and can't become, a valid PROXY header."""


class Command(enum.Enum):
    #: Relayed for a client: the addresses are the client's.
    PROXY = "proxy"
    #: Made by the balancer itself (a health check): no client.
    LOCAL = "local"


class Family(enum.Enum):
    """What the header says the relayed connection is."""

    #: v1 UNKNOWN, v2 AF_UNSPEC or protocol UNSPEC, and every v2 LOCAL.
    UNSPEC = "unspec"
    TCP4 = "tcp4"
    TCP6 = "tcp6"
    UDP4 = "udp4"
    UDP6 = "udp6"
    UNIX_STREAM = "unix-stream"
    UNIX_DGRAM = "unix-dgram"

    @property
    def carries_tcp_address(self) -> bool:
        """Whether headers of this family name a TCP client."""
        return self in (Family.TCP4, Family.TCP6)


#: v2 byte 14 (family << 4 | protocol) of the families with addresses, and
#: the length of their address block.
_V2_FAMILIES = {
    0x11: (Family.TCP4, _IPV4_BLOCK.size),
    0x12: (Family.UDP4, _IPV4_BLOCK.size),
    0x21: (Family.TCP6, _IPV6_BLOCK.size),
    0x22: (Family.UDP6, _IPV6_BLOCK.size),
    0x31: (Family.UNIX_STREAM, _UNIX_ADDRESS_LENGTH),
    0x32: (Family.UNIX_DGRAM, _UNIX_ADDRESS_LENGTH),
}
_V2_FAMILY_BYTES = {family: byte for byte, (family, _) in _V2_FAMILIES.items()}

Address = tuple[str, int]


@dataclass(frozen=True)
class ProxyHeader:
    """
    One parsed header.

    @ivar version: 1 (text) or 2 (binary).
    @ivar source: the client's C{(host, port)}, only for L{Family.TCP4} and
        L{Family.TCP6} with L{Command.PROXY}; C{None} otherwise.
    @ivar destination: the address the client connected to (the balancer's
        frontend), under the same condition.
    """

    version: int
    command: Command
    family: Family
    source: Address | None = None
    destination: Address | None = None

    def to_bytes(self, tlvs: bytes = b"") -> bytes:
        """
        The header as a balancer sends it (C{tlvs}: raw v2 TLV bytes to
        append).  UDP and UNIX families, whose addresses are not kept, get
        an all-zero address block.
        """
        if self.version == 1:
            return self._v1()
        if self.version == 2:
            return self._v2(tlvs)
        raise ValueError(f"no PROXY protocol version {self.version}")

    def _addresses(self) -> tuple[Address, Address]:
        if self.source is None or self.destination is None:
            raise ValueError(f"a {self.family.name} header needs both addresses")
        return self.source, self.destination

    def _v1(self) -> bytes:
        if self.command is not Command.PROXY:
            raise ValueError("version 1 has no LOCAL command")
        if self.family is Family.UNSPEC:
            return b"PROXY UNKNOWN\r\n"
        if not self.family.carries_tcp_address:
            raise ValueError(f"version 1 can't carry {self.family.name}")
        (source, source_port), (destination, destination_port) = self._addresses()
        version = 4 if self.family is Family.TCP4 else 6
        line = (
            f"PROXY {self.family.name} {_canonical(source, version)}"
            f" {_canonical(destination, version)} {source_port} {destination_port}"
        )
        return line.encode("ascii") + b"\r\n"

    def _v2(self, tlvs: bytes) -> bytes:
        if self.command is Command.LOCAL or self.family is Family.UNSPEC:
            block = b""
            family_byte = 0
        elif self.family.carries_tcp_address:
            (source, source_port), (destination, destination_port) = self._addresses()
            layout = _IPV4_BLOCK if self.family is Family.TCP4 else _IPV6_BLOCK
            version = 4 if self.family is Family.TCP4 else 6
            block = layout.pack(
                ipaddress.ip_address(_canonical(source, version)).packed,
                ipaddress.ip_address(_canonical(destination, version)).packed,
                source_port,
                destination_port,
            )
            family_byte = _V2_FAMILY_BYTES[self.family]
        else:
            family_byte = _V2_FAMILY_BYTES[self.family]
            block = bytes(_V2_FAMILIES[family_byte][1])
        command = 0x21 if self.command is Command.PROXY else 0x20
        body = block + tlvs
        return V2_FIXED.pack(V2_SIGNATURE, command, family_byte, len(body)) + body


def _canonical(host: str, version: int) -> str:
    """An address in the form the headers carry; ValueError if it isn't one."""
    address = ipaddress.ip_address(host)
    if address.version != version:
        raise ValueError(f"{host!r} is not an IPv{version} address")
    return str(address)


class HeaderParser:
    """
    An incremental PROXY header parser (both versions) with a hard size cap.

    L{feed} returns C{(header, remaining)} once the header is complete,
    where C{remaining} are the bytes that followed it (the relayed stream's
    first bytes), and C{(None, b"")} before.  Once complete, further bytes
    come back as they are.
    """

    def __init__(self, max_v2_length: int = DEFAULT_MAX_V2_LENGTH) -> None:
        if not 0 <= max_v2_length <= 0xFFFF:
            raise ValueError(f"max_v2_length {max_v2_length} is not 0 to 65535")
        self.max_v2_length = max_v2_length
        self._buffer = b""
        self._header: ProxyHeader | None = None

    @property
    def header(self) -> ProxyHeader | None:
        """The header, once complete."""
        return self._header

    @property
    def max_size(self) -> int:
        """The most bytes a header may take: more is an error."""
        return max(V1_MAX_SIZE, V2_FIXED.size + self.max_v2_length)

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete header."""
        return len(self._buffer)

    def feed(self, data: bytes) -> tuple[ProxyHeader | None, bytes]:
        if self._header is not None:
            return self._header, data
        buffer = self._buffer + data
        if buffer[:1] == V2_SIGNATURE[:1]:
            header, size = _parse_v2(buffer, self.max_v2_length)
        else:
            header, size = _parse_v1(buffer)
        if header is None:
            self._buffer = buffer
            return None, b""
        self._header = header
        self._buffer = b""
        return header, buffer[size:]


def _parse_v1(buffer: bytes) -> tuple[ProxyHeader | None, int]:
    """A v1 header and its size, or (None, 0) while it may still become one."""
    head = buffer[: len(V1_PREFIX)]
    if head != V1_PREFIX[: len(head)]:
        raise ProxyHeaderError("not a PROXY protocol header")
    end = buffer.find(b"\r\n", 0, V1_MAX_SIZE)
    if end == -1:
        _check_v1_start(buffer)
        return None, 0
    line = buffer[:end]
    if _NOT_PRINTABLE.search(line):
        raise ProxyHeaderError("a version 1 header is printable ASCII")
    return _v1_header(line), end + 2


def _check_v1_start(buffer: bytes) -> None:
    """Refuse, before the CRLF, what can't be a v1 header's beginning."""
    if len(buffer) >= V1_MAX_SIZE:
        raise ProxyHeaderError(f"no CRLF within {V1_MAX_SIZE} bytes")
    # The CR of the CRLF may be the last byte so far.
    body = buffer[:-1] if buffer.endswith(b"\r") else buffer
    if _NOT_PRINTABLE.search(body):
        raise ProxyHeaderError("a version 1 header is printable ASCII")
    protocol = buffer[len(V1_PREFIX) :]
    if not any(
        protocol[: len(known)] == known[: len(protocol)] for known in _V1_PROTOCOLS
    ):
        raise ProxyHeaderError("version 1 protocol is not TCP4, TCP6 or UNKNOWN")


def _v1_header(line: bytes) -> ProxyHeader:
    fields = line.split(b" ")
    if fields[1] == b"UNKNOWN":
        # "the receiver must ignore anything presented before the CRLF"
        return ProxyHeader(1, Command.PROXY, Family.UNSPEC)
    if fields[1] not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError("version 1 protocol is not TCP4, TCP6 or UNKNOWN")
    if len(fields) != 6:
        raise ProxyHeaderError(
            "a version 1 TCP header is PROXY, protocol, two addresses and two"
            " ports, separated by single spaces"
        )
    family = Family.TCP4 if fields[1] == b"TCP4" else Family.TCP6
    source = _v1_address(fields[2], family)
    destination = _v1_address(fields[3], family)
    return ProxyHeader(
        1,
        Command.PROXY,
        family,
        (source, _v1_port(fields[4])),
        (destination, _v1_port(fields[5])),
    )


def _v1_address(field: bytes, family: Family) -> str:
    text = field.decode("ascii")
    try:
        if family is Family.TCP4:
            # Strict: no heading zeroes, exactly four numbers.
            return str(ipaddress.IPv4Address(text))
        if "%" in text:
            raise ValueError("a scope id is not an address")
        return str(ipaddress.IPv6Address(text))
    except ValueError:
        raise ProxyHeaderError(f"{text!r} is not a {family.name} address") from None


def _v1_port(field: bytes) -> int:
    if _PORT.fullmatch(field) is None or int(field) > 0xFFFF:
        raise ProxyHeaderError(f"{field.decode()!r} is not a port number")
    return int(field)


def _parse_v2(buffer: bytes, max_length: int) -> tuple[ProxyHeader | None, int]:
    """A v2 header and its size, or (None, 0) while it may still become one."""
    head = buffer[: len(V2_SIGNATURE)]
    if head != V2_SIGNATURE[: len(head)]:
        raise ProxyHeaderError("not a PROXY protocol header")
    if len(buffer) > 12 and buffer[12] >> 4 != 2:
        raise ProxyHeaderError(f"PROXY protocol version {buffer[12] >> 4}, not 2")
    if len(buffer) > 12 and buffer[12] & 0x0F > 1:
        raise ProxyHeaderError(f"unknown version 2 command {buffer[12] & 0x0F}")
    local = len(buffer) > 12 and buffer[12] & 0x0F == 0
    if len(buffer) > 13 and not local and (buffer[13] >> 4 > 3 or buffer[13] & 15 > 2):
        raise ProxyHeaderError(f"unknown version 2 family byte {buffer[13]:#04x}")
    if len(buffer) < V2_FIXED.size:
        return None, 0
    _, _, family_byte, length = V2_FIXED.unpack_from(buffer)
    if length > max_length:
        raise ProxyHeaderError(f"version 2 length {length} is over {max_length}")
    size = V2_FIXED.size + length
    if len(buffer) < size:
        return None, 0
    if local:
        # "discard the protocol block including the family which is ignored"
        return ProxyHeader(2, Command.LOCAL, Family.UNSPEC), size
    if family_byte not in _V2_FAMILIES:
        # Family or protocol UNSPEC: no address, whatever follows.
        return ProxyHeader(2, Command.PROXY, Family.UNSPEC), size
    family, needed = _V2_FAMILIES[family_byte]
    if length < needed:
        raise ProxyHeaderError(
            f"version 2 {family.name} needs {needed} address bytes, has {length}"
        )
    if not family.carries_tcp_address:
        return ProxyHeader(2, Command.PROXY, family), size
    layout = _IPV4_BLOCK if family is Family.TCP4 else _IPV6_BLOCK
    source, destination, source_port, destination_port = layout.unpack_from(
        buffer, V2_FIXED.size
    )
    return (
        ProxyHeader(
            2,
            Command.PROXY,
            family,
            (str(ipaddress.ip_address(source)), source_port),
            (str(ipaddress.ip_address(destination)), destination_port),
        ),
        size,
    )
