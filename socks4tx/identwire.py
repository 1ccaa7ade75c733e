"""
The RFC 1413 (Identification Protocol) wire format, without I/O.

Nothing here imports Twisted.  RFC 1413 names the ports from the identd
host's point of view: "port-on-server" is the port on the host running
identd (for us: the SOCKS client's source port), "port-on-client" the port
on the asking host (for us: the proxy port the client connected to).

The parser follows RFC 1413's "liberal in what you accept": white space
(spaces and tabs) may surround every separator, the reply type is matched
without regard to case, and a line may end in a bare LF as well as CR LF.
It is strict where leniency could mislead the server: ports are 1-5
digits, tokens are printable ASCII without colons, and no line may run
past L{MAX_LINE} bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TypeAlias

#: RFC 1413: "Clients should feel free to abort a connection if they receive
#: 1000 characters without receiving an <EOL>."  Counted before the LF, a
#: CR included.
MAX_LINE = 1000
#: RFC 1413's white space: "space and tab characters".
WHITESPACE = b" \t"

INVALID_PORT = "INVALID-PORT"
NO_USER = "NO-USER"
HIDDEN_USER = "HIDDEN-USER"
UNKNOWN_ERROR = "UNKNOWN-ERROR"
#: The error types RFC 1413 defines; others (C{X-...}) are kept as sent.
ERROR_TYPES = frozenset({INVALID_PORT, NO_USER, HIDDEN_USER, UNKNOWN_ERROR})

# 1-5 digits, as RFC 1413's <integer>.
_PORT = re.compile(rb"[0-9]{1,5}")
# RFC 1413 tokens: 1-64 printable ASCII characters other than the colon.
_TOKEN = re.compile(rb"[\x21-\x39\x3b-\x7e]{1,64}")
# The OS and charset tokens, which a comma separates.
_FIELD_TOKEN = re.compile(rb"[\x21-\x2b\x2d-\x39\x3b-\x7e]{1,64}")


class IdentError(Exception):
    """Base of the errors of an ident exchange."""


class IdentProtocolError(IdentError):
    """The identd's answer is not RFC 1413: garbage, a bad field, too long."""


class IdentPortMismatch(IdentError):
    """The answer is about another port pair than the one asked for."""

    def __init__(self, answered: tuple[int, int], asked: tuple[int, int]) -> None:
        super().__init__(
            f"answer for ports {answered[0]},{answered[1]}"
            f" to a query for {asked[0]},{asked[1]}"
        )
        self.answered = answered
        self.asked = asked


@dataclass(frozen=True)
class IdentUser:
    """
    A C{USERID} answer.

    @ivar userid: the user-id octets, white space around them stripped; its
        encoding is C{charset} (RFC 1413's default: US-ASCII).
    """

    port_on_server: int
    port_on_client: int
    opsys: str
    charset: str | None
    userid: bytes


@dataclass(frozen=True)
class IdentErrorAnswer:
    """An C{ERROR} answer; C{error} is its type as sent (see L{ERROR_TYPES})."""

    port_on_server: int
    port_on_client: int
    error: str


Answer: TypeAlias = IdentUser | IdentErrorAnswer


def _check_port(port: int) -> None:
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range 1-65535")


def format_query(port_on_server: int, port_on_client: int) -> bytes:
    """
    The query line: C{port_on_server} is the SOCKS client's source port,
    C{port_on_client} the proxy's port that the client connected to.
    """
    _check_port(port_on_server)
    _check_port(port_on_client)
    return b"%d, %d\r\n" % (port_on_server, port_on_client)


def format_answer(answer: Answer, spaced: bool = True) -> bytes:
    """
    An answer line as an identd sends it, with blanks around the separators
    (RFC 1413's examples) or without (oidentd).  For tests and fakes.
    """
    sep = b" : " if spaced else b":"
    comma = b" , " if spaced else b","
    head = b"%d%s%d%s" % (answer.port_on_server, comma, answer.port_on_client, sep)
    if isinstance(answer, IdentErrorAnswer):
        return head + b"ERROR" + sep + answer.error.encode("ascii") + b"\r\n"
    if not answer.userid or any(byte in answer.userid for byte in b"\0\r\n"):
        raise ValueError(f"user-id {answer.userid!r} can't be sent")
    opsys = answer.opsys.encode("ascii")
    if answer.charset is not None:
        opsys += comma + answer.charset.encode("ascii")
    return head + b"USERID" + sep + opsys + sep + answer.userid + b"\r\n"


def _token(value: bytes, what: str, pattern: re.Pattern[bytes] = _TOKEN) -> str:
    value = value.strip(WHITESPACE)
    if pattern.fullmatch(value) is None:
        raise IdentProtocolError(f"bad {what} {value!r}")
    return value.decode("ascii")


def _port(value: bytes) -> int:
    value = value.strip(WHITESPACE)
    if _PORT.fullmatch(value) is None or int(value) > 65535:
        raise IdentProtocolError(f"bad port {value!r}")
    return int(value)


def parse_answer(line: bytes) -> Answer:
    """
    Parse one answer line without its line end.  Raises
    L{IdentProtocolError} for anything that is not an RFC 1413 answer.
    """
    fields = line.split(b":", 3)
    if len(fields) < 3:
        raise IdentProtocolError(f"not an ident answer: {line[:80]!r}")
    pair = fields[0].split(b",")
    if len(pair) != 2:
        raise IdentProtocolError(f"bad port pair {fields[0][:80]!r}")
    port_on_server, port_on_client = _port(pair[0]), _port(pair[1])
    kind = fields[1].strip(WHITESPACE).upper()
    if kind == b"ERROR":
        if len(fields) != 3:
            raise IdentProtocolError(f"bad error type {b':'.join(fields[2:])!r}")
        error = _token(fields[2], "error type")
        if error.upper() in ERROR_TYPES:
            error = error.upper()
        return IdentErrorAnswer(port_on_server, port_on_client, error)
    if kind != b"USERID":
        raise IdentProtocolError(f"unknown answer type {kind[:80]!r}")
    if len(fields) != 4:
        raise IdentProtocolError("USERID answer without a user-id")
    opsys_field = fields[2].split(b",")
    if len(opsys_field) > 2:
        raise IdentProtocolError(f"bad opsys field {fields[2][:80]!r}")
    opsys = _token(opsys_field[0], "opsys", _FIELD_TOKEN)
    charset = None
    if len(opsys_field) == 2:
        charset = _token(opsys_field[1], "charset", _FIELD_TOKEN)
    userid = fields[3].strip(WHITESPACE)
    if not userid or any(byte in userid for byte in b"\0\r"):
        raise IdentProtocolError(f"bad user-id {userid[:80]!r}")
    return IdentUser(port_on_server, port_on_client, opsys, charset, userid)


class IdentAnswerParser:
    """
    Reads one answer line from an identd, fed as the bytes arrive.

    L{feed} returns the L{Answer} once its line is complete, C{None} while
    more is needed, and raises L{IdentProtocolError} for a malformed line
    or as soon as more than L{MAX_LINE} bytes came without a line end, so
    that at most that much is ever buffered.  Bytes after the line are
    ignored: one query gets one answer.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._answer: Answer | None = None
        self._error: str | None = None

    @property
    def buffered(self) -> int:
        """How many bytes of an incomplete line have arrived."""
        return len(self._buffer)

    def feed(self, data: bytes) -> Answer | None:
        if self._answer is not None:
            return self._answer
        if self._error is not None:
            raise IdentProtocolError(self._error)
        start = len(self._buffer)
        self._buffer += data
        end = self._buffer.find(b"\n", start)
        if end == -1 and len(self._buffer) <= MAX_LINE:
            return None
        buffer, self._buffer = self._buffer, b""
        try:
            if end == -1 or end > MAX_LINE:
                raise IdentProtocolError(f"no line end within {MAX_LINE} bytes")
            self._answer = parse_answer(buffer[:end].removesuffix(b"\r"))
        except IdentProtocolError as error:
            self._error = str(error)
            raise
        return self._answer


def check_ports(answer: Answer, port_on_server: int, port_on_client: int) -> None:
    """
    Raise L{IdentPortMismatch} unless C{answer} echoes the queried port
    pair: an answer about another connection answers nothing we asked.
    """
    answered = (answer.port_on_server, answer.port_on_client)
    asked = (port_on_server, port_on_client)
    if answered != asked:
        raise IdentPortMismatch(answered, asked)


def userid_matches(answer_userid: bytes, request_userid: bytes) -> bool:
    """
    Whether identd's user-id is the client's USERID: byte for byte, after
    stripping white space around the answer's.  An empty USERID names
    nobody, so it matches no user.
    """
    return bool(request_userid) and answer_userid.strip(WHITESPACE) == request_userid
