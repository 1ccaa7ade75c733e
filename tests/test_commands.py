"""
Rule commands: the pure template-to-(argv, env) step, checked with
hypothesis to keep every client value out of the command string, and the
runner on the real reactor with real /bin/sh commands: a value reaches the
command only as data, shell metacharacters in a USERID run nothing, output
and exit status are logged, and a command over its time is killed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor, task
from twisted.logger import ILogObserver, Logger, LogLevel, globalLogPublisher
from twisted.trial import unittest

from socks4tx.commands import (
    SAFE,
    SUBSTITUTIONS,
    Value,
    command_values,
    environment,
    filter_value,
    prepare,
    run_rule_command,
    script,
    service_name,
)

METACHARACTERS = [
    "$(touch /tmp/PWNED)",
    "`touch /tmp/PWNED`",
    "${IFS}",
    ";",
    "'",
    '"',
    "\n",
    "\r",
    "|",
    "&",
    ">",
    "<",
    "*",
    "?",
    "[a]",
    "\\",
    " ",
    "\t",
    "#",
    "~",
    "{}",
    "\x00",
]
HOSTILE_TEXT = st.lists(
    st.sampled_from(METACHARACTERS) | st.text(max_size=5), max_size=8
).map("".join)
HOSTILE_BYTES = HOSTILE_TEXT.map(lambda t: t.encode("utf-8", "surrogatepass")) | (
    st.binary(max_size=20)
)
#: What administrators write: every quoting context around a %X.
TEMPLATES = [
    "echo %u",
    "echo user=%u from %a",
    'echo "%u"',
    "echo '%u'",
    "finger @%A | mail -s 'SOCKS: %u@%A to %Z (%S)' root",
    'logger -t socks4tx "denied %u at %a to %z:%s"',
    "printf '%%s\\n' %U %c %p",
    "echo \\%u %% 100%%",
]


# -- the pure part --------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"alice", "alice"),
        ("alice", "alice"),
        ("a b;c$(d)`e`", "a_b_c__d__e_"),
        ("!@%-_=+:,./", "!@%-_=+:,./"),
        (b"\xc3\xa9", "__"),
        ("\xe9", "_"),
        ("\n\r\t\x00", "____"),
        (None, ""),
        (80, "80"),
    ],
)
def test_filter_value(value: Value, expected: str) -> None:
    assert filter_value(value) == expected


@given(HOSTILE_TEXT | HOSTILE_BYTES)
def test_filtered_values_are_safe(value: str | bytes) -> None:
    filtered = filter_value(value)
    assert set(filtered) <= SAFE
    assert len(filtered) == len(value)


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("echo %u", 'echo "${SOCKS4TX_u}"'),
        ("echo %ufoo", 'echo "${SOCKS4TX_u}"foo'),
        ('echo "x%uy"', 'echo "x${SOCKS4TX_u}y"'),
        ("echo 'x%uy'", "echo 'x'\"${SOCKS4TX_u}\"'y'"),
        ("echo %% %%u 100%", "echo % %u 100%"),
        ("date +%H:%M %q", "date +%H:%M %q"),
        ("echo \\%u", "echo \\%u"),
        ("echo '\\'%u", "echo '\\'\"${SOCKS4TX_u}\""),
        ("%", "%"),
        ("", ""),
    ],
)
def test_script(template: str, expected: str) -> None:
    assert script(template) == expected


def test_prepare() -> None:
    argv, env = prepare("echo %u@%a", {"u": b"alice", "a": "10.0.0.1"})
    assert argv == ["/bin/sh", "-c", 'echo "${SOCKS4TX_u}"@"${SOCKS4TX_a}"']
    assert env["SOCKS4TX_u"] == "alice"
    assert env["SOCKS4TX_a"] == "10.0.0.1"
    assert env["SOCKS4TX_U"] == ""
    assert set(env) == {f"SOCKS4TX_{letter}" for letter in SUBSTITUTIONS} | {"PATH"}


def test_unknown_substitution_value() -> None:
    with pytest.raises(ValueError):
        environment({"x": "1"})


PAYLOADS = [
    "$(touch /tmp/PWNED)",
    "`touch /tmp/PWNED`",
    "; touch /tmp/PWNED",
    "'\"; touch /tmp/PWNED; \"'",
    "\ntouch /tmp/PWNED\n",
    "|| touch /tmp/PWNED &",
]


@given(
    template=st.sampled_from(TEMPLATES),
    userid=st.tuples(HOSTILE_BYTES, st.sampled_from(PAYLOADS), HOSTILE_BYTES),
    others=st.dictionaries(st.sampled_from(sorted(SUBSTITUTIONS)), HOSTILE_TEXT),
)
def test_values_never_reach_the_command_string(
    template: str, userid: tuple[bytes, str, bytes], others: dict[str, Value]
) -> None:
    before, payload, after = userid
    values: dict[str, Value] = {**others, "u": before + payload.encode() + after}
    argv, env = prepare(template, values)
    # The command string is a function of the template alone ...
    assert argv == ["/bin/sh", "-c", script(template)]
    # ... so no payload can be in it.
    assert payload not in argv[2]
    assert "PWNED" not in argv[2]
    assert set(env) == {f"SOCKS4TX_{letter}" for letter in SUBSTITUTIONS} | {"PATH"}
    for name, value in env.items():
        if name != "PATH":
            assert set(value) <= SAFE


@settings(max_examples=40, deadline=None)
@given(
    quoting=st.sampled_from(["%s", '"%s"', "'%s'", 'x"y%sz"w', "'a'%s'b'"]),
    userid=HOSTILE_BYTES,
)
def test_the_shell_sees_the_filtered_value(quoting: str, userid: bytes) -> None:
    """Whatever the quoting around %u, /bin/sh prints exactly the filtered value."""
    template = "printf '%%s\\n' " + quoting.replace("%s", "%u")
    argv, env = prepare(template, {"u": userid})
    output = subprocess.run(argv, env=env, capture_output=True, check=True).stdout
    expected = subprocess.run(
        ["/bin/sh", "-c", "printf '%s\\n' " + quoting.replace("%s", "VALUE")],
        capture_output=True,
        check=True,
    ).stdout.replace(b"VALUE", filter_value(userid).encode())
    assert output == expected


def test_command_values() -> None:
    values = command_values(
        client="10.1.2.3",
        command="connect",
        port=80,
        userid=b"alice",
        dst_ip="192.0.2.1",
        dst_host=b"example.com",
        ident_user="alice",
        pid=42,
    )
    assert values == {
        "A": "10.1.2.3",
        "a": "10.1.2.3",
        "c": "connect",
        "p": 42,
        "S": "http",
        "s": 80,
        "U": "alice",
        "u": b"alice",
        "Z": b"example.com",
        "z": "192.0.2.1",
    }
    bare = command_values(
        client=None, command="bind", port=1, userid=b"", dst_ip="192.0.2.1"
    )
    assert bare["p"] == os.getpid()
    assert bare["Z"] == "192.0.2.1"
    assert environment(bare)["SOCKS4TX_A"] == ""


@pytest.mark.parametrize(("port", "name"), [(22, "ssh"), (80, "http"), (1, "1")])
def test_service_name(port: int, name: str) -> None:
    assert service_name(port) in (name, "tcpmux")


# -- the runner on the real reactor -------------------------------------------


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Let the reactor run until C{predicate()} holds."""
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError("timed out waiting")
        await task.deferLater(reactor, 0.02)


class Runner(unittest.TestCase):
    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, self.events.append)
        self.log = Logger(namespace="socks4tx.command", observer=observer)
        # Not self.mktemp(): under pytest it would write into the source tree.
        self.dir = Path(tempfile.mkdtemp(prefix="socks4tx-commands-"))
        self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)

    def run_command(
        self,
        template: str,
        values: dict[str, Value],
        timeout: float = 10.0,
        **kwargs: Any,
    ) -> defer.Deferred[int | None]:
        return run_rule_command(reactor, template, values, timeout, self.log, **kwargs)

    def messages(self) -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(event) for event in self.events]

    @defer.inlineCallbacks
    def test_value_arrives_filtered(self) -> Any:
        out = self.dir / "out"
        values: dict[str, Value] = {"u": b"alice;rm -rf /", "a": "10.1.2.3", "s": 80}
        status = yield self.run_command(
            f"printf '%%s|%%s|%%s' %u %a %s > {out}", values
        )
        assert status == 0
        assert out.read_text() == "alice_rm_-rf_/|10.1.2.3|80"
        assert any("exited with status 0" in m for m in self.messages())

    @defer.inlineCallbacks
    def test_metacharacters_in_a_userid_run_nothing(self) -> Any:
        tmp_pwned = Path("/tmp/PWNED")
        existed = tmp_pwned.exists()
        here = self.dir
        attacks = [
            "$(touch /tmp/PWNED)",
            f"$(touch {here}/PWNED1)",
            f"`touch {here}/PWNED2`",
            f";touch {here}/PWNED3",
            f"'; touch {here}/PWNED4; '",
            f'"; touch {here}/PWNED5; "',
            f"\ntouch {here}/PWNED6",
            f"|touch {here}/PWNED7",
            f"&touch {here}/PWNED8&",
            f"${{IFS}}$(touch${{IFS}}{here}/PWNED9)",
            "$(touch PWNED10)",
        ]
        templates = [
            f"touch {here}/FILE_%u",
            f"touch '{here}/FILE_%u'",
            f'touch "{here}/FILE_%u"',
            f"echo %u | cat >> {here}/OUT",
            f"cd {here} && touch FILE_%u",
        ]
        runs = [
            self.run_command(template, {"u": attack.encode()})
            for template in templates
            for attack in attacks
        ]
        yield defer.gatherResults(runs)
        found = sorted(os.listdir(here))
        assert not [name for name in found if name.startswith("PWNED")]
        assert existed or not tmp_pwned.exists()
        # The inert value still did its job: a file named after it.
        assert "FILE___touch_PWNED10_" in found
        assert (here / "OUT").read_text().count("\n") == len(attacks)

    @defer.inlineCallbacks
    def test_output_and_status_are_logged(self) -> Any:
        status = yield self.run_command(
            "echo out %u; echo err >&2; exit 3", {"u": b"a"}
        )
        assert status == 3
        lines = {(e.get("stream"), e.get("line")) for e in self.events if "line" in e}
        assert lines == {("stdout", "out a"), ("stderr", "err")}
        assert any("exited with status 3" in m for m in self.messages())
        assert all(e["log_namespace"] == "socks4tx.command" for e in self.events)

    @defer.inlineCallbacks
    def test_default_logger_namespace(self) -> Any:
        seen: list[dict[str, Any]] = []
        observer = cast(ILogObserver, seen.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        status = yield run_rule_command(reactor, "echo hi", {}, 10)
        assert status == 0
        mine = [e for e in seen if e.get("line") == "hi"]
        assert [e["log_namespace"] for e in mine] == ["socks4tx.command"]

    @defer.inlineCallbacks
    def test_stdin_is_closed(self) -> Any:
        status = yield self.run_command("cat", {})
        assert status == 0

    @defer.inlineCallbacks
    def test_timeout_kills_the_whole_group(self) -> Any:
        started = reactor.seconds()
        # The pipeline's sleeps hold the output pipe: the result comes only
        # once every process of the group is gone.
        status = yield self.run_command("sleep 30 | sleep 30", {}, timeout=0.3)
        assert status is None
        assert reactor.seconds() - started < 5
        messages = self.messages()
        assert any("over its 0.3 s" in m for m in messages)
        assert any("killed by signal 15" in m for m in messages)
        assert any(e["log_level"] is LogLevel.warn for e in self.events)

    @defer.inlineCallbacks
    def test_sigkill_after_the_grace(self) -> Any:
        started = reactor.seconds()
        status = yield self.run_command(
            "trap '' TERM; while :; do sleep 0.1; done",
            {},
            timeout=0.3,
            kill_grace=0.3,
        )
        assert status is None
        assert 0.5 < reactor.seconds() - started < 5
        assert any("killed by signal 9" in m for m in self.messages())

    async def _cancel(self) -> None:
        running = self.run_command("sleep 30", {}, timeout=60)
        running.cancel()
        with pytest.raises(defer.CancelledError):
            await running
        await until(lambda: any("killed by signal" in m for m in self.messages()))

    def test_cancel_stops_the_command(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._cancel())

    def test_does_not_block(self) -> None:
        """run_rule_command returns before the command has run."""
        marker = self.dir / "marker"
        running = self.run_command(f"touch {marker}", {})
        assert not marker.exists()
        assert not running.called
        running.addCallback(lambda status: self.assertEqual(status, 0))
        return running  # type: ignore[return-value]
