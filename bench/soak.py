#!/usr/bin/env python3
"""
Soak socks4tx: many concurrent relayed sessions held, then many sequential
ones, through one server process; nothing may leak.

One run starts an echo server (its own process), one socks4tx server
(C{twistd -n --pidfile= socks4}, from the source tree) and the load (another
process), all on 127.0.0.1:

  warm-up  1,000 sequential sessions, then the baseline is taken: the
           server's RSS and open descriptors (one-time allocations made by
           the first sessions do not count as a leak);
  phase A  8,000 SOCKS4 CONNECT sessions opened to the echo server, each
           echoing a few bytes, held, echoing again, then all closed;
  phase B  200,000 sequential sessions (connect, request, reply 90, a few
           bytes echoed, close), a few dozen in flight.

The server's VmRSS and descriptor count are reported before, during and
after each phase.  Pass: every session worked, descriptors return to the
baseline and RSS to within 10% of it once the sessions have closed.
Exit status 1 on a failure.  See bench/README.rst.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import multiprocessing.connection
import multiprocessing.process
import os
import platform
import selectors
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from run import (
    ECHO_PAYLOAD,
    FORK,
    KIB,
    LOOPBACK,
    ROOT,
    Address,
    BenchError,
    Child,
    ExchangeEngine,
    PeerSpec,
    RunningPeer,
    Sample,
    _listdir,
    _probe_output,
    _terminate,
    _twistd,
    check_range,
    cpu_seconds,
    jemalloc_env,
    listener,
    picker,
    print_table,
    probe_twistd_plugin,
    raise_nofile,
    rss_kib,
    serve_echo,
)

#: RSS after the sessions close may exceed the baseline by this share.
RSS_TOLERANCE = 0.10
#: How long the server gets to release descriptors after the sessions close.
RELEASE_WAIT = 30.0
#: Options that lift the server's connection limits, when it has them.
LIMIT_OPTIONS = (
    ("--max-connections", "9000"),
    ("--max-connections-per-source", "0"),
)
PROGRESS_EVERY = 1.0  # seconds between progress messages of a load process


# -- the server -------------------------------------------------------------------


def fd_count(pids: Sequence[int]) -> int:
    """Open descriptors of C{pids}, from /proc/PID/fd."""
    return sum(len(_listdir(f"/proc/{pid}/fd")) for pid in pids)


def server_options() -> tuple[list[str], list[str]]:
    """The limit options the server has (to pass), and those it lacks."""
    usage = _probe_output([_twistd(), "socks4", "--help"], {"PYTHONPATH": str(ROOT)})
    have, missing = [], []
    for option, value in LIMIT_OPTIONS:
        if f"{option}=" in usage:
            have += [option, value]
        else:
            missing.append(option)
    return have, missing


def server_spec(options: Sequence[str], allocator: str) -> PeerSpec:
    env = {"PYTHONPATH": "{root}"}
    if allocator == "jemalloc":
        env.update(jemalloc_env())
    return PeerSpec(
        "socks4tx",
        (
            "{twistd}", "-n", "--pidfile=", "socks4",
            "--listen", "tcp:{port}:interface=127.0.0.1",
            *options,
        ),
        env=env,
    )  # fmt: skip


def log_problems(path: Path) -> int:
    """Lines of the server's log that report an unexpected error."""
    count = 0
    with contextlib.suppress(OSError), open(path, errors="replace") as log:
        for line in log:
            if "Traceback (most recent call last)" in line or "Unhandled" in line:
                count += 1
    return count


# -- load processes ---------------------------------------------------------------


def _progress(conn: multiprocessing.connection.Connection, *values: Any) -> None:
    conn.send(("progress", values))


def sequential_load(
    conn: multiprocessing.connection.Connection,
    proxy: Address,
    dest: Address,
    count: int,
    concurrency: int,
    limit: float,
) -> Sample:
    """
    C{count} sessions (connect, SOCKS4 CONNECT, 90, echo, close), at most
    C{concurrency} at a time, within C{limit} seconds; a progress message
    (done, errors) every second.
    """
    gc.disable()  # the engine makes no cycles; no collector pauses
    engine = ExchangeEngine(proxy, dest, hold=False)
    max_errors = max(100, count // 100)
    start = time.monotonic()
    deadline = start + limit
    next_progress = start + PROGRESS_EVERY
    cpu0 = time.process_time()
    try:
        while engine.errors < max_errors:  # and the deadline, below
            now = time.monotonic()
            done = len(engine.latencies)
            if done + engine.errors >= count or now > deadline:
                break
            if now >= next_progress:
                _progress(conn, done, engine.errors)
                next_progress = now + PROGRESS_EVERY
            while (
                engine.active < concurrency
                and done + engine.errors + engine.active < count
            ):
                engine.start()
            engine.poll(0.05)
    finally:
        engine.close()
    seconds = time.monotonic() - start
    latencies = sorted(engine.latencies)
    done = len(latencies)

    def quantile(q: float) -> float:
        if not latencies:
            return 0.0
        return 1000 * latencies[min(done - 1, int(done * q))]

    return {
        "requested": count,
        "done": done,
        "errors": engine.errors,
        "last_error": engine.last_error,
        "timed_out": done + engine.errors < count and engine.errors < max_errors,
        "seconds": seconds,
        "rate": done / seconds if seconds > 0 else 0.0,
        "p50_ms": quantile(0.5),
        "p99_ms": quantile(0.99),
        "max_ms": quantile(1.0),
        "client_cpu": time.process_time() - cpu0,
    }


def echo_again(socks: Sequence[socket.socket], limit: float) -> int:
    """Send L{ECHO_PAYLOAD} on every held socket at once; how many failed."""
    deadline = time.monotonic() + limit
    failed = 0
    with selectors.DefaultSelector() as sel:
        for sock in socks:
            try:
                if sock.send(ECHO_PAYLOAD) != len(ECHO_PAYLOAD):
                    raise BenchError("short send")
            except (OSError, BenchError):
                failed += 1
                continue
            sel.register(sock, selectors.EVENT_READ, bytearray())
        while sel.get_map() and time.monotonic() < deadline:  # and data or errors
            for key, _ in sel.select(0.5):
                conn, buf = key.fileobj, key.data
                assert isinstance(conn, socket.socket)
                try:
                    data = conn.recv(len(ECHO_PAYLOAD) - len(buf))
                except OSError:
                    data = b""
                buf += data
                if not data or len(buf) == len(ECHO_PAYLOAD):
                    sel.unregister(conn)
                    failed += buf != ECHO_PAYLOAD
        failed += len(sel.get_map())  # never answered
    return failed


def hold_load(
    conn: multiprocessing.connection.Connection,
    proxy: Address,
    dest: Address,
    count: int,
    concurrency: int,
    limit: float,
) -> Sample:
    """
    Open C{count} relayed sessions (each echoes once), at most
    C{concurrency} opening at a time, and hold them: says C{("held", n)};
    then, when told C{"check"}, echoes on all of them again and says
    C{("checked", failed)}; when told C{"release"}, closes them all.
    """
    engine = ExchangeEngine(proxy, dest, hold=True)
    start = time.monotonic()
    deadline = start + limit
    next_progress = start + PROGRESS_EVERY
    result: Sample = {"requested": count}
    closed = False
    try:
        while len(engine.held) + engine.errors < count:  # and the deadline
            now = time.monotonic()
            if now > deadline:
                break
            if now >= next_progress:
                _progress(conn, len(engine.held), engine.errors)
                next_progress = now + PROGRESS_EVERY
            while (
                engine.active < concurrency
                and len(engine.held) + engine.errors + engine.active < count
            ):
                engine.start()
            engine.poll(0.05)
        result.update(
            held=len(engine.held),
            errors=engine.errors,
            last_error=engine.last_error,
            open_seconds=time.monotonic() - start,
        )
        conn.send(("held", len(engine.held)))
        for _ in range(2):  # "check", then "release"
            if not conn.poll(limit):
                raise BenchError("never told to release the sessions")
            command = conn.recv()
            if command == "check":
                result["check_failed"] = echo_again(engine.held, 60.0)
                conn.send(("checked", result["check_failed"]))
            elif command == "release":
                break
        close_start = time.monotonic()
        closed = True
        engine.close()
        result["close_seconds"] = time.monotonic() - close_start
        return result
    finally:
        if not closed:
            engine.close()


# -- the soak ---------------------------------------------------------------------


@dataclass
class Snapshot:
    """The server at one moment."""

    phase: str
    point: str
    seconds: float  # since the server started
    sessions: int  # sessions of the phase so far
    rss_kib: int
    fds: int


@dataclass
class Settings:
    connections: int
    sessions: int
    concurrency: int
    open_concurrency: int
    warmup: int
    hold: float
    settle: float
    #: "pymalloc" (Python's default) or "jemalloc" (see README).
    allocator: str = "pymalloc"


class Soak:
    """The echo server, the socks4tx server, and what was seen of it."""

    def __init__(self, settings: Settings, options: Sequence[str], workdir: Path):
        self.settings = settings
        self.workdir = workdir
        self.children: list[Child] = []
        echo_sock = listener(backlog=8192)
        self.echo: Address = echo_sock.getsockname()
        self.echo_process: multiprocessing.process.BaseProcess = FORK.Process(
            target=serve_echo, args=(echo_sock,), daemon=True
        )
        self.echo_process.start()
        echo_sock.close()
        try:
            self.peer = RunningPeer(
                server_spec(options, settings.allocator), workdir, self.echo
            )
        except BaseException:
            self.echo_process.terminate()
            self.echo_process.join(5)
            raise
        assert self.peer.address is not None and self.peer.pid is not None
        self.proxy: Address = self.peer.address
        self.pid: int = self.peer.pid
        self.started = time.monotonic()
        self.snapshots: list[Snapshot] = []
        self.series: list[Snapshot] = []  # phase B, every second

    def close(self) -> None:
        for child in self.children:
            if child.process.is_alive():
                child.process.terminate()
            child.stop()
        self.children.clear()
        self.peer.stop()
        process = self.echo_process
        if process.is_alive():
            process.terminate()
            process.join(5)
        if process.is_alive():
            process.kill()
            process.join(5)

    def child(self, func: Any, *args: Any) -> Child:
        child = Child(func, *args, pass_conn=True)
        self.children.append(child)
        return child

    def snapshot(
        self, phase: str, point: str, sessions: int, keep: bool = True
    ) -> Snapshot:
        if not self.peer.alive():
            raise BenchError(f"the server died\n{self.peer.log_tail()}")
        shot = Snapshot(
            phase,
            point,
            time.monotonic() - self.started,
            sessions,
            rss_kib([self.pid]),
            fd_count([self.pid]),
        )
        if keep:
            self.snapshots.append(shot)
        return shot

    def wait_released(self, fds: int) -> float:
        """
        Wait (at most L{RELEASE_WAIT} s) until the server holds no more than
        C{fds} descriptors, then C{settle} seconds more; how long it took.
        """
        start = time.monotonic()
        while time.monotonic() - start < RELEASE_WAIT:  # 10 looks a second
            if fd_count([self.pid]) <= fds:
                break
            time.sleep(0.1)
        waited = time.monotonic() - start
        time.sleep(self.settings.settle)
        return waited

    def sequential(
        self, phase: str, count: int, series: bool, report_every: float = 10.0
    ) -> Sample:
        """C{count} sequential sessions, sampling the server every second."""
        concurrency = self.settings.concurrency
        limit = 120 + count / 400  # even at 400 sessions/s
        child = self.child(
            sequential_load, self.proxy, self.echo, count, concurrency, limit
        )
        cpu0 = cpu_seconds([self.pid])
        start = time.monotonic()
        next_report = start + report_every
        while True:  # a message a second; the load stops by itself in time
            kind, value = child.receive(60)
            if kind != "progress":
                break
            done, errors = value
            shot = self.snapshot(phase, "during", done, keep=False)
            if series:
                self.series.append(shot)
            if time.monotonic() >= next_report:
                next_report += report_every
                elapsed = time.monotonic() - start
                print(
                    f"  {phase}: {done:,}/{count:,} sessions"
                    f"  {done / elapsed:,.0f}/s  RSS {shot.rss_kib / KIB:.1f} MiB"
                    f"  fds {shot.fds}  errors {errors}",
                    flush=True,
                )
            if time.monotonic() - start > limit + 60:
                raise BenchError("the load process did not stop in time")
        sample: Sample = value
        child.stop()
        sample["proxy_cpu"] = cpu_seconds([self.pid]) - cpu0
        return sample

    def warm_up(self) -> Sample:
        count = self.settings.warmup
        print(f"warm-up: {count:,} sessions", flush=True)
        start = self.snapshot("start", "after start", 0)
        sample = self.sequential("warm-up", count, series=False)
        if sample["done"] != count:
            raise BenchError(f"warm-up: {sample['done']} of {count} sessions worked")
        self.wait_released(start.fds)
        self.snapshot("baseline", "after warm-up", count)
        return sample

    def phase_a(self, baseline: Snapshot) -> Sample:
        count = self.settings.connections
        print(f"\nphase A: {count:,} concurrent sessions held", flush=True)
        self.snapshot("A", "before", 0)
        limit = 120 + count / 50  # opening, even at 50 sessions/s
        child = self.child(
            hold_load,
            self.proxy,
            self.echo,
            count,
            self.settings.open_concurrency,
            limit,
        )
        peak_rss = peak_fds = 0
        start = time.monotonic()
        next_report = start + 10.0
        while True:  # a message a second, until all are open
            kind, value = child.receive(60)
            shot = self.snapshot("A", "opening", 0, keep=False)
            peak_rss, peak_fds = max(peak_rss, shot.rss_kib), max(peak_fds, shot.fds)
            if kind != "progress":
                break
            if time.monotonic() - start > limit + 60:
                raise BenchError("the load process did not stop in time")
            if time.monotonic() >= next_report:
                next_report += 10.0
                print(
                    f"  opening: {value[0]:,} held, {value[1]} errors;"
                    f" server RSS {_mib(shot.rss_kib)} MiB, fds {shot.fds}",
                    flush=True,
                )
        held: int = value
        print(f"  {held:,} held in {time.monotonic() - start:.1f} s", flush=True)
        hold_end = time.monotonic() + self.settings.hold
        while time.monotonic() < hold_end:  # sample while holding
            shot = self.snapshot("A", "holding", held, keep=False)
            peak_rss, peak_fds = max(peak_rss, shot.rss_kib), max(peak_fds, shot.fds)
            time.sleep(0.5)
        during = self.snapshot("A", "during (held)", held)
        child.conn.send("check")
        kind, check_failed = child.receive(120)
        print(f"  echo again on every held session: {check_failed} failed", flush=True)
        shot = self.snapshot("A", "after echo again", held, keep=False)
        child.conn.send("release")
        sample = child.result(120)
        waited = self.wait_released(baseline.fds)
        after = self.snapshot("A", "after close", held)
        print(
            f"  closed; server released its descriptors in {waited:.1f} s;"
            f" RSS {during.rss_kib / KIB:.1f} -> {after.rss_kib / KIB:.1f} MiB",
            flush=True,
        )
        sample.update(
            peak_rss_kib=max(peak_rss, during.rss_kib, shot.rss_kib),
            peak_fds=max(peak_fds, during.fds, shot.fds),
            release_seconds=waited,
            kib_per_session=(during.rss_kib - baseline.rss_kib) / max(1, held),
        )
        return sample

    def phase_b(self, baseline: Snapshot) -> Sample:
        count = self.settings.sessions
        print(
            f"\nphase B: {count:,} sequential sessions,"
            f" {self.settings.concurrency} in flight",
            flush=True,
        )
        self.snapshot("B", "before", 0)
        sample = self.sequential("B", count, series=True)
        waited = self.wait_released(baseline.fds)
        self.snapshot("B", "after close", sample["done"])
        sample["release_seconds"] = waited
        print(
            f"  {sample['done']:,} sessions in {sample['seconds']:.1f} s"
            f" ({sample['rate']:,.0f}/s), {sample['errors']} errors;"
            f" p50 {sample['p50_ms']:.1f} ms, p99 {sample['p99_ms']:.1f} ms",
            flush=True,
        )
        return sample


# -- the report -------------------------------------------------------------------


@dataclass
class Criterion:
    name: str
    ok: bool
    detail: str


def _mib(kib: float) -> str:
    return f"{kib / KIB:.1f}"


def _shot(soak: Soak, phase: str, point: str) -> Snapshot | None:
    for shot in soak.snapshots:
        if shot.phase == phase and shot.point == point:
            return shot
    return None


def growth_per_10k(series: Sequence[Snapshot]) -> float | None:
    """
    RSS growth over phase B, in KiB per 10,000 sessions: the least-squares
    slope over the samples of its second half (the first half may still be
    filling caches and free lists).
    """
    points = [(s.sessions, s.rss_kib) for s in series[len(series) // 2 :]]
    if len(points) < 5 or points[-1][0] == points[0][0]:
        return None
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    if den == 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den
    return slope * 10_000


def figures_table(soak: Soak, a: Sample | None, b: Sample | None) -> list[list[str]]:
    rows = [
        ["phase", "point", "sessions", "RSS MiB", "vs baseline", "vs before", "fds"]
    ]
    base = _shot(soak, "baseline", "after warm-up")

    def change(shot: Snapshot, reference: Snapshot | None) -> str:
        if reference is None or not reference.rss_kib or reference is shot:
            return "-"
        return f"{100 * (shot.rss_kib / reference.rss_kib - 1):+.1f}%"

    def row(phase: str, point: str, shot: Snapshot) -> None:
        before = _shot(soak, phase, "before")
        rows.append(
            [phase, point, f"{shot.sessions:,}", _mib(shot.rss_kib),
             change(shot, base), change(shot, before), str(shot.fds)]
        )  # fmt: skip

    for shot in soak.snapshots:
        if shot.phase == "A" and shot.point == "during (held)" and a is not None:
            row("A", "during: held", shot)
            rows.append(
                ["A", "during: peak", f"{a['held']:,}", _mib(a["peak_rss_kib"]),
                 "-", "-", str(a["peak_fds"])]
            )  # fmt: skip
            continue
        if shot.phase == "B" and shot.point == "after close" and soak.series:
            series = soak.series
            rss = [s.rss_kib for s in series]
            fds = [s.fds for s in series]
            rows.append(
                ["B", f"during: min ({len(series)} samples)", "-", _mib(min(rss)),
                 "-", "-", str(min(fds))]
            )  # fmt: skip
            rows.append(
                ["B", "during: max", "-", _mib(max(rss)), "-", "-", str(max(fds))]
            )  # fmt: skip
            rows.append(
                ["B", "during: last", f"{series[-1].sessions:,}", _mib(rss[-1]),
                 "-", "-", str(fds[-1])]
            )  # fmt: skip
        row(shot.phase, shot.point, shot)
    return rows


def criteria(soak: Soak, a: Sample | None, b: Sample | None) -> list[Criterion]:
    settings = soak.settings
    base = _shot(soak, "baseline", "after warm-up")
    found: list[Criterion] = []
    if base is None:
        return [Criterion("baseline taken", False, "no baseline")]
    limit = base.rss_kib * (1 + RSS_TOLERANCE)
    for phase, sample in (("A", a), ("B", b)):
        if sample is None:
            continue
        if phase == "A":
            ok = (
                sample["held"] == settings.connections
                and sample["errors"] == 0
                and sample.get("check_failed") == 0
            )
            detail = (
                f"{sample['held']:,} of {settings.connections:,} held and echoed,"
                f" {sample['errors']} failed to open,"
                f" {sample.get('check_failed', '?')} failed to echo again"
            )
            if sample["errors"]:
                detail += f" (last: {sample['last_error']})"
            found.append(Criterion("A: every session relays", ok, detail))
        else:
            ok = sample["done"] == settings.sessions and sample["errors"] == 0
            detail = (
                f"{sample['done']:,} of {settings.sessions:,} done,"
                f" {sample['errors']} errors"
            )
            if sample["errors"]:
                detail += f" (last: {sample['last_error']})"
            if sample["timed_out"]:
                detail += ", out of time"
            found.append(Criterion("B: every session relays", ok, detail))
        after = _shot(soak, phase, "after close")
        if after is None:
            continue
        found.append(
            Criterion(
                f"{phase}: fds back to baseline",
                after.fds <= base.fds,
                f"{after.fds} after, {base.fds} baseline",
            )
        )
        found.append(
            Criterion(
                f"{phase}: RSS within {100 * RSS_TOLERANCE:.0f}% of baseline",
                after.rss_kib <= limit,
                f"{_mib(after.rss_kib)} MiB after, {_mib(base.rss_kib)} MiB"
                f" baseline ({100 * (after.rss_kib / base.rss_kib - 1):+.1f}%)",
            )
        )
    problems = log_problems(soak.peer.log)
    found.append(
        Criterion(
            "server log: no unhandled errors",
            problems == 0,
            f"{problems} traceback/unhandled lines in {soak.peer.log.name}",
        )
    )
    return found


# -- main -------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--connections",
        type=int,
        help="phase A: sessions held (default 8000; 0: no phase A)",
    )
    parser.add_argument(
        "--sessions",
        type=int,
        help="phase B: sequential sessions (default 200000; 0: no phase B)",
    )
    parser.add_argument(
        "--concurrency", type=int, default=32, help="phase B: sessions in flight"
    )
    parser.add_argument(
        "--open-concurrency",
        type=int,
        default=100,
        help="phase A: sessions opening at a time",
    )
    parser.add_argument("--warmup", type=int, help="warm-up sessions (default 1000)")
    parser.add_argument("--hold", type=float, help="phase A: seconds held (default 10)")
    parser.add_argument(
        "--settle",
        type=float,
        default=2.0,
        help="seconds waited after the server released its descriptors",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small numbers: a smoke run"
    )
    parser.add_argument(
        "--allocator",
        choices=("pymalloc", "jemalloc"),
        default="pymalloc",
        help="the server's memory allocator: Python's default, or jemalloc"
        " (LD_PRELOAD, PYTHONMALLOC=malloc; Debian: libjemalloc2)",
    )
    parser.add_argument("--json", type=Path, help="write all figures here")
    args = parser.parse_args(argv)
    for name, low, high in (
        ("connections", 0, 9000),  # the server holds two descriptors a session
        ("sessions", 0, 10_000_000),
        ("concurrency", 1, 1000),
        ("open_concurrency", 1, 1000),
        ("warmup", 1, 100_000),
        ("hold", 0, 3600),
        ("settle", 0, 60),
    ):
        check_range(parser, args, name, low, high)
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    pick = picker(args)
    return Settings(
        connections=pick(args.connections, 8000, 500),
        sessions=pick(args.sessions, 200_000, 5_000),
        concurrency=args.concurrency,
        open_concurrency=args.open_concurrency,
        warmup=pick(args.warmup, 1000, 200),
        hold=pick(args.hold, 10.0, 2.0),
        settle=args.settle,
        allocator=args.allocator,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = settings_from(args)
    nofile = raise_nofile()
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    needed = 2 * settings.connections + 100
    if nofile[0] < needed:
        raise SystemExit(
            f"open-file limit {nofile[0]}: the server needs {needed} descriptors"
            f" for {settings.connections} sessions (try fewer --connections)"
        )
    why = probe_twistd_plugin("socks4")()
    if why:
        raise SystemExit(f"socks4tx is not available: {why}")
    options, missing = server_options()
    print(
        f"socks4tx soak: {settings.connections:,} held, {settings.sessions:,}"
        f" sequential ({settings.concurrency} in flight), warm-up"
        f" {settings.warmup:,}; allocator {settings.allocator};"
        f" {os.cpu_count()} CPUs; load average"
        f" {os.getloadavg()[0]:.2f}; open files {nofile[0]}/{nofile[1]}"
    )
    print(f"server options: {' '.join(options) or '(none)'}")
    if missing:
        print(f"  (the server has no {', '.join(missing)}: run without)")

    workdir = Path(tempfile.mkdtemp(prefix="socks4tx-soak-"))
    started = time.monotonic()
    a: Sample | None = None
    b: Sample | None = None
    warm: Sample | None = None
    error = ""
    try:
        soak = Soak(settings, options, workdir)
    except BenchError as e:
        message = f"the server did not start: {e}\n(log kept in {workdir})"
        raise SystemExit(message) from None
    try:
        print(
            f"server pid {soak.pid} on {LOOPBACK}:{soak.proxy[1]}; echo on port"
            f" {soak.echo[1]}"
        )
        warm = soak.warm_up()
        base = soak.snapshots[-1]
        print(f"  baseline: RSS {_mib(base.rss_kib)} MiB, {base.fds} fds")
        if settings.connections:
            a = soak.phase_a(base)
        if settings.sessions:
            b = soak.phase_b(base)
    except BenchError as e:
        error = str(e)
        print(f"\nFAILED: {error}", file=sys.stderr)
    except KeyboardInterrupt:
        soak.close()
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    except BaseException:
        soak.close()
        print(f"server log kept in {workdir}", file=sys.stderr)
        raise
    finally:
        elapsed = time.monotonic() - started
    rows = figures_table(soak, a, b)
    verdicts = criteria(soak, a, b)
    soak.close()
    if error:
        verdicts.append(Criterion("ran to the end", False, error.splitlines()[0]))

    print(f"\nThe server (pid {soak.pid}), {elapsed:.0f} s in all:")
    print_table(rows)
    if a is not None:
        print(
            f"\nA: {a['held']:,} opened in {a['open_seconds']:.1f} s"
            f" ({a['held'] / max(a['open_seconds'], 1e-9):,.0f}/s);"
            f" {a['kib_per_session']:.1f} KiB RSS per held session;"
            f" closed in {a['close_seconds']:.1f} s, released in"
            f" {a['release_seconds']:.1f} s"
        )
    if b is not None:
        slope = growth_per_10k(soak.series)
        trend = "-" if slope is None else f"{slope:+.1f} KiB per 10,000 sessions"
        print(
            f"B: {b['done']:,} sessions in {b['seconds']:.1f} s ({b['rate']:,.0f}/s);"
            f" p50 {b['p50_ms']:.1f} ms, p99 {b['p99_ms']:.1f} ms,"
            f" max {b['max_ms']:.0f} ms; server CPU {b['proxy_cpu']:.1f} s"
            f" ({1e6 * b['proxy_cpu'] / max(1, b['done']):.0f} us/session);"
            f" RSS trend over its second half {trend}"
        )
    print(
        "(baseline: after start-up and a warm-up of"
        f" {settings.warmup:,} sessions, so one-time allocations do not count)"
    )
    print()
    print_table(
        [["criterion", "result", "detail"]]
        + [[c.name, "PASS" if c.ok else "FAIL", c.detail] for c in verdicts]
    )
    failed = not all(c.ok for c in verdicts)
    print(
        f"\n{'FAIL' if failed else 'PASS'}; load average now {os.getloadavg()[0]:.2f}"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "meta": {
                        "argv": sys.argv,
                        "settings": asdict(settings),
                        "server_options": options,
                        "missing_options": missing,
                        "open_files": nofile,
                        "cpus": os.cpu_count(),
                        "platform": platform.platform(),
                        "python": sys.version,
                        "elapsed_s": elapsed,
                        "loadavg_end": os.getloadavg(),
                    },
                    "warmup": warm,
                    "phase_a": a,
                    "phase_b": b,
                    "snapshots": [asdict(s) for s in soak.snapshots],
                    "phase_b_series": [asdict(s) for s in soak.series],
                    "criteria": [asdict(c) for c in verdicts],
                    "passed": not failed,
                },
                indent=1,
            )
        )
        print(f"figures: {args.json}")
    if failed:
        print(f"server log kept in {workdir}")
        return 1
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit("interrupted; everything started was stopped")
