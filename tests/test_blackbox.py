"""
Black-box tests: a real C{twistd -n socks4} process, spoken to over
loopback sockets exactly as a client would (SPEC.md, "Replies and closes").
"""

from __future__ import annotations

import hashlib
import os
import queue
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from blackbox import (
    BIND,
    CONNECT,
    GRANTED,
    LOOPBACK,
    REJECTED,
    RELAYS,
    ThreadedServer,
    TwistdProcess,
    assert_closed,
    client_not_reading,
    close_with_reset,
    connect_to,
    free_port,
    push,
    read_reply,
    recv_exact,
    recv_sha256,
    recv_until_eof,
    request_bytes,
    socks4_request,
    tcp_queues,
)
from fakes import SESSION_FIELDS

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20


def assert_rejected(
    proxy: TwistdProcess, request: bytes, timeout: float = 10.0
) -> None:
    """C{request} gets exactly one 91 reply, then the connection closes."""
    with connect_to(proxy.address) as sock:
        sock.sendall(request)
        reply = read_reply(sock, timeout)
        assert (reply.version, reply.code) == (0, REJECTED), reply
        assert_closed(sock, timeout)


def assert_echo(sock: socket.socket, data: bytes = b"ping\n") -> None:
    sock.sendall(data)
    assert recv_exact(sock, len(data)) == data


def wait_refused(port: int, timeout: float = 5.0) -> None:
    """Bounded wait until nothing listens on 127.0.0.1:C{port}."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            probe = socket.create_connection((LOOPBACK, port), timeout=1)
        except ConnectionRefusedError:
            return
        probe.close()
        assert time.monotonic() < deadline, f"port {port} still accepts"
        time.sleep(0.05)


# -- CONNECT ---------------------------------------------------------------


def test_connect_16mib_each_way_at_once(proxy: TwistdProcess) -> None:
    """16 MiB up and 16 MiB down at the same time arrive intact."""
    size = 16 * MiB
    up, down = os.urandom(size), os.urandom(size)

    def destination(conn: socket.socket) -> str:
        conn.settimeout(60)
        with ThreadPoolExecutor(1) as pool:
            sending = pool.submit(conn.sendall, down)
            digest = recv_sha256(conn, size)
            sending.result(60)
        return digest

    with ThreadedServer(destination) as dest, ThreadPoolExecutor(1) as pool:
        sock, reply = socks4_request(proxy.address, CONNECT, dest.port, LOOPBACK)
        with sock:
            assert reply.code == GRANTED
            sock.settimeout(60)
            sending = pool.submit(sock.sendall, up)
            assert recv_sha256(sock, size) == hashlib.sha256(down).hexdigest()
            sending.result(60)
            [received] = dest.wait_results(timeout=60)
            assert received == hashlib.sha256(up).hexdigest()


@pytest.mark.parametrize(
    "request_",
    [
        request_bytes(CONNECT, 0, LOOPBACK, b"split"),
        request_bytes(CONNECT, 0, "0.0.0.1", b"split", b"localhost"),
    ],
    ids=["socks4", "socks4a"],
)
def test_request_in_one_byte_pieces(
    proxy: TwistdProcess, echo: ThreadedServer, request_: bytes
) -> None:
    request_ = request_[:2] + echo.port.to_bytes(2, "big") + request_[4:]
    with connect_to(proxy.address) as sock:
        for byte in request_:
            sock.send(bytes([byte]))
            time.sleep(0.005)
        reply = read_reply(sock)
        assert reply.code == GRANTED
        assert_echo(sock)


@pytest.mark.parametrize("same_send", [True, False], ids=["same-send", "next-send"])
def test_pipelined_bytes_reach_the_destination(
    proxy: TwistdProcess, echo: ThreadedServer, same_send: bool
) -> None:
    """
    Bytes right behind the request are relayed, even when they look like
    another request (they must never be parsed as one).
    """
    payload = (
        b"first bytes\n"
        + request_bytes(CONNECT, 1, LOOPBACK, b"not-a-request")
        + b"\x05\x01\x00"
        + b"\x00" * 1000
    )
    request = request_bytes(CONNECT, echo.port, LOOPBACK)
    with connect_to(proxy.address) as sock:
        if same_send:
            sock.sendall(request + payload)
        else:
            sock.sendall(request)
            sock.sendall(payload)
        reply = read_reply(sock)
        assert reply.code == GRANTED
        assert recv_exact(sock, len(payload)) == payload
        assert_echo(sock)


def test_client_half_close_still_gets_the_answer(proxy: TwistdProcess) -> None:
    """The client shuts down its write side; the destination's answer comes back."""

    def destination(conn: socket.socket) -> None:
        data = recv_until_eof(conn)
        answer = f"{len(data)} {hashlib.sha256(data).hexdigest()}".encode()
        conn.sendall(answer)

    data = os.urandom(300_000)
    expected = f"{len(data)} {hashlib.sha256(data).hexdigest()}".encode()
    with ThreadedServer(destination) as dest:
        sock, reply = socks4_request(proxy.address, CONNECT, dest.port, LOOPBACK)
        with sock:
            assert reply.code == GRANTED
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            assert recv_until_eof(sock) == expected
        dest.wait_results()


def test_destination_half_close_lets_the_client_send(proxy: TwistdProcess) -> None:
    """
    The destination shuts down its write side: the client reads EOF and can
    still send.
    """

    def destination(conn: socket.socket) -> bytes:
        conn.sendall(b"banner\n")
        conn.shutdown(socket.SHUT_WR)
        return recv_until_eof(conn)

    late = os.urandom(200_000)
    with ThreadedServer(destination) as dest:
        sock, reply = socks4_request(proxy.address, CONNECT, dest.port, LOOPBACK)
        with sock:
            assert reply.code == GRANTED
            assert recv_until_eof(sock) == b"banner\n"
            sock.sendall(late)
            sock.shutdown(socket.SHUT_WR)
            [received] = dest.wait_results()
            assert received == late


def test_socks4a_localhost(proxy: TwistdProcess, echo: ThreadedServer) -> None:
    sock, reply = socks4_request(
        proxy.address, CONNECT, echo.port, "0.0.0.1", b"user", b"localhost"
    )
    with sock:
        assert reply.code == GRANTED
        assert_echo(sock)


@pytest.mark.parametrize("address", ["0.0.0.1", "0.0.0.255"])
def test_socks4a_unresolvable_name(proxy: TwistdProcess, address: str) -> None:
    """The shared server runs with --resolve-timeout 2."""
    started = time.monotonic()
    assert_rejected(
        proxy, request_bytes(CONNECT, 80, address, b"", b"nonexistent.invalid")
    )
    assert time.monotonic() - started < 8


def test_connect_refused_port(proxy: TwistdProcess) -> None:
    assert_rejected(proxy, request_bytes(CONNECT, free_port(), LOOPBACK))


# -- requests that get no reply or 91 ----------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        request_bytes(CONNECT, 80, LOOPBACK, version=3),
        request_bytes(CONNECT, 80, LOOPBACK, version=0),
        b"GET / HTTP/1.0\r\n\r\n",
    ],
    ids=["vn3", "vn0", "http"],
)
def test_bad_version_closes_without_reply(proxy: TwistdProcess, data: bytes) -> None:
    with connect_to(proxy.address) as sock:
        sock.sendall(data)
        assert_closed(sock, timeout=5)


def test_socks5_greeting_is_told_no_acceptable_method(proxy: TwistdProcess) -> None:
    with connect_to(proxy.address) as sock:
        sock.sendall(b"\x05\x01\x00")
        assert recv_until_eof(sock, timeout=5) == b"\x05\xff"


@pytest.mark.parametrize("command", [0, 3, 255])
def test_unknown_command(proxy: TwistdProcess, command: int) -> None:
    assert_rejected(proxy, request_bytes(command, 80, LOOPBACK), timeout=5)


@pytest.mark.parametrize(
    "request_",
    [
        request_bytes(CONNECT, 80, LOOPBACK, b"u" * 256),
        request_bytes(CONNECT, 80, LOOPBACK)[:8] + b"u" * 300,
        request_bytes(CONNECT, 80, "0.0.0.1", b"", b"h" * 256),
        request_bytes(CONNECT, 80, "0.0.0.1", b"")[:9] + b"h" * 300,
    ],
    ids=["userid", "userid-unterminated", "hostname", "hostname-unterminated"],
)
def test_oversize_field(proxy: TwistdProcess, request_: bytes) -> None:
    """Over the default limit of 255: 91 at once, not at the handshake timeout."""
    assert_rejected(proxy, request_, timeout=5)


def test_userid_at_the_limit_is_fine(
    proxy: TwistdProcess, echo: ThreadedServer
) -> None:
    sock, reply = socks4_request(
        proxy.address, CONNECT, echo.port, LOOPBACK, b"u" * 255
    )
    with sock:
        assert reply.code == GRANTED
        assert_echo(sock)


def test_max_userid_option(start_server, echo: ThreadedServer) -> None:
    server = start_server("--max-userid", "8")
    sock, reply = socks4_request(server.address, CONNECT, echo.port, LOOPBACK, b"u" * 8)
    with sock:
        assert reply.code == GRANTED
        assert_echo(sock)
    assert_rejected(server, request_bytes(CONNECT, echo.port, LOOPBACK, b"u" * 9))


@pytest.mark.parametrize("command", [CONNECT, BIND], ids=["connect", "bind"])
def test_dstip_zero(proxy: TwistdProcess, echo: ThreadedServer, command: int) -> None:
    assert_rejected(proxy, request_bytes(command, echo.port, "0.0.0.0"))


@pytest.mark.parametrize("socks4a", [False, True], ids=["socks4", "socks4a"])
def test_destination_is_the_proxy_itself(proxy: TwistdProcess, socks4a: bool) -> None:
    if socks4a:
        request = request_bytes(CONNECT, proxy.port, "0.0.0.1", b"", b"localhost")
    else:
        request = request_bytes(CONNECT, proxy.port, proxy.host)
    assert_rejected(proxy, request)


# -- BIND --------------------------------------------------------------------


@pytest.mark.parametrize("socks4a", [False, True], ids=["socks4", "socks4a"])
def test_bind_full_flow(proxy: TwistdProcess, socks4a: bool) -> None:
    if socks4a:
        sock, first = socks4_request(
            proxy.address, BIND, 2121, "0.0.0.1", b"ftp", b"localhost"
        )
    else:
        sock, first = socks4_request(proxy.address, BIND, 2121, LOOPBACK, b"ftp")
    with sock:
        assert first.code == GRANTED, first
        assert first.address == LOOPBACK, first
        assert first.port != 0, first
        with socket.create_connection((LOOPBACK, first.port), timeout=10) as peer:
            second = read_reply(sock)
            assert second.version == 0, second
            assert second.code == GRANTED, second
            assert (second.address, second.port) == peer.getsockname()[:2]
            # Relay both ways.
            down, up = b"from the application server\n", b"from the client\n"
            peer.sendall(down)
            assert recv_exact(sock, len(down)) == down
            sock.sendall(up)
            assert recv_exact(peer, len(up)) == up
            # Exactly one inbound connection: the listener is gone.
            wait_refused(first.port)
            # The application server closes: the client sees EOF.
            peer.shutdown(socket.SHUT_WR)
            assert recv_until_eof(sock) == b""


def test_bind_peer_mismatch(proxy: TwistdProcess) -> None:
    """DSTIP 127.0.0.2, but the inbound connection comes from 127.0.0.1."""
    sock, first = socks4_request(proxy.address, BIND, 2121, "127.0.0.2")
    with sock:
        assert first.code == GRANTED, first
        with socket.socket() as peer:
            peer.settimeout(10)
            peer.bind((LOOPBACK, 0))
            peer.connect((first.address, first.port))
            second = read_reply(sock)
            assert (second.version, second.code) == (0, REJECTED), second
            assert_closed(sock)
            assert_closed(peer)
        wait_refused(first.port)


def test_bind_client_leaves_closes_listener(proxy: TwistdProcess) -> None:
    sock, first = socks4_request(proxy.address, BIND, 2121, LOOPBACK)
    with sock:
        assert first.code == GRANTED, first
    wait_refused(first.port)


# -- timeouts and flow control -----------------------------------------------


@pytest.mark.parametrize(
    "partial",
    [b"", request_bytes(CONNECT, 80, LOOPBACK, b"user")[:6]],
    ids=["nothing", "half-request"],
)
def test_handshake_timeout(start_server, partial: bytes) -> None:
    server = start_server("--handshake-timeout", "1")
    with connect_to(server.address) as sock:
        started = time.monotonic()
        sock.sendall(partial)
        assert_closed(sock, timeout=10)
        elapsed = time.monotonic() - started
    assert 0.5 < elapsed < 6, elapsed


@pytest.mark.timeout(120)
@pytest.mark.parametrize("relay", RELAYS)
@pytest.mark.parametrize("direction", ["up", "down"])
def test_non_reading_peer_blocks_the_sender(
    start_server, direction: str, relay: str
) -> None:
    """
    One side never reads, the other pushes up to 256 MiB: the pusher must be
    blocked, and the server's memory must not grow by more than 16 MiB.
    """
    limit = 256 * MiB
    server = start_server("--relay", relay)
    release = threading.Event()
    conns: queue.Queue[socket.socket] = queue.Queue()

    def destination(conn: socket.socket) -> None:
        conns.put(conn)
        release.wait(90)

    with ThreadedServer(destination) as dest, ThreadPoolExecutor(1) as pool:
        sock, reply = socks4_request(server.address, CONNECT, dest.port, LOOPBACK)
        try:
            assert reply.code == GRANTED
            dest_conn = conns.get(timeout=10)
            # Warm up the relay before taking the baseline.
            sock.sendall(b"w" * 65536)
            recv_exact(dest_conn, 65536)
            dest_conn.sendall(b"w" * 65536)
            recv_exact(sock, 65536)
            time.sleep(0.3)
            baseline = peak = server.rss()
            pusher = sock if direction == "up" else dest_conn
            pushing = pool.submit(push, pusher, limit, 2.0, 40.0)
            deadline = time.monotonic() + 60
            while not pushing.done() and time.monotonic() < deadline:
                peak = max(peak, server.rss())
                time.sleep(0.05)
            sent, stalled = pushing.result(timeout=10)
            peak = max(peak, server.rss())
            server.assert_alive()
            assert stalled, f"pushed {sent} bytes without being blocked"
            assert sent < limit
            growth = peak - baseline
            assert growth < 16 * MiB, (
                f"RSS grew by {growth / MiB:.1f} MiB while {sent / MiB:.1f} MiB "
                f"were pushed {direction}"
            )
        finally:
            release.set()
            sock.close()


# -- the session log -----------------------------------------------------------


@pytest.mark.parametrize("relay", RELAYS)
def test_session_log_events(start_server, relay: str) -> None:
    server = start_server("--resolve-timeout", "2", "--relay", relay, json_log=True)
    startup = server.log_events("socks4tx.listen")
    assert startup, server.log_events()
    assert f"{LOOPBACK}:{server.port}" in startup[0]["listeners"]

    # A relayed CONNECT: 1000 bytes up (400 of them pipelined), 3000 down.
    def destination(conn: socket.socket) -> bytes:
        data = recv_exact(conn, 1000)
        conn.sendall(b"d" * 3000)
        return data

    with ThreadedServer(destination) as dest:
        sock, reply = socks4_request(
            server.address, CONNECT, dest.port, LOOPBACK, b"alice", payload=b"u" * 400
        )
        with sock:
            client_port = sock.getsockname()[1]
            assert reply.code == GRANTED
            sock.sendall(b"u" * 600)
            assert recv_until_eof(sock) == b"d" * 3000
        assert dest.wait_results() == [b"u" * 1000]
    event = server.wait_for_session(client_port)
    assert event.keys() >= SESSION_FIELDS, event
    assert event["client"] == LOOPBACK
    assert event["userid"] == "alice"
    assert event["command"] == "connect"
    assert event["dst_host"] is None
    assert event["dst_ip"] == LOOPBACK
    assert event["dst_port"] == dest.port
    assert event["reply"] == GRANTED
    assert event["reason"] == "relayed"
    assert event["bytes_up"] == 1000
    assert event["bytes_down"] == 3000
    assert isinstance(event["duration"], (int, float)) and event["duration"] >= 0
    assert event["relay"] == relay

    # A refused CONNECT.
    refused = free_port()
    with connect_to(server.address) as sock:
        client_port = sock.getsockname()[1]
        sock.sendall(request_bytes(CONNECT, refused, LOOPBACK, b"bob"))
        assert read_reply(sock).code == REJECTED
        assert_closed(sock)
    event = server.wait_for_session(client_port)
    assert event.keys() >= SESSION_FIELDS, event
    assert event["userid"] == "bob"
    assert event["command"] == "connect"
    assert (event["dst_ip"], event["dst_port"]) == (LOOPBACK, refused)
    assert event["reply"] == REJECTED
    assert event["reason"] == "connect-failed"
    assert (event["bytes_up"], event["bytes_down"]) == (0, 0)

    # An unresolvable SOCKS4A name.
    with connect_to(server.address) as sock:
        client_port = sock.getsockname()[1]
        sock.sendall(request_bytes(CONNECT, 80, "0.0.0.1", b"", b"nonexistent.invalid"))
        assert read_reply(sock).code == REJECTED
        assert_closed(sock)
    event = server.wait_for_session(client_port)
    assert event["dst_host"] == "nonexistent.invalid"
    assert event["reply"] == REJECTED
    assert event["reason"] == "resolve-failed"

    # Not SOCKS4 at all: no reply.
    with connect_to(server.address) as sock:
        client_port = sock.getsockname()[1]
        sock.sendall(request_bytes(CONNECT, 80, LOOPBACK, version=3))
        assert_closed(sock)
    event = server.wait_for_session(client_port)
    assert event["reply"] is None
    assert event["reason"] == "bad-request"

    # A BIND whose client goes away while waiting.
    sock, first = socks4_request(server.address, BIND, 21, LOOPBACK)
    with sock:
        client_port = sock.getsockname()[1]
        assert first.code == GRANTED
    event = server.wait_for_session(client_port)
    assert event["command"] == "bind"
    assert event["reason"] == "client-gone"


class FloodThenReset:
    """
    A destination that sends until every buffer on the way to a client that
    doesn't read is full (the portable relay's write buffer, or the splice
    relay's pipe), then, when told, resets.  C{lost} is what the reset
    itself discards: its own unacknowledged send queue and what the proxy's
    socket had received and not read.
    """

    def __init__(self) -> None:
        self.sent = 0
        self.lost = 0
        self.full = threading.Event()
        self.go = threading.Event()
        self.reset = threading.Event()

    def __call__(self, conn: socket.socket) -> None:
        self.ports = conn.getsockname()[1], conn.getpeername()[1]
        try:
            self._flood(conn)
        finally:
            self.full.set()
        self.go.wait(20)
        here, there = self.ports
        # Everything at rest: the same queues twice, 0.2 s apart.
        queues = None
        for _ in range(50):
            now = (tcp_queues(here, there)[0], tcp_queues(there, here)[1])
            if now == queues:
                break
            queues = now
            time.sleep(0.2)
        assert queues is not None
        self.lost = sum(queues)
        close_with_reset(conn)
        self.reset.set()

    def _flood(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        chunk = b"d" * 65536
        deadline = time.monotonic() + 15
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:  # until nothing moves for 0.5 s
            try:
                self.sent += conn.send(chunk)
                quiet_since = time.monotonic()
            except BlockingIOError:
                if time.monotonic() - quiet_since > 0.5:
                    return
                time.sleep(0.01)


@pytest.mark.parametrize("relay", RELAYS)
def test_bytes_read_before_a_reset_are_delivered(start_server, relay: str) -> None:
    """
    The destination fills every buffer towards a client that isn't
    reading and resets; a byte from the client then meets the reset.  The
    session ends, but first the client gets every byte the relay had read:
    all the destination sent but what the reset itself discarded.
    """
    server = start_server("--relay", relay, json_log=True)
    flood = FloodThenReset()
    with ThreadedServer(flood) as dest, client_not_reading(server, dest) as sock:
        client_port = sock.getsockname()[1]
        assert flood.full.wait(20)
        flood.go.set()
        assert flood.reset.wait(20)
        time.sleep(0.5)  # the reset has reached the proxy
        sock.sendall(b"x")  # the proxy writes it to the reset socket
        received = recv_until_eof(sock, limit=flood.sent)
        assert dest.wait_results() == [None]
    assert 0 < len(received) == flood.sent - flood.lost
    assert received == b"d" * len(received)
    event = server.wait_for_session(client_port)
    assert (event["relay"], event["bytes_down"]) == (relay, len(received))


@pytest.mark.parametrize("relay", RELAYS)
def test_bytes_read_before_a_reset_are_delivered_when_both_sides_wait(
    start_server, relay: str
) -> None:
    """
    As above, but the client has also sent more than the destination (which
    reads nothing) can take, so the relay holds bytes for it too and is
    waiting to write to it when it resets: the reactor, not a system call
    of the relay, reports the reset (a hang-up of a socket watched for
    writing).  The bytes for the destination are dropped; the client still
    gets what the relay had read for it.
    """
    server = start_server("--relay", relay, json_log=True)
    flood = FloodThenReset()
    with ThreadedServer(flood) as dest:
        dest.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        with client_not_reading(server, dest) as sock:
            client_port = sock.getsockname()[1]
            assert flood.full.wait(20)
            # Send until the proxy has read bytes it can't write: they are
            # in no socket's queue on the way.  Little at a time, so that
            # it has read all that was sent (a socket closed with unread
            # bytes would reset the client too).
            dest_port, outgoing_port = flood.ports
            proxy_port = server.address[1]
            sent_up = 0
            for _ in range(400):
                sock.sendall(b"u" * 65536)
                sent_up += 65536
                time.sleep(0.02)
                queued = (
                    tcp_queues(client_port, proxy_port)[0]
                    + tcp_queues(proxy_port, client_port)[1]
                    + tcp_queues(outgoing_port, dest_port)[0]
                    + tcp_queues(dest_port, outgoing_port)[1]
                )
                if queued < sent_up:
                    break
            assert queued < sent_up
            assert tcp_queues(proxy_port, client_port)[1] == 0
            flood.go.set()
            assert flood.reset.wait(20)
            received = recv_until_eof(sock, limit=flood.sent)
        assert dest.wait_results() == [None]
    assert 0 < len(received) == flood.sent - flood.lost
    event = server.wait_for_session(client_port)
    assert (event["relay"], event["bytes_down"]) == (relay, len(received))
