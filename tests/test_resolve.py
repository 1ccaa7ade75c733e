"""SOCKS4A name resolution: IPv4 only, with a timeout, cancellable."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fakes import FakeResolver, a_records
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.names import dns
from twisted.names.client import createResolver
from twisted.names.error import DNSNameError, DNSServerError
from twisted.python.failure import Failure

from socks4tx.resolve import ResolveError, resolve_ipv4


class Resolving:
    def __init__(self, name: str, timeout: float = 10.0) -> None:
        self.clock = Clock()
        self.resolver = FakeResolver()
        self.results: list[Any] = []
        self.deferred = defer.Deferred.fromCoroutine(
            resolve_ipv4(self.resolver, self.clock, name, timeout)
        )
        self.deferred.addBoth(self.results.append)

    @property
    def result(self) -> Any:
        [result] = self.results
        return result

    def error(self) -> BaseException:
        result = self.result
        assert isinstance(result, Failure), result
        assert result.value is not None
        return result.value


@pytest.mark.parametrize("literal", ["127.0.0.1", "198.51.100.7", "0.0.0.0"])
def test_ipv4_literal_is_its_own_answer(literal: str) -> None:
    resolving = Resolving(literal)
    assert resolving.result == [literal]
    assert resolving.resolver.lookups == []


def test_ipv6_literal_is_looked_up_not_answered() -> None:
    resolving = Resolving("::1")
    assert resolving.results == []
    assert [name for name, _, _ in resolving.resolver.lookups] == ["::1"]


def test_a_records_in_order() -> None:
    resolving = Resolving("example.com", timeout=4.0)
    [(name, timeout, _)] = resolving.resolver.lookups
    assert (name, timeout) == ("example.com", (4.0,))
    resolving.resolver.answer("203.0.113.2", "2001:db8::2", "203.0.113.1")
    assert resolving.result == ["203.0.113.2", "203.0.113.1"]
    assert resolving.clock.getDelayedCalls() == []


def test_only_a_records_count() -> None:
    resolving = Resolving("alias.example")
    answers, _, _ = a_records("alias.example", "203.0.113.3")
    cname = dns.RRHeader(
        b"alias.example", dns.CNAME, dns.IN, 60, dns.Record_CNAME(b"real.example")
    )
    resolving.resolver.lookups[0][2].callback(([cname, *answers], [], []))
    assert resolving.result == ["203.0.113.3"]


@pytest.mark.parametrize("addresses", [(), ("2001:db8::1",)])
def test_no_ipv4_address(addresses: tuple[str, ...]) -> None:
    resolving = Resolving("v6.example")
    resolving.resolver.answer(*addresses)
    error = resolving.error()
    assert isinstance(error, ResolveError)
    assert "v6.example" in str(error)


@pytest.mark.parametrize("error", [DNSNameError(), DNSServerError(), OSError()])
def test_lookup_failure(error: Exception) -> None:
    resolving = Resolving("nx.example")
    resolving.resolver.lookups[0][2].errback(error)
    assert isinstance(resolving.error(), ResolveError)
    assert resolving.clock.getDelayedCalls() == []


def test_timeout() -> None:
    resolving = Resolving("slow.example", timeout=3.0)
    resolving.clock.advance(2.99)
    assert resolving.results == []
    resolving.clock.advance(0.01)
    assert isinstance(resolving.error(), ResolveError)
    lookup = resolving.resolver.lookups[0][2]
    assert lookup.called  # cancelled
    assert resolving.clock.getDelayedCalls() == []


def test_cancel_cancels_the_lookup() -> None:
    resolving = Resolving("slow.example")
    resolving.deferred.cancel()
    assert isinstance(resolving.error(), defer.CancelledError)
    lookup = resolving.resolver.lookups[0][2]
    assert lookup.called
    assert resolving.clock.getDelayedCalls() == []


def test_a_final_dot_is_dropped_before_the_lookup() -> None:
    resolving = Resolving("localhost.")
    assert [name for name, _, _ in resolving.resolver.lookups] == ["localhost"]
    resolving.resolver.answer("127.0.0.1")
    assert resolving.result == ["127.0.0.1"]


@pytest.mark.parametrize("name", [".", "a..b", "x" * 64 + ".example", ".example"])
def test_names_dns_cannot_encode_are_resolve_errors(name: str, tmp_path: Path) -> None:
    """Twisted's resolver raises on them at once; that is a ResolveError."""
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    clock = Clock()
    # A DNS server that is never asked: the name fails before any query.
    resolver = createResolver(servers=[("127.0.0.1", 9)], hosts=str(hosts))
    results: list[Any] = []
    defer.Deferred.fromCoroutine(resolve_ipv4(resolver, clock, name, 5.0)).addBoth(
        results.append
    )
    [result] = results
    assert isinstance(result, Failure) and result.check(ResolveError), result
    assert clock.getDelayedCalls() == []
