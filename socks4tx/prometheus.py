"""
Prometheus metrics for C{--metrics ENDPOINT}: a L{SessionMetrics} that
counts, and a web service that serves the counts at C{/metrics}.

C{prometheus_client} is an optional dependency (C{socks4tx[metrics]}): this
module is the only one that imports it, and only when metrics are asked
for, so C{import socks4tx.prometheus} works without it and
L{load_prometheus} says how to install it.

With C{--workers N} every worker counts its own sessions into files of a
directory shared with the master (C{prometheus_client}'s multiprocess
mode), and the master serves their sum: L{WorkerMetrics}.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from collections.abc import Iterable
from types import ModuleType
from typing import TYPE_CHECKING, Any

from twisted.application import service
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from socks4tx.session import Session, describe

if TYPE_CHECKING:
    from prometheus_client.metrics import Counter, Gauge, Histogram
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import Collector, CollectorRegistry

log = Logger(namespace="socks4tx.metrics")

INSTALL_HINT = "pip install 'socks4tx[metrics]'"
#: The environment variable through which workers find the shared directory.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: Upper bounds of the handshake histogram: 0.1 ms (a loopback CONNECT)
#: to 30 s (the default --handshake-timeout); slower ones land in +Inf.
HANDSHAKE_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

#: Label values of socks4tx_sessions_total: a bounded set, so that no client
#: can grow the number of series.
COMMANDS = ("connect", "bind")
REPLIES = ("90", "91", "92", "93")
NONE = "none"
OTHER = "other"

#: A session that never relayed is a rejection, labelled with its reason
#: (the README's table); a reason not listed here is "other".
REJECTION_CAUSES = (
    "rule",
    "limit",
    "timeout",
    "bad-request",
    "ident-failed",
    "ident-mismatch",
    "destination-refused",
    "resolve-failed",
    "connect-failed",
    "bind-failed",
    "bind-mismatch",
    "client-gone",
    "shutdown",
    "internal-error",
    OTHER,
)

#: Ident outcomes; every "ERROR:<type>" answer is "error" (the type is in
#: the session log), anything unforeseen "other".
IDENT_OUTCOMES = (
    "match",
    "mismatch",
    "refused",
    "timeout",
    "closed",
    "malformed",
    "port-mismatch",
    "no-address",
    "error",
    OTHER,
)


#: The gauges and their help; the master shows them as 0 while no worker runs.
GAUGES = {
    "socks4tx_sessions_active": "Sessions admitted and not ended yet.",
    "socks4tx_bind_listeners_open": "BIND listeners waiting for their application"
    " server.",
}


class MetricsUnavailable(ImportError):
    """C{--metrics} was asked for, and C{prometheus_client} is not installed."""


def load_prometheus() -> ModuleType:
    """
    C{prometheus_client}, or L{MetricsUnavailable} saying how to install
    it; C{tap} calls this while checking the options, so that a missing
    package stops C{twistd} at once with that message.
    """
    try:
        import prometheus_client
    except ImportError as error:
        raise MetricsUnavailable(
            "--metrics needs the prometheus_client package, which is not"
            f" installed: {INSTALL_HINT}"
        ) from error
    return prometheus_client


def session_labels(session: Session) -> tuple[str, str]:
    """The C{(command, reply)} labels of a session's socks4tx_sessions_total."""
    command = session.command if session.command in COMMANDS else NONE
    if session.reply is None:
        reply = NONE
    else:
        reply = str(session.reply)
        if reply not in REPLIES:
            reply = OTHER
    return command, reply


def rejection_cause(session: Session) -> str | None:
    """
    The cause label of a session that ended without relaying (None for one
    that relayed): its reason, or "other".
    """
    if session.relay is not None:
        return None
    reason = session.reason
    return reason if reason in REJECTION_CAUSES else OTHER


def ident_label(outcome: str) -> str:
    """An ident outcome as a label of the bounded L{IDENT_OUTCOMES}."""
    if outcome.startswith("ERROR:"):
        return "error"
    return outcome if outcome in IDENT_OUTCOMES else OTHER


class PrometheusMetrics:
    """
    The L{socks4tx.metrics.SessionMetrics} of C{--metrics}: counts into its
    own L{CollectorRegistry} (not C{prometheus_client}'s global one, so that
    several factories, and tests, don't share counts).

    @param registry: where the metrics are registered (default: a new one).
    @param multiprocess: in a worker of C{--workers N}: every count also
        goes to this process's files in the directory named by
        C{PROMETHEUS_MULTIPROC_DIR}, which the master merges
        (L{WorkerMetrics}).  That variable must have been set before
        C{prometheus_client} was first imported (the master sets it in the
        workers' environment).
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, multiprocess: bool = False
    ) -> None:
        prometheus = load_prometheus()
        from prometheus_client import values
        from prometheus_client.metrics import Counter, Gauge, Histogram

        if multiprocess and not getattr(values.ValueClass, "_multiprocess", False):
            raise RuntimeError(
                f"multiprocess metrics need {MULTIPROC_ENV} set before"
                " prometheus_client is imported"
            )
        if registry is None:
            registry = prometheus.CollectorRegistry()
            if not multiprocess:
                # A worker's own process figures would be one worker's.
                prometheus.ProcessCollector(registry=registry)
        self.registry: CollectorRegistry = registry
        self.multiprocess = multiprocess
        self.sessions_active: Gauge = Gauge(
            "socks4tx_sessions_active",
            GAUGES["socks4tx_sessions_active"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.sessions: Counter = Counter(
            "socks4tx_sessions",
            "Sessions ended (one per session log event), by command and last"
            " reply; 'none' when there was none.",
            ["command", "reply"],
            registry=registry,
        )
        self.bytes: Counter = Counter(
            "socks4tx_bytes_relayed",
            "Bytes relayed by sessions that ended: up is client to destination,"
            " down destination to client.",
            ["direction"],
            registry=registry,
        )
        self.handshakes: Histogram = Histogram(
            "socks4tx_handshake_duration_seconds",
            "Seconds from accepting a client to starting its relay (for BIND,"
            " including the wait for the application server).",
            registry=registry,
            buckets=HANDSHAKE_BUCKETS,
        )
        self.ident: Counter = Counter(
            "socks4tx_ident_lookups",
            "RFC 1413 lookups by outcome.",
            ["outcome"],
            registry=registry,
        )
        self.rejections: Counter = Counter(
            "socks4tx_rejections",
            "Sessions that ended without relaying, by cause (the session's reason).",
            ["cause"],
            registry=registry,
        )
        self.bind_listeners: Gauge = Gauge(
            "socks4tx_bind_listeners_open",
            GAUGES["socks4tx_bind_listeners_open"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        # Children looked up once: session_ended is on every session's path.
        self._up = self.bytes.labels("up")
        self._down = self.bytes.labels("down")
        self._rejections = {c: self.rejections.labels(c) for c in REJECTION_CAUSES}
        self._ident = {o: self.ident.labels(o) for o in IDENT_OUTCOMES}
        self._sessions: dict[tuple[str, str], Counter] = {}

    def session_started(self) -> None:
        self.sessions_active.inc()

    def session_ended(self, session: Session, admitted: bool) -> None:
        if admitted:
            self.sessions_active.dec()
        labels = session_labels(session)
        child = self._sessions.get(labels)
        if child is None:
            child = self._sessions[labels] = self.sessions.labels(*labels)
        child.inc()
        if session.bytes_up:
            self._up.inc(session.bytes_up)
        if session.bytes_down:
            self._down.inc(session.bytes_down)
        cause = rejection_cause(session)
        if cause is not None:
            self._rejections[cause].inc()

    def handshake_finished(self, seconds: float) -> None:
        self.handshakes.observe(max(0.0, seconds))

    def ident_finished(self, outcome: str) -> None:
        self._ident[ident_label(outcome)].inc()

    def bind_listener_opened(self) -> None:
        self.bind_listeners.inc()

    def bind_listener_closed(self) -> None:
        self.bind_listeners.dec()


# -- --workers: the workers write, the master merges -----------------------------


class _Merged:
    """A collector of the sum of every file in a multiprocess directory."""

    def __init__(self, owner: WorkerMetrics) -> None:
        self.owner = owner

    def collect(self) -> Iterable[Metric]:
        from prometheus_client.metrics_core import GaugeMetricFamily
        from prometheus_client.multiprocess import MultiProcessCollector

        directory = self.owner.directory
        metrics: list[Metric] = []
        if directory is not None and os.path.isdir(directory):
            metrics.extend(MultiProcessCollector(None, directory).collect())
        # A gauge with no live worker is 0, not absent (absent breaks alerts).
        present = {metric.name for metric in metrics}
        for name, documentation in GAUGES.items():
            if name not in present:
                metrics.append(GaugeMetricFamily(name, documentation, value=0))
        return metrics


class WorkerMetrics:
    """
    The master's side of C{--workers N --metrics}.  The workers count into
    files of one directory (L{PrometheusMetrics} with C{multiprocess=True});
    L{registry} sums them: counters and the histogram over every worker that
    ever ran, the gauges over the workers alive (a dead worker's sessions
    and listeners died with it).

    @param directory: the shared directory (default: a private one, made by
        L{open} and removed by L{close}); its C{*.db} files are deleted by
        L{open}.
    """

    def __init__(self, directory: str | None = None) -> None:
        prometheus = load_prometheus()
        self._given = directory
        #: The shared directory, once L{open} made it.
        self.directory: str | None = None
        self.registry: CollectorRegistry = prometheus.CollectorRegistry()
        self.registry.register(_Merged(self))

    def open(self) -> str:
        """
        Make the shared directory (once) and name it in this process's
        environment, which workers inherit.  Call it after twistd dropped
        privileges (the workers must write there) and before the first
        worker starts: L{metrics_service} does, in C{startService}.
        """
        if self.directory is None:
            if self._given is None:
                self.directory = tempfile.mkdtemp(prefix="socks4tx-metrics-")
            else:
                os.makedirs(self._given, exist_ok=True)
                for stale in glob.glob(os.path.join(self._given, "*.db")):
                    os.remove(stale)
                self.directory = self._given
        os.environ[MULTIPROC_ENV] = self.directory
        return self.directory

    def worker_exited(self, pid: int) -> None:
        """
        Worker C{pid} is gone: drop its gauges, and fold its counters and
        histogram into one file of the dead, so that restarts don't grow the
        directory (and each scrape) without bound.
        """
        if self.directory is None:
            return
        from prometheus_client.multiprocess import mark_process_dead

        mark_process_dead(pid, self.directory)
        for kind in ("counter", "histogram"):
            _fold(self.directory, kind, pid)

    def close(self) -> None:
        """Forget the directory; remove it if L{open} made it."""
        if self.directory is None:
            return
        if os.environ.get(MULTIPROC_ENV) == self.directory:
            del os.environ[MULTIPROC_ENV]
        if self._given is None:
            shutil.rmtree(self.directory, ignore_errors=True)
        self.directory = None


def _fold(directory: str, kind: str, pid: int) -> None:
    """Add the C{kind} file of dead C{pid} to C{kind_dead.db}, then remove it."""
    from prometheus_client.mmap_dict import MmapedDict, mmap_key
    from prometheus_client.multiprocess import MultiProcessCollector

    dead = os.path.join(directory, f"{kind}_{pid}.db")
    if not os.path.exists(dead):
        return
    archive = os.path.join(directory, f"{kind}_dead.db")
    sources = [path for path in (archive, dead) if os.path.exists(path)]
    # accumulate=False: bucket counts as they are stored, not cumulative.
    merged = MultiProcessCollector.merge(sources, accumulate=False)
    staging = archive + ".new"  # not *.db: never collected half written
    with contextlib.suppress(FileNotFoundError):
        os.remove(staging)
    target = MmapedDict(staging)
    try:
        for metric in merged:
            for sample in metric.samples:
                labels: dict[str, Any] = sample.labels
                key = mmap_key(
                    metric.name,
                    sample.name,
                    list(labels),
                    list(labels.values()),
                    metric.documentation,
                )
                target.write_value(key, sample.value, 0.0)
    finally:
        target.close()
    os.replace(staging, archive)
    os.remove(dead)


# -- the web side -----------------------------------------------------------------


class MetricsPage(Resource):
    """
    A registry in Prometheus's text format (or OpenMetrics when the scraper
    asks for it).  Rendered in the reactor's thread: a scrape reads a few
    dozen series, cheaper than the thread pool that
    C{prometheus_client.twisted.MetricsResource} uses, and it sees every
    session that ended before it.
    """

    isLeaf = True

    def __init__(self, registry: Collector) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        if request.postpath not in ([], [b""]):
            request.setResponseCode(404)
            return b"Not found: metrics are at /metrics\n"
        from prometheus_client.exposition import choose_encoder

        accept = request.getHeader("accept") or ""
        encode, content_type = choose_encoder(accept)
        body: bytes = encode(self.registry)
        request.setHeader("content-type", content_type)
        return body


class _QuietSite(Site):
    """A Site that logs no access line: a scrape every 15 s is not news."""

    noisy = False
    displayTracebacks = False

    def log(self, request: http.Request) -> None:
        pass


class _Root(Resource):
    """Only C{/metrics}: 404 (escaped, unlike Resource's default) elsewhere."""

    def getChild(self, path: bytes, request: http.Request) -> IResource:
        return notFound(message="Metrics are at /metrics.")


def metrics_site(registry: Collector) -> Site:
    """The web site: the registry at C{/metrics}, 404 everywhere else."""
    root = _Root()
    root.putChild(b"metrics", MetricsPage(registry))
    return _QuietSite(root)


class MetricsService(service.Service):
    """
    Serves a registry on an endpoint; listens before twistd drops
    privileges (as the SOCKS listeners do) and logs C{metrics on
    HOST:PORT} (namespace C{socks4tx.metrics}, field C{address}) once
    started.  For L{WorkerMetrics} it also opens and closes the shared
    directory.
    """

    def __init__(
        self,
        reactor: Any,
        description: str,
        metrics: PrometheusMetrics | WorkerMetrics,
    ) -> None:
        self.reactor = reactor
        self.description = description
        self.metrics = metrics
        self.site = metrics_site(metrics.registry)
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        super().startService()
        if isinstance(self.metrics, WorkerMetrics):
            self.metrics.open()
        self._listen()
        assert self.port is not None
        address = describe(self.port.getHost())
        log.info("metrics on {address}", address=address)

    def _listen(self) -> None:
        if self.port is not None:
            return
        failures: list[Failure] = []
        listening = serverFromString(self.reactor, self.description).listen(self.site)
        listening.addCallbacks(self._listening, failures.append)
        if failures:
            failures[0].raiseException()
        if self.port is None:
            raise RuntimeError(f"--metrics {self.description}: did not listen at once")

    def _listening(self, port: IListeningPort) -> None:
        self.port = port

    def stopService(self) -> Any:
        super().stopService()
        port, self.port = self.port, None
        if isinstance(self.metrics, WorkerMetrics):
            self.metrics.close()
        if port is not None:
            return port.stopListening()
        return None


def metrics_service(
    reactor: Any, description: str, metrics: PrometheusMetrics | WorkerMetrics
) -> MetricsService:
    """
    The service of C{--metrics DESCRIPTION}: C{metrics.registry} at
    C{/metrics} on that Twisted server endpoint.
    """
    return MetricsService(reactor, description, metrics)
