"""The `parley` command: run the server and manage accounts and configuration."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import secrets
import signal
import sys
from pathlib import Path

from ejabberd_compat import migrate
from ejabberd_compat.config import load_ejabberd_config
from server.accounts import AccountError, create_account, prepare_username, set_password
from server.config import Config, ConfigError, load_config
from server.jid import JID, JIDError
from server.registry import available
from server.storage import open_storage


def _load(path: str | None) -> Config:
    """A Parley TOML file, or an ejabberd.yml whose settings Parley cannot apply are listed first."""
    if path and path.endswith((".yml", ".yaml")):
        config, warnings = load_ejabberd_config(Path(path), known_modules=available())
        for warning in warnings:
            print(f"parley: {path}: not applied: {warning}", file=sys.stderr)
        return config
    return load_config(Path(path) if path else None, known_modules=available())


def _setup_logging(config: Config, verbose: bool) -> None:
    level = logging.DEBUG if verbose else getattr(logging, config.logging.level.upper())
    handler: logging.Handler = logging.FileHandler(config.logging.file) if config.logging.file \
        else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


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


async def _serve(config: Config) -> None:
    from server.server import Server

    config.data_dir.mkdir(parents=True, exist_ok=True)
    created = await _bootstrap_admins(config)
    server = Server(config)
    await server.start()
    listeners = ", ".join(f"{lc.address}:{lc.port} ({lc.tls})" for lc in config.listeners if lc.type == "c2s")
    print(f"Parley is running for {', '.join(config.hosts)}; clients connect to {listeners}.", flush=True)
    print(*created, sep="\n", flush=True) if created else None
    print("The certificate is self-signed unless you configured one: accept it in your client. "
          "Add users with `parley user add USER@HOST --password PASSWORD`. Ctrl-C stops.", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


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
    config.data_dir.mkdir(parents=True, exist_ok=True)
    storage = await open_storage(config.storage.url)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="parley", description="Parley XMPP server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("--config", help="TOML configuration file (default: built-in, host localhost)")
    serve.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    check = sub.add_parser("check-config", help="validate a configuration file")
    check.add_argument("file")
    user = sub.add_parser("user", help="manage accounts")
    user.add_argument("--config", help="TOML configuration file")
    actions = user.add_subparsers(dest="action", required=True)
    for action, help_text in (("add", "create an account"), ("passwd", "change a password")):
        p = actions.add_parser(action, help=help_text)
        p.add_argument("jid")
        p.add_argument("--password", help="the password (read from stdin when omitted)")
    actions.add_parser("delete", help="delete an account and its data").add_argument("jid")
    actions.add_parser("list", help="list accounts").add_argument("host", nargs="?")
    migrate.add_commands(sub)
    args = parser.parse_args(argv)
    try:
        if args.command == "check-config":
            config = _load(args.file)
            print(f"{args.file}: OK ({len(config.hosts)} host(s), {len(config.listeners)} listener(s), "
                  f"storage {config.storage.url.split(':', 1)[0]})")
            return 0
        config = _load(args.config)
        if args.command in migrate.COMMANDS:
            done: list[str] = []

            async def migrate_main() -> None:
                done.append(await migrate.run(args, config))

            _run(migrate_main())
            print(done[0])
            return 0
        if args.command == "serve":
            _setup_logging(config, args.verbose)
            _run(_serve(config))
            return 0
        result: list[str] = []

        async def user_main() -> None:
            result.append(await _user_command(args, config))

        _run(user_main())
        if result[0]:
            print(result[0])
        return 0
    except ConfigError as exc:
        print(f"parley: {exc}", file=sys.stderr)
        return 2
    except (AccountError, *migrate.ERRORS) as exc:
        print(f"parley: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
