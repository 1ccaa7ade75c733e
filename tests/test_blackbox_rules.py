"""
Access rules and ident against a real ``twistd socks4``: a rules file,
SIGHUP reloads, start-up refusal of a broken file, rule commands with a
hostile USERID, a scripted identd and Debian's oidentd.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from blackbox import (
    CONNECT,
    GRANTED,
    REJECTED,
    REPO,
    TWISTD,
    ThreadedServer,
    TwistdProcess,
    recv_exact,
    socks4_args,
    socks4_request,
)
from identd import FakeIdentd, Oidentd, find_oidentd, unused_port, user

StartServer = Callable[..., TwistdProcess]
ME = pwd.getpwuid(os.getuid()).pw_name
IDENTD_UNREACHABLE = 92
IDENT_MISMATCH = 93


def reply_code(server: TwistdProcess, port: int, userid: bytes = b"alice") -> int:
    """The reply to one CONNECT to 127.0.0.1:C{port}; relays one echo if granted."""
    sock, reply = socks4_request(
        server.address, CONNECT, port, "127.0.0.1", userid, payload=b"ping"
    )
    with sock:
        if reply.code == GRANTED:
            assert recv_exact(sock, 4) == b"ping"
    return reply.code


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.timeout(60)
def test_rules_decide_and_are_logged(
    start_server: StartServer, echo: ThreadedServer, tmp_path: Path
) -> None:
    rules = tmp_path / "sockd.conf"
    rules.write_text(
        "# only the echo port\n"
        f"permit 127.0.0.1 255.255.255.255 127.0.0.1/32 eq {echo.port}\n"
        "deny 0.0.0.0 0.0.0.0\n"
    )
    server = start_server("--rules", str(rules), json_log=True)
    assert reply_code(server, echo.port) == GRANTED
    assert reply_code(server, unused_port()) == REJECTED
    wait_for(lambda: len(server.session_events()) == 2, "two session events")
    granted, denied = sorted(server.session_events(), key=lambda e: e["reply"])
    assert granted["rule"] == f"{rules}:2"
    assert (denied["reason"], denied["rule"]) == ("rule", f"{rules}:3")


@pytest.mark.timeout(60)
def test_broken_rules_file_stops_startup_listing_every_error(tmp_path: Path) -> None:
    rules = tmp_path / "broken.conf"
    rules.write_text(
        "permit 127.0.0.1 255.255.255.255\n"
        "allow 10.0.0.0/8\n"
        "permit 10.0.0.0 255.0.0.0 0.0.0.0 0.0.0.0 eq no-such-service\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [
            str(TWISTD),
            "-n",
            "--pidfile=",
            *socks4_args("--rules", str(rules)),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
        env=env,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert f"{rules}:2" in output and f"{rules}:3" in output, output
    assert "listening on" not in output


@pytest.mark.timeout(60)
def test_sighup_reloads_new_sessions_only(
    start_server: StartServer, echo: ThreadedServer, tmp_path: Path
) -> None:
    rules = tmp_path / "sockd.conf"
    rules.write_text("permit 127.0.0.0/8\n")
    server = start_server("--rules", str(rules))
    # A session that relays across the reload.
    old, reply = socks4_request(server.address, CONNECT, echo.port, "127.0.0.1")
    assert reply.code == GRANTED

    rules.write_text("deny 127.0.0.0/8\n")
    server.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "rules reloaded" in server.output(), "the reload")
    assert reply_code(server, echo.port) == REJECTED
    old.sendall(b"still here")
    assert recv_exact(old, 10) == b"still here"

    # A file that doesn't parse: reported, and the rules in force stay.
    rules.write_text("permit 127.0.0.0/8\nnonsense\n")
    server.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "not reloaded" in server.output(), "the failed reload")
    assert f"{rules}:2" in server.output()
    assert reply_code(server, echo.port) == REJECTED
    old.close()


@pytest.mark.timeout(60)
def test_sighup_without_rules_is_logged_not_fatal(
    start_server: StartServer, echo: ThreadedServer
) -> None:
    """SIGHUP's default action would kill the server (systemctl reload)."""
    server = start_server()
    server.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "no --rules file to reload" in server.output(), "the log")
    assert server.process.poll() is None
    assert reply_code(server, echo.port) == GRANTED


@pytest.mark.timeout(60)
def test_rule_commands_never_let_the_shell_parse_a_userid(
    start_server: StartServer,
    echo: ThreadedServer,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    # A short directory, so that the hostile USERID stays under 255 bytes.
    short = Path(tempfile.mkdtemp(prefix="s4-"))
    request.addfinalizer(lambda: shutil.rmtree(short))
    out = tmp_path / "command-output"
    pwned = short / "PWNED"
    rules = tmp_path / "sockd.conf"
    rules.write_text(f"permit 127.0.0.0/8 : echo %u >> {out}\n")
    server = start_server("--rules", str(rules), "--run-rule-commands")
    hostile = f"$(touch {pwned});touch {pwned}`touch {pwned}`'\"|&".encode()
    assert reply_code(server, echo.port, userid=hostile) == GRANTED
    wait_for(out.exists, "the rule command")
    wait_for(lambda: out.read_text().endswith("\n"), "the rule command's output")
    assert not pwned.exists()
    # The reference server's filter: anything but letters, digits and
    # "!@%-_=+:,./" became "_".
    assert out.read_text() == (f"__touch_{pwned}__touch_{pwned}_touch_{pwned}_____\n")


@pytest.mark.timeout(60)
def test_rule_commands_are_off_by_default(
    start_server: StartServer, echo: ThreadedServer, tmp_path: Path
) -> None:
    out = tmp_path / "command-output"
    rules = tmp_path / "sockd.conf"
    rules.write_text(f"permit 127.0.0.0/8 : touch {out}\n")
    server = start_server("--rules", str(rules))
    assert reply_code(server, echo.port) == GRANTED
    time.sleep(0.5)
    assert not out.exists()


@pytest.mark.timeout(60)
def test_scripted_identd(start_server: StartServer, echo: ThreadedServer) -> None:
    with FakeIdentd(user(b"alice")) as identd:
        server = start_server(
            "--ident", "required", "--ident-port", str(identd.port), json_log=True
        )
        assert reply_code(server, echo.port, b"alice") == GRANTED
        assert reply_code(server, echo.port, b"bob") == IDENT_MISMATCH
        query = identd.queries[0].data
    # "<client's port>, <the proxy's port>"
    assert query.endswith(f", {server.port}\r\n".encode())
    wait_for(lambda: len(server.session_events()) == 2, "two session events")
    assert sorted(e["ident"] for e in server.session_events()) == ["alice", "alice"]


@pytest.mark.timeout(60)
def test_unreachable_identd_is_92_when_required_only(
    start_server: StartServer, echo: ThreadedServer
) -> None:
    port = str(unused_port())
    required = start_server("--ident", "required", "--ident-port", port)
    assert reply_code(required, echo.port) == IDENTD_UNREACHABLE
    optional = start_server("--ident", "optional", "--ident-port", port)
    assert reply_code(optional, echo.port) == GRANTED


@pytest.mark.timeout(60)
def test_real_oidentd(
    start_server: StartServer, echo: ThreadedServer, tmp_path: Path
) -> None:
    identd = Oidentd(find_oidentd(), "127.0.0.1", tmp_path)
    try:
        server = start_server("--ident", "required", "--ident-port", str(identd.port))
        assert reply_code(server, echo.port, ME.encode()) == GRANTED
        assert reply_code(server, echo.port, b"not-" + ME.encode()) == IDENT_MISMATCH
    finally:
        identd.stop()
