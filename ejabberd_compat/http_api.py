"""ejabberd's HTTP API (mod_http_api) on the `http` listeners: `POST /api/COMMAND` with a JSON object of
ejabberd's argument names, answered with ejabberd's JSON result shapes, so that existing scripts work.

Callers come from the allowed networks only (`[http_api] allowed_networks`, loopback by default) and
authenticate with HTTP Basic as an admin (JID and password, checked against the stored SCRAM keys, with
the same throttling of failures as client logins) or with the bearer token of `[http_api] token`, which
acts for the server's operator on every host. An admin reaches only the hosts it administers.
Refusals: 401 (no or wrong credentials), 403 (outside the allowed networks, or not an admin), 404
(unknown command), 400 (bad arguments or a refused command), 409 (exists already); never a traceback.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web

from server.accounts import password_matches
from server.commands import Command, Context
from server.control import execute, find
from server.http import within
from server.jid import JID, JIDError
from server.stream.writer import not_xml

if TYPE_CHECKING:
    from server.server import Server

log = logging.getLogger("parley.http_api")

REALM = 'Basic realm="Parley HTTP API"'
CONFLICT_CODE = 10090  # ejabberd's code for "already registered"


def _refusal(status: int, code: int, message: str, **headers: str) -> web.HTTPException:
    """ejabberd's error object: {"status": "error", "code": N, "message": TEXT}."""
    body = json.dumps({"status": "error", "code": code, "message": message})
    error = web.HTTPException(text=body, content_type="application/json", headers=headers)
    error.set_status(status)
    return error


def shape(command: Command, result: dict[str, Any]) -> Any:
    """The JSON ejabberd answers for a result of each kind."""
    if command.returns == "rescode":
        return 0
    value = result.get(command.result[0].name) if command.result else None
    if command.returns in ("string", "integer"):
        return {command.result[0].name: value}
    if command.returns == "list":
        return [str(v) for v in value or ()]
    return value if value is not None else ""


class HttpApi:
    """`POST /api/COMMAND` on the server's HTTP listeners."""

    PATH = "/api/"

    def __init__(self, server: Server) -> None:
        self.server = server
        self.settings = server.config.http_api
        server.http.add("POST", self.PATH, self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        try:
            return await self._handle(request)
        except web.HTTPException:
            raise
        except Exception:
            log.exception("HTTP API request %s failed", request.path)
            raise _refusal(500, 50, "internal error; the server's log says why") from None

    async def _handle(self, request: web.Request) -> web.Response:
        self._check_network(self.server.http.peer(request).address)  # the client, behind a trusted proxy too
        ctx = await self._caller(request)
        command = find(self.server.commands, request.path[len(self.PATH):])
        if command is None:
            raise _refusal(404, 40, "Endpoint not found.")
        if not ctx.operator and not command.allowed(ctx.host, ctx.actor):
            raise _refusal(403, 32, f"{ctx.actor} may not run {command.name}")
        answer = await execute(command, ctx, await self._arguments(request))
        if "result" in answer:
            log.info("%s ran %s over HTTP", ctx.actor, command.name)
            return web.json_response(shape(command, answer["result"]))
        kind, message = answer["kind"], answer["error"]
        if kind == "negative":
            return web.json_response(1)
        if kind == "conflict":
            raise _refusal(409, CONFLICT_CODE, message)
        if kind == "forbidden":
            raise _refusal(403, 32, message)
        if kind == "internal":
            raise _refusal(500, 50, message)
        return web.json_response(message, status=400)

    def _check_network(self, remote: str) -> None:
        if not within(remote, self.settings.allowed_networks):
            raise _refusal(403, 32, "the API is not open to your address")

    async def _caller(self, request: web.Request) -> Context:
        """Who calls: the operator (bearer token) or an admin (Basic); anyone else is refused."""
        scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
        throttle, key = self.server.auth_throttle, f"http {self.server.http.peer(request).address}"
        if throttle.blocked_for(key):
            raise _refusal(401, 31, "too many failed attempts; try again later", **{"WWW-Authenticate": REALM})
        scheme = scheme.lower()
        if scheme == "bearer" and self.settings.token and \
                hmac.compare_digest(credentials.strip().encode(), self.settings.token.encode()):
            host = next(iter(self.server.hosts.values()))
            return Context(host, host.jid, operator=True)
        if scheme == "basic":
            admin = await self._admin(credentials.strip())
            if admin is not None:
                throttle.succeeded(key)
                return admin
        if scheme in ("basic", "bearer"):
            throttle.failed(key)
            raise _refusal(401, 31, "wrong credentials", **{"WWW-Authenticate": REALM})
        raise _refusal(401, 31, "authentication required: HTTP Basic with an admin's JID and password, or the "
                                "bearer token", **{"WWW-Authenticate": REALM})

    async def _admin(self, credentials: str) -> Context | None:
        """The context of the account the Basic credentials name, if the password is right (403 if not an admin)."""
        try:
            user, _, password = base64.b64decode(credentials, validate=True).decode().partition(":")
            jid = JID.parse(user)
        except (binascii.Error, UnicodeDecodeError, JIDError):
            return None
        host = self.server.hosts.get(jid.domain)
        if host is None or jid.local is None or jid.resource is not None or \
                not await password_matches(self.server.storage, host.name, jid.local, password):
            return None
        if not host.is_admin(jid):
            raise _refusal(403, 32, f"{jid} is not an admin")
        return Context(host, jid)

    async def _arguments(self, request: web.Request) -> dict[str, Any]:
        body = await request.read()
        try:
            given = json.loads(body) if body.strip() else {}
        except ValueError:
            raise _refusal(400, 10, "the body is not JSON") from None
        if not isinstance(given, dict) or not all(isinstance(v, str | int | float) for v in given.values()):
            raise _refusal(400, 10, 'the body must be a JSON object of arguments: {"name": "value", ...}')
        for name, value in given.items():
            if isinstance(value, str) and (char := not_xml(value)):
                raise _refusal(400, 10, f"argument {name} contains {char}, a character XML does not allow")
        return given
