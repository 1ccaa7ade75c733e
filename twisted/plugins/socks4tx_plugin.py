"""The twistd plugin: C{twistd socks4}."""

from twisted.application.service import ServiceMaker

socks4 = ServiceMaker(
    "socks4tx",
    "socks4tx.tap",
    "A SOCKS4/SOCKS4A proxy server (CONNECT and BIND)",
    "socks4",
)
