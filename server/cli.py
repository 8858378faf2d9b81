"""The `parley` command: run the server and manage accounts and configuration.

The composition root (`parley.py`) calls `main` with the parts this file does not know: how to read a
configuration file (Parley's TOML or an ejabberd.yml), how to build the server, and the subcommands that
move data in and out.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import secrets
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from sqlalchemy import inspect
from sqlalchemy.engine import make_url

from server import backup, collector
from server.accounts import AccountError, create_account, prepare_username, set_password
from server.backup import BackupError
from server.config import (
    CONFIG_ENV,
    DATA_ENV,
    SYSTEM_CONFIG,
    Config,
    ConfigError,
    check_cluster_storage,
    config_option,
    find_config,
    node_name_problem,
)
from server.jid import JID, JIDError
from server.logs import setup as _setup_logging
from server.options import example_section
from server.registry import available, load
from server.storage import Storage, open_storage
from server.storage.engine import make_engine
from server.storage.schema import SchemaTooNew
from server.tls import TlsError

if TYPE_CHECKING:
    from server.server import Server


class Tools(Protocol):
    """`parley` subcommands of a part outside the core (ejabberd_compat.migrate: imports and exports)."""

    COMMANDS: tuple[str, ...]
    ERRORS: tuple[type[Exception], ...]

    def add_commands(self, sub: argparse._SubParsersAction) -> None: ...

    async def run(self, args: argparse.Namespace, config: Config) -> str: ...


@dataclass(frozen=True)
class Parts:
    """What the composition root gives the command line."""

    # A configuration file (None: the built-in one), with the warnings naming what it could not apply.
    load_config: Callable[..., tuple[Config, list[str]]]
    build_server: Callable[[Config], Server]
    tools: Tools


def _load(parts: Parts, path: Path | None) -> Config:
    """A Parley TOML file, or an ejabberd.yml whose settings Parley cannot apply are listed first."""
    config, warnings = parts.load_config(path, known_modules=available())
    for warning in warnings:
        print(f"parley: {path}: not applied: {warning}", file=sys.stderr)
    return config


def _make_data_dir(config: Config) -> None:
    try:
        config.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError("data_dir", f"cannot create the data folder {config.data_dir}: {exc.strerror}; name "
                                      f"another with data_dir or the {DATA_ENV} variable") from None


async def _open_existing(config: Config) -> Storage:
    """The server's database, never a new one: run with the wrong configuration (or none, from another folder),
    an account command would otherwise create an empty database and the account where no server looks."""
    url = make_url(config.storage.url)
    hint = (f"the server's database, not created by this command: start the server once, or name its "
            f"configuration with --config or {CONFIG_ENV}")
    if url.get_backend_name() == "sqlite":
        if not Path(url.database or "").is_file():
            raise ConfigError("", f"no database at {url.database} ({hint})")
    else:
        engine, schema = make_engine(config.storage.url)
        try:
            async with engine.connect() as conn:
                found = await conn.run_sync(lambda c: inspect(c).has_table("schema_version", schema=schema))
        except Exception as exc:
            raise ConfigError("", f"cannot open {url.render_as_string(hide_password=True)}: {exc}") from None
        finally:
            await engine.dispose()
        if not found:
            raise ConfigError("", f"no Parley database at {url.render_as_string(hide_password=True)} ({hint})")
    return await open_storage(config.storage.url)


async def _bootstrap_admins(config: Config) -> list[str]:
    """Create each host's first admin account on first start, returning lines telling how to log in."""
    lines = []
    storage = await open_storage(config.storage.url)
    try:
        for name, hc in config.hosts.items():
            if not hc.admins:
                continue
            admin = JID.parse(hc.admins[0])
            if await storage.accounts.exists(name, admin.local or ""):
                continue
            password = secrets.token_urlsafe(12)
            await create_account(storage, name, admin.local or "", password, config.scram_iterations)
            secret_file = config.data_dir / f"admin-password-{name}.txt"
            secret_file.write_text(f"{admin}\n{password}\n")
            secret_file.chmod(0o600)
            lines.append(f"  created admin account {admin} with password {password} (saved in {secret_file})")
    finally:
        await storage.close()
    return lines


def _banner(config: Config, created: list[str]) -> None:
    listeners = ", ".join(f"{lc.address}:{lc.port} ({lc.tls})" for lc in config.listeners if lc.type == "c2s")
    cluster = config.cluster
    workers = f" in {cluster.workers} worker processes" if cluster.workers > 1 else ""
    if cluster.active:
        workers += f" as node {cluster.node_name} of the cluster on {cluster.redis_url} ({cluster.prefix})"
    print(f"Parley is running for {', '.join(config.hosts)}{workers}; clients connect to {listeners}.", flush=True)
    print(f"  configuration {config.source or 'built-in'}, data in {config.data_dir}", flush=True)
    print(*created, sep="\n", flush=True) if created else None
    print("The certificate is self-signed unless you configured one: accept it in your client. "
          "Add users with `parley user add USER@HOST --password PASSWORD`. Ctrl-C stops.", flush=True)


def _serve_workers(config: Config, build: Callable[[Config], Server]) -> int:
    """The parent prepares storage once (migrations, first admin), then forks the workers and watches them."""
    from server import cluster
    from server.tls import ensure_certificate

    created: list[str] = []

    async def prepare() -> None:
        _make_data_dir(config)
        for name, hc in config.hosts.items():  # not generated by two workers at once
            ensure_certificate(name, hc.certificate, hc.key)
        created.extend(await _bootstrap_admins(config))

    _run(prepare())
    return cluster.supervise(config, lambda index, ready: _run(_serve_worker(config, build, index, ready)),
                             lambda: _banner(config, created))


async def _serve_worker(config: Config, build: Callable[[Config], Server], index: int, ready: int) -> None:
    from server.cluster import Cluster

    signalled = asyncio.Event()  # from here on, even while starting: a worker always takes its sessions with it
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, signalled.set)
    server = build(config)
    loop.add_signal_handler(signal.SIGHUP, server.control.reload_soon)
    cluster = Cluster(server, index, config.cluster)
    await cluster.start()
    await server.start()
    collector.settle()
    os.write(ready, b"+")
    waits = [loop.create_task(signalled.wait()), loop.create_task(server.finished.wait())]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for task in waits:
        task.cancel()
    if server.finished.is_set():
        os.kill(os.getppid(), signal.SIGTERM)  # an admin's shutdown command: every worker stops
    else:
        await server.shutdown()
    await cluster.stop()


def _node(text: str) -> str:
    if problem := node_name_problem(text):
        raise argparse.ArgumentTypeError(problem)
    return text


def _workers(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 64:
        raise argparse.ArgumentTypeError("must be a number of processes from 1 to 64")
    return int(text)


async def _serve(config: Config, build: Callable[[Config], Server]) -> None:
    _make_data_dir(config)
    created = await _bootstrap_admins(config)
    server = build(config)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, server.control.reload_soon)  # `systemctl reload`
    await server.start()
    collector.settle()
    for sig in (signal.SIGINT, signal.SIGTERM):  # before the banner, which tells scripts the server is up
        loop.add_signal_handler(sig, server.plan, False)
    _banner(config, created)
    await server.finished.wait()  # after a signal, or an admin's shutdown command


def _run(coro: object) -> None:
    try:
        import uvloop

        uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:
        asyncio.run(coro)  # type: ignore[arg-type]


def _account(jid_text: str, config: Config) -> tuple[str, str]:
    try:
        jid = JID.parse(jid_text)
    except JIDError as exc:
        raise AccountError(f"invalid JID {jid_text!r}: {exc}") from None
    if jid.local is None or jid.resource is not None:
        raise AccountError(f"{jid_text!r} is not a user address (user@host)")
    if jid.domain not in config.hosts:
        raise AccountError(f"{jid.domain} is not a host of this server ({', '.join(config.hosts)})")
    return jid.domain, prepare_username(jid.local, jid.domain)


def _password(args: argparse.Namespace) -> str:
    if args.password is not None:
        return args.password
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Again: ") != first:
        raise AccountError("the passwords differ")
    return first


async def _user_command(args: argparse.Namespace, config: Config) -> str:
    storage = await _open_existing(config)
    try:
        if args.action == "list":
            hosts = [args.host] if args.host else list(config.hosts)
            users = [f"{u}@{h}" for h in hosts for u in await storage.accounts.list(h)]
            return "\n".join(users)
        host, user = _account(args.jid, config)
        if args.action == "add":
            if not await create_account(storage, host, user, _password(args), config.scram_iterations):
                raise AccountError(f"{user}@{host} exists already")
            return f"created {user}@{host}"
        if args.action == "passwd":
            if not await set_password(storage, host, user, _password(args), config.scram_iterations):
                raise AccountError(f"no account {user}@{host}")
            return f"password changed for {user}@{host}"
        if not await storage.accounts.delete(host, user):
            raise AccountError(f"no account {user}@{host}")
        return f"deleted {user}@{host}"
    finally:
        await storage.close()


def _check(parts: Parts, path: Path | None, args: argparse.Namespace) -> int:
    """`parley check`: every part's findings; exit 1 when one has a problem."""
    try:
        config = _load(parts, path)
    except ConfigError as exc:
        print(f"Configuration {path}: {len(exc.errors)} problem(s)")
        for error in exc.errors:
            print(f"  PROBLEM: {error}\n      fix: correct it in {path}; `parley check-config` checks it again")
        return 1
    print(f"Configuration {config.source or '(built-in)'}: OK")
    from server import check  # with dnspython: loaded for `parley check`, not by every server process

    reports = check.check(config, None if args.no_dns else check.make_resolver(args.nameserver))
    for report in reports:
        print(*report.lines(), sep="\n")
    return 1 if any(report.problems for report in reports) else 0


def _operate(args: argparse.Namespace, config: Config) -> int:
    """backup, restore and db: their lines on standard output, and their exit code."""
    outcome: list[tuple[int, list[str]]] = []

    async def operate() -> None:
        if args.command == "backup":
            outcome.append((0, await backup.backup(config, args.folder)))
        elif args.command == "restore":
            outcome.append((0, await backup.restore(config, args.folder, args.force)))
        elif args.action == "status":
            outcome.append(await backup.status(config))
        else:
            outcome.append((0, await backup.upgrade(config)))

    _run(operate())
    code, lines = outcome[0]
    print(*lines, sep="\n")
    return code


def main(parts: Parts, argv: list[str] | None = None) -> int:
    given, argv = config_option(sys.argv[1:] if argv is None else argv)  # wherever it stands on the line
    option = argparse.ArgumentParser(add_help=False)
    option.add_argument("--config", metavar="FILE",
                        help=f"the server's configuration, Parley's TOML or an ejabberd.yml, before or after the "
                             f"command (default: ${CONFIG_ENV}, else {SYSTEM_CONFIG} if it exists, else built-in: "
                             f"host localhost, data in ./parley-data)")
    parser = argparse.ArgumentParser(prog="parley", description="Parley XMPP server", parents=[option])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the server", parents=[option])
    serve.add_argument("--verbose", "-v", action="count", default=0,
                       help="debug logging with an XML trace (-vv: the libraries' debug logging too)")
    serve.add_argument("--workers", type=_workers, help="worker processes sharing the ports (cluster.workers)")
    serve.add_argument("--node", type=_node, help="this node's name in a cluster of machines (cluster.node)")
    check = sub.add_parser("check-config", help="validate a configuration file", parents=[option])
    check.add_argument("config_file", nargs="?", metavar="FILE",
                       help="the file (default: the one --config names or the server finds)")
    full_check = sub.add_parser("check", help="check a deployment before going live: configuration, certificates, "
                                              "DNS and ports, each problem with its fix", parents=[option])
    full_check.add_argument("--nameserver", metavar="ADDRESS[:PORT]",
                            help="ask this DNS server (default: the system's)")
    full_check.add_argument("--no-dns", action="store_true", help="leave DNS out (a server not yet in DNS)")
    sub.add_parser("module-options", help="print the [module_options] tables of the example configuration")
    user = sub.add_parser("user", help="manage accounts", parents=[option])
    actions = user.add_subparsers(dest="action", required=True)
    for action, help_text in (("add", "create an account"), ("passwd", "change a password")):
        p = actions.add_parser(action, help=help_text, parents=[option])
        p.add_argument("jid")
        p.add_argument("--password", help="the password (read from stdin when omitted)")
    actions.add_parser("delete", help="delete an account and its data", parents=[option]).add_argument("jid")
    actions.add_parser("list", help="list accounts", parents=[option]).add_argument("host", nargs="?")
    backup_cmd = sub.add_parser("backup", help="copy the database (and uploads) into a new folder, even while "
                                              "the server runs", parents=[option])
    backup_cmd.add_argument("folder", type=Path)
    restore_cmd = sub.add_parser("restore", help="put a backup back, with the server stopped", parents=[option])
    restore_cmd.add_argument("folder", type=Path)
    restore_cmd.add_argument("--force", action="store_true", help="replace the database that is in place")
    db = sub.add_parser("db", help="the database's schema version", parents=[option])
    db_actions = db.add_subparsers(dest="action", required=True)
    db_actions.add_parser("status", help="the schema version against this Parley's", parents=[option])
    db_actions.add_parser("upgrade", help="run the migrations the database lacks", parents=[option])
    parts.tools.add_commands(sub)
    args = parser.parse_args(argv)
    try:
        path = find_config(getattr(args, "config_file", None) or given)
        if args.command == "check-config":
            if path is None:
                raise ConfigError("", f"no configuration file to check: name one, or set {CONFIG_ENV}")
            config = _load(parts, path)
            print(f"{path}: OK ({len(config.hosts)} host(s), {len(config.listeners)} listener(s), "
                  f"storage {config.storage.url.split(':', 1)[0]})")
            return 0
        if args.command == "check":
            return _check(parts, path, args)
        if args.command == "module-options":
            print(example_section({name: load(name).options for name in available()}), end="")
            return 0
        config = _load(parts, path)
        if args.command in parts.tools.COMMANDS:
            done: list[str] = []

            async def migrate_main() -> None:
                done.append(await parts.tools.run(args, config))

            _run(migrate_main())
            print(done[0])
            return 0
        if args.command in ("backup", "restore", "db"):
            return _operate(args, config)
        if args.command == "serve":
            if args.workers is not None or args.node is not None:
                config.cluster = replace(config.cluster, workers=args.workers or config.cluster.workers,
                                         node=args.node or config.cluster.node)
                check_cluster_storage(config.cluster, config.storage)
            os.umask(0o077)  # the database, keys, sockets and logs the server creates are its user's alone
            _setup_logging(config, args.verbose)
            if config.cluster.active:
                return _serve_workers(config, parts.build_server)
            _run(_serve(config, parts.build_server))
            return 0
        result: list[str] = []

        async def user_main() -> None:
            result.append(await _user_command(args, config))

        _run(user_main())
        if result[0]:
            print(result[0])
        return 0
    except ConfigError as exc:
        for error in exc.errors:
            print(f"parley: {error}", file=sys.stderr)
        return 2
    except (TlsError, SchemaTooNew) as exc:
        print(f"parley: {exc}", file=sys.stderr)
        return 2
    except BackupError as exc:
        print(f"parley: {exc}", file=sys.stderr)
        return 1
    except (AccountError, *parts.tools.ERRORS) as exc:
        print(f"parley: {exc}", file=sys.stderr)
        return 1

