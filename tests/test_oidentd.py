"""
L{socks4tx.ident.lookup_ident} against a real identd: Debian's C{oidentd},
started in the foreground on a free loopback port for each test.

oidentd answers without blanks (C{38214,18081:USERID:UNIX:root}), so this
also proves the parser takes the compact form.  It is started with an empty
configuration file, so that neither the system's nor a user's oidentd.conf
can hide or spoof users; started as root it drops to C{nobody} by itself,
and a non-root oidentd still sees every connection through netlink.
"""

from __future__ import annotations

import os
import pwd
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from identd import Oidentd, find_oidentd, unused_port
from twisted.internet import defer, reactor
from twisted.trial import unittest

from socks4tx.ident import IdentLookupFailed, lookup_ident
from socks4tx.identwire import IdentUser

ME = pwd.getpwuid(os.getuid()).pw_name


class Connection:
    """A real TCP connection inside this process, whose owner identd knows."""

    def __init__(self, host: str) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.bind((host, 0))
        self.listener.listen(1)
        self.client = socket.create_connection(self.listener.getsockname()[:2])
        self.server, _ = self.listener.accept()
        #: What the proxy would ask: the client's source port, the port it reached.
        self.client_port: int = self.client.getsockname()[1]
        self.server_port: int = self.listener.getsockname()[1]

    def close(self) -> None:
        for sock in (self.client, self.server, self.listener):
            sock.close()


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


class OidentdLookups(unittest.TestCase):
    timeout = 30

    @pytest.fixture(autouse=True)
    def _executable(self, tmp_path: Path) -> Iterator[None]:
        self.executable = find_oidentd()
        self.workdir = tmp_path
        self.daemons: list[Oidentd] = []
        yield
        for daemon in self.daemons:
            daemon.stop()

    def start(self, host: str = "127.0.0.1") -> Oidentd:
        daemon = Oidentd(self.executable, host, self.workdir)
        self.daemons.append(daemon)
        return daemon

    def connection(self, host: str = "127.0.0.1") -> Connection:
        connection = Connection(host)
        self.addCleanup(connection.close)
        return connection

    def lookup(
        self, daemon: Oidentd, client_port: int, server_port: int
    ) -> defer.Deferred[IdentUser]:
        return lookup_ident(
            reactor,
            daemon.host,
            client_port,
            server_port,
            daemon.host,
            identd_port=daemon.port,
            timeout=10,
        )

    async def test_names_the_user_of_this_process(self) -> None:
        daemon = self.start()
        connection = self.connection()
        answer = await self.lookup(
            daemon, connection.client_port, connection.server_port
        )
        assert answer.userid == ME.encode(), daemon.output()
        assert (answer.port_on_server, answer.port_on_client) == (
            connection.client_port,
            connection.server_port,
        )
        assert answer.opsys == "UNIX"

    async def test_no_such_connection(self) -> None:
        daemon = self.start()
        connection = self.connection()
        port = unused_port()
        try:
            await self.lookup(daemon, port, connection.server_port)
        except IdentLookupFailed as failed:
            assert failed.outcome == "ERROR:NO-USER", daemon.output()
        else:
            raise AssertionError("oidentd named a user for no connection")

    async def test_ipv6(self) -> None:
        if not has_ipv6_loopback():
            raise unittest.SkipTest("no IPv6 loopback")
        daemon = self.start("::1")
        connection = self.connection("::1")
        answer = await self.lookup(
            daemon, connection.client_port, connection.server_port
        )
        assert answer.userid == ME.encode(), daemon.output()
