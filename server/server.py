"""The server: configuration, storage, hosts, listeners and the periodic housekeeping that ties them.

It knows no plugin: the composition root (`parley.py`) hands it the parts outside the core, the federation
manager, the front ends of other listener kinds (the HTTP API) and the command declarations of the parts
that are not host modules.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from xml.etree.ElementTree import Element

from server.c2s import C2SConnection
from server.commands import Command, CommandTable
from server.component import Components
from server.config import Config, load_config
from server.control import ControlSocket
from server.hooks import Hooks
from server.host import Host
from server.http import HttpServer
from server.limits import AuthThrottle, ConnectionCounter, OutputBudget
from server.metrics import Metrics, Stats
from server.registry import available
from server.router import Router
from server.sessions import Session, SessionDirectory, session_directory
from server.storage import Storage, open_storage
from server.stream.errors import StreamError
from server.tenants import Tenants
from server.tls import TlsContexts, ensure_certificate

if TYPE_CHECKING:
    from server.cluster import Cluster
    from server.config import HostConfig, ListenerConfig
    from server.stanza import Stanza

log = logging.getLogger("parley.server")

KEEPALIVE_INTERVAL = 60.0
SWEEP_INTERVAL = 5.0
FD_RESERVE = 64  # descriptors kept back for the database, logs and certificates
FINISH_TIMEOUT = 30.0  # seconds a shutdown waits for connections to handle what they read
CLOSE_TIMEOUT = 5.0  # seconds a shutdown waits for clients to read what they were sent


def raise_fd_limit() -> int:
    """Raise the soft descriptor limit to the hard one; return the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


class Federation(Protocol):
    """Server-to-server, on the 's2s' listeners: it takes the stanzas to remote domains from the
    'route/remote' event, and stops after the sessions have ended so that their goodbyes still go out."""

    async def start(self, listeners: list[ListenerConfig]) -> None: ...

    async def stop(self) -> None: ...


class Server:
    def __init__(self, config: Config, *, federation: Callable[[Server], Federation] | None = None,
                 commands: Iterable[Command] = (), read_config: Callable[[Path], Config] | None = None,
                 sessions: SessionDirectory | None = None) -> None:
        self.config = config
        # How reload_config and SIGHUP read the configuration file again: as it was read at start.
        self.read_config = read_config or (lambda path: load_config(path, known_modules=available()))
        limits = config.limits
        self.hooks = Hooks()
        self.sessions = sessions if sessions is not None else session_directory(config)
        self.router = Router(self)
        self.hosts: dict[str, Host] = {}
        # Service domains (e.g. conference.example.org) served in-process: domain -> stanza handler.
        self.services: dict[str, Callable[[Stanza], Awaitable[None]]] = {}
        self.storage: Storage = None  # type: ignore[assignment]  # set by start()
        self.tls: TlsContexts | None = None
        self.secret = b""  # set by start(): the key of the salts SCRAM makes up for unknown accounts
        self.connections: set[C2SConnection] = set()
        self.auth_throttle = AuthThrottle(limits.auth_max_failures, lockout=limits.auth_lockout)
        self.ip_counter = ConnectionCounter(limits.max_connections_per_ip)
        self.max_connections = limits.max_connections
        self.listeners: list[asyncio.base_events.Server] = []
        self.s2s: Federation | None = None  # on when an s2s listener is configured
        self._federation = federation
        self.cluster: Cluster | None = None  # set when this is one of several worker processes
        self.commands = CommandTable()  # for parleyctl, the HTTP API and ad-hoc commands
        for declared in commands:
            self.commands.add(declared)
        self.control = ControlSocket(self)  # for parleyctl
        self.http = HttpServer(self)  # the 'http' listeners, where each part adds its paths
        self.stats = Stats()  # counted as stanzas go, for metrics
        self.metrics = Metrics(self)  # /metrics and /health
        self.components = Components(self)  # XEP-0114
        self.tenants = Tenants(self)  # virtual hosts created at run time
        self.started = time.time()
        self._sweeper: asyncio.Task[None] | None = None
        self.finished = asyncio.Event()  # set once stopped for good: `parley serve` exits then
        self._planned: asyncio.TimerHandle | None = None  # a restart or shutdown waiting for its time
        self._acting: asyncio.Task[None] | None = None  # the restart or shutdown under way
        self._ending: set[asyncio.Task[None]] = set()
        self._last_refusal_log = 0.0
        self._gone = asyncio.Event()  # set when a connection goes: stop() waits for all of them
        self.output: OutputBudget[C2SConnection] = OutputBudget(limits.max_output_total)

    async def start(self) -> None:
        config = self.config
        fd_limit = raise_fd_limit()
        if not self.max_connections:
            self.max_connections = max(16, fd_limit - FD_RESERVE)
        self.storage = await open_storage(config.storage.url)
        # Kept in storage, so that a made-up salt stays the same across restarts and the processes of a cluster.
        self.secret = await self.storage.kv.host_secret("", "scram")
        self.metrics.start()
        certs = {}
        for name, hc in config.hosts.items():
            if ensure_certificate(name, hc.certificate, hc.key):
                log.info("generated a self-signed certificate for %s at %s", name, hc.certificate)
            certs[name] = (hc.certificate, hc.key)
        self.tls = TlsContexts(certs)
        for name, hc in config.hosts.items():
            host = Host(self, hc)
            host.load_modules(hc.modules)
            self.hosts[name] = host
        for host in self.hosts.values():
            await host.start()
            self.hooks.notify("host/added", host)
        await self.tenants.start()
        for listener in config.listeners:
            if listener.type == "c2s":
                await self._listen_c2s(listener)
        await self.components.start([listener for listener in config.listeners if listener.type == "component"])
        s2s_listeners = [listener for listener in config.listeners if listener.type == "s2s"]
        if s2s_listeners and self._federation is not None:
            self.s2s = self._federation(self)
            await self.s2s.start(s2s_listeners)
        await self.control.start()
        await self.http.start([listener for listener in config.listeners if listener.type == "http"])
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        await self.hooks.fire("server/started", self)
        log.info("Parley started: hosts %s, connection limit %d", ", ".join(self.hosts), self.max_connections)

    async def add_host(self, config: HostConfig, tenant: bool = True) -> Host:
        """Serve a virtual host from now on, without a restart (a tenant): its certificate for TLS, its modules
        loaded and started with the services they add. Its certificate files must exist; a module that fails
        leaves nothing behind."""
        if config.name in self.hosts or config.name in self.services:
            raise ValueError(f"{config.name} is served already")
        assert self.tls is not None
        self.tls.add(config.name, config.certificate, config.key)
        host = Host(self, config, tenant=tenant)
        self.hosts[config.name] = host
        try:
            host.load_modules(config.modules)
            await host.start()
        except BaseException:
            del self.hosts[config.name]
            await host.stop()
            self.tls.remove(config.name)
            raise
        self.hooks.notify("host/added", host)
        return host

    async def remove_host(self, name: str, reason: str) -> None:
        """Stop serving a virtual host: new streams to it meet 'host-unknown', its clients' streams end with
        'host-gone' (their sessions end as on any logout, the modules still loaded), then its modules stop
        and the services they added go."""
        host = self.hosts.pop(name)
        for conn in list(self.connections):
            if conn.host is host and conn.session is None:
                conn.stream_error(StreamError("host-gone", reason))
        for session in self.sessions.all():
            if session.host is host:
                session.close("host-gone")
                await self.end_session(session)
        await asyncio.gather(*self._ending, return_exceptions=True)
        await host.stop()
        if self.tls is not None:
            self.tls.remove(name)

    async def _listen_c2s(self, listener: ListenerConfig) -> None:
        loop = asyncio.get_running_loop()
        direct = listener.tls == "direct"
        ssl = self.tls.direct_tls_context(["xmpp-client"]) if direct else None
        handshake_timeout = self.config.limits.unauthenticated_timeout if direct else None
        srv = await loop.create_server(lambda: C2SConnection(self, direct), listener.address, listener.port,
                                       ssl=ssl, reuse_address=True, backlog=1024,
                                       reuse_port=self.config.cluster.workers > 1,
                                       ssl_handshake_timeout=handshake_timeout)
        self.listeners.append(srv)
        log.info("listening for clients on %s:%d (%s)", listener.address, listener.port, listener.tls)

    async def stop(self) -> None:
        """Graceful shutdown: stop accepting and reading, handle what clients sent already (delivered or
        stored), tell every client 'system-shutdown' and give the streams time to take what they were sent,
        end the sessions (what never reached a client goes back to offline storage), then stop modules."""
        if self._planned is not None:
            self._planned.cancel()
        await self.control.stop()
        # Parts that hold HTTP requests open (BOSH) answer them first: the HTTP server waits for every request.
        await self.hooks.fire_all("server/stopping", self)
        await self.http.stop()
        self.metrics.stop()
        for srv in self.listeners:
            srv.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        await self.tenants.stop()
        sessions = [conn for conn in self.connections if conn.session is not None]  # the rest has nothing to lose
        if sessions:
            _, late = await asyncio.wait([asyncio.ensure_future(conn.finish()) for conn in sessions],
                                         timeout=FINISH_TIMEOUT)
            if late:
                log.warning("%d connections were still handling what they read after %g s", len(late),
                            FINISH_TIMEOUT)
        for conn in list(self.connections):
            conn.stream_error(StreamError("system-shutdown"))
        self.components.stop()
        await self._connections_gone(CLOSE_TIMEOUT)
        for session in self.sessions.all():
            await self.end_session(session)
        # Sessions whose connections dropped meanwhile still need their modules to say goodbye.
        await asyncio.gather(*self._ending, return_exceptions=True)
        if self.s2s is not None:
            await self.s2s.stop()
        for host in self.hosts.values():
            await host.stop()
        if self.storage is not None:
            await self.storage.close()
        log.info("Parley stopped")

    async def _connections_gone(self, timeout: float) -> None:
        """Wait until the closing connections have written what they hold, then cut those that do not read."""
        deadline = time.monotonic() + timeout
        while self.connections and time.monotonic() < deadline:
            self._gone.clear()
            try:
                await asyncio.wait_for(self._gone.wait(), deadline - time.monotonic())
            except TimeoutError:
                break
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()

    def hold_output(self, conn: C2SConnection, size: int) -> None:
        """Close the connections holding the most output once all together hold more than the budget."""
        for over in self.output.held(conn, size):
            # The server lacks the memory to serve it (RFC 6120 4.9.3.17), though it may read slowly, not never.
            over.cut("resource-constraint",
                     f"clients hold more than {self.output.total} bytes of output unread (this one {over.unsent()})")

    def forget(self, conn: C2SConnection) -> None:
        """A connection is gone."""
        self.connections.discard(conn)
        self.output.held(conn, 0)
        self._gone.set()

    def plan(self, restart: bool, delay: float = 0.0) -> None:
        """Restart or shut down in `delay` seconds, outside the code that asks (an admin's command is answered
        first, a signal handler cannot wait); a new plan replaces one still waiting."""
        if self._planned is not None:
            self._planned.cancel()
        self._planned = asyncio.get_running_loop().call_later(delay, self._carry_out, restart)

    def _carry_out(self, restart: bool) -> None:
        self._planned = None
        if self._acting is None or self._acting.done():
            self._acting = asyncio.get_running_loop().create_task(self.restart() if restart else self.shutdown())

    async def restart(self) -> None:
        """Stop, then start again in this process on the same configuration: storage reopened, modules loaded
        afresh (their state read back from storage), listeners bound again. The configuration file is not
        read again."""
        await self.stop()
        self.hosts.clear()
        self.listeners.clear()
        self.s2s = None
        await self.start()
        log.info("Parley restarted")

    async def shutdown(self) -> None:
        await self.stop()
        self.finished.set()

    def admit(self, conn: C2SConnection) -> bool:
        """Refuse a connection past the descriptor budget or the per-address limit, keeping the rest served."""
        if len(self.connections) >= self.max_connections:
            self._log_refusal("connection limit (%d) reached: refusing %s", self.max_connections, conn.remote_ip)
            return False
        if not self.ip_counter.acquire(conn.remote_ip):
            self._log_refusal("too many connections from %s: refusing", conn.remote_ip)
            return False
        return True

    def _log_refusal(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last_refusal_log > 1.0:
            self._last_refusal_log = now
            log.warning(msg, *args)

    def fire_features(self, conn: C2SConnection, features: Element, stage: str) -> None:
        conn.host.hooks.notify("c2s/features", conn, features, stage)

    def end_session_soon(self, session: Session) -> None:
        """End a session from synchronous code (a lost connection); stop() waits for these."""
        self._soon(self.end_session(session))

    def _soon(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)

    async def end_session(self, session: Session) -> None:
        if session.ended:
            return
        session.ended = True
        session.closed = True
        if self.sessions.get(session.jid) is session:
            self.sessions.remove(session)
        await session.host.hooks.fire_all("session/closed", session)
        await self._hand_on(session)
        session.flushed = True

    def hand_on_soon(self, session: Session) -> None:
        """Hand on what was sent to a session after it ended (a module that still held it)."""
        self._soon(self._hand_on(session))

    async def _hand_on(self, session: Session) -> None:
        """Give what never reached the client to 'session/undelivered' (session, stanzas), oldest first: the
        offline module sends messages to another resource or back to offline storage, and refuses iqs."""
        while session.undelivered:
            stanzas = list(session.undelivered)
            session.undelivered.clear()
            try:
                await session.host.hooks.fire("session/undelivered", session, stanzas)
            except Exception:
                log.exception("error while handing on what %s did not get", session.jid)

    async def _sweep(self) -> None:
        """Whitespace keepalives and the unauthenticated-connection timeout, for all connections at once."""
        timeout = self.config.limits.unauthenticated_timeout
        interval = min(SWEEP_INTERVAL, timeout / 2)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for conn in list(self.connections):
                if conn.session is None and now - conn.created > timeout:
                    conn.stream_error(StreamError("connection-timeout", "authenticate and bind sooner"))
                elif now - conn.last_write > KEEPALIVE_INTERVAL:
                    conn.write(" ")
