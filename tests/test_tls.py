"""
SOCKS4 over TLS: C{--listen ssl:PORT:privateKey=KEY:certKey=CERT}, spoken to
by Python's C{ssl} module with a certificate the test generates.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import socket
import ssl
from pathlib import Path

import pytest
from blackbox import (
    CONNECT,
    GRANTED,
    LOOPBACK,
    ThreadedServer,
    TwistdProcess,
    read_reply,
    recv_exact,
    recv_sha256,
    request_bytes,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1, and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address(LOOPBACK)),
                ]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


class TLSServer:
    """A server with a plain listener (the fixture's) and a TLS one (last)."""

    def __init__(self, server: TwistdProcess, cert: Path) -> None:
        self.server, self.cert = server, cert
        self.address = server.listeners[-1]


@pytest.fixture
def tls_server(start_server, tmp_path: Path) -> TLSServer:
    key, cert = make_certificate(tmp_path)
    server = start_server(
        "--listen",
        f"ssl:0:interface={LOOPBACK}:privateKey={key}:certKey={cert}",
        json_log=True,
    )
    return TLSServer(server, cert)


def tls_connect(address: tuple[str, int], cert: Path) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(cert))
    raw = socket.create_connection(address, timeout=10)
    return context.wrap_socket(raw, server_hostname="localhost")


def test_connect_and_relay_over_tls(tls_server: TLSServer) -> None:
    """A full CONNECT and 4 MiB each way through a TLS listener."""
    server, cert = tls_server.server, tls_server.cert
    size = 4 * MiB
    up, down = os.urandom(size), os.urandom(size)

    def destination(conn: socket.socket) -> str:
        conn.settimeout(30)
        digest = recv_sha256(conn, size)
        conn.sendall(down)
        return digest

    with (
        ThreadedServer(destination) as dest,
        tls_connect(tls_server.address, cert) as sock,
    ):
        assert sock.version() is not None  # the handshake completed
        client_port = sock.getsockname()[1]
        sock.sendall(request_bytes(CONNECT, dest.port, LOOPBACK, b"alice"))
        reply = read_reply(sock)
        assert reply.code == GRANTED
        sock.sendall(up)
        assert recv_sha256(sock, size) == hashlib.sha256(down).hexdigest()
        assert dest.wait_results(timeout=30) == [hashlib.sha256(up).hexdigest()]
    event = server.wait_for_session(client_port)
    assert (event["reply"], event["userid"]) == (GRANTED, "alice")
    assert (event["bytes_up"], event["bytes_down"]) == (size, size)
    # TLS is not a plain socket: the portable relay serves it.
    assert event["relay"] == "portable"


def test_plain_socks_on_a_tls_port_gets_nothing(
    tls_server: TLSServer, echo: ThreadedServer
) -> None:
    with socket.create_connection(tls_server.address, timeout=10) as sock:
        sock.sendall(request_bytes(CONNECT, echo.port, LOOPBACK))
        sock.settimeout(10)
        data = b""
        try:
            while chunk := sock.recv(4096):
                data += chunk
        except (ConnectionResetError, TimeoutError):
            pass
        assert data[:2] != b"\x00\x5a"  # never a grant
    tls_server.server.assert_alive()


def test_tls_client_sees_the_relayed_stream(
    tls_server: TLSServer, echo: ThreadedServer
) -> None:
    with tls_connect(tls_server.address, tls_server.cert) as sock:
        sock.sendall(request_bytes(CONNECT, echo.port, LOOPBACK) + b"behind")
        assert read_reply(sock).code == GRANTED
        assert recv_exact(sock, 6) == b"behind"
