"""
A hypothesis state machine that drives one L{SOCKS4Server} on the fakes
with whatever a hostile network can do to it, in any order: the client's
bytes (CONNECT, BIND and 4A requests, garbage, oversize fields, payload
behind the request) in arbitrary splits, time passing across every timeout
(handshake, resolve, ident, connect, BIND accept, idle), the outgoing
connection succeeding or failing, the resolver and identd answering or
failing, a BIND peer connecting (the application server or a stranger),
EOF and resets on either side, data from the remote side, a shutdown
aborting the session, and the reactor delivering closes.

After every step it checks what SPEC.md ("Replies and closes") promises:

- the client receives at most one reply (BIND: two), 8 bytes each, VN 0,
  CD 90-93, at the very start of its stream, then only relayed bytes; a
  SOCKS5 client gets C{05 FF} and nothing else; a request that can't be
  parsed gets exactly the reply its error names; a refusal is followed by
  the close;
- at most one outgoing connection attempt, at most one BIND listener, at
  most one name lookup and one ident lookup;
- nothing reaches the destination before the 90 that grants it, and then
  every byte the client sent behind its request arrives there, in order;
- at most one session log event, consistent with what the client saw;
- once the server has closed the client connection (the client went away,
  or the session was refused), it writes nothing more to it and starts
  nothing more for it (no lookup, connection or listener): "the client
  goes away during any wait: no reply, cancel everything".

At the end, time alone must end every session that is not relaying
without an idle timeout; then everything is closed and nothing may be
left: no DelayedCall, no listening BIND port, no pending connect or
lookup, no open connection, no counted session, exactly one session event.

C{SOCKS4TX_STATEFUL_EXAMPLES} sets how many runs (default 300, a few
seconds; each is up to 50 steps).  Run with C{--hypothesis-show-statistics}
to see how the sessions ended.  What the machine found is kept at the end
of this file as plain examples.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fakes import (
    CLIENT_ADDRESS,
    FakeReactor,
    FakeTransport,
    Proxy,
    ScriptedPolicy,
)
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import (
    ConnectionLost,
    ConnectionRefusedError,
    NoRouteError,
    TimeoutError,
)
from twisted.internet.interfaces import IDelayedCall
from twisted.names.error import DNSNameError, DNSServerError

from socks4tx.ident import IdentLookupFailed
from socks4tx.identwire import IdentUser
from socks4tx.rules import Decision
from socks4tx.server import HOLD_LIMIT, Settings
from socks4tx.wire import (
    HEADER,
    SOCKS5_NO_ACCEPTABLE_METHOD,
    Command,
    Reply,
    ReplyCode,
    Request,
    RequestParser,
    VersionError,
    WireError,
    pack_ipv4,
)

EXAMPLES = int(os.environ.get("SOCKS4TX_STATEFUL_EXAMPLES", "300"))
STEPS = 50

HANDSHAKE_TIMEOUT = 30.0
RESOLVE_TIMEOUT = 10.0
IDENT_TIMEOUT = 15.0
CONNECT_TIMEOUT = 120.0
BIND_TIMEOUT = 90.0
#: Longer than any timeout: what "time passes" means at the end.
FOREVER = 10_000.0

LOCAL_CLIENT = CLIENT_ADDRESS
REMOTE_CLIENT = IPv4Address("TCP", "203.0.113.50", 40000)
#: Plain SOCKS4 destinations: ordinary, loopback, link-local (the cloud
#: metadata service), DSTIP 0.0.0.0 (a bad request), and "this network".
DESTINATIONS = [
    "198.51.100.5",
    "203.0.113.9",
    "198.51.100.5",
    "127.0.0.1",
    "169.254.169.254",
    "0.0.0.0",
    "0.1.2.3",
]
SOCKS4A_ADDRESSES = ["0.0.0.1", "0.0.0.255"]
#: 1080 on 127.0.0.1 is the proxy's own listener: always refused.
PORTS = [80, 21, 80, 1080, 0, 65535]
USERIDS = [b"", b"alice", b"\xc3\xa9\xff"]
#: Names for the resolver, IPv4 literals (resolved without a lookup), and
#: names the wire codec refuses (blank, empty, 8-bit).
HOSTNAMES = [b"example.org", b"ftp.example", b"198.51.100.5", b"127.0.0.1", b"0.0.0.0"]
BAD_HOSTNAMES = [b"bad host", b"", b"\x80x", b"tab\tname"]
#: What the resolver may answer: "this network" is never usable, ::1 is no
#: IPv4 address.
RESOLVED = ["198.51.100.5", "203.0.113.9", "127.0.0.1", "169.254.1.1", "0.0.0.7", "::1"]
#: A BIND peer that is never the application server.
STRANGER = "192.0.2.222"

CONNECT_ERRORS = [ConnectionRefusedError, NoRouteError, TimeoutError]
RESOLVE_ERRORS = [DNSNameError, DNSServerError, defer.TimeoutError]


# -- what the client sends --------------------------------------------------


def field(values: list[bytes]) -> st.SearchStrategy[bytes]:
    """A NUL-ended field: a usual value or one of any length (oversize, too),
    sometimes without its NUL (the request runs on into what follows)."""
    value = st.one_of(
        st.sampled_from(values),
        st.integers(0, 300).map(lambda n: b"u" * n),
        st.binary(max_size=12),
    )
    ended = st.sampled_from([True, True, True, False])
    return st.builds(lambda v, e: v + b"\0" if e else v, value, ended)


@st.composite
def valid_requests(draw: st.DrawFn) -> bytes:
    """CONNECT/BIND/4A requests the codec accepts, with payload behind."""
    command = draw(st.sampled_from(Command))
    port = draw(st.sampled_from(PORTS))
    userid = draw(st.sampled_from(USERIDS))
    if draw(st.booleans()):
        address = draw(st.sampled_from(SOCKS4A_ADDRESSES))
        hostname = draw(st.sampled_from(HOSTNAMES))
    else:
        address, hostname = draw(st.sampled_from(DESTINATIONS)), None
    request = Request(command, port, address, userid, hostname)
    return request.to_bytes() + draw(st.binary(max_size=24))


@st.composite
def hostile_requests(draw: st.DrawFn) -> bytes:
    """Requests with any version, command, field lengths and contents."""
    version = draw(st.sampled_from([4, 4, 4, 5, 0, 0x47]))
    command = draw(st.sampled_from([1, 2, 0, 3]))
    port = draw(st.sampled_from(PORTS))
    socks4a = draw(st.booleans())
    address = draw(st.sampled_from(SOCKS4A_ADDRESSES if socks4a else DESTINATIONS))
    data = HEADER.pack(version, command, port, pack_ipv4(address))
    data += draw(field(USERIDS))
    if socks4a:
        data += draw(field(HOSTNAMES + BAD_HOSTNAMES))
    return data + draw(st.binary(max_size=24))


@st.composite
def any_requests(draw: st.DrawFn) -> bytes:
    """Four in five well-formed."""
    if draw(st.integers(0, 4)) == 4:
        return draw(hostile_requests())
    return draw(valid_requests())


requests = any_requests()


FLOOD = b"z" * HOLD_LIMIT
sends = st.one_of(st.integers(1, 8), st.integers(1, 600), st.just(2 * HOLD_LIMIT))
advances = st.one_of(
    st.sampled_from(
        [0.0, 0.5, 9.99, 10.0, 15.0, 29.99, 30.0, 60.0, 89.99, 90.0, 120.0, 121.0]
    ),
    st.floats(0.0, 5.0, allow_nan=False),
    st.floats(0.0, 200.0, allow_nan=False),
)


# -- fakes of our own -------------------------------------------------------


def ignore(what: str) -> None:
    pass


class TimedReactor(FakeReactor):
    """
    Remembers when each connect was started (the reactor times it out), and
    tells C{started} about every connect and listen.
    """

    def __init__(self) -> None:
        super().__init__()
        self.connect_times: list[float] = []
        self.started: Callable[[str], None] = ignore

    def connectTCP(self, *args: Any, **kwargs: Any) -> Any:
        self.started("an outgoing connection")
        self.connect_times.append(self.seconds())
        return super().connectTCP(*args, **kwargs)

    def listenTCP(self, *args: Any, **kwargs: Any) -> Any:
        self.started("a BIND listener")
        return super().listenTCP(*args, **kwargs)


class FakeIdentLookup:
    """One ident lookup: answered by the test, timed out by the clock."""

    def __init__(self, clock: Any, timeout: float) -> None:
        self.result: defer.Deferred[IdentUser] = defer.Deferred(self._cancel)
        self.timer: IDelayedCall = clock.callLater(timeout, self.fail, "timeout")

    def answer(self, userid: bytes) -> None:
        self.timer.cancel()
        self.result.callback(
            IdentUser(CLIENT_ADDRESS.port, 1080, "UNIX", None, userid or b"nobody")
        )

    def fail(self, outcome: str) -> None:
        if self.timer.active():
            self.timer.cancel()
        self.result.errback(IdentLookupFailed(outcome, "scripted"))

    def _cancel(self, _: object) -> None:
        if self.timer.active():
            self.timer.cancel()


class FakeIdent:
    """Stands in for L{socks4tx.ident.lookup_ident}."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.lookups: list[FakeIdentLookup] = []

    def __call__(self, *args: Any, timeout: float, **kwargs: Any) -> Any:
        getattr(self.clock, "started", ignore)("an ident lookup")
        lookup = FakeIdentLookup(self.clock, timeout)
        self.lookups.append(lookup)
        return lookup.result

    def pending(self) -> FakeIdentLookup | None:
        for lookup in self.lookups:
            if not lookup.result.called:
                return lookup
        return None


@dataclass
class Model:
    """What the client's bytes are, parsed independently of the server."""

    state: str  # "incomplete", "error" or "request"
    request: Request | None = None
    trailing: bytes = b""
    error: WireError | None = None


# -- the machine ------------------------------------------------------------


class SessionMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.proxy = Proxy()
        self.proxy.__enter__()
        self.reactor = TimedReactor()
        self.proxy.reactor = self.reactor
        self.ident = FakeIdent(self.reactor)
        machine = self

        class Watched(FakeTransport):
            def write(self, data: bytes) -> None:
                machine.destination_write(data)
                super().write(data)

        self.proxy.transport_class = Watched
        self.started = False
        #: Bytes queued for the client to send, and what it did send.
        self.queue = b""
        self.sent = b""
        #: Bytes the remote side (destination or BIND peer) sent.
        self.down = b""
        self.eof: set[int] = set()
        #: What the server did after it closed the client connection.
        self.late: list[str] = []
        self._model: tuple[int, Model] | None = None

    # -- set-up -------------------------------------------------------------

    @initialize(
        client=st.sampled_from([LOCAL_CLIENT, LOCAL_CLIENT, REMOTE_CLIENT]),
        permit=st.sampled_from([True, True, True, False]),
        explicit=st.booleans(),
        ident=st.sampled_from([None, None, "off", "optional", "required"]),
        idle_timeout=st.sampled_from([0.0, 60.0]),
        bind_address=st.sampled_from(["127.0.0.1", "0.0.0.0"]),
        max_userid=st.sampled_from([255, 8]),
        max_hostname=st.sampled_from([255, 11]),
        first=requests,
        pieces=st.lists(st.integers(1, 12), max_size=6),
        rest=st.sampled_from(["send", "send", "keep"]),
    )
    def start(
        self,
        client: IPv4Address,
        permit: bool,
        explicit: bool,
        ident: Any,
        idle_timeout: float,
        bind_address: str,
        max_userid: int,
        max_hostname: int,
        first: bytes,
        pieces: list[int],
        rest: str,
    ) -> None:
        self.idle_timeout = idle_timeout
        self.max_userid = max_userid
        self.max_hostname = max_hostname
        decision = Decision(permit, "test:1", ident, explicit_destination=explicit)
        settings = Settings(
            handshake_timeout=HANDSHAKE_TIMEOUT,
            resolve_timeout=RESOLVE_TIMEOUT,
            connect_timeout=CONNECT_TIMEOUT,
            bind_timeout=BIND_TIMEOUT,
            idle_timeout=idle_timeout,
            ident_timeout=IDENT_TIMEOUT,
            max_userid=max_userid,
            max_hostname=max_hostname,
            bind_address=bind_address,
            listening={("127.0.0.1", 1080)},
        )
        self.proxy.start(settings, ScriptedPolicy(decision), peer=client)
        self.proxy.factory.ident_lookup = self.ident  # type: ignore[assignment]
        # Once the server has closed the client connection, it may neither
        # write to it nor start anything for it.
        self.reactor.started = self.after_close
        lookup_address = self.proxy.resolver.lookupAddress
        write = self.client.write

        def watched_lookup(name: str, timeout: Any = None) -> Any:
            self.after_close(f"a lookup of {name}")
            return lookup_address(name, timeout)

        def watched_write(data: bytes) -> None:
            if data:
                self.after_close(f"writing {data[:16]!r} to the client")
            write(data)

        self.proxy.resolver.lookupAddress = watched_lookup  # type: ignore[method-assign]
        self.client.write = watched_write  # type: ignore[method-assign]
        self.started = True
        # The first request, in pieces; what is left is sent now or by
        # later steps.
        self.queue = first
        for size in pieces:
            if self.queue and self.readable(self.client):
                self.send(size)
        if rest == "send" and self.queue and self.readable(self.client):
            self.send(len(self.queue))

    def after_close(self, what: str) -> None:
        """
        Record C{what} the server does once it has closed the client
        connection (an abort excepted: nothing written after it is sent, and
        the session ends at once).
        """
        client = self.client
        if client.lost or (client.disconnecting and not client.disconnected):
            self.late.append(what)

    # -- state ----------------------------------------------------------------

    @property
    def client(self) -> FakeTransport:
        return self.proxy.client

    @property
    def remote(self) -> FakeTransport | None:
        """The connection relayed to: the destination or the BIND peer."""
        remotes = self.proxy.remotes + self.proxy.inbound
        return remotes[0] if remotes else None

    def readable(self, transport: FakeTransport | None) -> bool:
        """Whether the reactor would deliver bytes or EOF from this peer."""
        return (
            transport is not None
            and not transport.lost
            and not transport.closed
            and transport.producerState == "producing"
            and id(transport) not in self.eof
        )

    def connect_pending(self) -> bool:
        return (
            bool(self.reactor.connectors)
            and not self.proxy.connect_done
            and not self.reactor.connectors[0].stoppedConnecting
        )

    def pending_lookup(self) -> defer.Deferred[Any] | None:
        for _, _, lookup in self.proxy.resolver.lookups:
            if not lookup.called:
                return lookup
        return None

    def listener_open(self) -> bool:
        return bool(self.reactor.ports) and not self.reactor.ports[0].stopped

    def model(self) -> Model:
        """The client's stream parsed in one piece by a fresh parser."""
        if self._model is None or self._model[0] != len(self.sent):
            parser = RequestParser(self.max_userid, self.max_hostname)
            try:
                parser.feed(self.sent)
            except WireError as error:
                model = Model("error", error=error)
            else:
                if parser.request is None:
                    model = Model("incomplete")
                else:
                    model = Model("request", parser.request, parser.trailing)
            self._model = (len(self.sent), model)
        return self._model[1]

    # -- the client -----------------------------------------------------------

    @rule(data=requests)
    def queue_request(self, data: bytes) -> None:
        self.queue += data

    @rule(data=st.one_of(st.binary(min_size=1, max_size=40), st.none()))
    def queue_garbage(self, data: bytes | None) -> None:
        """Garbage, or (None) more bytes than the server holds unread."""
        self.queue += FLOOD if data is None else data

    @precondition(lambda self: self.queue and self.readable(self.client))
    @rule(size=sends)
    def client_sends(self, size: int) -> None:
        self.send(size)

    def send(self, size: int) -> None:
        data, self.queue = self.queue[:size], self.queue[size:]
        self.sent += data
        self.proxy.send(data)

    @precondition(lambda self: not self.client.lost)
    @rule(how=st.sampled_from(["eof", "reset", "shutdown"]))
    def client_leaves(self, how: str) -> None:
        """The client sends EOF or resets, or a shutdown aborts the session."""
        if how == "shutdown":
            self.proxy.protocol.abort()
        elif how == "reset" or not self.readable(self.client):
            self.client.deliver_close(ConnectionLost)
        else:
            self.eof.add(id(self.client))
            self.client.deliver_eof()

    # -- time -----------------------------------------------------------------

    @rule(seconds=advances)
    def time_passes(self, seconds: float) -> None:
        self.advance(seconds)

    def advance(self, seconds: float) -> None:
        """
        Advance the clock; a pending connect fails with TimeoutError at its
        deadline, as the reactor's connector does.
        """
        target = self.reactor.seconds() + seconds
        while self.connect_pending():
            _, _, _, timeout, _ = self.reactor.tcpClients[0]
            deadline = self.reactor.connect_times[0] + timeout
            if deadline > target:
                break
            self.reactor.advance(max(0.0, deadline - self.reactor.seconds()))
            if self.connect_pending():
                self.proxy.connection_fails(TimeoutError())
        self.reactor.advance(max(0.0, target - self.reactor.seconds()))

    @rule()
    def reactor_delivers_closes(self) -> None:
        self.proxy.settle()

    # -- the outgoing connection ---------------------------------------------

    @precondition(lambda self: self.connect_pending())
    @rule()
    def connect_succeeds(self) -> None:
        self.proxy.connection_succeeds()

    @precondition(lambda self: self.connect_pending())
    @rule(error=st.sampled_from(CONNECT_ERRORS))
    def connect_fails(self, error: type[Exception]) -> None:
        self.proxy.connection_fails(error())

    # -- the resolver and identd ------------------------------------------------

    @precondition(lambda self: self.pending_lookup() is not None)
    @rule(addresses=st.lists(st.sampled_from(RESOLVED), max_size=3))
    def resolver_answers(self, addresses: list[str]) -> None:
        index = self.proxy.resolver.lookups.index(
            next(e for e in self.proxy.resolver.lookups if not e[2].called)
        )
        self.proxy.resolver.answer(*addresses, index=index)

    @precondition(lambda self: self.pending_lookup() is not None)
    @rule(error=st.sampled_from(RESOLVE_ERRORS))
    def resolver_fails(self, error: type[Exception]) -> None:
        lookup = self.pending_lookup()
        assert lookup is not None
        lookup.errback(error())

    @precondition(lambda self: self.ident.pending() is not None)
    @rule(matching=st.booleans())
    def identd_answers(self, matching: bool) -> None:
        lookup = self.ident.pending()
        request = self.model().request
        assert lookup is not None and request is not None
        lookup.answer(request.userid if matching else b"mallory")

    @precondition(lambda self: self.ident.pending() is not None)
    @rule(outcome=st.sampled_from(["refused", "closed", "ERROR:NO-USER"]))
    def identd_fails(self, outcome: str) -> None:
        lookup = self.ident.pending()
        assert lookup is not None
        lookup.fail(outcome)

    # -- BIND's inbound connection ---------------------------------------------

    @precondition(lambda self: self.listener_open())
    @rule(matching=st.booleans(), port=st.sampled_from([20, 1024, 65535]))
    def peer_connects(self, matching: bool, port: int) -> None:
        application_server = self.proxy.protocol.session.dst_ip
        assert application_server is not None
        host = application_server if matching else STRANGER
        self.proxy.peer_connects(host, port)

    # -- the remote side --------------------------------------------------------

    @precondition(lambda self: self.readable(self.remote))
    @rule(data=st.binary(min_size=1, max_size=32))
    def remote_sends(self, data: bytes) -> None:
        assert self.remote is not None
        self.down += data
        self.remote.receive(data)

    @precondition(lambda self: self.remote is not None and not self.remote.lost)
    @rule(reset=st.booleans())
    def remote_leaves(self, reset: bool) -> None:
        remote = self.remote
        assert remote is not None
        if reset or not self.readable(remote):
            remote.deliver_close(ConnectionLost)
        else:
            self.eof.add(id(remote))
            remote.deliver_eof()

    # -- invariants -------------------------------------------------------------

    def destination_write(self, data: bytes) -> None:
        """Called before every write to the destination or BIND peer."""
        if not data:
            return
        request = self.model().request
        assert request is not None, "bytes relayed without a request"
        # The granting reply: CONNECT's only one, BIND's second.
        first = 0 if request.command is Command.CONNECT else 8
        written = self.client.value()
        assert written[first : first + 2] == b"\x00\x5a", (
            f"{data!r} relayed before the 90 was sent (client got {written!r})"
        )

    def replies(self) -> list[Reply]:
        """The replies at the start of what the client received."""
        value = self.client.value()
        assert value.endswith(self.down), "relayed bytes lost or reordered"
        head = value[: len(value) - len(self.down)]
        assert len(head) % 8 == 0, f"client received {value!r}"
        # from_bytes refuses anything but VN 0 and CD 90-93.
        return [Reply.from_bytes(head[i : i + 8]) for i in range(0, len(head), 8)]

    @invariant()
    def nothing_after_close(self) -> None:
        assert self.late == [], f"after closing the client connection: {self.late}"

    @invariant()
    def client_stream_is_well_formed(self) -> None:
        if not self.started:
            return
        client = self.client
        closed = client.closed or client.lost
        value = client.value()
        model = self.model()
        started_anything = (
            self.reactor.tcpClients
            or self.reactor.tcpServers
            or self.proxy.resolver.lookups
            or self.ident.lookups
        )
        if model.state == "incomplete":
            assert value == b""
            assert not started_anything
            if self.reactor.seconds() >= HANDSHAKE_TIMEOUT:
                assert closed, "incomplete request outlived the handshake timeout"
            return
        if model.state == "error":
            error = model.error
            assert error is not None
            if isinstance(error, VersionError) and error.version == 5:
                expected = SOCKS5_NO_ACCEPTABLE_METHOD
            elif error.reply is None:
                expected = b""
            else:
                expected = Reply(error.reply).to_bytes()
            assert value == expected, (value, error)
            assert closed, f"not closed after {error!r}"
            assert not started_anything
            return
        request = model.request
        assert request is not None
        connect = request.command is Command.CONNECT
        replies = self.replies()
        assert len(replies) <= (1 if connect else 2), replies
        if len(replies) == 2:
            assert replies[0].code == ReplyCode.GRANTED
        if replies and replies[-1].code != ReplyCode.GRANTED:
            assert closed, f"not closed after reply {replies[-1]}"
        # One outgoing connection at most; BIND never connects out.
        assert len(self.reactor.tcpClients) <= (1 if connect else 0)
        assert len(self.reactor.tcpServers) <= (0 if connect else 1)
        assert len(self.proxy.resolver.lookups) <= 1
        assert len(self.ident.lookups) <= 1
        assert len(self.proxy.remotes) + len(self.proxy.inbound) <= 1
        remote = self.remote
        granted = len(replies) == (1 if connect else 2) and (
            replies[-1].code == ReplyCode.GRANTED
        )
        if remote is None:
            assert not granted, "granted without a connection"
            assert self.down == b""
        else:
            assert granted, "connected but not granted"
            # Every byte the client sent behind its request, in order.
            assert remote.value() == model.trailing, (
                "the destination did not get exactly the client's bytes behind"
                f" its request: {remote.value()[:64]!r} != {model.trailing[:64]!r}"
            )
            peer = remote.getPeer()
            if not connect:
                assert isinstance(peer, IPv4Address)
                assert (replies[1].port, replies[1].address) == (peer.port, peer.host)
        if not connect and replies and replies[0].code == ReplyCode.GRANTED:
            # The first BIND reply says where the listener is.
            assert len(self.reactor.ports) == 1
            assert replies[0].port == self.reactor.ports[0].address.port

    @invariant()
    def one_session_event(self) -> None:
        if not self.started:
            return
        failures = [e for e in self.proxy.events if "log_failure" in e]
        assert failures == [], failures
        events = self.proxy.session_events()
        assert len(events) <= 1, events
        if not events:
            return
        event = events[0]
        assert self.client.lost, "session logged while the client is connected"
        # A session that has ended leaves nothing behind, right away.
        calls = self.reactor.getDelayedCalls()
        assert calls == [], f"delayed calls left: {calls}"
        assert all(port.stopped for port in self.reactor.ports), "listener left"
        assert not self.connect_pending(), "connect left pending"
        assert self.pending_lookup() is None, "name lookup left pending"
        assert self.ident.pending() is None, "ident lookup left pending"
        if self.model().state == "request":
            replies = self.replies()
            assert event["reply"] == (replies[-1].code if replies else None)
        elif self.client.value()[:1] == b"\0":
            assert event["reply"] == self.client.value()[1]
        else:
            assert event["reply"] is None
        if self.remote is not None:
            assert event["bytes_up"] == len(self.model().trailing)
            assert event["bytes_down"] == len(self.down)

    # -- the end ----------------------------------------------------------------

    def teardown(self) -> None:
        try:
            if self.started:
                self.finish()
        finally:
            self.proxy.__exit__(None, None, None)

    def finish(self) -> None:
        # Time alone ends every wait.
        for _ in range(3):
            self.proxy.settle()
            self.advance(FOREVER)
        self.proxy.settle()
        relaying = self.remote is not None and not self.remote.lost
        if not (relaying and self.idle_timeout == 0):
            assert self.client.lost, "a session outlived every timeout"
            assert len(self.proxy.session_events()) == 1
        # Then everybody leaves.
        for transport in (self.client, *self.proxy.remotes, *self.proxy.inbound):
            if not transport.lost:
                transport.deliver_close(ConnectionLost)
        self.proxy.settle()
        self.advance(FOREVER)
        self.proxy.settle()
        self.client_stream_is_well_formed()
        self.one_session_event()
        [session] = self.proxy.session_events()
        event(f"{session['command']} reply={session['reply']} {session['reason']}")
        self.proxy.assert_clean()
        assert all(lookup.result.called for lookup in self.ident.lookups)
        assert len(self.proxy.factory.sessions) == 0


SessionMachine.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestSession = SessionMachine.TestCase


# -- what the machine found, as plain examples ----------------------------------
#
# A BIND client that sends EOF while its request is pending has gone away:
# the server closes the connection (readConnectionLost), but until the
# reactor delivers connectionLost the pending work goes on, and what it
# ends with is written to the closing connection (which a real transport
# still flushes to the client): a reply where SPEC.md says "none", and a
# listener opened or an inbound connection accepted for nobody.


def bind_client_leaves(proxy: Proxy, request: bytes, ident: Any = None) -> FakeIdent:
    lookup = FakeIdent(proxy.reactor)
    proxy.start(
        policy=ScriptedPolicy(Decision(True, "test:1", ident)),
        bind_address="127.0.0.1",
    )
    proxy.factory.ident_lookup = lookup  # type: ignore[assignment]
    proxy.send(request)
    proxy.client.deliver_eof()
    assert proxy.client.closed
    return lookup


def bind_bytes(hostname: bytes | None = None) -> bytes:
    address = "0.0.0.1" if hostname else "127.0.0.1"
    return Request(Command.BIND, 21, address, b"alice", hostname).to_bytes()


def test_bind_resolve_ends_after_client_eof() -> None:
    with Proxy() as proxy:
        bind_client_leaves(proxy, bind_bytes(b"example.org"))
        proxy.resolver.answer()  # no address: would be 91
        assert proxy.client.value() == b""
        event = proxy.session()
        assert (event["reply"], event["reason"]) == (None, "client-gone")


def test_bind_resolved_after_client_eof_opens_nothing() -> None:
    with Proxy() as proxy:
        bind_client_leaves(proxy, bind_bytes(b"example.org"))
        proxy.resolver.answer("127.0.0.1")
        assert proxy.reactor.tcpServers == []
        assert proxy.client.value() == b""


def test_bind_ident_ends_after_client_eof() -> None:
    with Proxy() as proxy:
        lookup = bind_client_leaves(proxy, bind_bytes(), ident="required")
        assert len(lookup.lookups) == 1
        pending = lookup.pending()
        if pending is not None:  # not cancelled: identd answers
            pending.answer(b"mallory")  # would be 93
        assert proxy.client.value() == b""


def test_bind_peer_after_client_eof_gets_nothing() -> None:
    with Proxy() as proxy:
        proxy.start(bind_address="127.0.0.1")
        proxy.send(bind_bytes())
        first = proxy.client.value()
        assert first[:2] == b"\x00\x5a"
        proxy.client.deliver_eof()
        assert proxy.client.closed
        # The application server connects before connectionLost arrives.
        proxy.peer_connects("127.0.0.1", 20)
        assert proxy.client.value() == first, "a second reply to a client that left"
