"""
Access decisions, without I/O (except reading the rules file and its
userlist files when asked to).

A policy answers one question at the start of each session: may this
source reach this destination and port, under this user-id, with this
command?  The built-in policy serves loopback clients only, so a server
started without configuration is never an open relay.  A rules file in
the reference server's sockd.conf language (SPEC.md, "The rules file")
replaces it: L{load_rules} reads one into a L{RuleSet}.

Run as C{python -m socks4tx.rules FILE [USERID SOURCE DESTINATION PORT]}
this module is the dry-run checker (see L{main}).
"""

from __future__ import annotations

import functools
import ipaddress
import operator
import re
import socket
import sys
from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from socks4tx.wire import Command

IdentMode = Literal["required", "optional", "off"]
#: The C{?=} letters of the reference language.
IDENT_MODES: dict[str, IdentMode] = {"I": "required", "i": "optional", "n": "off"}
#: The reference read lines into a 1024-byte buffer.
MAX_LINE = 1023
#: Decisions remembered per ruleset; 0 turns the cache off.
DEFAULT_CACHE_SIZE = 4096
#: A client without an IP address (a UNIX socket) is matched as this one.
LOCALHOST = 0x7F000001
PORT_OPS: dict[str, Callable[[int, int], bool]] = {
    "eq": operator.eq,
    "neq": operator.ne,
    "lt": operator.lt,
    "gt": operator.gt,
    "le": operator.le,
    "ge": operator.ge,
}
SPECIAL_LINES = {"#NO_IDENTD:": "no_identd", "#BAD_ID:": "bad_id"}


@dataclass(frozen=True)
class Decision:
    """
    @ivar permit: whether the session may go on.
    @ivar rule: what decided, for the log (C{file:line} for a rules file;
        C{None} when no rule of a rules file matched: the default deny).
    @ivar ident: the rule's C{?=} mode, or C{None} for the server default.
    @ivar command: the rule's C{: command} template, to run if enabled.
    @ivar explicit_destination: the rule names the destination explicitly
        (its destination is not the catch-all and contains it).
    """

    permit: bool
    rule: str | None = None
    ident: IdentMode | None = None
    command: str | None = None
    explicit_destination: bool = False


#: No rule matched.
DEFAULT_DENY = Decision(False, None)


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


# -- addresses as integers: what the hot path compares ----------------------


def source_key(host: str | None) -> tuple[int, int]:
    """
    C{(version, address as an int)}, the fast equivalent of
    L{source_address}; a client without an IP address counts as 127.0.0.1.
    """
    if host is not None:
        try:
            return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, host), "big")
        except (OSError, ValueError):
            pass
        try:
            packed = socket.inet_pton(socket.AF_INET6, host.split("%", 1)[0])
        except (OSError, ValueError):
            pass
        else:
            value = int.from_bytes(packed, "big")
            if value >> 32 == 0xFFFF:
                return 4, value & 0xFFFFFFFF
            return 6, value
    return 4, LOCALHOST


def destination_key(destination: str) -> int:
    """A dotted-quad IPv4 destination as an int (SOCKS4 has no other kind)."""
    try:
        return int.from_bytes(socket.inet_pton(socket.AF_INET, destination), "big")
    except OSError:
        raise ValueError(f"not an IPv4 address: {destination!r}") from None


def parse_port(text: str) -> int:
    """A port number or a TCP service name from the services database."""
    if text.isdigit():
        port = int(text)
        if port > 65535:
            raise ValueError(f"port {text} out of range")
        return port
    try:
        return socket.getservbyname(text, "tcp")
    except OSError:
        raise ValueError(f"unknown service {text!r}") from None


# -- rules ------------------------------------------------------------------


@dataclass(frozen=True)
class Network:
    """Matches an address when C{address & mask == network}."""

    version: int
    network: int
    mask: int

    @property
    def is_catch_all(self) -> bool:
        """Mask 0.0.0.0 matches anything, IPv6 and address-less clients too."""
        return self.version == 4 and self.mask == 0

    def contains(self, version: int, address: int) -> bool:
        if self.is_catch_all:
            return True
        return version == self.version and address & self.mask == self.network


@dataclass(frozen=True)
class PortTest:
    op: str
    port: int

    def __call__(self, port: int) -> bool:
        return PORT_OPS[self.op](port, self.port)


@dataclass(frozen=True)
class Rule:
    """One line of a rules file."""

    file: str
    line: int
    permit: bool
    source: Network
    destination: Network | None = None
    port: PortTest | None = None
    users: frozenset[bytes] | None = None
    ident: IdentMode | None = None
    command: str | None = None
    #: The line as written, for the dry-run checker.
    text: str = field(default="", compare=False)

    @property
    def label(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def explicit_destination(self) -> bool:
        return self.destination is not None and not self.destination.is_catch_all

    def decision(self) -> Decision:
        return Decision(
            self.permit,
            self.label,
            self.ident,
            self.command,
            self.explicit_destination,
        )

    def matches(
        self, source: str | None, destination: str, port: int, userid: bytes
    ) -> bool:
        """The plain reading of the rule, for checks: L{RuleSet} indexes it."""
        return (
            self.source.contains(*source_key(source))
            and (
                self.destination is None
                or self.destination.contains(4, destination_key(destination))
            )
            and (self.port is None or self.port(port))
            and (self.users is None or userid in self.users)
        )


class RulesError(Exception):
    """
    A rules file that can't be used.

    @ivar errors: every error, as C{(file, line, message)}; line 0 is the
        file as a whole (e.g. unreadable).
    """

    def __init__(self, errors: Sequence[tuple[str, int, str]]) -> None:
        super().__init__(errors)
        self.errors = list(errors)

    def __str__(self) -> str:
        return "\n".join(
            f"{file}:{line}: {message}" if line else f"{file}: {message}"
            for file, line, message in self.errors
        )


# -- the index ----------------------------------------------------------------


class _Intervals:
    """
    The bit sets of the rules whose intervals hold a value, by one bisect:
    the interval ends cut the line into segments, each with its bit set.
    """

    def __init__(self, intervals: Iterable[tuple[int, int, int]]) -> None:
        toggles: dict[int, int] = {}
        for start, end, bit in intervals:  # end excluded; a rule's pieces disjoint
            if start < end:
                toggles[start] = toggles.get(start, 0) ^ bit
                toggles[end] = toggles.get(end, 0) ^ bit
        self.points = sorted(toggles)
        self.bits = [0]
        for point in self.points:
            self.bits.append(self.bits[-1] ^ toggles[point])

    def __call__(self, value: int) -> int:
        return self.bits[bisect_right(self.points, value)]


def _span(net: Network) -> tuple[int, int] | None:
    """A network as an interval, if its mask is contiguous."""
    hosts = ~net.mask & ((1 << (32 if net.version == 4 else 128)) - 1)
    if hosts & (hosts + 1):
        return None
    return net.network, net.network + hosts + 1


class _Addresses:
    """The rules whose network holds an address (C{None}: any address)."""

    def __init__(self, networks: Sequence[Network | None]) -> None:
        self.anything = 0
        spans: dict[int, list[tuple[int, int, int]]] = {4: [], 6: []}
        # Non-contiguous masks (legal in the reference): mask -> net -> bits.
        tables: dict[int, dict[int, int]] = {}
        for index, net in enumerate(networks):
            bit = 1 << index
            if net is None or net.is_catch_all:
                self.anything |= bit
            elif (span := _span(net)) is not None:
                spans[net.version].append((*span, bit))
            else:
                table = tables.setdefault(net.mask, {})
                table[net.network] = table.get(net.network, 0) | bit
        self.masked = list(tables.items())
        self.v4 = _Intervals(spans[4])
        self.v6 = _Intervals(spans[6])

    def __call__(self, version: int, address: int) -> int:
        if version == 6:
            return self.anything | self.v6(address)
        bits = self.anything | self.v4(address)
        for mask, table in self.masked:
            bits |= table.get(address & mask, 0)
        return bits


def _port_spans(test: PortTest | None) -> list[tuple[int, int]]:
    """The ports a test accepts, as intervals (end excluded)."""
    top = 65536
    if test is None:
        return [(0, top)]
    port = test.port
    return {
        "eq": [(port, port + 1)],
        "neq": [(0, port), (port + 1, top)],
        "lt": [(0, port)],
        "le": [(0, port + 1)],
        "gt": [(port + 1, top)],
        "ge": [(port, top)],
    }[test.op]


class _Index:
    """
    Each request field maps to the bit set of the rules it satisfies (bit i
    = rule i), by a bisect or a dict lookup; the lowest bit of their
    intersection is the first match.  The cost grows with log(rules), not
    with the number of rules.
    """

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.sources = _Addresses([rule.source for rule in rules])
        self.destinations = _Addresses([rule.destination for rule in rules])
        self.ports = _Intervals(
            (start, end, 1 << index)
            for index, rule in enumerate(rules)
            for start, end in _port_spans(rule.port)
        )
        self.any_user = 0
        self.users: dict[bytes, int] = {}
        for index, rule in enumerate(rules):
            if rule.users is None:
                self.any_user |= 1 << index
            for user in rule.users or ():
                self.users[user] = self.users.get(user, 0) | 1 << index

    def first(
        self, source: str | None, destination: str, port: int, user: bytes
    ) -> int:
        """The index of the first matching rule, or -1."""
        target = destination_key(destination)  # raises for a non-IPv4 one
        bits = self.sources(*source_key(source))
        if bits:
            bits &= self.destinations(4, target)
        if bits:
            bits &= self.ports(port) & (self.any_user | self.users.get(user, 0))
        return (bits & -bits).bit_length() - 1


class RuleSet:
    """
    An ordered, immutable set of rules: the first rule whose fields all
    match decides; no match denies, with C{rule=None}.

    A client without an IP address (C{None} or a C{unix:...} name) is
    matched as 127.0.0.1: it is on this host, as the built-in policy
    holds, so rules for loopback clients cover it.  IPv4-mapped IPv6
    clients are matched as IPv4; a source mask of 0.0.0.0 matches every
    client.  Rules say nothing about the command (CONNECT and BIND are
    decided alike).

    Decisions are cached (bounded LRU) per ruleset; a reload makes a new
    ruleset, so the cache never needs invalidating.
    """

    __slots__ = (
        "_bad_id_command",
        "_decide",
        "_decisions",
        "_index",
        "_no_identd_command",
        "_path",
        "_rules",
    )

    def __init__(
        self,
        path: str,
        rules: Sequence[Rule],
        no_identd_command: str | None = None,
        bad_id_command: str | None = None,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        self._path = path
        self._rules = tuple(rules)
        self._no_identd_command = no_identd_command
        self._bad_id_command = bad_id_command
        self._index = _Index(self._rules)
        self._decisions = tuple(rule.decision() for rule in self._rules)
        index, decisions = self._index, self._decisions

        def uncached(
            source: str | None, destination: str, port: int, userid: bytes
        ) -> Decision:
            found = index.first(source, destination, port, userid)
            return DEFAULT_DENY if found < 0 else decisions[found]

        # A closure, not a bound method: no reference cycle through self.
        decide: Callable[[str | None, str, int, bytes], Decision] = uncached
        if cache_size > 0:
            decide = functools.lru_cache(maxsize=cache_size)(uncached)
        self._decide = decide

    @property
    def path(self) -> str:
        return self._path

    @property
    def rules(self) -> tuple[Rule, ...]:
        return self._rules

    @property
    def no_identd_command(self) -> str | None:
        """The C{#NO_IDENTD:} command: identd could not be reached."""
        return self._no_identd_command

    @property
    def bad_id_command(self) -> str | None:
        """The C{#BAD_ID:} command: identd reported another user."""
        return self._bad_id_command

    def __len__(self) -> int:
        return len(self._rules)

    def __repr__(self) -> str:
        return f"<RuleSet {self._path!r}: {len(self._rules)} rules>"

    def decide(
        self,
        source: str | None,
        destination: str,
        port: int,
        userid: bytes,
        command: Command,
    ) -> Decision:
        """
        The decision for a request.

        @raise ValueError: C{destination} is not a dotted-quad IPv4 address.
        """
        return self._decide(source, destination, port, userid)

    def deciding_rule(
        self, source: str | None, destination: str, port: int, userid: bytes
    ) -> Rule | None:
        """The rule that decides a request, or C{None} (default deny)."""
        index = self._index.first(source, destination, port, userid)
        return None if index < 0 else self._rules[index]


# -- the parser ---------------------------------------------------------------


class _LineError(Exception):
    pass


def _is_ipv6_network(token: str) -> bool:
    try:
        ipaddress.IPv6Network(token, strict=False)
    except ValueError:
        return False
    return True


def _ipv6_span(token: re.Match[str]) -> tuple[int, int] | None:
    """Where an IPv6 address or prefix stands at the start of a token."""
    start, text = token.start(), token[0]
    slash = text.find("/")
    colon = text.find(":", slash) if slash >= 0 else -1
    if colon >= 0:
        text = text[:colon]  # a ":" behind the /prefix starts the command
    if ":" in text and _is_ipv6_network(text):
        return start, start + len(text)
    return None


def _split_command(text: str) -> tuple[list[str], str | None]:
    """
    The rule's tokens and its C{: command}.  As in the reference, the
    command starts at the first C{:}, except one inside an IPv6 address
    where the source or the destination stands (our extension; SOCKS4
    has no IPv6 destinations, but the error should say so).
    """
    tokens = list(re.finditer(r"\S+", text))
    skips = []
    at = 1
    while at < len(tokens) and tokens[at][0].startswith(("?=", "*=")):
        at += 1
    for _ in ("source", "destination"):
        if at >= len(tokens):
            break
        span = _ipv6_span(tokens[at])
        if span is not None:
            skips.append(span)
        # A CIDR prefix stands alone, an address is followed by its mask.
        at += 1 if span is not None or "/" in tokens[at][0] else 2
    for match in re.finditer(":", text):
        if not any(start <= match.start() < end for start, end in skips):
            command = text[match.end() :].strip()
            return text[: match.start()].split(), command or None
    return text.split(), None


def _network(token: str, mask: str | None, role: str) -> Network:
    if mask is None:
        try:
            net = ipaddress.ip_network(token, strict=False)
        except ValueError:
            raise _LineError(f"bad {role} prefix {token!r}") from None
        if net.version == 6 and net.network_address.ipv4_mapped is not None:
            # Such clients are matched as IPv4: so must the rule be.
            raise _LineError(f"{role} prefix {token!r}: write it as IPv4")
        return Network(net.version, int(net.network_address), int(net.netmask))
    try:
        address = int(ipaddress.IPv4Address(token))
    except ValueError:
        raise _LineError(f"bad {role} address {token!r}") from None
    try:
        bits = int(ipaddress.IPv4Address(mask))
    except ValueError:
        raise _LineError(f"bad {role} mask {mask!r}") from None
    return Network(4, address & bits, bits)


def _take_network(tokens: list[str], at: int, role: str) -> tuple[Network, int]:
    token = tokens[at]
    if "/" in token:
        return _network(token, None, role), at + 1
    if ":" in token:
        raise _LineError(f"IPv6 {role} {token!r} needs a prefix length ({token}/128)")
    if at + 1 >= len(tokens) or tokens[at + 1] in PORT_OPS:
        raise _LineError(f"{role} address {token!r} needs a mask (or use CIDR)")
    return _network(token, tokens[at + 1], role), at + 2


def _userlist(value: str, read: Callable[[str], bytes]) -> frozenset[bytes]:
    users: set[bytes] = set()
    for entry in value.split(","):
        if entry.startswith("/"):
            try:
                data = read(entry)
            except OSError as error:
                raise _LineError(
                    f"can't read userlist {entry}: {error.strerror or error}"
                ) from None
            for line in data.splitlines():
                users.update(re.split(rb"[\s,]+", line.split(b"#", 1)[0]))
        else:
            users.add(entry.encode("utf-8", "surrogateescape"))
    users.discard(b"")
    return frozenset(users)


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


def _parse_rule(
    file: str, number: int, text: str, read: Callable[[str], bytes]
) -> Rule | None:
    tokens, command = _split_command(text)
    if not tokens:
        if command is not None:
            raise _LineError("a command without a rule")
        return None
    action = tokens[0]
    if action not in ("permit", "deny"):
        raise _LineError(f"unknown action {action!r} (permit or deny)")
    ident: IdentMode | None = None
    users: frozenset[bytes] | None = None
    at = 1
    while at < len(tokens) and tokens[at][:2] in ("?=", "*="):
        kind, value = tokens[at][:2], tokens[at][2:]
        if kind == "?=":
            if ident is not None:
                raise _LineError("?= given twice")
            if value not in IDENT_MODES:
                raise _LineError(f"bad ident mode ?={value} (I, i or n)")
            ident = IDENT_MODES[value]
        else:
            if users is not None:
                raise _LineError("*= given twice")
            if not value.strip(","):
                raise _LineError("empty userlist")
            users = _userlist(value, read)
        at += 1
    if at >= len(tokens):
        raise _LineError("missing source address")
    source, at = _take_network(tokens, at, "source")
    destination = None
    if at < len(tokens) and tokens[at] not in PORT_OPS:
        destination, at = _take_network(tokens, at, "destination")
        if destination.version != 4:
            raise _LineError("destinations are IPv4 only (SOCKS4)")
    port = None
    if at < len(tokens):
        op = tokens[at]
        if at + 1 >= len(tokens):
            raise _LineError(f"{op} needs a port")
        try:
            port = PortTest(op, parse_port(tokens[at + 1]))
        except ValueError as error:
            raise _LineError(str(error)) from None
        at += 2
    if at < len(tokens):
        raise _LineError(f"unexpected {' '.join(tokens[at:])!r}")
    return Rule(
        file,
        number,
        action == "permit",
        source,
        destination,
        port,
        users,
        ident,
        command,
        text.strip(),
    )


def parse_rules(
    text: str,
    name: str = "<rules>",
    *,
    cache_size: int = DEFAULT_CACHE_SIZE,
    read_file: Callable[[str], bytes] = _read_bytes,
) -> RuleSet:
    """
    Parse rules text; userlist files are read now, through C{read_file}.

    @param name: the file name used in rule labels and errors.
    @raise RulesError: with every error of every line.
    """
    errors: list[tuple[str, int, str]] = []
    rules: list[Rule] = []
    special: dict[str, str | None] = {"no_identd": None, "bad_id": None}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip("\r")
        if len(line) > MAX_LINE:
            errors.append((name, number, f"line longer than {MAX_LINE} characters"))
            continue
        stripped = line.lstrip()
        prefix = next((p for p in SPECIAL_LINES if stripped.startswith(p)), None)
        if prefix is not None:
            # Later lines override earlier ones, as in the reference.
            special[SPECIAL_LINES[prefix]] = stripped[len(prefix) :].strip() or None
            continue
        try:
            rule = _parse_rule(name, number, line.split("#", 1)[0], read_file)
        except _LineError as error:
            errors.append((name, number, str(error)))
            continue
        if rule is not None:
            rules.append(rule)
    if errors:
        raise RulesError(errors)
    return RuleSet(
        name, rules, special["no_identd"], special["bad_id"], cache_size=cache_size
    )


def load_rules(path: str, *, cache_size: int = DEFAULT_CACHE_SIZE) -> RuleSet:
    """
    Read and parse a rules file (and its userlist files).

    @raise RulesError: the file can't be read or has errors (all of them).
    """
    try:
        data = _read_bytes(path)
    except OSError as error:
        raise RulesError(
            [(path, 0, f"can't read: {error.strerror or error}")]
        ) from None
    # Userids are bytes: keep every byte of the file through the decoding.
    text = data.decode("utf-8", "surrogateescape")
    return parse_rules(text, path, cache_size=cache_size)


# -- the dry-run checker ------------------------------------------------------

USAGE = """\
usage: python -m socks4tx.rules FILE [USERID SOURCE DESTINATION PORT]

Check a rules file; with a request, print the line that decides it.
SOURCE is the client's IP address (or "unix" for a UNIX-socket client),
DESTINATION an IPv4 address or a host name, PORT a number or service name.
Exit status: 0 permit (or the file is fine), 1 deny, 2 errors."""


def _describe(rule: Rule | None, path: str) -> str:
    if rule is None:
        return f"{path}: no rule matches: deny (the default)"
    action = "permit" if rule.permit else "deny"
    ident = rule.ident or "server default"
    text = f"{rule.label}: {action}, ident {ident}"
    if rule.explicit_destination:
        text += ", destination named explicitly"
    return f"{text}\n  {rule.text}"


def _destination(text: str) -> str:
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        pass
    try:
        ipaddress.IPv6Address(text.split("%", 1)[0])
    except ValueError:
        pass
    else:
        raise ValueError(f"{text!r}: SOCKS4 destinations are IPv4 addresses")
    try:
        found = socket.getaddrinfo(text, None, socket.AF_INET, socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise ValueError(f"can't resolve {text!r}") from None
    return str(found[0][4][0])


def main(argv: Sequence[str]) -> int:
    """The dry-run checker; returns the exit status."""
    if list(argv[:1]) in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    if len(argv) not in (1, 5):
        print(USAGE, file=sys.stderr)
        return 2
    path = argv[0]
    try:
        rules = load_rules(path, cache_size=0)
    except RulesError as error:
        print(error, file=sys.stderr)
        count = len(error.errors)
        print(f"{path}: {count} error{'s' * (count != 1)}", file=sys.stderr)
        return 2
    if len(argv) == 1:
        print(f"{path}: OK, {len(rules)} rule{'s' * (len(rules) != 1)}")
        if not len(rules):
            print(f"{path}: no rules: every session will be denied")
        return 0
    user, source, destination, port_text = argv[1:]
    try:
        if source == "unix" or source.startswith("unix:"):
            client: str | None = None
        elif source_address(source) is None:
            raise ValueError(f"bad source address {source!r}")
        else:
            client = source
        target = _destination(destination)
        port = parse_port(port_text)
    except ValueError as error:
        print(f"{error}\n{USAGE}", file=sys.stderr)
        return 2
    userid = user.encode("utf-8", "surrogateescape")
    rule = rules.deciding_rule(client, target, port, userid)
    print(_describe(rule, path))
    return 0 if rule is not None and rule.permit else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
