"""
One worker process of C{twistd socks4 --workers N}.

Its master (L{socks4tx.workers}) starts it as C{python -m socks4tx.worker};
it is not meant to be run by hand.  It serves the listening sockets it
inherits (descriptors 3, 4, ..., one per C{--listen}) with the options,
factory and services of a single process (L{socks4tx.tap}), so the two
can't drift apart.  Every log event goes to the master as a JSON line on
what was its standard output.  Its standard input is a pipe from the
master: end of file there means the master is gone, and the worker drains
its sessions and exits rather than serve unsupervised and unlogged.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import defer, error, tcp, unix
from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReadDescriptor,
    IStreamServerEndpoint,
)
from twisted.internet.main import CONNECTION_DONE
from twisted.logger import FileLogObserver, Logger, globalLogBeginner
from twisted.python import usage
from twisted.python.failure import Failure
from zope.interface import implementer

from socks4tx.server import SOCKS4Factory
from socks4tx.session import describe
from socks4tx.tap import ListenerService, Options, socks4_service
from socks4tx.workers import FIRST_LISTENER_FD, json_line

log = Logger(namespace="socks4tx.worker")


class SharedUNIXPort(unix.Port):
    """
    A UNIX listener on a socket inherited from the master, which owns its
    path.  Twisted's own adopted port would chmod the path when it starts
    (to its default mode, and failing once twistd has dropped the
    privileges that created it) and unlink it when it stops, from under
    the master and the other workers.
    """

    #: Close without shutdown(2), which would end the socket everywhere.
    _shouldShutdown = False

    def __init__(
        self, inherited: socket.socket, factory: IProtocolFactory, reactor: Any
    ) -> None:
        super().__init__(inherited.getsockname(), factory, reactor=reactor)
        self._inherited = inherited
        self._factory = factory

    def startListening(self) -> None:
        tcp._reservedFD.reserve()  # for accept() at the open-file limit
        self._factory.doStart()
        self.connected = True
        self.socket = self._inherited
        self.fileno = self.socket.fileno  # type: ignore[method-assign]
        self.numberAccepts = 100
        self.startReading()

    def connectionLost(self, reason: Failure) -> None:
        tcp.Port.connectionLost(self, reason)


@implementer(IStreamServerEndpoint)
class SharedUNIXEndpoint:
    """Listens on an inherited UNIX socket with L{SharedUNIXPort}."""

    def __init__(self, reactor: Any, fileno: int) -> None:
        self.reactor = reactor
        self.fileno = fileno

    def listen(self, factory: IProtocolFactory) -> defer.Deferred[IListeningPort]:
        return defer.execute(self._adopt, factory)

    def _adopt(self, factory: IProtocolFactory) -> IListeningPort:
        inherited = socket.socket(fileno=self.fileno)
        inherited.setblocking(False)
        os.set_inheritable(self.fileno, False)  # as Twisted's own listeners
        port = SharedUNIXPort(inherited, factory, self.reactor)
        port.startListening()
        listening: IListeningPort = port
        return listening


def inherited_endpoint(reactor: Any, fileno: int) -> IStreamServerEndpoint:
    """An endpoint that listens on the inherited socket C{fileno}."""
    probe = socket.socket(fileno=fileno)
    family = probe.family
    probe.detach()  # the descriptor stays open, for the endpoint
    if family == socket.AF_UNIX:
        return SharedUNIXEndpoint(reactor, fileno)
    endpoint: IStreamServerEndpoint = AdoptedStreamServerEndpoint(
        reactor, fileno, family
    )
    return endpoint


@implementer(IReadDescriptor)
class MasterWatch:
    """Calls C{gone} when the master's end of standard input closes."""

    def __init__(self, gone: Callable[[], None]) -> None:
        self.gone = gone

    def fileno(self) -> int:
        return 0

    def doRead(self) -> Failure | None:
        if os.read(0, 4096):
            return None
        return Failure(CONNECTION_DONE)

    def connectionLost(self, reason: Failure) -> None:
        # End of file, or a hang-up the reactor reports without a read.
        self.gone()

    def logPrefix(self) -> str:
        return "master"


class WorkerListeners(ListenerService):
    """The listeners of worker C{index}, which says when it is ready."""

    def __init__(
        self,
        endpoints: Sequence[tuple[str, IStreamServerEndpoint]],
        factory: SOCKS4Factory,
        index: int,
    ) -> None:
        super().__init__(endpoints, factory)
        self.index = index

    def announce(self) -> None:
        # Ready once the reactor runs: every service has started then (the
        # rules reloader too, so that a SIGHUP can be forwarded).
        self.factory.clock.callLater(0, self._ready)

    def _ready(self) -> None:
        listeners = [describe(port.getHost()) for port in self.ports]
        log.info(
            "worker {index} ready, pid {pid}, serving {listeners_text}",
            index=self.index,
            pid=os.getpid(),
            ready=True,
            listeners=listeners,
            listeners_text=", ".join(listeners),
        )


def install_reactor(module: str) -> Any:
    """The reactor of the master's kind (its module's install()), else the default."""
    if module:
        try:
            importlib.import_module(module).install()
        except (ImportError, AttributeError, error.ReactorAlreadyInstalledError):
            log.warn("no reactor from {module}: the default one", module=module)
    from twisted.internet import reactor

    return reactor


def log_to_master() -> None:
    """
    Send every log event to the master, as a JSON line on what was standard
    output; descriptor 1 then points at standard error, so that nothing
    else written there can break a line.
    """
    channel = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)
    globalLogBeginner.beginLoggingTo([FileLogObserver(channel, json_line)])


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m socks4tx.worker",
        description="A worker of twistd socks4 --workers; started by its master.",
    )
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--listeners", type=int, required=True)
    parser.add_argument("--reactor", default="")
    parser.add_argument("options", nargs=argparse.REMAINDER)
    arguments = parser.parse_args(argv)
    if arguments.options[:1] == ["--"]:
        arguments.options = arguments.options[1:]
    return arguments


def main(argv: Sequence[str] | None = None) -> int:
    # Ctrl-C reaches the whole process group: the master decides what it
    # means.  SIGHUP stays ignored until the rules reloader takes it (and for
    # good without --rules), so an early one can't kill the worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    arguments = parse_arguments(argv)
    reactor = install_reactor(arguments.reactor)
    log_to_master()

    options = Options()
    try:
        options.parseOptions(arguments.options)
    except usage.UsageError as problem:
        print(f"socks4 worker: {problem}", file=sys.stderr)
        return 2
    endpoints = [
        inherited_endpoint(reactor, FIRST_LISTENER_FD + offset)
        for offset in range(arguments.listeners)
    ]
    top = socks4_service(
        options,
        reactor,
        endpoints,
        lambda endpoints, factory: WorkerListeners(endpoints, factory, arguments.index),
    )
    watch = MasterWatch(lambda: _stop(reactor))
    reactor.addReader(watch)
    top.privilegedStartService()
    top.startService()
    # Stopping for whatever reason: the reactor's closing of every
    # descriptor is not news from the master.
    reactor.addSystemEventTrigger("before", "shutdown", reactor.removeReader, watch)
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    reactor.run()
    return 0


def _stop(reactor: Any) -> None:
    log.warn("the master is gone: stopping")
    with contextlib.suppress(error.ReactorNotRunning):  # stopping already
        reactor.stop()


if __name__ == "__main__":
    sys.exit(main())
