"""
The built-in policy (loopback clients and UNIX sockets only), and rules
files in the sockd.conf language: parsing, every error, decisions, and the
index checked against a plain first-match scan.
"""

from __future__ import annotations

import ipaddress
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from socks4tx.rules import (
    Decision,
    LoopbackOnly,
    Network,
    Policy,
    PortTest,
    Rule,
    RulesError,
    RuleSet,
    is_local_client,
    load_rules,
    parse_rules,
    source_address,
    source_key,
)
from socks4tx.wire import Command


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", ipaddress.IPv4Address("127.0.0.1")),
        ("10.1.2.3", ipaddress.IPv4Address("10.1.2.3")),
        ("::1", ipaddress.IPv6Address("::1")),
        ("2001:db8::7", ipaddress.IPv6Address("2001:db8::7")),
        # IPv4-mapped IPv6 is matched as IPv4.
        ("::ffff:127.0.0.1", ipaddress.IPv4Address("127.0.0.1")),
        ("::ffff:10.1.2.3", ipaddress.IPv4Address("10.1.2.3")),
        # A scope id names an interface, not a different host.
        ("fe80::1%eth0", ipaddress.IPv6Address("fe80::1")),
    ],
)
def test_source_address(
    host: str, expected: ipaddress.IPv4Address | ipaddress.IPv6Address
) -> None:
    assert source_address(host) == expected


@pytest.mark.parametrize("host", [None, "unix:/run/socks.sock", "unix:", ""])
def test_source_address_without_ip(host: str | None) -> None:
    assert source_address(host) is None


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "127.255.0.9", "::1", "::ffff:127.0.0.1", None, "unix:/run/s"],
)
def test_local_clients(host: str | None) -> None:
    assert is_local_client(host)


@pytest.mark.parametrize(
    "host",
    [
        "10.1.2.3",
        "192.0.2.1",
        "0.0.0.0",
        "::",
        "::ffff:10.1.2.3",
        "2001:db8::1",
        "fe80::1%eth0",
    ],
)
def test_remote_clients(host: str) -> None:
    assert not is_local_client(host)


@pytest.mark.parametrize("command", list(Command))
def test_loopback_only_permits_local_clients_anywhere(command: Command) -> None:
    decision = LoopbackOnly().decide("127.0.0.1", "198.51.100.5", 25, b"", command)
    assert decision == Decision(True, "builtin:loopback-only")


def test_loopback_only_denies_remote_clients() -> None:
    decision = LoopbackOnly().decide(
        "::ffff:10.1.2.3", "127.0.0.1", 80, b"root", Command.CONNECT
    )
    assert decision == Decision(False, "builtin:loopback-only")


def test_loopback_only_permits_unix_socket_clients() -> None:
    decision = LoopbackOnly().decide(None, "198.51.100.5", 80, b"", Command.CONNECT)
    assert decision.permit


# -- Decision -----------------------------------------------------------------


def test_decision_positional_fields_stay_first() -> None:
    decision = Decision(True, "x")
    assert (decision.permit, decision.rule) == (True, "x")
    assert decision.ident is None
    assert decision.command is None
    assert decision.explicit_destination is False


# -- the rules file: parsing ----------------------------------------------------

CONNECT = Command.CONNECT


def parse(text: str, **kwargs: Any) -> RuleSet:
    return parse_rules(textwrap.dedent(text), "test.conf", **kwargs)


def decide(
    rules: RuleSet,
    source: str | None = "10.1.2.3",
    destination: str = "198.51.100.5",
    port: int = 80,
    userid: bytes = b"alice",
) -> Decision:
    return rules.decide(source, destination, port, userid, CONNECT)


def errors(text: str) -> list[tuple[int, str]]:
    with pytest.raises(RulesError) as raised:
        parse(text)
    return [(line, message) for _, line, message in raised.value.errors]


#: An existing reference-style file: mask pairs, both option orders,
#: service names, the two special lines, commands with and without space.
LEGACY = """\
# sockd.conf for the gateway
#NO_IDENTD: /usr/ucb/finger @%A | /usr/ucb/mail -s 'SOCKS: no identd on %A' root
#BAD_ID: /usr/ucb/finger @%A | /usr/ucb/mail -s 'SOCKS: %u claims %U' root
deny ?=I 129.1.2.3 255.255.255.255
deny 129.1.0.0 255.255.0.0 129.1.0.0 255.255.0.0
permit *=root,sysadm ?=i 129.1.0.0 255.255.0.0 eq telnet
permit ?=n *=guest 129.1.0.0 255.255.0.0 0.0.0.0 0.0.0.0 ge 1024
permit 129.1.0.0 255.255.0.0 eq 80
deny 0.0.0.0 0.0.0.0 :/usr/ucb/finger @%A | /usr/ucb/mail -s 'SOCKS: %u@%A to %Z' root
"""


def test_legacy_file_loads_unchanged() -> None:
    rules = parse(LEGACY)
    assert len(rules) == 6
    assert rules.path == "test.conf"
    assert rules.no_identd_command == (
        "/usr/ucb/finger @%A | /usr/ucb/mail -s 'SOCKS: no identd on %A' root"
    )
    assert rules.bad_id_command == (
        "/usr/ucb/finger @%A | /usr/ucb/mail -s 'SOCKS: %u claims %U' root"
    )
    assert decide(rules, "129.1.2.3") == Decision(False, "test.conf:4", "required")
    assert decide(rules, "129.1.7.7", "129.1.9.9") == Decision(
        False, "test.conf:5", explicit_destination=True
    )
    assert decide(rules, "129.1.7.7", port=23, userid=b"root") == Decision(
        True, "test.conf:6", "optional"
    )
    assert decide(rules, "129.1.7.7", port=23, userid=b"guest").rule == "test.conf:9"
    assert decide(rules, "129.1.7.7", port=8080, userid=b"guest") == Decision(
        True, "test.conf:7", "off"
    )
    assert decide(rules, "129.1.7.7", port=80, userid=b"") == Decision(
        True, "test.conf:8"
    )
    assert decide(rules, "192.0.2.1") == Decision(
        False,
        "test.conf:9",
        command="/usr/ucb/finger @%A | /usr/ucb/mail -s 'SOCKS: %u@%A to %Z' root",
    )


def test_rules_of_a_parsed_file() -> None:
    [rule] = parse("permit ?=I *=bob 10.0.0.0/8 192.0.2.0 255.255.255.0 le ssh\n").rules
    assert rule == Rule(
        "test.conf",
        1,
        True,
        Network(4, 0x0A000000, 0xFF000000),
        Network(4, 0xC0000200, 0xFFFFFF00),
        PortTest("le", 22),
        frozenset({b"bob"}),
        "required",
        None,
    )
    assert rule.label == "test.conf:1"
    assert rule.text == "permit ?=I *=bob 10.0.0.0/8 192.0.2.0 255.255.255.0 le ssh"


def test_comments_blank_lines_and_crlf() -> None:
    rules = parse("\r\n  # a comment\r\n\tpermit 10.0.0.0/8 # why\r\n\n")
    assert [rule.line for rule in rules.rules] == [3]
    assert decide(rules).permit


def test_hash_ends_a_command_too() -> None:
    [rule] = parse("permit 10.0.0.0/8 : echo %u # a note\n").rules
    assert rule.command == "echo %u"


def test_commented_out_rule() -> None:
    assert len(parse("# permit 0.0.0.0 0.0.0.0 : echo hi\n")) == 0


@pytest.mark.parametrize(
    ("text", "command"),
    [
        ("permit 10.0.0.0/8 : echo hi", "echo hi"),
        ("permit 10.0.0.0/8:echo hi", "echo hi"),
        ("permit 10.0.0.0 255.0.0.0 eq 80 :  a: b :c  ", "a: b :c"),
        ("permit ::1/128 : echo hi", "echo hi"),
        ("permit ?=I ::1/128:echo hi", "echo hi"),
        ("permit ::ffff:0:0/80 eq 22 : x", "x"),
        ("permit 10.0.0.0/8 1.0.0.0/8:x", "x"),
        ("permit 10.0.0.0 255.0.0.0 1.0.0.0 255.0.0.0: x", "x"),
        ("permit 10.0.0.0/8 :", None),
    ],
)
def test_commands(text: str, command: str | None) -> None:
    """A command starts at the first ":" outside an IPv6 source."""
    [rule] = parse(text).rules
    assert rule.command == command


@pytest.mark.parametrize(
    "text", ["permit 2001:db8::/32 2001:db8::/32", "permit 10.0.0.0/8 ::1/128:x"]
)
def test_ipv6_destinations_are_errors_not_commands(text: str) -> None:
    assert errors(text) == [(1, "destinations are IPv4 only (SOCKS4)")]


def test_special_lines_last_one_wins() -> None:
    rules = parse(
        """\
        #NO_IDENTD: one
        #NO_IDENTD: two %A
        #BAD_ID:
        permit 0.0.0.0 0.0.0.0
        """
    )
    assert rules.no_identd_command == "two %A"
    assert rules.bad_id_command is None
    assert len(rules) == 1


def test_no_special_lines() -> None:
    rules = parse("permit 0.0.0.0/0\n")
    assert rules.no_identd_command is None
    assert rules.bad_id_command is None


@pytest.mark.parametrize(
    ("test", "port", "expected"),
    [
        ("eq 80", 80, True),
        ("eq 80", 81, False),
        ("eq http", 80, True),
        ("eq www", 80, True),
        ("neq smtp", 25, False),
        ("neq smtp", 26, True),
        ("lt 1024", 1023, True),
        ("lt 1024", 1024, False),
        ("le 1024", 1024, True),
        ("le 1024", 1025, False),
        ("gt 1023", 1024, True),
        ("gt 1023", 1023, False),
        ("ge 1024", 1024, True),
        ("ge 1024", 1023, False),
        ("lt 0", 0, False),
        ("gt 65535", 65535, False),
        ("ge 0", 0, True),
        ("le 65535", 65535, True),
    ],
)
def test_port_ops(test: str, port: int, expected: bool) -> None:
    rules = parse(f"permit 0.0.0.0 0.0.0.0 {test}\n")
    assert decide(rules, port=port).permit is expected


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("10.1.2.3", True),
        ("10.255.0.1", True),
        ("11.0.0.1", False),
        ("::ffff:10.9.9.9", True),
        ("::ffff:11.9.9.9", False),
        ("::1", False),
    ],
)
@pytest.mark.parametrize(
    "network",
    ["10.0.0.0/8", "10.0.0.0 255.0.0.0", "10.7.7.7 255.0.0.0", "10.7.7.7/8"],
)
def test_source_networks(network: str, source: str, expected: bool) -> None:
    rules = parse(f"permit {network}\n")
    assert decide(rules, source).permit is expected


def test_non_contiguous_masks() -> None:
    """The reference compared (addr & mask): any mask goes."""
    rules = parse("permit 0.0.0.5 0.0.0.255 0.0.1.0 0.0.255.0\n")
    assert decide(rules, "10.1.2.5", "192.0.1.9").permit
    assert decide(rules, "172.16.0.5", "198.51.1.1").permit
    assert not decide(rules, "10.1.2.6", "192.0.1.9").permit
    assert not decide(rules, "10.1.2.5", "192.0.2.9").permit


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("::1", "test.conf:1"),
        ("2001:db8::7", "test.conf:2"),
        ("fe80::1%eth0", "test.conf:3"),
        ("2001:db9::1", "test.conf:4"),
        ("::ffff:127.0.0.1", "test.conf:5"),
        ("127.0.0.1", "test.conf:5"),
        (None, "test.conf:5"),
        ("unix:/run/socks.sock", "test.conf:5"),
        ("10.0.0.1", "test.conf:6"),
    ],
)
def test_ipv6_sources(source: str | None, expected: str) -> None:
    rules = parse(
        """\
        permit ::1/128
        permit 2001:db8::/32
        deny fe80::/10
        deny ::/0
        permit 127.0.0.0/8
        deny 0.0.0.0/0
        """
    )
    assert decide(rules, source).rule == expected


def test_catch_all_matches_every_client() -> None:
    rules = parse("permit 0.0.0.0 0.0.0.0 eq 80\n")
    for source in ["10.1.1.1", "2001:db8::1", None, "unix:/s", "::ffff:1.2.3.4"]:
        assert decide(rules, source).permit


def test_clients_without_ip_are_localhost() -> None:
    rules = parse("permit 127.0.0.1/32\n")
    assert decide(rules, None).permit
    assert decide(rules, "unix:/run/socks.sock").permit
    assert not decide(rules, "10.0.0.1").permit


def test_userlists_inline() -> None:
    rules = parse("permit *=alice,bob,,\n0.0.0.0/0\n".replace("\n0", " 0"))
    assert decide(rules, userid=b"alice").permit
    assert decide(rules, userid=b"bob").permit
    assert not decide(rules, userid=b"Alice").permit
    assert not decide(rules, userid=b"").permit
    assert not decide(rules, userid=b"alice ").permit


def test_userlist_files(tmp_path: Path) -> None:
    users = tmp_path / "staff"
    users.write_bytes(b"# staff\nalice bob,\tcarol # not dave\n\n  \xc3\xa9ric\n")
    rules = parse(f"permit *=root,{users} 0.0.0.0/0\n")
    [rule] = rules.rules
    assert rule.users == frozenset(
        {b"root", b"alice", b"bob", b"carol", b"\xc3\xa9ric"}
    )
    assert not decide(rules, userid=b"dave").permit
    assert not decide(rules, userid=b"#").permit


def test_non_ascii_userids_are_bytes(tmp_path: Path) -> None:
    path = tmp_path / "rules"
    path.write_bytes(b"permit *=\xe9ric,\xc3\xa9ric 0.0.0.0/0\n")
    rules = load_rules(str(path))
    assert decide(rules, userid=b"\xe9ric").permit
    assert decide(rules, userid=b"\xc3\xa9ric").permit
    assert not decide(rules, userid=b"eric").permit


def test_userlist_files_are_read_at_load_time(tmp_path: Path) -> None:
    users = tmp_path / "staff"
    users.write_text("alice\n")
    rules = parse(f"permit *={users} 0.0.0.0/0\n")
    users.write_text("bob\n")
    assert decide(rules, userid=b"alice").permit
    assert not decide(rules, userid=b"bob").permit
    assert decide(parse(f"permit *={users} 0.0.0.0/0\n"), userid=b"bob").permit


def test_options_in_either_order() -> None:
    one = parse("permit ?=i *=alice 0.0.0.0/0\n").rules[0]
    other = parse("permit *=alice ?=i 0.0.0.0/0\n").rules[0]
    assert (
        (one.ident, one.users)
        == (other.ident, other.users)
        == (
            "optional",
            frozenset({b"alice"}),
        )
    )


def test_first_match_wins_and_default_deny() -> None:
    rules = parse(
        """\
        deny 10.1.0.0/16
        permit 10.0.0.0/8
        permit 10.1.2.3/32
        """
    )
    assert decide(rules, "10.1.2.3") == Decision(False, "test.conf:1")
    assert decide(rules, "10.2.0.1") == Decision(True, "test.conf:2")
    assert decide(rules, "192.0.2.1") == Decision(False, None)
    assert decide(parse(""), "127.0.0.1") == Decision(False, None)


@pytest.mark.parametrize(
    ("destination", "explicit"),
    [
        ("", False),
        ("0.0.0.0 0.0.0.0", False),
        ("0.0.0.0/0", False),
        ("192.0.2.0 0.0.0.0", False),
        ("198.51.100.0/24", True),
        ("198.51.100.5 255.255.255.255", True),
    ],
)
def test_explicit_destination(destination: str, explicit: bool) -> None:
    rules = parse(f"permit 10.0.0.0/8 {destination} eq 80\n")
    decision = decide(rules, destination="198.51.100.5")
    assert decision.permit
    assert decision.explicit_destination is explicit


@pytest.mark.parametrize("command", list(Command))
def test_command_does_not_change_the_decision(command: Command) -> None:
    rules = parse("permit 10.0.0.0/8 eq 21\n")
    assert rules.decide("10.0.0.1", "192.0.2.1", 21, b"", command).permit


@pytest.mark.parametrize("text", ["permit 0.0.0.0/0\n", "permit 10.0.0.0/8\n", ""])
@pytest.mark.parametrize("bad", ["::1", "example.com", "10.1", ""])
def test_destination_must_be_ipv4(text: str, bad: str) -> None:
    with pytest.raises(ValueError):
        decide(parse(text), "192.0.2.1", destination=bad)


def test_ruleset_is_immutable() -> None:
    rules = parse("permit 0.0.0.0/0\n")
    with pytest.raises(AttributeError):
        rules.path = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        rules.something = 1  # type: ignore[attr-defined]
    assert isinstance(rules.rules, tuple)


@pytest.mark.parametrize("cache_size", [0, 1, 4096])
def test_cache_sizes_decide_alike(cache_size: int) -> None:
    rules = parse("deny 10.1.0.0/16\npermit 10.0.0.0/8\n", cache_size=cache_size)
    for _ in range(3):
        assert decide(rules, "10.1.0.1").rule == "test.conf:1"
        assert decide(rules, "10.2.0.1").rule == "test.conf:2"
        assert decide(rules, "10.2.0.1", userid=b"x").rule == "test.conf:2"


def test_ruleset_policy_protocol() -> None:
    policy: Policy = parse("permit 0.0.0.0/0\n")
    assert policy.decide("10.0.0.1", "192.0.2.1", 1, b"", CONNECT).permit


def test_the_example_file_loads() -> None:
    example = Path(__file__).parent.parent / "examples" / "sockd.conf"
    rules = load_rules(str(example))
    assert len(rules) > 5
    assert rules.no_identd_command and rules.bad_id_command

    def check(source: str, destination: str, port: int, user: bytes = b"x") -> Decision:
        return rules.decide(source, destination, port, user, CONNECT)

    assert check("127.0.0.1", "192.0.2.1", 80).permit
    assert check("::1", "192.0.2.1", 80).permit
    web = check("192.168.1.7", "93.184.216.34", 443)
    assert web.permit and web.ident == "optional"
    assert web.rule is not None and web.rule.startswith(f"{example}:")
    assert check("192.168.1.7", "10.0.0.5", 22, b"root").ident == "required"
    assert not check("192.168.1.7", "10.0.0.5", 22, b"alice").permit
    assert not check("192.168.1.7", "93.184.216.34", 25).permit
    assert check("192.168.1.7", "93.184.216.34", 25).command
    assert not check("203.0.113.9", "93.184.216.34", 80).permit


# -- the rules file: errors -----------------------------------------------------


def test_every_error_is_reported() -> None:
    text = """\
        permit 0.0.0.0 0.0.0.0
        allow 10.0.0.0/8
        permit 10.0.0.1
        permit ::1
        permit 10.0.0.0/8 eq nosuchservice
        permit ?=x 10.0.0.0/8
        permit 10.0.0.0/8 eq 80 extra
        permit 10.0.0.0/33
        permit ?=I ?=i 10.0.0.0/8
        permit *=a *=b 10.0.0.0/8
        permit *=, 10.0.0.0/8
        permit 10.0.0.0/8 ::1/128
        permit 10.0.0.0/8 eq 65536
        permit 10.0.0.0/8 eq
        permit 10.0.0.300 255.0.0.0
        permit 10.0.0.0 255.0.0.x
        permit ::ffff:10.0.0.0/104
        permit
        : echo orphan
        permit ?=I
        """
    found = errors(text)
    assert [line for line, _ in found] == list(range(2, 21))
    messages = dict(found)
    assert "unknown action 'allow'" in messages[2]
    assert "needs a mask" in messages[3]
    assert "prefix length" in messages[4]
    assert "unknown service 'nosuchservice'" in messages[5]
    assert "?=x" in messages[6]
    assert "unexpected 'extra'" in messages[7]
    assert "twice" in messages[9] and "twice" in messages[10]
    assert "empty userlist" in messages[11]
    assert "IPv4 only" in messages[12]
    assert "out of range" in messages[13]
    assert "needs a port" in messages[14]
    assert "write it as IPv4" in messages[17]
    assert "missing source" in messages[18]


def test_error_text_names_file_and_line() -> None:
    with pytest.raises(RulesError) as raised:
        parse_rules("permit 0.0.0.0/0\nallow x\nfoo\n", "/etc/sockd.conf")
    assert str(raised.value) == (
        "/etc/sockd.conf:2: unknown action 'allow' (permit or deny)\n"
        "/etc/sockd.conf:3: unknown action 'foo' (permit or deny)"
    )


def test_line_length_limit() -> None:
    padding = " " * (1023 - len("permit 0.0.0.0/0"))
    assert len(parse(f"permit 0.0.0.0/0{padding}\n")) == 1
    assert errors(f"permit 0.0.0.0/0{padding} \n") == [
        (1, "line longer than 1023 characters")
    ]


def test_unreadable_files(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(RulesError) as raised:
        load_rules(str(missing))
    assert raised.value.errors == [
        (str(missing), 0, "can't read: No such file or directory")
    ]
    assert str(raised.value) == f"{missing}: can't read: No such file or directory"
    found = errors(f"permit 0.0.0.0/0\npermit *={missing} 0.0.0.0/0\n")
    assert found == [(2, f"can't read userlist {missing}: No such file or directory")]


# -- the index agrees with a plain first-match scan ---------------------------

_SOURCES = st.sampled_from(
    [
        "0.0.0.0/0",
        "0.0.0.0 0.0.0.0",
        "10.0.0.0/8",
        "10.1.0.0/16",
        "10.1.2.0 255.255.255.0",
        "10.1.2.3/32",
        "10.0.0.3 0.0.0.255",
        "127.0.0.0/8",
        "192.168.0.0 255.255.0.0",
        "::1/128",
        "::/0",
        "2001:db8::/32",
        "2001:db8:1::/48",
    ]
)
_DESTINATIONS = st.sampled_from(
    [
        "",
        "0.0.0.0 0.0.0.0",
        "0.0.0.0/0",
        "198.51.100.0/24",
        "198.51.100.5/32",
        "198.0.0.0 255.0.0.0",
        "0.0.0.5 0.0.0.255",
        "192.0.2.0/25",
    ]
)
_PORTS = st.integers(0, 65535) | st.sampled_from([0, 1, 21, 22, 80, 1023, 1024, 65535])
_USERS = st.sampled_from([b"", b"alice", b"bob", b"root", b"\xff"])


@st.composite
def _rule_lines(draw: st.DrawFn) -> str:
    fields = [draw(st.sampled_from(["permit", "deny"]))]
    if draw(st.booleans()):
        fields.append("?=" + draw(st.sampled_from("Iin")))
    if draw(st.booleans()):
        users = draw(st.lists(st.sampled_from(["alice", "bob", "root"]), min_size=1))
        fields.append("*=" + ",".join(users))
    fields.append(draw(_SOURCES))
    fields.append(draw(_DESTINATIONS))
    if draw(st.booleans()):
        op = draw(st.sampled_from(["eq", "neq", "lt", "gt", "le", "ge"]))
        port = draw(_PORTS)
        fields += [op, str(port)]
    return " ".join(field for field in fields if field)


_CLIENTS = st.one_of(
    st.sampled_from(
        [
            "10.1.2.3",
            "10.1.2.4",
            "10.9.0.3",
            "127.0.0.1",
            "192.168.7.7",
            "8.8.8.8",
            "::1",
            "::ffff:10.1.2.3",
            "2001:db8::5",
            "2001:db8:1::5",
            "fe80::1",
            "unix:/s",
        ]
    ),
    st.none(),
    st.ip_addresses(v=4).map(str),
)
_TARGETS = st.one_of(
    st.sampled_from(["198.51.100.5", "198.51.100.6", "198.1.1.5", "192.0.2.127"]),
    st.ip_addresses(v=4).map(str),
)


@settings(max_examples=300)
@given(
    lines=st.lists(_rule_lines(), max_size=25),
    requests=st.lists(st.tuples(_CLIENTS, _TARGETS, _PORTS, _USERS), min_size=1),
)
def test_index_equals_linear_scan(
    lines: list[str], requests: list[tuple[str | None, str, int, bytes]]
) -> None:
    text = "\n".join(lines)
    cold = parse_rules(text, "r", cache_size=0)
    warm = parse_rules(text, "r", cache_size=4)
    for source, destination, port, userid in requests * 2:
        expected = next(
            (
                rule.decision()
                for rule in cold.rules
                if rule.matches(source, destination, port, userid)
            ),
            Decision(False, None),
        )
        assert cold.decide(source, destination, port, userid, CONNECT) == expected
        assert warm.decide(source, destination, port, userid, CONNECT) == expected


@given(host=st.ip_addresses().map(str) | st.text(max_size=12) | st.none())
def test_source_key_agrees_with_source_address(host: str | None) -> None:
    address = source_address(host)
    if address is None:
        assert source_key(host) == (4, 0x7F000001)
    else:
        assert source_key(host) == (address.version, int(address))
