"""
A scripted fake identd on a real loopback socket, for tests.

It runs on plain sockets in threads, so that tests on the real reactor and
black-box tests against a C{twistd} process can both use it:

    with FakeIdentd(user(b"alice")) as identd:
        ...  # point the code under test at 127.0.0.1:identd.port
        identd.script(error("NO-USER"), silent())  # the next two connections
        [query] = identd.queries

Each connection reads the query line, records it as a L{Query}, then plays
its L{Behaviour}: the next one of L{FakeIdentd.script}, else the default.
Answers echo the ports of the query and are written here by hand, not with
L{socks4tx.identwire}, so that the fake can't share a bug with the parser.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from blackbox import stop_process, wait_accepting
from tools import require_tool

_QUERY = re.compile(rb"\s*([0-9]+)\s*,\s*([0-9]+)\s*\r?\n")
_POLL = 0.05


@dataclass
class Query:
    """
    One connection to the fake identd.

    @ivar data: the query line as received, line end included.
    @ivar peer: the (host, port) the query came from.
    @ivar client_closed: set once the client closed its end (EOF or reset).
    """

    data: bytes
    peer: tuple[str, int]
    client_closed: threading.Event = field(default_factory=threading.Event)

    @property
    def ports(self) -> tuple[int, int] | None:
        """The query's port pair, or C{None} if it wasn't one."""
        match = _QUERY.fullmatch(self.data)
        if match is None:
            return None
        return int(match[1]), int(match[2])


class Conversation:
    """What a behaviour gets: the connection and the query's ports."""

    def __init__(
        self, sock: socket.socket, query: Query, stopping: threading.Event
    ) -> None:
        self.sock = sock
        self.query = query
        self.stopping = stopping

    @property
    def ports(self) -> tuple[int, int]:
        """The queried pair, or (0, 0) for a query that wasn't one."""
        return self.query.ports or (0, 0)

    def send(self, data: bytes) -> None:
        with contextlib.suppress(OSError):  # the client left first: its business
            self.sock.sendall(data)

    def wait_for_client_close(self, timeout: float | None = None) -> bool:
        """Read and drop until the client closes, the timeout, or stop()."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self.sock.settimeout(_POLL)
        while not self.stopping.is_set():
            if deadline is not None and time.monotonic() > deadline:
                return False
            try:
                if not self.sock.recv(4096):
                    break
            except TimeoutError:
                continue
            except OSError:
                break
        else:
            return False
        self.query.client_closed.set()
        return True


#: Plays one connection after its query was read; the socket is closed after.
Behaviour = Callable[[Conversation], None]


def _pair(ports: tuple[int, int], spaced: bool) -> bytes:
    return b"%d%s%d" % (ports[0], b" , " if spaced else b",", ports[1])


def line(raw: bytes) -> Behaviour:
    """Send C{raw} exactly, then wait for the client to close."""

    def play(conversation: Conversation) -> None:
        conversation.send(raw)
        conversation.wait_for_client_close(timeout=10)

    return play


def user(
    userid: bytes = b"alice",
    opsys: bytes = b"UNIX",
    spaced: bool = True,
    ports: tuple[int, int] | None = None,
) -> Behaviour:
    """
    A USERID answer for C{userid}, with RFC 1413's blanks around the
    separators or without them (as oidentd sends), echoing the queried
    ports unless C{ports} says otherwise.
    """
    sep = b" : " if spaced else b":"

    def play(conversation: Conversation) -> None:
        pair = _pair(ports or conversation.ports, spaced)
        answer = pair + sep + b"USERID" + sep + opsys + sep + userid + b"\r\n"
        line(answer)(conversation)

    return play


def error(kind: str, spaced: bool = True) -> Behaviour:
    """An ERROR answer of type C{kind} (C{NO-USER}, C{X-MINE}, ...)."""
    sep = b" : " if spaced else b":"

    def play(conversation: Conversation) -> None:
        pair = _pair(conversation.ports, spaced)
        line(pair + sep + b"ERROR" + sep + kind.encode("ascii") + b"\r\n")(conversation)

    return play


def wrong_ports(userid: bytes = b"alice") -> Behaviour:
    """A USERID answer about another connection: both ports off by one."""

    def play(conversation: Conversation) -> None:
        theirs, ours = conversation.ports
        user(userid, ports=(theirs % 65535 + 1, ours % 65535 + 1))(conversation)

    return play


def silent() -> Behaviour:
    """Never answer; hold the connection until the client gives up."""

    def play(conversation: Conversation) -> None:
        conversation.wait_for_client_close()

    return play


def close(partial: bytes = b"") -> Behaviour:
    """Send C{partial} (no line end) and close: a premature close."""

    def play(conversation: Conversation) -> None:
        conversation.send(partial)

    return play


def garbage(data: bytes = b"\x00\xffHTTP/1.0 400 Bad Request\r\n") -> Behaviour:
    """A line that is no ident answer."""
    return line(data)


def flood(size: int = 1001) -> Behaviour:
    """C{size} bytes without a line end, then wait for the client to close."""
    return line(b"x" * size)


def unused_port(host: str = "127.0.0.1") -> int:
    """A port on C{host} that nothing listens on (for a refused connection)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
    return port


class FakeIdentd:
    """
    The scripted identd; a context manager that starts and stops it.

    @ivar queries: every connection's L{Query}, in order of arrival.
    """

    def __init__(self, default: Behaviour | None = None, host: str = "127.0.0.1"):
        self.default = default or user()
        self.queries: list[Query] = []
        self._script: deque[Behaviour] = deque()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.bind((host, 0))
        self._listener.listen(16)
        self._listener.settimeout(_POLL)
        self.host = host
        self.port: int = self._listener.getsockname()[1]

    def script(self, *behaviours: Behaviour) -> None:
        """Play C{behaviours} for the next connections, one each, in order."""
        with self._lock:
            self._script.extend(behaviours)

    def wait_for_queries(self, count: int, timeout: float = 5.0) -> list[Query]:
        """Block until C{count} queries arrived; for callers off the reactor."""
        deadline = time.monotonic() + timeout
        while len(self.queries) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.queries)} of {count} queries arrived")
            time.sleep(0.01)
        return self.queries[:count]

    def start(self) -> FakeIdentd:
        self._spawn(self._accept_loop)
        return self

    def stop(self) -> None:
        """Close everything and join the threads (silent ones included)."""
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout=10)
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                sock.close()

    def __enter__(self) -> FakeIdentd:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._sockets.append(sock)
                behaviour = self._script.popleft() if self._script else self.default
            self._spawn(self._serve, sock, peer, behaviour)

    def _serve(
        self, sock: socket.socket, peer: tuple[str, int], behaviour: Behaviour
    ) -> None:
        with sock:
            data = self._read_query(sock)
            query = Query(data, (peer[0], peer[1]))
            with self._lock:
                self.queries.append(query)
            if data.endswith(b"\n"):
                behaviour(Conversation(sock, query, self._stopping))
            else:
                query.client_closed.set()

    def _read_query(self, sock: socket.socket) -> bytes:
        """The query line (up to 1000 bytes), or what came before EOF."""
        data = b""
        sock.settimeout(_POLL)
        while b"\n" not in data and len(data) < 1000:
            if self._stopping.is_set():
                break
            try:
                chunk = sock.recv(1000 - len(data))
            except TimeoutError:
                continue
            except OSError:
                break
            if not chunk:
                break
            data += chunk
        return data


# -- a real identd ----------------------------------------------------------------


def find_oidentd() -> str:
    """oidentd lives in /usr/sbin, which a non-root PATH may lack."""
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin"
    return shutil.which("oidentd", path=path) or require_tool("oidentd")


class Oidentd:
    """One C{oidentd -i -S} process on C{host}; L{stop} ends it."""

    def __init__(self, executable: str, host: str, workdir: Path) -> None:
        self.host = host
        config = workdir / "oidentd.conf"
        config.write_text("")
        self.log = workdir / f"oidentd-{host.replace(':', '_')}.log"
        # -i: foreground, -S: log to stderr, -C: no system or user config,
        # -t: drop a connection idle for 5 s.
        options = ["-i", "-S", "-C", str(config), "-t", "5"]
        for _ in range(5):  # another process may take the free port first
            self.port = unused_port(host)
            with self.log.open("wb") as log:
                self.process = subprocess.Popen(
                    [executable, *options, "-a", host, "-p", str(self.port)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            if wait_accepting(self.process, (self.host, self.port), 10.0):
                return
            self.stop()
        raise AssertionError(f"oidentd did not start:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.process, 5.0)
