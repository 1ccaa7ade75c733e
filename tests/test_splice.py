"""
The zero-copy relay: what only it can get wrong (the relay behaviour both
relays share is tested against each in test_blackbox.py).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from blackbox import (
    CONNECT,
    GRANTED,
    LOOPBACK,
    ThreadedServer,
    TwistdProcess,
    client_not_reading,
    close_with_reset,
    recv_exact,
    socks4_request,
    tcp_queues,
)

from socks4tx import splice
from socks4tx.relay import Relay
from socks4tx.server import relay_class_for

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not splice.splice_available(), reason="needs Linux splice"),
]


def fd_kinds(pid: int) -> dict[str, int]:
    """How many of the process's descriptors are sockets, pipes, others."""
    kinds = {"socket": 0, "pipe": 0, "other": 0}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{name}")
        except FileNotFoundError:
            continue
        kind = link.split(":", 1)[0]
        kinds[kind if kind in kinds else "other"] += 1
    return kinds


def test_relay_modes() -> None:
    assert relay_class_for("portable") is Relay
    assert relay_class_for("auto") is splice.SpliceRelay
    assert relay_class_for("splice") is splice.EagerSpliceRelay


def test_pipe_pool_lends_at_most_its_bound() -> None:
    pool = splice.PipePool(keep=2, max_lent=3)
    pipes = [pool.take() for _ in range(3)]
    with pytest.raises(OSError):
        pool.take()
    pool.join()
    pool.give(pipes.pop())
    pipes.append(pool.take())  # an idle one again
    for pipe in pipes:
        pool.discard(pipe)


def test_pipe_pool_lends_reuses_and_bounds() -> None:
    pool = splice.PipePool(keep=2)
    pipes = [pool.take() for _ in range(4)]
    assert pool.open == 4
    assert all(size == splice.PIPE_SIZE for _, _, size in pipes)  # as root
    read_end, write_end, _ = pipes[0]
    os.write(write_end, b"x")
    assert os.read(read_end, 1) == b"x"
    pool.join()
    for pipe in pipes:
        pool.give(pipe)
    assert pool.open == 2  # two kept, two closed
    assert pool.take() in pipes[:2]
    pool.join()
    pool.leave()
    assert pool.open == 2  # one lent, one idle: a spliced session remains
    pool.leave()
    assert pool.open == 1  # the last one left: idle pipes closed, one lent


@pytest.fixture
def splicing(start_server) -> TwistdProcess:
    return start_server("--relay", "splice", json_log=True)


@pytest.fixture
def echo_many() -> Iterator[ThreadedServer]:
    def echo(conn: socket.socket) -> None:
        conn.settimeout(30)
        while data := conn.recv(65536):
            conn.sendall(data)

    with ThreadedServer(echo) as server:
        yield server


def test_idle_sessions_hold_no_pipes(
    splicing: TwistdProcess, echo_many: ThreadedServer
) -> None:
    """
    100 sessions, each having relayed 256 KiB both ways, then idle: the
    server holds their 200 sockets and at most the pool's idle pipes, not
    a pipe per session.
    """
    before = fd_kinds(splicing.pid)
    socks = []
    try:
        for _ in range(100):
            sock, reply = socks4_request(
                splicing.address, CONNECT, echo_many.port, LOOPBACK
            )
            socks.append(sock)
            assert reply.code == GRANTED
            sock.sendall(b"p" * 262144)
            assert recv_exact(sock, 262144) == b"p" * 262144
        time.sleep(0.3)
        held = fd_kinds(splicing.pid)
        assert held["socket"] - before["socket"] == 200, held
        assert held["pipe"] - before["pipe"] <= 2 * 4, held
    finally:
        for sock in socks:
            sock.close()
    sessions = [
        event for event in splicing.session_events() if event["reason"] == "relayed"
    ]
    deadline = time.monotonic() + 10
    while len(sessions) < 100 and time.monotonic() < deadline:
        time.sleep(0.05)
        sessions = [e for e in splicing.session_events() if e["reason"] == "relayed"]
    assert len(sessions) == 100
    assert {e["relay"] for e in sessions} == {"splice"}
    assert {(e["bytes_up"], e["bytes_down"]) for e in sessions} == {(262144, 262144)}


def test_idle_timeout_closes_a_spliced_session(start_server) -> None:
    server = start_server("--relay", "splice", "--idle-timeout", "1", json_log=True)

    def quiet(conn: socket.socket) -> bytes:
        conn.settimeout(10)
        data = recv_exact(conn, 5)
        conn.sendall(b"world")
        with contextlib.suppress(ConnectionResetError):
            conn.recv(1)  # until the proxy closes (an abort: a reset)
        return data

    with ThreadedServer(quiet) as dest:
        sock, reply = socks4_request(server.address, CONNECT, dest.port, LOOPBACK)
        with sock:
            assert reply.code == GRANTED
            client_port = sock.getsockname()[1]
            sock.sendall(b"hello")
            assert recv_exact(sock, 5) == b"world"
            started = time.monotonic()
            sock.settimeout(10)
            # Closed (with a reset, as by the portable relay) when idle.
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(1) == b""
            elapsed = time.monotonic() - started
        assert dest.wait_results() == [b"hello"]
    assert 0.9 < elapsed < 3, elapsed
    event = server.wait_for_session(client_port)
    assert (event["reason"], event["relay"]) == ("timeout", "splice")
    assert (event["bytes_up"], event["bytes_down"]) == (5, 5)


def test_reset_by_the_destination_ends_the_session(
    splicing: TwistdProcess,
) -> None:
    """An RST from one side mid-relay closes the other and is logged."""

    def resetting(conn: socket.socket) -> None:
        conn.settimeout(10)
        recv_exact(conn, 4)
        close_with_reset(conn)

    with ThreadedServer(resetting) as dest:
        sock, reply = socks4_request(splicing.address, CONNECT, dest.port, LOOPBACK)
        with sock:
            assert reply.code == GRANTED
            client_port = sock.getsockname()[1]
            sock.sendall(b"ping")
            sock.settimeout(10)
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(1) == b""
    event = splicing.wait_for_session(client_port)
    assert event["relay"] == "splice"
    assert event["bytes_up"] == 4


def test_reset_while_both_directions_wait_is_not_an_unhandled_error(
    splicing: TwistdProcess,
) -> None:
    """
    Both peers flood and then stop reading; the destination resets.  The
    reactor then reports the destination's socket both readable (or hung
    up) and writable in one event: once the read has ended the session,
    the write must find nothing to do rather than raise into the reactor.
    """
    stop = threading.Event()

    def pump(sock: socket.socket, send: bool) -> None:
        sock.settimeout(0.2)
        with contextlib.suppress(OSError):
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    if send:
                        sock.send(b"x" * 65536)
                    elif not sock.recv(1 << 18):
                        return

    reset = threading.Event()

    def flood(conn: socket.socket) -> None:
        pump(conn, send=True)  # and never read
        reset.wait(10)
        close_with_reset(conn)

    with ThreadedServer(flood) as dest:
        sock, reply = socks4_request(splicing.address, CONNECT, dest.port, LOOPBACK)
        with sock:
            assert reply.code == GRANTED
            client_port = sock.getsockname()[1]
            pumps = [
                threading.Thread(target=pump, args=(sock, send), daemon=True)
                for send in (True, False)
            ]
            for thread in pumps:
                thread.start()
            time.sleep(1.0)
            stop.set()  # everybody stops reading and writing
            for thread in pumps:
                thread.join(5)
            time.sleep(0.25)
            reset.set()
            event = splicing.wait_for_session(client_port)
    assert event["relay"] == "splice"
    time.sleep(0.3)
    errors = [
        e["log_text"]
        for e in splicing.log_events()
        if e.get("log_level") in ("error", "critical")
    ]
    assert errors == []


class TakeOverWaits:
    """
    A destination that trickles bytes (reads too small to count as bulk)
    for a second to a client that doesn't read, until Twisted holds some
    for the client; then it reads what the client sends and notes when
    bytes arrive.  Bulk from the client then starts the take-over, which
    must wait for Twisted's buffer for the client to drain (and gives up
    after ~1 s: the client never reads).
    """

    def __init__(self) -> None:
        self.sent = 0
        self.ports = (0, 0)
        self.trickled = threading.Event()
        self.arrivals: list[tuple[float, int]] = []

    def __call__(self, conn: socket.socket) -> None:
        self.ports = conn.getsockname()[1], conn.getpeername()[1]
        conn.settimeout(10)
        end = time.monotonic() + 1
        while time.monotonic() < end:
            self.sent += conn.send(b"d" * 4096)
            time.sleep(0.001)
        self.trickled.set()
        with contextlib.suppress(TimeoutError):
            conn.settimeout(3)
            while data := conn.recv(1 << 16):
                self.arrivals.append((time.monotonic(), len(data)))

    def held_for_client(self, proxy_port: int, client_port: int) -> int:
        """Bytes the proxy has read for the client and not written."""
        here, outgoing = self.ports
        return self.sent - (
            tcp_queues(here, outgoing)[0]
            + tcp_queues(outgoing, here)[1]
            + tcp_queues(proxy_port, client_port)[0]
            + tcp_queues(client_port, proxy_port)[1]
        )


def waiting_take_over(
    server: TwistdProcess, dest: ThreadedServer, flow: TakeOverWaits
) -> socket.socket:
    """A session whose take-over will wait: Twisted holds bytes for it."""
    sock = client_not_reading(server, dest)
    assert flow.trickled.wait(10)
    time.sleep(0.2)
    held = flow.held_for_client(server.address[1], sock.getsockname()[1])
    assert held > 0, held
    return sock


def test_the_other_direction_flows_while_the_take_over_waits(start_server) -> None:
    """
    While the take-over waits for Twisted's buffer for the client, only the
    destination, which feeds it, goes unread: what the client sends reaches
    the destination without delay, 30 one-byte messages over 1.5 s behind
    the bulk that started the take-over.
    """
    server = start_server()  # --relay auto: spliced on bulk
    flow = TakeOverWaits()
    bulk = 65536
    with ThreadedServer(flow) as dest, waiting_take_over(server, dest, flow) as sock:
        sock.sendall(b"u" * bulk)  # the take-over begins, and waits
        sent = []
        for _ in range(30):  # 1.5 s: the take-over's wait and more
            sent.append(time.monotonic())
            sock.sendall(b"m")
            time.sleep(0.05)
        sock.shutdown(socket.SHUT_WR)
        dest.wait_results()
    arrived = []  # when each one-byte message came (behind the bulk)
    total = 0
    for when, size in flow.arrivals:
        before, total = total, total + size
        arrived += [when] * (max(total - bulk, 0) - max(before - bulk, 0))
    assert len(arrived) == 30
    delays = [came - left for left, came in zip(sent, arrived, strict=True)]
    assert max(delays) < 0.25, delays


def test_the_pool_fits_the_open_file_limit() -> None:
    pool = splice.PipePool()
    pool.fit(300)
    assert (pool.max_lent, pool.keep) == (7, 7)
    pool.fit(20000)
    assert (pool.max_lent, pool.keep) == (256, 64)
    pool.fit(30)  # no room for pipes: every read is copied
    assert (pool.max_lent, pool.keep) == (0, 0)
    with pytest.raises(OSError):
        pool.take()
