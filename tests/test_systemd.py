"""
Socket activation: C{--listen systemd:domain=INET:index=0} serves a
listening socket inherited as descriptor 3 (C{LISTEN_FDS}, C{LISTEN_PID}),
as systemd passes it; and the shipped unit files.
"""

from __future__ import annotations

import configparser
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from blackbox import (
    CONNECT,
    GRANTED,
    LOOPBACK,
    REPO,
    TWISTD,
    ThreadedServer,
    parse_listeners,
    recv_exact,
    socks4_request,
)

from socks4tx.tap import Options

pytestmark = pytest.mark.timeout(60)

EXAMPLES = REPO / "examples"


#: Puts the inherited socket on descriptor 3 and sets what systemd (227 and
#: newer) sets.  LISTEN_PID must be twistd's own pid, hence the exec; and
#: Twisted ignores LISTEN_FDS unless LISTEN_FDNAMES names as many sockets.
LAUNCHER = """
import os, sys
fd = int(sys.argv[1])
os.dup2(fd, 3)
os.close(fd)
os.environ.update(
    LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="socks4tx.socket"
)
os.execv(sys.argv[2], sys.argv[2:])
"""


def start_activated(listener: socket.socket, workdir: Path) -> subprocess.Popen[bytes]:
    """twistd serving C{listener}, inherited as descriptor 3."""
    fd = listener.fileno()
    argv = [
        sys.executable, "-c", LAUNCHER, str(fd),
        str(TWISTD), "-n", "--pidfile=", "socks4",
        "--listen", "systemd:domain=INET:index=0",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    with open(workdir / "twistd.out", "wb") as out:
        return subprocess.Popen(
            argv,
            cwd=workdir,
            env=env,
            pass_fds=(fd,),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def test_relays_through_an_inherited_socket(tmp_path: Path) -> None:
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(16)
    address = listener.getsockname()
    process = start_activated(listener, tmp_path)
    listener.close()  # only twistd holds it now
    log = tmp_path / "twistd.out"
    try:
        deadline = time.monotonic() + 20
        while "listening on" not in log.read_text(errors="replace"):
            assert process.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.05)
        text = log.read_text(errors="replace")
        reported = text.split("listening on", 1)[1].splitlines()[0].split(",")
        assert parse_listeners(reported) == [address]
        with ThreadedServer(lambda conn: conn.sendall(recv_exact(conn, 5))) as dest:
            sock, reply = socks4_request(
                address, CONNECT, dest.port, LOOPBACK, payload=b"hello"
            )
            with sock:
                assert reply.code == GRANTED
                assert recv_exact(sock, 5) == b"hello"
    finally:
        process.terminate()
        process.wait(15)


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((EXAMPLES / name).read_text())
    return parser


def test_socket_unit() -> None:
    socket_unit = unit("socks4tx.socket")
    assert socket_unit["Socket"]["ListenStream"]
    assert socket_unit["Socket"].get("Accept", "no") == "no"
    assert socket_unit["Socket"]["Service"] == "socks4tx.service"


@pytest.mark.usefixtures("systemd_socket")
def test_service_unit_runs_a_valid_command() -> None:
    service = unit("socks4tx.service")["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[0].endswith("twistd") and "-n" in argv and "--pidfile=" in argv
    plugin_args = argv[argv.index("socks4") + 1 :]
    assert "systemd:domain=INET:index=0" in plugin_args
    options = Options()
    rules = plugin_args.index("--rules")
    # The rules file is the administrator's: check the rest with the example.
    plugin_args[rules + 1] = str(EXAMPLES / "sockd.conf")
    options.parseOptions(plugin_args)
    # A dedicated user and the hardening a gateway at a firewall wants.
    assert service["User"] and service["User"] != "root"
    for setting in ("NoNewPrivileges", "ProtectSystem", "PrivateTmp"):
        assert service[setting]
    assert service["CapabilityBoundingSet"] == ""
    assert "143" in service["SuccessExitStatus"]  # twistd re-raises SIGTERM
    assert service["ExecReload"].endswith("-HUP $MAINPID")
