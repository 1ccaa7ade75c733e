"""
Tests for L{socks4tx.ident}: every outcome of a lookup against the scripted
fake identd on the real reactor, and the timer and connection bookkeeping
on L{MemoryReactorClock}.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import pytest
from identd import (
    FakeIdentd,
    Query,
    close,
    error,
    flood,
    garbage,
    line,
    silent,
    unused_port,
    user,
    wrong_ports,
)
from twisted.internet import defer, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.error import (
    ConnectBindError,
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    TimeoutError,
)
from twisted.internet.interfaces import IProtocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from socks4tx.ident import (
    CLOSED,
    IDENT_PORT,
    MALFORMED,
    PORT_MISMATCH,
    REFUSED,
    TIMEOUT,
    IdentLookupFailed,
    lookup_ident,
)
from socks4tx.identwire import IdentErrorAnswer, IdentUser

CLIENT_PORT = 50123
SERVER_PORT = 1080
QUERY = b"50123, 1080\r\n"


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Let the reactor run until C{predicate()} holds."""
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"{predicate} still false after {timeout}s")
        await task.deferLater(reactor, 0.01)


class RealReactorLookups(unittest.TestCase):
    """
    One lookup against the fake identd on 127.0.0.1.  Trial's janitor fails
    any test that leaves a connection or a timer behind.
    """

    timeout = 20

    def setUp(self) -> None:
        self.identd = FakeIdentd().start()
        self.addCleanup(self.identd.stop)

    def lookup(
        self,
        local_host: str | None = "127.0.0.1",
        *,
        timeout: float = 5.0,
        identd_port: int | None = None,
        client_host: str = "127.0.0.1",
    ) -> defer.Deferred[IdentUser]:
        return lookup_ident(
            reactor,
            client_host,
            CLIENT_PORT,
            SERVER_PORT,
            local_host,
            identd_port=self.identd.port if identd_port is None else identd_port,
            timeout=timeout,
        )

    async def failure(self, lookup: defer.Deferred[IdentUser]) -> IdentLookupFailed:
        try:
            result = await lookup
        except IdentLookupFailed as failed:
            return failed
        raise AssertionError(f"lookup succeeded: {result}")

    async def only_query(self) -> Query:
        [query] = self.identd.queries
        await until(query.client_closed.is_set)
        return query

    async def test_right_user(self) -> None:
        answer = await self.lookup()
        assert answer == IdentUser(CLIENT_PORT, SERVER_PORT, "UNIX", None, b"alice")
        query = await self.only_query()
        assert query.data == QUERY
        assert query.peer[0] == "127.0.0.1"

    async def test_answer_without_spaces(self) -> None:
        self.identd.script(user(b"root", spaced=False))
        answer = await self.lookup()
        assert answer.userid == b"root"

    async def test_other_user_is_returned_for_the_caller_to_compare(self) -> None:
        self.identd.script(user(b"mallory"))
        answer = await self.lookup()
        assert answer.userid == b"mallory"

    async def test_charset_and_userid_with_colons(self) -> None:
        self.identd.script(
            line(b"50123 , 1080 : USERID : UNIX , UTF-8 :  d:o:m\\u  \r\n")
        )
        answer = await self.lookup()
        assert (answer.charset, answer.userid) == ("UTF-8", b"d:o:m\\u")

    async def test_bound_to_the_local_address(self) -> None:
        """The query comes from the address the SOCKS client reached."""
        try:
            with socket.socket() as probe:
                probe.bind(("127.0.0.2", 0))
        except OSError:
            raise unittest.SkipTest("127.0.0.2 is not a local address here") from None
        await self.lookup(local_host="127.0.0.2")
        query = await self.only_query()
        assert query.peer[0] == "127.0.0.2"
        assert query.data == QUERY

    async def test_ipv4_mapped_addresses_are_used_as_ipv4(self) -> None:
        await self.lookup(local_host="::ffff:127.0.0.1", client_host="::ffff:127.0.0.1")
        assert (await self.only_query()).peer[0] == "127.0.0.1"

    async def test_kernel_chooses_the_source_without_local_host(self) -> None:
        await self.lookup(local_host=None)
        assert (await self.only_query()).data == QUERY

    async def test_ipv6(self) -> None:
        if not has_ipv6_loopback():
            raise unittest.SkipTest("no IPv6 loopback")
        with FakeIdentd(user(b"alice6"), host="::1") as identd6:
            answer = await self.lookup(
                local_host="::1", client_host="::1", identd_port=identd6.port
            )
            assert answer.userid == b"alice6"
            [query] = identd6.queries
            assert (query.data, query.peer[0]) == (QUERY, "::1")
            await until(query.client_closed.is_set)

    async def test_error_types(self) -> None:
        for kind in [
            "INVALID-PORT",
            "NO-USER",
            "HIDDEN-USER",
            "UNKNOWN-ERROR",
            "X-OWN",
        ]:
            for spaced in (True, False):
                self.identd.script(error(kind, spaced=spaced))
                failed = await self.failure(self.lookup())
                assert failed.outcome == f"ERROR:{kind}"
                assert failed.answer == IdentErrorAnswer(CLIENT_PORT, SERVER_PORT, kind)
        assert len(self.identd.queries) == 10
        await until(lambda: all(q.client_closed.is_set() for q in self.identd.queries))

    async def test_refused(self) -> None:
        failed = await self.failure(self.lookup(identd_port=unused_port()))
        assert failed.outcome == REFUSED
        assert "refused" in failed.detail.lower()

    async def test_unbindable_local_address_is_refused(self) -> None:
        """No connection to identd: the local address isn't ours (192.0.2.1)."""
        failed = await self.failure(self.lookup(local_host="192.0.2.1"))
        assert failed.outcome == REFUSED

    async def test_silent_until_timeout(self) -> None:
        self.identd.script(silent())
        started = reactor.seconds()
        failed = await self.failure(self.lookup(timeout=0.5))
        assert failed.outcome == TIMEOUT
        assert 0.4 < reactor.seconds() - started < 3
        query = await self.only_query()
        assert query.data == QUERY

    async def test_premature_close(self) -> None:
        self.identd.script(close())
        assert (await self.failure(self.lookup())).outcome == CLOSED

    async def test_close_within_the_answer(self) -> None:
        self.identd.script(close(b"50123, 1080 : USERID : UNIX : ali"))
        failed = await self.failure(self.lookup())
        assert failed.outcome == CLOSED
        assert "33 bytes" in failed.detail

    async def test_garbage(self) -> None:
        self.identd.script(garbage())
        assert (await self.failure(self.lookup())).outcome == MALFORMED
        await self.only_query()

    async def test_over_1000_bytes_without_line_end(self) -> None:
        self.identd.script(flood(5000))
        failed = await self.failure(self.lookup())
        assert failed.outcome == MALFORMED
        assert "1000" in failed.detail
        await self.only_query()

    async def test_1000_bytes_is_still_an_answer(self) -> None:
        head = b"50123,1080:USERID:UNIX:"
        userid = b"u" * (1000 - len(head) - 1)
        self.identd.script(line(head + userid + b"\r\n"))
        assert (await self.lookup()).userid == userid

    async def test_wrong_port_pair(self) -> None:
        self.identd.script(wrong_ports())
        failed = await self.failure(self.lookup())
        assert failed.outcome == PORT_MISMATCH
        assert "50124,1081" in failed.detail

    async def test_cancel_while_waiting_for_the_answer(self) -> None:
        self.identd.script(silent())
        lookup = self.lookup(timeout=10)
        await until(lambda: bool(self.identd.queries))
        lookup.cancel()
        with pytest.raises(defer.CancelledError):
            await lookup
        await self.only_query()

    async def test_answers_then_refusals_in_a_row(self) -> None:
        """Many lookups on one identd: nothing leaks from one into the next."""
        self.identd.script(user(b"a"), error("NO-USER"), user(b"c", spaced=False))
        first = await self.lookup()
        second = await self.failure(self.lookup())
        third = await self.lookup()
        assert (first.userid, second.outcome, third.userid) == (
            b"a",
            "ERROR:NO-USER",
            b"c",
        )


# --- bookkeeping on a memory reactor ----------------------------------------


class Memory:
    """A lookup on L{MemoryReactorClock}, driven by hand."""

    def __init__(self, local_host: str | None = "192.0.2.1", **kwargs: Any) -> None:
        self.reactor = MemoryReactorClock()
        self.client_host = kwargs.pop("client_host", "198.51.100.7")
        self.results: list[Any] = []
        self.deferred = lookup_ident(
            self.reactor,
            self.client_host,
            CLIENT_PORT,
            SERVER_PORT,
            local_host,
            **kwargs,
        )
        self.deferred.addBoth(self.results.append)
        [(_, _, self.factory, _, _)] = self.reactor.tcpClients
        [self.connector] = self.reactor.connectors
        self.transport = StringTransport()
        self.protocol: IProtocol | None = None

    def connect(self) -> IProtocol:
        protocol = self.factory.buildProtocol(IPv4Address("TCP", self.client_host, 113))
        assert protocol is not None
        protocol.makeConnection(self.transport)
        self.protocol = protocol
        return protocol

    def lose(self, reason: type[Exception] = ConnectionDone) -> None:
        assert self.protocol is not None
        self.protocol.connectionLost(Failure(reason()))

    def failed(self) -> IdentLookupFailed:
        [result] = self.results
        assert isinstance(result, Failure), result
        assert isinstance(result.value, IdentLookupFailed), result
        return result.value

    def no_timers(self) -> bool:
        return self.reactor.getDelayedCalls() == []


def test_connects_from_the_local_address_to_port_113() -> None:
    memory = Memory(timeout=7.0)
    [(host, port, _, timeout, bind)] = memory.reactor.tcpClients
    assert (host, port) == ("198.51.100.7", IDENT_PORT)
    assert timeout == 7.0
    # (MemoryReactor's annotations call bindAddress a str.)
    assert bind == ("192.0.2.1", 0)  # type: ignore[comparison-overlap]


def test_default_timeout_is_15_seconds() -> None:
    memory = Memory()
    memory.reactor.advance(14.9)
    assert memory.results == []
    memory.reactor.advance(0.1)
    assert memory.failed().outcome == TIMEOUT


@pytest.mark.parametrize(
    ("client", "local", "expected"),
    [
        ("2001:db8::7", "2001:db8::1", ("2001:db8::7", ("2001:db8::1", 0))),
        ("::ffff:198.51.100.7", "::ffff:192.0.2.1", ("198.51.100.7", ("192.0.2.1", 0))),
        ("198.51.100.7", None, ("198.51.100.7", None)),
    ],
)
def test_address_families(
    client: str, local: str | None, expected: tuple[str, object]
) -> None:
    memory = Memory(local, client_host=client)
    [(host, _, _, _, bind)] = memory.reactor.tcpClients
    assert (host, bind) == expected


def test_query_then_answer_then_result_once_closed() -> None:
    memory = Memory()
    memory.connect()
    assert memory.transport.value() == QUERY
    assert memory.protocol is not None
    memory.protocol.dataReceived(b"50123 , 1080 : USERID : UNIX : alice\r\n")
    assert memory.transport.disconnecting and not memory.transport.disconnected
    assert memory.results == []
    memory.lose()
    assert memory.results == [
        IdentUser(CLIENT_PORT, SERVER_PORT, "UNIX", None, b"alice")
    ]
    assert memory.no_timers()


def test_answer_split_byte_by_byte() -> None:
    memory = Memory()
    protocol = memory.connect()
    for byte in b"50123,1080:USERID:UNIX:alice\r\n":
        protocol.dataReceived(bytes([byte]))
    memory.lose()
    [answer] = memory.results
    assert answer.userid == b"alice"


def test_bytes_after_the_answer_are_ignored() -> None:
    memory = Memory()
    protocol = memory.connect()
    protocol.dataReceived(b"50123,1080:USERID:UNIX:alice\r\ngarbage\n" + b"x" * 2000)
    memory.lose()
    [answer] = memory.results
    assert answer.userid == b"alice"


def test_hung_close_after_the_answer_keeps_the_answer() -> None:
    memory = Memory(timeout=5.0)
    protocol = memory.connect()
    protocol.dataReceived(b"50123,1080:USERID:UNIX:alice\r\n")
    memory.reactor.advance(5.0)
    assert memory.transport.disconnected  # aborted
    memory.lose(ConnectionLost)
    [answer] = memory.results
    assert answer.userid == b"alice"
    assert memory.no_timers()


def test_timeout_while_connecting() -> None:
    memory = Memory(timeout=3.0)
    memory.reactor.advance(2.9)
    assert memory.results == []
    memory.reactor.advance(0.1)
    assert memory.failed().outcome == TIMEOUT
    assert memory.connector.stoppedConnecting
    assert memory.no_timers()
    # The connector reports its stop as a failure: already settled.
    memory.factory.clientConnectionFailed(memory.connector, Failure(TimeoutError()))
    assert len(memory.results) == 1


def test_timeout_while_waiting_for_the_answer() -> None:
    memory = Memory(timeout=3.0)
    memory.connect()
    memory.reactor.advance(3.0)
    assert memory.transport.disconnected  # aborted, not politely closed
    assert memory.results == []  # fires once the connection is gone
    memory.lose(ConnectionLost)
    assert memory.failed().outcome == TIMEOUT
    assert not memory.connector.stoppedConnecting
    assert memory.no_timers()


@pytest.mark.parametrize(
    ("reason", "outcome"),
    [
        (ConnectionRefusedError, REFUSED),
        (ConnectBindError, REFUSED),
        (TimeoutError, TIMEOUT),
    ],
)
def test_connect_failures(reason: type[Exception], outcome: str) -> None:
    memory = Memory()
    memory.factory.clientConnectionFailed(memory.connector, Failure(reason()))
    assert memory.failed().outcome == outcome
    assert memory.no_timers()


def test_cancel_while_connecting() -> None:
    memory = Memory()
    memory.deferred.cancel()
    [result] = memory.results
    assert isinstance(result, Failure) and result.check(defer.CancelledError)
    assert memory.connector.stoppedConnecting
    assert memory.no_timers()
    memory.factory.clientConnectionFailed(memory.connector, Failure(TimeoutError()))
    assert len(memory.results) == 1


def test_cancel_while_connected() -> None:
    memory = Memory()
    protocol = memory.connect()
    protocol.dataReceived(b"50123,1080:USER")
    memory.deferred.cancel()
    [result] = memory.results
    assert isinstance(result, Failure) and result.check(defer.CancelledError)
    assert memory.transport.disconnected
    assert not memory.connector.stoppedConnecting
    assert memory.no_timers()
    protocol.dataReceived(b"ID:UNIX:alice\r\n")
    memory.lose(ConnectionLost)
    assert len(memory.results) == 1


def test_cancel_after_the_answer_while_closing() -> None:
    memory = Memory()
    protocol = memory.connect()
    protocol.dataReceived(b"50123,1080:USERID:UNIX:alice\r\n")
    memory.deferred.cancel()
    assert memory.transport.disconnected
    assert memory.no_timers()
    memory.lose()
    [result] = memory.results
    assert isinstance(result, Failure) and result.check(defer.CancelledError)


def test_close_before_any_byte() -> None:
    memory = Memory()
    memory.connect()
    memory.lose()
    failed = memory.failed()
    assert (failed.outcome, "after 0 bytes" in failed.detail) == (CLOSED, True)
    assert memory.no_timers()


def test_malformed_closes_at_once() -> None:
    memory = Memory()
    protocol = memory.connect()
    protocol.dataReceived(b"x" * 1001)
    assert memory.transport.disconnecting
    memory.lose()
    assert memory.failed().outcome == MALFORMED
    assert memory.no_timers()


def test_error_answer_detail_and_str() -> None:
    memory = Memory()
    protocol = memory.connect()
    protocol.dataReceived(b"50123,1080:ERROR:HIDDEN-USER\r\n")
    memory.lose()
    failed = memory.failed()
    assert failed.outcome == "ERROR:HIDDEN-USER"
    assert str(failed).startswith("ERROR:HIDDEN-USER: ")
