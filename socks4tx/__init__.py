"""socks4tx: a SOCKS4/SOCKS4A proxy server built on Twisted."""

__version__ = "0.1.0"

__all__ = ["__version__"]
