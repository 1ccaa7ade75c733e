"""
The server's ident step and rule commands, at the protocol level: a fake
RFC 1413 lookup and a fake command runner stand in for the network and
for processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fakes import REJECTED, Proxy, ScriptedPolicy, connect_request, reply_bytes
from twisted.internet import defer

from socks4tx import server
from socks4tx.ident import IdentLookupFailed
from socks4tx.identwire import IdentUser
from socks4tx.rules import Decision
from socks4tx.wire import ReplyCode


class FakeLookup:
    """Records each ident lookup and lets the test answer it."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self.pending: list[defer.Deferred[IdentUser]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> defer.Deferred[IdentUser]:
        self.calls.append((args[1:], kwargs))
        lookup: defer.Deferred[IdentUser] = defer.Deferred()
        self.pending.append(lookup)
        return lookup

    def answer(self, userid: bytes) -> None:
        self.pending[-1].callback(IdentUser(50123, 1080, "UNIX", None, userid))

    def fail(self, outcome: str) -> None:
        self.pending[-1].errback(IdentLookupFailed(outcome, "scripted"))


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    with Proxy() as proxy:
        yield proxy


@pytest.fixture
def commands(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    started: list[tuple[str, dict[str, Any]]] = []

    def run(
        reactor: Any, template: str, values: dict[str, str], timeout: float
    ) -> None:
        started.append((template, values))

    monkeypatch.setattr(server, "run_rule_command", run)
    return started


def start(
    proxy: Proxy,
    decision: Decision,
    userid: bytes = b"alice",
    **settings: Any,
) -> FakeLookup:
    proxy.start(policy=ScriptedPolicy(decision), **settings)
    lookup = FakeLookup()
    proxy.factory.ident_lookup = lookup  # type: ignore[assignment]
    proxy.send(connect_request(userid=userid))
    return lookup


def granted(proxy: Proxy) -> None:
    proxy.connection_succeeds()
    proxy.client.deliver_close()


def test_required_and_confirmed(proxy: Proxy) -> None:
    lookup = start(proxy, Decision(True, "f:1", ident="required"), ident_port=1113)
    assert proxy.reactor.tcpClients == []  # nothing connects before identd says
    [(args, kwargs)] = lookup.calls
    # The client's address and port, the port it reached, the local address
    # it reached (the lookup's source).
    assert args == ("127.0.0.1", 50123, 1080, "127.0.0.1")
    assert kwargs == {"identd_port": 1113, "timeout": 15.0}
    lookup.answer(b"alice")
    granted(proxy)
    event = proxy.session()
    assert (event["reply"], event["reason"], event["ident"]) == (90, "relayed", "alice")


@pytest.mark.parametrize("outcome", ["refused", "timeout", "closed", "ERROR:NO-USER"])
def test_required_and_lookup_failed(proxy: Proxy, outcome: str) -> None:
    lookup = start(proxy, Decision(True, "f:1", ident="required"))
    lookup.fail(outcome)
    event = proxy.assert_ended(
        reply_bytes(ReplyCode.IDENTD_UNREACHABLE), 92, "ident-failed"
    )
    assert event["ident"] == outcome
    assert proxy.reactor.tcpClients == []


def test_optional_and_lookup_failed_goes_on(proxy: Proxy) -> None:
    lookup = start(proxy, Decision(True, "f:1", ident="optional"))
    lookup.fail("refused")
    granted(proxy)
    event = proxy.session()
    assert (event["reply"], event["ident"]) == (90, "refused")


@pytest.mark.parametrize("mode", ["required", "optional"])
def test_another_user_is_93_in_both_modes(proxy: Proxy, mode: str) -> None:
    lookup = start(proxy, Decision(True, "f:1", ident=mode))
    lookup.answer(b"mallory")
    event = proxy.assert_ended(
        reply_bytes(ReplyCode.IDENT_MISMATCH), 93, "ident-mismatch"
    )
    assert event["ident"] == "mallory"


def test_empty_userid_matches_no_user(proxy: Proxy) -> None:
    lookup = start(proxy, Decision(True, "f:1", ident="optional"), userid=b"")
    lookup.answer(b"alice")
    proxy.assert_ended(reply_bytes(ReplyCode.IDENT_MISMATCH), 93, "ident-mismatch")


def test_server_default_applies_without_a_rule_mode(proxy: Proxy) -> None:
    lookup = start(proxy, Decision(True, "f:1"), ident="required")
    lookup.fail("timeout")
    proxy.assert_ended(reply_bytes(ReplyCode.IDENTD_UNREACHABLE), 92, "ident-failed")


def test_rule_mode_overrides_server_default(proxy: Proxy) -> None:
    lookup = start(proxy, Decision(True, "f:1", ident="off"), ident="required")
    assert lookup.calls == []
    granted(proxy)
    assert proxy.session()["ident"] is None


def test_default_is_off(proxy: Proxy) -> None:
    lookup = start(proxy, Decision(True, "f:1"))
    assert lookup.calls == []
    granted(proxy)


def test_denied_requests_never_ask_identd(proxy: Proxy) -> None:
    lookup = start(proxy, Decision(False, "f:3", ident="required"))
    assert lookup.calls == []
    proxy.assert_ended(REJECTED, 91, "rule")


def test_client_leaving_cancels_the_lookup(proxy: Proxy) -> None:
    lookup = start(proxy, Decision(True, "f:1", ident="required"))
    proxy.client_leaves()
    assert lookup.pending[0].called  # cancelled
    proxy.assert_ended(b"", None, "client-gone")


# -- rule commands -------------------------------------------------------------


def test_commands_need_the_option(
    proxy: Proxy, commands: list[tuple[str, dict[str, Any]]]
) -> None:
    start(proxy, Decision(True, "f:1", command="echo %u"))
    granted(proxy)
    assert commands == []


def test_rule_command_with_the_session_values(
    proxy: Proxy, commands: list[tuple[str, dict[str, Any]]]
) -> None:
    lookup = start(
        proxy,
        Decision(True, "f:1", ident="required", command="log %u %U %z"),
        run_rule_commands=True,
    )
    assert commands == []  # not before identd has answered (%U)
    lookup.answer(b"alice")
    [(template, values)] = commands
    assert template == "log %u %U %z"
    assert values["u"] == values["U"] == b"alice"
    assert (values["a"], values["c"], values["s"], values["S"]) == (
        "127.0.0.1",
        "connect",
        80,
        "http",
    )
    assert values["z"] == values["Z"] == "198.51.100.5"
    granted(proxy)


def test_deny_rule_command_runs(
    proxy: Proxy, commands: list[tuple[str, dict[str, Any]]]
) -> None:
    start(proxy, Decision(False, "f:9", command="alert %a"), run_rule_commands=True)
    assert [template for template, _ in commands] == ["alert %a"]
    proxy.assert_ended(REJECTED, 91, "rule")


def test_no_identd_command(
    proxy: Proxy, commands: list[tuple[str, dict[str, Any]]]
) -> None:
    lookup = start(
        proxy, Decision(True, "f:1", ident="required"), run_rule_commands=True
    )
    lookup.fail("refused")
    assert [template for template, _ in commands] == ["no-identd %a"]
    proxy.assert_ended(reply_bytes(ReplyCode.IDENTD_UNREACHABLE), 92, "ident-failed")


def test_bad_id_command(
    proxy: Proxy, commands: list[tuple[str, dict[str, Any]]]
) -> None:
    lookup = start(
        proxy, Decision(True, "f:1", ident="optional"), run_rule_commands=True
    )
    lookup.answer(b"mallory")
    [(template, values)] = commands
    assert template == "bad-id %U %u"
    assert (values["U"], values["u"]) == (b"mallory", b"alice")
    proxy.assert_ended(reply_bytes(ReplyCode.IDENT_MISMATCH), 93, "ident-mismatch")
