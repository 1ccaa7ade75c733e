"""
C{--metrics}: the Prometheus counts of L{socks4tx.prometheus}, exactly.

Unit tests feed a L{PrometheusMetrics} session records and read the text a
scrape would get; fake-driven sessions check the server's calls; the
multiprocess tests run real processes that count into one directory, as
C{--workers} does; black-box tests scrape a real C{twistd socks4 --metrics}
before and after known traffic.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from blackbox import (
    BIND,
    CONNECT,
    GRANTED,
    IO_TIMEOUT,
    LOOPBACK,
    REJECTED,
    REPO,
    TWISTD,
    ThreadedServer,
    TwistdProcess,
    connect_to,
    free_port,
    parse_listeners,
    read_reply,
    recv_exact,
    recv_until_eof,
    request_bytes,
    socks4_args,
    socks4_request,
)
from fakes import (
    OUTGOING_ADDRESS,
    FakeReactor,
    Proxy,
    bind_request,
    connect_request,
    reply_bytes,
)
from prometheus_client import values
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from twisted.internet.address import IPv4Address
from twisted.internet.error import CannotListenError
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent, formatEvent, globalLogPublisher

from socks4tx import server
from socks4tx.prometheus import (
    HANDSHAKE_BUCKETS,
    IDENT_OUTCOMES,
    INSTALL_HINT,
    MULTIPROC_ENV,
    REJECTION_CAUSES,
    MetricsUnavailable,
    PrometheusMetrics,
    WorkerMetrics,
    load_prometheus,
    metrics_service,
)
from socks4tx.session import Session
from socks4tx.wire import ReplyCode

StartServer = Callable[..., TwistdProcess]
#: (sample name, sorted label items) -> value
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

SESSIONS = "socks4tx_sessions_total"
ACTIVE = "socks4tx_sessions_active"
BYTES = "socks4tx_bytes_relayed_total"
HANDSHAKES = "socks4tx_handshake_duration_seconds"
IDENT = "socks4tx_ident_lookups_total"
REJECTIONS = "socks4tx_rejections_total"
BIND_OPEN = "socks4tx_bind_listeners_open"


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            samples[key] = sample.value
    return samples


def collect(registry: Collector) -> Samples:
    """What a scrape of C{registry} reads, parsed."""
    return parse(generate_latest(registry).decode("utf-8"))


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; a series not there yet counts as 0."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def sessions(samples: Samples) -> dict[tuple[str, str], float]:
    """socks4tx_sessions_total as {(command, reply): count}, zeros left out."""
    found = {}
    for (name, labels), count in samples.items():
        if name == SESSIONS and count:
            label = dict(labels)
            found[label["command"], label["reply"]] = count
    return found


def rejections(samples: Samples) -> dict[str, float]:
    """socks4tx_rejections_total as {cause: count}, zeros left out."""
    counts = {
        cause: value(samples, REJECTIONS, cause=cause) for cause in REJECTION_CAUSES
    }
    return {cause: count for cause, count in counts.items() if count}


def relayed(
    command: str = "connect", up: int = 0, down: int = 0, reason: str = "relayed"
) -> Session:
    return Session(
        "127.0.0.1",
        50123,
        0.0,
        command=command,
        reply=90,
        reason=reason,
        bytes_up=up,
        bytes_down=down,
        relay="portable",
    )


def refused(
    reason: str | None, command: str | None = "connect", reply: int | None = 91
) -> Session:
    return Session("127.0.0.1", 50123, 0.0, command=command, reply=reply, reason=reason)


# -- counting -----------------------------------------------------------------


def test_a_fresh_registry_is_zero_and_bounded() -> None:
    samples = collect(PrometheusMetrics().registry)
    assert value(samples, ACTIVE) == 0
    assert value(samples, BIND_OPEN) == 0
    assert value(samples, HANDSHAKES + "_count") == 0
    assert sessions(samples) == {}
    # The bounded label sets are there from the start, at 0: rate() works
    # from the first scrape and no series appears out of nowhere.
    for cause in REJECTION_CAUSES:
        assert (REJECTIONS, (("cause", cause),)) in samples
    for outcome in IDENT_OUTCOMES:
        assert (IDENT, (("outcome", outcome),)) in samples
    assert value(samples, BYTES, direction="up") == 0
    assert (BYTES, (("direction", "down"),)) in samples


def test_relayed_sessions() -> None:
    metrics = PrometheusMetrics()
    for _ in range(3):
        metrics.session_started()
    metrics.session_ended(relayed(up=100, down=250), admitted=True)
    metrics.session_ended(relayed(command="bind", up=7, down=0), admitted=True)
    samples = collect(metrics.registry)
    assert value(samples, ACTIVE) == 1
    assert sessions(samples) == {("connect", "90"): 1, ("bind", "90"): 1}
    assert value(samples, BYTES, direction="up") == 107
    assert value(samples, BYTES, direction="down") == 250
    assert rejections(samples) == {}


def test_idle_timeout_and_shutdown_of_a_relay_are_no_rejections() -> None:
    metrics = PrometheusMetrics()
    metrics.session_ended(relayed(reason="timeout", up=1), admitted=True)
    metrics.session_ended(relayed(reason="shutdown", down=2), admitted=True)
    samples = collect(metrics.registry)
    assert rejections(samples) == {}
    assert sessions(samples) == {("connect", "90"): 2}


@pytest.mark.parametrize("cause", [c for c in REJECTION_CAUSES if c != "other"])
def test_every_reason_of_a_session_that_never_relayed(cause: str) -> None:
    metrics = PrometheusMetrics()
    metrics.session_started()
    metrics.session_ended(refused(cause), admitted=True)
    samples = collect(metrics.registry)
    assert rejections(samples) == {cause: 1}
    assert value(samples, ACTIVE) == 0


@pytest.mark.parametrize("reason", ["no-such-reason", None, "relayed"])
def test_unknown_reasons_are_other(reason: str | None) -> None:
    """Whatever the record says, the cause label stays in its bounded set."""
    metrics = PrometheusMetrics()
    metrics.session_ended(refused(reason), admitted=True)
    assert rejections(collect(metrics.registry)) == {"other": 1}


def test_a_connection_over_a_limit() -> None:
    """
    Never admitted, so never active; it is a session event (command and
    reply "none") and a rejection for "limit".
    """
    metrics = PrometheusMetrics()
    metrics.session_ended(refused("limit", command=None, reply=None), admitted=False)
    samples = collect(metrics.registry)
    assert value(samples, ACTIVE) == 0
    assert sessions(samples) == {("none", "none"): 1}
    assert rejections(samples) == {"limit": 1}


def test_session_labels_are_bounded() -> None:
    metrics = PrometheusMetrics()
    metrics.session_ended(refused("bad-request", command=None, reply=91), True)
    metrics.session_ended(refused("ident-failed", reply=92), True)
    metrics.session_ended(refused("ident-mismatch", command="bind", reply=93), True)
    metrics.session_ended(refused("rule", command="rm -rf", reply=42), True)
    metrics.session_ended(refused("client-gone", reply=None), True)
    assert sessions(collect(metrics.registry)) == {
        ("none", "91"): 1,
        ("connect", "92"): 1,
        ("bind", "93"): 1,
        ("none", "other"): 1,
        ("connect", "none"): 1,
    }


def test_handshake_histogram() -> None:
    metrics = PrometheusMetrics()
    for seconds in (0.00005, 0.0001, 0.003, 0.003, 29.0, 45.0, -1.0):
        metrics.handshake_finished(seconds)
    samples = collect(metrics.registry)
    assert value(samples, HANDSHAKES + "_count") == 7
    assert value(samples, HANDSHAKES + "_sum") == pytest.approx(74.00615)

    def bucket(le: str) -> float:
        return value(samples, HANDSHAKES + "_bucket", le=le)

    # A negative duration (a clock stepped back) counts as 0.
    assert bucket("0.0001") == 3
    assert bucket("0.0025") == 3
    assert bucket("0.005") == 5
    assert bucket("10.0") == 5
    assert bucket("30.0") == 6
    assert bucket("+Inf") == 7
    assert HANDSHAKE_BUCKETS[0] == 0.0001 and HANDSHAKE_BUCKETS[-1] == 30.0


def test_ident_outcomes() -> None:
    metrics = PrometheusMetrics()
    outcomes = [
        "match",
        "match",
        "mismatch",
        "ERROR:NO-USER",
        "ERROR:X-SOMETHING-ELSE",
        "refused",
        "timeout",
        "port-mismatch",
        "no-address",
        "what-is-this",
    ]
    for outcome in outcomes:
        metrics.ident_finished(outcome)
    samples = collect(metrics.registry)
    counts = {o: value(samples, IDENT, outcome=o) for o in IDENT_OUTCOMES}
    assert counts == {
        "match": 2,
        "mismatch": 1,
        "refused": 1,
        "timeout": 1,
        "closed": 0,
        "malformed": 0,
        "port-mismatch": 1,
        "no-address": 1,
        "error": 2,
        "other": 1,
    }


def test_bind_listeners_open() -> None:
    metrics = PrometheusMetrics()
    metrics.bind_listener_opened()
    metrics.bind_listener_opened()
    metrics.bind_listener_closed()
    assert value(collect(metrics.registry), BIND_OPEN) == 1


def test_each_instance_counts_alone() -> None:
    """Own registries: two factories (or tests) never share or clash."""
    one, two = PrometheusMetrics(), PrometheusMetrics()
    one.session_started()
    one.session_ended(relayed(up=5), admitted=True)
    assert value(collect(one.registry), BYTES, direction="up") == 5
    assert value(collect(two.registry), BYTES, direction="up") == 0


def test_process_figures_in_a_single_process() -> None:
    if not Path("/proc/self/stat").exists():
        pytest.skip("no /proc: prometheus_client has no process figures here")
    samples = collect(PrometheusMetrics().registry)
    assert value(samples, "process_open_fds") > 0


# -- the server's calls, on fakes ---------------------------------------------


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> PrometheusMetrics:
    """The metrics every SOCKS4Factory built in this test reports to."""
    metrics = PrometheusMetrics()
    monkeypatch.setattr(server, "NullMetrics", lambda: metrics)
    return metrics


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    with Proxy() as proxy:
        yield proxy


def test_server_reports_a_relayed_connect(
    proxy: Proxy, counted: PrometheusMetrics
) -> None:
    proxy.start()
    assert value(collect(counted.registry), ACTIVE) == 1
    proxy.send(connect_request("198.51.100.5", 80) + b"abc")
    proxy.reactor.advance(0.25)
    remote = proxy.connection_succeeds()
    samples = collect(counted.registry)
    assert value(samples, HANDSHAKES + "_count") == 1
    assert value(samples, HANDSHAKES + "_sum") == 0.25
    remote.receive(b"12345678")
    proxy.client.deliver_eof()
    remote.deliver_eof()
    proxy.assert_ended(
        reply_bytes(ReplyCode.GRANTED, OUTGOING_ADDRESS.port, OUTGOING_ADDRESS.host)
        + b"12345678",
        90,
        "relayed",
    )
    samples = collect(counted.registry)
    assert value(samples, ACTIVE) == 0
    assert sessions(samples) == {("connect", "90"): 1}
    assert value(samples, BYTES, direction="up") == 3
    assert value(samples, BYTES, direction="down") == 8
    assert rejections(samples) == {}


def test_server_reports_a_refusal(proxy: Proxy, counted: PrometheusMetrics) -> None:
    proxy.start()
    proxy.send(connect_request("198.51.100.5", 80))
    proxy.connection_fails()
    proxy.assert_ended(reply_bytes(ReplyCode.REJECTED), 91, "connect-failed")
    samples = collect(counted.registry)
    assert value(samples, ACTIVE) == 0
    assert value(samples, HANDSHAKES + "_count") == 0
    assert sessions(samples) == {("connect", "91"): 1}
    assert rejections(samples) == {"connect-failed": 1}


def test_server_reports_bind_listeners(
    proxy: Proxy, counted: PrometheusMetrics
) -> None:
    proxy.start(bind_address="127.0.0.1", bind_timeout=60.0)
    proxy.send(bind_request("127.0.0.1", 21))
    assert value(collect(counted.registry), BIND_OPEN) == 1
    proxy.reactor.advance(60)
    proxy.settle()
    samples = collect(counted.registry)
    assert value(samples, BIND_OPEN) == 0
    assert value(samples, ACTIVE) == 0
    assert sessions(samples) == {("bind", "91"): 1}
    assert rejections(samples) == {"timeout": 1}


def test_server_reports_a_limit(proxy: Proxy, counted: PrometheusMetrics) -> None:
    proxy.start(max_connections=1)
    second = proxy.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50124))
    second.makeConnection(StringTransport())
    samples = collect(counted.registry)
    assert value(samples, ACTIVE) == 1
    assert sessions(samples) == {("none", "none"): 1}
    assert rejections(samples) == {"limit": 1}


# -- the web side -------------------------------------------------------------


def http_get(
    site_service: Any, path: bytes, headers: bytes = b""
) -> tuple[int, dict[bytes, bytes], bytes]:
    """One request to the service's Site on a fake transport."""
    channel = site_service.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(
        b"GET " + path + b" HTTP/1.0\r\nHost: metrics\r\n" + headers + b"\r\n"
    )
    response = transport.value()
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *header_lines = head.split(b"\r\n")
    fields = {}
    for line in header_lines:
        name, _, field = line.partition(b":")
        fields[name.strip().lower()] = field.strip()
    return int(status_line.split()[1]), fields, body


@pytest.fixture
def events() -> Iterator[list[LogEvent]]:
    captured: list[LogEvent] = []
    globalLogPublisher.addObserver(captured.append)
    yield captured
    globalLogPublisher.removeObserver(captured.append)


def test_service_serves_metrics_and_nothing_else(events: list[LogEvent]) -> None:
    reactor = FakeReactor()
    metrics = PrometheusMetrics()
    metrics.session_started()
    service = metrics_service(reactor, "tcp:9108:interface=127.0.0.1", metrics)
    service.privilegedStartService()
    service.startService()
    assert [(p, i) for p, _, _, i in reactor.tcpServers] == [(9108, "127.0.0.1")]
    announced = [e for e in events if e.get("log_namespace") == "socks4tx.metrics"]
    assert [e["address"] for e in announced] == ["127.0.0.1:9108"]
    assert formatEvent(announced[0]) == "metrics on 127.0.0.1:9108"
    events.clear()

    status, headers, body = http_get(service, b"/metrics")
    assert status == 200
    assert headers[b"content-type"].startswith(b"text/plain; version=0.0.4")
    assert value(parse(body.decode()), ACTIVE) == 1
    for path in (b"/", b"/metrics/more", b"/other", b"/metricsx"):
        assert http_get(service, path)[0] == 404, path
    status, headers, body = http_get(
        service, b"/metrics", b"Accept: application/openmetrics-text; version=1.0.0\r\n"
    )
    assert status == 200
    assert headers[b"content-type"].startswith(b"application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    # Scrapes leave no access lines in the log.
    assert events == []

    service.stopService()
    assert reactor.ports[0].stopped


def test_service_that_cannot_listen_stops_startup() -> None:
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        from twisted.internet import reactor

        service = metrics_service(
            reactor, f"tcp:{port}:interface={LOOPBACK}", PrometheusMetrics()
        )
        with pytest.raises(CannotListenError):
            service.privilegedStartService()


# -- without prometheus_client ------------------------------------------------


def test_loader_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(MetricsUnavailable) as raised:
        load_prometheus()
    assert INSTALL_HINT in str(raised.value)
    assert INSTALL_HINT == "pip install 'socks4tx[metrics]'"
    assert isinstance(raised.value, ImportError)
    with pytest.raises(MetricsUnavailable):
        PrometheusMetrics()
    with pytest.raises(MetricsUnavailable):
        WorkerMetrics()


def test_core_never_imports_prometheus_client() -> None:
    """The server, its options and its workers run without the package."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["prometheus_client"] = None  # as if not installed
        import socks4tx.metrics, socks4tx.prometheus, socks4tx.server
        import socks4tx.tap, socks4tx.worker, socks4tx.workers
        try:
            socks4tx.prometheus.load_prometheus()
        except socks4tx.prometheus.MetricsUnavailable as error:
            print(error)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr
    assert INSTALL_HINT in result.stdout


# -- --workers: processes counting into one directory -------------------------

#: A worker stand-in: counts N relayed CONNECTs of 10 bytes up and 20 down,
#: one ident match, then holds one active session and one BIND listener
#: until its standard input closes.
COUNTING_PROCESS = textwrap.dedent(
    """
    import sys
    from socks4tx.prometheus import PrometheusMetrics
    from socks4tx.session import Session

    metrics = PrometheusMetrics(multiprocess=True)
    for _ in range(int(sys.argv[1])):
        metrics.session_started()
        metrics.handshake_finished(0.003)
        session = Session("127.0.0.1", 1, 0.0, command="connect", reply=90,
                          reason="relayed", bytes_up=10, bytes_down=20,
                          relay="portable")
        metrics.session_ended(session, admitted=True)
    metrics.session_ended(Session("127.0.0.1", 2, 0.0, reason="limit"), False)
    metrics.ident_finished("match")
    metrics.session_started()
    metrics.bind_listener_opened()
    print("counted", flush=True)
    sys.stdin.read()
    """
)


class Counting:
    """One process of COUNTING_PROCESS, in the master's environment."""

    def __init__(self, count: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", COUNTING_PROCESS, str(count)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line == b"counted\n", line

    @property
    def pid(self) -> int:
        return self.process.pid

    def exit(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        assert self.process.wait(IO_TIMEOUT) == 0

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(IO_TIMEOUT)


@pytest.fixture
def master(monkeypatch: pytest.MonkeyPatch) -> Iterator[WorkerMetrics]:
    """The master's side, its environment variable undone after the test."""
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    merged = WorkerMetrics()
    yield merged
    merged.close()


def test_workers_are_merged(master: WorkerMetrics) -> None:
    directory = master.open()
    assert os.environ[MULTIPROC_ENV] == directory
    # Before any worker: the gauges are 0, not absent.
    samples = collect(master.registry)
    assert (value(samples, ACTIVE), value(samples, BIND_OPEN)) == (0, 0)
    assert (ACTIVE, ()) in samples
    workers = [Counting(2), Counting(3)]
    try:
        samples = collect(master.registry)
        assert sessions(samples) == {("connect", "90"): 5, ("none", "none"): 2}
        assert value(samples, BYTES, direction="up") == 50
        assert value(samples, BYTES, direction="down") == 100
        assert value(samples, HANDSHAKES + "_count") == 5
        assert value(samples, HANDSHAKES + "_bucket", le="0.005") == 5
        assert value(samples, HANDSHAKES + "_bucket", le="0.0025") == 0
        assert value(samples, IDENT, outcome="match") == 2
        assert rejections(samples) == {"limit": 2}
        # Gauges are summed over the live workers, without a pid label.
        assert value(samples, ACTIVE) == 2
        assert value(samples, BIND_OPEN) == 2
        assert not any(dict(labels).get("pid") for _, labels in samples)

        # A worker dies: its sessions and listeners went with it; what it
        # counted stays, in one file of the dead.
        workers[0].exit()
        master.worker_exited(workers[0].pid)
        after = collect(master.registry)
        assert value(after, ACTIVE) == 1
        assert value(after, BIND_OPEN) == 1
        for kept in (SESSIONS, BYTES, HANDSHAKES + "_bucket", HANDSHAKES + "_count"):
            assert {k: v for k, v in after.items() if k[0] == kept} == {
                k: v for k, v in samples.items() if k[0] == kept
            }
        assert value(after, HANDSHAKES + "_sum") == pytest.approx(0.015)
        assert str(workers[0].pid) not in " ".join(os.listdir(directory))

        # Its replacement adds to what the dead counted.
        workers.append(Counting(4))
        workers[1].kill()
        master.worker_exited(workers[1].pid)
        after = collect(master.registry)
        assert sessions(after) == {("connect", "90"): 9, ("none", "none"): 3}
        assert value(after, BYTES, direction="down") == 180
        assert value(after, HANDSHAKES + "_count") == 9
        assert value(after, HANDSHAKES + "_bucket", le="+Inf") == 9
        assert value(after, ACTIVE) == 1

        workers[2].exit()
        master.worker_exited(workers[2].pid)
        after = collect(master.registry)
        assert (value(after, ACTIVE), value(after, BIND_OPEN)) == (0, 0)
        assert sessions(after) == {("connect", "90"): 9, ("none", "none"): 3}
        # However many workers ran, the dead fill two files.
        assert sorted(os.listdir(directory)) == ["counter_dead.db", "histogram_dead.db"]
    finally:
        for worker in workers:
            worker.kill()


def test_private_directory_lifecycle(master: WorkerMetrics) -> None:
    master.worker_exited(12345)  # not opened yet: nothing to do
    directory = master.open()
    assert master.open() == directory
    assert Path(directory).is_dir()
    master.close()
    assert not Path(directory).exists()
    assert MULTIPROC_ENV not in os.environ
    master.close()


def test_given_directory_is_emptied_and_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    (tmp_path / "counter_1.db").write_bytes(b"stale")
    (tmp_path / "notes.txt").write_text("not ours")
    merged = WorkerMetrics(str(tmp_path))
    assert merged.open() == str(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    merged.close()
    assert tmp_path.is_dir()


def test_multiprocess_needs_the_environment_first() -> None:
    if getattr(values.ValueClass, "_multiprocess", False):
        pytest.skip(f"{MULTIPROC_ENV} was set when this process started")
    with pytest.raises(RuntimeError, match=MULTIPROC_ENV):
        PrometheusMetrics(multiprocess=True)


# -- black box: twistd socks4 --metrics ---------------------------------------
#
# These need tap.py's --metrics (and, for --workers, workers.py's calls).

_METRICS_ON = re.compile(r"metrics on (\S+)")


def metrics_address(server: TwistdProcess) -> tuple[str, int]:
    """Where the server said it serves metrics (its 'metrics on' line)."""
    deadline = time.monotonic() + IO_TIMEOUT
    while time.monotonic() < deadline:
        for event in server.log_events(namespace="socks4tx.metrics"):
            if event.get("address"):
                return parse_listeners([event["address"]])[0]
        match = _METRICS_ON.search(server.output())
        if match:
            return parse_listeners([match.group(1)])[0]
        server.assert_alive()
        time.sleep(0.05)
    raise AssertionError(f"no 'metrics on' line:\n{server.output()}")


def scrape(address: tuple[str, int]) -> Samples:
    # No proxy from the environment: the scrape goes straight to loopback.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    host, port = address
    with opener.open(f"http://{host}:{port}/metrics", timeout=IO_TIMEOUT) as answer:
        assert answer.status == 200
        return parse(answer.read().decode("utf-8"))


def delta(before: Samples, after: Samples) -> Samples:
    """The series that moved, and by how much."""
    moved = {}
    for key in before.keys() | after.keys():
        change = after.get(key, 0.0) - before.get(key, 0.0)
        if change:
            moved[key] = change
    return moved


def only(moved: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        labels: change for (sample, labels), change in moved.items() if sample == name
    }


def wait_until(
    predicate: Callable[[], bool], what: str, timeout: float = IO_TIMEOUT
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def echo_exchange(proxy: tuple[str, int], echo_port: int, payload: bytes) -> int:
    """A relayed CONNECT to the echo server; the client's port."""
    sock, reply = socks4_request(
        proxy, CONNECT, echo_port, LOOPBACK, b"m", payload=payload
    )
    with sock:
        assert reply.code == GRANTED
        client_port = sock.getsockname()[1]
        assert recv_exact(sock, len(payload)) == payload
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b""
    return client_port


PAYLOADS = (b"x", b"y" * 1000, b"z" * 200_000)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("relay", ["splice", "portable"])
def test_scrape_before_and_after_known_traffic(
    start_server: StartServer, echo: ThreadedServer, tmp_path: Path, relay: str
) -> None:
    if relay == "splice" and not hasattr(os, "splice"):
        pytest.skip("no os.splice here")
    denied = free_port()
    rules = tmp_path / "sockd.conf"
    rules.write_text(
        f"deny 127.0.0.1 255.255.255.255 127.0.0.1/32 eq {denied}\n"
        "permit 127.0.0.1 255.255.255.255\n"
    )
    proxy = start_server(
        "--metrics",
        f"tcp:0:interface={LOOPBACK}",
        "--rules",
        str(rules),
        "--relay",
        relay,
        json_log=True,
    )
    where = metrics_address(proxy)
    assert where[0] == LOOPBACK and where[1] not in (0, proxy.port)
    before = scrape(where)
    ports = []

    # Three relayed CONNECTs of known sizes.
    for payload in PAYLOADS:
        ports.append(echo_exchange(proxy.address, echo.port, payload))

    # One denied by the rules.
    sock, reply = socks4_request(proxy.address, CONNECT, denied, LOOPBACK, b"m")
    with sock:
        assert reply.code == REJECTED
        ports.append(sock.getsockname()[1])
        assert recv_until_eof(sock) == b""

    # One bad request: an unknown command.
    with connect_to(proxy.address) as sock:
        sock.sendall(request_bytes(3, 80, LOOPBACK, b"m"))
        assert read_reply(sock).code == REJECTED
        ports.append(sock.getsockname()[1])
        assert recv_until_eof(sock) == b""

    # Those are over (a client may see its close before the server logs it).
    for port in ports:
        proxy.wait_for_session(port)

    # One BIND: its listener counts while it waits, and not once accepted.
    client, first = socks4_request(proxy.address, BIND, 21, LOOPBACK, b"m")
    with client:
        assert first.code == GRANTED
        ports.append(client.getsockname()[1])
        waiting = scrape(where)
        assert value(waiting, BIND_OPEN) == 1
        assert value(waiting, ACTIVE) == 1
        with socket.create_connection(
            (LOOPBACK, first.port), timeout=IO_TIMEOUT
        ) as peer:
            assert read_reply(client).code == GRANTED
            relaying = scrape(where)
            assert value(relaying, BIND_OPEN) == 0
            assert value(relaying, ACTIVE) == 1
            peer.sendall(b"1234567")
            assert recv_exact(client, 7) == b"1234567"
            client.sendall(b"abcde")
            assert recv_exact(peer, 5) == b"abcde"
            client.shutdown(socket.SHUT_WR)
            peer.shutdown(socket.SHUT_WR)
            assert recv_until_eof(peer) == b""
            assert recv_until_eof(client) == b""

    proxy.wait_for_session(ports[-1])
    moved = delta(before, scrape(where))

    sent = sum(len(p) for p in PAYLOADS)
    assert only(moved, SESSIONS) == {
        (("command", "connect"), ("reply", "90")): 3,
        (("command", "connect"), ("reply", "91")): 1,
        (("command", "none"), ("reply", "91")): 1,
        (("command", "bind"), ("reply", "90")): 1,
    }
    assert only(moved, BYTES) == {
        (("direction", "up"),): sent + 5,
        (("direction", "down"),): sent + 7,
    }
    assert only(moved, REJECTIONS) == {
        (("cause", "rule"),): 1,
        (("cause", "bad-request"),): 1,
    }
    assert only(moved, HANDSHAKES + "_count") == {(): 4}
    assert only(moved, IDENT) == {}
    assert ACTIVE not in {name for name, _ in moved}
    after = scrape(where)
    assert (value(after, ACTIVE), value(after, BIND_OPEN)) == (0, 0)


@pytest.mark.timeout(60)
def test_metrics_without_prometheus_client(tmp_path: Path) -> None:
    """--metrics without the package: twistd stops, saying what to install."""
    shadow = tmp_path / "shadow" / "prometheus_client"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('not installed (test)')\n")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(shadow.parent)]),
    }
    result = subprocess.run(
        [
            str(TWISTD),
            "-n",
            "--pidfile=",
            *socks4_args("--metrics", f"tcp:0:interface={LOOPBACK}"),
        ],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert INSTALL_HINT in output, output
    assert "listening on" not in output


def worker_pids(master: TwistdProcess) -> dict[int, int]:
    """The latest pid of each worker slot, from the master's log."""
    pids = {}
    for event in master.log_events(namespace="socks4tx.worker"):
        if event.get("ready") and event.get("worker") is not None:
            pids[event["worker"]] = event["worker_pid"]
    return pids


@pytest.mark.timeout(120)
def test_workers_merged_at_the_master(
    start_server: StartServer, echo: ThreadedServer
) -> None:
    proxy = start_server(
        "--workers", "2", "--metrics", f"tcp:0:interface={LOOPBACK}", json_log=True
    )
    where = metrics_address(proxy)
    wait_until(lambda: len(worker_pids(proxy)) == 2, "two workers ready")
    before = scrape(where)

    payloads = [bytes([65 + n]) * (n * 997 + 1) for n in range(8)]
    ports = [echo_exchange(proxy.address, echo.port, p) for p in payloads]
    for port in ports:
        proxy.wait_for_session(port)
    moved = delta(before, scrape(where))
    sent = sum(len(p) for p in payloads)
    assert only(moved, SESSIONS) == {(("command", "connect"), ("reply", "90")): 8}
    assert only(moved, BYTES) == {
        (("direction", "up"),): sent,
        (("direction", "down"),): sent,
    }
    assert only(moved, HANDSHAKES + "_count") == {(): 8}

    # Two BIND listeners held open, wherever they are, then every worker killed:
    # the gauges lose what died, the counters keep what was counted.
    held = []
    try:
        for _ in range(2):
            sock, reply = socks4_request(proxy.address, BIND, 21, LOOPBACK, b"m")
            held.append(sock)
            assert reply.code == GRANTED
        holding = scrape(where)
        assert (value(holding, BIND_OPEN), value(holding, ACTIVE)) == (2, 2)
        killed = worker_pids(proxy)
        for pid in killed.values():
            os.kill(pid, signal.SIGKILL)

        def gauges_dropped() -> bool:
            now = scrape(where)
            return (value(now, BIND_OPEN), value(now, ACTIVE)) == (0, 0)

        wait_until(gauges_dropped, "the dead workers' gauges to go")
        assert delta(holding, scrape(where)).keys() <= {(BIND_OPEN, ()), (ACTIVE, ())}
    finally:
        for sock in held:
            sock.close()

    # The restarted workers add to what the dead ones counted.
    wait_until(
        lambda: (
            len(worker_pids(proxy)) == 2
            and set(worker_pids(proxy).values()).isdisjoint(killed.values())
        ),
        "both workers restarted",
        timeout=30,
    )
    port = echo_exchange(proxy.address, echo.port, b"again")
    proxy.wait_for_session(port)
    moved = delta(before, scrape(where))
    assert only(moved, SESSIONS) == {(("command", "connect"), ("reply", "90")): 9}
    assert only(moved, BYTES) == {
        (("direction", "up"),): sent + 5,
        (("direction", "down"),): sent + 5,
    }
