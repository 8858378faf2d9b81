"""The HTTP server of the `http` listeners: one aiohttp application that every part adds its paths to.

The HTTP API, the web transports (WebSocket, BOSH), host-meta, file uploads and metrics all share the
listeners an admin configures, as Prosody's modules share mod_http. A part adds a handler for a method
and a path (`add`, or `Module.add_http` from a host module) and gets back how to remove it, so a module
that unloads takes its paths along. Paths are kept in a table of our own rather than in aiohttp's router,
which freezes once the application runs: modules come and go while the server runs. A path ending in
'/' serves everything below it; the longest match wins, an exact one before any prefix. A path may be
served for one virtual host only (its name in the request's Host header, as /.well-known/host-meta is
per domain), which wins over the same path served for every host.

Behind a reverse proxy every request comes from the proxy's address: `peer(request)` gives the client's
address and whether it used TLS, read from X-Forwarded-For/Forwarded and X-Forwarded-Proto only when the
request comes from one of the `trusted_proxies` (anyone else could write those headers), so that
per-address limits, throttling and logs see the client, and a proxy that terminated TLS counts as TLS.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aiohttp import web

    from server.config import ListenerConfig
    from server.server import Server

    Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

log = logging.getLogger("parley.http")
MAX_BODY = 1 << 20  # what a handler may read at once with request.read()/json(); uploads stream instead


@dataclass(frozen=True)
class Peer:
    """Who sent a request: the client's address, and whether its connection to us or to our proxy is TLS."""

    address: str
    secure: bool


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address as X-Forwarded-For and Forwarded write it: bare, "[v6]:port", "v4:port", quoted or not."""
    text = text.strip().strip('"')
    if text.startswith("["):
        text = text[1:].split("]", 1)[0]
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


def within(address: str, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    """Whether a client's address (as `Peer.address` holds it) is in one of `networks`; an IPv4-mapped IPv6
    address counts as the IPv4 one, as a dual-stack listener reports IPv4 clients."""
    ip = _ip(address)
    if ip is not None and ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip is not None and any(ip in network for network in networks)


def _forwarded(request: web.Request) -> tuple[list[str], str | None]:
    """The addresses the proxies name, the client's first, and the protocol the nearest proxy was reached
    over: from Forwarded (RFC 7239) if present, else X-Forwarded-For and X-Forwarded-Proto."""
    if "Forwarded" in request.headers:
        hops = [dict(pair.strip().split("=", 1) for pair in element.split(";") if "=" in pair)
                for element in ",".join(request.headers.getall("Forwarded")).split(",")]
        hops = [{key.strip().lower(): value.strip('"') for key, value in hop.items()} for hop in hops]
        return [hop.get("for", "") for hop in hops], hops[-1].get("proto") if hops else None
    chain = [a for a in ",".join(request.headers.getall("X-Forwarded-For", [])).split(",") if a.strip()]
    protos = [p.strip() for p in request.headers.get("X-Forwarded-Proto", "").split(",") if p.strip()]
    return chain, protos[-1].lower() if protos else None


class HttpServer:
    def __init__(self, server: Server) -> None:
        self.server = server
        # (host or None for every host, path) -> method -> handler
        self._routes: dict[tuple[str | None, str], dict[str, Handler]] = {}
        # (host, path, method) -> (the module name that shares it, how many of its instances hold it)
        self._shared: dict[tuple[str | None, str, str], tuple[str, int]] = {}
        self._runner: web.AppRunner | None = None

    def add(self, method: str, path: str, handler: Handler, host: str | None = None,
            shared_by: str | None = None) -> Callable[[], None]:
        """Serve `method` requests to `path` (everything below it if it ends in '/'), for the virtual host
        `host` or for all; returns the undo.

        `shared_by` names a module that several hosts load (the WebSocket endpoint, which finds the host in
        the stream it carries): its instances share the path, served by the first, until the last lets go."""
        if not path.startswith("/"):
            raise ValueError(f"an HTTP path starts with '/': {path!r}")
        key = (host, path, method)
        owner, holders = self._shared.get(key, (None, 0))
        methods = self._routes.setdefault((host, path), {})
        if method in methods and (shared_by is None or owner != shared_by):
            raise ValueError(f"{method} {path} is served already" + (f" for {host}" if host else ""))
        methods.setdefault(method, handler)
        if shared_by is not None:
            self._shared[key] = (shared_by, holders + 1)

        def remove() -> None:
            if key in self._shared:
                owner, holders = self._shared.pop(key)
                if holders > 1:
                    self._shared[key] = (owner, holders - 1)
                    return
            methods.pop(method, None)
            if not methods:
                self._routes.pop((host, path), None)
        return remove

    def _trusted(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bool:
        return address is not None and any(address in net for net in self.server.config.trusted_proxies)

    def peer(self, request: web.Request) -> Peer:
        """The client behind `request`: the peer itself, or, when the peer is a trusted proxy, the nearest
        address its forwarding headers name that is not a trusted proxy too."""
        direct = request.transport is not None and request.transport.get_extra_info("sslcontext") is not None
        address = request.remote or ""
        if not self._trusted(_ip(address)):
            return Peer(address, direct)
        chain, proto = _forwarded(request)
        for hop in reversed(chain):
            ip = _ip(hop)
            if ip is None:
                break  # an obfuscated or unknown hop: the last address known is as far as we can see
            address = str(ip)
            if not self._trusted(ip):
                break
        return Peer(address, direct or proto == "https")

    def base_url(self, configured: str | None, name: str) -> str:
        """Where clients reach the http listeners, for the links a module hands out (uploads, invitations,
        unsubscribe links): the operator's `configured` URL (behind a proxy), else the first http listener,
        named `name` when it listens on every address; `https://name` when there is no http listener."""
        if configured:
            return configured.rstrip("/")
        listener = next((li for li in self.server.config.listeners if li.type == "http"), None)
        if listener is None:
            return f"https://{name}"
        address = listener.address
        if address in ("0.0.0.0", "::", ""):
            address = name
        elif ":" in address:
            address = f"[{address}]"
        return f"{'https' if listener.tls == 'direct' else 'http'}://{address}:{listener.port}"

    def _match(self, host: str, path: str) -> dict[str, Handler] | None:
        for key in ((host, path), (None, path)):
            if key in self._routes:
                return self._routes[key]
        prefixes = [(h, p) for h, p in self._routes if h in (host, None) and p.endswith("/") and path.startswith(p)]
        return self._routes[max(prefixes, key=lambda k: (len(k[1]), k[0] is not None))] if prefixes else None

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import web

        methods = self._match(request.host.rsplit(":", 1)[0].lower(), request.path)
        if methods is None:
            raise web.HTTPNotFound()
        handler = methods.get(request.method) or (methods.get("GET") if request.method == "HEAD" else None)
        if handler is None:
            raise web.HTTPMethodNotAllowed(request.method, sorted(methods))
        return await handler(request)

    async def start(self, listeners: list[ListenerConfig]) -> None:
        if not listeners:
            return
        # aiohttp (some 25 MiB of resident memory with its client, resolver and yarl) is loaded only by a
        # server with an http listener: the paths above are only recorded until then.
        from aiohttp import web

        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        app.on_shutdown.append(self._stopping)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        for listener in listeners:
            ssl = self.server.tls.direct_tls_context(["http/1.1"]) if listener.tls == "direct" else None
            # Several workers share the port, as they share the c2s ones: each request is a client's like any
            # other (a BOSH session's requests reaching another member are passed to the one holding it).
            await web.TCPSite(self._runner, listener.address, listener.port, ssl_context=ssl, reuse_address=True,
                              reuse_port=self.server.config.cluster.workers > 1).start()
            log.info("HTTP on %s:%d (%s): %s", listener.address, listener.port, listener.tls,
                     ", ".join(sorted({path for _, path in self._routes})) or "no paths yet")

    async def _stopping(self, _: web.Application) -> None:
        """Before aiohttp waits for its handlers to return: 'http/stopping' (server-wide) lets the parts whose
        handlers never return on their own (a WebSocket's) end them, with what their protocol says then."""
        await self.server.hooks.fire_all("http/stopping")

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
