"""
Black-box hardening tests (issue 4): a real C{twistd -n socks4} process
under slow, half-open, resetting and excess clients, connection limits,
SIGTERM in the middle of a transfer, and the start-up open-file log line.

Every client runs on 127.0.0.0/8; a client on another source address binds
its socket to 127.0.0.2 or 127.0.0.3.  The destination-safety test needs a
client that is not on loopback: it runs in its own network namespace
(C{unshare -n}, root only) and is skipped where that is not possible.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import resource
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from blackbox import (
    BIND,
    CONNECT,
    GRANTED,
    IO_TIMEOUT,
    LOOPBACK,
    REJECTED,
    ThreadedServer,
    TwistdProcess,
    assert_closed,
    echo_handler,
    read_reply,
    recv_exact,
    recv_until_eof,
    request_bytes,
    socks4_args,
)

from socks4tx.limits import default_max_connections

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20
#: Other loopback source addresses: other clients, as far as limits go.
SECOND = "127.0.0.2"
THIRD = "127.0.0.3"
#: How long the server may take to close what a finished session held.
FD_SETTLE = 5.0


# -- helpers ---------------------------------------------------------------------


def connect_from(
    source: str, address: tuple[str, int], timeout: float = IO_TIMEOUT
) -> socket.socket:
    """A TCP connection to C{address} from C{source} (port chosen by the kernel)."""
    sock = socket.socket()
    try:
        sock.settimeout(timeout)
        sock.bind((source, 0))
        sock.connect(address)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return sock


def connect_to_proxy(server: TwistdProcess) -> socket.socket:
    return connect_from(LOOPBACK, server.address)


def client_port(sock: socket.socket) -> int:
    return sock.getsockname()[1]


def reset(sock: socket.socket) -> None:
    """Close C{sock} with a TCP RST (SO_LINGER on, zero seconds)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def assert_echo(sock: socket.socket, data: bytes = b"ping\n") -> None:
    sock.sendall(data)
    assert recv_exact(sock, len(data)) == data


def open_session(
    proxy: TwistdProcess, echo: ThreadedServer, source: str = LOOPBACK
) -> socket.socket:
    """A relayed CONNECT from C{source} to C{echo}, checked to echo."""
    sock = connect_from(source, proxy.address)
    try:
        sock.sendall(request_bytes(CONNECT, echo.port, LOOPBACK, b"held"))
        reply = read_reply(sock)
        assert (reply.version, reply.code) == (0, GRANTED), reply
        assert_echo(sock)
    except BaseException:
        sock.close()
        raise
    return sock


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def describe_fds(pid: int) -> list[str]:
    links = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            links.append(f"{name} -> {os.readlink(f'/proc/{pid}/fd/{name}')}")
    return sorted(links)


def wait_fds(server: TwistdProcess, baseline: int, timeout: float = FD_SETTLE) -> None:
    """Bounded wait until the server holds no more descriptors than C{baseline}."""
    deadline = time.monotonic() + timeout
    while True:
        server.assert_alive()
        count = open_fds(server.pid)
        if count <= baseline:
            return
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"twistd holds {count} descriptors {timeout} s later, baseline "
                f"{baseline}: {describe_fds(server.pid)}"
            )
        time.sleep(0.05)


def fd_baseline(server: TwistdProcess, echo: ThreadedServer) -> int:
    """The server's descriptors at rest, after one full session warmed it up."""
    with open_session(server, echo):
        pass
    time.sleep(0.2)
    deadline = time.monotonic() + FD_SETTLE
    previous = open_fds(server.pid)
    while time.monotonic() < deadline:
        time.sleep(0.1)
        count = open_fds(server.pid)
        if count == previous:
            return count
        previous = count
    return previous


def wait_until(condition, timeout: float, what: str) -> None:
    """Bounded poll of C{condition()}."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not within {timeout} s"
        time.sleep(0.02)


def wait_refused(address: tuple[str, int], timeout: float = 5.0) -> None:
    """Bounded wait until connecting to C{address} is refused."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            probe = socket.create_connection(address, timeout=1)
        except ConnectionRefusedError:
            return
        probe.close()
        assert time.monotonic() < deadline, f"{address} still accepts"
        time.sleep(0.05)


def raise_open_file_limit() -> None:
    """This test process may need a thousand descriptors and more."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (
        hard == resource.RLIM_INFINITY or soft < hard
    ):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def limit_events(server: TwistdProcess) -> list[dict]:
    return [e for e in server.session_events() if e.get("reason") == "limit"]


def exit_status(server: TwistdProcess, seconds: float, since: str) -> int:
    """twistd's exit status, once it exits within C{seconds} (after C{since})."""
    try:
        return server.process.wait(seconds)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"twistd still running {seconds} s after {since}\n{server.output()}"
        ) from None


def assert_shut_down(server: TwistdProcess, status: int) -> None:
    """
    twistd ended by its own shutdown: status 0, or -SIGTERM (twistd re-raises
    the signal it stopped on once its reactor has stopped, so that a parent
    sees why it exited), and its last words were logged.
    """
    assert status in (0, -signal.SIGTERM), (status, server.output())
    texts = [e.get("log_text", "") for e in server.log_events()]
    assert "Server Shut Down." in server.output() or "Server Shut Down." in texts, (
        server.output(),
        texts[-5:],
    )


@contextlib.contextmanager
def twistd(
    plugin_args: list[str], workdir: Path, json_log: bool = True
) -> Iterator[TwistdProcess]:
    """
    A server this test may see exit by itself (the C{start_server} fixture
    fails a test whose server is gone at teardown); stopped at the end.
    """
    workdir.mkdir()
    server = TwistdProcess(plugin_args, workdir, json_log=json_log)
    try:
        yield server
    finally:
        server.stop()


# -- slow and half-open clients --------------------------------------------------


def test_slow_drip_request_is_cut_off_at_the_handshake_timeout(
    start_server, echo: ThreadedServer
) -> None:
    """
    One byte every 0.3 s: the whole request would take 7.5 s, the handshake
    timeout of 1 s cuts it off (EOF, no reply) after about 1 s.
    """
    server = start_server("--handshake-timeout", "1", json_log=True)
    request = request_bytes(CONNECT, echo.port, LOOPBACK, b"slow-drip-client")
    assert len(request) * 0.3 > 5
    with connect_to_proxy(server) as sock:
        port = client_port(sock)
        started = time.monotonic()
        sent = 0
        for byte in request:  # at most len(request) rounds of 0.3 s
            try:
                sock.send(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += 1
            readable, _, _ = select.select([sock], [], [], 0.3)
            if readable:
                break
        rest = recv_until_eof(sock, timeout=5)
        elapsed = time.monotonic() - started
    assert rest == b"", f"expected no reply, got {rest!r}"
    assert sent < len(request), "the whole request went through"
    assert 0.8 <= elapsed < 2.5, elapsed
    event = server.wait_for_session(port)
    assert event["reply"] is None, event
    assert event["reason"] == "timeout", event
    assert echo.connections == []


@pytest.mark.timeout(90)
def test_thousand_half_open_handshakes_do_not_starve_a_good_client(
    start_server, echo: ThreadedServer
) -> None:
    """
    1,000 connections from 127.0.0.1 that sent 1-3 bytes of a request and
    then nothing: a client from 127.0.0.2 is still served within 1 s, and
    once they close, the server's descriptors return to the baseline.
    """
    count = 1000
    raise_open_file_limit()
    server = start_server(
        "--max-connections-per-source", "0", "--max-connections", "2000"
    )
    baseline = fd_baseline(server, echo)
    request = request_bytes(CONNECT, echo.port, LOOPBACK, b"half-open")
    half_open: list[socket.socket] = []
    try:
        # In batches no larger than the listen backlog (50): a full accept
        # queue drops SYNs, and each drop costs the client a 1 s retransmit.
        for start in range(0, count, 25):
            for i in range(start, min(start + 25, count)):
                sock = connect_from(LOOPBACK, server.address, timeout=5)
                half_open.append(sock)
                sock.sendall(request[: 1 + i % 3])
            wait_until(
                lambda: open_fds(server.pid) >= baseline + len(half_open),
                5,
                f"the server accepting {len(half_open)} connections",
            )
        for _ in range(3):
            started = time.monotonic()
            with open_session(server, echo, SECOND) as good:
                elapsed = time.monotonic() - started
                assert elapsed < 1.0, f"a good client waited {elapsed:.2f} s"
                assert_echo(good, os.urandom(10_000))
        # Nobody was dropped: the half-open connections are all still open.
        poller = select.poll()
        for sock in half_open:
            poller.register(sock, select.POLLIN)
        assert poller.poll(0) == []
        server.assert_alive()
    finally:
        for sock in half_open:
            sock.close()
    wait_fds(server, baseline)


# -- connection limits -------------------------------------------------------------


def assert_closed_at_once(sock: socket.socket) -> None:
    """EOF (no reply) without having sent anything, well before any timeout."""
    started = time.monotonic()
    assert_closed(sock, timeout=5)
    elapsed = time.monotonic() - started
    assert elapsed < 1.0, f"closed only after {elapsed:.2f} s"


def test_per_source_limit(start_server, echo: ThreadedServer) -> None:
    server = start_server("--max-connections-per-source", "3", json_log=True)
    held = [open_session(server, echo) for _ in range(3)]
    others: list[socket.socket] = []
    try:
        # A fourth from 127.0.0.1 is closed before it sends anything.
        with connect_from(LOOPBACK, server.address) as over:
            over_port = client_port(over)
            assert_closed_at_once(over)
        # Another client address is not affected.
        others.append(open_session(server, echo, SECOND))
        for sock in held:
            assert_echo(sock)
        # One of the three ends: 127.0.0.1 is served again.
        first = held.pop(0)
        first_port = client_port(first)
        first.close()
        assert server.wait_for_session(first_port)["reason"] == "relayed"
        held.append(open_session(server, echo))
        # ... and is at its limit again.
        with connect_from(LOOPBACK, server.address) as over_again:
            over_again_port = client_port(over_again)
            assert_closed_at_once(over_again)
        for sock in held + others:
            assert_echo(sock)
    finally:
        for sock in held + others:
            sock.close()
    event = server.wait_for_session(over_port)
    assert event["client"] == LOOPBACK, event
    assert event["reply"] is None, event
    assert event["reason"] == "limit", event
    assert server.wait_for_session(over_again_port)["reason"] == "limit"
    assert sorted(e["client_port"] for e in limit_events(server)) == sorted(
        [over_port, over_again_port]
    )
    echo.wait_results(len(echo.connections), timeout=5)
    server.assert_alive()


def test_total_limit(start_server, echo: ThreadedServer) -> None:
    server = start_server("--max-connections", "2", json_log=True)
    held = [open_session(server, echo), open_session(server, echo, SECOND)]
    try:
        with connect_from(THIRD, server.address) as over:
            over_port = client_port(over)
            assert_closed_at_once(over)
        for sock in held:
            assert_echo(sock)
        first = held.pop(0)
        first_port = client_port(first)
        first.close()
        server.wait_for_session(first_port)
        held.append(open_session(server, echo, THIRD))
        for sock in held:
            assert_echo(sock)
    finally:
        for sock in held:
            sock.close()
    event = server.wait_for_session(over_port)
    assert event["client"] == THIRD, event
    assert (event["reply"], event["reason"]) == (None, "limit"), event
    assert [e["client_port"] for e in limit_events(server)] == [over_port]


def test_limit_counts_a_bind_waiting_session(
    start_server, echo: ThreadedServer
) -> None:
    """A BIND waiting for its inbound connection holds a place too."""
    server = start_server("--max-connections-per-source", "1", json_log=True)
    with connect_from(LOOPBACK, server.address) as binder:
        binder_port = client_port(binder)
        binder.sendall(request_bytes(BIND, 2121, LOOPBACK))
        first = read_reply(binder)
        assert first.code == GRANTED, first
        with connect_from(LOOPBACK, server.address) as over:
            assert_closed_at_once(over)
        # The inbound connection to the BIND listener is not a client.
        with socket.create_connection((LOOPBACK, first.port), timeout=5) as peer:
            second = read_reply(binder)
            assert second.code == GRANTED, second
            peer.sendall(b"hello\n")
            assert recv_exact(binder, 6) == b"hello\n"
            with connect_from(LOOPBACK, server.address) as over:
                assert_closed_at_once(over)
    event = server.wait_for_session(binder_port)
    assert (event["command"], event["reply"]) == ("bind", GRANTED), event
    with open_session(server, echo):
        pass
    assert len(limit_events(server)) == 2


# -- resets --------------------------------------------------------------------------


class SilentServer(ThreadedServer):
    """Accepts and reads, never answers; C{results}: what each connection sent."""

    def __init__(self) -> None:
        super().__init__(lambda conn: recv_until_eof(conn, timeout=30))


def echo_until_gone(conn: socket.socket) -> int:
    """Echo until EOF or a reset (the server aborting); the bytes echoed."""
    try:
        return echo_handler(conn)
    except (BrokenPipeError, ConnectionResetError):
        return -1


@pytest.mark.parametrize(
    "point",
    ["mid-request", "after-request", "ident-lookup", "bind-wait", "relay"],
)
def test_client_reset(start_server, echo: ThreadedServer, point: str) -> None:
    """
    A client that resets (RST) at any point leaves nothing behind: the
    server stays up, closes what the session held (descriptors back to the
    baseline, the BIND listener, the identd and destination connections)
    and logs the session.
    """
    with contextlib.ExitStack() as stack:
        extra: list[str] = []
        identd = None
        if point == "ident-lookup":
            identd = stack.enter_context(SilentServer())
            extra = ["--ident", "required", "--ident-port", str(identd.port)]
        server = start_server(*extra, json_log=True)
        if identd is None:
            baseline = fd_baseline(server, echo)
        else:
            time.sleep(0.3)
            baseline = open_fds(server.pid)
        destination = stack.enter_context(ThreadedServer(echo_until_gone))
        sock = connect_from(LOOPBACK, server.address)
        port = client_port(sock)
        connect = request_bytes(CONNECT, destination.port, LOOPBACK, b"resetter")
        bind_port = None
        if point == "mid-request":
            sock.sendall(connect[:5])
            time.sleep(0.2)
            expected_replies: tuple = (None,)
        elif point == "after-request":
            sock.sendall(request_bytes(BIND, 2121, LOOPBACK, b"resetter"))
            expected_replies = (None, GRANTED)
        elif point == "ident-lookup":
            assert identd is not None
            sock.sendall(connect)
            identd.wait_accepted(5)
            time.sleep(0.1)
            expected_replies = (None,)
        elif point == "bind-wait":
            sock.sendall(request_bytes(BIND, 2121, LOOPBACK, b"resetter"))
            first = read_reply(sock)
            assert first.code == GRANTED, first
            bind_port = first.port
            expected_replies = (GRANTED,)
        else:
            sock.sendall(connect)
            assert read_reply(sock).code == GRANTED
            assert_echo(sock, os.urandom(100_000))
            # Leave bytes in flight both ways.
            sock.sendall(os.urandom(500_000))
            expected_replies = (GRANTED,)
        reset(sock)

        event = server.wait_for_session(port)
        assert event["reply"] in expected_replies, event
        if point == "relay":
            assert event["reason"] in ("relayed", "client-gone"), event
            assert event["bytes_up"] >= 100_000, event
        else:
            assert event["reason"] == "client-gone", event
        if bind_port is not None:
            wait_refused((LOOPBACK, bind_port))
        if identd is not None:
            # The pending lookup was cancelled: its connection is closed.
            identd.wait_results(1, timeout=5)
        if point == "relay":
            destination.wait_results(1, timeout=5)
        else:
            assert destination.connections == [], point
        server.assert_alive()
        wait_fds(server, baseline)
        # And it still serves.
        if identd is None:
            with open_session(server, echo):
                pass


# -- graceful shutdown ---------------------------------------------------------------


@pytest.mark.timeout(120)
def test_sigterm_lets_a_64mib_transfer_finish(tmp_path: Path) -> None:
    """
    SIGTERM after 8 MiB of a 64 MiB upload: the listener closes at once, the
    upload goes on and arrives whole (SHA-256 at the destination), and
    twistd exits by itself, status 0, once the session has ended.
    """
    size = 64 * MiB
    data = os.urandom(size)
    progress = [0]

    def destination(conn: socket.socket) -> tuple[int, str]:
        conn.settimeout(60)
        digest = hashlib.sha256()
        total = 0
        while True:
            chunk = conn.recv(1 << 20)
            if not chunk:
                return total, digest.hexdigest()
            digest.update(chunk)
            total += len(chunk)
            progress[0] = total

    with (
        twistd(socks4_args(), tmp_path / "server") as server,
        ThreadedServer(destination) as dest,
    ):
        sock = connect_from(LOOPBACK, server.address, timeout=60)
        with sock:
            port = client_port(sock)
            sock.sendall(request_bytes(CONNECT, dest.port, LOOPBACK, b"big"))
            assert read_reply(sock).code == GRANTED
            first = 16 * MiB
            sock.sendall(data[:first])
            wait_until(lambda: progress[0] >= 8 * MiB, 20, "8 MiB at the destination")
            server.process.send_signal(signal.SIGTERM)
            # New connections are refused from now on ...
            wait_refused(server.address)
            # ... while the session in progress goes on.
            assert server.process.poll() is None, server.output()
            assert progress[0] < size
            sock.sendall(data[first:])
            sock.shutdown(socket.SHUT_WR)
            [(received, digest)] = dest.wait_results(timeout=60)
            assert received == size
            assert digest == hashlib.sha256(data).hexdigest()
            # The destination closed: so does the client's connection.
            assert_closed(sock)
        status = exit_status(server, 10, "the session ended")
        assert_shut_down(server, status)
        event = server.wait_for_session(port, timeout=1)
        assert (event["reason"], event["bytes_up"]) == ("relayed", size), event


def test_sigterm_closes_idle_sessions_after_the_grace(tmp_path: Path) -> None:
    """
    --shutdown-grace 1 and a session that never ends by itself: twistd
    exits about 1 s after SIGTERM, closing the client and the destination.
    """

    def destination(conn: socket.socket) -> bytes:
        return recv_until_eof(conn, timeout=20)

    with (
        twistd(socks4_args("--shutdown-grace", "1"), tmp_path / "server") as server,
        ThreadedServer(destination) as dest,
    ):
        sock = connect_from(LOOPBACK, server.address)
        with sock:
            port = client_port(sock)
            sock.sendall(request_bytes(CONNECT, dest.port, LOOPBACK, b"idle"))
            assert read_reply(sock).code == GRANTED
            dest.wait_accepted(5)
            started = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            wait_refused(server.address, timeout=1)
            status = exit_status(server, 5, "SIGTERM")
            elapsed = time.monotonic() - started
            assert recv_until_eof(sock, timeout=2) == b""
        assert 0.8 <= elapsed < 3.0, elapsed
        assert_shut_down(server, status)
        assert dest.wait_results(timeout=5) == [b""]
        event = server.wait_for_session(port, timeout=1)
        assert (event["reply"], event["reason"]) == (GRANTED, "shutdown")


def test_sigterm_without_sessions_exits_at_once(tmp_path: Path) -> None:
    with twistd(socks4_args(), tmp_path / "server", json_log=False) as server:
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        status = exit_status(server, 5, "SIGTERM")
        assert time.monotonic() - started < 2.0
        assert_shut_down(server, status)


# -- descriptors: stalled readers and the splice relay's pipes ------------------------


def flood_handler(conn: socket.socket) -> None:
    """A destination that sends until its client's side stops taking bytes."""
    conn.settimeout(3)
    chunk = b"\xaa" * (256 * 1024)
    with contextlib.suppress(OSError):
        for _ in range(32):
            conn.sendall(chunk)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("relay", ["auto", "splice"])
def test_stalled_readers_leave_descriptors_for_sessions_within_the_limit(
    tmp_path: Path, echo: ThreadedServer, relay: str
) -> None:
    """
    A session whose client stopped reading keeps a full pipe: the pipes are
    budgeted apart from the sessions' three descriptors, so every session
    the default --max-connections admits still gets its descriptors.
    """
    # Low enough that stalled readers' pipes, uncounted, would exhaust it.
    open_files = 300
    max_sessions = default_max_connections(open_files)
    with ThreadedServer(flood_handler) as flood:
        server = TwistdProcess(
            socks4_args("--relay", relay, "--max-connections-per-source", "0"),
            tmp_path,
            json_log=True,
            open_files=open_files,
        )
        stalled: list[socket.socket] = []
        try:
            for _ in range(max_sessions - 4):
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.settimeout(IO_TIMEOUT)
                sock.connect(server.address)
                sock.sendall(request_bytes(CONNECT, flood.port, LOOPBACK))
                assert read_reply(sock).code == GRANTED
                stalled.append(sock)
            time.sleep(1)  # the floods fill what they can
            for _ in range(4):
                with open_session(server, echo) as sock:
                    assert_echo(sock)
            assert open_fds(server.pid) < open_files
            logged = server.output() + "".join(
                e.get("log_text", "") for e in server.log_events()
            )
            assert "EMFILE" not in logged
            assert "Unhandled Error" not in logged
            assert not limit_events(server)
        finally:
            for sock in stalled:
                sock.close()
            server.stop()


# -- the start-up log ----------------------------------------------------------------


@contextlib.contextmanager
def soft_open_file_limit(soft: int) -> Iterator[None]:
    """Children started inside inherit this soft RLIMIT_NOFILE."""
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, before[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)


def process_open_file_limits(pid: int) -> tuple[int, int]:
    limits = Path(f"/proc/{pid}/limits").read_text()
    match = re.search(r"^Max open files\s+(\d+)\s+(\d+)", limits, re.MULTILINE)
    assert match, limits
    return int(match.group(1)), int(match.group(2))


def numbers(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", text)]


@pytest.mark.parametrize("explicit", [False, True], ids=["defaults", "explicit"])
def test_startup_log_says_the_open_file_limit(tmp_path: Path, explicit: bool) -> None:
    """
    Started with a low soft limit, the server raises it to the hard limit
    and logs both, with the connection limits (the derived default keeps
    three descriptors a session within the limit).
    """
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or hard < 2048:
        pytest.skip(f"hard open-file limit {hard}")
    low = 1024
    extra = ["--max-connections", "100", "--max-connections-per-source", "7"]
    with contextlib.ExitStack() as stack:
        with soft_open_file_limit(low):
            server = stack.enter_context(
                twistd(
                    socks4_args(*(extra if explicit else [])),
                    tmp_path / "server",
                    json_log=True,
                )
            )
        assert process_open_file_limits(server.pid) == (hard, hard)
        events = server.log_events("socks4tx.limits")
        assert len(events) == 1, server.log_events()
        text = events[0]["log_text"]
        assert "open file" in text.lower(), text
        said = numbers(text)
        assert low in said and hard in said, text
        if explicit:
            assert 100 in said and 7 in said, text
        else:
            assert 256 in said, text
            # Three descriptors a session, a few kept back, and the pipes.
            assert default_max_connections(hard) in said, text


def test_startup_log_in_the_text_log(tmp_path: Path) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    with twistd(
        socks4_args("--max-connections", "321"), tmp_path / "server", json_log=False
    ) as server:
        lines = [
            line for line in server.output().splitlines() if "socks4tx.limits" in line
        ]
        assert len(lines) == 1, server.output()
        said = numbers(lines[0].split("]", 1)[1])
        assert hard in said and 321 in said and 256 in said, lines[0]


# -- destination safety, from a client that is not on loopback -----------------------


NETNS_ADDRESS = "198.51.100.7"


def _can_unshare() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        return False
    try:
        return (
            subprocess.run(
                ["unshare", "-n", "true"], capture_output=True, timeout=10
            ).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


def netns_destination_safety(workdir: Path) -> None:
    """
    Runs inside a fresh network namespace (see the test below): 198.51.100.7
    on lo is this host but not loopback, so a client bound to it is a
    remote client as far as destination safety goes.
    """
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(
        ["ip", "addr", "add", f"{NETNS_ADDRESS}/32", "dev", "lo"], check=True
    )
    rules = workdir / "sockd.conf"
    rules.write_text(
        "# 127.0.0.1 named explicitly: allowed even to remote clients\n"
        "permit 0.0.0.0 0.0.0.0 127.0.0.1 255.255.255.255\n"
        "# a catch-all destination does not name loopback or link-local\n"
        "permit 0.0.0.0 0.0.0.0\n"
    )
    args = [
        "socks4",
        "--listen",
        f"tcp:0:interface={NETNS_ADDRESS}",
        "--rules",
        str(rules),
    ]
    with (
        twistd(args, workdir / "server") as server,
        ThreadedServer(echo_handler, host=LOOPBACK) as echo1,
        ThreadedServer(echo_handler, host=SECOND) as echo2,
        ThreadedServer(echo_handler, host=NETNS_ADDRESS) as echo3,
    ):

        def ask(source: str, address: str, port: int) -> tuple[int, dict]:
            with connect_from(source, server.address) as sock:
                sock.sendall(request_bytes(CONNECT, port, address, b"remote"))
                reply = read_reply(sock)
                port = client_port(sock)
                if reply.code == GRANTED:
                    assert_echo(sock)
                else:
                    assert_closed(sock)
            return reply.code, server.wait_for_session(port)

        # A remote client: loopback only when a rule names it.
        code, event = ask(NETNS_ADDRESS, LOOPBACK, echo1.port)
        assert code == GRANTED, event
        code, event = ask(NETNS_ADDRESS, SECOND, echo2.port)
        assert (code, event["reason"]) == (REJECTED, "destination-refused"), event
        code, event = ask(NETNS_ADDRESS, "169.254.169.254", 80)
        assert (code, event["reason"]) == (REJECTED, "destination-refused"), event
        code, event = ask(NETNS_ADDRESS, NETNS_ADDRESS, echo3.port)
        assert code == GRANTED, event
        # A client on loopback may go to loopback under the catch-all.
        code, event = ask(LOOPBACK, SECOND, echo2.port)
        assert code == GRANTED, event
        assert echo2.connections and len(echo2.connections) == 1
    print("netns scenario passed")


@pytest.mark.skipif(not _can_unshare(), reason="needs root and unshare -n")
def test_destination_safety_for_a_remote_client(tmp_path: Path) -> None:
    code = (
        "import sys, pathlib; "
        f"sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        "import test_hardening; "
        f"test_hardening.netns_destination_safety(pathlib.Path({str(tmp_path)!r}))"
    )
    result = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "netns scenario passed" in result.stdout
