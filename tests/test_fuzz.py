"""
Fuzz targets for the parsers that read what the network sends: the SOCKS4
request parser (L{socks4tx.wire.RequestParser}), the reply decoder
(L{socks4tx.wire.Reply.from_bytes}) and the RFC 1413 answer parser
(L{socks4tx.identwire.IdentAnswerParser}).

Hypothesis runs them in CI with a bounded budget.  The inputs are
structure-aware: valid messages, mutations of valid messages (bit flips,
interesting bytes, truncation, deletion, insertion, duplication, splicing),
valid prefixes with arbitrary tails, and raw bytes, each fed whole, in an
arbitrary split and byte by byte.  The properties:

- only the codec's own errors are raised (L{WireError},
  L{IdentProtocolError});
- a parser that still waits for more never holds more than its limits
  (a request: header + max USERID + NUL + max host name; an ident answer:
  1000 bytes);
- the result (request and trailing bytes, answer, or error and its
  message) does not depend on how the input is split;
- what is accepted round-trips.

C{SOCKS4TX_FUZZ_EXAMPLES} sets the examples per target (default 1500,
about 10-20 s for the file); raise it for a longer local run.  The check
functions are plain, so C{tests/fuzz_atheris.py} drives the same
properties with atheris' coverage-guided engine.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from socks4tx.identwire import (
    ERROR_TYPES,
    MAX_LINE,
    Answer,
    IdentAnswerParser,
    IdentErrorAnswer,
    IdentProtocolError,
    IdentUser,
    format_answer,
    parse_answer,
)
from socks4tx.wire import (
    HEADER,
    REPLY,
    BadReply,
    Command,
    Reply,
    ReplyCode,
    Request,
    RequestParser,
    VersionError,
    WireError,
)

EXAMPLES = int(os.environ.get("SOCKS4TX_FUZZ_EXAMPLES", "1500"))

fuzz = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
)

#: Bytes that mean something to one of the parsers.
INTERESTING = [0x00, 0x01, 0x02, 0x04, 0x05, 0x09, 0x0A, 0x0D, 0x20, 0x2C, 0x3A, 0xFF]
#: Inputs fed byte by byte are cut to this length (it costs a feed a byte).
BYTEWISE = 400


def chunks(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """C{data} split at the given offsets (out-of-range ones ignored)."""
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(data)}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# -- the request parser -------------------------------------------------------


def request_limit(max_userid: int, max_hostname: int) -> int:
    """The most a request parser may hold while waiting for more."""
    return HEADER.size + max_userid + 1 + max_hostname


def request_outcome(
    pieces: Iterable[bytes], max_userid: int, max_hostname: int
) -> tuple[object, ...]:
    """
    Feed C{pieces} to a new parser, checking its bound after every feed;
    the result, comparable between splits.  Any exception other than a
    L{WireError} escapes: that is a finding.
    """
    parser = RequestParser(max_userid, max_hostname)
    limit = request_limit(max_userid, max_hostname)
    try:
        for piece in pieces:
            result = parser.feed(piece)
            assert result is parser.request
            if result is None:
                # The parser's only buffer (no public size for it).
                held = len(parser._buffer)
                assert held <= limit, f"holds {held} bytes, limit {limit}"
    except WireError as error:
        return ("error", type(error), str(error), error.reply)
    if parser.request is None:
        return ("incomplete",)
    return ("request", parser.request, parser.trailing)


def check_request_parser(
    data: bytes, cuts: Iterable[int], max_userid: int, max_hostname: int
) -> None:
    """The fuzz target for L{RequestParser}."""
    whole = request_outcome([data], max_userid, max_hostname)
    split = request_outcome(chunks(data, cuts), max_userid, max_hostname)
    assert split == whole, (split, whole)
    head = data[:BYTEWISE]
    bytewise = request_outcome(
        (head[i : i + 1] for i in range(len(head))), max_userid, max_hostname
    )
    assert bytewise == request_outcome([head], max_userid, max_hostname)
    # An empty feed changes nothing.
    padded = request_outcome([b"", data, b""], max_userid, max_hostname)
    assert padded == whole
    if whole[0] == "request":
        request, trailing = whole[1], whole[2]
        assert isinstance(request, Request) and isinstance(trailing, bytes)
        # Exactly the bytes of the request, then the relayed stream.
        assert request.to_bytes() + trailing == data
        assert len(request.userid) <= max_userid
        assert b"\0" not in request.userid
        if request.hostname is not None:
            assert 0 < len(request.hostname) <= max_hostname
            assert all(0x21 <= byte < 0x7F for byte in request.hostname)
    elif whole[0] == "error":
        kind, reply = whole[1], whole[3]
        # Not SOCKS4 exactly when the first byte is not 4; only then no reply.
        assert (kind is VersionError) == (data[0] != 4)
        assert (reply is None) == (kind is VersionError)
        assert reply in (None, ReplyCode.REJECTED)
    else:
        assert len(data) <= request_limit(max_userid, max_hostname)


def check_reply(data: bytes) -> None:
    """The fuzz target for L{Reply.from_bytes}."""
    try:
        reply = Reply.from_bytes(data)
    except WireError as error:
        assert isinstance(error, BadReply)
        assert error.reply is None
        assert not (
            len(data) == REPLY.size and data[0] == 0 and data[1] in set(ReplyCode)
        )
        return
    assert reply.to_bytes() == data


# -- the ident answer parser --------------------------------------------------


def ident_outcome(pieces: Iterable[bytes]) -> tuple[object, ...]:
    """
    Feed C{pieces} (all of them: later bytes are ignored once there is an
    answer, and an error stays an error), checking the bound after every
    feed; the result, comparable between splits.
    """
    parser = IdentAnswerParser()
    answer: Answer | None = None
    error: str | None = None
    for piece in pieces:
        try:
            result = parser.feed(piece)
        except IdentProtocolError as raised:
            assert answer is None
            assert error in (None, str(raised))
            error = str(raised)
            assert parser.buffered == 0
            continue
        assert error is None, "a parser that failed went on"
        assert answer in (None, result)
        answer = result
        assert parser.buffered <= MAX_LINE, f"holds {parser.buffered} bytes"
    if error is not None:
        return ("error", error)
    if answer is not None:
        return ("answer", answer)
    return ("incomplete",)


def check_ident_parser(data: bytes, cuts: Iterable[int]) -> None:
    """The fuzz target for L{IdentAnswerParser}."""
    whole = ident_outcome([data])
    split = ident_outcome(chunks(data, cuts))
    assert split == whole, (split, whole)
    head = data[:BYTEWISE]
    bytewise = ident_outcome(head[i : i + 1] for i in range(len(head)))
    assert bytewise == ident_outcome([head])
    # The answer is the first line's, whatever follows it.
    end = data.find(b"\n")
    if end == -1:
        expected = (
            ("incomplete",)
            if len(data) <= MAX_LINE
            else ("error", f"no line end within {MAX_LINE} bytes")
        )
        assert whole == expected, whole
    elif end > MAX_LINE:
        assert whole == ("error", f"no line end within {MAX_LINE} bytes"), whole
    else:
        try:
            expected = ("answer", parse_answer(data[:end].removesuffix(b"\r")))
        except IdentProtocolError as error:
            expected = ("error", str(error))
        assert whole == expected, (whole, expected)
    if whole[0] == "answer":
        answer = whole[1]
        assert isinstance(answer, IdentUser | IdentErrorAnswer)
        # What was understood can be said again, and means the same.
        for spaced in (True, False):
            line = format_answer(answer, spaced)
            if len(line) <= MAX_LINE + 1:  # the LF at most at MAX_LINE
                assert ident_outcome([line]) == whole


# -- strategies -----------------------------------------------------------------

OPERATIONS = ["flip", "set", "truncate", "delete", "insert", "duplicate", "splice"]


@st.composite
def mutated(draw: st.DrawFn, seed: bytes, more: st.SearchStrategy[bytes]) -> bytes:
    """C{seed} after one to four random edits; C{more} gives bytes to splice."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        operation = draw(st.sampled_from(OPERATIONS))
        size = len(data)
        if operation == "flip" and size:
            index = draw(st.integers(0, size - 1))
            data[index] ^= 1 << draw(st.integers(0, 7))
        elif operation == "set" and size:
            index = draw(st.integers(0, size - 1))
            data[index] = draw(st.sampled_from(INTERESTING) | st.integers(0, 255))
        elif operation == "truncate":
            del data[draw(st.integers(0, size)) :]
        elif operation == "delete" and size:
            start = draw(st.integers(0, size - 1))
            del data[start : start + draw(st.integers(1, 16))]
        elif operation == "insert":
            index = draw(st.integers(0, size))
            data[index:index] = draw(
                st.binary(min_size=1, max_size=16)
                | st.sampled_from(INTERESTING).map(lambda byte: bytes([byte]))
            )
        elif operation == "duplicate" and size:
            start = draw(st.integers(0, size - 1))
            piece = data[start : start + draw(st.integers(1, 64))]
            index = draw(st.integers(0, size))
            data[index:index] = piece * draw(st.integers(1, 40))
        elif operation == "splice":
            data += draw(more)
    return bytes(data)


def fuzz_inputs(seeds: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Valid messages, their mutations, valid prefixes with any tail, raw bytes."""
    return st.one_of(
        seeds,
        seeds.flatmap(lambda seed: mutated(seed, seeds)),
        seeds.flatmap(lambda seed: mutated(seed, seeds)),
        st.tuples(seeds, st.integers(0, 64), st.binary(max_size=64)).map(
            lambda t: t[0][: t[1]] + t[2]
        ),
        st.binary(max_size=600),
    )


def no_nul(data: bytes) -> bytes:
    return data.replace(b"\0", b"")


fields = st.one_of(
    st.sampled_from([b"", b"alice", b"root", b"\xc3\xa9"]),
    st.binary(max_size=300).map(no_nul),
    st.integers(200, 300).map(lambda n: b"u" * n),
)
hostnames = st.one_of(
    st.sampled_from([b"example.org", b"localhost", b"198.51.100.5", b"a" * 255]),
    st.text(
        st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=300
    ).map(str.encode),
    st.binary(max_size=40).map(no_nul),
)
addresses = st.one_of(
    st.sampled_from(["0.0.0.1", "0.0.0.255", "0.0.0.0", "127.0.0.1"]),
    st.ip_addresses(v=4).map(str),
)


@st.composite
def request_messages(draw: st.DrawFn) -> bytes:
    """A request of any command (valid or not) with payload behind it."""
    address = draw(addresses)
    request = Request(
        draw(st.sampled_from(Command)),
        draw(st.integers(0, 65535)),
        address,
        draw(fields),
        draw(hostnames)
        if address.startswith("0.0.0.") and address != "0.0.0.0"
        else None,
    )
    data = bytearray(request.to_bytes())
    data[0] = draw(st.sampled_from([4, 4, 4, 4, 5, 0]))
    data[1] = draw(st.sampled_from([1, 2, 1, 2, 0, 3, 255]))
    return bytes(data) + draw(st.binary(max_size=32))


reply_messages = st.builds(
    lambda code, port, address: Reply(code, port, address).to_bytes(),
    st.sampled_from(ReplyCode),
    st.integers(0, 65535),
    st.ip_addresses(v=4).map(str),
)

ports = st.integers(1, 65535) | st.sampled_from([0, 65536, 99999])
tokens = st.sampled_from(["UNIX", "OTHER", "WIN32", "UNIX-BSD", "X-OS", "TOPS-20"])
charsets = st.none() | st.sampled_from(["UTF-8", "US-ASCII", "ISO-8859-1"])
errors = st.sampled_from([*sorted(ERROR_TYPES), "X-LOCAL", "no-user"])
ident_userids = st.one_of(
    st.sampled_from([b"alice", b"root", b"caf\xc3\xa9", b"a b", b"x:y,z"]),
    st.binary(min_size=1, max_size=80).map(
        lambda b: b.translate(None, b"\0\r\n").strip(b" \t") or b"u"
    ),
    # Around the 1000-byte line cap.
    st.integers(960, 1010).map(lambda n: b"u" * n),
)


@st.composite
def ident_messages(draw: st.DrawFn) -> bytes:
    """An identd's answer line (spaced or oidentd-style), maybe with more."""
    port_on_server, port_on_client = draw(ports), draw(ports)
    # Ports out of range are written in by hand: format_answer can't.
    in_range = [max(1, min(port, 65535)) for port in (port_on_server, port_on_client)]
    spaced = draw(st.booleans())
    if draw(st.booleans()):
        answer: Answer = IdentErrorAnswer(*in_range, draw(errors))
    else:
        answer = IdentUser(*in_range, draw(tokens), draw(charsets), draw(ident_userids))
    line = format_answer(answer, spaced)
    if in_range != [port_on_server, port_on_client]:
        line = b"%d,%d" % (port_on_server, port_on_client) + line[line.index(b":") :]
    if draw(st.booleans()):
        line = line.replace(b"\r\n", b"\n")
    return line + draw(st.binary(max_size=24))


# -- the targets ------------------------------------------------------------------

limits = st.sampled_from([0, 1, 8, 255]) | st.integers(0, 300)
cuts = st.sets(st.integers(1, 1200), max_size=24)


@fuzz
@given(
    data=fuzz_inputs(request_messages()),
    cuts=cuts,
    max_userid=limits,
    max_hostname=limits,
)
def test_fuzz_request_parser(
    data: bytes, cuts: set[int], max_userid: int, max_hostname: int
) -> None:
    check_request_parser(data, cuts, max_userid, max_hostname)


@fuzz
@given(data=fuzz_inputs(reply_messages))
def test_fuzz_reply(data: bytes) -> None:
    check_reply(data)


@fuzz
@given(data=fuzz_inputs(ident_messages()), cuts=cuts)
def test_fuzz_ident_parser(data: bytes, cuts: set[int]) -> None:
    check_ident_parser(data, cuts)


def test_fuzz_targets_reach_every_outcome() -> None:
    """The targets see valid input, errors and incomplete input alike."""
    parsed = request_outcome(
        [Request(Command.BIND, 21, "0.0.0.1", b"", b"x").to_bytes()], 8, 8
    )
    assert parsed[0] == "request"
    assert request_outcome([b"\x04\x01\x00"], 8, 8) == ("incomplete",)
    assert request_outcome([b"\x04\x01" + b"\0" * 6 + b"u" * 9], 8, 8)[0] == "error"
    assert ident_outcome([b"1,2:USERID:UNIX:alice\r\n"])[0] == "answer"
    assert ident_outcome([b"1,2:USERID"]) == ("incomplete",)
    assert ident_outcome([b"x" * (MAX_LINE + 1)])[0] == "error"
