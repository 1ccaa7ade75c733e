"""
Tests for L{socks4tx.wire}: the sans-IO SOCKS4/SOCKS4A codec.
"""

from __future__ import annotations

import ipaddress
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from socks4tx.wire import (
    DEFAULT_MAX_HOSTNAME,
    DEFAULT_MAX_USERID,
    HEADER,
    BadHostname,
    BadReply,
    Command,
    CommandError,
    FieldTooLong,
    Reply,
    ReplyCode,
    ReplyParser,
    Request,
    RequestParser,
    VersionError,
    WireError,
    is_socks4a,
)

# --- helpers ---------------------------------------------------------------


def header(
    command: int = Command.CONNECT,
    port: int = 80,
    address: str = "192.0.2.7",
    version: int = 4,
) -> bytes:
    """The fixed 8-byte part of a request."""
    return HEADER.pack(version, command, port, ipaddress.IPv4Address(address).packed)


def chunks(data: bytes, cuts: set[int] | list[int]) -> list[bytes]:
    """Split C{data} at the given offsets into non-empty pieces."""
    points = sorted({c for c in cuts if 0 < c < len(data)})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def draw_chunks(data: st.DataObject, payload: bytes) -> list[bytes]:
    cuts = data.draw(
        st.sets(st.integers(0, len(payload)), max_size=max(len(payload), 1)),
        label="cuts",
    )
    return chunks(payload, cuts)


def feed_all(parser: RequestParser, pieces: list[bytes]) -> list[Request | None]:
    return [parser.feed(piece) for piece in pieces]


def outcome(parser: RequestParser, pieces: list[bytes]) -> tuple[object, ...]:
    """
    Feed C{pieces} and summarise what happened, so that different splits of
    the same bytes can be compared: the request and trailing bytes, the
    error (type and message), or "incomplete".
    """
    try:
        for piece in pieces:
            parser.feed(piece)
    except WireError as error:
        return ("error", type(error), str(error), error.reply)
    if parser.request is None:
        return ("incomplete",)
    return ("request", parser.request, parser.trailing)


# --- examples --------------------------------------------------------------

# From the SOCKS4 description: CONNECT 66.102.7.99:80 as "Fred".
FRED = Request(Command.CONNECT, 80, "66.102.7.99", b"Fred")
FRED_BYTES = b"\x04\x01\x00\x50\x42\x66\x07\x63Fred\x00"

EXAMPLES = [
    pytest.param(FRED, id="connect"),
    pytest.param(Request(Command.BIND, 21, "198.51.100.3", b"alice"), id="bind"),
    pytest.param(Request(Command.CONNECT, 443, "203.0.113.9", b""), id="empty-userid"),
    pytest.param(
        Request(Command.CONNECT, 80, "0.0.0.1", b"bob", b"example.com"),
        id="4a-connect",
    ),
    pytest.param(
        Request(Command.BIND, 20, "0.0.0.255", b"", b"ftp.example.org"),
        id="4a-bind-empty-userid",
    ),
    pytest.param(
        Request(Command.CONNECT, 0, "255.255.255.255", b"\xff" * DEFAULT_MAX_USERID),
        id="max-userid",
    ),
    pytest.param(
        Request(Command.CONNECT, 65535, "0.0.0.42", b"u", b"h" * DEFAULT_MAX_HOSTNAME),
        id="4a-max-hostname",
    ),
]


# --- strategies ------------------------------------------------------------

commands = st.sampled_from(Command)
ports = st.integers(0, 0xFFFF)
plain_addresses = st.ip_addresses(v=4).map(str).filter(lambda a: not is_socks4a(a))
socks4a_addresses = st.integers(1, 255).map(lambda x: f"0.0.0.{x}")
any_addresses = st.one_of(st.ip_addresses(v=4).map(str), socks4a_addresses)


def userids(max_size: int = DEFAULT_MAX_USERID) -> st.SearchStrategy[bytes]:
    return st.lists(st.integers(1, 255), max_size=max_size).map(bytes)


def hostnames(max_size: int = DEFAULT_MAX_HOSTNAME) -> st.SearchStrategy[bytes]:
    return st.lists(st.integers(0x21, 0x7E), min_size=1, max_size=max_size).map(bytes)


@st.composite
def requests(draw: st.DrawFn) -> Request:
    address = draw(any_addresses)
    hostname = draw(hostnames()) if is_socks4a(address) else None
    return Request(draw(commands), draw(ports), address, draw(userids()), hostname)


# Byte strings that get past the first checks often enough to exercise the
# deeper parts of the parser, plus entirely arbitrary bytes.
prefixes = st.sampled_from(
    [
        b"",
        b"\x04",
        b"\x04\x01",
        b"\x04\x02",
        header(),
        header(address="0.0.0.1"),
        header(Command.BIND, address="0.0.0.200") + b"user\x00",
    ]
)
junk = st.one_of(
    st.binary(),
    st.builds(lambda p, tail: p + tail, prefixes, st.binary()),
    st.builds(lambda r, tail: r.to_bytes() + tail, requests(), st.binary()),
)


# --- whole requests --------------------------------------------------------


def test_to_bytes_matches_spec_example() -> None:
    assert FRED.to_bytes() == FRED_BYTES


def test_to_bytes_socks4a() -> None:
    request = Request(Command.BIND, 21, "0.0.0.1", b"", b"a.b")
    assert request.to_bytes() == b"\x04\x02\x00\x15\x00\x00\x00\x01\x00a.b\x00"


@pytest.mark.parametrize("request_", EXAMPLES)
def test_whole_request_at_once(request_: Request) -> None:
    parser = RequestParser()
    assert parser.request is None
    assert parser.feed(request_.to_bytes()) == request_
    assert parser.request == request_
    assert parser.trailing == b""


@pytest.mark.parametrize("request_", EXAMPLES)
def test_whole_request_byte_by_byte(request_: Request) -> None:
    data = request_.to_bytes()
    parser = RequestParser()
    results = feed_all(parser, [data[i : i + 1] for i in range(len(data))])
    assert results[:-1] == [None] * (len(data) - 1)
    assert results[-1] == request_
    assert parser.request == request_
    assert parser.trailing == b""


@pytest.mark.parametrize("request_", EXAMPLES)
@given(data=st.data())
def test_whole_request_any_split(request_: Request, data: st.DataObject) -> None:
    payload = request_.to_bytes()
    pieces = draw_chunks(data, payload)
    parser = RequestParser()
    results = feed_all(parser, pieces)
    assert results[:-1] == [None] * (len(pieces) - 1)
    assert results[-1] == request_
    assert parser.trailing == b""


def test_parsed_fields() -> None:
    request = RequestParser().feed(
        b"\x04\x02\x12\x34\x00\x00\x00\x07me\x00host.example\x00"
    )
    assert request is not None
    assert request.command is Command.BIND
    assert request.command.label == "bind"
    assert request.port == 0x1234
    assert request.address == "0.0.0.7"
    assert request.userid == b"me"
    assert request.hostname == b"host.example"


def test_plain_socks4_has_no_hostname() -> None:
    # After the USERID NUL of a plain request, the next bytes are payload,
    # even if they look like a host name.
    parser = RequestParser()
    request = parser.feed(header(address="10.0.0.1") + b"u\x00example.com\x00")
    assert request == Request(Command.CONNECT, 80, "10.0.0.1", b"u")
    assert parser.trailing == b"example.com\x00"


def test_incomplete_returns_none() -> None:
    parser = RequestParser()
    assert parser.feed(b"") is None
    assert parser.feed(b"\x04") is None
    assert parser.feed(b"\x01\x00\x50") is None
    assert parser.feed(b"\x01\x02\x03\x04") is None
    assert parser.feed(b"user") is None
    assert parser.request is None
    assert parser.feed(b"\x00") == Request(Command.CONNECT, 80, "1.2.3.4", b"user")


def test_socks4a_waits_for_hostname() -> None:
    parser = RequestParser()
    assert parser.feed(header(address="0.0.0.9") + b"u\x00") is None
    assert parser.feed(b"example.net") is None
    assert parser.feed(b"\x00") == Request(
        Command.CONNECT, 80, "0.0.0.9", b"u", b"example.net"
    )


# --- trailing bytes --------------------------------------------------------


def test_trailing_after_request() -> None:
    parser = RequestParser()
    assert parser.feed(FRED_BYTES + b"GET / HTTP/1.0\r\n") == FRED
    assert parser.trailing == b"GET / HTTP/1.0\r\n"


def test_trailing_after_socks4a_request() -> None:
    parser = RequestParser()
    request = Request(Command.CONNECT, 80, "0.0.0.1", b"", b"example.com")
    assert parser.feed(request.to_bytes() + b"\x00\x00payload") == request
    assert parser.trailing == b"\x00\x00payload"


def test_feeds_after_completion_append_to_trailing() -> None:
    parser = RequestParser()
    assert parser.feed(FRED_BYTES + b"ab") == FRED
    assert parser.feed(b"cd") == FRED
    assert parser.feed(b"") == FRED
    assert parser.feed(b"\x05\xff\x00") == FRED  # no validation any more
    assert parser.trailing == b"abcd\x05\xff\x00"
    assert parser.request == FRED


@given(request_=requests(), trailing=st.binary(), data=st.data())
def test_trailing_never_lost(
    request_: Request, trailing: bytes, data: st.DataObject
) -> None:
    payload = request_.to_bytes() + trailing
    pieces = draw_chunks(data, payload)
    parser = RequestParser()
    results = feed_all(parser, pieces)
    # Every feed up to the one that completes the request says "need more",
    # every feed from then on returns the request.
    done = [result is not None for result in results]
    assert done == sorted(done)
    assert results[-1] == request_
    assert parser.trailing == trailing
    assert parser.request == request_


# --- round trips -----------------------------------------------------------


@given(request_=requests())
def test_request_round_trip(request_: Request) -> None:
    parser = RequestParser()
    assert parser.feed(request_.to_bytes()) == request_
    assert parser.trailing == b""


@given(
    command=commands,
    port=ports,
    address=plain_addresses,
    userid=userids(),
)
def test_request_round_trip_socks4(
    command: Command, port: int, address: str, userid: bytes
) -> None:
    request = Request(command, port, address, userid)
    assert RequestParser().feed(request.to_bytes()) == request


@given(
    command=commands,
    port=ports,
    address=socks4a_addresses,
    userid=userids(),
    hostname=hostnames(),
)
def test_request_round_trip_socks4a(
    command: Command, port: int, address: str, userid: bytes, hostname: bytes
) -> None:
    request = Request(command, port, address, userid, hostname)
    assert RequestParser().feed(request.to_bytes()) == request


@given(
    max_userid=st.integers(0, 40),
    max_hostname=st.integers(1, 40),
    data=st.data(),
)
def test_request_round_trip_custom_limits(
    max_userid: int, max_hostname: int, data: st.DataObject
) -> None:
    address = data.draw(any_addresses)
    hostname = data.draw(hostnames(max_hostname)) if is_socks4a(address) else None
    request = Request(
        data.draw(commands),
        data.draw(ports),
        address,
        data.draw(userids(max_userid)),
        hostname,
    )
    parser = RequestParser(max_userid=max_userid, max_hostname=max_hostname)
    assert feed_all(parser, draw_chunks(data, request.to_bytes()))[-1] == request


@given(
    code=st.sampled_from(ReplyCode),
    port=ports,
    address=st.ip_addresses(v=4).map(str),
)
def test_reply_round_trip(code: ReplyCode, port: int, address: str) -> None:
    reply = Reply(code, port, address)
    packed = reply.to_bytes()
    assert len(packed) == 8
    assert packed[0] == 0
    assert packed[1] == code
    assert Reply.from_bytes(packed) == reply


@given(packed=st.binary(min_size=8, max_size=8))
def test_reply_bytes_round_trip(packed: bytes) -> None:
    try:
        reply = Reply.from_bytes(packed)
    except BadReply:
        assert packed[0] != 0 or packed[1] not in set(ReplyCode)
    else:
        assert reply.to_bytes() == packed


def test_reply_to_bytes_example() -> None:
    assert Reply(ReplyCode.GRANTED, 0x1234, "10.1.2.3").to_bytes() == (
        b"\x00\x5a\x12\x34\x0a\x01\x02\x03"
    )
    assert Reply(ReplyCode.REJECTED).to_bytes() == b"\x00\x5b" + b"\x00" * 6


# --- limits ----------------------------------------------------------------


@pytest.mark.parametrize("limit", [0, 1, 7, DEFAULT_MAX_USERID, 1000])
def test_userid_over_limit(limit: int) -> None:
    kwargs = {"max_userid": limit} if limit != DEFAULT_MAX_USERID else {}
    parser = RequestParser(**kwargs)
    assert parser.feed(header() + b"u" * limit) is None
    with pytest.raises(FieldTooLong) as info:
        parser.feed(b"u")
    assert info.value.field == "USERID"
    assert info.value.limit == limit
    assert info.value.reply is ReplyCode.REJECTED


def test_userid_over_limit_in_one_feed() -> None:
    # Even with the NUL right behind, one byte too many is too many.
    with pytest.raises(FieldTooLong):
        RequestParser().feed(header() + b"u" * (DEFAULT_MAX_USERID + 1) + b"\x00")


def test_userid_over_limit_byte_by_byte() -> None:
    limit = 5
    parser = RequestParser(max_userid=limit)
    data = header() + b"x" * (limit + 1)
    for i in range(len(data) - 1):
        assert parser.feed(data[i : i + 1]) is None
    with pytest.raises(FieldTooLong):
        parser.feed(data[-1:])


@given(limit=st.integers(0, 300), data=st.data())
def test_userid_at_limit_accepted(limit: int, data: st.DataObject) -> None:
    userid = data.draw(
        st.lists(st.integers(1, 255), min_size=limit, max_size=limit).map(bytes)
    )
    request = Request(Command.CONNECT, 1, "1.1.1.1", userid)
    parser = RequestParser(max_userid=limit)
    assert feed_all(parser, draw_chunks(data, request.to_bytes()))[-1] == request


@pytest.mark.parametrize("limit", [1, 2, 16, DEFAULT_MAX_HOSTNAME, 1000])
def test_hostname_over_limit(limit: int) -> None:
    parser = RequestParser(max_hostname=limit)
    assert parser.feed(header(address="0.0.0.1") + b"u\x00" + b"h" * limit) is None
    with pytest.raises(FieldTooLong) as info:
        parser.feed(b"h")
    assert info.value.field == "host name"
    assert info.value.limit == limit
    assert info.value.reply is ReplyCode.REJECTED


@pytest.mark.parametrize("limit", [1, 2, 16, DEFAULT_MAX_HOSTNAME])
def test_hostname_at_limit_accepted(limit: int) -> None:
    request = Request(Command.BIND, 21, "0.0.0.3", b"", b"h" * limit)
    assert RequestParser(max_hostname=limit).feed(request.to_bytes()) == request


def test_default_limits() -> None:
    parser = RequestParser()
    assert parser.max_userid == DEFAULT_MAX_USERID == 255
    assert parser.max_hostname == DEFAULT_MAX_HOSTNAME == 255


def test_limits_are_independent() -> None:
    # A long USERID is fine under a large userid limit even when the host
    # name limit is small, and vice versa.
    request = Request(Command.CONNECT, 80, "0.0.0.1", b"u" * 100, b"h" * 3)
    parser = RequestParser(max_userid=100, max_hostname=3)
    assert parser.feed(request.to_bytes()) == request
    with pytest.raises(FieldTooLong) as info:
        RequestParser(max_userid=100, max_hostname=2).feed(request.to_bytes())
    assert info.value.field == "host name"


@given(
    max_userid=st.integers(0, 30),
    max_hostname=st.integers(1, 30),
    junk_=junk,
    data=st.data(),
)
def test_never_buffers_beyond_limits(
    max_userid: int, max_hostname: int, junk_: bytes, data: st.DataObject
) -> None:
    """
    Whatever is fed, a parser that still says "need more" holds no more than
    a header, two fields at their limits and their NULs.
    """
    parser = RequestParser(max_userid=max_userid, max_hostname=max_hostname)
    bound = HEADER.size + max_userid + 1 + max_hostname
    fed = 0
    for piece in draw_chunks(data, junk_):
        try:
            result = parser.feed(piece)
        except WireError:
            return
        if result is not None:
            return
        fed += len(piece)
        assert fed <= bound


# --- version and command ---------------------------------------------------


@pytest.mark.parametrize("version", [v for v in range(256) if v != 4])
def test_bad_version_on_first_byte(version: int) -> None:
    parser = RequestParser()
    with pytest.raises(VersionError) as info:
        parser.feed(bytes([version]))
    assert info.value.version == version
    assert info.value.reply is None


@pytest.mark.parametrize("version", [0, 5, 0x47, 0xFF])
def test_bad_version_whole_request(version: int) -> None:
    with pytest.raises(VersionError) as info:
        RequestParser().feed(header(version=version) + b"user\x00")
    assert info.value.version == version
    assert info.value.reply is None


def test_socks5_greeting() -> None:
    with pytest.raises(VersionError) as info:
        RequestParser().feed(b"\x05\x01\x00")
    assert info.value.version == 5
    assert info.value.reply is None
    assert isinstance(info.value, WireError)


def test_http_request_is_version_error() -> None:
    with pytest.raises(VersionError) as info:
        RequestParser().feed(b"GET / HTTP/1.1\r\n")
    assert info.value.version == ord("G")


@pytest.mark.parametrize("command", [c for c in range(256) if c not in (1, 2)])
def test_unknown_command_on_second_byte(command: int) -> None:
    parser = RequestParser()
    assert parser.feed(b"\x04") is None
    with pytest.raises(CommandError) as info:
        parser.feed(bytes([command]))
    assert info.value.command == command
    assert info.value.reply is ReplyCode.REJECTED


def test_unknown_command_whole_request() -> None:
    with pytest.raises(CommandError) as info:
        RequestParser().feed(header(command=3) + b"\x00")
    assert info.value.command == 3
    assert info.value.reply is ReplyCode.REJECTED


@pytest.mark.parametrize("command", [1, 2])
def test_known_command_needs_more(command: int) -> None:
    assert RequestParser().feed(bytes([4, command])) is None


def test_version_checked_before_command() -> None:
    with pytest.raises(VersionError):
        RequestParser().feed(b"\x05\x09")


# --- SOCKS4A host names ----------------------------------------------------


@pytest.mark.parametrize(
    "hostname",
    [
        b"",
        b" ",
        b"exa mple.com",
        b"example.com ",
        b"a\tb",
        b"a\nb",
        b"a\r\nb",
        b"\x01",
        b"\x1f",
        b"\x7f",
        b"host\x7f",
        b"\x80",
        b"caf\xc3\xa9.example",
        b"\xff",
    ],
)
def test_bad_hostname(hostname: bytes) -> None:
    data = header(address="0.0.0.1") + b"user\x00" + hostname + b"\x00"
    with pytest.raises(BadHostname) as info:
        RequestParser().feed(data)
    assert info.value.hostname == hostname
    assert info.value.reply is ReplyCode.REJECTED


@given(
    good=hostnames(100),
    bad=st.integers(1, 255).filter(lambda b: not 0x21 <= b <= 0x7E),
    position=st.integers(0, 100),
)
def test_bad_hostname_any_position(good: bytes, bad: int, position: int) -> None:
    position = min(position, len(good))
    hostname = good[:position] + bytes([bad]) + good[position:]
    data = header(Command.BIND, address="0.0.0.77") + b"\x00" + hostname + b"\x00"
    with pytest.raises(BadHostname) as info:
        RequestParser().feed(data)
    assert info.value.hostname == hostname


@pytest.mark.parametrize(
    "hostname", [b"a", b"!", b"~", b"localhost", b"xn--bcher-kva.example"]
)
def test_good_hostname(hostname: bytes) -> None:
    request = Request(Command.CONNECT, 80, "0.0.0.1", b"", hostname)
    assert RequestParser().feed(request.to_bytes()) == request


# --- is_socks4a ------------------------------------------------------------


@pytest.mark.parametrize("x", range(1, 256))
def test_is_socks4a_true(x: int) -> None:
    assert is_socks4a(f"0.0.0.{x}")


@pytest.mark.parametrize(
    "address",
    [
        "0.0.0.0",
        "1.2.3.4",
        "0.0.1.0",
        "0.0.1.1",
        "0.1.0.1",
        "1.0.0.1",
        "255.255.255.255",
    ],
)
def test_is_socks4a_false(address: str) -> None:
    assert not is_socks4a(address)


# --- arbitrary input -------------------------------------------------------


@given(junk_=junk, data=st.data())
def test_arbitrary_bytes_only_raise_wire_errors(
    junk_: bytes, data: st.DataObject
) -> None:
    parser = RequestParser()
    try:
        for piece in draw_chunks(data, junk_):
            parser.feed(piece)
    except WireError:
        pass


@given(
    max_userid=st.integers(0, 20),
    max_hostname=st.integers(0, 20),
    junk_=junk,
    data=st.data(),
)
def test_arbitrary_bytes_small_limits(
    max_userid: int, max_hostname: int, junk_: bytes, data: st.DataObject
) -> None:
    parser = RequestParser(max_userid=max_userid, max_hostname=max_hostname)
    try:
        for piece in draw_chunks(data, junk_):
            parser.feed(piece)
    except WireError:
        pass


@given(junk_=junk, data=st.data())
def test_outcome_independent_of_split(junk_: bytes, data: st.DataObject) -> None:
    """
    The same bytes give the same result however they are split: the same
    request and trailing bytes, the same error, or "need more".
    """
    whole = outcome(RequestParser(), [junk_] if junk_ else [])
    split = outcome(RequestParser(), draw_chunks(data, junk_))
    assert split == whole


def test_error_hierarchy() -> None:
    for error in (VersionError, CommandError, FieldTooLong, BadHostname, BadReply):
        assert issubclass(error, WireError)
    assert VersionError.reply is None
    assert BadReply.reply is None
    assert CommandError(3).reply is ReplyCode.REJECTED
    assert FieldTooLong("USERID", 1).reply is ReplyCode.REJECTED
    assert BadHostname(b"").reply is ReplyCode.REJECTED


def test_command_labels() -> None:
    assert Command.CONNECT.label == "connect"
    assert Command.BIND.label == "bind"


# --- Reply.from_bytes ------------------------------------------------------


@given(packed=st.binary().filter(lambda b: len(b) != 8))
def test_reply_wrong_length(packed: bytes) -> None:
    with pytest.raises(BadReply) as info:
        Reply.from_bytes(packed)
    assert info.value.reply is None


@pytest.mark.parametrize("length", [0, 1, 7, 9, 16])
def test_reply_wrong_length_examples(length: int) -> None:
    packed = (Reply(ReplyCode.GRANTED).to_bytes() * 3)[:length]
    with pytest.raises(BadReply):
        Reply.from_bytes(packed)


@given(version=st.integers(1, 255), code=st.sampled_from(ReplyCode))
def test_reply_wrong_version(version: int, code: ReplyCode) -> None:
    with pytest.raises(BadReply):
        Reply.from_bytes(bytes([version, code]) + b"\x00" * 6)


def test_reply_version_4_rejected() -> None:
    # A server echoing VN 4 is a classic mistake; clients must reject it.
    with pytest.raises(BadReply):
        Reply.from_bytes(b"\x04\x5a" + b"\x00" * 6)


@given(code=st.integers(0, 255).filter(lambda c: c not in set(ReplyCode)))
def test_reply_unknown_code(code: int) -> None:
    with pytest.raises(BadReply) as info:
        Reply.from_bytes(bytes([0, code]) + b"\x00" * 6)
    assert info.value.reply is None


def test_reply_from_bytes_fields() -> None:
    reply = Reply.from_bytes(b"\x00\x5a\x04\x38\xc0\x00\x02\x01")
    assert reply == Reply(ReplyCode.GRANTED, 1080, "192.0.2.1")
    assert reply.code is ReplyCode.GRANTED


# --- ReplyParser (the client's side) ----------------------------------------

replies = st.builds(
    Reply,
    code=st.sampled_from(ReplyCode),
    port=st.integers(0, 65535),
    address=st.ip_addresses(v=4).map(str),
)


@given(reply=replies, trailing=st.binary(max_size=32), data=st.data())
def test_reply_parser_any_split(
    reply: Reply, trailing: bytes, data: st.DataObject
) -> None:
    parser = ReplyParser()
    pieces = draw_chunks(data, reply.to_bytes() + trailing)
    results = [parser.feed(piece) for piece in pieces]
    complete = [result for result in results if result is not None]
    assert complete and all(result == reply for result in complete)
    assert parser.reply == reply
    assert parser.trailing == trailing


def test_reply_parser_byte_by_byte() -> None:
    packed = Reply(ReplyCode.GRANTED, 1080, "192.0.2.1").to_bytes()
    parser = ReplyParser()
    for byte in packed[:-1]:
        assert parser.feed(bytes([byte])) is None
        assert parser.reply is None
    assert parser.feed(packed[-1:]) == Reply(ReplyCode.GRANTED, 1080, "192.0.2.1")
    assert parser.trailing == b""


def test_reply_parser_feeds_after_completion_are_trailing() -> None:
    parser = ReplyParser()
    parser.feed(Reply(ReplyCode.GRANTED).to_bytes() + b"a")
    assert parser.feed(b"bc") == Reply(ReplyCode.GRANTED)
    assert parser.trailing == b"abc"


def test_reply_parser_empty_feed() -> None:
    assert ReplyParser().feed(b"") is None


@pytest.mark.parametrize(
    "data",
    [
        b"H",
        b"HTTP/1.1 400 Bad Request\r\n",
        b"\x05",
        b"\x04\x5a",
        b"\x00\x00",
        b"\x00\x5e",
    ],
)
def test_reply_parser_fails_fast(data: bytes) -> None:
    """Something that isn't a SOCKS4 reply fails on its first wrong byte."""
    parser = ReplyParser()
    with pytest.raises(BadReply) as info:
        parser.feed(data)
    assert info.value.reply is None
    assert parser.reply is None


@given(packed=st.binary(min_size=8, max_size=8))
def test_reply_parser_agrees_with_from_bytes(packed: bytes) -> None:
    try:
        expected: Reply | None = Reply.from_bytes(packed)
    except BadReply:
        expected = None
    try:
        got = ReplyParser().feed(packed)
    except BadReply:
        got = None
    assert got == expected
