"""
Helpers for the black-box tests: a real C{twistd} process, raw SOCKS4
clients, and small loopback servers running in threads.

Nothing here imports socks4tx: the black-box tests see the server only from
the outside, as a client would, so the request and reply bytes are built by
hand.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import re
import resource
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TWISTD = Path(sys.executable).parent / "twistd"
LOOPBACK = "127.0.0.1"

#: How long a server may take to say where it listens.
STARTUP_TIMEOUT = 20.0
#: How long a server may take to exit after SIGTERM before it gets SIGKILL.
STOP_TIMEOUT = 10.0
#: The default time limit for one socket operation in these tests.
IO_TIMEOUT = 10.0

CONNECT = 1
BIND = 2
GRANTED = 90
REJECTED = 91
#: The relays (--relay) the relay tests run against, each in turn.
RELAYS = ("splice", "portable")

_LISTENING = re.compile(r"listening on (\S+(?:\s*,\s*\S+)*)")
_HOST_PORT = re.compile(r"\[?([0-9A-Za-z.:_-]+?)\]?:(\d+)$")


# -- the server process ------------------------------------------------------


class ServerFailed(AssertionError):
    """The server process did not start, or died."""


def _nofile(limit: int) -> Callable[[], None]:
    def set_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    return set_limit


class TwistdProcess:
    """
    One C{twistd -n} process running the source tree's plugins.

    @ivar listeners: the C{(host, port)} pairs the server reported.
    """

    def __init__(
        self,
        plugin_args: list[str],
        workdir: Path,
        json_log: bool = False,
        known_port: int | None = None,
        open_files: int | None = None,
    ) -> None:
        """C{open_files}: the process's soft and hard RLIMIT_NOFILE."""
        self.workdir = workdir
        self.stdout_path = workdir / "twistd.out"
        self.json_path = workdir / "session.jsonl" if json_log else None
        self.argv = [str(TWISTD), "-n", "--pidfile="]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO), *filter(None, [env.get("PYTHONPATH")])]
        )
        env["PYTHONUNBUFFERED"] = "1"
        if self.json_path is not None:
            self.argv.append("--logger=socks4tx.logs.json_observer")
            env["SOCKS4TX_LOG_JSON"] = str(self.json_path)
        self.argv += plugin_args
        self.listeners: list[tuple[str, int]] = []
        with open(self.stdout_path, "wb") as out:
            self.process = subprocess.Popen(
                self.argv,
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=None if open_files is None else _nofile(open_files),
            )
        try:
            if known_port is None:
                self._wait_for_listeners()
            else:
                self._wait_for_port(known_port)
        except BaseException:
            self.stop()
            raise

    # The first listener is the one most tests talk to.
    @property
    def host(self) -> str:
        return self.listeners[0][0]

    @property
    def port(self) -> int:
        return self.listeners[0][1]

    @property
    def address(self) -> tuple[str, int]:
        return self.listeners[0]

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        """Everything the process wrote on stdout and stderr so far."""
        try:
            return self.stdout_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _fail(self, message: str) -> ServerFailed:
        return ServerFailed(
            f"{message}\ncommand: {' '.join(self.argv)}\n"
            f"--- output ---\n{self.output()}\n--- end ---"
        )

    def _wait_for_listeners(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            listeners = self._listeners_from_stdout() or self._listeners_from_json()
            if listeners:
                self.listeners = listeners
                return
            if self.process.poll() is not None:
                raise self._fail(f"twistd exited with {self.process.returncode}")
            time.sleep(0.05)
        raise self._fail(f"no 'listening on' line within {STARTUP_TIMEOUT} s")

    def _wait_for_port(self, port: int) -> None:
        if wait_accepting(self.process, (LOOPBACK, port)):
            self.listeners = [(LOOPBACK, port)]
            return
        if self.process.poll() is not None:
            raise self._fail(f"twistd exited with {self.process.returncode}")
        raise self._fail(f"nothing listens on port {port} after {STARTUP_TIMEOUT} s")

    def _listeners_from_stdout(self) -> list[tuple[str, int]]:
        match = _LISTENING.search(self.output())
        if match is None:
            return []
        return parse_listeners(match.group(1).split(","))

    def _listeners_from_json(self) -> list[tuple[str, int]]:
        for event in self.log_events(namespace="socks4tx.listen"):
            listeners = event.get("listeners")
            if listeners:
                return parse_listeners(listeners)
        return []

    def log_events(self, namespace: str | None = None) -> list[dict]:
        """
        The JSON log events written so far (an empty list without a JSON
        log); C{namespace} keeps only those with that C{log_namespace}.
        """
        if self.json_path is None:
            return []
        try:
            text = self.json_path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        events = []
        for line in text.splitlines():
            line = line.strip().lstrip("\x1e")
            if not line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue  # a line still being written
            if namespace is None or event.get("log_namespace") == namespace:
                events.append(event)
        return events

    def session_events(self) -> list[dict]:
        return self.log_events(namespace="socks4tx.session")

    def unhandled_errors(self) -> list[str]:
        """
        What the reactor caught and logged as an unhandled error (an
        exception that escaped socks4tx into Twisted), in either log.
        """
        texts = [self.output()]
        texts += [e.get("log_text", "") for e in self.log_events()]
        return [
            text[text.index("Unhandled Error") :][:2000]
            for text in texts
            if "Unhandled Error" in text
        ]

    def wait_for_session(
        self, client_port: int | None, timeout: float = IO_TIMEOUT, client: str = ""
    ) -> dict:
        """
        The session event of the client that used C{client_port} (and, if
        given, whose C{client} field is C{client}: a UNIX socket's has no port).
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.session_events():
                if event.get("client_port") == client_port and (
                    not client or event.get("client") == client
                ):
                    return event
            time.sleep(0.05)
        raise AssertionError(
            f"no socks4tx.session event for client {client} port {client_port} within "
            f"{timeout} s; events: {self.log_events()}\n"
            f"--- output ---\n{self.output()}"
        )

    def rss(self) -> int:
        """The process's resident set size in bytes (Linux /proc)."""
        status = Path(f"/proc/{self.pid}/status").read_text()
        match = re.search(r"^VmRSS:\s+(\d+)\s+kB", status, re.MULTILINE)
        assert match, status
        return int(match.group(1)) * 1024

    def assert_alive(self) -> None:
        if self.process.poll() is not None:
            raise self._fail(f"twistd died with {self.process.returncode}")

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after L{STOP_TIMEOUT}; the exit status."""
        return stop_process(self.process)


def wait_accepting(
    process: subprocess.Popen[bytes],
    address: tuple[str, int],
    timeout: float = STARTUP_TIMEOUT,
) -> bool:
    """
    Wait until something accepts connections at C{address}: True; False
    once C{process} has exited or C{timeout} seconds have passed.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        with contextlib.suppress(OSError):
            socket.create_connection(address, timeout=1).close()
            return True
        time.sleep(0.05)
    return False


def stop_process(
    process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT
) -> int | None:
    """SIGTERM, then SIGKILL if still running after C{timeout}; the status."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)
    return process.returncode


def parse_listeners(items: list[str]) -> list[tuple[str, int]]:
    """C{["127.0.0.1:1080", "[::1]:1080"]} -> C{[(host, port), ...]}."""
    listeners = []
    for item in items:
        match = _HOST_PORT.match(item.strip())
        if match:
            listeners.append((match.group(1), int(match.group(2))))
    return listeners


def socks4_args(*extra: str) -> list[str]:
    """Plugin arguments: C{socks4} on a free loopback port, plus C{extra}."""
    return ["socks4", "--listen", f"tcp:0:interface={LOOPBACK}", *extra]


# -- a raw SOCKS4 client -------------------------------------------------------


def request_bytes(
    command: int,
    port: int,
    address: str,
    userid: bytes = b"",
    hostname: bytes | None = None,
    version: int = 4,
) -> bytes:
    data = struct.pack(
        "!BBH4s", version, command, port, ipaddress.IPv4Address(address).packed
    )
    data += userid + b"\0"
    if hostname is not None:
        data += hostname + b"\0"
    return data


@dataclass(frozen=True)
class Reply:
    version: int
    code: int
    port: int
    address: str

    @classmethod
    def parse(cls, data: bytes) -> Reply:
        assert len(data) == 8, f"a reply is 8 bytes, got {data!r}"
        version, code, port, address = struct.unpack("!BBH4s", data)
        return cls(version, code, port, str(ipaddress.IPv4Address(address)))


def connect_to(address: tuple[str, int], timeout: float = IO_TIMEOUT) -> socket.socket:
    sock = socket.create_connection(address, timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exact(sock: socket.socket, size: int, timeout: float = IO_TIMEOUT) -> bytes:
    """Exactly C{size} bytes; fails on EOF or when C{timeout} passes."""
    chunks = []
    remaining = size
    deadline = time.monotonic() + timeout
    while remaining:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(
                f"timed out after {size - remaining} of {size} bytes: "
                f"{b''.join(chunks)[:64]!r}"
            )
        sock.settimeout(left)
        try:
            chunk = sock.recv(min(remaining, 1 << 20))
        except TimeoutError:
            continue
        if not chunk:
            raise AssertionError(
                f"EOF after {size - remaining} of {size} bytes: "
                f"{b''.join(chunks)[:64]!r}"
            )
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def recv_until_eof(
    sock: socket.socket, timeout: float = IO_TIMEOUT, limit: int = 64 << 20
) -> bytes:
    """Everything until EOF (a reset counts as EOF); fails after C{timeout}."""
    chunks = []
    total = 0
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(
                f"no EOF within {timeout} s; got {total} bytes: "
                f"{b''.join(chunks)[:64]!r}"
            )
        sock.settimeout(left)
        try:
            chunk = sock.recv(1 << 20)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return b"".join(chunks)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        assert total <= limit, f"more than {limit} bytes before EOF"


def assert_closed(sock: socket.socket, timeout: float = IO_TIMEOUT) -> None:
    """The peer closed C{sock} without sending anything (more)."""
    rest = recv_until_eof(sock, timeout)
    assert rest == b"", f"expected a close, got {rest[:64]!r}"


def read_reply(sock: socket.socket, timeout: float = IO_TIMEOUT) -> Reply:
    return Reply.parse(recv_exact(sock, 8, timeout))


def socks4_request(
    proxy: tuple[str, int],
    command: int,
    port: int,
    address: str,
    userid: bytes = b"",
    hostname: bytes | None = None,
    payload: bytes = b"",
    timeout: float = IO_TIMEOUT,
) -> tuple[socket.socket, Reply]:
    """
    Connect to C{proxy}, send one request (and C{payload} in the same
    C{send}), read the first reply.  The caller closes the socket.
    """
    sock = connect_to(proxy, timeout)
    try:
        sock.sendall(request_bytes(command, port, address, userid, hostname) + payload)
        reply = read_reply(sock, timeout)
    except BaseException:
        sock.close()
        raise
    assert reply.version == 0, reply
    return sock, reply


def client_not_reading(
    server: TwistdProcess, destination: ThreadedServer
) -> socket.socket:
    """A granted CONNECT on a socket with a small receive window."""
    sock = socket.socket()
    # A small window keeps the bytes in the proxy, not in this socket.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(server.address)
    sock.sendall(request_bytes(CONNECT, destination.port, LOOPBACK))
    assert read_reply(sock).code == GRANTED
    return sock


def close_with_reset(conn: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0), not a FIN."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
    conn.close()


#: 127.0.0.1 as /proc/net/tcp writes it (the bytes of the address, as a
#: little-endian number).
LOOPBACK_HEX = "0100007F"


def tcp_queues(local_port: int, remote_port: int) -> tuple[int, int]:
    """
    The send and receive queues of this network namespace's established
    TCP socket from 127.0.0.1:C{local_port} to 127.0.0.1:C{remote_port}, from
    /proc/net/tcp: bytes sent and not yet acknowledged, and bytes received
    and not yet read.  (The kernel lists the table a page at a time, so a
    socket can appear twice, or not at all, while others come and go:
    sockets are told apart by inode, and the table is read again if the
    one asked for is missing.)
    """
    found: dict[str, tuple[int, int]] = {}
    for _ in range(10):
        with open("/proc/net/tcp") as table:
            lines = table.read().splitlines()[1:]
        for line in lines:
            fields = line.split()
            local, remote, state, queues, inode = *fields[1:5], fields[9]
            ends = (local, remote)
            if state == "01" and ends == (
                f"{LOOPBACK_HEX}:{local_port:04X}",
                f"{LOOPBACK_HEX}:{remote_port:04X}",
            ):
                send, receive = (int(part, 16) for part in queues.split(":"))
                found[inode] = (send, receive)
        if found:
            break
    assert len(found) == 1, f"{local_port} -> {remote_port}: {found}"
    return next(iter(found.values()))


def free_port() -> int:
    """A loopback port that nothing listens on (right now)."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


# -- loopback servers in threads ------------------------------------------------


Handler = Callable[[socket.socket], object]


class ThreadedServer:
    """
    A TCP server on 127.0.0.1 port 0 that runs C{handler(conn)} in a thread
    for each connection; C{results} collects what handlers return,
    C{errors} what they raise.
    """

    def __init__(self, handler: Handler, host: str = LOOPBACK) -> None:
        self.handler = handler
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, 0))
        self.listener.listen(64)
        self.listener.settimeout(0.1)
        self.address: tuple[str, int] = self.listener.getsockname()[:2]
        self.results: list[object] = []
        self.errors: list[BaseException] = []
        self.connections: list[socket.socket] = []
        self.accepted = threading.Semaphore(0)
        self._done = threading.Condition()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    @property
    def port(self) -> int:
        return self.address[1]

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(IO_TIMEOUT)
            self.connections.append(conn)
            self.accepted.release()
            thread = threading.Thread(target=self._run, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _run(self, conn: socket.socket) -> None:
        try:
            result = self.handler(conn)
        except BaseException as e:
            with self._done:
                self.errors.append(e)
                self._done.notify_all()
        else:
            with self._done:
                self.results.append(result)
                self._done.notify_all()
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def wait_accepted(self, timeout: float = IO_TIMEOUT) -> None:
        assert self.accepted.acquire(timeout=timeout), "no connection arrived"

    def wait_results(self, count: int = 1, timeout: float = IO_TIMEOUT) -> list:
        """The first C{count} handler results; re-raises a handler's error."""
        deadline = time.monotonic() + timeout
        with self._done:
            while len(self.results) + len(self.errors) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"{len(self.results)} of {count} handlers done "
                        f"after {timeout} s"
                    )
                self._done.wait(left)
            if self.errors:
                raise self.errors[0]
            return list(self.results[:count])

    def close(self) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            self.listener.close()
        for conn in self.connections:
            with contextlib.suppress(OSError):
                conn.close()
        self._acceptor.join(2)
        for thread in self._threads:
            thread.join(2)

    def __enter__(self) -> ThreadedServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def echo_handler(conn: socket.socket) -> int:
    """Echo until EOF, then close; the number of bytes echoed."""
    total = 0
    while True:
        try:
            data = conn.recv(1 << 16)
        except (TimeoutError, ConnectionResetError):
            return total
        if not data:
            return total
        conn.sendall(data)
        total += len(data)


def recv_sha256(sock: socket.socket, size: int, timeout: float = 60.0) -> str:
    """Read exactly C{size} bytes, returning their SHA-256 hex digest."""
    digest = hashlib.sha256()
    remaining = size
    deadline = time.monotonic() + timeout
    while remaining:
        left = deadline - time.monotonic()
        assert left > 0, f"timed out with {remaining} of {size} bytes to go"
        sock.settimeout(left)
        try:
            chunk = sock.recv(min(remaining, 1 << 20))
        except TimeoutError:
            continue
        assert chunk, f"EOF with {remaining} of {size} bytes to go"
        digest.update(chunk)
        remaining -= len(chunk)
    return digest.hexdigest()


def push(
    sock: socket.socket,
    limit: int,
    stall: float = 2.0,
    deadline: float = 30.0,
    chunk: int = 1 << 20,
) -> tuple[int, bool]:
    """
    Send up to C{limit} bytes without blocking; stop once no byte could be
    sent for C{stall} seconds, or after C{deadline} seconds.  Answers
    C{(bytes sent, whether sending stalled)}.
    """
    data = memoryview(b"\xa5" * chunk)
    sock.setblocking(False)
    sent = 0
    started = last_progress = time.monotonic()
    try:
        while sent < limit:
            now = time.monotonic()
            if now - last_progress >= stall:
                return sent, True
            if now - started >= deadline:
                return sent, False
            try:
                count = sock.send(data[: min(chunk, limit - sent)])
            except BlockingIOError:
                select.select([], [sock], [], 0.1)
                continue
            sent += count
            last_progress = time.monotonic()
        return sent, False
    finally:
        sock.settimeout(IO_TIMEOUT)
