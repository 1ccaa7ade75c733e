"""
L{socks4tx.client} against another server: Debian's Dante (C{danted},
package dante-server), started for each test with a generated configuration
that listens and connects on 127.0.0.1 only.

Dante speaks SOCKS4 without the 4A extension and never sends 92 or 93, so
what is checked here is CONNECT (by address, and by name resolved here),
BIND, 91 from a rule, and that a SOCKS4A request is refused (91).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from blackbox import (
    LOOPBACK,
    ThreadedServer,
    echo_handler,
    free_port,
    stop_process,
    wait_accepting,
)
from test_client import (
    IO_TIMEOUT,
    RecorderFactory,
    rejection,
    until,
)
from tools import require_tool
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import ITCPTransport
from twisted.trial import unittest

from socks4tx.client import RequestRejected, SOCKS4ClientEndpoint, bind

#: Loopback clients may CONNECT and BIND to loopback destinations, except
#: to port {blocked}; everything else is blocked (Dante's default).
DANTE_CONF = """\
logoutput: stderr
internal: 127.0.0.1 port = {port}
external: 127.0.0.1
clientmethod: none
socksmethod: none
{users}
client pass {{ from: 127.0.0.0/8 to: 127.0.0.0/8 }}
socks block {{ from: 127.0.0.0/8 to: 127.0.0.0/8 port = {blocked} log: connect }}
socks pass {{ from: 127.0.0.0/8 to: 127.0.0.0/8 command: connect bind bindreply }}
"""
#: As root, Dante insists on knowing whom to run as.
ROOT_USERS = "user.privileged: root\nuser.unprivileged: nobody"
STARTUP_TIMEOUT = 10.0


def find_danted() -> str:
    """danted lives in /usr/sbin, which a non-root PATH may lack."""
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin"
    return shutil.which("danted", path=path) or require_tool("danted")


class Dante:
    """One C{danted} in the foreground on a free loopback port."""

    def __init__(self, executable: str, workdir: Path, blocked: int) -> None:
        self.workdir = workdir
        self.log = workdir / "danted.log"
        users = ROOT_USERS if os.geteuid() == 0 else ""
        for _ in range(5):  # another process may take the free port first
            self.port = free_port()
            config = workdir / "danted.conf"
            config.write_text(
                DANTE_CONF.format(port=self.port, blocked=blocked, users=users)
            )
            with self.log.open("wb") as log:
                self.process = subprocess.Popen(
                    [executable, "-f", str(config), "-N", "1",
                     "-p", str(workdir / "danted.pid")],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )  # fmt: skip
            if wait_accepting(self.process, (LOOPBACK, self.port), STARTUP_TIMEOUT):
                return
            self.stop()
        raise AssertionError(f"danted did not start:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.process, 10.0)


@pytest.fixture
def blocked() -> Iterator[ThreadedServer]:
    """A listening server that Dante's rules keep clients away from."""
    with ThreadedServer(echo_handler) as server:
        yield server


@pytest.fixture
def dante(tmp_path: Path, blocked: ThreadedServer) -> Iterator[Dante]:
    server = Dante(find_danted(), tmp_path, blocked.port)
    yield server
    alive = server.process.poll() is None
    server.stop()
    if not alive:
        pytest.fail(f"danted died during the test:\n{server.output()}", pytrace=False)


class AgainstDante(unittest.TestCase):
    timeout = 30

    @pytest.fixture(autouse=True)
    def fixtures(
        self, dante: Dante, echo: ThreadedServer, blocked: ThreadedServer
    ) -> None:
        self.dante = dante
        self.echo = echo
        self.blocked = blocked

    def proxy(self) -> TCP4ClientEndpoint:
        return TCP4ClientEndpoint(
            reactor, LOOPBACK, self.dante.port, timeout=IO_TIMEOUT
        )

    def endpoint(self, host: str, port: int, **kwargs: Any) -> SOCKS4ClientEndpoint:
        return SOCKS4ClientEndpoint(
            host, port, self.proxy(), b"alice", reactor, timeout=IO_TIMEOUT, **kwargs
        )

    async def check_echo(self, endpoint: SOCKS4ClientEndpoint) -> None:
        factory = RecorderFactory()
        await endpoint.connect(factory)
        [app] = factory.built
        assert app.transport is not None
        assert app.transport.getPeer() == IPv4Address("TCP", LOOPBACK, self.echo.port)
        app.transport.write(b"through dante")
        await until(lambda: app.received == b"through dante")
        app.transport.loseConnection()
        await app.lost

    async def test_connect(self) -> None:
        await self.check_echo(self.endpoint(LOOPBACK, self.echo.port))

    async def test_connect_by_name_resolved_here(self) -> None:
        """Dante has no SOCKS4A: resolve_locally is how names reach it."""
        endpoint = self.endpoint("localhost", self.echo.port, resolve_locally=True)
        await self.check_echo(endpoint)

    async def test_socks4a_refused(self) -> None:
        endpoint = self.endpoint("localhost", self.echo.port)
        await rejection(endpoint.connect(RecorderFactory()), RequestRejected)

    async def test_91_blocked_port(self) -> None:
        """A rule blocks the port: 91, though something listens there."""
        endpoint = self.endpoint(LOOPBACK, self.blocked.port)
        error = await rejection(endpoint.connect(RecorderFactory()), RequestRejected)
        assert isinstance(error, RequestRejected)
        assert error.reply.code == 91
        assert self.blocked.connections == []
        await until(lambda: "block(1): tcp/connect" in self.dante.output())

    async def test_bind(self) -> None:
        factory = RecorderFactory()
        pending = await bind(
            self.proxy(), LOOPBACK, 21, factory, b"alice", reactor, timeout=IO_TIMEOUT
        )
        announced = pending.announced
        assert isinstance(announced, IPv4Address)
        assert announced.host == LOOPBACK
        far = RecorderFactory()
        await TCP4ClientEndpoint(
            reactor, announced.host, announced.port, timeout=IO_TIMEOUT
        ).connect(far)
        await pending.connected.addTimeout(IO_TIMEOUT, reactor)
        [app] = factory.built
        [application_server] = far.built
        assert application_server.transport is not None
        assert app.transport is not None
        here = ITCPTransport(application_server.transport).getHost()
        assert app.transport.getPeer() == IPv4Address("TCP", LOOPBACK, here.port)
        app.transport.write(b"to the server")
        application_server.transport.write(b"to the client")
        await until(lambda: far.built[0].received == b"to the server")
        await until(lambda: app.received == b"to the client")
        app.transport.loseConnection()
        await app.lost
        await far.built[0].lost
