"""The direction of imports between the layers: the core knows no plugin, and plugins know only the core.

`server/` imports nothing from `extensions/`, `s2s/` or `ejabberd_compat/` (the module registry finds host
modules by name, through importlib, and may import the `extensions` package to list them); `extensions/`
do not import `ejabberd_compat/`; `s2s/` does not import `extensions/`. Only the composition root,
`parley.py`, knows them all. Every import counts, those for type checking and those inside functions too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# package -> the packages it must not import
FORBIDDEN = {
    "server": ("extensions", "s2s", "ejabberd_compat", "parley"),
    "extensions": ("ejabberd_compat", "parley"),
    "s2s": ("extensions", "ejabberd_compat", "parley"),
    "ejabberd_compat": ("parley",),
}
# The registry lists the extension modules (their package's path) and loads one by name.
ALLOWED = {("server/registry.py", "extensions")}


def imported(source: str) -> list[tuple[int, str]]:
    """(line, module) of every import in `source`, relative imports left out (the tree has none)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module))
    return found


def violations(package: str) -> list[str]:
    wrong = []
    for path in sorted((REPO / package).rglob("*.py")):
        name = path.relative_to(REPO).as_posix()
        for line, module in imported(path.read_text(encoding="utf-8")):
            top = module.split(".")[0]
            if top in FORBIDDEN[package] and (name, top) not in ALLOWED:
                wrong.append(f"{name}:{line} imports {module}")
    return wrong


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layers_import_only_downwards(package: str) -> None:
    assert violations(package) == []


def test_the_check_sees_every_kind_of_import() -> None:
    source = ("import extensions.roster\nfrom s2s.policy import ADDED\nif TYPE_CHECKING:\n"
              "    from ejabberd_compat.config import X\ndef f():\n    import extensions\nfrom . import x\n")
    assert [m for _, m in imported(source)] == ["extensions.roster", "s2s.policy", "ejabberd_compat.config",
                                                "extensions"]


def test_ejabberd_commands_only_map_onto_declared_ones() -> None:
    """ejabberd's names run the commands the modules declare, through the server's table: no module's insides."""
    path = REPO / "ejabberd_compat" / "commands.py"
    assert [m for _, m in imported(path.read_text(encoding="utf-8")) if m.split(".")[0] == "extensions"] == []


def test_the_core_names_no_plugin_module_by_string() -> None:
    """importlib would hide an import from the check above: only the registry may find modules by name."""
    wrong = [path.relative_to(REPO).as_posix() for path in (REPO / "server").rglob("*.py")
             if "import_module" in path.read_text(encoding="utf-8") and path.name != "registry.py"]
    assert wrong == []


# Imported only by a process whose configuration uses them (the Redis client with a cluster, dnspython with
# federation or `parley check`, asyncpg with ejabberd's SQL import, aiohttp with an http listener...): each
# is some MiB of resident memory in every process otherwise. SQLAlchemy's ORM (7 MiB), which the package
# `sqlalchemy.ext.asyncio` imports, is never needed: the storage loads only its engine module. `cryptography`
# (10 MiB) only generates certificates: TLS and its channel binding work without it on an RSA or ECDSA one.
OPTIONAL = ("redis", "dns", "asyncpg", "yaml", "prometheus_client", "aiohttp", "PIL", "sqlalchemy.dialects.postgresql",
            "s2s.manager", "ejabberd_compat.http_api", "sqlalchemy.orm", "sqlalchemy.ext.asyncio", "cryptography")


def test_the_server_loads_optional_parts_only_when_configured(tmp_path: Path) -> None:
    from server.tls import ensure_certificate

    cert, key = tmp_path / "localhost.crt", tmp_path / "localhost.key"
    ensure_certificate("localhost", cert, key)  # as a server's first start did
    code = ("import asyncio, sys, parley\n"
            "from server.config import parse_config\n"
            "from server.registry import available\n"
            "from server.sasl.channel_binding import tls_server_end_point\n"
            "from server.storage import open_storage\n"
            "from server.tls import TlsContexts\n"
            "config = parse_config({'listeners': [{'type': 'c2s', 'address': '127.0.0.1', 'port': 5222}],"
            f" 'hosts': {{'localhost': {{'certificate': '{cert}', 'key': '{key}'}}}}}}, known_modules=available())\n"
            "parley.build_server(config)\n"
            f"tls = TlsContexts({{'localhost': ('{cert}', '{key}')}})\n"
            "assert len(tls_server_end_point(tls.cert_der('localhost'))) == 32\n"
            "async def used() -> None:\n"
            f"    storage = await open_storage('sqlite:///{tmp_path / 'parley.db'}')\n"
            "    await storage.accounts.get('localhost', 'nobody')\n"
            "    async with storage.engine.connect() as conn:\n"
            "        await conn.exec_driver_sql('SELECT 1')\n"
            "    await storage.close()\n"
            "asyncio.run(used())\n"
            f"print(' '.join(m for m in {OPTIONAL!r} if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert loaded.stdout.split() == []


def test_the_orm_imported_after_the_storage_gets_the_same_engine_classes() -> None:
    """The storage loads `sqlalchemy.ext.asyncio.engine` without its package; importing the package afterwards
    (as a tool using the ORM would) must still work, with one AsyncEngine class for both."""
    code = ("import asyncio\n"
            "from server.storage.engine import make_engine\n"
            "from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession\n"
            "from sqlalchemy import text\n"
            "engine, _ = make_engine('sqlite:///:memory:')\n"
            "async def query() -> int:\n"
            "    async with AsyncSession(engine) as session:\n"
            "        return (await session.execute(text('SELECT 7'))).scalar_one()\n"
            "print(isinstance(engine, AsyncEngine), asyncio.run(query()))")
    found = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert found.stdout.split() == ["True", "7"]
