"""
Behind a real HAProxy: two C{twistd socks4 --listen haproxy:tcp:...}
backends, balanced round-robin by Debian's haproxy in TCP mode with
C{send-proxy-v2}, and health checks that send a LOCAL header.

HAProxy connects to the backends from 127.0.0.3 (C{source}), clients
connect from 127.0.0.1 and 127.0.0.2: whatever the backends log or decide
about a client must name the client, never 127.0.0.3.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from blackbox import (
    CONNECT,
    GRANTED,
    IO_TIMEOUT,
    LOOPBACK,
    REJECTED,
    ThreadedServer,
    TwistdProcess,
    assert_closed,
    echo_handler,
    free_port,
    read_reply,
    recv_exact,
    recv_until_eof,
    request_bytes,
    stop_process,
    wait_accepting,
)
from tools import missing

#: Where HAProxy connects to the backends from (its own address).
BALANCER_SOURCE = "127.0.0.3"
#: A client the rules deny.
DENIED_CLIENT = "127.0.0.2"
RULES = f"""\
# the test's client on {DENIED_CLIENT} is denied, the rest of loopback served
deny {DENIED_CLIENT} 255.255.255.255
permit 127.0.0.0 255.0.0.0
"""
HAPROXY_STARTUP = 20.0
T = TypeVar("T")


def find_haproxy() -> str:
    """Debian's haproxy (in /usr/sbin, off a normal user's PATH)."""
    path = os.environ.get("PATH", "")
    found = shutil.which("haproxy", path=f"{path}:/usr/sbin:/usr/local/sbin")
    if found is None:
        missing("haproxy is not installed (Debian package haproxy)")
    return found


def haproxy_config(frontend_port: int, backends: list[tuple[str, int]]) -> str:
    servers = "\n".join(
        f"    server s{index} {host}:{port} send-proxy-v2"
        " check inter 200ms check-send-proxy"
        for index, (host, port) in enumerate(backends)
    )
    return f"""\
global
    maxconn 64

defaults
    mode tcp
    timeout connect 2s
    timeout client 10s
    timeout server 10s
    timeout check 1s

frontend socks
    bind {LOOPBACK}:{frontend_port}
    default_backend socks4tx

backend socks4tx
    balance roundrobin
    source {BALANCER_SOURCE}
{servers}
"""


class HAProxy:
    """C{haproxy -f CONFIG -db} (foreground, no daemon), stopped at the end."""

    def __init__(self, binary: str, config: str, workdir: Path, port: int) -> None:
        self.config_path = workdir / "haproxy.cfg"
        self.config_path.write_text(config)
        self.output_path = workdir / "haproxy.out"
        self.address = (LOOPBACK, port)
        with open(self.output_path, "wb") as out:
            self.process = subprocess.Popen(
                [binary, "-f", str(self.config_path), "-db"],
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            self._wait_until_accepting()
        except BaseException:
            self.stop()
            raise

    def output(self) -> str:
        return self.output_path.read_text(errors="replace")

    def _wait_until_accepting(self) -> None:
        if wait_accepting(self.process, self.address, HAPROXY_STARTUP):
            return
        if self.process.poll() is not None:
            raise AssertionError(
                f"haproxy exited with {self.process.returncode}:\n{self.output()}"
            )
        raise AssertionError(f"haproxy not accepting after {HAPROXY_STARTUP} s")

    def stop(self) -> None:
        stop_process(self.process, IO_TIMEOUT)


def start_backend(workdir: Path, rules: Path) -> TwistdProcess:
    """One socks4tx behind the balancer, logging JSON lines."""
    workdir.mkdir()
    return TwistdProcess(
        [
            "socks4",
            "--listen",
            f"haproxy:tcp:0:interface={LOOPBACK}",
            "--rules",
            str(rules),
        ],
        workdir,
        json_log=True,
    )


@dataclass
class Farm:
    balancer: HAProxy
    backends: list[TwistdProcess]
    echo: ThreadedServer

    def sessions(self) -> list[tuple[int, dict[str, Any]]]:
        """Every session event so far, with the index of its backend."""
        return [
            (index, event)
            for index, backend in enumerate(self.backends)
            for event in backend.session_events()
        ]

    def proxy_events(self) -> list[dict[str, Any]]:
        return [
            event
            for backend in self.backends
            for event in backend.log_events(namespace="socks4tx.proxy")
        ]

    def wait_for_session(self, client_port: int) -> tuple[int, dict[str, Any]]:
        """The session event of the client on C{client_port}, and its backend."""

        def found() -> tuple[int, dict[str, Any]] | None:
            for index, event in self.sessions():
                if event.get("client_port") == client_port:
                    return index, event
            return None

        result = wait_for(found, f"the session of client port {client_port}")
        assert result is not None
        return result


def wait_for(
    probe: Callable[[], T | None], what: str, timeout: float = IO_TIMEOUT
) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    binary = find_haproxy()
    workdir = tmp_path_factory.mktemp("haproxy")
    rules = workdir / "sockd.conf"
    rules.write_text(RULES)
    backends: list[TwistdProcess] = []
    balancer = None
    try:
        for name in ("a", "b"):
            backends.append(start_backend(workdir / name, rules))
        port = free_port()
        config = haproxy_config(port, [backend.address for backend in backends])
        balancer = HAProxy(binary, config, workdir, port)
        with ThreadedServer(echo_handler) as echo:
            farm = Farm(balancer, backends, echo)
            # Both backends are checked (LOCAL headers) before tests begin,
            # so both are in the round-robin.
            wait_for(
                lambda: all(b.log_events(namespace="socks4tx.proxy") for b in backends),
                "a health check (a LOCAL header) logged by each backend: is --listen"
                " haproxy: served by socks4tx.proxyheader?",
            )
            yield farm
            for backend in backends:
                backend.assert_alive()
            assert balancer.process.poll() is None, balancer.output()
    finally:
        if balancer is not None:
            balancer.stop()
        for backend in backends:
            backend.stop()


def connect_through(farm: Farm, source: str = LOOPBACK) -> tuple[socket.socket, int]:
    """A client socket from C{source} connected to the balancer."""
    sock = socket.create_connection(
        farm.balancer.address, timeout=IO_TIMEOUT, source_address=(source, 0)
    )
    return sock, sock.getsockname()[1]


def echo_through(farm: Farm, source: str = LOOPBACK) -> tuple[int, int]:
    """One CONNECT to the echo server through the balancer: (reply, client port)."""
    sock, port = connect_through(farm, source)
    with sock:
        sock.sendall(request_bytes(CONNECT, farm.echo.port, LOOPBACK, b"alice"))
        reply = read_reply(sock)
        if reply.code == GRANTED:
            sock.sendall(b"ping")
            assert recv_exact(sock, 4) == b"ping"
    return reply.code, port


# -- the tests ------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_requests_reach_both_backends_as_the_client(farm: Farm) -> None:
    """
    Round-robin spreads CONNECTs over both backends; each backend logs the
    real client (address and port), never the balancer.
    """
    ports = []
    for _ in range(6):
        reply, port = echo_through(farm)
        assert reply == GRANTED
        ports.append(port)
    served_by = set()
    for port in ports:
        index, event = farm.wait_for_session(port)
        served_by.add(index)
        assert (event["client"], event["client_port"]) == (LOOPBACK, port)
        assert (event["reply"], event["reason"]) == (GRANTED, "relayed")
        assert (event["bytes_up"], event["bytes_down"]) == (4, 4)
    assert served_by == {0, 1}
    clients = {event["client"] for _, event in farm.sessions()}
    assert BALANCER_SOURCE not in clients


@pytest.mark.timeout(90)
def test_rules_see_the_client_address(farm: Farm) -> None:
    """
    C{deny 127.0.0.2}: a client bound to 127.0.0.2 gets 91, one on
    127.0.0.1 gets 90, whichever backend serves them.
    """
    for _ in range(2):  # once on each backend, round-robin permitting
        denied, denied_port = echo_through(farm, DENIED_CLIENT)
        assert denied == REJECTED
        served, _ = echo_through(farm, LOOPBACK)
        assert served == GRANTED
        _, event = farm.wait_for_session(denied_port)
        assert (event["client"], event["client_port"]) == (DENIED_CLIENT, denied_port)
        assert (event["reply"], event["reason"]) == (REJECTED, "rule")
        assert event["rule"].endswith(":2")


@pytest.mark.timeout(90)
def test_half_close_through_the_balancer(farm: Farm) -> None:
    """
    A client that sends its whole stream behind the request and shuts down
    its sending side gets every byte back, then EOF.
    """
    payload = bytes(range(256)) * 64
    sock, port = connect_through(farm)
    with sock:
        sock.sendall(
            request_bytes(CONNECT, farm.echo.port, LOOPBACK, b"alice") + payload
        )
        sock.shutdown(socket.SHUT_WR)
        assert read_reply(sock).code == GRANTED
        assert recv_until_eof(sock) == payload
    _, event = farm.wait_for_session(port)
    assert (event["bytes_up"], event["bytes_down"]) == (len(payload), len(payload))


@pytest.mark.timeout(90)
def test_health_checks_are_local_and_not_served(farm: Farm) -> None:
    """
    HAProxy's checks send a LOCAL header from the balancer's own (loopback)
    address: logged and closed, never a session of a loopback client.
    """
    local = [e for e in farm.proxy_events() if e["reason"] == "local"]
    assert local
    assert all(e["peer"].startswith(f"{BALANCER_SOURCE}:") for e in local)
    assert all(e["client"] != BALANCER_SOURCE for _, e in farm.sessions())


@pytest.mark.timeout(90)
def test_a_connection_without_a_header_is_dropped_and_logged(farm: Farm) -> None:
    """
    Straight to a backend, a SOCKS request is not a PROXY header: closed
    without a reply, and logged with the peer.
    """
    backend = farm.backends[0]
    sock = socket.create_connection(backend.address, timeout=IO_TIMEOUT)
    with sock:
        port = sock.getsockname()[1]
        sock.sendall(request_bytes(CONNECT, farm.echo.port, LOOPBACK, b"alice"))
        assert_closed(sock)
    peer = f"{LOOPBACK}:{port}"
    event = wait_for(
        lambda: next(
            (
                e
                for e in backend.log_events(namespace="socks4tx.proxy")
                if e.get("peer") == peer
            ),
            None,
        ),
        f"a socks4tx.proxy event for {peer}",
    )
    assert event["reason"] == "invalid"
    assert all(e["client_port"] != port for _, e in farm.sessions())


def test_example_config_is_valid() -> None:
    """examples/haproxy.cfg, as the README shows it, passes C{haproxy -c}."""
    example = Path(__file__).resolve().parents[1] / "examples" / "haproxy.cfg"
    result = subprocess.run(
        [find_haproxy(), "-c", "-f", str(example)],
        capture_output=True,
        text=True,
        timeout=IO_TIMEOUT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "send-proxy-v2" in example.read_text()


def v2_header(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A PROXY v2 header for TCP over IPv4, built by hand."""
    addresses = socket.inet_aton(source[0]) + socket.inet_aton(destination[0])
    ports = source[1].to_bytes(2, "big") + destination[1].to_bytes(2, "big")
    return b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c" + addresses + ports


@pytest.mark.timeout(90)
@pytest.mark.parametrize("version", [1, 2])
def test_header_in_single_bytes(farm: Farm, version: int) -> None:
    """
    Straight to a backend, a header that arrives one byte a segment (which
    Twisted's own wrapper drops) is read; and the address it claims is
    believed: hence "only the balancer may reach the PROXY port".
    """
    backend = farm.backends[1]
    # A port below the ephemeral range: no real client of the tests has it.
    claimed = (DENIED_CLIENT, 1000 + version)
    if version == 1:
        header = f"PROXY TCP4 {claimed[0]} 127.0.0.1 {claimed[1]} 1080\r\n".encode()
    else:
        header = v2_header(claimed, (LOOPBACK, 1080))
    sock = socket.create_connection(backend.address, timeout=IO_TIMEOUT)
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for index in range(len(header)):
            sock.sendall(header[index : index + 1])
            time.sleep(0.002)
        sock.sendall(request_bytes(CONNECT, farm.echo.port, LOOPBACK, b"alice"))
        assert read_reply(sock).code == REJECTED
    event = backend.wait_for_session(claimed[1])
    assert (event["client"], event["reason"]) == (DENIED_CLIENT, "rule")


@pytest.mark.timeout(90)
def test_bulk_behind_the_balancer_is_spliced(farm: Farm) -> None:
    """
    The PROXY wrapper holds no bytes of its own: once a session moves bulk
    data the zero-copy relay takes over the socket under it, and every
    byte arrives.
    """
    size = 4 << 20
    payload = os.urandom(size)
    sock, port = connect_through(farm)
    with sock:
        sock.sendall(request_bytes(CONNECT, farm.echo.port, LOOPBACK))
        assert read_reply(sock).code == GRANTED
        with ThreadPoolExecutor(1) as pool:
            sending = pool.submit(sock.sendall, payload)
            assert recv_exact(sock, size, timeout=60) == payload
            sending.result(60)
    _, event = farm.wait_for_session(port)
    assert (event["client"], event["client_port"]) == (LOOPBACK, port)
    assert (event["bytes_up"], event["bytes_down"]) == (size, size)
    assert event["relay"] == "splice"
