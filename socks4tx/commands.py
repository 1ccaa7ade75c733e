"""
Rule commands (C{: command}, C{#NO_IDENTD:}, C{#BAD_ID:}).

The template is the administrator's; the values are the client's.  No
value is ever put into the command string: each C{%X} becomes the quoted
variable reference C{"${SOCKS4TX_X}"}, C{/bin/sh -c} runs the result (so
pipes and redirections in the template keep working), and the values,
filtered as the reference server did, arrive in the environment.  A
value therefore can't be parsed by the shell, whatever it contains.

L{prepare} is pure; L{run_rule_command} runs one through the reactor,
never blocking, and logs its output and exit status.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import string
import sys
from collections.abc import Mapping
from typing import Any

from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

SHELL = "/bin/sh"
#: The only variable a command inherits besides the values.
PATH = "/usr/local/bin:/usr/bin:/bin"
PREFIX = "SOCKS4TX_"
#: The substitutions of SPEC.md: letter -> what it stands for.
SUBSTITUTIONS = {
    "A": "client host name or IP",
    "a": "client IP",
    "c": "connect or bind",
    "p": "process id",
    "S": "service name or port",
    "s": "destination port",
    "U": "user identd reported",
    "u": "USERID sent",
    "Z": "destination host name or IP",
    "z": "destination IP",
}
#: The reference's filter: any other character becomes "_".
SAFE = frozenset(string.ascii_letters + string.digits + "!@%-_=+:,./")
_SAFE_BYTES = frozenset(ord(c) for c in SAFE)
#: Output lines longer than this are logged in pieces.
MAX_LOG_LINE = 4096
#: Seconds between SIGTERM and SIGKILL for a command over its time.
KILL_GRACE = 2.0

Value = str | bytes | int | None


def filter_value(value: Value) -> str:
    """
    A value with every character outside C{SAFE} replaced by C{_}.  Bytes
    are filtered byte by byte (a non-ASCII byte becomes one C{_}).
    """
    if value is None:
        return ""
    if isinstance(value, int):
        return str(value)
    if isinstance(value, bytes):
        return "".join(chr(b) if b in _SAFE_BYTES else "_" for b in value)
    return "".join(c if c in SAFE else "_" for c in value)


def _reference(letter: str, quote: str | None) -> str:
    """A variable reference that expands to exactly one word in C{quote}."""
    name = f"${{{PREFIX}{letter}}}"
    if quote == '"':
        return name
    if quote == "'":
        return f"'\"{name}\"'"  # close the single quotes around it
    return f'"{name}"'


def script(template: str) -> str:
    """
    The template with each C{%X} replaced by a quoted reference to
    C{$SOCKS4TX_X} and C{%%} by C{%}; any other C{%} stays as written
    (e.g. C{date +%H}).  The shell quoting around each C{%X} is followed,
    so C{'%u'} and C{"%u"} expand too, as a reference-era template
    expects.  Whatever the quoting, a value is only ever expanded, never
    parsed, by the shell: this function does not even see the values.
    """
    out: list[str] = []
    quote: str | None = None
    at = 0
    while at < len(template):
        char = template[at]
        pair = template[at : at + 2]
        if char == "%" and pair[1:] in SUBSTITUTIONS:
            out.append(_reference(pair[1], quote))
        elif pair == "%%":
            out.append("%")
        elif char == "\\" and quote != "'":
            out.append(pair)  # an escaped character: no quote, no %
        else:
            if quote is None and char in "'\"":
                quote = char
            elif char == quote:
                quote = None
            out.append(char)
            at += 1
            continue
        at += 2
    return "".join(out)


def environment(values: Mapping[str, Value]) -> dict[str, str]:
    """The filtered values as C{SOCKS4TX_X} variables, plus C{PATH}."""
    env = {f"{PREFIX}{letter}": "" for letter in SUBSTITUTIONS}
    for letter, value in values.items():
        if letter not in SUBSTITUTIONS:
            raise ValueError(f"unknown substitution %{letter}")
        env[f"{PREFIX}{letter}"] = filter_value(value)
    env["PATH"] = PATH
    return env


def prepare(
    template: str, values: Mapping[str, Value]
) -> tuple[list[str], dict[str, str]]:
    """
    The argv and environment that run C{template} for a session.

    @param values: letter (C{"u"}, C{"a"}, ...) -> value; a missing one is
        the empty string.
    """
    return [SHELL, "-c", script(template)], environment(values)


def service_name(port: int) -> str:
    """C{%S}: the TCP service name of a port, or the number."""
    try:
        return socket.getservbyport(port, "tcp")
    except (OSError, OverflowError):
        return str(port)


def command_values(
    *,
    client: str | None,
    command: str,
    port: int,
    userid: bytes,
    dst_ip: str,
    dst_host: str | bytes | None = None,
    client_host: str | None = None,
    ident_user: str | bytes | None = None,
    pid: int | None = None,
) -> dict[str, Value]:
    """The substitution values of a session, by letter."""
    return {
        "A": client_host or client,
        "a": client,
        "c": command,
        "p": os.getpid() if pid is None else pid,
        "S": service_name(port),
        "s": port,
        "U": ident_user,
        "u": userid,
        "Z": dst_host or dst_ip,
        "z": dst_ip,
    }


#: Makes the command a process group leader, so that a timeout can stop
#: the whole group (a pipeline, or a shell's children), then runs it.
LAUNCHER = "import os, sys; os.setsid(); os.execv(sys.argv[1], sys.argv[1:])"


def launch_argv(argv: list[str]) -> tuple[str, list[str]]:
    """The executable and argv that run C{argv} in a session of its own."""
    if not sys.executable:
        return argv[0], argv
    return sys.executable, [sys.executable, "-I", "-S", "-c", LAUNCHER, *argv]


class _CommandProtocol(protocol.ProcessProtocol):
    """Logs the command's output line by line and its end."""

    def __init__(self, log: Logger, template: str) -> None:
        self.log = log
        self.template = template
        self.ended: defer.Deferred[int | None] = defer.Deferred()
        self.timers: list[IDelayedCall] = []
        self.buffers = {1: b"", 2: b""}
        self.pid: int | None = None

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        lines = (self.buffers.get(childFD, b"") + data).split(b"\n")
        rest = lines.pop()
        while len(rest) > MAX_LOG_LINE:
            lines.append(rest[:MAX_LOG_LINE])
            rest = rest[MAX_LOG_LINE:]
        self.buffers[childFD] = rest
        for line in lines:
            self._line(childFD, line)

    def _line(self, fd: int, line: bytes) -> None:
        self.log.info(
            "rule command {pid} {stream}: {line}",
            pid=self.pid,
            stream="stdout" if fd == 1 else "stderr",
            line=line.rstrip(b"\r").decode("utf-8", "replace"),
            template=self.template,
        )

    def kill(self, name: str) -> None:
        """Signal the command's process group, or the process if none yet."""
        if self.ended.called:
            return
        if self.pid is not None:
            try:
                os.killpg(self.pid, getattr(signal, f"SIG{name}"))
                return
            except OSError:
                pass  # not yet a group leader (or already gone)
        with contextlib.suppress(error.ProcessExitedAlready):
            self.transport.signalProcess(name)  # type: ignore[union-attr]

    def processEnded(self, reason: Failure) -> None:
        for timer in self.timers:
            if timer.active():
                timer.cancel()
        for fd, rest in self.buffers.items():
            if rest:
                self._line(fd, rest)
        code: int | None = getattr(reason.value, "exitCode", None)
        signal_number: int | None = getattr(reason.value, "signal", None)
        if signal_number is not None:
            self.log.warn(
                "rule command {pid} killed by signal {signal}: {template}",
                pid=self.pid,
                signal=signal_number,
                template=self.template,
            )
        else:
            self.log.info(
                "rule command {pid} exited with status {status}: {template}",
                pid=self.pid,
                status=code,
                template=self.template,
            )
        self.ended.callback(code if signal_number is None else None)


def run_rule_command(
    reactor: Any,
    template: str,
    values: Mapping[str, Value],
    timeout: float,
    log: Logger | None = None,
    kill_grace: float = KILL_GRACE,
) -> defer.Deferred[int | None]:
    """
    Start a rule command and return at once.

    Its stdin is closed; its stdout and stderr lines and its exit status
    go to C{log}.  After C{timeout} seconds its process group gets
    SIGTERM, C{kill_grace} seconds later SIGKILL.  Cancelling the
    Deferred stops it the same way.

    @param reactor: an C{IReactorProcess} and C{IReactorTime}.
    @return: fires with the exit status, or C{None} when a signal ended the
        command or it could not be started (logged); never fails.
    """
    log = log or Logger(namespace="socks4tx.command")
    argv, env = prepare(template, values)
    executable, argv = launch_argv(argv)
    command = _CommandProtocol(log, template)

    def terminate() -> None:
        if not command.ended.called:
            command.kill("TERM")
            command.timers.append(reactor.callLater(kill_grace, command.kill, "KILL"))

    def expired() -> None:
        log.warn(
            "rule command {pid} over its {timeout} s, stopping it: {template}",
            pid=command.pid,
            timeout=timeout,
            template=template,
        )
        terminate()

    try:
        process = reactor.spawnProcess(command, executable, argv, env=env, path="/")
    except OSError:
        log.failure("rule command could not start: {template}", template=template)
        return defer.succeed(None)
    command.pid = process.pid
    process.closeStdin()
    command.timers.append(reactor.callLater(timeout, expired))
    result: defer.Deferred[int | None] = defer.Deferred(lambda _: terminate())
    command.ended.addCallback(_fire, result)
    return result


def _fire(status: int | None, result: defer.Deferred[int | None]) -> None:
    if not result.called:
        result.callback(status)


__all__ = [
    "command_values",
    "environment",
    "filter_value",
    "prepare",
    "run_rule_command",
    "script",
    "service_name",
]
