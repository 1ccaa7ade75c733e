"""
Fixtures for the black-box tests: real C{twistd socks4} processes.

C{start_server(*args, json_log=False)} starts one with extra options and
stops it at teardown; C{socks4_server} is one shared by a test module, with
the default options (and a short resolve timeout).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from blackbox import RELAYS, ThreadedServer, TwistdProcess, echo_handler, socks4_args

StartServer = Callable[..., TwistdProcess]


def _stop(server: TwistdProcess) -> None:
    alive = server.process.poll() is None
    server.stop()
    if not alive:
        pytest.fail(
            f"twistd died during the test (status {server.process.returncode})\n"
            f"--- output ---\n{server.output()}",
            pytrace=False,
        )
    errors = server.unhandled_errors()
    if errors:
        pytest.fail(
            "an exception escaped into the reactor:\n" + "\n".join(errors),
            pytrace=False,
        )


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[StartServer]:
    """
    A factory: C{start_server("--handshake-timeout", "1")} runs
    C{twistd -n --pidfile= socks4 --listen tcp:0:interface=127.0.0.1 ...}
    and returns the running L{TwistdProcess}.  C{json_log=True} also writes
    the log as JSON lines, for L{TwistdProcess.log_events}.
    """
    servers: list[TwistdProcess] = []

    def start(*extra: str, json_log: bool = False) -> TwistdProcess:
        workdir = tmp_path / f"server{len(servers)}"
        workdir.mkdir()
        server = TwistdProcess(socks4_args(*extra), workdir, json_log=json_log)
        servers.append(server)
        return server

    yield start
    for server in servers:
        _stop(server)


@pytest.fixture(scope="module", params=RELAYS)
def socks4_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TwistdProcess]:
    """
    One server with default options shared by a module's tests, once with
    each relay.
    """
    workdir = tmp_path_factory.mktemp("socks4")
    server = TwistdProcess(
        socks4_args("--resolve-timeout", "2", "--relay", request.param), workdir
    )
    yield server
    _stop(server)


@pytest.fixture
def echo() -> Iterator[ThreadedServer]:
    """An echo server on 127.0.0.1."""
    with ThreadedServer(echo_handler) as server:
        yield server


@pytest.fixture
def proxy(socks4_server: TwistdProcess) -> Iterator[TwistdProcess]:
    """The shared server, checked to be still alive after the test."""
    yield socks4_server
    socks4_server.assert_alive()


@pytest.fixture
def systemd_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    As if systemd had passed one socket (index 0) to this process.  Twisted
    reads LISTEN_FDS when twisted.internet.endpoints is imported, so setting
    the environment now would be too late: its parser's copy is replaced.
    """
    from twisted.internet.endpoints import _SystemdParser
    from twisted.python.systemd import ListenFDs

    monkeypatch.setattr(
        _SystemdParser, "_sddaemon", ListenFDs([3], ("socks4tx.socket",))
    )
