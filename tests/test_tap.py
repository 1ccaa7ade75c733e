"""C{twistd socks4}: its options and the service they describe."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from fakes import FakeReactor
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.testing import MemoryReactor, RaisingMemoryReactor
from twisted.logger import capturedLogs, formatEvent
from twisted.python import usage

from socks4tx import __version__
from socks4tx.reload import RulesReloader
from socks4tx.server import Settings, SOCKS4Factory
from socks4tx.tap import DEFAULT_LISTEN, ListenerService, Options, makeService


def parsed(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


def test_defaults() -> None:
    """The defaults named in the issue ("twistd socks4 options")."""
    options = parsed()
    assert options["listen"] == ["tcp:1080:interface=127.0.0.1"] == [DEFAULT_LISTEN]
    assert options["handshake-timeout"] == 30
    assert options["resolve-timeout"] == 10
    assert options["connect-timeout"] == 120
    assert options["bind-timeout"] == 120
    assert options["idle-timeout"] == 0
    assert options["max-userid"] == 255
    assert options["max-hostname"] == 255
    assert options["bind-address"] is None
    assert options["outgoing-address"] is None
    assert not options["no-keepalive"]
    settings = options.settings()
    assert settings == Settings(
        handshake_timeout=30.0,
        resolve_timeout=10.0,
        connect_timeout=120.0,
        bind_timeout=120.0,
        idle_timeout=0.0,
        max_userid=255,
        max_hostname=255,
        bind_address=None,
        outgoing_address=None,
        keepalive=True,
    )


def test_every_option() -> None:
    options = parsed(
        "--handshake-timeout", "1.5",
        "--resolve-timeout", "2",
        "--connect-timeout", "3",
        "--bind-timeout", "4",
        "--idle-timeout", "5",
        "--max-userid", "0",
        "--max-hostname", "65535",
        "--bind-address", "127.0.0.1",
        "--outgoing-address", "127.0.0.2",
        "--no-keepalive",
    )  # fmt: skip
    settings = options.settings()
    assert settings == Settings(
        handshake_timeout=1.5,
        resolve_timeout=2.0,
        connect_timeout=3.0,
        bind_timeout=4.0,
        idle_timeout=5.0,
        max_userid=0,
        max_hostname=65535,
        bind_address="127.0.0.1",
        outgoing_address="127.0.0.2",
        keepalive=False,
    )
    assert isinstance(settings.max_userid, int)
    assert isinstance(settings.handshake_timeout, float)


def test_listen_given_replaces_the_default() -> None:
    options = parsed("--listen", "tcp:1081", "--listen", "unix:/run/socks4.sock")
    assert options["listen"] == ["tcp:1081", "unix:/run/socks4.sock"]


def test_listen_once() -> None:
    assert parsed("--listen", "tcp6:1080")["listen"] == ["tcp6:1080"]


def test_options_do_not_share_state() -> None:
    parsed("--listen", "tcp:1")
    assert parsed()["listen"] == [DEFAULT_LISTEN]


@pytest.mark.parametrize(
    "args",
    [
        ("--handshake-timeout", "0"),
        ("--handshake-timeout", "-1"),
        ("--handshake-timeout", "soon"),
        ("--handshake-timeout", "nan"),
        ("--resolve-timeout", "0"),
        ("--connect-timeout", "-0.5"),
        ("--bind-timeout", ""),
        ("--idle-timeout", "-1"),
        ("--idle-timeout", "nan"),
        ("--max-userid", "-1"),
        ("--max-userid", "65536"),
        ("--max-userid", "1.5"),
        ("--max-hostname", "many"),
        ("--bind-address", "::1"),
        ("--bind-address", "localhost"),
        ("--outgoing-address", "256.0.0.1"),
        ("--handshake-timeout", "inf"),
        ("--shutdown-grace", "1e400"),
        ("--max-connections", "abc"),
        ("--workers", "two"),
        ("--no-such-option",),
        ("extra-argument",),
    ],
)
def test_bad_values(args: tuple[str, ...]) -> None:
    with pytest.raises(usage.UsageError) as error:
        parsed(*args)
    if len(args) == 2:  # a bad value: the message names its option
        assert str(error.value).startswith(f"{args[0]}: "), error.value


@pytest.mark.parametrize("option", ["--bind-address", "--outgoing-address"])
def test_addresses_must_be_this_hosts(option: str) -> None:
    with pytest.raises(usage.UsageError, match="not an address of this host"):
        parsed(option, "192.0.2.1")  # TEST-NET-1: nobody's


@pytest.mark.parametrize(
    ("description", "problem"),
    [
        ("bogus", "Unknown endpoint type"),
        ("TCP:1080", "Unknown endpoint type"),
        ("tcp:abc", "abc"),
        ("tcp:99999", "port 99999 is not from 0 to 65535"),
        ("haproxy:", "haproxy"),
        ("ssl:0:privateKey=/nonexistent/key.pem", "/nonexistent/key.pem"),
        ("systemd:domain=INET:index=0", "LISTEN_FDS"),
    ],
)
def test_bad_listeners_are_usage_errors(description: str, problem: str) -> None:
    """Found before twistd starts, not as a traceback once it does."""
    for option in ("--listen", "--metrics"):
        if option == "--metrics" and description.startswith("haproxy"):
            continue
        with pytest.raises(usage.UsageError) as error:
            parsed(option, description)
        message = str(error.value)
        assert message.startswith(f"{option} {description!r}: "), message
        assert problem in message, message


def test_idle_timeout_zero_is_off() -> None:
    assert parsed("--idle-timeout", "0").settings().idle_timeout == 0


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parsed("--version")
    assert exit_info.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_help_names_every_option() -> None:
    text = str(Options())
    for name in (
        "--listen", "--handshake-timeout", "--resolve-timeout", "--connect-timeout",
        "--bind-timeout", "--idle-timeout", "--max-userid", "--max-hostname",
        "--bind-address", "--outgoing-address", "--no-keepalive",
    ):  # fmt: skip
        assert name in text


# -- makeService ------------------------------------------------------------------


def test_make_service_listens_on_the_default() -> None:
    reactor = FakeReactor()
    service = makeService(parsed("--handshake-timeout", "7"), reactor)
    # The listeners, and the reloader (SIGHUP must not kill the server).
    [listeners, reloader] = list(service)  # type: ignore[call-overload]
    assert isinstance(listeners, ListenerService)
    assert isinstance(reloader, RulesReloader) and reloader.path is None
    assert reactor.tcpServers == []  # nothing before the service starts
    with capturedLogs() as events:
        service.privilegedStartService()
        service.startService()
    [(port, factory, _, interface)] = reactor.tcpServers
    assert (port, interface) == (1080, "127.0.0.1")
    assert isinstance(factory, SOCKS4Factory)
    assert factory.reactor is reactor
    assert factory.settings.handshake_timeout == 7
    # It knows where it listens, so that it refuses to connect to itself.
    assert factory.settings.listening == {("127.0.0.1", 1080)}
    # One start-up event lists the listeners.
    [started] = [e for e in events if e.get("log_namespace") == "socks4tx.listen"]
    assert started["listeners"] == ["127.0.0.1:1080"]
    assert "127.0.0.1:1080" in formatEvent(started)

    stopped = service.stopService()
    assert reactor.ports[0].stopped
    assert stopped.called  # type: ignore[union-attr]


def test_make_service_with_several_listeners() -> None:
    reactor = MemoryReactor()
    options = parsed(
        "--listen", "tcp:1081:interface=127.0.0.2", "--listen", "unix:/tmp/s4"
    )  # fmt: skip
    service = makeService(options, reactor)
    with capturedLogs():
        service.privilegedStartService()
        service.startService()
    assert [(p, i) for p, _, _, i in reactor.tcpServers] == [(1081, "127.0.0.2")]
    [(address, factory, _, _, _)] = reactor.unixServers
    assert address == "/tmp/s4"
    assert factory is reactor.tcpServers[0][1]
    service.stopService()


def test_make_service_fails_when_it_cannot_listen() -> None:
    reactor = RaisingMemoryReactor(listenException=OSError("address in use"))
    service = makeService(parsed(), reactor)
    with pytest.raises(OSError, match="address in use"):
        service.privilegedStartService()


def test_listening_on_ignores_addresses_without_a_port() -> None:
    factory = SOCKS4Factory(FakeReactor(), Settings(), resolver=object())  # type: ignore[arg-type]
    factory.listening_on(IPv4Address("TCP", "0.0.0.0", 1080))
    factory.listening_on(UNIXAddress(b"/tmp/s4"))
    assert factory.settings.listening == {("0.0.0.0", 1080)}


def test_plugin_points_at_this_module() -> None:
    path = Path(__file__).parent.parent / "twisted" / "plugins" / "socks4tx_plugin.py"
    spec = importlib.util.spec_from_file_location("socks4tx_plugin_under_test", path)
    assert spec is not None and spec.loader is not None
    plugin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plugin)
    maker = plugin.socks4
    assert maker.tapname == "socks4"
    assert maker.options is Options
    assert maker.makeService is makeService
