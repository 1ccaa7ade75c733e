"""
The SOCKS4/4A server: a Protocol/Factory pair.

A request travels one road, written as one coroutine (L{SOCKS4Server._serve}):
parse -> resolve (4A) -> destination checks -> rules -> connect | bind ->
reply -> relay.  Every ending is at most one reply (BIND: two), one close
and one session log event.  While a request is being decided the client's
bytes are held (bounded) for the relay, never parsed as a new request; a
client that leaves cancels whatever is pending.
"""

from __future__ import annotations

import contextlib
import functools
import socket
from dataclasses import dataclass, field

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IReactorTCP,
    IReactorTime,
    IResolver,
    ITransport,
)
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from socks4tx.bind import BindListener, BindMismatch, route_source_address
from socks4tx.commands import command_values, run_rule_command
from socks4tx.connect import connect_tcp
from socks4tx.ident import IdentLookupFailed, lookup_ident
from socks4tx.identwire import userid_matches
from socks4tx.limits import (
    DEFAULT_MAX_PER_SOURCE,
    Sessions,
    default_max_connections,
    open_file_limit,
)
from socks4tx.memory import IdleRelease
from socks4tx.metrics import NullMetrics, SessionMetrics
from socks4tx.proxyheader import real_host
from socks4tx.relay import Relay, RelayEnd, RemoteProtocol, write_now
from socks4tx.resolve import ResolveError, resolve_ipv4
from socks4tx.rules import LoopbackOnly, Policy, is_local_client, source_address
from socks4tx.session import Session, address_host_port, client_address
from socks4tx.splice import EagerSpliceRelay, SpliceRelay, pipes, splice_available
from socks4tx.wire import (
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

log = Logger(namespace="socks4tx.server")

#: Bytes a client may send while its request is decided before the server
#: stops reading from it (they are relayed once the session is granted).
HOLD_LIMIT = 64 * 1024


IDENT_MODES = ("off", "optional", "required")
#: --relay: how relayed bytes move (see socks4tx.splice).
RELAY_MODES = ("auto", "splice", "portable")


@dataclass
class Settings:
    """Everything a server takes from its options; times in seconds."""

    handshake_timeout: float = 30.0
    resolve_timeout: float = 10.0
    connect_timeout: float = 120.0
    bind_timeout: float = 120.0
    idle_timeout: float = 0.0
    max_userid: int = 255
    max_hostname: int = 255
    bind_address: str | None = None
    outgoing_address: str | None = None
    keepalive: bool = True
    #: The server-wide ident mode, for rules without ?=: one of IDENT_MODES.
    ident: str = "off"
    ident_timeout: float = 15.0
    ident_port: int = 113
    run_rule_commands: bool = False
    rule_command_timeout: float = 10.0
    #: Sessions at once, in total and from one client address (0: no limit).
    max_connections: int = field(default_factory=default_max_connections)
    max_connections_per_source: int = DEFAULT_MAX_PER_SOURCE
    #: Seconds sessions may go on after a shutdown began.
    shutdown_grace: float = 10.0
    #: How relayed bytes move: one of RELAY_MODES.
    relay: str = "auto"
    #: (host, port) of this server's own listening sockets.
    listening: set[tuple[str, int]] = field(default_factory=set)


class Refused(Exception):
    """Ends a session before the relay, with a reply (or none) and a reason."""

    def __init__(
        self,
        reason: str,
        reply: ReplyCode | None = ReplyCode.REJECTED,
        detail: str = "",
    ) -> None:
        super().__init__(detail or reason)
        self.reason = reason
        self.reply = reply


def set_keepalive(transport: ITransport | None, enabled: bool) -> None:
    """TCP keepalive where the transport has it (not on UNIX sockets)."""
    set_option = getattr(transport, "setTcpKeepAlive", None)
    if enabled and set_option is not None:
        with contextlib.suppress(OSError):
            set_option(1)


def is_sensitive_destination(address: str) -> bool:
    """
    Loopback (127.0.0.0/8) and link-local (169.254.0.0/16) destinations:
    services that trust this host (local admin ports, the cloud metadata
    service at 169.254.169.254) and that a remote client must not reach
    through us unless a rule names them.
    """
    packed = pack_ipv4(address)
    return packed[0] == 127 or packed[:2] == b"\xa9\xfe"


def client_source(address: IAddress | None) -> str | None:
    """The client's address as limits count it (IPv4-mapped as IPv4)."""
    if address is None:
        return None
    return _normalized_host(address_host_port(address)[0])


@functools.lru_cache(maxsize=4096)
def _normalized_host(host: str | None) -> str | None:
    parsed = source_address(host)
    return str(parsed) if parsed is not None else host


def in_this_network(address: str) -> bool:
    """
    Whether a dotted quad is in 0.0.0.0/8 ("this network"): never a
    destination; connecting to it reaches this host.
    """
    return pack_ipv4(address)[0] == 0


def is_local_address(address: str) -> bool:
    """Whether C{address} belongs to this host (binding to it succeeds)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.bind((address, 0))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def is_own_listener(settings: Settings, address: str, port: int) -> bool:
    """Whether C{address:port} reaches one of this server's listeners."""
    for host, listening_port in settings.listening:
        if listening_port != port:
            continue
        if host == address:
            return True
        if host in ("0.0.0.0", "::") and is_local_address(address):
            return True
    return False


@implementer(IHalfCloseableProtocol)
class SOCKS4Server(Protocol):
    """One client connection: the handshake, then its half of the relay."""

    factory: SOCKS4Factory
    session: Session
    #: The client's address as the limits count it.
    source: str | None = None

    def __init__(self) -> None:
        self._parser: RequestParser | None = None
        self._timer: IDelayedCall | None = None
        self._held: list[bytes] = []
        self._held_size = 0
        self._work: defer.Deferred[None] | None = None
        self._relay: Relay | None = None
        self._relay_end: RelayEnd | None = None
        self._remote: RemoteProtocol | None = None
        self._closing = False
        self._client_eof = False
        self._shut_down = False
        self._ident_user: bytes | None = None
        self._logged = False

    # -- connection events ------------------------------------------------

    def connectionMade(self) -> None:
        settings = self.factory.settings
        assert self.transport is not None
        client, client_port = address_host_port(client_address(self.transport))
        self.session = Session(client, client_port, self.factory.clock.seconds())
        self._parser = RequestParser(settings.max_userid, settings.max_hostname)
        self._timer = self.factory.clock.callLater(
            settings.handshake_timeout, self._handshake_timed_out
        )
        set_keepalive(self.transport, settings.keepalive)

    def dataReceived(self, data: bytes) -> None:
        if self._relay_end is not None:
            self._relay_end.data_received(data)
        elif self._work is not None:
            self._hold(data)
        elif self._parser is not None:
            self._parse(data)

    def readConnectionLost(self) -> None:
        if self._relay_end is not None:
            self._relay_end.read_connection_lost()
        elif self._work is not None and self.session.command == "connect":
            # A CONNECT client may send its whole stream behind the request
            # and shut down its sending side (printf ... | nc -N): the EOF
            # is passed on once the relay starts.
            self._client_eof = True
        else:
            # Before a complete request, or while a BIND waits for its peer,
            # EOF means the client gave up: cancel what is pending now (the
            # close itself completes a reactor turn later, and nothing may be
            # written to the client meanwhile).
            self._client_gone()
            self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_timer()
        if self._relay_end is not None:
            self._relay_end.connection_lost()
            return
        self._client_gone()
        if self._remote is not None and self._remote.transport is not None:
            self._remote.transport.loseConnection()
        self._log_session()

    def _client_gone(self) -> None:
        """
        Nothing may be written to the client from now on, and whatever is
        pending (lookups, connect, BIND listener) is cancelled.
        """
        self._closing = True
        self.session.reason = self.session.reason or "client-gone"
        if self._work is not None and not self._work.called:
            self._work.cancel()

    # -- the handshake ----------------------------------------------------

    def _parse(self, data: bytes) -> None:
        assert self._parser is not None
        try:
            request = self._parser.feed(data)
        except VersionError as error:
            if error.version == 5:
                log.info(
                    "SOCKS5 client {client} refused: this server speaks SOCKS4/4A only",
                    client=self.session.client,
                )
                self.transport.write(SOCKS5_NO_ACCEPTABLE_METHOD)  # type: ignore[union-attr]
            self._end(Refused("bad-request", None, str(error)))
            return
        except WireError as error:
            self._end(Refused("bad-request", error.reply, str(error)))
            return
        if request is None:
            return
        self._cancel_timer()
        self.session.request(request)
        self._hold(self._parser.trailing)
        self._parser = None
        self._work = defer.Deferred.fromCoroutine(self._serve(request))
        self._work.addErrback(self._failed)

    def _hold(self, data: bytes) -> None:
        if not data:
            return
        self._held.append(data)
        self._held_size += len(data)
        if self._held_size >= HOLD_LIMIT:
            self.transport.pauseProducing()  # type: ignore[union-attr]

    async def _serve(self, request: Request) -> None:
        addresses = await self._destination(request)
        destination = addresses[0]
        self.session.dst_ip = destination
        decision = self.factory.policy.decide(
            self.session.client,
            destination,
            request.port,
            request.userid,
            request.command,
        )
        self.session.rule = decision.rule
        if not decision.permit:
            self._run_command(decision.command, request)
            raise Refused("rule")
        if (
            request.command is Command.CONNECT
            and is_sensitive_destination(destination)
            and not decision.explicit_destination
            and not is_local_client(self.session.client)
        ):
            raise Refused("destination-refused", detail="loopback or link-local")
        mode = decision.ident or self.factory.settings.ident
        if mode != "off":
            await self._verify_ident(request, mode)
        self._run_command(decision.command, request)
        if request.command is Command.CONNECT:
            remote = await self._connect(destination, request.port)
        else:
            remote = await self._bind(addresses)
        self._remote = remote
        set_keepalive(remote.transport, self.factory.settings.keepalive)
        self._start_relay(remote)

    async def _verify_ident(self, request: Request, mode: str) -> None:
        """
        RFC 1413: ask the client's identd who owns the connection.  A lookup
        that fails is 92 when ident is required and nothing when optional;
        identd naming another user is 93 in both modes.
        """
        settings = self.factory.settings
        assert self.transport is not None
        client, client_port = address_host_port(self.transport.getPeer())
        # The port the client connected to (a balancer's frontend, behind
        # a PROXY header), asked from this host's own address.
        server_port = address_host_port(self.transport.getHost())[1]
        local = address_host_port(real_host(self.transport))[0]
        try:
            if client is None or client_port is None or server_port is None:
                raise IdentLookupFailed("no-address", "the client has no IP address")
            answer = await self.factory.ident_lookup(
                self.factory.reactor,
                client,
                client_port,
                server_port,
                local,
                identd_port=settings.ident_port,
                timeout=settings.ident_timeout,
            )
        except IdentLookupFailed as failure:
            self.session.ident = failure.outcome
            self.factory.metrics.ident_finished(failure.outcome)
            if mode == "required":
                self._run_command(self._event_command("no_identd_command"), request)
                raise Refused(
                    "ident-failed", ReplyCode.IDENTD_UNREACHABLE, failure.detail
                ) from None
            return
        self._ident_user = answer.userid
        self.session.ident = answer.userid.decode("utf-8", "backslashreplace")
        matches = userid_matches(answer.userid, request.userid)
        self.factory.metrics.ident_finished("match" if matches else "mismatch")
        if not matches:
            self._run_command(self._event_command("bad_id_command"), request)
            raise Refused("ident-mismatch", ReplyCode.IDENT_MISMATCH)

    def _run_command(self, template: str | None, request: Request) -> None:
        """Start a rule command, if there is one and commands are enabled."""
        settings = self.factory.settings
        if template is None or not settings.run_rule_commands:
            return
        values = command_values(
            client=self.session.client,
            command=request.command.label,
            port=request.port,
            userid=request.userid,
            dst_ip=self.session.dst_ip or "",
            dst_host=request.hostname,
            ident_user=self._ident_user,
        )
        run_rule_command(
            self.factory.reactor, template, values, settings.rule_command_timeout
        )

    def _event_command(self, name: str) -> str | None:
        """The rules file's #NO_IDENTD: or #BAD_ID: command, if any."""
        command: str | None = getattr(self.factory.policy, name, None)
        return command

    async def _destination(self, request: Request) -> list[str]:
        """The destination's IPv4 addresses, resolving a 4A name."""
        if request.hostname is None:
            if request.address == "0.0.0.0":
                # For BIND it names no application server to check the
                # peer against; for CONNECT it would reach this host.
                raise Refused("bad-request", detail="DSTIP 0.0.0.0")
            return [request.address]
        settings = self.factory.settings
        try:
            addresses = await resolve_ipv4(
                self.factory.resolver,
                self.factory.clock,
                request.hostname.decode("ascii"),
                settings.resolve_timeout,
            )
        except ResolveError as error:
            raise Refused("resolve-failed", detail=str(error)) from None
        usable = [a for a in addresses if not in_this_network(a)]
        if not usable:
            raise Refused("destination-refused", detail=f"{addresses}")
        return usable

    async def _connect(self, destination: str, port: int) -> RemoteProtocol:
        settings = self.factory.settings
        if in_this_network(destination):
            raise Refused("destination-refused", detail=destination)
        if is_own_listener(settings, destination, port):
            raise Refused("destination-refused", detail="this server's own listener")
        bind = None
        if settings.outgoing_address:
            bind = (settings.outgoing_address, 0)
        try:
            remote = await connect_tcp(
                self.factory.reactor,
                destination,
                port,
                settings.connect_timeout,
                bind,
            )
        except defer.CancelledError:
            raise
        except Exception as error:
            raise Refused("connect-failed", detail=str(error)) from None
        local_host, local_port = address_host_port(remote.transport.getHost())  # type: ignore[union-attr]
        self._reply(ReplyCode.GRANTED, local_port or 0, local_host or "0.0.0.0")
        return remote

    async def _bind(self, addresses: list[str]) -> RemoteProtocol:
        settings = self.factory.settings
        interface = settings.bind_address or route_source_address(addresses[0])
        if interface is None:
            raise Refused("bind-failed", detail=f"no route to {addresses[0]}")
        listener = BindListener(
            self.factory.reactor,
            self.factory.clock,
            interface,
            addresses,
            settings.bind_timeout,
        )
        try:
            bound = listener.listen()
        except Exception as error:
            raise Refused("bind-failed", detail=str(error)) from None
        metrics = self.factory.metrics
        metrics.bind_listener_opened()
        # A wildcard listener tells the client to use the server's address.
        announced = "0.0.0.0" if interface in ("0.0.0.0", "") else bound.host
        self._reply(ReplyCode.GRANTED, bound.port, announced)
        try:
            remote = await listener.accepted
        except BindMismatch as error:
            raise Refused("bind-mismatch", detail=str(error)) from None
        except defer.TimeoutError:
            raise Refused("timeout", detail="no inbound BIND connection") from None
        finally:
            listener.close()
            metrics.bind_listener_closed()
        peer = remote.transport.getPeer()  # type: ignore[union-attr]
        assert isinstance(peer, IPv4Address)
        self._reply(ReplyCode.GRANTED, peer.port, peer.host)
        return remote

    def _reply(self, code: ReplyCode, port: int = 0, address: str = "0.0.0.0") -> None:
        self.session.reply = int(code)
        write_now(self.transport, Reply(code, port, address).to_bytes())

    def _failed(self, failure: Failure) -> None:
        if isinstance(failure.value, defer.CancelledError):
            return  # the client left; connectionLost has the rest
        if isinstance(failure.value, Refused):
            self._end(failure.value)
            return
        log.failure(
            "unexpected error serving {client}", failure, client=self.session.client
        )
        self._end(Refused("internal-error"))

    def _end(self, refusal: Refused) -> None:
        """Reply (if owed), close, and remember why."""
        if self._closing:
            return
        self._closing = True
        self._parser = None
        self._cancel_timer()
        self.session.reason = refusal.reason
        if refusal.reply is not None:
            self._reply(refusal.reply)
        if self._remote is not None and self._remote.transport is not None:
            self._remote.transport.loseConnection()
        self.transport.loseConnection()  # type: ignore[union-attr]

    def _handshake_timed_out(self) -> None:
        self._timer = None
        self._end(Refused("timeout", None, "request incomplete"))

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    # -- the relay --------------------------------------------------------

    def _start_relay(self, remote: RemoteProtocol) -> None:
        pending = b"".join(self._held)
        self._held = []
        assert self.transport is not None and remote.transport is not None
        relay = self.factory.relay_class(
            self.transport,  # type: ignore[arg-type]
            remote.transport,  # type: ignore[arg-type]
            self.factory.clock,
            self.factory.settings.idle_timeout,
            self._relay_finished,
        )
        self._relay = relay
        self._relay_end = relay.client
        # Reads go straight to the relay from now on (Twisted looks
        # dataReceived up on the instance for every read).
        self.dataReceived = relay.client.data_received  # type: ignore[method-assign]
        if self._held_size >= HOLD_LIMIT:
            self.transport.resumeProducing()  # type: ignore[attr-defined]
        relay.start(pending)
        remote.attach(relay.server)
        if self._client_eof:
            relay.client.read_connection_lost()
        relay.started()
        factory = self.factory
        factory.metrics.handshake_finished(
            factory.clock.seconds() - self.session.started
        )

    def _relay_finished(self, relay: Relay) -> None:
        if self._shut_down:
            self.session.reason = "shutdown"
        else:
            self.session.reason = "timeout" if relay.timed_out else "relayed"
        self._log_session()

    def _log_session(self) -> None:
        if self._logged:
            return
        self._logged = True
        if self._relay is not None:
            self.session.bytes_up = self._relay.bytes_up
            self.session.bytes_down = self._relay.bytes_down
            self.session.relay = self._relay.name
        self.session.end(self.factory.clock.seconds())
        self.factory.metrics.session_ended(self.session, admitted=True)
        self._release()
        sessions = self.factory.sessions
        sessions.remove(self, self.source)
        self.factory.idle_release.session_ended(idle=not sessions)

    def _release(self) -> None:
        """
        Break the finished session's reference cycles (protocol, relay,
        Deferreds), so that reference counting frees it at once rather than
        a full garbage collection some time later.
        """
        if self._relay is not None:
            self._relay.release()
        self.__dict__.pop("dataReceived", None)
        self._relay = None
        self._relay_end = None
        self._remote = None
        self._work = None
        self._timer = None

    def abort(self) -> None:
        """Close the session now (at the end of a shutdown's grace)."""
        self._shut_down = True
        self.session.reason = self.session.reason or "shutdown"
        if self._relay is not None:
            self._relay.abort()
        elif self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]


def relay_class_for(mode: str) -> type[Relay]:
    """
    The relay for a --relay mode where the platform can splice: C{splice}
    splices every session from its start, C{auto} a session once it moves
    bulk data.  Both fall back per session to the portable relay when a
    connection is not a plain socket.
    """
    if mode == "portable" or not splice_available():
        return Relay
    return EagerSpliceRelay if mode == "splice" else SpliceRelay


class _OverLimit(Protocol):
    """A connection over a limit: logged and closed before anything is read."""

    def __init__(self, factory: SOCKS4Factory) -> None:
        self.factory = factory

    def connectionMade(self) -> None:
        assert self.transport is not None
        client, client_port = address_host_port(client_address(self.transport))
        now = self.factory.clock.seconds()
        session = Session(client, client_port, now, reason="limit")
        session.end(now)
        self.factory.metrics.session_ended(session, admitted=False)
        self.transport.loseConnection()


class SOCKS4Factory(ServerFactory):
    """
    Serves SOCKS4/4A with the given settings, policy and resolver.

    @param reactor: used for connections, listeners and time; tests pass a
        L{MemoryReactorClock}.
    """

    noisy = False

    def __init__(
        self,
        reactor: IReactorTCP,
        settings: Settings | None = None,
        policy: Policy | None = None,
        resolver: IResolver | None = None,
    ) -> None:
        self.reactor = reactor
        self.clock: IReactorTime = reactor  # type: ignore[assignment]
        self.settings = settings or Settings()
        # The splice relay's pipes within what the open-file limit leaves
        # beside the sessions (see default_max_connections).
        pipes.fit(open_file_limit())
        # Not "policy or ...": a rule set without rules is empty, hence
        # false, and must deny everything, not fall back to the built-in.
        self.policy: Policy = LoopbackOnly() if policy is None else policy
        if resolver is None:
            from twisted.names.client import createResolver

            resolver = createResolver()
        self.resolver = resolver
        #: The RFC 1413 client; tests put a fake here.
        self.ident_lookup = lookup_ident
        self.sessions = Sessions(
            self.settings.max_connections, self.settings.max_connections_per_source
        )
        #: The relay class sessions use (--relay).
        self.relay_class: type[Relay] = relay_class_for(self.settings.relay)
        #: Told about sessions (--metrics); counts nothing by default.
        self.metrics: SessionMetrics = NullMetrics()
        self.idle_release = IdleRelease(
            self.clock, (self.sessions, ("active", "by_source"))
        )

    def listening_on(self, address: IAddress) -> None:
        """Record one of this server's listening addresses (see L{is_own_listener})."""
        host, port = address_host_port(address)
        if host is not None and port is not None:
            self.settings.listening.add((host, port))

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        source = client_source(addr)
        if not self.sessions.admit(source):
            self.sessions.refused += 1
            return _OverLimit(self)
        protocol = SOCKS4Server()
        protocol.factory = self
        protocol.source = source
        self.sessions.add(protocol, source)
        self.metrics.session_started()
        return protocol
