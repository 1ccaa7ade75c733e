#!/usr/bin/env python3
"""
Benchmark socks4tx beside other SOCKS4 servers and a direct connection.

One run starts the destination servers, the servers under test ("peers") and
the load, measures each figure in several rounds with the peers alternating
inside every round, and prints the median of each peer, the ratios of the
first peer to the others, and issue 5's targets (met or missed) for each
socks4tx configuration.  A peer that cannot run here is reported and left
out.  See bench/README.rst.

Everything runs on 127.0.0.1.  The load generator lives in child processes of
this script (throughput: blocking sockets with 256 KiB buffers, one thread per
stream; handshakes: a single-process selectors state machine), so that the
peer under test, not the load, is what runs out of CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes.util
import errno
import gc
import json
import multiprocessing
import multiprocessing.connection
import os
import platform
import random
import resource
import selectors
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Address = tuple[str, int]
Sample = dict[str, Any]

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
MB = 1_000_000  # throughput and transfer sizes are in decimal megabytes
KIB = 1024
MIB = 1024 * 1024
CHUNK = 256 * KIB
IO_TIMEOUT = 30.0  # seconds, for any single blocking socket operation
SERVER_LIFETIME = 4 * 3600.0  # a destination server never outlives this
CLK_TCK = os.sysconf("SC_CLK_TCK")
FORK = multiprocessing.get_context("fork")

#: A stream to the stream server starts with a mode and a byte count:
#: b"U" upload (the server reads that many bytes, then answers b"K"),
#: b"D" download (the server sends that many bytes).
STREAM_HEADER = struct.Struct("!cQ")
UPLOAD = b"U"
DOWNLOAD = b"D"
ECHO_PAYLOAD = b"socks4tx bench!\n"
SEND_VIEW = memoryview(bytes(CHUNK))
#: What a load process says when its measured interval starts, and ends.
MARK = ("mark", None)


class BenchError(Exception):
    """Something in the benchmark itself went wrong."""


class PeerStartError(BenchError):
    """A server under test did not start (or never became ready)."""


# -- small socket helpers -------------------------------------------------------


def free_port() -> int:
    """
    A loopback port that nothing used a moment ago: the kernel's pick, or,
    when TIME_WAIT sockets of the connection-rate test hold every ephemeral
    port, one below the ephemeral range.
    """
    candidates = [0, *random.sample(range(20000, 32000), 50)]
    for candidate in candidates:
        with socket.socket() as sock:
            try:
                sock.bind((LOOPBACK, candidate))
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    raise
                continue
            port: int = sock.getsockname()[1]
            return port
    raise BenchError("no free port")


def listener(backlog: int = 4096) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LOOPBACK, 0))
    sock.listen(backlog)
    return sock


def socks4_connect_request(dest: Address, userid: bytes = b"") -> bytes:
    host, port = dest
    return struct.pack("!BBH4s", 4, 1, port, socket.inet_aton(host)) + userid + b"\0"


def recv_exact(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:  # at least one byte per pass, or an exception
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise BenchError(f"connection closed after {len(data)} of {count} bytes")
        data += chunk
    return data


def open_session(
    proxy: Address | None, dest: Address, timeout: float = IO_TIMEOUT
) -> socket.socket:
    """A blocking socket connected to C{dest}, through C{proxy} if given."""
    sock = socket.create_connection(proxy or dest, timeout=timeout)
    try:
        if proxy is not None:
            sock.sendall(socks4_connect_request(dest))
            reply = recv_exact(sock, 8)
            if reply[1] != 90:
                raise BenchError(f"SOCKS4 reply {reply[1]} instead of 90")
    except BaseException:
        sock.close()
        raise
    return sock


def send_bytes(sock: socket.socket, count: int, deadline: float) -> None:
    left = count
    while left > 0:  # count / CHUNK passes at most
        size = min(left, CHUNK)
        sock.sendall(SEND_VIEW[:size])
        left -= size
        if time.monotonic() > deadline:
            raise BenchError("send: out of time")


def recv_bytes(sock: socket.socket, count: int, deadline: float) -> None:
    view = memoryview(bytearray(CHUNK))
    left = count
    while left > 0:  # at least one byte per pass, and a deadline
        got = sock.recv_into(view, min(left, CHUNK))
        if not got:
            raise BenchError(f"recv: closed with {left} bytes missing")
        left -= got
        if time.monotonic() > deadline:
            raise BenchError("recv: out of time")


# -- /proc ----------------------------------------------------------------------


def process_tree(root: int) -> list[int]:
    """C{root} and its descendants (e.g. the workers of a pre-forking peer)."""
    found = [root]
    pending = [root]
    while pending and len(found) < 1000:
        pid = pending.pop()
        for task in _listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                with open(f"/proc/{pid}/task/{task}/children") as children:
                    kids = [int(kid) for kid in children.read().split()]
                found.extend(kids)
                pending.extend(kids)
    return found


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _proc_sum(pids: Sequence[int], name: str, key: str) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/{name}") as lines:
            for line in lines:
                if line.startswith(key):
                    total += int(line.split()[1])
                    break
    return total


def meminfo_kib(key: str, readings: int = 3, gap: float = 0.05) -> float:
    """
    A field of /proc/meminfo (machine-wide), in KiB: the median of a few
    readings C{gap} seconds apart (slab counters move in per-CPU batches).
    """
    values = []
    for index in range(readings):
        if index:
            time.sleep(gap)
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith(f"{key}:"):
                    values.append(int(line.split()[1]))
                    break
    if not values:
        raise BenchError(f"no {key} in /proc/meminfo")
    return float(statistics.median(values))


def rss_kib(pids: Sequence[int]) -> int:
    """The sum of VmRSS over C{pids}, in KiB."""
    return _proc_sum(pids, "status", "VmRSS:")


def pss_kib(pids: Sequence[int]) -> int:
    """
    The sum of the proportional set sizes over C{pids}, in KiB: unlike RSS,
    pages shared between forked processes are counted once in all.
    """
    return _proc_sum(pids, "smaps_rollup", "Pss:")


def cpu_seconds(pids: Sequence[int]) -> float:
    """
    User plus system CPU time used so far by C{pids} (all threads) and by
    their children that have exited and been waited for.
    """
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            ticks += sum(int(value) for value in fields[11:15])
    return ticks / CLK_TCK


@dataclass(frozen=True)
class MachineCPU:
    """Jiffies of the whole machine (all CPUs), from /proc/stat."""

    busy: float
    steal: float
    total: float

    @classmethod
    def now(cls) -> MachineCPU:
        with open("/proc/stat") as stat:
            values = [float(v) for v in stat.readline().split()[1:9]]
        values += [0.0] * (8 - len(values))
        idle = values[3] + values[4]  # idle, iowait
        return cls(busy=sum(values) - idle, steal=values[7], total=sum(values))

    def busy_since(self, earlier: MachineCPU) -> float:
        """The share of all CPUs' time that was busy since C{earlier}."""
        return (self.busy - earlier.busy) / max(1.0, self.total - earlier.total)

    def steal_since(self, earlier: MachineCPU) -> float:
        return (self.steal - earlier.steal) / max(1.0, self.total - earlier.total)


# -- destination servers (child processes) -------------------------------------


def _child_setup() -> None:
    """Ctrl-C goes to the whole process group: let the parent do the stopping."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def serve_streams(sock: socket.socket) -> None:
    """The upload sink and download source: one blocking thread per stream."""
    _child_setup()
    parent = os.getppid()
    sock.settimeout(1.0)
    end = time.monotonic() + SERVER_LIFETIME
    while time.monotonic() < end and os.getppid() == parent:
        try:
            conn, _ = sock.accept()
        except TimeoutError:
            continue
        threading.Thread(target=_stream_session, args=(conn,), daemon=True).start()


def _stream_session(conn: socket.socket) -> None:
    with conn, contextlib.suppress(OSError, BenchError):
        conn.settimeout(IO_TIMEOUT)
        mode, count = STREAM_HEADER.unpack(recv_exact(conn, STREAM_HEADER.size))
        deadline = time.monotonic() + 3600
        if mode == UPLOAD:
            recv_bytes(conn, count, deadline)
            conn.sendall(b"K")
        elif mode == DOWNLOAD:
            send_bytes(conn, count, deadline)
        conn.recv(1)  # the client closes first: no TIME_WAIT here


def serve_echo(sock: socket.socket, close_after: int = 0) -> None:
    """
    Echo whatever arrives and close on EOF.  C{close_after=0}: hold idle
    connections; else close each one as soon as that many bytes are echoed.
    """
    _child_setup()
    parent = os.getppid()
    sock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ, None)
    echoed: dict[socket.socket, int] = {}
    end = time.monotonic() + SERVER_LIFETIME
    next_check = 0.0
    while True:
        now = time.monotonic()
        if now > next_check:
            if now > end or os.getppid() != parent:
                return
            next_check = now + 1.0
        for key, _ in sel.select(1.0):
            if key.data is None:
                for _ in range(64):
                    try:
                        conn, _ = sock.accept()
                    except BlockingIOError:
                        break
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ, True)
                continue
            conn = key.fileobj  # type: ignore[assignment]
            try:
                data = conn.recv(65536)
                if data:
                    conn.send(data)  # a few bytes: the send buffer takes them
                    echoed[conn] = echoed.get(conn, 0) + len(data)
                    if not close_after or echoed[conn] < close_after:
                        continue
            except OSError:
                pass
            echoed.pop(conn, None)
            sel.unregister(conn)
            conn.close()


# -- load generators (child processes) -----------------------------------------


def stream_load(
    conn: multiprocessing.connection.Connection,
    proxy: Address | None,
    dest: Address,
    mode: bytes,
    streams: int,
    count: int,
    limit: float,
) -> Sample:
    """C{streams} concurrent streams of C{count} bytes each, started together."""
    deadline = time.monotonic() + limit
    barrier = threading.Barrier(streams + 1, timeout=60)
    spans: list[tuple[float, float] | None] = [None] * streams
    errors: list[str] = []

    def stream(index: int) -> None:
        try:
            with open_session(proxy, dest) as sock:
                barrier.wait()
                start = time.perf_counter()
                sock.sendall(STREAM_HEADER.pack(mode, count))
                if mode == UPLOAD:
                    send_bytes(sock, count, deadline)
                    recv_exact(sock, 1)
                else:
                    recv_bytes(sock, count, deadline)
                spans[index] = (start, time.perf_counter())
        except Exception as e:
            errors.append(f"{type(e).__name__}: {e}")
            barrier.abort()

    threads = [
        threading.Thread(target=stream, args=(i,), daemon=True) for i in range(streams)
    ]
    for thread in threads:
        thread.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        barrier.wait()
    conn.send(MARK)
    cpu0 = time.process_time()
    for thread in threads:
        thread.join(max(0.1, deadline - time.monotonic() + 5))
    cpu1 = time.process_time()
    conn.send(MARK)
    done = [span for span in spans if span is not None]
    if errors or len(done) != streams:
        raise BenchError(f"{streams - len(done)} streams failed: {errors[:3]}")
    start = min(span[0] for span in done)
    elapsed = max(span[1] for span in done) - start
    rates = [count / (end - begin) / MB for begin, end in done]
    return {
        "bytes": count * streams,
        "seconds": elapsed,
        "client_cpu": cpu1 - cpu0,
        "slowest_stream_mbps": min(rates),
        "fastest_stream_mbps": max(rates),
    }


_CONNECTING, _REPLY, _ECHO = 0, 1, 2


class _Exchange:
    __slots__ = ("buf", "sock", "start", "state")

    def __init__(self, sock: socket.socket, start: float) -> None:
        self.sock = sock
        self.start = start
        self.state = _CONNECTING
        self.buf = b""


class ExchangeEngine:
    """
    Many concurrent exchanges in one thread: connect, (SOCKS4 CONNECT, wait
    for 90,) send L{ECHO_PAYLOAD}, read it back; then close, or hold.
    """

    def __init__(self, proxy: Address | None, dest: Address, hold: bool) -> None:
        self.target = proxy or dest
        self.request = socks4_connect_request(dest) if proxy else None
        self.hold = hold
        self.sel = selectors.DefaultSelector()
        self.active = 0
        self.errors = 0
        self.last_error = ""
        self.record_from = 0.0
        self.latencies: list[float] = []
        self.held: list[socket.socket] = []

    def start(self) -> None:
        sock = socket.socket()
        sock.setblocking(False)
        exchange = _Exchange(sock, time.perf_counter())
        self.active += 1
        err = sock.connect_ex(self.target)
        if err not in (0, errno.EINPROGRESS):
            self._fail(exchange, OSError(err, os.strerror(err)), registered=False)
            return
        self.sel.register(sock, selectors.EVENT_WRITE, exchange)

    def poll(self, timeout: float) -> None:
        for key, _ in self.sel.select(timeout):
            exchange: _Exchange = key.data
            try:
                self._step(exchange)
            except (OSError, BenchError) as e:
                self._fail(exchange, e, registered=True)

    def _step(self, ex: _Exchange) -> None:
        sock = ex.sock
        if ex.state == _CONNECTING:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
            if self.request is not None:
                self._send(sock, self.request)
                ex.state = _REPLY
            else:
                self._send(sock, ECHO_PAYLOAD)
                ex.state = _ECHO
            self.sel.modify(sock, selectors.EVENT_READ, ex)
            return
        want = 8 if ex.state == _REPLY else len(ECHO_PAYLOAD)
        data = sock.recv(want - len(ex.buf))
        if not data:
            raise BenchError(f"closed in state {ex.state} after {ex.buf!r}")
        ex.buf += data
        if len(ex.buf) < want:
            return
        if ex.state == _REPLY:
            if ex.buf[1] != 90:
                raise BenchError(f"SOCKS4 reply {ex.buf[1]}")
            ex.buf = b""
            ex.state = _ECHO
            self._send(sock, ECHO_PAYLOAD)
            return
        if ex.buf != ECHO_PAYLOAD:
            raise BenchError("echo mismatch")
        end = time.perf_counter()
        self.sel.unregister(sock)
        self.active -= 1
        if self.hold:
            self.held.append(sock)
        else:
            sock.close()
        if end >= self.record_from:
            self.latencies.append(end - ex.start)

    @staticmethod
    def _send(sock: socket.socket, data: bytes) -> None:
        if sock.send(data) != len(data):
            raise BenchError("short send")

    def _fail(self, ex: _Exchange, error: Exception, registered: bool) -> None:
        self.errors += 1
        self.last_error = f"{type(error).__name__}: {error}"
        self.active -= 1
        if registered:
            self.sel.unregister(ex.sock)
        ex.sock.close()

    def close(self) -> None:
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self.sel.close()
        for sock in self.held:
            sock.close()
        self.held.clear()


def exchange_rate_load(
    conn: multiprocessing.connection.Connection,
    proxy: Address | None,
    dest: Address,
    clients: int,
    warmup: float,
    duration: float,
) -> Sample:
    """C{clients} concurrent exchanges, each followed by a new one, for a while."""
    gc.disable()  # no collector pauses in the latencies; few cycles are made
    engine = ExchangeEngine(proxy, dest, hold=False)
    begin = time.perf_counter()
    engine.record_from = begin + warmup
    stop = engine.record_from + duration
    max_errors = 1000
    cpu0 = 0.0
    try:
        while engine.errors < max_errors:  # and the clock, below
            now = time.perf_counter()
            if now >= stop:
                break
            if cpu0 == 0.0 and now >= engine.record_from:
                conn.send(MARK)
                cpu0 = time.process_time()
            while engine.active < clients:
                engine.start()
            engine.poll(min(0.05, stop - now))
        cpu1 = time.process_time()
        conn.send(MARK)
    finally:
        engine.close()
    if engine.errors >= max_errors:
        raise BenchError(f"{engine.errors} failed exchanges: {engine.last_error}")
    latencies = sorted(engine.latencies)
    if not latencies:
        raise BenchError(f"no exchange completed ({engine.last_error})")
    return {
        "exchanges": len(latencies),
        "seconds": duration,
        "rate": len(latencies) / duration,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "max_ms": 1000 * latencies[-1],
        "errors": engine.errors,
        "last_error": engine.last_error,
        "client_cpu": cpu1 - cpu0 if cpu0 else 0.0,
    }


def hold_sessions_load(
    conn: multiprocessing.connection.Connection,
    proxy: Address | None,
    dest: Address,
    count: int,
    limit: float,
) -> Sample:
    """
    Say "ready"; when told, open C{count} sessions (one echo each, relayed
    unless C{proxy} is None); say "held"; hold them until told.
    """
    conn.send(("ready", None))
    if not conn.poll(limit):
        raise BenchError("never told to open the sessions")
    conn.recv()
    engine = ExchangeEngine(proxy, dest, hold=True)
    deadline = time.monotonic() + limit
    try:
        while len(engine.held) < count and engine.errors < count:
            if time.monotonic() > deadline:
                raise BenchError(f"only {len(engine.held)} of {count} sessions opened")
            while engine.active < 100 and len(engine.held) + engine.active < count:
                engine.start()
            engine.poll(0.05)
        if engine.errors >= count:
            raise BenchError(f"{engine.errors} failed sessions: {engine.last_error}")
        conn.send(("held", len(engine.held)))
        if not conn.poll(limit):
            raise BenchError("never told to release the sessions")
        conn.recv()
        return {"held": len(engine.held), "errors": engine.errors}
    finally:
        engine.close()


def slow_reader_load(
    proxy: Address | None,
    dest: Address,
    count: int,
    trickle: float,
    limit: float,
) -> Sample:
    """
    Ask for C{count} bytes, read them at a trickle (16 KiB per 20 ms) for
    C{trickle} seconds, then as fast as possible, within C{limit} seconds.
    """
    deadline = time.monotonic() + limit
    view = memoryview(bytearray(CHUNK))
    received = 0
    with open_session(proxy, dest) as sock:
        sock.sendall(STREAM_HEADER.pack(DOWNLOAD, count))
        start = time.monotonic()
        trickle_end = start + trickle
        while time.monotonic() < trickle_end and received < count:  # ~trickle/0.02
            received += sock.recv_into(view, min(16 * KIB, count - received))
            time.sleep(0.02)
        trickled = received
        drain_start = time.monotonic()
        while received < count and time.monotonic() < deadline:
            got = sock.recv_into(view, min(CHUNK, count - received))
            if not got:
                break
            received += got
        end = time.monotonic()
    return {
        "bytes": received,
        "trickled": trickled,
        "drain_seconds": end - drain_start,
        "complete": received == count,
    }


def _child_main(
    conn: multiprocessing.connection.Connection,
    func: Callable[..., Sample],
    pass_conn: bool,
    args: tuple[Any, ...],
) -> None:
    _child_setup()
    try:
        result = func(conn, *args) if pass_conn else func(*args)
        conn.send(("ok", result))
    except BaseException as e:
        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        conn.close()


class Child:
    """A load generator in a forked process, answering through a pipe."""

    def __init__(
        self, func: Callable[..., Sample], *args: Any, pass_conn: bool = False
    ) -> None:
        self.conn, child_conn = FORK.Pipe()
        self.process = FORK.Process(
            target=_child_main,
            args=(child_conn, func, pass_conn, args),
            daemon=True,
        )
        self.process.start()
        child_conn.close()

    def receive(self, timeout: float) -> tuple[str, Any]:
        if not self.conn.poll(timeout):
            raise BenchError(f"load process silent for {timeout:.0f} s")
        try:
            message: tuple[str, Any] = self.conn.recv()
        except EOFError:
            raise BenchError("load process died") from None
        if message[0] == "error":
            raise BenchError(f"load process failed: {message[1]}")
        return message

    def mark(self, timeout: float) -> float:
        """Wait for the load's next L{MARK}; when it came."""
        kind, _ = self.receive(timeout)
        if kind != MARK[0]:
            raise BenchError(f"unexpected message {kind!r}")
        return time.perf_counter()

    def result(self, timeout: float) -> Sample:
        kind, value = self.receive(timeout)
        if kind != "ok":
            raise BenchError(f"unexpected message {kind!r}")
        self.stop()
        result: Sample = value
        return result

    def stop(self) -> None:
        self.process.join(5)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        self.conn.close()


# -- peers ------------------------------------------------------------------------


def socks4_ready(proxy: Address, echo: Address) -> None:
    """Ready when a SOCKS4 CONNECT to the echo server echoes."""
    with open_session(proxy, echo, timeout=5) as sock:
        sock.sendall(ECHO_PAYLOAD)
        if recv_exact(sock, len(ECHO_PAYLOAD)) != ECHO_PAYLOAD:
            raise BenchError("echo mismatch")


def _twistd() -> str:
    return str(Path(sys.executable).parent / "twistd")


def _probe_output(argv: list[str], env: dict[str, str]) -> str:
    try:
        done = subprocess.run(
            argv,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"<{e}>"
    return done.stdout + done.stderr


def probe_twistd_plugin(name: str, *options: str) -> Callable[[], str | None]:
    """A probe: is C{twistd NAME} there (with C{options}) in the source tree?"""

    def probe() -> str | None:
        env = {"PYTHONPATH": str(ROOT)}
        listing = _probe_output([_twistd(), "--help"], env)
        if not any(line.split()[:1] == [name] for line in listing.splitlines()):
            return f"`twistd --help` lists no {name!r} plugin"
        if options:
            usage = _probe_output([_twistd(), name, "--help"], env)
            missing = [option for option in options if f"{option}=" not in usage]
            if missing:
                return f"`twistd {name}` has no {', '.join(missing)} option"
        return None

    return probe


def probe_program(program: str) -> Callable[[], str | None]:
    def probe() -> str | None:
        return None if shutil.which(program) else f"{program} not found"

    return probe


#: Dante's configuration: listens on 127.0.0.1 only, connects out from
#: 127.0.0.1 only, and passes only loopback clients going to loopback
#: destinations with CONNECT (the default for anything else is block).
DANTE_CONF = """\
logoutput: stderr
internal: 127.0.0.1 port = {port}
external: 127.0.0.1
clientmethod: none
socksmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {{ from: 127.0.0.0/8 to: 127.0.0.0/8 }}
socks pass {{ from: 127.0.0.0/8 to: 127.0.0.0/8 command: connect }}
"""


def rules_file(count: int) -> str:
    """
    A rules file of C{count} rules whose last one permits the load (loopback
    clients): the others miss, by source, destination or port, with a mix
    of masks, so every lookup passes all of them (issue 3's 1-rule vs
    1,000-rule handshake case).
    """
    lines = []
    for i in range(count - 1):
        source = f"172.{16 + i % 16}.{i // 16 % 256}.0/{16 + i % 17}"
        if i % 3 == 0:
            lines.append(f"deny {source}")
        elif i % 3 == 1:
            lines.append(f"permit {source} 10.{i % 256}.0.0 255.255.0.0 eq {1 + i}")
        else:
            lines.append(f"deny ?=i *=user{i} 0.0.0.0/0 0.0.0.0/0 lt 1")
    lines.append("permit 127.0.0.0/8")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class PeerSpec:
    """
    A server under test.  C{argv} and C{files} are templates: C{{port}},
    C{{dir}} (a directory of its own), C{{python}}, C{{twistd}} and C{{root}}
    (the source tree) are filled in.  C{argv=None}: no server, the load goes
    straight to the destination.  C{subject}: a socks4tx configuration that
    the targets table judges; C{workers}: its number of processes.
    """

    name: str
    argv: tuple[str, ...] | None
    env: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    probe: Callable[[], str | None] | None = None
    ready: Callable[[Address, Address], None] = socks4_ready
    ready_timeout: float = 30.0
    subject: bool = False
    workers: int = 1


#: socks4tx's per-client-address session limit (256 by default) would refuse
#: the idle test's 2,000 sessions, all from 127.0.0.1: lifted for every
#: socks4tx peer (the other servers have no such limit).
SOCKS4TX_LIMITS = ("--max-connections-per-source", "0")


def jemalloc_library() -> str | None:
    """jemalloc's shared library, if installed (Debian: C{libjemalloc2})."""
    return ctypes.util.find_library("jemalloc")


def jemalloc_env() -> dict[str, str]:
    """
    The environment that runs a Python server on jemalloc: preloaded, and
    Python's own small-object allocator off so that every object is
    jemalloc's (see README "Giving memory back").
    """
    library = jemalloc_library()
    if library is None:
        raise BenchError("jemalloc is not installed (apt-get install libjemalloc2)")
    return {"PYTHONMALLOC": "malloc", "LD_PRELOAD": library}


def probe_jemalloc() -> str | None:
    return None if jemalloc_library() else "libjemalloc2 is not installed"


def socks4tx_peer(
    name: str,
    *options: str,
    files: dict[str, str] | None = None,
    subject: bool = True,
    workers: int = 1,
    jemalloc: bool = False,
) -> PeerSpec:
    """
    socks4tx from the source tree with C{options}; probed for each of them
    (and for jemalloc, if it is to run on it).
    """
    argv = (
        "{twistd}", "-n", "--pidfile=", "socks4",
        "--listen", "tcp:{port}:interface=127.0.0.1",
        *SOCKS4TX_LIMITS, *options,
    )  # fmt: skip
    flags = [arg for arg in (*SOCKS4TX_LIMITS, *options) if arg.startswith("--")]
    probe_plugin = probe_twistd_plugin("socks4", *flags)
    env = {"PYTHONPATH": "{root}"}
    if jemalloc and jemalloc_library():
        env.update(jemalloc_env())

    def probe() -> str | None:
        return (probe_jemalloc() if jemalloc else None) or probe_plugin()

    return PeerSpec(
        name,
        argv,
        env=env,
        files=files or {},
        probe=probe,
        subject=subject,
        workers=workers,
    )


PEERS: dict[str, PeerSpec] = {
    spec.name: spec
    for spec in [
        # the default relay (auto: splice where it can)
        socks4tx_peer("socks4tx"),
        socks4tx_peer("socks4tx-w2", "--workers", "2", workers=2),
        socks4tx_peer("socks4tx-portable", "--relay", "portable"),
        socks4tx_peer("socks4tx-splice", "--relay", "splice"),
        socks4tx_peer("socks4tx-jemalloc", jemalloc=True, subject=False),
        socks4tx_peer(
            "socks4tx-rules1",
            "--rules", "{dir}/rules.conf",
            files={"rules.conf": rules_file(1)},
            subject=False,
        ),
        socks4tx_peer(
            "socks4tx-rules1000",
            "--rules", "{dir}/rules.conf",
            files={"rules.conf": rules_file(1000)},
            subject=False,
        ),
        PeerSpec(
            "twisted",
            ("{twistd}", "-n", "--pidfile=", "socks", "-i", "127.0.0.1",
             "-p", "{port}"),
        ),
        PeerSpec(
            "dante",
            ("danted", "-f", "{dir}/danted.conf"),
            files={"danted.conf": DANTE_CONF},
            probe=probe_program("danted"),
        ),
        PeerSpec("direct", None),
    ]
}  # fmt: skip
#: Issue 5's line-up.  The first one available is the subject of the ratio
#: columns; a peer that cannot run here is reported and left out.
DEFAULT_PEERS = (
    "socks4tx",
    "socks4tx-w2",
    "socks4tx-portable",
    "dante",
    "twisted",
    "direct",
)


class RunningPeer:
    """One started peer process (its own session: stopped as a group)."""

    def __init__(self, spec: PeerSpec, workdir: Path, echo: Address) -> None:
        self.spec = spec
        self.process: subprocess.Popen[bytes] | None = None
        self.address: Address | None = None
        self.workdir = workdir
        self.log = workdir / f"{spec.name}.log"
        if spec.argv is None:
            return
        try:
            self._start(echo)
        except BaseException:
            self.stop()
            raise

    def _start(self, echo: Address) -> None:
        spec = self.spec
        template = spec.argv or ()
        last = ""
        for _attempt in range(3):  # the free port may be taken meanwhile
            port = free_port()
            peer_dir = Path(tempfile.mkdtemp(prefix=f"{spec.name}-", dir=self.workdir))
            values = {
                "port": str(port),
                "dir": str(peer_dir),
                "python": sys.executable,
                "twistd": _twistd(),
                "root": str(ROOT),
            }
            for name, text in spec.files.items():
                (peer_dir / name).write_text(text.format(**values))
            argv = [arg.format(**values) for arg in template]
            env = {**os.environ, **{k: v.format(**values) for k, v in spec.env.items()}}
            with open(self.log, "ab") as log:
                log.write(f"\n=== {' '.join(argv)}\n".encode())
                log.flush()
                self.process = subprocess.Popen(
                    argv,
                    cwd=peer_dir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self.address = (LOOPBACK, port)
            last = self._wait_ready(echo)
            if not last:
                return
            self.stop()
        raise PeerStartError(f"{spec.name} did not start: {last}\n{self.log_tail()}")

    def _wait_ready(self, echo: Address) -> str:
        assert self.process is not None and self.address is not None
        deadline = time.monotonic() + self.spec.ready_timeout
        last = "not tried"
        while time.monotonic() < deadline:  # ~10 tries a second
            if self.process.poll() is not None:
                return f"exited with status {self.process.returncode}"
            try:
                self.spec.ready(self.address, echo)
                return ""
            except (OSError, BenchError) as e:
                last = f"{type(e).__name__}: {e}"
            time.sleep(0.1)
        return f"not ready after {self.spec.ready_timeout:.0f} s ({last})"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def alive(self) -> bool:
        return self.process is None or self.process.poll() is None

    def pids(self) -> list[int]:
        return process_tree(self.process.pid) if self.process else []

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)  # the group of the process we started
            try:
                process.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


# -- the benchmark ------------------------------------------------------------------


@dataclass
class Sizes:
    stream1_mb: int
    streams50_mb: int
    streams: int
    clients: int
    connect_seconds: float
    connect_warmup: float
    idle_sessions: int
    slow_mb: int
    slow_trickle: float
    slow_limit: float


class Bench:
    """The destination servers, the running peers, and the samples."""

    def __init__(self, sizes: Sizes, workdir: Path) -> None:
        self.sizes = sizes
        self.workdir = workdir
        self.children: list[multiprocessing.process.BaseProcess] = []
        self.peers: dict[str, RunningPeer] = {}
        stream_sock, echo_sock, closing_sock = listener(), listener(), listener()
        self.streams: Address = stream_sock.getsockname()
        #: holds its connections (readiness checks, idle sessions)
        self.echo: Address = echo_sock.getsockname()
        #: closes each connection once it has echoed L{ECHO_PAYLOAD}: the
        #: destination of the C{connect} test (see L{measure_connect})
        self.echo_closing: Address = closing_sock.getsockname()
        for target, args in (
            (serve_streams, (stream_sock,)),
            (serve_echo, (echo_sock,)),
            (serve_echo, (closing_sock, len(ECHO_PAYLOAD))),
        ):
            child = FORK.Process(target=target, args=args, daemon=True)
            child.start()
            self.children.append(child)
            args[0].close()
        self.stream_pid = self.children[0].pid or 0
        self.echo_pid = self.children[1].pid or 0
        self.echo_closing_pid = self.children[2].pid or 0

    def close(self) -> None:
        for peer in self.peers.values():
            peer.stop()
        self.peers.clear()
        for child in self.children:
            if child.is_alive():
                child.terminate()
            child.join(5)
            if child.is_alive():
                child.kill()
                child.join(5)

    def peer(self, spec: PeerSpec) -> RunningPeer:
        """The long-lived instance of a peer (restarted if it died)."""
        running = self.peers.get(spec.name)
        if running is not None and not running.alive():
            print(f"    ! {spec.name} died; restarting\n{running.log_tail()}")
            running.stop()
            running = None
        if running is None:
            running = self.peers[spec.name] = RunningPeer(spec, self.workdir, self.echo)
        return running

    @contextlib.contextmanager
    def fresh_peer(self, spec: PeerSpec) -> Iterator[RunningPeer]:
        """A new instance, for memory figures that earlier work would skew."""
        running = RunningPeer(spec, self.workdir, self.echo)
        try:
            yield running
        finally:
            running.stop()


@dataclass(frozen=True)
class Figure:
    """
    One row of the final table: a field of a measurement's samples (its
    median for each peer), less the median of peer C{minus} if given.
    """

    key: str
    label: str
    higher_is_better: bool
    fmt: str = "{:.0f}"
    minus: str | None = None

    @property
    def name(self) -> str:
        """Its key in the medians (JSON) and in L{Target}s."""
        return f"{self.key}_minus_{self.minus}" if self.minus else self.key


@dataclass(frozen=True)
class Measurement:
    name: str
    title: str
    run: Callable[[Bench, PeerSpec], Sample]
    figures: tuple[Figure, ...]
    needs_proxy: bool = False


def _load_cpu_fraction(cpu: float, seconds: float) -> float:
    return cpu / seconds if seconds > 0 else 0.0


#: A sample during which other processes used more than this share of a core
#: is counted as disturbed in the summary.
DISTURBED = 0.25


def _add_others(sample: Sample, machine_busy: float) -> None:
    """
    What the rest of the machine used meanwhile (other tenants, our own
    idle parent, kernel threads doing softirq work), in cores.
    """
    cores = machine_busy * (os.cpu_count() or 1)
    sample["machine_busy_fraction"] = machine_busy
    sample["others_cpu_fraction"] = max(
        0.0, cores - sample["proxy_cpu_fraction"] - sample["load_cpu_fraction"]
    )


def measure_streams(
    mode: bytes, streams_of: Callable[[Sizes], tuple[int, int]]
) -> Callable[[Bench, PeerSpec], Sample]:
    def run(bench: Bench, spec: PeerSpec) -> Sample:
        streams, megabytes = streams_of(bench.sizes)
        count = megabytes * MB
        peer = bench.peer(spec)
        limit = 60 + count * streams / (20 * MB)  # even at 20 MB/s
        child = Child(
            stream_load,
            peer.address,
            bench.streams,
            mode,
            streams,
            count,
            limit,
            pass_conn=True,
        )
        try:
            child.mark(90)
            proxy0, dest0 = cpu_seconds(peer.pids()), cpu_seconds([bench.stream_pid])
            machine0 = MachineCPU.now()
            child.mark(limit + 30)
            machine = MachineCPU.now().busy_since(machine0)
            proxy_cpu = cpu_seconds(peer.pids()) - proxy0
            dest_cpu = cpu_seconds([bench.stream_pid]) - dest0
            sample = child.result(30)
        except BaseException:
            child.stop()
            raise
        seconds = sample["seconds"]
        sample.update(
            mbps=sample["bytes"] / seconds / MB,
            proxy_cpu=proxy_cpu,
            dest_cpu=dest_cpu,
            proxy_cpu_fraction=_load_cpu_fraction(proxy_cpu, seconds),
            load_cpu_fraction=_load_cpu_fraction(
                sample["client_cpu"] + dest_cpu, seconds
            ),
            busiest_load_fraction=_load_cpu_fraction(
                max(sample["client_cpu"], dest_cpu), seconds
            ),
        )
        _add_others(sample, machine)
        if peer.process is not None:
            sample["cpu_s_per_gb"] = proxy_cpu / (sample["bytes"] / 1e9)
        return sample

    return run


def measure_connect(bench: Bench, spec: PeerSpec) -> Sample:
    """
    Exchange rate and latency.  The destination closes each connection once
    it has echoed, so the proxy's outgoing socket is closed by the far end
    and leaves no TIME_WAIT behind.  (Were the proxy to close first, a proxy
    that bind()s its outgoing sockets before connecting, as Dante does with
    C{external: 127.0.0.1}, would run out of ephemeral ports within seconds
    and answer 91: TIME_WAIT sockets cannot be re-bound, only re-connected.)
    """
    sizes = bench.sizes
    peer = bench.peer(spec)
    child = Child(
        exchange_rate_load,
        peer.address,
        bench.echo_closing,
        sizes.clients,
        sizes.connect_warmup,
        sizes.connect_seconds,
        pass_conn=True,
    )
    try:
        start = child.mark(sizes.connect_warmup + 60)
        echo = [bench.echo_closing_pid]
        proxy0, echo0 = cpu_seconds(peer.pids()), cpu_seconds(echo)
        machine0 = MachineCPU.now()
        end = child.mark(sizes.connect_seconds + 60)
        machine = MachineCPU.now().busy_since(machine0)
        proxy_cpu = cpu_seconds(peer.pids()) - proxy0
        echo_cpu = cpu_seconds(echo) - echo0
        sample = child.result(60)
    except BaseException:
        child.stop()
        raise
    seconds = end - start
    sample.update(
        proxy_cpu_fraction=_load_cpu_fraction(proxy_cpu, seconds),
        load_cpu_fraction=_load_cpu_fraction(echo_cpu + sample["client_cpu"], seconds),
        busiest_load_fraction=_load_cpu_fraction(
            max(echo_cpu, sample["client_cpu"]), seconds
        ),
    )
    exchanges = sample["exchanges"]
    if exchanges:
        # CPU per exchange is steadier than the rate on a shared machine.
        sample["load_cpu_us"] = (echo_cpu + sample["client_cpu"]) / exchanges * 1e6
        if peer.process is not None:
            sample["proxy_cpu_us"] = proxy_cpu / exchanges * 1e6
    _add_others(sample, machine)
    return sample


def _memory(peer: RunningPeer | None) -> tuple[int, int]:
    """RSS and PSS of a peer's process tree, in KiB (0, 0: no peer)."""
    if peer is None:
        return 0, 0
    pids = peer.pids()
    return rss_kib(pids), pss_kib(pids)


def measure_idle(bench: Bench, spec: PeerSpec) -> Sample:
    """
    Hold C{idle_sessions} sessions open and idle; the peer's memory and the
    machine's unreclaimable slab (SUnreclaim) with them held, minus before.
    The C{direct} peer holds the same sessions without a proxy: its
    SUnreclaim figure is what the load's own sockets cost.
    """
    count = bench.sizes.idle_sessions
    with contextlib.ExitStack() as stack:
        peer = None
        if spec.argv is not None:
            peer = stack.enter_context(bench.fresh_peer(spec))
            assert peer.address is not None
            for _ in range(20):  # warm up: the first sessions allocate once-only
                socks4_ready(peer.address, bench.echo)
        child = Child(
            hold_sessions_load,
            peer.address if peer else None,
            bench.echo,
            count,
            120.0,
            pass_conn=True,
        )
        try:
            child.receive(30)  # "ready": forked, nothing opened yet
            time.sleep(0.5)  # let the warm-up's sockets be freed (RCU)
            rss0, pss0 = _memory(peer)
            slab0 = meminfo_kib("SUnreclaim")
            child.conn.send("go")
            _, held = child.receive(150)
            time.sleep(1.0)  # let the peer settle
            rss1, pss1 = _memory(peer)
            slab1 = meminfo_kib("SUnreclaim")
            processes = len(peer.pids()) if peer else 0
            child.conn.send("release")
            sample = child.result(60)
        except BaseException:
            child.stop()
            raise
        time.sleep(1.0)
        rss2 = rss_kib(peer.pids()) if peer else 0
        slab2 = meminfo_kib("SUnreclaim")
    sample.update(
        sunreclaim_before_kib=slab0,
        sunreclaim_held_kib=slab1,
        sunreclaim_after_close_kib=slab2,
        sunreclaim_kib_per_session=(slab1 - slab0) / held,
    )
    if peer is not None:
        sample.update(
            processes=processes,
            rss_before_kib=rss0,
            rss_held_kib=rss1,
            rss_after_close_kib=rss2,
            kib_per_session=(rss1 - rss0) / held,
            pss_kib_per_session=(pss1 - pss0) / held,
        )
    return sample


def measure_slow_reader(bench: Bench, spec: PeerSpec) -> Sample:
    sizes = bench.sizes
    count = sizes.slow_mb * MB
    with bench.fresh_peer(spec) as peer:
        assert peer.address is not None
        time.sleep(0.3)
        before = rss_kib(peer.pids())
        peak = before
        child = Child(
            slow_reader_load,
            peer.address,
            bench.streams,
            count,
            sizes.slow_trickle,
            sizes.slow_limit,
        )
        try:
            deadline = time.monotonic() + sizes.slow_limit + 30
            while time.monotonic() < deadline:  # 20 samples a second
                pids = peer.pids()
                peak = max(peak, rss_kib(pids))
                if child.conn.poll(0.05):
                    break
            sample = child.result(5)
        except BaseException:
            child.stop()
            raise
        after = rss_kib(peer.pids())
    sample.update(
        rss_before_kib=before,
        rss_peak_kib=peak,
        rss_end_kib=after,
        peak_growth_mib=(peak - before) / KIB,
    )
    return sample


def _stream_figures(label: str) -> tuple[Figure, ...]:
    return (
        Figure("mbps", f"{label} (MB/s)", True),
        Figure("cpu_s_per_gb", "  proxy CPU s per GB", False, "{:.2f}"),
    )


#: In the order they run by default: C{connect} last, as the tens of
#: thousands of TIME_WAIT sockets it leaves (freed over 60 s) would move the
#: machine-wide SUnreclaim figure of C{idle}.
MEASUREMENTS: dict[str, Measurement] = {
    m.name: m
    for m in [
        Measurement(
            "up1",
            "upload, 1 stream",
            measure_streams(UPLOAD, lambda s: (1, s.stream1_mb)),
            _stream_figures("upload, 1 stream"),
        ),
        Measurement(
            "down1",
            "download, 1 stream",
            measure_streams(DOWNLOAD, lambda s: (1, s.stream1_mb)),
            _stream_figures("download, 1 stream"),
        ),
        Measurement(
            "up50",
            "upload, concurrent streams",
            measure_streams(UPLOAD, lambda s: (s.streams, s.streams50_mb)),
            _stream_figures("upload, N streams, total"),
        ),
        Measurement(
            "down50",
            "download, concurrent streams",
            measure_streams(DOWNLOAD, lambda s: (s.streams, s.streams50_mb)),
            _stream_figures("download, N streams, total"),
        ),
        Measurement(
            "idle",
            "idle relayed sessions held: memory per session",
            measure_idle,
            (
                Figure("kib_per_session", "RSS per idle session (KiB)", False,
                       "{:.1f}"),
                Figure("pss_kib_per_session", "  PSS per idle session (KiB)",
                       False, "{:.1f}"),
                Figure("sunreclaim_kib_per_session",
                       "  SUnreclaim per session, machine (KiB)", False,
                       "{:.1f}"),
                Figure("sunreclaim_kib_per_session",
                       "  SUnreclaim per session - direct's (KiB)", False,
                       "{:.1f}", minus="direct"),
            ),
        ),
        Measurement(
            "slow",
            "slow reader, peak RSS growth",
            measure_slow_reader,
            (Figure("peak_growth_mib", "slow reader peak RSS growth (MiB)", False,
                    "{:.1f}"),),
            needs_proxy=True,
        ),
        Measurement(
            "connect",
            "CONNECT + echo exchanges, concurrent clients",
            measure_connect,
            (
                Figure("rate", "CONNECT exchanges/s, N clients", True),
                Figure("p99_ms", "  p99 exchange latency (ms)", False, "{:.1f}"),
                Figure("proxy_cpu_us", "  proxy CPU per exchange (us)", False,
                       "{:.0f}"),
            ),
        ),
    ]
}  # fmt: skip


@dataclass(frozen=True)
class Target:
    """
    One of issue 5's targets: C{figure} of measurement C{measurement} for a
    socks4tx configuration, divided by peer C{versus}'s (or taken as it is,
    C{versus=None}), must be at least (C{at_least}) or at most C{goal}.
    C{workers}: the configurations it applies to (None: all of them).
    """

    label: str
    measurement: str
    figure: str
    goal: float
    at_least: bool
    versus: str | None = None
    workers: int | None = None
    unit: str = ""

    @property
    def goal_text(self) -> str:
        sign = ">=" if self.at_least else "<="
        if self.versus is None:
            return f"{sign} {self.goal:g} {self.unit}".rstrip()
        return f"{sign} {self.goal:g}x {self.versus}"

    def value(self, medians: dict[str, Any], peer: str) -> float | None:
        values = medians.get(self.measurement, {}).get(self.figure, {})
        mine = values.get(peer)
        if mine is None or self.versus is None:
            return mine  # type: ignore[no-any-return]
        theirs = values.get(self.versus)
        return mine / theirs if theirs else None

    def met(self, value: float) -> bool:
        return value >= self.goal if self.at_least else value <= self.goal

    def cell(self, value: float | None) -> str:
        if value is None:
            return "-"
        shown = f"{value:.2f}x" if self.versus else f"{value:.1f} {self.unit}"
        return f"{shown} {'met' if self.met(value) else 'MISSED'}"


TARGETS: tuple[Target, ...] = (
    Target("throughput, 1 stream up", "up1", "mbps", 0.85, True, "direct"),
    Target("throughput, 1 stream down", "down1", "mbps", 0.85, True, "direct"),
    Target("throughput, 1 stream up", "up1", "mbps", 1.5, True, "dante"),
    Target("throughput, 1 stream down", "down1", "mbps", 1.5, True, "dante"),
    Target("throughput, 50 streams up", "up50", "mbps", 1.3, True, "dante"),
    Target("throughput, 50 streams down", "down50", "mbps", 1.3, True, "dante"),
    Target("CPU s/GB, 1 stream up", "up1", "cpu_s_per_gb", 0.3, False, "dante"),
    Target("CPU s/GB, 1 stream down", "down1", "cpu_s_per_gb", 0.3, False, "dante"),
    Target("CPU s/GB, 50 streams up", "up50", "cpu_s_per_gb", 0.3, False, "dante"),
    Target("CPU s/GB, 50 streams down", "down50", "cpu_s_per_gb", 0.3, False,
           "dante"),
    Target("handshakes/s, 50 clients", "connect", "rate", 1.0, True, "twisted",
           workers=1),
    Target("handshakes/s, 50 clients", "connect", "rate", 1.2, True, "dante",
           workers=2),
    Target("  p99 latency", "connect", "p99_ms", 1.0, False, "dante", workers=2),
    Target("RSS per idle session", "idle", "kib_per_session", 4, False,
           unit="KiB"),
    Target("SUnreclaim per idle session", "idle",
           "sunreclaim_kib_per_session_minus_direct", 16, False, unit="KiB"),
    Target("slow reader RSS growth", "slow", "peak_growth_mib", 2, False,
           unit="MiB"),
)  # fmt: skip


def targets_table(
    medians: dict[str, Any], subjects: Sequence[PeerSpec], skipped: dict[str, str]
) -> tuple[list[list[str]], list[dict[str, Any]]]:
    """
    Each target against each socks4tx configuration asked for ("skipped":
    one that could not run, or stopped starting before this figure).
    """
    rows = [["target", "goal", *(spec.name for spec in subjects)]]
    records = []
    for target in TARGETS:
        row = [target.label, target.goal_text]
        for spec in subjects:
            if target.workers is not None and spec.workers != target.workers:
                row.append("n/a")
                continue
            value = target.value(medians, spec.name)
            if value is None and spec.name in skipped:
                row.append("skipped")
                continue
            row.append(target.cell(value))
            records.append(
                {
                    "target": target.label,
                    "goal": target.goal_text,
                    "peer": spec.name,
                    "value": value,
                    "met": None if value is None else target.met(value),
                }
            )
        rows.append(row)
    return rows, records


def describe(name: str, sample: Sample) -> str:
    """One line per sample, as it comes."""
    if name in ("up1", "down1", "up50", "down50"):
        text = (
            f"{sample['mbps']:8.1f} MB/s in {sample['seconds']:.2f} s"
            f"  load CPU {100 * sample['load_cpu_fraction']:.0f}%"
        )
        if "cpu_s_per_gb" in sample:
            text += (
                f"  proxy CPU {100 * sample['proxy_cpu_fraction']:.0f}%"
                f" ({sample['cpu_s_per_gb']:.2f} s/GB)"
            )
        text += f"  others {100 * sample['others_cpu_fraction']:.0f}%"
        if name in ("up50", "down50"):
            text += (
                f"  streams {sample['slowest_stream_mbps']:.1f}"
                f"..{sample['fastest_stream_mbps']:.1f} MB/s"
            )
        return text
    if name == "connect":
        text = (
            f"{sample['rate']:8.0f} /s  p50 {sample['p50_ms']:.2f} ms"
            f"  p99 {sample['p99_ms']:.2f} ms  max {sample['max_ms']:.1f} ms"
            f"  errors {sample['errors']}"
            f"  load CPU {100 * sample['load_cpu_fraction']:.0f}%"
            f"  proxy CPU {100 * sample['proxy_cpu_fraction']:.0f}%"
        )
        if "proxy_cpu_us" in sample:
            text += f" ({sample['proxy_cpu_us']:.0f} us/exchange)"
        return text + f"  others {100 * sample['others_cpu_fraction']:.0f}%"
    if name == "idle":
        text = f"{sample['held']} held"
        if "kib_per_session" in sample:
            text = (
                f"{sample['kib_per_session']:8.1f} KiB/session"
                f" (PSS {sample['pss_kib_per_session']:.1f})"
                f"  RSS {sample['rss_before_kib'] / KIB:.1f}"
                f" -> {sample['rss_held_kib'] / KIB:.1f} MiB with {text}"
                f" ({sample['processes']} processes)"
                f" -> {sample['rss_after_close_kib'] / KIB:.1f} MiB after close"
            )
        return (
            f"{text}  SUnreclaim {sample['sunreclaim_kib_per_session']:.1f}"
            f" KiB/session ({sample['sunreclaim_before_kib'] / KIB:.1f}"
            f" -> {sample['sunreclaim_held_kib'] / KIB:.1f}"
            f" -> {sample['sunreclaim_after_close_kib'] / KIB:.1f} MiB)"
        )
    if name == "slow":
        return (
            f"{sample['peak_growth_mib']:8.1f} MiB peak growth"
            f"  RSS {sample['rss_before_kib'] / KIB:.1f}"
            f" -> peak {sample['rss_peak_kib'] / KIB:.1f}"
            f" -> end {sample['rss_end_kib'] / KIB:.1f} MiB"
            f"  read {sample['bytes'] / MB:.0f} MB"
            f" ({'complete' if sample['complete'] else 'INCOMPLETE'},"
            f" drain {sample['drain_seconds']:.1f} s)"
        )
    return json.dumps(sample)


def median_of(samples: list[Sample], key: str) -> float | None:
    values = [s[key] for s in samples if key in s and s[key] is not None]
    return statistics.median(values) if values else None


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def report(
    results: dict[str, dict[str, list[Sample]]],
    peers: Sequence[str],
    measurements: Sequence[Measurement],
) -> tuple[list[list[str]], dict[str, Any]]:
    subject, others = peers[0], list(peers[1:])
    header = ["measurement", *peers, *(f"{subject}/{other}" for other in others)]
    rows = [header]
    medians: dict[str, Any] = {}
    for m in measurements:
        for figure in m.figures:
            values = {p: median_of(results[m.name][p], figure.key) for p in peers}
            if figure.minus is not None:
                base = values.get(figure.minus)
                values = {
                    p: None if v is None or base is None or p == figure.minus
                    else v - base
                    for p, v in values.items()
                }  # fmt: skip
            medians.setdefault(m.name, {})[figure.name] = values
            row = [figure.label] + [_cell(values[p], figure.fmt) for p in peers]
            for other in others:
                a, b = values[subject], values[other]
                row.append("-" if a is None or not b else f"{a / b:.2f}")
            rows.append(row)
    return rows, medians


def print_table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for index, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])]
        cells += [
            cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)
        ]
        print(" | ".join(cells))
        if index == 0:
            print("-+-".join("-" * width for width in widths))


def load_check(
    results: dict[str, dict[str, list[Sample]]],
    medians: dict[str, Any],
    peers: Sequence[str],
) -> list[str]:
    """
    Is the load the limit?  The direct path should be far above the proxies,
    and neither load process (client, destination) should be near a whole
    core while a proxy is measured.  (Their sum may exceed one core when the
    proxy needs little CPU, e.g. with splice: loopback TCP work is charged to
    the sending and receiving processes.)
    """
    lines = []
    proxies = [p for p in peers if PEERS[p].argv is not None]
    if "direct" not in peers:
        lines.append("(no 'direct' peer: the load's ceiling was not measured)")
    for name, key in (
        ("up1", "mbps"),
        ("down1", "mbps"),
        ("up50", "mbps"),
        ("down50", "mbps"),
        ("connect", "rate"),
    ):
        values = medians.get(name, {}).get(key)
        if not values:
            continue
        best = max((values[p] for p in proxies if values.get(p)), default=None)
        load = [
            sample["load_cpu_fraction"]
            for p in proxies
            for sample in results[name][p]
            if "load_cpu_fraction" in sample
        ]
        busiest = [
            sample["busiest_load_fraction"]
            for p in proxies
            for sample in results[name][p]
            if "busiest_load_fraction" in sample
        ]
        text = f"{name:8}"
        verdicts = []
        if best and values.get("direct"):
            factor = values["direct"] / best
            text += f" direct {values['direct']:.0f} = x{factor:.1f} the best proxy;"
            verdicts.append(factor >= 1.5)
        if load and busiest:
            text += (
                f" load CPU while proxied at most {100 * max(load):.0f}% of a core,"
                f" the busiest load process {100 * max(busiest):.0f}%"
            )
            verdicts.append(max(busiest) < 0.9)
        if verdicts:
            ok = all(verdicts)
            lines.append(f"{text} ({'ok' if ok else 'THE LOAD MAY BE THE LIMIT'})")
    return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, help="rounds (default 3; --quick: 2)")
    parser.add_argument(
        "--peers",
        default=",".join(DEFAULT_PEERS),
        help=f"comma list from {', '.join(PEERS)}; the first one is compared "
        f"with the others (default {','.join(DEFAULT_PEERS)})",
    )
    parser.add_argument(
        "--only",
        default=",".join(MEASUREMENTS),
        help=f"comma list of measurements from {', '.join(MEASUREMENTS)}",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--json", type=Path, help="write all raw figures here")
    parser.add_argument("--stream-mb", type=int, help="MB per 1-stream transfer")
    parser.add_argument("--streams", type=int, default=50, help="concurrent streams")
    parser.add_argument("--streams-mb", type=int, help="MB per concurrent stream")
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients")
    parser.add_argument("--connect-seconds", type=float, help="measured seconds")
    parser.add_argument("--idle", type=int, help="idle sessions held (default 2000)")
    parser.add_argument("--slow-mb", type=int, help="MB pushed at the slow reader")
    parser.add_argument(
        "--slow-trickle", type=float, help="seconds the slow reader trickles"
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=30.0,
        help="skip the samples left after this long (default 30)",
    )
    args = parser.parse_args(argv)
    for name, low, high in (
        ("rounds", 1, 100),
        ("streams", 1, 1000),
        ("clients", 1, 1000),
        ("idle", 1, 9000),  # the proxy holds two descriptors per session
        ("stream_mb", 1, 100_000),
        ("streams_mb", 1, 10_000),
        ("slow_mb", 1, 10_000),
        ("connect_seconds", 0.1, 600),
        ("slow_trickle", 0, 15),
        ("max_minutes", 1, 600),
    ):
        check_range(parser, args, name, low, high)
    return args


def check_range(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    name: str,
    low: float,
    high: float,
) -> None:
    """Refuse an option given outside [low, high] (None: not given)."""
    value = getattr(args, name)
    if value is not None and not low <= value <= high:
        parser.error(f"--{name.replace('_', '-')}: from {low} to {high}")


def picker(args: argparse.Namespace) -> Callable[[Any, Any, Any], Any]:
    """pick(value, full, small): the option given, else the --quick or full size."""

    def pick(value: Any, full: Any, small: Any) -> Any:
        return value if value is not None else (small if args.quick else full)

    return pick


def sizes_from(args: argparse.Namespace) -> Sizes:
    pick = picker(args)
    return Sizes(
        stream1_mb=pick(args.stream_mb, 2000, 300),
        streams50_mb=pick(args.streams_mb, 100, 6),
        streams=args.streams,
        clients=args.clients,
        connect_seconds=pick(args.connect_seconds, 3.0, 1.5),
        connect_warmup=0.5,
        idle_sessions=pick(args.idle, 2000, 2000),
        slow_mb=pick(args.slow_mb, 300, 100),
        slow_trickle=pick(args.slow_trickle, 3.0, 1.5),
        slow_limit=20.0,
    )


def choose(text: str, table: dict[str, Any], what: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in table]
    if unknown or not names:
        raise SystemExit(f"unknown {what}: {unknown}; choose from {', '.join(table)}")
    return list(dict.fromkeys(names))


def raise_nofile() -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(f"stopped by signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    asked = peer_names = choose(args.peers, PEERS, "peers")
    chosen = choose(args.only, MEASUREMENTS, "measurements")
    measurements = [MEASUREMENTS[name] for name in chosen]
    sizes = sizes_from(args)
    rounds = args.rounds or (2 if args.quick else 3)
    nofile = raise_nofile()
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)

    specs: list[PeerSpec] = []
    skipped: dict[str, str] = {}
    for name in peer_names:
        spec = PEERS[name]
        why = spec.probe() if spec.probe else None
        if why:
            skipped[name] = f"not available: {why}"
            print(f"peer {name} skipped: {why}")
        else:
            specs.append(spec)
    if not specs:
        raise SystemExit("no peer can run here")
    peer_names = [spec.name for spec in specs]
    width = max(len(name) for name in peer_names)

    print(
        f"socks4tx bench: {rounds} rounds; peers {', '.join(peer_names)};"
        f" {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f};"
        f" open files {nofile[0]}"
    )
    print(f"sizes: {sizes}")
    results: dict[str, dict[str, list[Sample]]] = {
        m.name: {p: [] for p in peer_names} for m in measurements
    }
    failures: list[str] = []
    started = time.monotonic()
    budget_end = started + 60 * args.max_minutes
    out_of_time = 0
    machine0 = MachineCPU.now()
    workdir = Path(tempfile.mkdtemp(prefix="socks4tx-bench-"))
    bench = Bench(sizes, workdir)
    try:
        for m in measurements:
            print(f"\n== {m.title}")
            m_started = time.monotonic()
            for r in range(rounds):
                order = specs[r % len(specs) :] + specs[: r % len(specs)]
                for spec in order:
                    if m.needs_proxy and spec.argv is None:
                        continue
                    if spec.name in skipped:
                        continue
                    if time.monotonic() > budget_end:
                        out_of_time += 1
                        continue
                    label = f"  round {r + 1} {spec.name:<{width}}"
                    try:
                        sample = m.run(bench, spec)
                    except PeerStartError as e:
                        skipped[spec.name] = f"did not start ({m.name} round {r + 1})"
                        failures.append(f"{m.name} round {r + 1} {spec.name}: {e}")
                        print(f"{label} FAILED TO START; skipped from now on")
                        print(textwrap.indent(str(e), "      "))
                        continue
                    except (BenchError, OSError) as e:
                        message = f"{m.name} round {r + 1} {spec.name}: {e}"
                        failures.append(message)
                        print(f"{label} FAILED {str(e).splitlines()[0]}")
                        continue
                    sample["round"] = r + 1
                    results[m.name][spec.name].append(sample)
                    print(f"{label} {describe(m.name, sample)}", flush=True)
            print(f"  ({m.name}: {time.monotonic() - m_started:.0f} s)")
    except KeyboardInterrupt:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    except BaseException:
        print(f"peer logs kept in {workdir}", file=sys.stderr)
        raise
    finally:
        bench.close()
    machine1 = MachineCPU.now()
    elapsed = time.monotonic() - started
    steal = 100 * machine1.steal_since(machine0)

    rows, medians = report(results, peer_names, measurements)
    print(
        f"\nMedians of {rounds} rounds (N = {sizes.streams} streams,"
        f" {sizes.clients} clients); ratios: {peer_names[0]} / other"
    )
    print_table(rows)
    subjects = [PEERS[name] for name in asked if PEERS[name].subject]
    target_records: list[dict[str, Any]] = []
    if subjects:
        target_rows, target_records = targets_table(medians, subjects, skipped)
        print(
            f"\nIssue 5 targets, from these medians ({rounds} rounds;"
            " '-': a figure not measured; n/a: for the other worker count)"
        )
        print_table(target_rows)
    print("\nLoad generator check (direct path vs the proxies):")
    for line in load_check(results, medians, peer_names):
        print(f"  {line}")
    timed = [
        s for m in results.values() for p in m.values() for s in p
        if "others_cpu_fraction" in s
    ]  # fmt: skip
    disturbed = [s for s in timed if s["others_cpu_fraction"] > DISTURBED]
    print(
        f"\n{elapsed:.0f} s; load average now {os.getloadavg()[0]:.2f};"
        f" CPU steal during the run {steal:.1f}%"
    )
    if timed:
        print(
            f"{len(disturbed)} of {len(timed)} timed samples ran while other"
            f" processes used over {100 * DISTURBED:.0f}% of a core"
        )
    if out_of_time:
        print(
            f"\n{out_of_time} samples not taken: the run went over"
            f" --max-minutes {args.max_minutes:g}"
        )
    for name, why in skipped.items():
        print(f"peer {name} skipped: {why}")
    if failures:
        print(f"\n{len(failures)} failed samples:")
        for failure in failures:
            print(f"  {failure.splitlines()[0]}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "meta": {
                        "argv": sys.argv,
                        "rounds": rounds,
                        "peers": peer_names,
                        "sizes": sizes.__dict__,
                        "cpus": os.cpu_count(),
                        "platform": platform.platform(),
                        "python": sys.version,
                        "elapsed_s": elapsed,
                        "steal_percent": steal,
                        "disturbed_samples": len(disturbed),
                        "loadavg_end": os.getloadavg(),
                        "skipped_peers": skipped,
                        "samples_not_taken": out_of_time,
                    },
                    "samples": results,
                    "medians": medians,
                    "targets": target_records,
                    "failures": failures,
                },
                indent=1,
            )
        )
        print(f"raw figures: {args.json}")
    if failures:
        print(f"peer logs kept in {workdir}")
        return 1
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit("interrupted; everything started was stopped")
