"""
C{twistd socks4 --workers N}: the master and its workers.

Black-box tests run a real C{twistd -n socks4 --workers 2} and see the
workers through the JSON log (each worker event carries C{worker} and
C{worker_pid}); unit tests drive the master's parts with a fake reactor.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from blackbox import (
    CONNECT,
    GRANTED,
    LOOPBACK,
    REJECTED,
    TWISTD,
    ThreadedServer,
    TwistdProcess,
    read_reply,
    recv_exact,
    recv_until_eof,
    request_bytes,
    socks4_args,
)
from twisted.internet import error
from twisted.internet.task import Clock
from twisted.logger import (
    Logger,
    LogLevel,
    capturedLogs,
    eventFromJSON,
    formatEvent,
)
from twisted.python import usage
from twisted.python.failure import Failure

from socks4tx.tap import Options, makeService
from socks4tx.workers import (
    KILL_MARGIN,
    MAX_RESTART_DELAY,
    LineReader,
    WorkerPool,
    describe_exit,
    json_line,
    unshareable_listener,
)

StartServer = Callable[..., TwistdProcess]
MiB = 1 << 20
WORKERS = {1, 2}


# -- helpers ----------------------------------------------------------------------


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    """Bounded poll; the first true value of C{condition()}."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)


def ready_workers(server: TwistdProcess) -> dict[int, int]:
    """Worker index -> pid, from the latest ready event of each."""
    ready: dict[int, int] = {}
    for event in server.log_events(namespace="socks4tx.worker"):
        if event.get("ready"):
            ready[event["worker"]] = event["worker_pid"]
    return ready


def wait_ready(server: TwistdProcess, timeout: float = 15.0) -> dict[int, int]:
    return wait_until(
        lambda: (r := ready_workers(server)).keys() == WORKERS and r,
        f"both workers ready\n{server.output()}",
        timeout,
    )


def start_workers(start_server: StartServer, *extra: str) -> TwistdProcess:
    server: TwistdProcess = start_server("--workers", "2", *extra, json_log=True)
    wait_ready(server)
    return server


@contextlib.contextmanager
def stoppable_workers(workdir: Path, *extra: str) -> Iterator[TwistdProcess]:
    """Like L{start_workers}, for a test that stops the server itself."""
    workdir.mkdir()
    server = TwistdProcess(
        socks4_args("--workers", "2", *extra), workdir, json_log=True
    )
    try:
        wait_ready(server)
        yield server
    finally:
        server.stop()


def exchange(
    proxy: tuple[str, int] | str, destination: int, payload: bytes
) -> tuple[int, int]:
    """
    One CONNECT to 127.0.0.1:C{destination} (an echo server) through
    C{proxy} (a TCP address or a UNIX socket path) and C{payload} both ways,
    SHA-256 checked; (reply code, client port or 0).
    """
    if isinstance(proxy, str):
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(10)
        sock.connect(proxy)
        port = 0
    else:
        sock = socket.create_connection(proxy, timeout=10)
        port = sock.getsockname()[1]
    with sock:
        sock.sendall(request_bytes(CONNECT, destination, LOOPBACK, b"worker"))
        reply = read_reply(sock)
        if reply.code != GRANTED:
            return reply.code, port
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        echoed = recv_exact(sock, len(payload))
        sender.join(10)
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
    return reply.code, port


def served_by(server: TwistdProcess, ports: set[int]) -> dict[int, set[int]]:
    """Worker index -> the pids that served sessions from C{ports}."""
    served: dict[int, set[int]] = {}
    for event in server.session_events():
        if event.get("client_port") in ports:
            served.setdefault(event["worker"], set()).add(event["worker_pid"])
    return served


def serve_until(
    server: TwistdProcess,
    echo: ThreadedServer,
    done: Callable[[dict[int, set[int]]], bool],
    what: str,
    timeout: float = 10.0,
) -> dict[int, set[int]]:
    """Batches of concurrent exchanges until C{done(served_by(...))}."""
    ports: set[int] = set()
    deadline = time.monotonic() + timeout
    while True:
        batch: list[tuple[int, int]] = []

        def one(batch: list[tuple[int, int]] = batch) -> None:
            batch.append(exchange(server.address, echo.port, os.urandom(4096)))

        threads = [threading.Thread(target=one) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(15)
        assert [code for code, _ in batch] == [GRANTED] * len(threads), batch
        ports.update(port for _, port in batch)
        for _, port in batch:
            server.wait_for_session(port)
        served = served_by(server, ports)
        if done(served):
            return served
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s {served}"


def wait_refused(address: tuple[str, int], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(address, timeout=1).close()
        except ConnectionRefusedError:
            return
        assert time.monotonic() < deadline, f"{address} still accepts"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -- black box: the real thing ----------------------------------------------------


@pytest.mark.timeout(60)
def test_both_workers_serve_and_relay(echo: ThreadedServer, tmp_path: Path) -> None:
    path = str(tmp_path / "s4.sock")
    with stoppable_workers(
        tmp_path / "server", "--listen", f"unix:{path}:mode=600"
    ) as server:
        serve_tcp_and_unix(server, echo, path)
    assert server.process.returncode in (0, -signal.SIGTERM), server.output()
    assert not os.path.exists(path)


def serve_tcp_and_unix(server: TwistdProcess, echo: ThreadedServer, path: str) -> None:
    pids = ready_workers(server)
    assert all(alive(pid) for pid in pids.values())
    # The master holds the listeners, the workers only serve them: the
    # UNIX socket keeps the mode it was created with.
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

    payload = os.urandom(1 * MiB)
    code, port = exchange(server.address, echo.port, payload)
    assert code == GRANTED
    event = server.wait_for_session(port)
    assert (event["reason"], event["bytes_up"], event["bytes_down"]) == (
        "relayed",
        len(payload),
        len(payload),
    )
    assert pids[event["worker"]] == event["worker_pid"]
    assert exchange(path, echo.port, payload)[0] == GRANTED
    # A client on the UNIX socket has no name: the record names the socket.
    event = server.wait_for_session(None, client=f"unix:{path}")
    assert event["reason"] == "relayed"

    served = serve_until(
        server, echo, lambda s: s.keys() == WORKERS, "both workers serving"
    )
    assert served == {index: {pid} for index, pid in pids.items()}
    server.assert_alive()


@pytest.mark.timeout(60)
def test_a_killed_worker_is_restarted(
    start_server: StartServer, echo: ThreadedServer
) -> None:
    server = start_workers(start_server)
    before = ready_workers(server)
    os.kill(before[1], signal.SIGKILL)
    # The other worker serves meanwhile.
    assert exchange(server.address, echo.port, b"meanwhile")[0] == GRANTED
    after = wait_until(
        lambda: (r := ready_workers(server))[1] != before[1] and r,
        f"worker 1 restarted\n{server.output()}",
    )
    assert after[2] == before[2]
    assert not alive(before[1])
    [ended] = [
        e
        for e in server.log_events(namespace="socks4tx.worker")
        if e.get("worker_pid") == before[1] and "restarting" in e["log_text"]
    ]
    assert "killed by signal 9" in ended["log_text"], ended
    serve_until(
        server,
        echo,
        lambda s: after[1] in s.get(1, set()),
        "the new worker 1 serving",
    )


@pytest.mark.timeout(60)
def test_sighup_reloads_the_rules_in_every_worker(
    start_server: StartServer, echo: ThreadedServer, tmp_path: Path
) -> None:
    rules = tmp_path / "rules.conf"
    rules.write_text("deny 0.0.0.0 0.0.0.0\n")
    server = start_workers(start_server, "--rules", str(rules))
    for _ in range(4):
        assert exchange(server.address, echo.port, b"x")[0] == REJECTED

    rules.write_text("permit 127.0.0.0 255.0.0.0\n")
    server.process.send_signal(signal.SIGHUP)
    wait_until(
        lambda: (
            {
                e["worker"]
                for e in server.log_events(namespace="socks4tx.rules")
                if "rules reloaded" in e["log_text"]
            }
            == WORKERS
        ),
        f"both workers reloaded\n{server.output()}",
    )
    # Every request is permitted now, whichever worker takes it.
    serve_until(server, echo, lambda s: s.keys() == WORKERS, "both workers permit")
    readies = [e for e in server.log_events("socks4tx.worker") if e.get("ready")]
    assert len(readies) == 2, "no worker was restarted"


@pytest.mark.timeout(60)
def test_sigterm_loses_no_byte_and_everyone_exits(tmp_path: Path) -> None:
    """
    SIGTERM to the master after 8 MiB of a 48 MiB echo: the listeners close,
    the transfer completes whole both ways, then workers and master exit.
    """
    size = 48 * MiB
    data = os.urandom(size)
    with stoppable_workers(tmp_path / "server", "--shutdown-grace", "20") as server:
        pids = ready_workers(server)
        port = transfer_through_a_shutdown(server, data)
    assert server.process.returncode in (0, -signal.SIGTERM), server.output()
    assert not any(alive(pid) for pid in pids.values())
    stopped = [e["log_text"] for e in server.log_events("socks4tx.worker")]
    assert not any("restarting" in text for text in stopped), stopped
    event = server.wait_for_session(port, timeout=1)
    assert (event["reason"], event["bytes_up"], event["bytes_down"]) == (
        "relayed",
        size,
        size,
    )


def transfer_through_a_shutdown(server: TwistdProcess, data: bytes) -> int:
    """The echo of C{data}, SIGTERM to the master on the way; the client port."""
    size = len(data)
    received = hashlib.sha256()
    count = [0]

    def read_all(sock: socket.socket) -> None:
        while count[0] < size:
            chunk = sock.recv(1 << 20)
            if not chunk:
                return
            received.update(chunk)
            count[0] += len(chunk)

    def echo_handler(conn: socket.socket) -> str:
        digest = hashlib.sha256()
        conn.settimeout(30)
        while chunk := conn.recv(1 << 20):
            digest.update(chunk)
            conn.sendall(chunk)
        return digest.hexdigest()

    with (
        ThreadedServer(echo_handler) as dest,
        socket.create_connection(server.address, timeout=30) as sock,
    ):
        port = sock.getsockname()[1]
        sock.sendall(request_bytes(CONNECT, dest.port, LOOPBACK, b"big"))
        assert read_reply(sock).code == GRANTED
        reader = threading.Thread(target=read_all, args=(sock,))
        reader.start()
        sock.sendall(data[: 8 * MiB])
        wait_until(lambda: count[0] >= 4 * MiB, "4 MiB echoed")
        server.process.send_signal(signal.SIGTERM)
        wait_until(
            lambda: any(
                "shutting down" in e["log_text"]
                for e in server.log_events(namespace="socks4tx.listen")
            ),
            f"a worker draining\n{server.output()}",
        )
        wait_refused(server.address)
        sock.sendall(data[8 * MiB :])
        sock.shutdown(socket.SHUT_WR)
        reader.join(30)
        assert count[0] == size
        assert received.digest() == hashlib.sha256(data).digest()
        assert dest.wait_results(timeout=10) == [hashlib.sha256(data).hexdigest()]
        assert recv_until_eof(sock) == b""
    try:
        server.process.wait(15)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"master still running\n{server.output()}") from None
    return port


def test_workers_stop_when_the_master_is_gone(tmp_path: Path) -> None:
    """A master killed outright can't supervise: its workers drain and exit."""
    with stoppable_workers(tmp_path / "server") as server:
        pids = ready_workers(server)
        server.process.kill()
        server.process.wait(5)
        wait_until(
            lambda: not any(alive(pid) for pid in pids.values()),
            "the workers gone",
        )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--listen", f"haproxy:tcp:0:interface={LOOPBACK}"],
            "worker processes can share tcp:, tcp6: and unix: listeners only",
        ),
        ([], "is not a number of worker processes"),
    ],
    ids=["haproxy", "zero"],
)
def test_startup_refusals(tmp_path: Path, extra: list[str], message: str) -> None:
    workers = "0" if not extra else "2"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    done = subprocess.run(
        [str(TWISTD), "-n", "--pidfile=", *socks4_args("--workers", workers, *extra)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode != 0
    assert message in done.stdout + done.stderr, done


# -- options ------------------------------------------------------------------------


def parsed(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


def test_one_worker_by_default_is_the_single_process() -> None:
    options = parsed()
    assert options["workers"] == 1
    assert not isinstance(makeService(options, Clock()), WorkerPool)


def test_several_workers_make_a_master() -> None:
    arguments = ["--workers", "3", "--listen", "tcp:0", "--shutdown-grace", "4"]
    options = parsed(*arguments)
    master = makeService(options, Clock())
    assert isinstance(master, WorkerPool)
    assert len(master.slots) == 3
    assert master.arguments == arguments
    assert master.shutdown_grace == 4


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5", ""])
def test_bad_worker_counts(value: str) -> None:
    with pytest.raises(usage.UsageError):
        parsed("--workers", value)


@pytest.mark.parametrize(
    "description",
    ["tcp:1080", "tcp6:1080:interface=\\:\\:1", "unix:/run/s4.sock:mode=660"],
)
def test_shareable_listeners(description: str) -> None:
    assert unshareable_listener(description) is None
    parsed("--workers", "2", "--listen", description)


@pytest.mark.parametrize(
    "description", ["haproxy:tcp:1080", "systemd:domain=INET:index=0"]
)
@pytest.mark.usefixtures("systemd_socket")
def test_unshareable_listeners(description: str) -> None:
    assert unshareable_listener(description) is not None
    parsed("--listen", description)  # fine in one process
    with pytest.raises(usage.UsageError, match="listener"):
        parsed("--workers", "2", "--listen", description)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_mistyped_listener_is_named_as_such(workers: str) -> None:
    assert unshareable_listener("nonsense:1080") is not None
    with pytest.raises(usage.UsageError, match="Unknown endpoint type"):
        parsed("--workers", workers, "--listen", "nonsense:1080")


def test_the_worker_module_leaves_the_reactor_to_install() -> None:
    """The worker installs the master's kind of reactor: nothing before it may."""
    code = (
        "import sys, socks4tx.worker;"
        " assert 'twisted.internet.reactor' not in sys.modules"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=30)


# -- the master's parts -------------------------------------------------------------


def test_line_reader_splits_and_keeps_a_partial_line() -> None:
    lines: list[tuple[bytes, bool]] = []
    reader = LineReader(lambda line, truncated: lines.append((line, truncated)))
    for piece in (b"one\ntw", b"o\n", b"", b"\n", b"three"):
        reader.feed(piece)
    assert lines == [(b"one", False), (b"two", False), (b"", False)]
    reader.close()
    assert lines[-1] == (b"three", False)


def test_line_reader_bounds_a_long_line() -> None:
    lines: list[tuple[bytes, bool]] = []
    reader = LineReader(lambda line, truncated: lines.append((line, truncated)), 8)
    for _ in range(1000):
        reader.feed(b"x" * 1000)
        assert len(reader._buffer) <= 8
    reader.feed(b"tail\nnext\n")
    assert lines == [(b"x" * 8, True), (b"next", False)]


def test_json_line_keeps_the_fields_and_the_failure_message() -> None:
    events: list[dict[str, Any]] = []
    log = Logger(namespace="socks4tx.session", observer=events.append)
    log.info("a {{brace}} {client}", client="127.0.0.1", bytes_up=3, rule=None)
    try:
        raise ValueError("the reason")
    except ValueError:
        log.failure("it broke")
    session, broken = (eventFromJSON(json_line(e)) for e in events)
    assert (session["client"], session["bytes_up"], session["rule"]) == (
        "127.0.0.1",
        3,
        None,
    )
    assert session["log_level"] is LogLevel.info
    assert formatEvent(session) == "a {brace} 127.0.0.1"
    assert "ValueError: the reason" in broken["log_failure"].getTraceback()


def test_describe_exit() -> None:
    assert describe_exit(Failure(error.ProcessDone(0))) == "exit status 0"
    assert describe_exit(Failure(error.ProcessTerminated(3))) == "exit status 3"
    assert (
        describe_exit(Failure(error.ProcessTerminated(None, signal.SIGKILL)))
        == "killed by signal 9 (SIGKILL)"
    )


class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[str] = []

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class FakeReactor(Clock):
    """A clock that spawns fake processes and runs callbacks at once."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, FakeProcess, list[str]]] = []

    def callWhenRunning(self, f: Callable[..., Any], *args: Any) -> None:
        f(*args)

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        f(*args)

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], **kw: Any):
        process = FakeProcess(1000 + len(self.spawned))
        self.spawned.append((protocol, process, args))
        return process


@contextlib.contextmanager
def running_pool(count: int = 2, grace: float = 10.0) -> Iterator[tuple]:
    reactor = FakeReactor()
    published: list[dict[str, Any]] = []
    pool = WorkerPool(
        reactor, [], ["--workers", str(count)], count, grace, publish=published.append
    )
    previous = signal.getsignal(signal.SIGHUP)
    pool.startService()
    try:
        yield reactor, pool, published
    finally:
        if pool.running:
            pool.stopService()
        signal.signal(signal.SIGHUP, previous)


def say(protocol: Any, **fields: Any) -> None:
    """A worker's JSON event line, as its master reads it."""
    events: list[dict[str, Any]] = []
    Logger(namespace=fields.pop("namespace"), observer=events.append).info(
        "said", **fields
    )
    protocol.childDataReceived(1, json_line(events[0]).encode())


def exit_with(protocol: Any, status: int | None, signum: int | None = None) -> None:
    protocol.processEnded(Failure(error.ProcessTerminated(status, signum)))


def test_worker_events_are_published_with_the_worker() -> None:
    with running_pool() as (reactor, _, published):
        protocol, process, args = reactor.spawned[0]
        assert args[1:5] == ["-m", "socks4tx.worker", "--index", "1"]
        assert args[-3:] == ["--", "--workers", "2"]
        say(protocol, namespace="socks4tx.session", client="127.0.0.1", reply=90)
        [session] = published
        assert (session["worker"], session["worker_pid"]) == (1, process.pid)
        assert session["log_system"] == "worker 1: socks4tx.session#info"
        assert (session["client"], session["reply"]) == ("127.0.0.1", 90)
        # Anything else the worker writes is logged as text, line by line.
        with capturedLogs() as logged:
            protocol.childDataReceived(2, b"Traceback: oops\nand")
            protocol.childDataReceived(1, b"not json\n")
            protocol.childConnectionLost(2)
        assert [formatEvent(e) for e in logged] == [
            f"worker 1 (pid {process.pid}): Traceback: oops",
            f"worker 1 (pid {process.pid}): not json",
            f"worker 1 (pid {process.pid}): and",
        ]
        assert len(published) == 1


def test_sighup_waits_for_a_worker_to_be_ready() -> None:
    with running_pool() as (reactor, pool, _):
        (first, one, _), (second, two, _) = reactor.spawned
        say(first, namespace="socks4tx.worker", ready=True)
        pool.reload()
        assert (one.signals, two.signals) == (["HUP"], [])
        say(second, namespace="socks4tx.worker", ready=True)
        assert two.signals == ["HUP"]


def test_restart_back_off() -> None:
    with running_pool(count=1) as (reactor, pool, _):
        delays = []
        for _ in range(8):
            protocol, _, _ = reactor.spawned[-1]
            reactor.advance(0.5)
            exit_with(protocol, 1)
            [slot] = pool.slots
            assert slot.restart is not None
            delays.append(slot.restart.getTime() - reactor.seconds())
            reactor.advance(delays[-1])
        assert delays == [0.5, 1.5, 3.5, 7.5, 15.5, 29.5, 29.5, 29.5]
        assert MAX_RESTART_DELAY == 30
        # A worker that ran a while restarts at once.
        protocol, _, _ = reactor.spawned[-1]
        reactor.advance(60)
        exit_with(protocol, None, signal.SIGKILL)
        reactor.advance(0)
        assert len(reactor.spawned) == 10


def test_a_worker_that_cannot_be_spawned_is_tried_again() -> None:
    with running_pool(count=1) as (reactor, pool, _):
        spawn = reactor.spawnProcess
        reactor.spawnProcess = lambda *a, **kw: 1 / 0  # type: ignore[method-assign]
        exit_with(reactor.spawned[0][0], 1)
        with capturedLogs() as logged:
            reactor.advance(1)
        assert "could not be started" in formatEvent(logged[0])
        assert not pool.slots[0].running
        reactor.spawnProcess = spawn  # type: ignore[method-assign]
        reactor.advance(2)
        assert pool.slots[0].running
        assert len(reactor.spawned) == 2


def test_stop_terms_waits_and_kills_the_late() -> None:
    with running_pool(grace=3) as (reactor, pool, _):
        (first, one, _), (second, two, _) = reactor.spawned
        stopped = pool.stopService()
        assert (one.signals, two.signals) == (["TERM"], ["TERM"])
        exit_with(first, 0)
        assert not stopped.called
        reactor.advance(3 + KILL_MARGIN)
        assert two.signals == ["TERM", "KILL"]
        exit_with(second, None, signal.SIGKILL)
        assert stopped.called
        assert len(reactor.spawned) == 2, "nothing restarted while stopping"
