"""The `parley` subcommands that move data in and out: import-piefxis, export-piefxis, import-ejabberd-sql.

They open the configured storage directly, so they run beside a stopped server (or a running one: rooms
then appear at its next start, since the MUC service reads rooms when it starts).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ejabberd_compat.config import STORAGE_SCHEMA
from ejabberd_compat.piefxis import PiefxisError, export_piefxis, import_piefxis
from ejabberd_compat.sql_import import SqlImportError, import_ejabberd_sql
from server.config import Config, ConfigError
from server.storage import open_storage

COMMANDS = ("import-piefxis", "export-piefxis", "import-ejabberd-sql")
ERRORS = (PiefxisError, SqlImportError)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Declare the subcommands on `parley`'s parser."""
    config_help = "configuration file: Parley's TOML or an ejabberd.yml"
    p = sub.add_parser("import-piefxis", help="import users and their data from a XEP-0227 file or folder "
                                              "(ejabberd's export_piefxis, Prosody's mod_storage_xep0227)")
    p.add_argument("file")
    p.add_argument("--config", help=config_help)
    p = sub.add_parser("export-piefxis", help="export users and their data as XEP-0227 files into a folder")
    p.add_argument("dir")
    p.add_argument("--host", action="append", help="only this host (repeatable; default: every host)")
    p.add_argument("--ejabberd", action="store_true", help="for ejabberd's import_piefxis (its SCRAM key encoding)")
    p.add_argument("--config", help=config_help)
    p = sub.add_parser("import-ejabberd-sql", help="import everything from an ejabberd PostgreSQL database, "
                                                   "archives and rooms included")
    p.add_argument("url", nargs="?", help="postgresql://user@server/database (append ?schema=NAME for a schema); "
                                          "default: the database of the ejabberd.yml given as --config")
    p.add_argument("--host", help="the host to import (required for ejabberd's single-host schema)")
    p.add_argument("--config", help=config_help)


async def run(args: argparse.Namespace, config: Config) -> str:
    """Run one of COMMANDS; the text to print. Raises one of ERRORS (or ConfigError) for bad input."""
    if args.command == "import-ejabberd-sql" and not args.url:
        _ejabberd_database(config)  # before anything is opened or created
    given = getattr(args, "host", None)
    chosen = given if isinstance(given, list) else [given] if given else []
    for host in chosen:
        if host not in config.hosts:
            raise ConfigError("", f"{host} is not a host of this server ({', '.join(config.hosts)})")
    hosts = chosen or list(config.hosts)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    storage = await open_storage(config.storage.url)
    try:
        if args.command == "export-piefxis":
            return f"exported to {await export_piefxis(storage, Path(args.dir), hosts, args.ejabberd)}"
        if args.command == "import-piefxis":
            report = await import_piefxis(storage, Path(args.file), hosts, config.scram_iterations)
        else:
            report = await import_ejabberd_sql(storage, args.url or _ejabberd_database(config), hosts, args.host,
                                               config.scram_iterations)
        return report.summary()
    finally:
        await storage.close()


def _ejabberd_database(config: Config) -> str:
    """Started on an ejabberd.yml with sql_type pgsql, Parley keeps its tables in a schema of ejabberd's own
    database (ejabberd_compat.config.STORAGE_SCHEMA): ejabberd's tables are that database without the schema."""
    suffix = f"?schema={STORAGE_SCHEMA}"
    if config.source is None or config.source.suffix not in (".yml", ".yaml") or \
            not config.storage.url.endswith(suffix):
        raise ConfigError("", "name ejabberd's database (postgresql://user@server/database), or give as --config "
                              "an ejabberd.yml with sql_type: pgsql")
    return config.storage.url.removesuffix(suffix)
