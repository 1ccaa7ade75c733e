"""
Real SOCKS4 clients against a real C{twistd -n socks4} process: curl,
socat, and dante-client's socksify around an active-mode FTP download
(which uses BIND).  A missing tool skips its test, or fails it under
C{CI=true}.
"""

from __future__ import annotations

import functools
import http.server
import os
import subprocess
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from blackbox import LOOPBACK, ThreadedServer, TwistdProcess
from tools import missing, require_tool

pytestmark = pytest.mark.timeout(90)

#: Runs of the client programs are bounded by this (seconds).
CLIENT_TIMEOUT = 40


def client_env(**extra: str) -> dict[str, str]:
    """The environment without proxy settings that could steer the clients."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.lower().endswith("_proxy") and not key.startswith("SOCKS")
    }
    env.update(extra)
    return env


def run_client(
    argv: list[str], input: bytes | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(
        argv,
        input=input,
        capture_output=True,
        env=env if env is not None else client_env(),
        timeout=CLIENT_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, (
        f"{argv} exited with {result.returncode}\n"
        f"stderr: {result.stderr.decode(errors='replace')}"
    )
    return result


@pytest.fixture(scope="module")
def content_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("content")
    (root / "file").write_bytes(os.urandom(1 << 20))
    return root


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def http_port(content_dir: Path) -> Iterator[int]:
    """A local HTTP server on 127.0.0.1 serving C{content_dir}."""
    handler = functools.partial(QuietHandler, directory=str(content_dir))
    server = http.server.ThreadingHTTPServer((LOOPBACK, 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
    )
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(5)


# -- curl --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "host"),
    [("--socks4", LOOPBACK), ("--socks4a", "localhost")],
)
def test_curl(
    proxy: TwistdProcess,
    http_port: int,
    content_dir: Path,
    tmp_path: Path,
    option: str,
    host: str,
) -> None:
    curl = require_tool("curl")
    out = tmp_path / "out"
    run_client(
        [
            curl,
            "--silent",
            "--show-error",
            "--fail",
            "--max-time",
            "30",
            option,
            f"{proxy.host}:{proxy.port}",
            "--output",
            str(out),
            f"http://{host}:{http_port}/file",
        ]
    )
    assert out.read_bytes() == (content_dir / "file").read_bytes()


# -- socat -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "host"), [("SOCKS4", LOOPBACK), ("SOCKS4A", "localhost")]
)
def test_socat(
    proxy: TwistdProcess, echo: ThreadedServer, kind: str, host: str
) -> None:
    """socat relays stdin through the proxy to an echo server and back."""
    socat = require_tool("socat")
    data = os.urandom(1 << 20)
    result = run_client(
        [
            socat,
            "-t",
            "10",
            "-T",
            "30",
            "-",
            f"{kind}:{proxy.host}:{host}:{echo.port},socksport={proxy.port}",
        ],
        input=data,
    )
    assert len(result.stdout) == len(data)
    assert result.stdout == data


# -- socksify + active FTP (BIND) ------------------------------------------------


@pytest.fixture
def ftp_port(content_dir: Path) -> Iterator[int]:
    """A pyftpdlib server on 127.0.0.1, anonymous, read-only."""
    try:
        with warnings.catch_warnings():
            # pyftpdlib imports asyncore and asynchat (deprecated).
            warnings.simplefilter("ignore", DeprecationWarning)
            from pyftpdlib import authorizers, handlers, servers
    except ImportError:
        missing("pyftpdlib is not installed")
    authorizer = authorizers.DummyAuthorizer()
    authorizer.add_anonymous(str(content_dir))

    class Handler(handlers.FTPHandler):
        pass

    Handler.authorizer = authorizer
    Handler.banner = "socks4tx test ftpd"
    server = servers.FTPServer((LOOPBACK, 0), Handler)
    stopping = threading.Event()

    def serve() -> None:
        while not stopping.is_set():
            server.ioloop.loop(timeout=0.05, blocking=False)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.address[1]
    stopping.set()
    thread.join(5)
    server.close_all()


def test_socksify_active_ftp_uses_bind(
    start_server, ftp_port: int, content_dir: Path, tmp_path: Path
) -> None:
    """
    dante-client's socksify turns curl's active-mode data connection into a
    SOCKS4 BIND (SPEC.md, BIND).
    """
    socksify = require_tool("socksify")
    curl = require_tool("curl")
    server = start_server(json_log=True)
    conf = tmp_path / "socks.conf"
    conf.write_text(
        "route {\n"
        "  from: 0.0.0.0/0 to: 0.0.0.0/0 via: "
        f"{server.host} port = {server.port}\n"
        "  proxyprotocol: socks_v4\n"
        "  command: connect bind\n"
        "  method: none\n"
        "}\n"
    )
    out = tmp_path / "out"
    run_client(
        [
            socksify,
            curl,
            "--silent",
            "--show-error",
            "--max-time",
            "30",
            "-P",
            "-",
            "--output",
            str(out),
            f"ftp://{LOOPBACK}:{ftp_port}/file",
        ],
        env=client_env(SOCKS_AUTOADD_LANROUTES="no", SOCKS_CONF=str(conf)),
    )
    assert out.read_bytes() == (content_dir / "file").read_bytes()
    # The transfer went through the proxy: a CONNECT to the FTP server and
    # a BIND for the data connection, both granted.
    sessions = []
    for _ in range(100):
        sessions = server.session_events()
        if {e.get("command") for e in sessions} >= {"connect", "bind"}:
            break
        threading.Event().wait(0.1)
    commands = [(e.get("command"), e.get("dst_port"), e.get("reply")) for e in sessions]
    assert ("connect", ftp_port, 90) in commands, sessions
    assert any(c == "bind" and r == 90 for c, _, r in commands), sessions
