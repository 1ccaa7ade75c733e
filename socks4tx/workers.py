"""
C{twistd socks4 --workers N}: the master process of N worker processes.

The twistd process becomes the master.  It binds every listener before
twistd drops privileges and keeps the sockets open; each worker
(L{socks4tx.worker}) inherits them and accepts from the same queues, so the
kernel spreads connections over the workers and a dead worker's share goes
to the others while it restarts (a socket per worker with C{SO_REUSEPORT}
was measured as no faster, and strands the connections queued on a dead
worker's socket).  The master serves no client: it restarts workers that
die, forwards SIGHUP, drains them all on SIGTERM, and re-publishes their log
events (JSON lines on their standard output) in its own log, adding the
fields C{worker} and C{worker_pid}.
"""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import site
import sys
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any, cast

from twisted.application import service
from twisted.internet import defer, error, tcp
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IProcessTransport
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.logger import (
    ILogObserver,
    LogEvent,
    Logger,
    eventAsJSON,
    eventFromJSON,
    globalLogPublisher,
)
from twisted.python.failure import Failure
from twisted.python.reflect import safe_str

import socks4tx
from socks4tx import __version__
from socks4tx.session import describe

log = Logger(namespace="socks4tx.worker")
listen_log = Logger(namespace="socks4tx.listen")

#: The listener kinds that worker processes can share: plain sockets.
SHAREABLE_KINDS = ("tcp", "tcp6", "unix")
#: A worker's first inherited listener is this descriptor, the next one up.
FIRST_LISTENER_FD = 3
#: Bytes of one line a worker may write; the rest of a longer one is dropped.
MAX_LINE = 1 << 20
#: Characters of a line that is not an event shown in the master's log.
MAX_TEXT = 8192
#: A slot restarts its worker at most once in this many seconds ...
RESTART_INTERVAL = 1.0
#: ... and a worker that keeps dying within this many seconds of its start
#: waits twice as long each time, up to MAX_RESTART_DELAY.
STABLE_AFTER = 10.0
MAX_RESTART_DELAY = 30.0
#: Seconds past --shutdown-grace before a worker still running gets SIGKILL.
KILL_MARGIN = 5.0


def unshareable_listener(description: str) -> str | None:
    """
    Why C{description} can't be served by worker processes (None: it can).
    Wrappers (ssl:, haproxy:) would need the wrapping redone in every
    worker, and systemd: sockets are the master's to inherit.
    """
    if description.split(":", 1)[0] in SHAREABLE_KINDS:
        return None
    return (
        f"--listen {description}: worker processes can share tcp:, tcp6: and"
        " unix: listeners only; use --workers 1 for this one"
    )


def describe_exit(reason: Failure) -> str:
    """C{exit status 3}, C{killed by signal 9}: how a worker ended."""
    value = reason.value
    number = getattr(value, "signal", None)
    if number is not None:
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = str(number)
        return f"killed by signal {number} ({name})"
    return f"exit status {getattr(value, 'exitCode', None) or 0}"


def json_line(event: LogEvent) -> str:
    """
    One worker event as a line for the master (L{twisted.logger.eventAsJSON}).
    A failure's exception can't be serialized: its text goes in its place,
    so that the master's traceback still ends with the message.
    """
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        shipped = copy.copy(failure)
        shipped.value = cast(Any, safe_str(failure.value))
        event = {**event, "log_failure": shipped}
    return eventAsJSON(event) + "\n"


class LineReader:
    """
    Splits a byte stream into lines for C{deliver(line, truncated)}.  Only
    the first C{max_line} bytes of a line are kept (and delivered with
    C{truncated=True}), so a worker can't make the master buffer without
    bound.
    """

    def __init__(
        self, deliver: Callable[[bytes, bool], None], max_line: int = MAX_LINE
    ) -> None:
        self.deliver = deliver
        self.max_line = max_line
        self._buffer = bytearray()
        self._truncated = False

    def feed(self, data: bytes) -> None:
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            self._keep(data[start:end])
            self._flush()
            start = end + 1
        self._keep(data[start:])

    def close(self) -> None:
        """The stream ended: deliver an unfinished last line."""
        if self._buffer or self._truncated:
            self._flush()

    def _flush(self) -> None:
        line, truncated = bytes(self._buffer), self._truncated
        self._buffer.clear()
        self._truncated = False
        self.deliver(line, truncated)

    def _keep(self, piece: bytes) -> None:
        room = self.max_line - len(self._buffer)
        if len(piece) > room:
            piece = piece[:room]
            self._truncated = True
        self._buffer += piece


class _WorkerProcess(ProcessProtocol):
    """One run of a worker: its output, read line by line, and its end."""

    def __init__(self, slot: _Slot) -> None:
        self.slot = slot
        self.events = LineReader(self._event_line)
        self.errors = LineReader(self._error_line)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 1:
            self.events.feed(data)
        elif childFD == 2:
            self.errors.feed(data)

    def childConnectionLost(self, childFD: int) -> None:
        if childFD == 1:
            self.events.close()
        elif childFD == 2:
            self.errors.close()

    def processEnded(self, reason: Failure) -> None:
        self.slot.ended(self, reason)

    def _event_line(self, line: bytes, truncated: bool) -> None:
        event: LogEvent | None = None
        if not truncated:
            try:
                event = eventFromJSON(line.decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                event = None
        if not isinstance(event, dict):
            self._error_line(line, truncated)
            return
        self.slot.pool.worker_event(self.slot, event)

    def _error_line(self, line: bytes, truncated: bool) -> None:
        text = line[:MAX_TEXT].decode("utf-8", "backslashreplace").rstrip()
        truncated = truncated or len(line) > MAX_TEXT
        if not text and not truncated:
            return
        log.warn(
            "worker {worker} (pid {worker_pid}): {line}{more}",
            worker=self.slot.index,
            worker_pid=self.slot.pid,
            line=text,
            more=" [line truncated]" if truncated else "",
        )


class _Slot:
    """One of the N places for a worker: the one running now, its restarts."""

    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.process: IProcessTransport | None = None
        self.protocol: _WorkerProcess | None = None
        self.pid: int | None = None
        self.started = 0.0
        self.ready = False
        #: A SIGHUP came while the worker was not ready to take it.
        self.reload_pending = False
        self.quick_deaths = 0
        self.restart: IDelayedCall | None = None
        self.exited: defer.Deferred[None] | None = None

    @property
    def running(self) -> bool:
        return self.process is not None

    def start(self) -> None:
        self.restart = None
        self.started = self.pool.clock.seconds()
        self.ready = False
        self.reload_pending = False
        protocol = _WorkerProcess(self)
        try:
            self.process = self.pool.spawn(protocol, self.index)
        except Exception:
            delay = self.restart_delay(0.0)
            log.failure(
                "worker {worker} could not be started; trying again in {delay:.1f} s",
                worker=self.index,
                delay=delay,
            )
            self.restart = self.pool.clock.callLater(delay, self.start)
            return
        self.protocol = protocol
        self.pid = self.process.pid
        self.exited = defer.Deferred()
        log.info(
            "worker {worker} started, pid {worker_pid}",
            worker=self.index,
            worker_pid=self.pid,
        )

    def became_ready(self) -> None:
        self.ready = True
        if self.reload_pending:
            self.reload_pending = False
            self.signal("HUP")

    def signal(self, name: str) -> None:
        if self.process is None:
            return
        with contextlib.suppress(error.ProcessExitedAlready):
            self.process.signalProcess(name)

    def ended(self, protocol: _WorkerProcess, reason: Failure) -> None:
        if protocol is not self.protocol:
            return
        now = self.pool.clock.seconds()
        lived = now - self.started
        self.process = self.protocol = None
        self.ready = False
        if self.pool.worker_exited is not None and self.pid is not None:
            self.pool.worker_exited(self.pid)
        exited, self.exited = self.exited, None
        if self.pool.stopping:
            log.info(
                "worker {worker} (pid {worker_pid}) stopped: {status}",
                worker=self.index,
                worker_pid=self.pid,
                status=describe_exit(reason),
            )
        else:
            delay = self.restart_delay(lived)
            log.error(
                "worker {worker} (pid {worker_pid}) {status} after {lived:.1f} s;"
                " restarting it in {delay:.1f} s",
                worker=self.index,
                worker_pid=self.pid,
                status=describe_exit(reason),
                lived=lived,
                delay=delay,
            )
            self.restart = self.pool.clock.callLater(delay, self.start)
        if exited is not None:
            exited.callback(None)

    def restart_delay(self, lived: float) -> float:
        """
        At most one restart per L{RESTART_INTERVAL}; a worker that keeps
        dying young waits 1, 2, 4 ... up to L{MAX_RESTART_DELAY} seconds
        from its last start, so a crash loop can't spin.
        """
        if lived >= STABLE_AFTER:
            self.quick_deaths = 0
        else:
            self.quick_deaths += 1
        doublings = min(max(0, self.quick_deaths - 1), 16)
        wait = min(RESTART_INTERVAL * (1 << doublings), MAX_RESTART_DELAY)
        return max(0.0, wait - lived)

    def cancel_restart(self) -> None:
        if self.restart is not None and self.restart.active():
            self.restart.cancel()
        self.restart = None


class _NotServing(Factory):
    """The master's own listeners never accept: the workers do."""

    noisy = False

    def logPrefix(self) -> str:
        return "socks4tx listener for the workers"

    def buildProtocol(self, addr: Any) -> Protocol | None:
        return None


class WorkerPool(service.Service):
    """
    The master: binds the listeners, runs C{count} workers on them and
    keeps them running until it stops.

    @param arguments: the C{socks4} options as given; every worker parses
        them again (and ignores C{--workers}).
    @param python: the interpreter that runs the workers.
    """

    def __init__(
        self,
        reactor: Any,
        listen: Sequence[str],
        arguments: Sequence[str],
        count: int,
        shutdown_grace: float,
        python: str = sys.executable,
        publish: ILogObserver = globalLogPublisher,
        worker_exited: Callable[[int], None] | None = None,
    ) -> None:
        #: Told each dead worker's pid (--metrics: WorkerMetrics.worker_exited).
        self.worker_exited = worker_exited
        self.reactor = reactor
        self.clock = reactor
        self.listen = list(listen)
        self.arguments = list(arguments)
        self.shutdown_grace = shutdown_grace
        self.python = python
        self.publish = publish
        self.slots = [_Slot(self, index) for index in range(1, count + 1)]
        self.ports: list[tcp.Port] = []
        self.stopping = False
        self._previous_hup: Any = None

    # -- binding, before twistd drops privileges ------------------------------

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        failures: list[Failure] = []
        for description in self.listen:
            listening = serverFromString(self.reactor, description).listen(
                _NotServing()
            )
            listening.addCallbacks(self._hold, failures.append)
            if not listening.called:
                raise RuntimeError(f"{description}: did not listen at once")
        if failures:
            failures[0].raiseException()

    def _hold(self, port: IListeningPort) -> None:
        if not isinstance(port, tcp.Port):  # unix.Port is one too
            raise TypeError(f"{port!r} is not a socket listener")
        # The socket stays open for the workers; this process never accepts.
        port.stopReading()
        self.ports.append(port)

    def _close_ports(self) -> defer.Deferred[Any]:
        """
        Close this process's copies of the sockets without shutdown(2),
        which would end them in the workers too (that is Twisted's rule for
        an adopted socket); a UNIX listener's path goes with it.
        """
        ports, self.ports = self.ports, []
        closing = []
        for port in ports:
            port._shouldShutdown = False
            closing.append(defer.maybeDeferred(port.stopListening))
        return defer.gatherResults(closing, consumeErrors=True)

    # -- running ------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        listeners = [describe(port.getHost()) for port in self.ports]
        listen_log.info(
            "socks4tx {version} listening on {listeners_text}"
            " ({workers} worker processes)",
            version=__version__,
            listeners=listeners,
            listeners_text=", ".join(listeners),
            workers=len(self.slots),
        )
        self._previous_hup = signal.signal(signal.SIGHUP, self._on_sighup)
        self.reactor.callWhenRunning(self._start_workers)

    def _start_workers(self) -> None:
        for slot in self.slots:
            if not self.stopping and not slot.running and slot.restart is None:
                slot.start()

    def spawn(self, protocol: ProcessProtocol, index: int) -> IProcessTransport:
        """Start worker C{index} on the listeners (child fds 3, 4, ...)."""
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        for offset, port in enumerate(self.ports):
            child_fds[FIRST_LISTENER_FD + offset] = port.fileno()
        argv = [
            self.python,
            "-m",
            "socks4tx.worker",
            "--index",
            str(index),
            "--listeners",
            str(len(self.ports)),
            "--reactor",
            type(self.reactor).__module__,
            "--",
            *self.arguments,
        ]
        process: IProcessTransport = self.reactor.spawnProcess(
            protocol, self.python, argv, env=worker_environment(), childFDs=child_fds
        )
        return process

    def worker_event(self, slot: _Slot, event: LogEvent) -> None:
        """Publish one of C{slot}'s worker's events in this process's log."""
        event["worker"] = slot.index
        event["worker_pid"] = slot.pid
        level = event.get("log_level")
        system = event.get("log_system")
        if system in (None, "-"):
            name = getattr(level, "name", "-")
            system = f"{event.get('log_namespace', '-')}#{name}"
        event["log_system"] = f"worker {slot.index}: {system}"
        self.publish(event)
        if event.get("log_namespace") == "socks4tx.worker" and event.get("ready"):
            slot.became_ready()

    def _on_sighup(self, signum: int, frame: FrameType | None) -> None:
        # In the reactor's own time, not between two bytecodes of its work.
        self.reactor.callFromThread(self.reload)

    def reload(self) -> None:
        """Have every worker reload its rules (a starting one once it can)."""
        forwarded = 0
        for slot in self.slots:
            if slot.ready:
                slot.signal("HUP")
                forwarded += 1
            else:
                slot.reload_pending = True
        log.info(
            "SIGHUP: forwarded to {forwarded} of {workers} workers",
            forwarded=forwarded,
            workers=len(self.slots),
        )

    # -- stopping -----------------------------------------------------------------

    def stopService(self) -> defer.Deferred[None]:
        """
        Stop accepting, then SIGTERM every worker and wait until all have
        drained (each within --shutdown-grace); SIGKILL one that is still
        running some seconds past it.  Nothing is restarted meanwhile.
        """
        super().stopService()
        self.stopping = True
        if self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
            self._previous_hup = None
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        running = []
        for slot in self.slots:
            slot.cancel_restart()
            if slot.exited is not None:
                running.append(slot)
        closed = self._close_ports()
        for slot in running:
            slot.signal("TERM")
        exits = [slot.exited for slot in running if slot.exited is not None]
        if exits:
            log.info(
                "stopping {count} workers: sessions may finish within {grace} s",
                count=len(exits),
                grace=self.shutdown_grace,
            )
        kill = self.clock.callLater(
            self.shutdown_grace + KILL_MARGIN, self._kill, running
        )
        try:
            await defer.gatherResults(exits)
        finally:
            if kill.active():
                kill.cancel()
        try:
            await closed
        except defer.FirstError as problem:
            log.failure("closing a listener", problem.subFailure)

    def _kill(self, slots: list[_Slot]) -> None:
        for slot in slots:
            if slot.running:
                log.warn(
                    "worker {worker} (pid {worker_pid}) still running after the"
                    " shutdown grace: SIGKILL",
                    worker=slot.index,
                    worker_pid=slot.pid,
                )
                slot.signal("KILL")


def worker_environment() -> dict[str, str]:
    """
    This environment, with socks4tx importable however it was found here
    (a source tree twistd found in its first working directory, say).  An
    installed one needs nothing: site-packages ahead of the standard
    library could shadow it.
    """
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(socks4tx.__file__)))
    installed = {os.path.abspath(p) for p in site.getsitepackages()}
    installed.add(os.path.abspath(site.getusersitepackages()))
    if root not in installed:
        env["PYTHONPATH"] = os.pathsep.join(
            [root, *filter(None, [env.get("PYTHONPATH")])]
        )
    return env
