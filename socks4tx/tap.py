"""
C{twistd socks4}: options and the service they describe.

L{makeService} is shared by the twistd plugin and by C{.tac} files, so both
deployments behave the same.
"""

from __future__ import annotations

import ipaddress
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from socks4tx import __version__
from socks4tx.limits import (
    DEFAULT_MAX_PER_SOURCE,
    default_max_connections,
    raise_open_file_limit,
)
from socks4tx.prometheus import (
    MetricsUnavailable,
    PrometheusMetrics,
    WorkerMetrics,
    load_prometheus,
    metrics_service,
)
from socks4tx.proxyheader import listen_description
from socks4tx.reload import RulesReloader
from socks4tx.rules import RulesError, load_rules
from socks4tx.server import (
    IDENT_MODES,
    RELAY_MODES,
    Settings,
    SOCKS4Factory,
    is_local_address,
)
from socks4tx.session import describe
from socks4tx.splice import splice_available
from socks4tx.workers import WorkerPool, unshareable_listener

log = Logger(namespace="socks4tx.listen")
limits_log = Logger(namespace="socks4tx.limits")

DEFAULT_LISTEN = "tcp:1080:interface=127.0.0.1"


def _number(
    value: str,
    kind: type[int] | type[float],
    what: str,
    low: float = -math.inf,
    high: float = math.inf,
) -> Any:
    """C{value} as C{kind}, finite and within [low, high], or ValueError."""
    try:
        number = kind(value)
    except ValueError:
        number = math.nan
    # NaN fails the comparison; an int may be too large for math.isfinite.
    if not low <= number <= high or abs(number) == math.inf:
        raise ValueError(f"{value!r} is not {what}")
    return number


def _seconds(value: str) -> float:
    seconds: float = _number(value, float, "a non-negative number of seconds", 0)
    return seconds


def _positive_seconds(value: str) -> float:
    seconds = _seconds(value)
    if seconds == 0:
        raise ValueError("must be more than 0 seconds")
    return seconds


def _length(value: str) -> int:
    length: int = _number(value, int, "a length from 0 to 65535", 0, 65535)
    return length


def _port(value: str) -> int:
    port: int = _number(value, int, "a port number", 1, 65535)
    return port


def _count(value: str) -> int:
    count: int = _number(value, int, "a count (0 or more)", 0)
    return count


def _workers(value: str) -> int:
    count: int = _number(value, int, "a number of worker processes (1 or more)", 1)
    return count


def _one_of(choices: tuple[str, ...]) -> Callable[[str], str]:
    def choose(value: str) -> str:
        if value not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return value

    return choose


def _local_ipv4(value: str) -> str:
    """An IPv4 address this host has (0.0.0.0: any of them)."""
    try:
        address = str(ipaddress.IPv4Address(value))
    except ValueError:
        raise ValueError(f"{value!r} is not an IPv4 address") from None
    if not is_local_address(address):
        raise ValueError(f"{value} is not an address of this host")
    return address


def _parameter(
    name: str, default: Any, doc: str, coerce: Callable[[str], Any] | None = None
) -> list[Any]:
    """
    An optParameters row whose converter's ValueError becomes a usage error
    naming the option.
    """
    if coerce is None:
        return [name, None, default, doc]
    convert = coerce

    def checked(value: str) -> Any:
        try:
            return convert(value)
        except ValueError as error:
            raise usage.UsageError(f"--{name}: {error}") from None

    checked.coerceDoc = ""  # type: ignore[attr-defined]
    return [name, None, default, doc, checked]


def _check_endpoint(
    option: str, description: str, parse: Callable[[Any, str], object]
) -> None:
    """
    Parse an endpoint description now, so that a mistake is a usage error
    rather than a traceback once twistd starts the service.  Parsing binds
    nothing.
    """
    from twisted.internet import reactor

    try:
        endpoint = parse(reactor, description)
    except Exception as error:  # each endpoint parser raises its own
        if isinstance(error, IndexError) and description.startswith("systemd:"):
            problem = (
                "no inherited socket with that index (systemd passes them in"
                " LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID)"
            )
        else:
            problem = str(error) or error.__class__.__name__
        raise usage.UsageError(f"--{option} {description!r}: {problem}") from None
    port = getattr(endpoint, "_port", None)  # TCP endpoints: bind would overflow
    if isinstance(port, int) and not 0 <= port <= 65535:
        raise usage.UsageError(
            f"--{option} {description!r}: port {port} is not from 0 to 65535"
        )


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "A SOCKS4/SOCKS4A proxy server (CONNECT and BIND). Without options it "
        f"listens on {DEFAULT_LISTEN} and serves loopback clients only."
    )

    optFlags = [  # noqa: RUF012 (twistd's usage.Options convention)
        [
            "no-keepalive",
            None,
            "Don't set TCP keepalive on client and destination connections.",
        ],
        [
            "run-rule-commands",
            None,
            "Run the commands of the rules file (': command', #NO_IDENTD:,"
            " #BAD_ID:); off by default.",
        ],
    ]
    optParameters = [  # noqa: RUF012
        _parameter(
            "handshake-timeout",
            30.0,
            "Seconds a client has to send its whole request.",
            _positive_seconds,
        ),
        _parameter(
            "resolve-timeout",
            10.0,
            "Seconds to resolve a SOCKS4A host name.",
            _positive_seconds,
        ),
        _parameter(
            "connect-timeout",
            120.0,
            "Seconds to connect to a CONNECT destination.",
            _positive_seconds,
        ),
        _parameter(
            "bind-timeout",
            120.0,
            "Seconds a BIND listener waits for the application server.",
            _positive_seconds,
        ),
        _parameter(
            "idle-timeout",
            0.0,
            "Close a relayed session after this many seconds without traffic"
            " (0: never).",
            _seconds,
        ),
        _parameter(
            "max-userid",
            255,
            "Longest USERID accepted, in bytes.",
            _length,
        ),
        _parameter(
            "max-hostname",
            255,
            "Longest SOCKS4A host name accepted, in bytes.",
            _length,
        ),
        _parameter(
            "bind-address",
            None,
            "IPv4 address where BIND listens (default: the local address of the"
            " route to the application server); an address of this host.",
            _local_ipv4,
        ),
        _parameter(
            "outgoing-address",
            None,
            "IPv4 source address of outgoing connections (default: the kernel's"
            " choice); an address of this host.",
            _local_ipv4,
        ),
        _parameter(
            "rules",
            None,
            "A rules file in the sockd.conf language (default: built-in, loopback"
            " clients only). SIGHUP reloads it.",
        ),
        _parameter(
            "ident",
            "off",
            "Server-wide RFC 1413 check of the USERID: off, optional or required"
            " (a rule's ?=I/?=i/?=n overrides it).",
            _one_of(IDENT_MODES),
        ),
        _parameter(
            "ident-timeout",
            15.0,
            "Seconds for an ident lookup (connect and answer).",
            _positive_seconds,
        ),
        _parameter(
            "ident-port",
            113,
            "Port of the client's identd (for tests; RFC 1413 says 113).",
            _port,
        ),
        _parameter(
            "rule-command-timeout",
            10.0,
            "Seconds a rule command may run before it is killed.",
            _positive_seconds,
        ),
        _parameter(
            "max-connections",
            None,
            "Sessions at once (default: what the open-file limit, raised to its"
            " hard limit at start-up, can hold at 3 descriptors a session;"
            " 0: no limit); with --workers, in each worker process.",
            _count,
        ),
        _parameter(
            "max-connections-per-source",
            DEFAULT_MAX_PER_SOURCE,
            "Sessions at once from one client address (0: no limit); with"
            " --workers, in each worker process.",
            _count,
        ),
        _parameter(
            "relay",
            "auto",
            "How relayed bytes move: splice (Linux zero-copy through a pipe,"
            " the payload never enters Python, from the first byte), portable"
            " (Twisted's producer/consumer) or auto (portable, spliced once a"
            " session moves bulk data).  TLS connections are always portable.",
            _one_of(RELAY_MODES),
        ),
        _parameter(
            "shutdown-grace",
            10.0,
            "On SIGTERM, seconds relaying sessions may go on before they are closed.",
            _seconds,
        ),
        _parameter(
            "metrics",
            None,
            "Serve Prometheus metrics at /metrics on this Twisted server endpoint,"
            " e.g. tcp:9108:interface=127.0.0.1 (default: off; needs"
            " socks4tx[metrics]).",
        ),
        _parameter(
            "workers",
            1,
            "Worker processes serving the listeners (1: this process serves"
            " them). With more, this process binds tcp:, tcp6: and unix:"
            " listeners, restarts workers that die and passes SIGHUP and"
            " SIGTERM on; the connection limits apply to each worker.",
            _workers,
        ),
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["arguments"] = []

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        # Kept as given: worker processes parse the same options again.
        self["arguments"] = list(sys.argv[1:] if options is None else options)
        super().parseOptions(options)

    def opt_listen(self, description: str) -> None:
        """
        A Twisted server endpoint to listen on, e.g. tcp:1080:interface=127.0.0.1
        (repeatable; given ones replace the default tcp:1080:interface=127.0.0.1).
        """
        self["listen"].append(description)

    def opt_version(self) -> None:
        """Print the version and exit."""
        print(f"socks4tx {__version__}")
        raise SystemExit(0)

    def postOptions(self) -> None:
        if self["relay"] == "splice" and not splice_available():
            raise usage.UsageError(
                "--relay splice needs Linux and os.splice (Python 3.10 or"
                " newer); use --relay auto or portable"
            )
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        for description in self["listen"]:
            _check_endpoint("listen", description, server_endpoint)
        if self["workers"] > 1:
            for description in self["listen"]:
                problem = unshareable_listener(description)
                if problem is not None:
                    raise usage.UsageError(problem)
        if self["metrics"] is not None:
            try:
                load_prometheus()
            except MetricsUnavailable as error:
                raise usage.UsageError(str(error)) from None
            _check_endpoint("metrics", self["metrics"], serverFromString)
        self["ruleset"] = None
        if self["rules"] is not None:
            try:
                self["ruleset"] = load_rules(self["rules"])
            except (RulesError, OSError) as error:
                # Every error, with its line, and no usage text around it.
                print(f"socks4: cannot load the rules:\n{error}", file=sys.stderr)
                raise SystemExit(2) from None

    def settings(self) -> Settings:
        return Settings(
            handshake_timeout=self["handshake-timeout"],
            resolve_timeout=self["resolve-timeout"],
            connect_timeout=self["connect-timeout"],
            bind_timeout=self["bind-timeout"],
            idle_timeout=self["idle-timeout"],
            max_userid=self["max-userid"],
            max_hostname=self["max-hostname"],
            bind_address=self["bind-address"],
            outgoing_address=self["outgoing-address"],
            keepalive=not self["no-keepalive"],
            ident=self["ident"],
            ident_timeout=self["ident-timeout"],
            ident_port=self["ident-port"],
            run_rule_commands=self["run-rule-commands"],
            rule_command_timeout=self["rule-command-timeout"],
            max_connections=(
                default_max_connections()
                if self["max-connections"] is None
                else self["max-connections"]
            ),
            max_connections_per_source=self["max-connections-per-source"],
            shutdown_grace=self["shutdown-grace"],
            relay=self["relay"],
        )


class ListenerService(service.Service):
    """
    Listens on several endpoints with one factory, before twistd drops
    privileges, and tells the factory where it listens (so that it refuses
    to connect to itself).
    """

    def __init__(
        self,
        endpoints: Sequence[tuple[str, IStreamServerEndpoint]],
        factory: SOCKS4Factory,
    ) -> None:
        self.endpoints = list(endpoints)
        self.factory = factory
        self.ports: list[IListeningPort] = []

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        failures: list[Failure] = []
        for description, endpoint in self.endpoints:
            listening = endpoint.listen(self.factory)
            listening.addCallbacks(self._listening, failures.append)
            if not listening.called:
                raise RuntimeError(f"{description}: did not listen at once")
        if failures:
            # twistd reports this and exits: a port that can't be bound is
            # a configuration error, not something to run without.
            failures[0].raiseException()

    def startService(self) -> None:
        super().startService()
        self.announce()

    def announce(self) -> None:
        """Say where the service listens, once it does."""
        log.info(
            "socks4tx {version} listening on {listeners_text}",
            version=__version__,
            listeners=[describe(port.getHost()) for port in self.ports],
            listeners_text=", ".join(describe(port.getHost()) for port in self.ports),
        )

    def _listening(self, port: IListeningPort) -> IListeningPort:
        self.ports.append(port)
        self.factory.listening_on(port.getHost())
        return port

    def stopService(self) -> defer.Deferred[None]:
        """
        Stop accepting, then let the sessions in progress finish, for up to
        the shutdown grace; close what is left then.
        """
        super().stopService()
        ports, self.ports = self.ports, []
        sessions = self.factory.sessions
        if sessions:
            log.info(
                "shutting down: {count} sessions may finish within {grace} s",
                count=len(sessions),
                grace=self.factory.settings.shutdown_grace,
            )
        return defer.Deferred.fromCoroutine(self._stop(ports))

    async def _stop(self, ports: list[IListeningPort]) -> None:
        await defer.gatherResults(
            [defer.maybeDeferred(port.stopListening) for port in ports]
        )
        await self.factory.sessions.drain(
            self.factory.clock, self.factory.settings.shutdown_grace
        )


def server_endpoint(reactor: Any, description: str) -> IStreamServerEndpoint:
    """
    A --listen description's endpoint: C{haproxy:...} is our PROXY header
    wrapper (see L{socks4tx.proxyheader}), anything else Twisted's.
    """
    return listen_description(reactor, description) or serverFromString(
        reactor, description
    )


def makeService(options: Options, reactor: Any = None) -> service.IService:
    """
    The socks4 service described by C{options} (parsed L{Options}); with
    C{--workers} over 1, the master of that many worker processes.
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    if options["workers"] > 1:
        merged = WorkerMetrics() if options["metrics"] is not None else None
        pool = WorkerPool(
            reactor,
            options["listen"],
            options["arguments"],
            options["workers"],
            options["shutdown-grace"],
            worker_exited=merged.worker_exited if merged is not None else None,
        )
        if merged is None:
            return pool
        top = service.MultiService()
        # First: it opens the shared directory before the workers start.
        metrics_service(reactor, options["metrics"], merged).setServiceParent(top)
        pool.setServiceParent(top)
        return top
    return socks4_service(options, reactor)


def socks4_service(
    options: Options,
    reactor: Any,
    adopted: Sequence[IStreamServerEndpoint] | None = None,
    listener: Callable[
        [Sequence[tuple[str, IStreamServerEndpoint]], SOCKS4Factory], ListenerService
    ] = ListenerService,
) -> service.MultiService:
    """
    One process serving C{options}: on the listeners they describe, or on
    the C{adopted} endpoints (one per C{--listen}, in order) in a worker.
    """
    soft, hard = raise_open_file_limit()
    settings = options.settings()
    limits_log.info(
        "open files: soft limit {soft} raised to the hard limit {hard};"
        " sessions at most {max_connections}, {per_source} a client address",
        soft=soft,
        hard=hard,
        max_connections=settings.max_connections,
        per_source=settings.max_connections_per_source,
    )
    factory = SOCKS4Factory(reactor, settings, policy=options["ruleset"])
    if adopted is None:
        endpoints = [
            (description, server_endpoint(reactor, description))
            for description in options["listen"]
        ]
    else:
        endpoints = list(zip(options["listen"], adopted, strict=True))
    top = service.MultiService()
    if options["metrics"] is not None:
        if adopted is None:
            metrics = PrometheusMetrics()
            metrics_service(reactor, options["metrics"], metrics).setServiceParent(top)
        else:  # a worker: the master serves the sum of all workers' files
            metrics = PrometheusMetrics(multiprocess=True)
        factory.metrics = metrics
    listener(endpoints, factory).setServiceParent(top)
    RulesReloader(options["rules"], factory, reactor).setServiceParent(top)
    return top
