"""The servers under test: Parley, Prosody and ejabberd, each with its own config in a work directory.

Each server is configured for the same hot path (roster, presence, offline storage, no archive unless the
profile asks for one, no rate limits, TLS offered but not required, SCRAM with 4,096 iterations) on its own
loopback address, started as a child process, measured through its pid and stopped again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.client import Target, register
from bench.procstat import CpuWindow, find_descendant

if TYPE_CHECKING:
    from server.storage import Storage

REPO = Path(__file__).resolve().parent.parent
CONFIGS = Path(__file__).resolve().parent / "configs"
SCRAM_ITERATIONS = 4096
REDIS_URL = "redis://127.0.0.1:6379/0"
FD_LIMIT = 65536
START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
QUIET_CPU = 20.0  # percent of a core under which a freshly started server counts as done starting up
QUIET_TIMEOUT = 60.0
# Parley's modules on the hot path and around it, as in its default configuration (less registration).
PARLEY_MODULES = ["roster", "presence", "offline", "disco", "caps", "version", "time", "last", "ping", "vcard"]
# The `full` profile: what a real deployment loads besides (its example configuration's modules for clients),
# and each peer's counterparts (Debian's Prosody 0.12 has no push module: mod_cloud_notify is a community one).
FULL_MODULES = ["carbons", "stream_management", "csi", "pep", "blocking", "push", "private", "mam"]
PROSODY_FULL = ["carbons", "smacks", "csi_simple", "pep", "blocklist", "private", "mam"]
EJABBERD_FULL = """\
  mod_blocking: {}
  mod_carboncopy: {}
  mod_client_state: {}
  mod_privacy: {}
  mod_private: {}
  mod_pubsub:
    plugins:
      - flat
      - pep
  mod_push: {}
  mod_stream_mgmt: {}
"""


# The machine's PostgreSQL, for `--storage postgresql`: each server gets a role of its own and a fresh schema
# of the role's name, which is first on the role's search_path ("$user"), so that Prosody and ejabberd, which
# cannot name a schema, create their tables there.
PG_HOST, PG_PORT, PG_DATABASE = "127.0.0.1", 5432, "test"
STORAGES = ("default", "postgresql")


@dataclass(frozen=True)
class Profile:
    """Server features that change the cost of the hot path; scenarios run under one profile at a time.

    `full` is a realistic deployment: the archive on and every module a real server loads (FULL_MODULES).
    `storage` is each server's own default (Parley SQLite, Prosody files, ejabberd Mnesia) or "postgresql",
    the machine's PostgreSQL for all of them (synchronous_commit as the database has it: on, by default).
    """

    archive: bool = False
    full: bool = False
    storage: str = "default"

    @property
    def name(self) -> str:
        name = "full" if self.full else "archive-on" if self.archive else "archive-off"
        return name if self.storage == "default" else f"{name}, {self.storage}"

    @property
    def postgresql(self) -> bool:
        return self.storage == "postgresql"


async def pg_execute(*statements: str) -> None:
    """Run statements on the machine's PostgreSQL as its superuser."""
    import asyncpg

    try:
        conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user="postgres", database=PG_DATABASE)
    except (OSError, asyncpg.PostgresError) as exc:
        raise ServerUnavailable(f"no PostgreSQL at {PG_HOST}:{PG_PORT}/{PG_DATABASE}: {exc}") from None
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def pg_fresh_schema(role: str) -> None:
    """The role (login, no password: the machine's PostgreSQL trusts loopback) and an empty schema it owns."""
    await pg_execute(f"DROP SCHEMA IF EXISTS {role} CASCADE",
                     f"DO $$ BEGIN CREATE ROLE {role} LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$",
                     f"CREATE SCHEMA {role} AUTHORIZATION {role}")


async def pg_drop_schema(role: str) -> None:
    await pg_execute(f"DROP SCHEMA IF EXISTS {role} CASCADE", f"DROP ROLE IF EXISTS {role}")


class ServerUnavailable(Exception):
    """The server cannot be benchmarked here (not installed, or lacks a feature the profile needs)."""


def _raise_fd_limit() -> None:
    """In the child before exec: servers inherit a descriptor limit big enough for thousands of clients
    (ejabberd's own user otherwise gets 1,024, and its node dies near that many connections)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = FD_LIMIT if hard == resource.RLIM_INFINITY else min(FD_LIMIT, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))


def fd_cap(limit: int) -> Callable[[], None]:
    """A child set-up that caps descriptors at `limit`, soft and hard, so that no server can raise it."""
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    return cap


def port_open(address: str, port: int) -> bool:
    """Whether something listens there (the peers' and the benchmark's servers are waited for so)."""
    try:
        with socket.create_connection((address, port), timeout=0.5):
            return True
    except OSError:
        return False


def fill_template(template: str, values: dict[str, str]) -> str:
    """A peer's configuration template with each @KEY@ replaced by its value."""
    for key, value in values.items():
        template = template.replace(f"@{key}@", value)
    return template


class BenchServer:
    """One server under test. Subclasses write its config, create its users and start and stop it."""

    name = ""
    default_address = ""
    ws_path = "/xmpp-websocket"  # the XMPP-over-WebSocket endpoint on the HTTP port

    def __init__(self, workdir: Path, profile: Profile, address: str | None = None, port: int = 5222) -> None:
        self.address = address or self.default_address
        self.port = port
        self.http_port = port + 58  # 5280 beside 5222, as the servers' defaults
        self.domain = f"{self.name}.bench"
        self.profile = profile
        self.dir = workdir / self.name
        self.proc: subprocess.Popen[bytes] | None = None
        self.limit_fds: Callable[[], None] = _raise_fd_limit  # run in the child before exec
        self.notes: list[str] = []
        self._log = self.dir / "stdout.log"

    @property
    def target(self) -> Target:
        return Target(self.address, self.port, self.domain, self.http_port, self.ws_path)

    @property
    def bosh_url(self) -> str | None:
        """Where the server serves BOSH (XEP-0124), if the benchmark turns it on."""
        return None

    @property
    def pid(self) -> int:
        """The process whose CPU and memory are measured."""
        assert self.proc is not None
        return self.proc.pid

    @property
    def pg_role(self) -> str:
        """This server's PostgreSQL role and schema (`--storage postgresql`)."""
        return f"parley_bench_{self.name.replace('-', '_')}_{os.getpid()}"

    async def cleanup(self) -> None:
        """Remove what the server left outside its work directory (its PostgreSQL schema)."""
        if self.profile.postgresql:
            with contextlib.suppress(ServerUnavailable):
                await pg_drop_schema(self.pg_role)

    def check(self) -> None:
        """Raise ServerUnavailable with the reason when this server cannot run here."""

    def version(self) -> str:
        """The Debian package version of a peer (Parley's checkout is recorded by bench.run)."""
        found = subprocess.run(["dpkg-query", "-W", "-f=${Version}", self.name], capture_output=True, text=True)
        return found.stdout.strip() or "unknown"

    async def setup(self, users: list[str], password: str, rosters: dict[str, list[str]]) -> None:
        """Write the configuration, create the users and store their rosters (user -> contacts, every
        subscription mutual). Servers may be started for that, and are stopped again afterwards."""
        raise NotImplementedError

    def command(self) -> list[str]:
        raise NotImplementedError

    @property
    def cwd(self) -> Path:
        return self.dir

    async def start(self) -> None:
        if port_open(self.address, self.port):
            raise ServerUnavailable(f"{self.address}:{self.port} is already in use by another process")
        with open(self._log, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.cwd,
                                         start_new_session=True, preexec_fn=self.limit_fds,
                                         **self.spawn_options())
        await self._wait_ready()
        await self._wait_quiet()

    def spawn_options(self) -> dict[str, Any]:
        """Extra subprocess.Popen arguments (user, environment) for the server's processes."""
        return {}

    async def _wait_quiet(self) -> None:
        """Wait until start-up work is over (ejabberd replays Mnesia's log after a bulk setup, for one),
        so that it is not billed to the first scenario."""
        deadline = time.monotonic() + QUIET_TIMEOUT
        while time.monotonic() < deadline:
            window = CpuWindow({"server": self.pid})
            await asyncio.sleep(0.5)
            if window.percent()["server"] < QUIET_CPU:
                return

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not port_open(self.address, self.port):
            if self.proc.poll() is not None:
                raise ServerUnavailable(f"{self.name} exited with status {self.proc.returncode}; "
                                        f"see {self._log}")
            if time.monotonic() > deadline:
                await self.stop()
                raise ServerUnavailable(f"{self.name} did not listen within {START_TIMEOUT:.0f} s")
            await asyncio.sleep(0.2)

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        await self._reap(proc)

    async def _reap(self, proc: subprocess.Popen[bytes]) -> None:
        """Wait for our child to exit; past the time-out, kill its process group (ours alone)."""
        deadline = time.monotonic() + STOP_TIMEOUT
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


class Parley(BenchServer):
    name = "parley"
    default_address = "127.0.1.4"
    web = True  # an http listener with WebSocket and BOSH, for the web scenarios

    def check(self) -> None:
        from server.registry import available

        if self.profile.archive and "mam" not in available():
            raise ServerUnavailable("no archive (mam) module yet")

    @property
    def bosh_url(self) -> str | None:
        return f"http://{self.address}:{self.http_port}/http-bind"

    def _modules(self) -> list[str]:
        from server.registry import available

        installed = available()
        wanted = [*PARLEY_MODULES, "websocket", "bosh"] if self.web else PARLEY_MODULES
        wanted = [*wanted, "mam"] if self.profile.archive and not self.profile.full else wanted
        wanted = [*wanted, *FULL_MODULES] if self.profile.full else wanted
        missing = [m for m in wanted if m not in installed]
        if missing:
            self.notes.append(f"modules not in this checkout: {', '.join(missing)}")
        return [m for m in wanted if m in installed]

    @property
    def config_file(self) -> Path:
        return self.dir / "parley.toml"

    def _write_config(self) -> None:
        modules = ", ".join(f'"{m}"' for m in self._modules())
        http = f'''
[[listeners]]
type = "http"
address = "{self.address}"
port = {self.http_port}
''' if self.web else ""
        self.config_file.write_text(f"""\
data_dir = "{self.dir / 'data'}"
require_encryption = false
allow_unencrypted_plain = true
scram_iterations = {SCRAM_ITERATIONS}
modules = [{modules}]

[logging]
level = "warning"
file = "{self.dir / 'parley.log'}"

[limits]
c2s_rate = 1000000000
c2s_burst = 1000000000
max_connections_per_ip = 1000000
unauthenticated_timeout = 120.0
auth_max_failures = 1000000
offline_quota = 1000000

[[listeners]]
type = "c2s"
address = "{self.address}"
port = {self.port}
tls = "starttls"
{http}
[hosts."{self.domain}"]
{self._storage_section()}""")

    def _storage_section(self) -> str:
        if not self.profile.postgresql:
            return ""
        # Parley names its schema itself (and creates it if missing, which needs the superuser).
        return (f'\n[storage]\nurl = "postgresql+asyncpg://postgres@{PG_HOST}:{PG_PORT}/{PG_DATABASE}'
                f'?schema={self.pg_role}"\n')

    async def setup(self, users: list[str], password: str, rosters: dict[str, list[str]]) -> None:
        from server.accounts import credentials_for
        from server.config import load_config
        from server.registry import available
        from server.storage import open_storage
        from server.tls import ensure_certificate

        self.dir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        if self.profile.postgresql:
            await pg_fresh_schema(self.pg_role)
        config = load_config(self.config_file, known_modules=available())
        config.data_dir.mkdir(parents=True, exist_ok=True)
        for name, host in config.hosts.items():  # as the peers' certificates, made before their first start
            ensure_certificate(name, host.certificate, host.key)
        storage = await open_storage(config.storage.url)
        loop = asyncio.get_running_loop()
        try:
            # PBKDF2 releases the GIL: derive the keys on both cores, store them one by one.
            with ThreadPoolExecutor(max_workers=2) as pool:
                pending = [loop.run_in_executor(pool, credentials_for, password, SCRAM_ITERATIONS)
                           for _ in users]
                for user, creds in zip(users, await asyncio.gather(*pending), strict=True):
                    await storage.accounts.create(self.domain, user, creds)
            await self._store_rosters(storage, rosters)
        finally:
            await storage.close()

    async def _store_rosters(self, storage: Storage, rosters: dict[str, list[str]]) -> None:
        """All items in one transaction: RosterStore.put commits each item (about 100 a second here)."""
        from sqlalchemy import insert

        from server.storage.schema import roster

        rows = [{"host": self.domain, "username": user, "jid": f"{contact}@{self.domain}", "name": None,
                 "subscription": "both", "ask": False, "approved": False, "groups": []}
                for user, contacts in rosters.items() for contact in contacts]
        if rows:
            async with storage.engine.begin() as conn:
                await conn.execute(insert(roster), rows)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "parley", "serve", "--config", str(self.config_file)]

    @property
    def cwd(self) -> Path:
        """The repository root, so that this checkout's server package is the one imported."""
        return REPO


class ParleyWorkers(Parley):
    """Parley in two worker processes sharing the port, routing to each other over Redis (127.0.0.1:6379)."""

    name = "parley-2w"
    default_address = "127.0.1.5"
    web = False  # http listeners need a single process

    @property
    def bosh_url(self) -> str | None:
        return None

    def check(self) -> None:
        super().check()
        import redis

        try:
            redis.Redis.from_url(REDIS_URL, socket_timeout=2).ping()
        except redis.RedisError as exc:
            raise ServerUnavailable(f"no Redis at {REDIS_URL}: {exc}") from None

    def _write_config(self) -> None:
        super()._write_config()
        with open(self.config_file, "a") as fh:
            fh.write(f'\n[cluster]\nworkers = 2\nredis_url = "{REDIS_URL}"\nprefix = "parley-bench-{os.getpid()}"\n')


def _self_signed(domain: str, directory: Path) -> tuple[Path, Path]:
    from server.tls import ensure_certificate

    cert, key = directory / f"{domain}.crt", directory / f"{domain}.key"
    ensure_certificate(domain, cert, key)
    return cert, key


class Prosody(BenchServer):
    name = "prosody"
    default_address = "127.0.1.2"

    @property
    def bosh_url(self) -> str | None:
        return f"http://{self.address}:{self.http_port}/http-bind"

    def check(self) -> None:
        if shutil.which("prosody") is None:
            raise ServerUnavailable("not installed (apt-get install prosody lua-unbound)")
        if self.profile.postgresql and not list(Path("/usr/lib").glob("*/lua/*/dbd/postgresql.so")):
            raise ServerUnavailable("no LuaDBI PostgreSQL driver (apt-get install lua-dbi-postgresql)")

    @property
    def config_file(self) -> Path:
        return self.dir / "prosody.cfg.lua"

    async def setup(self, users: list[str], password: str, rosters: dict[str, list[str]]) -> None:
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        _self_signed(self.domain, self.dir)
        template = (CONFIGS / "prosody.cfg.lua").read_text()
        self.config_file.write_text(fill_template(template, {
            "ADDRESS": self.address, "PORT": str(self.port), "HTTP_PORT": str(self.http_port), "DIR": str(self.dir),
            "DOMAIN": self.domain,
            "EXTRA_MODULES": self._extra_modules(),
            "STORAGE": self._storage(),
        }))
        if self.profile.postgresql:
            await pg_fresh_schema(self.pg_role)
        await self.start()
        try:
            await _register_all(self.target, users, password)
        finally:
            await self.stop()
        if rosters and self.profile.postgresql:
            raise ServerUnavailable("fan-out rosters are written as Prosody's files, not into PostgreSQL")
        self._write_rosters(rosters)

    def _extra_modules(self) -> str:
        """The profile's modules, as entries of modules_enabled."""
        if self.profile.full:
            self.notes.append("full profile: no push module (mod_cloud_notify is not in Prosody 0.12)")
            return "".join(f'"{m}"; ' for m in PROSODY_FULL)
        return '"mam";' if self.profile.archive else ""

    def _storage(self) -> str:
        """mod_storage_sql on the machine's PostgreSQL (LuaDBI), or Prosody's files."""
        if not self.profile.postgresql:
            return 'storage = "internal"'
        return (f'storage = "sql"\nsql = {{ driver = "PostgreSQL", database = "{PG_DATABASE}", '
                f'username = "{self.pg_role}", host = "{PG_HOST}", port = {PG_PORT} }}')

    def _write_rosters(self, rosters: dict[str, list[str]]) -> None:
        """Roster files in Prosody's internal storage format, written while it is stopped. Over XMPP,
        Prosody settles only about 80 subscription changes per second with 100-contact rosters."""
        def encode(name: str) -> str:  # Prosody's datamanager escapes every non-alphanumeric byte
            return "".join(c if c.isalnum() else f"%{ord(c):02x}" for c in name)

        folder = self.dir / "data" / encode(self.domain) / "roster"
        folder.mkdir(parents=True, exist_ok=True)
        for user, contacts in rosters.items():
            items = "".join(f'["{c}@{self.domain}"] = {{ subscription = "both"; groups = {{}} }};\n'
                            for c in contacts)
            (folder / f"{encode(user)}.dat").write_text(
                f"return {{\n[false] = {{ version = 1; pending = {{}} }};\n{items}}};\n")

    def command(self) -> list[str]:
        return ["prosody", "--config", str(self.config_file)]


async def _register_all(target: Target, users: list[str], password: str, concurrency: int = 20) -> None:
    gate = asyncio.Semaphore(concurrency)

    async def one(user: str) -> None:
        async with gate:
            await register(target, user, password)

    await asyncio.gather(*(one(u) for u in users))


class Ejabberd(BenchServer):
    name = "ejabberd"
    default_address = "127.0.1.3"
    ws_path = "/ws"
    node = "parley-bench-ejabberd@localhost"

    @property
    def bosh_url(self) -> str | None:
        return f"http://{self.address}:{self.http_port}/bosh"

    def check(self) -> None:
        if shutil.which("ejabberdctl") is None:
            raise ServerUnavailable("not installed (apt-get install ejabberd)")

    def _ctl(self, *args: str) -> list[str]:
        d = self.dir
        return ["ejabberdctl", "--config-dir", str(d), "--ctl-config", str(d / "ejabberdctl.cfg"),
                "--spool", str(d / "spool"), "--logs", str(d / "logs"), "--config", str(d / "ejabberd.yml"),
                "--node", self.node, *args]

    def spawn_options(self) -> dict[str, Any]:
        """Run ejabberdctl as the ejabberd user ourselves: started by root it would switch users with su,
        whose PAM session sets the open-file limit back to 1,024 (and the node dies near that many
        connections)."""
        account = pwd.getpwnam("ejabberd")
        env = {**os.environ, "HOME": account.pw_dir, "USER": account.pw_name, "LOGNAME": account.pw_name}
        return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": [], "env": env}

    @property
    def pid(self) -> int:
        # ejabberdctl runs erl, a script; the Erlang VM (beam.smp) is what does the work.
        assert self.proc is not None
        return find_descendant(self.proc.pid, "beam.smp") or self.proc.pid

    async def setup(self, users: list[str], password: str, rosters: dict[str, list[str]]) -> None:
        d = self.dir
        for sub in ("spool", "logs"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        cert, key = _self_signed(self.domain, d)
        (d / f"{self.domain}.pem").write_text(cert.read_text() + key.read_text())
        extra = "  mod_mam:\n    assume_mam_usage: true\n    default: always\n" if self.profile.archive else ""
        extra += EJABBERD_FULL if self.profile.full else ""
        (d / "ejabberd.yml").write_text(fill_template((CONFIGS / "ejabberd.yml").read_text(), {
            "ADDRESS": self.address, "PORT": str(self.port), "HTTP_PORT": str(self.http_port), "DIR": str(d),
            "DOMAIN": self.domain, "EXTRA_MODULES": extra, "STORAGE": self._storage(),
        }))
        if self.profile.postgresql:
            await self._pg_schema()
        # Our own ejabberdctl.cfg: Debian's sets EJABBERD_CONFIG_PATH, which would override --config.
        (d / "ejabberdctl.cfg").write_text('ERL_OPTIONS="-env ERL_CRASH_DUMP_BYTES 0"\nERL_MAX_PORTS=65536\n')
        shutil.copy("/etc/ejabberd/inetrc", d / "inetrc")
        account = pwd.getpwnam("ejabberd")
        for path in (d.parent, d):
            path.chmod(0o755)
        for path in [d, *d.rglob("*")]:
            os.chown(path, account.pw_uid, account.pw_gid)
        await self.start()
        try:
            await self._api("register", [{"user": u, "host": self.domain, "password": password} for u in users])
            # Over XMPP, ejabberd settles only about 75 subscription changes per second here.
            await self._api("add_rosteritem", [
                {"localuser": user, "localhost": self.domain, "user": contact, "host": self.domain,
                 "nick": contact, "group": "", "subs": "both"}
                for user, contacts in rosters.items() for contact in contacts])
        finally:
            await self.stop()

    def _storage(self) -> str:
        """Every module on the machine's PostgreSQL, or on Mnesia (ejabberd's default)."""
        if not self.profile.postgresql:
            return ""
        return (f"sql_type: pgsql\nsql_server: \"{PG_HOST}\"\nsql_port: {PG_PORT}\nsql_database: \"{PG_DATABASE}\"\n"
                f"sql_username: \"{self.pg_role}\"\nsql_password: \"\"\nnew_sql_schema: true\n"
                "default_db: sql\nauth_method: sql\n")

    async def _pg_schema(self) -> None:
        """The schema Debian's package ships (new_sql_schema), created in the role's own schema."""
        sql = next((p for p in (Path("/usr/share/ejabberd/sql/pg.new.sql"),
                                Path("/usr/lib/ejabberd/priv/sql/pg.new.sql")) if p.exists()), None)
        if sql is None:
            raise ServerUnavailable("ejabberd's pg.new.sql is not installed")
        await pg_fresh_schema(self.pg_role)
        loaded = await asyncio.create_subprocess_exec(
            "psql", "-q", "-v", "ON_ERROR_STOP=1", "-h", PG_HOST, "-p", str(PG_PORT), "-U", self.pg_role,
            "-d", PG_DATABASE, "-f", str(sql), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, err = await loaded.communicate()
        if loaded.returncode != 0:
            raise ServerUnavailable(f"loading {sql} failed: {err.decode().strip()[-300:]}")

    async def _api(self, command: str, calls: list[dict[str, str]]) -> None:
        """Many calls of one command of the HTTP API (in-band registration is throttled per address)."""
        import aiohttp

        url = f"http://{self.address}:{self.http_port}/api/{command}"
        gate = asyncio.Semaphore(20)
        async with aiohttp.ClientSession() as http:

            async def one(body: dict[str, str]) -> None:
                async with gate, http.post(url, json=body) as response:
                    text = await response.text()
                    if response.status != 200 and "already" not in text:
                        raise ServerUnavailable(f"ejabberd API {command} failed: {response.status} {text}")

            await asyncio.gather(*(one(body) for body in calls))

    def command(self) -> list[str]:
        return self._ctl("foreground")

    async def _wait_ready(self) -> None:
        """The c2s port opens before every module is up; `ejabberdctl started` waits for all of them."""
        await super()._wait_ready()
        await self._ctl_run("started", START_TIMEOUT)

    async def _ctl_run(self, command: str, timeout: float) -> None:
        """Run an ejabberdctl command as the ejabberd user, in a thread: uvloop's subprocesses (bench.muc_fanout
        runs on uvloop) take no user or group."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(subprocess.run, self._ctl(command), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, cwd=self.dir, timeout=timeout,
                                    **self.spawn_options())

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        await self._ctl_run("stop", STOP_TIMEOUT)
        await self._reap(proc)


SERVERS: dict[str, type[BenchServer]] = {"parley": Parley, "parley-2w": ParleyWorkers, "prosody": Prosody,
                                         "ejabberd": Ejabberd}
