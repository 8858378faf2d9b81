"""`parleyctl`: ejabberdctl's command line for Parley, so that admins' shell habits and scripts carry over.

`parleyctl COMMAND ARG...` takes ejabberdctl's command names and positional arguments, runs the command
in the running server through its control socket (found through the same configuration as
`parley serve`), and prints the result as ejabberdctl does: lists one item a line, records tab-separated.
Exit codes: 0 done, 1 refused or a negative answer (check_account of a missing account), 2 a bad
configuration, 3 the server is not running.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from server.commands import Command, load
from server.config import ConfigError, load_config
from server.control import find, socket_path
from server.registry import available

NOT_RUNNING = 3
RESPONSE_TIMEOUT = 300.0  # seconds: a command may have much to do (unregister with a large archive)


class NotRunning(Exception):
    """The control socket does not answer."""


def request(path: Path, command: str, args: dict[str, str]) -> dict[str, Any]:
    """Send one request to the control socket and read its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(RESPONSE_TIMEOUT)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise NotRunning(f"Parley is not running: no server answers on {path} ({exc.strerror})") from None
        sock.sendall(json.dumps({"command": command, "args": args}).encode() + b"\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return json.loads(data)


def render(command: Command, result: dict[str, Any]) -> list[str]:
    """The lines ejabberdctl prints for a result."""
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
    """`parleyctl help COMMAND`: what ejabberdctl shows, with arguments in order."""
    args = "\n             ".join(f"{a.name}::binary" for a in command.args)
    spec = command.result[0] if command.result else None
    if command.returns in ("list", "records") and spec is not None:
        item = "string" if command.returns == "list" else "{ " + ", ".join(f"{f}::string" for f in spec.fields) + " }"
        returns = f"{spec.name}::[ {item} ]"
    else:
        returns = f"{spec.name if spec else 'res'}::{command.returns}"
    return (f"  Command Name: {command.name}\n\n  Arguments: {args}\n\n  Returns: {returns}\n\n"
            f"  Description: {command.title}\n")


def overview() -> str:
    names = sorted(c.name for c in load().values() if not c.adhoc)
    width = max(map(len, names))
    lines = [f"  {name.ljust(width)}  {load()[name].title}" for name in names]
    return ("Usage: parleyctl [--config FILE] COMMAND [ARGUMENT...]\n\nAvailable commands:\n" + "\n".join(lines) +
            "\n\nparleyctl help COMMAND shows the arguments of a command.\n")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parleyctl", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="the server's TOML configuration file (default: built-in, ./parley-data)")
    parser.add_argument("command", nargs="?", help="a command; 'help' lists them")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its arguments, in ejabberdctl's order")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in (None, "help"):
        topic = find(args.args[0]) if args.command and args.args else None
        if args.command and args.args and topic is None:
            print(f"Error: unknown command '{args.args[0]}'", file=sys.stderr)
            return 1
        print(describe(topic) if topic else overview(), end="")
        return 0
    command = find(args.command)
    if command is None:
        print(f"Error: unknown command '{args.command}'; parleyctl help lists them", file=sys.stderr)
        return 1
    missing = len(command.args) - len(args.args)
    if missing:
        print(describe(command), file=sys.stderr)
        print(f"Error: the command '{command.name}' requires {abs(missing)} {'more' if missing > 0 else 'less'} "
              f"argument{'s' if abs(missing) > 1 else ''}.", file=sys.stderr)
        return 1
    try:
        config = load_config(Path(args.config) if args.config else None, known_modules=available())
        # The server may run elsewhere than here: paths are the ones the admin means, from this folder.
        given = {a.name: os.path.abspath(v) if a.type == "path" else v
                 for a, v in zip(command.args, args.args, strict=True)}
        answer = request(socket_path(config), command.name, given)
    except ConfigError as exc:
        print(f"parleyctl: {exc}", file=sys.stderr)
        return 2
    except NotRunning as exc:
        print(f"parleyctl: {exc}", file=sys.stderr)
        return NOT_RUNNING
    if "error" in answer:
        print(f"Error: {answer['error']}", file=sys.stderr)
        return 1
    for line in render(command, answer["result"]):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
