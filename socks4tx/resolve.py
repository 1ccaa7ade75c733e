"""
SOCKS4A name resolution: IPv4 addresses only, never blocking, with a timeout.

The default resolver is L{twisted.names.client.createResolver} (the hosts
file, then the DNS servers of resolv.conf), which needs no threads and can
be cancelled.  The system resolver (C{getaddrinfo}) would run in the
reactor's thread pool, where many slow names fill the pool and can't be
cancelled when their clients leave.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import cast

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime, IResolver
from twisted.names import dns


class ResolveError(Exception):
    """The name has no IPv4 address, or the lookup failed or timed out."""


def _ipv4_answers(answers: Sequence[dns.RRHeader]) -> list[str]:
    addresses = []
    for answer in answers:
        record: object = answer.payload
        if isinstance(record, dns.Record_A):
            addresses.append(record.dottedQuad())
    return addresses


async def resolve_ipv4(
    resolver: IResolver, clock: IReactorTime, name: str, timeout: float
) -> list[str]:
    """
    All IPv4 addresses of C{name}, in the resolver's order.

    An IPv4 literal is its own answer, and a fully qualified name (one final
    dot) is looked up without the dot, as the hosts file spells it.  Raises
    L{ResolveError}; cancelling the caller cancels the lookup.
    """
    try:
        return [str(ipaddress.IPv4Address(name))]
    except ValueError:
        pass
    if name.endswith(".") and len(name) > 1:
        name = name[:-1]
    try:
        # The resolver's own retries are bounded by our timeout, not the
        # reverse.
        lookup = resolver.lookupAddress(name, timeout=(max(1, round(timeout)),))
    except Exception as error:
        # A name DNS can't encode ("a..b", a label over 63 bytes) fails
        # here, before any lookup: the client's mistake, not ours.
        raise ResolveError(f"{name}: {error.__class__.__name__}") from error
    lookup.addTimeout(timeout, clock)
    try:
        answers, _authority, _additional = cast(
            tuple[Sequence[dns.RRHeader], ...], await lookup
        )
    except defer.CancelledError:
        raise
    except Exception as error:
        raise ResolveError(f"{name}: {error.__class__.__name__}") from error
    addresses = _ipv4_answers(answers)
    if not addresses:
        raise ResolveError(f"{name}: no IPv4 address")
    return addresses
