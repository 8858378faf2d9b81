"""The composition root: the one place that knows every part of Parley and builds the server from them.

The core (`server/`) knows no plugin, and each plugin package knows only the core: `s2s/` (federation),
`ejabberd_compat/` (ejabberd's configuration, commands, HTTP API and data), and the host modules of
`extensions/`, which the core finds by name when a host loads them. This file, outside all of them, hands
the core its parts: the federation manager for 's2s' listeners, the HTTP API for 'http' listeners, the
command declarations of the parts that are not host modules, and, for the `parley` command, how to read
an ejabberd.yml and the subcommands that move data in and out. The console scripts `parley` and
`parleyctl` start here.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ejabberd_compat import commands as ejabberd_commands
from ejabberd_compat import ctl, migrate
from ejabberd_compat.config import load_any_config
from s2s import policy
from server import cli
from server.commands import Command
from server.commands import service_admin as core_commands
from server.commands import tenants as tenant_commands
from server.config import Config
from server.registry import available
from server.server import Federation, Server

# The commands of the parts that are not host modules; each module adds its own when a host loads it.
COMMANDS: tuple[Command, ...] = (*core_commands.COMMANDS, *tenant_commands.COMMANDS, *policy.COMMANDS,
                                 *ejabberd_commands.COMMANDS)


def read_config(path: Path) -> Config:
    """The configuration file again (reload_config, SIGHUP): Parley's TOML or an ejabberd.yml."""
    return load_any_config(path, known_modules=available())[0]


def federation(server: Server) -> Federation:
    """The federation manager, which the server asks for only when it has an 's2s' listener: imported here,
    so that a server without federation does not load it and its DNS resolver (a few MiB of resident memory
    per process)."""
    from s2s.manager import S2SManager

    return S2SManager(server)


def build_server(config: Config) -> Server:
    """A server with every part: what `parley serve` runs and what the tests start."""
    server = Server(config, federation=federation, commands=COMMANDS, read_config=read_config)
    if any(listener.type == "http" for listener in config.listeners):  # they are only read at start
        from ejabberd_compat.http_api import HttpApi  # with aiohttp: not loaded by a server without http

        HttpApi(server)  # ejabberd's API under /api/ on the http listeners
    return server


PARTS = cli.Parts(load_config=load_any_config, build_server=build_server, tools=migrate)


def main(argv: list[str] | None = None) -> int:
    """The `parley` command."""
    return cli.main(PARTS, argv)


def parleyctl(argv: list[str] | None = None) -> int:
    """The `parleyctl` command: it talks to the running server, which the parts above built."""
    return ctl.main(argv)


if __name__ == "__main__":
    sys.exit(main())
