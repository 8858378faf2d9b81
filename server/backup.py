"""`parley backup`, `parley restore` and `parley db`: the operator's copies of the database and uploads.

SQLite is copied with its online backup API, a consistent snapshot even while the server writes (WAL).
PostgreSQL is PostgreSQL's own business: `pg_dump` in its custom format, and `pg_restore`; when those are
not installed here, the commands to run are printed instead. A backup folder holds the database copy,
the uploads folder of the data folder when there is one, and `parley-backup.json`, which says what it holds.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy.engine import URL, make_url

from server.config import Config
from server.control import server_running
from server.storage.engine import make_engine
from server.storage.schema import STEPS, current_version, migrate

MANIFEST = "parley-backup.json"
SQLITE_COPY = "parley.db"
POSTGRES_COPY = "parley.pgdump"
UPLOADS = "uploads"


class BackupError(Exception):
    """Why a backup or restore did not happen, and what to do about it."""


@dataclass
class Database:
    """The configured database: a SQLite file, or a PostgreSQL database with the schema Parley's tables are in."""

    url: URL

    @classmethod
    def of(cls, config: Config) -> Database:
        return cls(make_url(config.storage.url))

    @property
    def sqlite(self) -> bool:
        return self.url.get_backend_name() == "sqlite"

    @property
    def file(self) -> Path:
        return Path(self.url.database or "")

    @property
    def schema(self) -> str:
        return str(self.url.query.get("schema") or "public")

    @property
    def dsn(self) -> str:
        """The libpq address pg_dump and pg_restore take."""
        return self.url.difference_update_query(["schema"]).set(drivername="postgresql") \
            .render_as_string(hide_password=False)


def _command(argv: list[str], what: str) -> str:
    """Run pg_dump or pg_restore, or say which command to run when it is not installed."""
    shown = " ".join(argv)
    if shutil.which(argv[0]) is None:
        raise BackupError(f"{argv[0]} is not installed here: {what} with\n  {shown}")
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode:
        raise BackupError(f"{shown} failed: {result.stderr.strip()}")
    return f"ran {argv[0]} ({what})"


async def backup(config: Config, folder: Path) -> list[str]:
    """Copy the database and the uploads into `folder`, a new or empty folder; the lines tell what was done."""
    if folder.exists() and any(folder.iterdir()):
        raise BackupError(f"{folder} is not empty: name a new folder for each backup")
    db = Database.of(config)
    if db.sqlite and not db.file.is_file():
        raise BackupError(f"no database at {db.file}: nothing to back up (is --config the server's?)")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    version = await _version(config)
    if db.sqlite:
        source, target = sqlite3.connect(db.file), sqlite3.connect(folder / SQLITE_COPY)
        try:
            source.backup(target)  # page by page under a read transaction: consistent while the server writes
        finally:
            source.close()
            target.close()
        done = [f"copied the SQLite database {db.file} (schema version {version})"]
    else:
        done = [_command(["pg_dump", "--format=custom", f"--schema={db.schema}",
                          f"--file={folder / POSTGRES_COPY}", db.dsn], "back up PostgreSQL")]
    uploads = config.data_dir / UPLOADS
    if uploads.is_dir():
        shutil.copytree(uploads, folder / UPLOADS)
        done.append(f"copied the uploads in {uploads}")
    (folder / MANIFEST).write_text(json.dumps({
        "storage": "sqlite" if db.sqlite else "postgresql", "schema_version": version,
        "created": datetime.now(UTC).isoformat(timespec="seconds")}, indent=1) + "\n")
    return [*done, f"backup in {folder}"]


async def restore(config: Config, folder: Path, force: bool) -> list[str]:
    """Put a backup back in place of the configured database and uploads, with the server stopped."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise BackupError(f"{folder} is not a Parley backup ({MANIFEST}: {exc})") from None
    if server_running(config):
        raise BackupError("the server is running (its control socket answers): stop it first")
    db = Database.of(config)
    kind = "sqlite" if db.sqlite else "postgresql"
    if manifest.get("storage") != kind:
        raise BackupError(f"the backup holds a {manifest.get('storage')} database, the configuration names {kind}")
    existing = await _version(config)
    if existing and not force:
        raise BackupError(f"a database is in place (schema version {existing}): add --force to replace it")
    if db.sqlite:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db.file}{suffix}").unlink(missing_ok=True)
        db.file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        source, target = sqlite3.connect(folder / SQLITE_COPY), sqlite3.connect(db.file)
        try:
            source.backup(target)
        finally:
            source.close()
            target.close()
        db.file.chmod(0o600)
        done = [f"restored the SQLite database {db.file}"]
    else:
        done = [_command(["pg_restore", "--clean", "--if-exists", "--no-owner", f"--dbname={db.dsn}",
                          str(folder / POSTGRES_COPY)], "restore PostgreSQL")]
    uploads = config.data_dir / UPLOADS
    if (folder / UPLOADS).is_dir():
        if uploads.exists():
            shutil.rmtree(uploads)
        shutil.copytree(folder / UPLOADS, uploads)
        done.append(f"restored the uploads into {uploads}")
    return done


async def _version(config: Config) -> int:
    db = Database.of(config)
    if db.sqlite and not db.file.is_file():
        return 0  # not created by asking
    engine, schema = make_engine(config.storage.url)
    try:
        return await current_version(engine, schema)
    finally:
        await engine.dispose()


async def status(config: Config) -> tuple[int, list[str]]:
    """`parley db status`: the database's schema version against this Parley's; exit 1 when they differ."""
    found, known = await _version(config), len(STEPS)
    if found == known:
        return 0, [f"schema version {found}: up to date"]
    if found > known:
        return 1, [f"schema version {found} is newer than this Parley's {known}: run the newer Parley"]
    return 1, [f"schema version {found}, this Parley's is {known}: run `parley db upgrade` (back up first: "
               f"`parley backup DIR`)"]


async def upgrade(config: Config) -> list[str]:
    """`parley db upgrade`: apply the missing migration steps (the server also does at start)."""
    before = await _version(config)
    engine, schema = make_engine(config.storage.url)
    try:
        after = await migrate(engine, schema)
    finally:
        await engine.dispose()
    return [f"schema version {after}: up to date" if before == after else f"upgraded from schema version {before} "
            f"to {after}"]
