"""
The client endpoint string plugin: C{socks4:HOST:PORT:proxy=...} for
C{clientFromString} (see L{socks4tx.client.SOCKS4ClientParser}).
"""

from socks4tx.client import SOCKS4ClientParser

socks4 = SOCKS4ClientParser()
