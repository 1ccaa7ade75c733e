"""
Tests for L{socks4tx.proxywire}: the sans-IO PROXY protocol header parser.

Fixed vectors include headers captured from HAProxy 2.6 (C{send-proxy},
C{send-proxy-v2}, and its health checks with C{check-send-proxy}).
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from socks4tx.proxywire import (
    DEFAULT_MAX_V2_LENGTH,
    V1_MAX_SIZE,
    V2_SIGNATURE,
    Command,
    Family,
    HeaderParser,
    ProxyHeader,
    ProxyHeaderError,
)

# --- helpers ---------------------------------------------------------------


def chunks(data: bytes, cuts: set[int] | list[int]) -> list[bytes]:
    """Split C{data} at the given offsets into non-empty pieces."""
    points = sorted({c for c in cuts if 0 < c < len(data)})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def outcome(pieces: list[bytes]) -> tuple[object, ...]:
    """
    Feed C{pieces} to a fresh parser and summarise: the header and every
    byte that came back after it, "error" or "incomplete".  (An error's
    message may differ with the split: a bad start is refused before the
    line is complete.)
    """
    parser = HeaderParser()
    header = None
    after = b""
    try:
        for piece in pieces:
            header, remaining = parser.feed(piece)
            after += remaining
    except ProxyHeaderError:
        return ("error",)
    if header is None:
        return ("incomplete",)
    return ("header", header, after)


def parse(data: bytes) -> tuple[ProxyHeader | None, bytes]:
    return HeaderParser().feed(data)


def v2(
    command: int = 0x21,
    family: int = 0x11,
    body: bytes = b"\x7f\x00\x00\x02\x7f\x00\x00\x01\x1f\x90\x04\x38",
    length: int | None = None,
) -> bytes:
    size = len(body) if length is None else length
    return V2_SIGNATURE + struct.pack("!BBH", command, family, size) + body


# --- vectors ---------------------------------------------------------------

#: What HAProxy 2.6 sent to a backend (captured), and what it means.
HAPROXY_VECTORS = [
    # send-proxy-v2, a client on 127.0.0.2 through a frontend on 127.0.0.1
    (
        b"\r\n\r\n\x00\r\nQUIT\n!\x11\x00\x0c\x7f\x00\x00\x02\x7f\x00\x00\x01"
        b"\xb0\xc1\xb7Q",
        ProxyHeader(
            2,
            Command.PROXY,
            Family.TCP4,
            ("127.0.0.2", 45249),
            ("127.0.0.1", 46929),
        ),
    ),
    # send-proxy-v2 over IPv6
    (
        b"\r\n\r\n\x00\r\nQUIT\n!!\x00$" + bytes(15) + b"\x01" + bytes(15) + b"\x01"
        b"\x9b\xb2\xc1\xb9",
        ProxyHeader(2, Command.PROXY, Family.TCP6, ("::1", 39858), ("::1", 49593)),
    ),
    # send-proxy-v2 health check (check-send-proxy): LOCAL
    (
        b"\r\n\r\n\x00\r\nQUIT\n \x00\x00\x00",
        ProxyHeader(2, Command.LOCAL, Family.UNSPEC),
    ),
    # send-proxy
    (
        b"PROXY TCP4 127.0.0.2 127.0.0.1 49553 56975\r\n",
        ProxyHeader(
            1, Command.PROXY, Family.TCP4, ("127.0.0.2", 49553), ("127.0.0.1", 56975)
        ),
    ),
    (
        b"PROXY TCP6 ::1 ::1 52022 53045\r\n",
        ProxyHeader(1, Command.PROXY, Family.TCP6, ("::1", 52022), ("::1", 53045)),
    ),
]

#: Valid headers from the spec's text and its edge cases.
SPEC_VECTORS = [
    (
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
        ProxyHeader(
            1,
            Command.PROXY,
            Family.TCP4,
            ("192.168.0.1", 56324),
            ("192.168.0.11", 443),
        ),
    ),
    (b"PROXY UNKNOWN\r\n", ProxyHeader(1, Command.PROXY, Family.UNSPEC)),
    # "the receiver must ignore anything presented before the CRLF"
    (
        b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n",
        ProxyHeader(1, Command.PROXY, Family.UNSPEC),
    ),
    (
        b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
        b" FFFF:FFFF:FFFF:FFFF:FFFF:FFFF:FFFF:FFFF 65535 0\r\n",
        ProxyHeader(
            1,
            Command.PROXY,
            Family.TCP6,
            ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
            ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 0),
        ),
    ),
    (
        b"PROXY TCP6 2001:db8::1 ::ffff:192.0.2.1 1 2\r\n",
        ProxyHeader(
            1,
            Command.PROXY,
            Family.TCP6,
            ("2001:db8::1", 1),
            (str(ipaddress.IPv6Address("::ffff:192.0.2.1")), 2),
        ),
    ),
    # v2 with a TLV (PP2_TYPE_NOOP) after the addresses: skipped
    (
        v2(body=b"\xc0\x00\x02\x01\xc0\x00\x02\x02\x00\x50\x01\xbb\x04\x00\x02zz"),
        ProxyHeader(
            2, Command.PROXY, Family.TCP4, ("192.0.2.1", 80), ("192.0.2.2", 443)
        ),
    ),
    # LOCAL: "must not assume zero is presented", the family is ignored
    (v2(0x20, 0x11), ProxyHeader(2, Command.LOCAL, Family.UNSPEC)),
    (v2(0x20, 0xFF, b"xyz"), ProxyHeader(2, Command.LOCAL, Family.UNSPEC)),
    # PROXY with AF_UNSPEC or protocol UNSPEC: no address
    (v2(0x21, 0x00, b""), ProxyHeader(2, Command.PROXY, Family.UNSPEC)),
    (v2(0x21, 0x10), ProxyHeader(2, Command.PROXY, Family.UNSPEC)),
    (v2(0x21, 0x01), ProxyHeader(2, Command.PROXY, Family.UNSPEC)),
    # UDP and UNIX: valid, no TCP client (the spec's fallback to UNSPEC)
    (v2(0x21, 0x12), ProxyHeader(2, Command.PROXY, Family.UDP4)),
    (v2(0x21, 0x22, bytes(36)), ProxyHeader(2, Command.PROXY, Family.UDP6)),
    (
        v2(0x21, 0x31, b"/run/a.sock".ljust(108, b"\0") + bytes(108)),
        ProxyHeader(2, Command.PROXY, Family.UNIX_STREAM),
    ),
    (v2(0x21, 0x32, bytes(216)), ProxyHeader(2, Command.PROXY, Family.UNIX_DGRAM)),
]

INVALID = [
    (b"GET / HTTP/1.1\r\n", "not a PROXY protocol header"),
    (b"\x04\x01\x00\x50", "not a PROXY protocol header"),
    (b"PROXY\r\n", "not a PROXY protocol header"),
    (b"proxy TCP4 1.2.3.4 1.2.3.4 1 2\r\n", "not a PROXY protocol header"),
    (b"PROXY TCP5", "not TCP4, TCP6 or UNKNOWN"),
    (b"PROXY UDP4 1.2.3.4 1.2.3.4 1 2\r\n", "not TCP4, TCP6 or UNKNOWN"),
    (b"PROXY  TCP4 1.2.3.4 1.2.3.4 1 2\r\n", "not TCP4, TCP6 or UNKNOWN"),
    (b"PROXY UNKNOWNX\r\n", "not TCP4, TCP6 or UNKNOWN"),
    (b"PROXY TCP4\r\n", "separated by single spaces"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 1\r\n", "separated by single spaces"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 \r\n", "separated by single spaces"),
    (b"PROXY TCP4 1.2.3.4  1.2.3.4 1 2\r\n", "separated by single spaces"),
    (b"PROXY TCP4 01.2.3.4 1.2.3.4 1 2\r\n", "is not a TCP4 address"),
    (b"PROXY TCP4 1.2.3 1.2.3.4 1 2\r\n", "is not a TCP4 address"),
    (b"PROXY TCP4 ::1 1.2.3.4 1 2\r\n", "is not a TCP4 address"),
    (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "is not a TCP6 address"),
    (b"PROXY TCP6 fe80::1%lo ::1 1 2\r\n", "is not a TCP6 address"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 01 2\r\n", "is not a port number"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 65536\r\n", "is not a port number"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 -2\r\n", "is not a port number"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 +2\r\n", "is not a port number"),
    # a lone LF or CR does not end the line
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n", "printable ASCII"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\r\r\n", "printable ASCII"),
    (b"PROXY UNKNOWN \xff\r\n", "printable ASCII"),
    (b"PROXY UNKNOWN" + b" " * 100, f"no CRLF within {V1_MAX_SIZE} bytes"),
    (V2_SIGNATURE[:11] + b"x", "not a PROXY protocol header"),
    (V2_SIGNATURE + b"\x11", "version 1, not 2"),
    (V2_SIGNATURE + b"\x31", "version 3, not 2"),
    (V2_SIGNATURE + b"\x22", "unknown version 2 command 2"),
    (V2_SIGNATURE + b"\x2f", "unknown version 2 command 15"),
    (V2_SIGNATURE + b"\x21\x41", "unknown version 2 family byte 0x41"),
    (V2_SIGNATURE + b"\x21\x13", "unknown version 2 family byte 0x13"),
    (v2(length=DEFAULT_MAX_V2_LENGTH + 1, body=b""), "is over 4096"),
    (v2(0x21, 0x11, bytes(11)), "TCP4 needs 12 address bytes, has 11"),
    (v2(0x21, 0x21, bytes(12)), "TCP6 needs 36 address bytes, has 12"),
    (v2(0x21, 0x12, bytes(4)), "UDP4 needs 12 address bytes, has 4"),
    (v2(0x21, 0x31, bytes(108)), "UNIX_STREAM needs 216 address bytes"),
]


@pytest.mark.parametrize(("data", "expected"), HAPROXY_VECTORS + SPEC_VECTORS)
def test_vectors(data: bytes, expected: ProxyHeader) -> None:
    assert parse(data) == (expected, b"")
    assert parse(data + b"\x04\x01payload") == (expected, b"\x04\x01payload")


@pytest.mark.parametrize(("data", "expected"), HAPROXY_VECTORS + SPEC_VECTORS)
def test_vectors_byte_by_byte(data: bytes, expected: ProxyHeader) -> None:
    parser = HeaderParser()
    for byte in data[:-1]:
        assert parser.feed(bytes([byte])) == (None, b"")
    assert parser.feed(data[-1:] + b"rest") == (expected, b"rest")
    assert parser.header == expected
    # Once complete, bytes pass through.
    assert parser.feed(b"more") == (expected, b"more")


@pytest.mark.parametrize(("data", "message"), INVALID)
def test_invalid(data: bytes, message: str) -> None:
    with pytest.raises(ProxyHeaderError, match=message.replace("+", r"\+")):
        parse(data)


def test_twisted_short_first_read_is_fine() -> None:
    """
    Twisted's parser drops a connection whose first read has fewer than 16
    (v2) or 8 (v1) bytes; this one waits.
    """
    for data, _ in HAPROXY_VECTORS:
        parser = HeaderParser()
        assert parser.feed(data[:3]) == (None, b"")
        assert parser.feed(data[3:])[0] is not None


def test_refused_early() -> None:
    """
    Bytes that can't start a header are refused at once, without waiting
    for a CRLF or a length: a non-PROXY peer is noticed at its first byte.
    """
    for first in (b"G", b"\x04", b"\x05", b"\0", b"p", b"\n"):
        with pytest.raises(ProxyHeaderError):
            parse(first)
    with pytest.raises(ProxyHeaderError):
        parse(b"PROXY X")
    with pytest.raises(ProxyHeaderError):
        parse(b"PROXY TCP4 1.2.3.4\n")


def test_v1_exactly_at_the_limit() -> None:
    """The worst case line of the spec, 107 bytes with its CRLF, is read."""
    line = b"PROXY UNKNOWN " + b"f" * (V1_MAX_SIZE - 16) + b"\r\n"
    assert len(line) == V1_MAX_SIZE
    assert parse(line)[0] == ProxyHeader(1, Command.PROXY, Family.UNSPEC)
    longer = b"PROXY UNKNOWN " + b"f" * (V1_MAX_SIZE - 15) + b"\r\n"
    with pytest.raises(ProxyHeaderError, match="no CRLF within 107"):
        parse(longer)
    # The limit holds while the line is still arriving.
    parser = HeaderParser()
    assert parser.feed(longer[:106]) == (None, b"")
    with pytest.raises(ProxyHeaderError):
        parser.feed(longer[106:107])


def test_v2_length_cap() -> None:
    """
    The declared length is refused as soon as it is read (nothing more is
    buffered); the cap can be set, up to the field's 65535.
    """
    parser = HeaderParser()
    with pytest.raises(ProxyHeaderError, match="4097 is over 4096"):
        parser.feed(v2(length=4097, body=b""))
    at_cap = v2(body=bytes(12) + b"\x04\x00\x00" + bytes(4096 - 15))
    assert parse(at_cap)[0] is not None
    small = HeaderParser(max_v2_length=12)
    assert small.max_size == V1_MAX_SIZE
    with pytest.raises(ProxyHeaderError, match="13 is over 12"):
        small.feed(v2(body=bytes(13)))
    assert HeaderParser(0xFFFF).max_size == 16 + 0xFFFF
    with pytest.raises(ValueError):
        HeaderParser(0x10000)


def test_to_bytes_refuses_what_the_version_cant_say() -> None:
    with pytest.raises(ValueError):
        ProxyHeader(1, Command.LOCAL, Family.UNSPEC).to_bytes()
    with pytest.raises(ValueError):
        ProxyHeader(1, Command.PROXY, Family.UDP4).to_bytes()
    with pytest.raises(ValueError):
        ProxyHeader(2, Command.PROXY, Family.TCP4).to_bytes()
    with pytest.raises(ValueError):
        ProxyHeader(1, Command.PROXY, Family.TCP4, ("::1", 1), ("::1", 2)).to_bytes()
    with pytest.raises(ValueError):
        ProxyHeader(3, Command.PROXY, Family.UNSPEC).to_bytes()


# --- properties ------------------------------------------------------------

ports = st.integers(0, 0xFFFF)
ipv4 = st.builds(lambda n: str(ipaddress.IPv4Address(n)), st.integers(0, 2**32 - 1))
ipv6 = st.builds(lambda n: str(ipaddress.IPv6Address(n)), st.integers(0, 2**128 - 1))


@st.composite
def headers(draw: st.DrawFn) -> ProxyHeader:
    """Any header that L{ProxyHeader.to_bytes} can write."""
    version = draw(st.sampled_from([1, 2]))
    if version == 2 and draw(st.booleans()):
        return ProxyHeader(2, Command.LOCAL, Family.UNSPEC)
    families = [Family.UNSPEC, Family.TCP4, Family.TCP6]
    if version == 2:
        families += [Family.UDP4, Family.UDP6, Family.UNIX_STREAM, Family.UNIX_DGRAM]
    family = draw(st.sampled_from(families))
    if not family.carries_tcp_address:
        return ProxyHeader(version, Command.PROXY, family)
    hosts = ipv4 if family is Family.TCP4 else ipv6
    return ProxyHeader(
        version,
        Command.PROXY,
        family,
        (draw(hosts), draw(ports)),
        (draw(hosts), draw(ports)),
    )


def tlvs() -> st.SearchStrategy[bytes]:
    """Well-formed TLV vectors (type, 2-byte length, value)."""
    one = st.builds(
        lambda kind, value: struct.pack("!BH", kind, len(value)) + value,
        st.integers(0, 255),
        st.binary(max_size=64),
    )
    return st.lists(one, max_size=4).map(b"".join)


def draw_pieces(data: st.DataObject, payload: bytes) -> list[bytes]:
    cuts = data.draw(
        st.sets(st.integers(0, len(payload)), max_size=min(len(payload), 20)),
        label="cuts",
    )
    return chunks(payload, cuts)


@given(headers(), tlvs(), st.binary(max_size=32))
def test_round_trip(header: ProxyHeader, extensions: bytes, trailing: bytes) -> None:
    """What L{ProxyHeader.to_bytes} writes parses back to the same header."""
    data = header.to_bytes(extensions if header.version == 2 else b"")
    assert parse(data + trailing) == (header, trailing)


@given(st.data(), headers(), st.binary(max_size=32))
def test_any_split_parses_the_same(
    data: st.DataObject, header: ProxyHeader, trailing: bytes
) -> None:
    whole = header.to_bytes() + trailing
    assert outcome(draw_pieces(data, whole)) == ("header", header, trailing)


@given(st.data(), headers())
def test_every_prefix_is_incomplete(data: st.DataObject, header: ProxyHeader) -> None:
    whole = header.to_bytes()
    cut = data.draw(st.integers(0, len(whole) - 1))
    assert outcome([whole[:cut]]) == ("incomplete",)


def feed_within_cap(pieces: list[bytes]) -> None:
    """Feed C{pieces}, checking that the parser never holds the cap."""
    parser = HeaderParser()
    for piece in pieces:
        parser.feed(piece)
        assert parser.buffered < parser.max_size


@given(st.data(), st.binary(max_size=300))
def test_arbitrary_bytes(data: st.DataObject, garbage: bytes) -> None:
    """
    Any bytes, split anyhow: a header, "incomplete" or ProxyHeaderError,
    never another exception; never as much as the cap held.
    """
    with contextlib.suppress(ProxyHeaderError):
        feed_within_cap(draw_pieces(data, garbage))


@given(st.data(), st.binary(max_size=300))
def test_arbitrary_bytes_after_a_signature(data: st.DataObject, rest: bytes) -> None:
    """The same, for bytes that get past the first checks."""
    for start in (V2_SIGNATURE + b"\x21", b"PROXY TCP4 ", b"PROXY UNKNOWN"):
        with contextlib.suppress(ProxyHeaderError):
            feed_within_cap(draw_pieces(data, start + rest))


@pytest.mark.parametrize(
    "data",
    [
        v2(length=0xFFFF, body=b""),
        b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n",
        b"PROXY TCP6 ::1 ::1 1 1" + b"1" * 200,
    ],
)
def test_feeding_never_holds_the_cap(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        feed_within_cap([data[i : i + 1] for i in range(len(data))])


@given(st.data(), headers(), st.binary(min_size=1, max_size=8))
def test_mutated_headers(
    data: st.DataObject, header: ProxyHeader, replacement: bytes
) -> None:
    """
    A valid header with some bytes replaced parses or fails cleanly, the
    same whatever the split.
    """
    whole = bytearray(header.to_bytes())
    at = data.draw(st.integers(0, len(whole) - 1))
    whole[at : at + len(replacement)] = replacement
    mutated = bytes(whole)
    result = outcome([mutated])
    assert result[0] in ("header", "incomplete", "error")
    assert outcome(draw_pieces(data, mutated)) == result
