"""
The zero-copy relay (Linux): socket -> pipe -> socket with C{os.splice}.

A L{SpliceRelay} starts as the portable relay (L{socks4tx.relay.Relay}) and,
once the session moves bulk data (at once for L{EagerSpliceRelay}) and the
bytes Twisted buffered are out, takes both sockets over from their Twisted
transports: it removes the transports from the reactor and
registers one descriptor object of its own per socket.  From then on a
readable socket is spliced into a pipe and the pipe into the other socket;
the payload never enters Python.  Flow control falls out of it: when the
destination can't take what is in the pipe, the source is no longer read
until the pipe has drained.

Pipes cost two descriptors and kernel memory each, so a direction holds one
only while bytes are in flight: it takes one from a L{PipePool} for a read
and gives it back as soon as the pipe is empty again.  An idle session holds
none.  If no pipe can be had (out of descriptors, or the pool's bound
reached) the bytes are copied through Python for that read instead.

The face the server sees is the portable relay's: the ends' byte counters,
C{timed_out}, C{abort}, C{release} and C{on_finished}.  The end of a
session goes through the transports' own C{connectionLost}, so the
protocols are told exactly as they are by the reactor.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet import tcp
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IReactorFDSet,
    IReadDescriptor,
    IWriteDescriptor,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from socks4tx.limits import MAX_PIPES, pipe_budget
from socks4tx.relay import Relay, RelayEnd


def _no_splice(*args: object, **kwargs: object) -> int:
    raise OSError(errno.ENOSYS, "os.splice is not available")


_splice: Callable[..., int] = getattr(os, "splice", _no_splice)
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
#: Reads (pipe fills) per readiness event, so one busy stream can't starve
#: the others on a level-triggered reactor.
READS_PER_EVENT = 4
#: Bytes copied through Python in one read when no pipe can be had.
COPY_CHUNK = 65536
#: A read this large says the session moves bulk data: time to splice.
#: Short exchanges (and idle sessions) stay on the portable relay, whose
#: per-session cost is lower: the take-over costs a reactor turn and six
#: epoll_ctl calls, and the splice objects ~0.7 KiB a session.
BULK_READ = 16384
#: Bytes a pipe is asked to hold (Linux's default pipe-max-size).
PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
#: Reactor turns the take-over waits for Twisted's write buffers to drain
#: before it gives up and leaves the session to the portable relay.
TAKE_OVER_TRIES = 100


def splice_available() -> bool:
    """Whether this platform can splice (Linux, Python 3.10 or newer)."""
    return sys.platform.startswith("linux") and hasattr(os, "splice")


#: A pipe: read end, write end, and the bytes it holds.
Pipe = tuple[int, int, int]


class PipePool:
    """
    Empty pipes, lent to a direction while bytes are in flight.

    Pipes are asked for L{PIPE_SIZE} bytes: a large pipe moves a stream in
    fewer, larger splices (measured on loopback: 1 MiB pipes relay one
    stream ~1.5x as fast as 64 KiB ones, at ~35% less CPU a byte).  The
    kernel memory they take is that of the bytes in them, so the pool lends
    at most C{max_lent} pipes at once: past that, reads are copied through
    Python (at most 64 KiB a direction), and a gateway full of stalled
    destinations holds at most C{max_lent} * L{PIPE_SIZE} bytes in pipes.

    Idle pipes are kept for reuse (making one costs four system calls) only
    while some session is spliced: when the last one ends they are closed,
    so a server with nothing spliced holds no pipe.

    @ivar keep: idle pipes kept open for reuse; more are closed.
    @ivar open: pipes open now (lent and idle).
    @ivar users: spliced sessions now.
    """

    #: Idle pipes kept at most, when the budget allows that many.
    KEEP = 64

    def __init__(self, keep: int = KEEP, max_lent: int = MAX_PIPES) -> None:
        self.keep = keep
        self.max_lent = max_lent
        self.open = 0
        self.users = 0
        self._idle: list[Pipe] = []

    def fit(self, open_files: int) -> None:
        """
        Size the pool for an open-file limit: at most L{pipe_budget} pipes,
        which the default C{--max-connections} leaves room for, so that
        stalled readers holding full pipes can't take descriptors that
        sessions within the limit need.
        """
        self.max_lent = pipe_budget(open_files)
        self.keep = min(self.KEEP, self.max_lent)

    def take(self) -> Pipe:
        """An empty pipe; OSError when none can be had."""
        if self._idle:
            return self._idle.pop()
        if self.open >= self.max_lent:
            raise OSError(errno.EAGAIN, "every pipe is lent")
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.open += 1
        with contextlib.suppress(OSError):  # past pipe-max-size: the default
            fcntl.fcntl(write_end, _F_SETPIPE_SZ, PIPE_SIZE)
        # Read back: an unprivileged user's pipes past pipe-user-pages-soft
        # are smaller than asked.
        return read_end, write_end, fcntl.fcntl(write_end, _F_GETPIPE_SZ)

    def give(self, pipe: Pipe) -> None:
        """Take back an empty pipe."""
        if len(self._idle) < self.keep:
            self._idle.append(pipe)
        else:
            self.discard(pipe)

    def discard(self, pipe: Pipe) -> None:
        """Close a pipe (one that may still hold bytes nobody will read)."""
        self.open -= 1
        os.close(pipe[0])
        os.close(pipe[1])

    def join(self) -> None:
        """A session starts splicing."""
        self.users += 1

    def leave(self) -> None:
        """A spliced session ended: the last one closes the idle pipes."""
        self.users -= 1
        if self.users <= 0:
            self.users = 0
            self.close()

    def close(self) -> None:
        """Close the idle pipes."""
        idle, self._idle = self._idle, []
        for pipe in idle:
            self.discard(pipe)


#: The process's pool: pipes are shared by every session.
pipes = PipePool()


def _spliceable(transport: object) -> bool:
    """A connected plain TCP (or UNIX) socket of Twisted's: no TLS, no wrapper."""
    return (
        isinstance(transport, tcp.Connection)
        and getattr(transport, "connected", False)
        and not getattr(transport, "disconnecting", False)
        and not getattr(transport, "TLS", False)
        and hasattr(transport, "socket")
    )


def _socket_transport(transport: object) -> Any:
    """
    The plain socket transport under a session's transport: itself, or what
    a wrapper that holds no bytes of its own offers (the PROXY header
    wrapper, once the header is read); None if there is none.
    """
    if _spliceable(transport):
        return transport
    inner = getattr(transport, "spliceable_transport", None)
    return inner if _spliceable(inner) else None


def _closing(transport: Any) -> bool:
    """
    Whether a socket transport is being closed: an abort (the idle timeout)
    delivers its connectionLost a reactor turn later, and a socket taken
    over in between would stay registered with the reactor once closed.
    """
    return bool(
        transport.disconnecting
        or transport.disconnected
        or getattr(transport, "_aborting", False)
    )


def _unsent(transport: Any) -> int:
    """
    Bytes still in a Twisted transport's write buffer (the reply, bytes
    read behind the request).  These are L{twisted.internet.abstract.
    FileDescriptor}'s internals: they must be flushed before the socket is
    detached, and no public interface tells.
    """
    buffered: int = len(transport.dataBuffer) - transport.offset
    return buffered + int(transport._tempDataLen)


@implementer(IReadDescriptor, IWriteDescriptor)
class _Socket:
    """
    One of the session's sockets, registered with the reactor in place of
    its transport: reading it feeds C{outgoing}, writing it drains
    C{incoming}.
    """

    __slots__ = (
        "fd",
        "incoming",
        "live",
        "outgoing",
        "reactor",
        "reading",
        "relay",
        "sock",
        "writing",
    )

    def __init__(self, relay: SpliceRelay, sock: socket.socket) -> None:
        self.relay = relay
        self.reactor: IReactorFDSet = relay.reactor
        self.sock = sock
        self.fd = sock.fileno()
        self.outgoing: _Direction
        self.incoming: _Direction
        self.reading = False
        self.writing = False
        #: False once the session is over: events still due are ignored
        #: (one epoll event can carry "readable" and "writable", and the
        #: read may end the session before the reactor calls doWrite).
        self.live = True

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "socks4tx.splice"

    def doRead(self) -> None:
        if self.live:
            self.outgoing.readable()

    def doWrite(self) -> None:
        if self.live:
            self.incoming.writable()

    def connectionLost(self, reason: Failure) -> None:
        # The reactor calls this on a hang-up or error event of a socket it
        # watches for writing only, after doRead or doWrite raised, and
        # when it shuts down, having stopped watching the socket: the
        # session ends as on any failure of this socket, if it hasn't yet.
        self.reading = self.writing = False
        if self.live:
            self.relay.failed(reason.value or ConnectionLost(), self)

    def detach(self) -> None:
        """The session is over: ignore late events, unlink the session."""
        self.live = False
        # The sockets and directions point at each other: unlinked, reference
        # counting frees them with the session.
        del self.outgoing, self.incoming, self.relay

    def start_reading(self) -> None:
        if not self.reading:
            self.reading = True
            self.reactor.addReader(self)

    def stop_reading(self) -> None:
        if self.reading:
            self.reading = False
            self.reactor.removeReader(self)

    def start_writing(self) -> None:
        if not self.writing:
            self.writing = True
            self.reactor.addWriter(self)

    def stop_writing(self) -> None:
        if self.writing:
            self.writing = False
            self.reactor.removeWriter(self)


class _Direction:
    """Bytes read from C{source} and written to C{target}, counted on C{end}."""

    __slots__ = (
        "done",
        "end",
        "eof",
        "head",
        "in_pipe",
        "pipe",
        "relay",
        "source",
        "target",
    )

    def __init__(
        self, relay: SpliceRelay, source: _Socket, target: _Socket, end: RelayEnd
    ) -> None:
        self.relay = relay
        self.source = source
        self.target = target
        self.end = end
        self.pipe: Pipe | None = None
        self.in_pipe = 0
        #: Bytes copied through Python, not yet written (no pipe was had).
        self.head = b""
        self.eof = False
        self.done = False

    def readable(self) -> None:
        """The source is readable: move up to a few pipefuls."""
        for _ in range(READS_PER_EVENT):
            if not self._read_once():
                return

    def _read_once(self) -> bool:
        """One read and its write; whether the source may be read again."""
        pipe = self.pipe
        if pipe is None:
            try:
                pipe = self.pipe = pipes.take()
            except OSError:
                return self._copy_once()
        try:
            count = _splice(self.source.fd, pipe[1], pipe[2], flags=_FLAGS)
        except BlockingIOError:
            self._give_back()
            return False
        except OSError as error:
            self.relay.failed(error, self.source)
            return False
        if count == 0:
            self._give_back()
            self._end_of_file()
            return False
        self.in_pipe = count
        # A read that didn't fill the pipe emptied the socket's buffer: the
        # next try would only say EAGAIN (a wasted system call); the
        # reactor says when more has come.
        return self._drain() and count >= pipe[2]

    def _copy_once(self) -> bool:
        try:
            data = self.source.sock.recv(COPY_CHUNK)
        except BlockingIOError:
            return False
        except OSError as error:
            self.relay.failed(error, self.source)
            return False
        if not data:
            self._end_of_file()
            return False
        self.head = data
        return self._drain()

    def _drain(self) -> bool:
        """
        Write what waits (copied bytes, then the pipe) to the target; True
        once all is written, else the target is watched for writability and
        the source no longer read.
        """
        try:
            if self.head:
                sent = self.target.sock.send(self.head)
                self.end.bytes_received += sent
                self.head = self.head[sent:]
                if self.head:
                    raise BlockingIOError
            while self.in_pipe:
                assert self.pipe is not None
                moved = _splice(
                    self.pipe[0], self.target.fd, self.in_pipe, flags=_FLAGS
                )
                if moved <= 0:
                    raise BlockingIOError
                self.in_pipe -= moved
                self.end.bytes_received += moved
        except BlockingIOError:
            self.source.stop_reading()
            self.target.start_writing()
            return False
        except OSError as error:
            self.relay.failed(error, self.target)
            return False
        self._give_back()
        return True

    def writable(self) -> None:
        """The target can take more: drain, then read the source again."""
        if not self._drain():
            return
        self.target.stop_writing()
        if self.relay.broken is not None:
            self.relay.delivered()
        elif self.eof:
            self._shut_down_target()
        elif not self.relay.finishing:
            self.source.start_reading()

    def _give_back(self) -> None:
        if self.pipe is not None and not self.in_pipe:
            pipes.give(self.pipe)
            self.pipe = None

    def _end_of_file(self) -> None:
        self.eof = True
        self.source.stop_reading()
        if not (self.in_pipe or self.head):
            self._shut_down_target()

    def _shut_down_target(self) -> None:
        """All of the source's bytes are written: half-close the target."""
        if self.done:
            return
        self.done = True
        try:
            self.target.sock.shutdown(socket.SHUT_WR)
        except OSError as error:
            self.relay.failed(error, self.target)
            return
        self.relay.direction_done()

    def holding(self) -> bool:
        """Whether bytes read from the source wait to be written."""
        return bool(self.in_pipe or self.head)

    def release(self) -> None:
        """Close the pipe if one is still lent (bytes in it are dropped)."""
        if self.pipe is not None:
            if self.in_pipe:
                pipes.discard(self.pipe)
            else:
                pipes.give(self.pipe)
            self.pipe = None
            self.in_pipe = 0
        self.head = b""


class _SpliceEnd(RelayEnd):
    """
    A relay end that asks for the take-over when bulk bytes arrive, and,
    once spliced, only records that its transport is gone.
    """

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if len(data) >= BULK_READ:
            relay = getattr(self, "relay", None)
            if isinstance(relay, SpliceRelay):
                relay.bulk()

    def connection_lost(self) -> None:
        relay = self.relay
        if not isinstance(relay, SpliceRelay) or not relay.spliced:
            super().connection_lost()
            return
        if not self.lost:
            self.lost = True
            self.read_done = True
            relay.end_lost()


class SpliceRelay(Relay):
    """
    The portable relay until the session moves bulk data (a read of
    L{BULK_READ} bytes or more), then, once the bytes Twisted buffered are
    out, socket -> pipe -> socket in the kernel.

    @ivar name: C{"splice"} once the sockets are taken over; C{"portable"}
        while they are not (and for good if the take-over wasn't possible).
    """

    name = "portable"
    end_class = _SpliceEnd

    spliced = False
    #: Why the session ends, while the bytes read from a socket that failed
    #: are still being written to the other one.
    broken: Exception | None = None
    #: The sockets have been handed back to their transports' connectionLost.
    _closed = False
    _sockets: tuple[_Socket, _Socket] | None = None
    _directions: tuple[_Direction, _Direction] | None = None
    #: The socket transports taken over (client's, destination's).
    _transports: tuple[Any, ...] = ()
    #: Reactor turns waited so far for Twisted's buffers to drain.
    _tries = 0
    #: The portable relay is running (the take-over may happen).
    _running = False
    #: Bulk data was seen (before L{started}, it waits for it).
    _bulk_seen = False
    #: A take-over was begun (it is tried once a session).
    _taking_over = False
    #: The transports the take-over paused (to be resumed if it gives up).
    _paused: frozenset[Any] = frozenset()

    @property
    def finishing(self) -> bool:
        """The sockets are being closed: no direction starts reading again."""
        return self._closed or self.broken is not None

    @property
    def reactor(self) -> Any:
        """The reactor (the relay's clock) that watches the sockets."""
        return self.clock

    # -- the take-over ----------------------------------------------------

    #: Take over as soon as the relay runs, bulk or not (--relay splice).
    eager = False

    def started(self) -> None:
        """Called once the portable relay is running."""
        self._running = True
        if self._bulk_seen or self.eager:
            self.bulk()

    def bulk(self) -> None:
        """Bulk data is moving: take the sockets over (once a session)."""
        self._bulk_seen = True
        if not self._running or self._taking_over:
            return
        self._taking_over = True
        self._try_take_over()

    def _try_take_over(self) -> None:
        client, server = self.client, self.server
        if (
            self._finished
            or client.lost
            or server.lost
            or client.read_done
            or server.read_done
        ):
            self._stay_portable()
            return
        transports = (
            _socket_transport(client.transport),
            _socket_transport(server.transport),
        )
        if None in transports or any(map(_closing, transports)):
            self._stay_portable()
            return
        # What Twisted has buffered for a socket is flushed by the reactor
        # before the sockets change hands.  Meanwhile the side that feeds a
        # buffer is not read (paused again on every try: Twisted's flow
        # control may resume it), and a side paused earlier whose buffer
        # has drained since is read again: Twisted resumes only what its
        # own flow control paused.  With both buffers empty the sockets
        # change hands at once, before another read.
        client_side, server_side = transports
        feeders = frozenset(
            feeder
            for buffered, feeder in (
                (client_side, server_side),
                (server_side, client_side),
            )
            if _unsent(buffered)
        )
        if not feeders:
            self._take_over(transports)
            return
        for feeder in feeders:
            feeder.pauseProducing()
        for drained in self._paused - feeders:
            drained.resumeProducing()
        self._paused = feeders
        self._tries += 1
        if self._tries > TAKE_OVER_TRIES:
            # A peer that doesn't read: Twisted's flow control serves.
            self._stay_portable()
            return
        self.clock.callLater(0 if self._tries < 10 else 0.01, self._try_take_over)

    def _stay_portable(self) -> None:
        """Leave the session to the portable relay, resuming what was paused."""
        paused, self._paused = self._paused, frozenset()
        for end in (self.client, self.server):
            transport = _socket_transport(end.transport)
            if transport in paused and not end.lost and not end.read_done:
                end.transport.resumeProducing()

    def _take_over(self, transports: tuple[Any, ...]) -> None:
        for end in (self.client, self.server):
            end.transport.unregisterProducer()
        for transport in transports:
            transport.stopReading()
            transport.stopWriting()
        self._transports = transports
        client = _Socket(self, transports[0].socket)
        server = _Socket(self, transports[1].socket)
        up = _Direction(self, client, server, self.client)
        down = _Direction(self, server, client, self.server)
        client.outgoing = server.incoming = up
        server.outgoing = client.incoming = down
        self._sockets = (client, server)
        self._directions = (up, down)
        self.spliced = True
        self.name = "splice"
        pipes.join()
        client.start_reading()
        server.start_reading()

    # -- the end ----------------------------------------------------------

    def direction_done(self) -> None:
        assert self._directions is not None
        if all(direction.done for direction in self._directions):
            self._finish(ConnectionDone("relayed"))

    def failed(self, error: BaseException, broken: _Socket) -> None:
        """
        A socket error: the session is over.  As the portable relay
        delivers what it had read from a connection that failed before it
        closes the other one, the bytes taken from C{broken} that wait for
        the other socket are written first; then both sides are closed.
        """
        if self._closed or self._sockets is None:
            return
        reason = ConnectionLost(str(error))
        towards_live = broken.outgoing
        if self.finishing or towards_live.done or not towards_live.holding():
            self._finish(reason)
            return
        self.broken = reason
        for sock in self._sockets:
            sock.stop_reading()
        broken.stop_writing()
        broken.incoming.release()  # bytes for the failed socket: dropped now
        towards_live.target.start_writing()

    def delivered(self) -> None:
        """What a failed socket had sent is written: close both sides."""
        assert self.broken is not None
        self._finish(self.broken)

    def abort(self) -> None:
        if not self.spliced:
            super().abort()
            return
        self._finish(ConnectionAborted("aborted"))

    def close(self) -> None:
        if not self.spliced:
            super().close()

    def _finish(self, reason: Exception) -> None:
        """
        Stop watching the sockets, return the pipes, and hand each
        transport its C{connectionLost}: that closes the socket (with a
        reset if aborted) and tells the protocol, as the reactor would.
        """
        if self._closed or self._sockets is None:
            return
        self._closed = True
        for sock in self._sockets:
            sock.stop_reading()
            sock.stop_writing()
            sock.live = False
        assert self._directions is not None
        for direction in self._directions:
            direction.release()
        pipes.leave()
        failure = Failure(reason)
        # The socket transports' own connectionLost: through a wrapper, it
        # reaches the session's protocol as the wrapper passes it on.
        for transport in self._transports:
            transport.connectionLost(failure)

    def release(self) -> None:
        super().release()
        for sock in self._sockets or ():
            sock.detach()
        for direction in self._directions or ():
            del direction.source, direction.target, direction.relay, direction.end
        self._sockets = None
        self._directions = None
        self._transports = ()


class EagerSpliceRelay(SpliceRelay):
    """The splice relay that takes over at once (--relay splice)."""

    eager = True
