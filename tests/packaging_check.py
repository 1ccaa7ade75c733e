"""
Run inside a private network namespace by test_packaging: start the
installed ``twistd -n socks4`` with no options and relay one CONNECT
through 127.0.0.1:1080 to an echo server.  Exits 0 on success.

Usage: python packaging_check.py TWISTD
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time


def echo_server() -> int:
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        connection, _ = listener.accept()
        with connection:
            while data := connection.recv(65536):
                connection.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    port: int = listener.getsockname()[1]
    return port


def main(twistd: str) -> int:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    echo_port = echo_server()
    with tempfile.TemporaryDirectory() as workdir:
        server = subprocess.Popen(
            [twistd, "-n", "--pidfile=", "socks4"],
            cwd=workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            assert server.stdout is not None
            deadline = time.monotonic() + 30
            output = []
            for line in server.stdout:
                output.append(line)
                if "listening on 127.0.0.1:1080" in line:
                    break
                if time.monotonic() > deadline:
                    break
            else:
                print("".join(output), file=sys.stderr)
                return 1
            with socket.create_connection(("127.0.0.1", 1080), timeout=10) as client:
                request = (
                    b"\x04\x01" + echo_port.to_bytes(2, "big") + bytes([127, 0, 0, 1])
                )
                client.sendall(request + b"\0" + b"hello")
                reply = client.recv(8, socket.MSG_WAITALL)
                echoed = client.recv(5, socket.MSG_WAITALL)
            print(f"reply={reply.hex()} echoed={echoed!r}")
            return 0 if reply[:2] == b"\x00\x5a" and echoed == b"hello" else 1
        finally:
            server.terminate()
            server.wait(10)


if __name__ == "__main__":
    os.environ.pop("PYTHONPATH", None)
    sys.exit(main(sys.argv[1]))
