"""
Tests for L{socks4tx.identwire}: the sans-IO RFC 1413 query and answers.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from socks4tx.identwire import (
    ERROR_TYPES,
    MAX_LINE,
    Answer,
    IdentAnswerParser,
    IdentErrorAnswer,
    IdentPortMismatch,
    IdentProtocolError,
    IdentUser,
    check_ports,
    format_answer,
    format_query,
    parse_answer,
    userid_matches,
)

# --- helpers ---------------------------------------------------------------


def chunks(data: bytes, cuts: set[int]) -> list[bytes]:
    """Split C{data} at the given offsets into non-empty pieces."""
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(data)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def outcome(pieces: list[bytes]) -> tuple[object, ...]:
    """Feed C{pieces}; what happened, comparable between splits."""
    parser = IdentAnswerParser()
    try:
        for piece in pieces:
            answer = parser.feed(piece)
            if answer is not None:
                return ("answer", answer)
    except IdentProtocolError as error:
        return ("error", str(error))
    return ("incomplete",)


def parse(data: bytes) -> Answer | None:
    return IdentAnswerParser().feed(data)


ports = st.integers(1, 65535)
blanks = st.text(" \t", max_size=3).map(str.encode)
#: RFC 1413 tokens without commas: what the OS and charset fields can carry.
field_tokens = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=":,"),
    min_size=1,
    max_size=64,
)
error_tokens = st.one_of(
    st.sampled_from(sorted(ERROR_TYPES)),
    field_tokens.filter(lambda t: t.upper() not in ERROR_TYPES).map(
        lambda t: "X" + t[:63]
    ),
)
#: User-ids as they survive the trip: no NUL, CR or LF, no blanks around.
userids = (
    st.binary(min_size=1, max_size=512)
    .map(lambda b: b.replace(b"\0", b"").replace(b"\r", b"").replace(b"\n", b""))
    .map(lambda b: b.strip(b" \t"))
    .filter(bool)
)
users = st.builds(
    IdentUser, ports, ports, field_tokens, st.none() | field_tokens, userids
)
errors = st.builds(IdentErrorAnswer, ports, ports, error_tokens)
answers = users | errors


# --- the query -------------------------------------------------------------


def test_query_names_the_client_port_then_the_server_port() -> None:
    assert format_query(6193, 1080) == b"6193, 1080\r\n"


@pytest.mark.parametrize("pair", [(0, 1080), (6193, 0), (65536, 1), (1, -1)])
def test_query_refuses_impossible_ports(pair: tuple[int, int]) -> None:
    with pytest.raises(ValueError):
        format_query(*pair)


# --- examples --------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        b"6193, 1080 : USERID : UNIX : alice\r\n",
        b"6193,1080:USERID:UNIX:alice\r\n",
        b"  6193 ,\t1080\t:USERID  :  UNIX:alice  \r\n",
        b"6193,1080:userid:UNIX:alice\r\n",
        b"6193,1080:USERID:UNIX:alice\n",
        b"06193,01080:USERID:UNIX:alice\r\n",
    ],
)
def test_userid_answer_forms(line: bytes) -> None:
    assert parse(line) == IdentUser(6193, 1080, "UNIX", None, b"alice")


def test_oidentd_answer() -> None:
    assert parse(b"38214,18081:USERID:UNIX:root\r\n") == IdentUser(
        38214, 18081, "UNIX", None, b"root"
    )


@pytest.mark.parametrize(
    "line", [b"1,2:USERID:UNIX , UTF-8:bob\r\n", b"1,2:USERID:UNIX,UTF-8:bob\r\n"]
)
def test_charset(line: bytes) -> None:
    assert parse(line) == IdentUser(1, 2, "UNIX", "UTF-8", b"bob")


@pytest.mark.parametrize(
    ("userid", "expected"),
    [
        (b"a:b:c", b"a:b:c"),
        (b"  spaced out  ", b"spaced out"),
        (b"\t:lead", b":lead"),
        (b"caf\xc3\xa9", b"caf\xc3\xa9"),
        (b"\xff\x01", b"\xff\x01"),
    ],
)
def test_userid_is_everything_after_the_third_colon(
    userid: bytes, expected: bytes
) -> None:
    answer = parse(b"1,2:USERID:OTHER:" + userid + b"\r\n")
    assert isinstance(answer, IdentUser)
    assert answer.userid == expected


@pytest.mark.parametrize("kind", sorted(ERROR_TYPES))
def test_error_types(kind: str) -> None:
    assert parse(b"1, 2 : ERROR : %s\r\n" % kind.encode()) == IdentErrorAnswer(
        1, 2, kind
    )
    assert parse(b"1,2:ERROR:%s\r\n" % kind.lower().encode()) == IdentErrorAnswer(
        1, 2, kind
    )


def test_other_error_tokens_are_kept_as_sent() -> None:
    assert parse(b"1,2:ERROR:X-Too-Busy\r\n") == IdentErrorAnswer(1, 2, "X-Too-Busy")


def test_zero_ports_as_oidentd_echoes_an_invalid_query() -> None:
    assert parse(b"0,0:ERROR:INVALID-PORT\r\n") == IdentErrorAnswer(
        0, 0, "INVALID-PORT"
    )


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"garbage",
        b"\x00\xff\r",
        b"1,2",
        b"1,2:USERID",
        b"1,2:USERID:UNIX",
        b"1,2:USERID:UNIX:",
        b"1,2:USERID:UNIX:   ",
        b"1,2:USERID::alice",
        b"1,2:USERID:UNIX,:alice",
        b"1,2:USERID:UNIX,UTF-8,X:alice",
        b"1,2:USERID:UN IX:alice",
        b"1,2:USERID:" + b"U" * 65 + b":alice",
        b"1,2:USERID:UNIX:al\x00ice",
        b"1,2:USERID:UNIX:al\rice",
        b"1,2:ERROR:",
        b"1,2:ERROR:NO USER",
        b"1,2:ERROR:NO-USER:extra",
        b"1,2:ERROR:\xffBAD",
        b"1,2:OK:alice",
        b"1:USERID:UNIX:alice",
        b"1,2,3:USERID:UNIX:alice",
        b",2:USERID:UNIX:alice",
        b"1,:USERID:UNIX:alice",
        b"-1,2:USERID:UNIX:alice",
        b"+1,2:USERID:UNIX:alice",
        b"1_0,2:USERID:UNIX:alice",
        b"65536,2:USERID:UNIX:alice",
        b"123456,2:USERID:UNIX:alice",
        b"\xd9\xa1,2:USERID:UNIX:alice",
        b"1 2,3:USERID:UNIX:alice",
    ],
)
def test_malformed(line: bytes) -> None:
    with pytest.raises(IdentProtocolError):
        parse_answer(line)
    with pytest.raises(IdentProtocolError):
        parse(line + b"\r\n")


# --- the parser: line ends and the cap ---------------------------------------


def test_need_more_until_the_line_end() -> None:
    parser = IdentAnswerParser()
    assert parser.feed(b"1,2:USERID:UNIX:alice") is None
    assert parser.feed(b"\r") is None
    assert parser.buffered == len(b"1,2:USERID:UNIX:alice\r")
    assert parser.feed(b"\n") == IdentUser(1, 2, "UNIX", None, b"alice")


def test_a_bare_cr_is_no_line_end() -> None:
    assert parse(b"1,2:USERID:UNIX:alice\r") is None


def test_bytes_after_the_line_are_ignored() -> None:
    parser = IdentAnswerParser()
    answer = parser.feed(b"1,2:ERROR:NO-USER\r\nmore garbage")
    assert answer == IdentErrorAnswer(1, 2, "NO-USER")
    assert parser.feed(b"\x00" * 5000) == answer


def test_an_error_sticks() -> None:
    parser = IdentAnswerParser()
    with pytest.raises(IdentProtocolError):
        parser.feed(b"nonsense\r\n")
    with pytest.raises(IdentProtocolError):
        parser.feed(b"1,2:ERROR:NO-USER\r\n")


def test_1000_bytes_without_line_end_are_still_fine() -> None:
    assert IdentAnswerParser().feed(b"x" * MAX_LINE) is None


def test_over_1000_bytes_without_line_end() -> None:
    parser = IdentAnswerParser()
    assert parser.feed(b"x" * MAX_LINE) is None
    with pytest.raises(IdentProtocolError, match="1000"):
        parser.feed(b"x")


@pytest.mark.parametrize("line_end", [b"\n", b"\r\n"])
def test_the_longest_line(line_end: bytes) -> None:
    head = b"1,2:USERID:UNIX:"
    userid = b"u" * (MAX_LINE - len(head) - len(line_end) + 1)
    answer = parse(head + userid + line_end)
    assert isinstance(answer, IdentUser) and answer.userid == userid
    with pytest.raises(IdentProtocolError, match="1000"):
        parse(head + userid + b"u" + line_end)


def test_over_the_cap_in_one_chunk_with_a_line_end() -> None:
    with pytest.raises(IdentProtocolError, match="1000"):
        parse(b"1,2:USERID:UNIX:" + b"u" * 2000 + b"\r\n")


# --- ports and user-ids ------------------------------------------------------


def test_check_ports() -> None:
    answer = IdentUser(6193, 1080, "UNIX", None, b"alice")
    check_ports(answer, 6193, 1080)
    for pair in [(1080, 6193), (6193, 1081), (6194, 1080)]:
        with pytest.raises(IdentPortMismatch) as caught:
            check_ports(answer, *pair)
        assert caught.value.answered == (6193, 1080)
        assert caught.value.asked == pair
    with pytest.raises(IdentPortMismatch):
        check_ports(IdentErrorAnswer(1, 2, "NO-USER"), 2, 1)


@pytest.mark.parametrize(
    ("answer", "request_userid", "expected"),
    [
        (b"alice", b"alice", True),
        (b" alice\t", b"alice", True),
        (b"alice", b"Alice", False),
        (b"alice", b"alice ", False),
        (b"alice", b"alic", False),
        (b"alice", b"", False),
        (b"", b"", False),
        (b"  ", b"", False),
        (b"caf\xc3\xa9", b"caf\xc3\xa9", True),
    ],
)
def test_userid_matches(answer: bytes, request_userid: bytes, expected: bool) -> None:
    assert userid_matches(answer, request_userid) is expected


def test_format_answer_refuses_unsendable_userids() -> None:
    for userid in [b"", b"a\nb", b"a\rb", b"a\0b"]:
        with pytest.raises(ValueError):
            format_answer(IdentUser(1, 2, "UNIX", None, userid))


# --- properties ------------------------------------------------------------


@given(answers, st.booleans())
def test_round_trip(answer: Answer, spaced: bool) -> None:
    assert parse(format_answer(answer, spaced)) == answer


@given(
    port_on_server=ports,
    port_on_client=ports,
    opsys=field_tokens,
    charset=st.none() | field_tokens,
    userid=userids,
    gaps=st.lists(blanks, min_size=9, max_size=9),
)
def test_blanks_anywhere_around_separators(
    port_on_server: int,
    port_on_client: int,
    opsys: str,
    charset: str | None,
    userid: bytes,
    gaps: list[bytes],
) -> None:
    g = gaps
    opsys_field = g[4] + opsys.encode() + g[5]
    if charset is not None:
        opsys_field += b"," + g[6] + charset.encode()
    line = (
        g[0]
        + b"%d" % port_on_server
        + g[1]
        + b","
        + g[2]
        + b"%d" % port_on_client
        + g[3]
        + b":"
        + g[7]
        + b"USERID:"
        + opsys_field
        + b":"
        + g[8]
        + userid
        + g[8]
        + b"\r\n"
    )
    assert parse(line) == IdentUser(
        port_on_server, port_on_client, opsys, charset, userid
    )


@given(answers, st.booleans(), st.binary(max_size=50), st.data())
def test_split_anywhere_gives_the_same_answer(
    answer: Answer, spaced: bool, trailing: bytes, data: st.DataObject
) -> None:
    payload = format_answer(answer, spaced) + trailing
    cuts = data.draw(st.sets(st.integers(0, len(payload))), label="cuts")
    assert outcome(chunks(payload, cuts)) == ("answer", answer)


@given(st.binary(max_size=2100), st.data())
def test_arbitrary_bytes_only_raise_protocol_errors_and_any_split_agrees(
    payload: bytes, data: st.DataObject
) -> None:
    whole = outcome([payload])  # raises nothing but IdentProtocolError
    cuts = data.draw(st.sets(st.integers(0, len(payload)), max_size=40), label="cuts")
    assert outcome(chunks(payload, cuts)) == whole
    assert outcome([bytes([b]) for b in payload[:1100]]) == outcome([payload[:1100]])


@given(
    st.lists(
        st.sampled_from([b"1", b"2", b",", b":", b" ", b"\t", b"\r", b"\n", b"\0"])
        | st.sampled_from([b"USERID", b"ERROR", b"UNIX", b"NO-USER", b"X", b"\xff"]),
        max_size=30,
    )
)
def test_near_misses_only_raise_protocol_errors(pieces: list[bytes]) -> None:
    """Shuffled fragments of real answers reach deeper than random bytes."""
    payload = b"".join(pieces)
    whole = outcome([payload])
    assert outcome(pieces) == whole
    if whole[0] == "answer":
        answer = whole[1]
        assert isinstance(answer, IdentUser | IdentErrorAnswer)
        assert parse(format_answer(answer)) == answer


@given(st.binary(max_size=200), st.integers(MAX_LINE + 1, 3000), st.binary(max_size=5))
def test_no_line_end_within_the_cap_always_fails(
    head: bytes, size: int, tail: bytes
) -> None:
    payload = (head * (size // max(len(head), 1) + 1))[:size] or b"x" * size
    payload = payload.replace(b"\n", b"x") + tail
    assert outcome([payload]) == ("error", f"no line end within {MAX_LINE} bytes")


@given(userids, userids)
def test_userid_matches_is_byte_equality(answer: bytes, request_userid: bytes) -> None:
    assert userid_matches(answer, request_userid) is (answer == request_userid)
    assert userid_matches(b" " + answer + b"\t", answer)
