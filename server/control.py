"""The control socket: `parleyctl` reaches the running server through it, as ejabberdctl reaches its node.

A Unix socket in the data folder that only the server's own user may open (mode 0600): whoever opens it is
the server's operator and runs commands on every host. One JSON request per connection,
{"command": NAME, "args": {ARGUMENT: VALUE}}, and one JSON answer, made by `execute` as for the HTTP API.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.commands import Command, CommandError, Conflict, Context, NegativeAnswer, load

if TYPE_CHECKING:
    from server.config import Config
    from server.server import Server

log = logging.getLogger("parley.control")

SOCKET_NAME = "parleyctl.sock"
MAX_REQUEST = 1 << 20  # bytes: a send_stanza with a large payload fits, a runaway client does not
REQUEST_TIMEOUT = 10.0  # seconds to send the request; running the command is not limited
MAX_SOCKET_PATH = 107  # bytes in sockaddr_un.sun_path, without the final NUL


def socket_path(config: Config) -> Path:
    return config.data_dir / SOCKET_NAME


def find(name: str) -> Command | None:
    """A command the CLI and HTTP API offer: the ejabberd-shaped ones (the others are ad-hoc commands)."""
    command = load().get(name)
    return command if command is not None and not command.adhoc else None


async def execute(command: Command, ctx: Context, given: dict[str, Any]) -> dict[str, Any]:
    """Parse and run a command for a front end that answers with data: {'result': {...}}, or
    {'error': MESSAGE, 'kind': KIND} where KIND is 'error', 'negative', 'conflict' or 'internal'."""
    try:
        return {"result": await command.run(ctx, command.parse(given))}
    except NegativeAnswer as exc:
        return {"error": str(exc), "kind": "negative"}
    except Conflict as exc:
        return {"error": str(exc), "kind": "conflict"}
    except CommandError as exc:
        return {"error": str(exc), "kind": "error"}
    except Exception:
        log.exception("command %s failed", command.name)
        return {"error": f"{command.name} failed on the server; its log says why", "kind": "internal"}


class ControlSocket:
    def __init__(self, server: Server) -> None:
        self.server = server
        self.path = socket_path(server.config)
        self._listener: asyncio.base_events.Server | None = None
        self._inode: int | None = None

    async def start(self) -> None:
        if len(os.fsencode(self.path)) > MAX_SOCKET_PATH:
            log.error("no control socket: its path %s is longer than Unix sockets allow; parleyctl cannot "
                      "reach this server", self.path)
            return
        # Made under another name and renamed once private, so nobody connects while it is still open to all.
        staging = self.path.with_name(f".{SOCKET_NAME}.{os.getpid()}")
        staging.unlink(missing_ok=True)
        self._listener = await asyncio.start_unix_server(self._serve, path=str(staging), limit=MAX_REQUEST)
        staging.chmod(0o600)
        staging.replace(self.path)
        self._inode = self.path.stat().st_ino
        log.info("control socket for parleyctl at %s", self.path)

    async def stop(self) -> None:
        if self._listener is None:
            return
        self._listener.close()
        self._listener = None
        try:
            if self.path.stat().st_ino == self._inode:  # not a newer server's socket
                self.path.unlink()
        except FileNotFoundError:
            pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT)
            answer = await self.answer(line)
        except (ValueError, TimeoutError) as exc:  # too long, or too slow
            answer = {"error": f"bad request: {exc or 'too slow'}", "kind": "error"}
        try:
            writer.write(json.dumps(answer, default=str).encode() + b"\n")
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def answer(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
            name, args = request["command"], request.get("args", {})
        except (ValueError, TypeError, KeyError):
            return {"error": 'bad request: send {"command": NAME, "args": {...}} on one line', "kind": "error"}
        command = find(name) if isinstance(name, str) else None
        if command is None or not isinstance(args, dict):
            return {"error": f"unknown command {name!r}", "kind": "error"}
        host = next(iter(self.server.hosts.values()))
        answer = await execute(command, Context(host, host.jid, operator=True), args)
        if "result" in answer:
            log.info("parleyctl ran %s", command.name)
        return answer
