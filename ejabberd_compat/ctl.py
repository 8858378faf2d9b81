"""`parleyctl`: ejabberdctl's command line for Parley, so that admins' shell habits and scripts carry over.

`parleyctl COMMAND ARG...` takes ejabberdctl's command names and positional arguments and has the running
server run the command through its control socket (found through the same configuration as `parley
serve`); it prints what the server answers, as ejabberdctl does: lists one item a line, records
tab-separated. Exit codes: 0 done, 1 refused or a negative answer (check_account of a missing account),
2 a bad configuration, 3 the server is not running.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from ejabberd_compat.config import load_any_config
from server.config import CONFIG_ENV, SYSTEM_CONFIG, ConfigError, config_option, find_config
from server.control import socket_path
from server.registry import available

NOT_RUNNING = 3
RESPONSE_TIMEOUT = 300.0  # seconds: a command may have much to do (unregister with a large archive)


class NotRunning(Exception):
    """The control socket does not answer."""


def request(path: Path, argv: list[str], timeout: float | None = RESPONSE_TIMEOUT) -> dict[str, Any]:
    """Send a command line to the control socket and read the answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise NotRunning(f"Parley is not running: no server answers on {path} ({exc.strerror})") from None
        sock.sendall(json.dumps({"argv": argv, "cwd": os.getcwd()}).encode() + b"\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return json.loads(data)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parleyctl", description=__doc__.splitlines()[0])
    parser.add_argument("--config", metavar="FILE",
                        help=f"the server's configuration, as given to `parley serve`: TOML or an ejabberd.yml, "
                             f"before or after the command (default: ${CONFIG_ENV}, else {SYSTEM_CONFIG} if it "
                             f"exists, else built-in: ./parley-data)")
    # ejabberdctl's options, so that its scripts run unchanged; the configuration names the server here.
    parser.add_argument("--node", help="ignored (ejabberdctl's Erlang node)")
    parser.add_argument("--no-timeout", action="store_true",
                        help=f"wait for the answer longer than {RESPONSE_TIMEOUT:g} s")
    parser.add_argument("command", nargs="?", default="help", help="a command; 'help' lists them")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its arguments, in ejabberdctl's order")
    return parser


def main(argv: list[str] | None = None) -> int:
    given, argv = config_option(sys.argv[1:] if argv is None else argv)  # also after the command's arguments
    args = _parser().parse_args(argv)
    try:
        config, _ = load_any_config(find_config(given), known_modules=available())
        answer = request(socket_path(config), [args.command, *args.args], None if args.no_timeout else RESPONSE_TIMEOUT)
    except ConfigError as exc:
        print(f"parleyctl: {exc}", file=sys.stderr)
        return 2
    except NotRunning as exc:
        print(f"parleyctl: {exc}", file=sys.stderr)
        return NOT_RUNNING
    sys.stdout.write(answer["out"])
    sys.stderr.write(answer["err"])
    return int(answer["exit"])


if __name__ == "__main__":
    sys.exit(main())
