"""The control socket: `parleyctl` reaches the running server through it, as ejabberdctl reaches its node.

A Unix socket in the data folder that only the server's own user may open (mode 0600): whoever opens it is
the server's operator and runs commands on every host. One JSON request per connection, the command line
and the folder it was typed in, {"argv": [COMMAND, ARG...], "cwd": PATH}; one JSON answer, what parleyctl
prints and its exit code, {"out": TEXT, "err": TEXT, "exit": N}. The server does the work, help included,
so that parleyctl itself imports next to nothing and starts fast, as scripts call it once per command.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.commands import Command, CommandError, CommandTable, Conflict, Context, Forbidden, NegativeAnswer

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


def server_running(config: Config) -> bool:
    """True when a server answers on the control socket of this configuration's data folder."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(socket_path(config)))
        except OSError:
            return False
    return True


def find(commands: CommandTable, name: str) -> Command | None:
    """A command the CLI and HTTP API offer: the ejabberd-shaped ones (the others are ad-hoc commands or
    building blocks)."""
    command = commands.get_ctl(name)
    return command if command is not None and command.offered else None


async def execute(command: Command, ctx: Context, given: dict[str, Any]) -> dict[str, Any]:
    """Parse and run a command for a front end that answers with data: {'result': {...}}, or
    {'error': MESSAGE, 'kind': KIND} where KIND is 'error', 'negative', 'conflict', 'forbidden' or 'internal'."""
    try:
        return {"result": await command.run(ctx, command.parse(given))}
    except NegativeAnswer as exc:
        return {"error": str(exc), "kind": "negative"}
    except Conflict as exc:
        return {"error": str(exc), "kind": "conflict"}
    except Forbidden as exc:
        return {"error": str(exc), "kind": "forbidden"}
    except CommandError as exc:
        return {"error": str(exc), "kind": "error"}
    except Exception:
        log.exception("command %s failed", command.name)
        return {"error": f"{command.name} failed on the server; its log says why", "kind": "internal"}


def render(command: Command, result: dict[str, Any]) -> list[str]:
    """The lines ejabberdctl prints for a result: lists one item a line, records tab-separated."""
    if not command.result:
        return []
    spec = command.result[0]
    value = result.get(spec.name)
    if command.returns == "list":
        return [str(v) for v in value or ()]
    if command.returns == "records":
        return ["\t".join(str(record[f]) for f in spec.fields) for record in value or ()]
    return [str(value)] if value not in (None, "") else []


def describe(command: Command) -> str:
    """`parleyctl help COMMAND`: what ejabberdctl shows, the arguments in their order."""
    args = "\n             ".join(f"{a.name}::binary" for a in command.args)
    spec = command.result[0] if command.result else None
    if command.returns in ("list", "records") and spec is not None:
        item = "string" if command.returns == "list" else "{ " + ", ".join(f"{f}::string" for f in spec.fields) + " }"
        returns = f"{spec.name}::[ {item} ]"
    else:
        returns = f"{spec.name if spec else 'res'}::{command.returns}"
    return (f"  Command Name: {command.name}\n\n  Arguments: {args}\n\n  Returns: {returns}\n\n"
            f"  Description: {command.title}\n")


def overview(table: CommandTable) -> str:
    commands = sorted((c for c in table if c.offered and not c.adhoc), key=lambda c: c.name)
    width = max(len(c.name) for c in commands)
    lines = "".join(f"  {c.name.ljust(width)}  {c.title}\n" for c in commands)
    return (f"Usage: parleyctl [--config FILE] COMMAND [ARGUMENT...]\n\nAvailable commands:\n{lines}\n"
            "parleyctl help COMMAND shows the arguments of a command.\n")


def _output(exit: int = 0, out: str = "", err: str = "") -> dict[str, Any]:
    return {"exit": exit, "out": out, "err": err}


async def respond(argv: list[str], cwd: str, ctx: Context) -> dict[str, Any]:
    """Run an ejabberdctl command line: what parleyctl prints, and its exit code."""
    table = ctx.host.server.commands
    if not argv or argv[0] == "help":
        topic = find(table, argv[1]) if len(argv) > 1 else None
        if len(argv) > 1 and topic is None:
            return _output(1, err=f"Error: unknown command '{argv[1]}'\n")
        return _output(out=describe(topic) if topic else overview(table))
    command = find(table, argv[0])
    if command is None:
        return _output(1, err=f"Error: unknown command '{argv[0]}'; parleyctl help lists them\n")
    missing = len(command.args) - len(argv[1:])
    if missing:
        return _output(1, err=f"{describe(command)}\nError: the command '{command.name}' requires {abs(missing)} "
                              f"{'more' if missing > 0 else 'less'} argument{'s' if abs(missing) > 1 else ''}.\n")
    # Paths are the ones the admin means: relative to the folder parleyctl runs in, not the server's.
    given = {a.name: os.path.join(cwd, v) if a.type == "path" else v
             for a, v in zip(command.args, argv[1:], strict=True)}
    answer = await execute(command, ctx, given)
    if "error" in answer:
        return _output(1, err=f"Error: {answer['error']}\n")
    log.info("parleyctl ran %s", command.name)
    return _output(out="".join(f"{line}\n" for line in render(command, answer["result"])))


class ControlSocket:
    def __init__(self, server: Server) -> None:
        self.server = server
        self.path = socket_path(server.config)
        self._listener: asyncio.base_events.Server | None = None
        self._inode: int | None = None
        self._reloads: set[asyncio.Task[None]] = set()

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
            answer = _output(1, err=f"Error: bad request: {exc or 'too slow'}\n")
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
            argv, cwd = request["argv"], request["cwd"]
        except (ValueError, TypeError, KeyError):
            argv = cwd = None
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv) or not isinstance(cwd, str):
            return _output(1, err='Error: bad request: send {"argv": [COMMAND, ARG...], "cwd": PATH} on one line\n')
        return await respond(argv, cwd, self._operator())

    def _operator(self) -> Context:
        host = next(iter(self.server.hosts.values()))
        return Context(host, host.jid, operator=True)

    def reload_soon(self) -> None:
        """SIGHUP (what `systemctl reload` sends): reload the configuration as `parleyctl reload_config` does,
        with the outcome in the log; a signal handler cannot wait for it."""
        task = asyncio.get_running_loop().create_task(self._reload())
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def _reload(self) -> None:
        command = self.server.commands.get("reload-configuration")
        if not self.server.hosts or command is None:
            log.warning("SIGHUP ignored: %s", "reload_config is not installed" if command is None
                        else "the server is starting or stopping")
            return
        answer = await execute(command, self._operator(), {})
        if "error" in answer:
            log.error("SIGHUP: configuration not reloaded: %s", answer["error"])
        else:
            log.info("SIGHUP: configuration reloaded from %s", self.server.config.source)
