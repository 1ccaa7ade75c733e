"""
Installation from a clean virtualenv: ``pip install .`` (not editable)
makes ``twistd --help`` list socks4, and ``twistd -n socks4`` serves on
127.0.0.1:1080 with no options (checked in a private network namespace,
where port 1080 is surely free).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import venv
from pathlib import Path

import pytest
from blackbox import (
    TWISTD,
    ThreadedServer,
    TwistdProcess,
    recv_exact,
    socks4_request,
)
from tools import missing, require_tool

ROOT = Path(__file__).resolve().parent.parent
CHECK = Path(__file__).resolve().parent / "packaging_check.py"


def _copy_tracked_tree(destination: Path) -> None:
    """The files a clean clone would have (tracked or new, not ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for name in filter(None, listed):
        source = ROOT / os.fsdecode(name)
        if source.is_file():
            target = destination / os.fsdecode(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with socks4tx installed from a copy of the tree."""
    base = tmp_path_factory.mktemp("packaging")
    source = base / "src"
    _copy_tracked_tree(source)
    environment = base / "venv"
    venv.create(environment, with_pip=True)
    subprocess.run(
        [environment / "bin" / "python", "-m", "pip", "install", "-q", str(source)],
        check=True,
        timeout=600,
    )
    return environment


@pytest.mark.timeout(900)
def test_twistd_lists_socks4(installed: Path) -> None:
    result = subprocess.run(
        [installed / "bin" / "twistd", "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert "socks4" in result.stdout
    assert "SOCKS4/SOCKS4A proxy server" in result.stdout


@pytest.mark.timeout(900)
def test_client_endpoint_plugin_installed(installed: Path) -> None:
    """The socks4: prefix of clientFromString comes with the package."""
    program = (
        "from twisted.internet import reactor\n"
        "from twisted.internet.endpoints import clientFromString\n"
        "print(clientFromString(reactor, "
        "r'socks4:example.com:80:proxy=tcp\\:127.0.0.1\\:1080'))\n"
    )
    result = subprocess.run(
        [installed / "bin" / "python", "-c", program],
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert result.stdout.startswith("<SOCKS4ClientEndpoint example.com:80 via ")


@pytest.mark.timeout(900)
def test_default_serves_loopback_1080(installed: Path) -> None:
    require_tool("unshare")
    require_tool("ip")
    if os.geteuid() != 0:
        missing("a private network namespace needs root")
    result = subprocess.run(
        [
            "unshare",
            "-n",
            str(installed / "bin" / "python"),
            str(CHECK),
            str(installed / "bin" / "twistd"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "reply=5a" in result.stdout or "reply=005a" in result.stdout


@pytest.mark.timeout(60)
def test_tac_file_relays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, echo: ThreadedServer
) -> None:
    """``twistd -ny examples/socks4.tac`` serves like the plugin."""
    monkeypatch.setenv("SOCKS4TX_OPTIONS", "--listen tcp:0:interface=127.0.0.1")
    server = TwistdProcess(["-y", str(ROOT / "examples" / "socks4.tac")], tmp_path)
    try:
        sock, reply = socks4_request(
            server.address, 1, echo.port, "127.0.0.1", payload=b"hello"
        )
        with sock:
            assert reply.code == 90
            assert recv_exact(sock, 5) == b"hello"
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (
            ["-y", str(ROOT / "examples" / "socks4.tac")],
            {"SOCKS4TX_OPTIONS": "--handshake-timeout 0"},
            "SOCKS4TX_OPTIONS: --handshake-timeout: must be more than 0 seconds",
        ),
        (
            ["--logger=socks4tx.logs.json_observer", "socks4"],
            {"SOCKS4TX_LOG_JSON": "/nonexistent/sessions.jsonl"},
            "SOCKS4TX_LOG_JSON: cannot open /nonexistent/sessions.jsonl",
        ),
        (
            ["socks4", "--listen", "tcp:99999"],
            {},
            "--listen 'tcp:99999': port 99999 is not from 0 to 65535",
        ),
        (
            ["socks4", "--metrics", "bogus:1"],
            {},
            "--metrics 'bogus:1': Unknown endpoint type: 'bogus'",
        ),
    ],
)
def test_start_up_mistakes_are_one_line_errors(
    argv: list[str], env: dict[str, str], message: str
) -> None:
    """What an administrator gets wrong is said plainly, without a traceback."""
    result = subprocess.run(
        [TWISTD, "-n", "--pidfile=", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
    )
    output = result.stdout + result.stderr  # twistd prints usage errors to stdout
    assert result.returncode != 0
    assert message in output, output
    assert "Traceback" not in output
