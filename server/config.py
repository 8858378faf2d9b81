"""Server configuration: a TOML file validated into dataclasses.

Validation happens once at start-up so that the rest of the server can trust every value; any problem
is reported as a single ConfigError that names the offending key.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
import tomllib
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from server.jid import JID, JIDError
from server.options import check_option
from server.registry import available, load
from server.stream.writer import not_xml

DEFAULT_MODULES: list[str] = [
    "roster", "presence", "offline", "disco", "caps", "version", "time", "last", "ping", "register", "vcard",
    "carbons", "blocking", "mam", "csi", "stream_management", "adhoc", "announce",
    "pep", "pubsub", "private", "bookmarks", "muc", "push",
]

LISTENER_TYPES = ("c2s", "s2s", "component", "http")
TLS_MODES = ("starttls", "direct", "none")
LOG_LEVELS = ("debug", "info", "warning", "error")
STORAGE_SCHEMES = ("sqlite+aiosqlite", "postgresql+asyncpg")
DEFAULT_STORAGE_URL = "sqlite+aiosqlite:///{data_dir}/parley.db"
DEFAULT_DATA_DIR = "./parley-data"
# Where `parley` and `parleyctl` look for the server's configuration when no --config is given.
SYSTEM_CONFIG = Path("/etc/parley/parley.toml")
CONFIG_ENV = "PARLEY_CONFIG"
DATA_ENV = "PARLEY_DATA"  # the data folder of a configuration that names none (an ejabberd.yml cannot)
DEFAULT_API_NETWORKS = ("127.0.0.0/8", "::1/128")
MIN_TOKEN_LENGTH = 16
# XEP-0114 components and plain HTTP have no STARTTLS; the XMPP stream listeners do.
_DEFAULT_TLS = {"c2s": "starttls", "s2s": "starttls", "component": "none", "http": "none"}
log = logging.getLogger("parley.config")
_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*")


class ConfigError(Exception):
    """A configuration value is invalid; `key` is its path, e.g. 'listeners[1].port'."""

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        self.reason = reason
        self.errors: list[ConfigError] = [self]
        super().__init__(f"config key '{key}': {reason}" if key else reason)


class ConfigErrors(ConfigError):
    """Several problems found in one pass (the module options), so that one run of check-config lists them all;
    `key` and `reason` are the first one's."""

    def __init__(self, errors: list[ConfigError]) -> None:
        super().__init__(errors[0].key, errors[0].reason)
        self.errors = errors

    def __str__(self) -> str:
        return "\n".join(str(error) for error in self.errors)


@dataclass
class ListenerConfig:
    type: str
    address: str
    port: int
    tls: str


@dataclass
class LimitsConfig:
    max_stanza_size: int = 262144
    max_depth: int = 64
    c2s_rate: int = 65536  # bytes/s per connection
    c2s_burst: int = 262144
    max_connections_per_ip: int = 64
    max_connections: int = 0  # 0 = derive from RLIMIT_NOFILE minus a reserve
    unauthenticated_timeout: float = 30.0
    auth_max_failures: int = 5
    auth_lockout: float = 60.0
    offline_quota: int = 1000
    max_output_total: int = 256 * 1024 * 1024  # bytes held for clients that read slower than written, together
    output_timeout: float = 60.0  # seconds a client may leave its output blocked, reading nothing


@dataclass
class HostConfig:
    name: str
    certificate: Path
    key: Path
    registration: bool = False
    admins: list[str] = field(default_factory=list)
    modules: list[str] = field(default_factory=lambda: list(DEFAULT_MODULES))  # effective list for this host
    # Module options as 'module.option' -> value: [module_options.X] merged with this host's own.
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class StorageConfig:
    url: str


REDIS_CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")


@dataclass
class ClusterConfig:
    """Processes routing to each other through Redis: the workers of one node sharing its listening ports, and
    the nodes (machines) sharing one Redis prefix and one PostgreSQL database."""

    workers: int = 1  # worker processes of this node
    redis_url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "parley"  # of every Redis key and channel, so that several servers can share one Redis
    node: str | None = None  # this node's name, unique in the cluster; set, it makes this process part of a cluster

    @property
    def active(self) -> bool:
        """A cluster (Redis, member ids, heartbeats) rather than one process: several workers, or a named node."""
        return self.workers > 1 or self.node is not None

    @property
    def sharded(self) -> bool:
        """`redis_url` names a Redis Cluster (redis+cluster://, rediss+cluster://) rather than one Redis."""
        return self.redis_url.startswith(REDIS_CLUSTER_SCHEMES)

    @property
    def node_name(self) -> str:
        """The node's name in member ids: the configured one, else the machine's host name."""
        return self.node or socket.gethostname().split(".")[0] or "n1"


@dataclass
class LoggingConfig:
    level: str = "info"
    file: Path | None = None
    syslog: bool = False  # to the local syslog daemon (/dev/log) instead of standard error or the file


@dataclass
class StaticRoute:
    """Where to reach a remote domain without DNS: address, port, and STARTTLS or Direct TLS."""

    address: str
    port: int
    tls: str = "starttls"


@dataclass
class DomainLimits:
    """What one remote domain may cost us: its read rate (bytes/s, with a burst) and stanza rate (stanzas/s,
    with a burst) over all its connections, and how many stanzas may wait for it while its link comes up."""

    rate: int = 262144
    burst: int = 1048576
    stanza_rate: int = 2000
    stanza_burst: int = 10000
    max_queue: int = 10000


@dataclass
class S2SConfig:
    """Federation policy (the [s2s] table); domains are stored in their prepared form."""

    require_encryption: bool = True
    require_valid_certificates: bool = True
    ca_bundle: Path | None = None  # None: the system's trusted CAs
    accept_self_signed: list[str] = field(default_factory=list)
    allow: list[str] = field(default_factory=list)  # empty: every domain not denied
    deny: list[str] = field(default_factory=list)
    static: dict[str, StaticRoute] = field(default_factory=dict)
    bidi: bool = True  # XEP-0288: one connection carries stanzas both ways when the peer agrees
    connect_timeout: float = 10.0
    idle_timeout: float = 600.0
    ack_timeout: float = 60.0  # XEP-0198: seconds the peer may leave our <r/> unanswered
    limits: DomainLimits = field(default_factory=DomainLimits)  # for every remote domain...
    domains: dict[str, DomainLimits] = field(default_factory=dict)  # ...unless one of these covers it
    max_incoming: int = 1000  # incoming server-to-server connections at once
    max_incoming_per_ip: int = 32


@dataclass
class ComponentConfig:
    """An external component (XEP-0114) allowed to serve a domain once it proves the shared secret."""

    secret: str


@dataclass
class HttpApiConfig:
    """Who may call the HTTP API (the [http_api] table): admins with their password, or this bearer token
    for the server's operator, and only from these networks."""

    token: str | None = None
    allowed_networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = field(
        default_factory=lambda: [ipaddress.ip_network(n) for n in DEFAULT_API_NETWORKS])


@dataclass
class TenantsConfig:
    """Virtual hosts created at run time (the [tenants] table): what a new tenant starts from, and how long a
    removed one's data is kept before it is deleted."""

    template: str | None = None  # a configured host whose modules and module options a new tenant takes
    certificate: Path | None = None  # a shared (wildcard) certificate for tenants created without their own
    key: Path | None = None
    removal_grace: float = 7 * 86400.0  # seconds between remove-tenant and the deletion of the tenant's data
    max_accounts: int = 0  # the quotas a new tenant starts with; 0: no limit
    max_storage: int = 0  # bytes of archived and offline messages
    max_upload: int = 0  # bytes of uploaded files
    max_rate: int = 0  # messages per second, over all the tenant's users


@dataclass
class Config:
    data_dir: Path
    hosts: dict[str, HostConfig]
    listeners: list[ListenerConfig]
    storage: StorageConfig
    limits: LimitsConfig
    logging: LoggingConfig
    require_encryption: bool = True
    scram_iterations: int = 4096
    allow_unencrypted_plain: bool = False
    # XEP-0474's 'h' in legacy SASL's SCRAM challenge; SASL2 always has it (see server/c2s.py)
    scram_downgrade_protection: bool = False
    source: Path | None = None
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    s2s: S2SConfig = field(default_factory=S2SConfig)
    http_api: HttpApiConfig = field(default_factory=HttpApiConfig)
    components: dict[str, ComponentConfig] = field(default_factory=dict)  # by domain
    # Reverse proxies in front of the http listeners whose X-Forwarded-For/Forwarded headers are believed.
    trusted_proxies: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = field(default_factory=list)
    tenants: TenantsConfig = field(default_factory=TenantsConfig)


def find_config(given: str | None) -> Path | None:
    """The configuration file a command means: the one given, else $PARLEY_CONFIG, else SYSTEM_CONFIG when
    it exists; None for the built-in configuration. `parley serve`, `parley user` and parleyctl all look
    here, so that run from any folder they agree on the server's data."""
    if given:
        return Path(given)
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    return SYSTEM_CONFIG if SYSTEM_CONFIG.is_file() else None


def config_option(argv: list[str]) -> tuple[str | None, list[str]]:
    """Take `--config FILE` (or `--config=FILE`) out of a command line wherever it stands, before or after a
    subcommand and its arguments; the last one given wins."""
    given, rest, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" and i + 1 < len(argv):
            given, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--config="):
            given = arg.removeprefix("--config=")
        else:
            rest.append(arg)
        i += 1
    return given, rest


def load_config(path: Path | None, known_modules: set[str] | None = None) -> Config:
    """Read and validate a config file; None gives the built-in defaults."""
    if path is None:
        return parse_config({}, None, known_modules)
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"config file {path} is not valid TOML: {exc}") from None
    return parse_config(data, Path(path), known_modules)


def parse_config(data: dict[str, Any], source: Path | None = None,
                 known_modules: set[str] | None = None, data_dir: str = DEFAULT_DATA_DIR) -> Config:
    """Validate already-decoded TOML; relative paths resolve against the folder of `source` (or the cwd).
    Without a `data_dir` key the data folder is $PARLEY_DATA (relative to the cwd), else `data_dir`."""
    base = Path(os.path.abspath(source)).parent if source is not None else Path.cwd()
    _check_text(data, "")
    top = _Table(data, "")
    from_env = os.path.abspath(os.environ[DATA_ENV]) if os.environ.get(DATA_ENV) else None
    data_dir = _resolve(base, top.string("data_dir", from_env or data_dir))
    require_encryption = top.boolean("require_encryption", True)
    scram_iterations = top.integer("scram_iterations", 4096, minimum=1)
    allow_unencrypted_plain = top.boolean("allow_unencrypted_plain", False)
    scram_downgrade_protection = top.boolean("scram_downgrade_protection", False)
    modules = _module_list(top, "modules", list(DEFAULT_MODULES), known_modules)
    errors: list[ConfigError] = []  # in module options: reported together at the end
    options = _module_options(top, known_modules, errors)

    storage = _storage(top.table("storage"), data_dir)
    logging = _logging(top.table("logging"), base)
    limits = _limits(top.table("limits"))
    listeners = _listeners(top)
    hosts = _hosts(top, base, data_dir, modules, options, known_modules, errors)
    errors += _unloaded("module_options", options, {m for host in hosts.values() for m in host.modules}, "on any host")
    s2s = _s2s(top.table("s2s"), base)
    http_api = _http_api(top.table("http_api"))
    trusted_proxies = _networks(top, "trusted_proxies", [])
    components = _components(top.table("components"), hosts)
    cluster = _cluster(top.table("cluster"))
    tenants = _tenants(top.table("tenants"), base, hosts)
    top.finish()
    check_cluster_storage(cluster, storage)
    if errors:
        raise ConfigErrors(errors)
    return Config(
        cluster=cluster,
        http_api=http_api,
        data_dir=data_dir, hosts=hosts, listeners=listeners, storage=storage, limits=limits, logging=logging,
        require_encryption=require_encryption, scram_iterations=scram_iterations, source=source,
        allow_unencrypted_plain=allow_unencrypted_plain, scram_downgrade_protection=scram_downgrade_protection,
        s2s=s2s, components=components,
        trusted_proxies=trusted_proxies, tenants=tenants,
    )


def _check_text(value: Any, key: str) -> None:
    """Refuse a string anywhere in the file that holds a character XML cannot carry: TOML and YAML escapes
    can write one, and messages the server sends (welcome texts, module options) come from here."""
    if isinstance(value, str):
        if char := not_xml(value):
            raise ConfigError(key, f"contains {char}, a character XML does not allow")
    elif isinstance(value, dict):
        for name, item in value.items():
            _check_text(name, key)
            _check_text(item, f"{key}.{name}" if key else str(name))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_text(item, f"{key}[{i}]")


class _Table:
    """One TOML table being validated: remembers its key path and which keys were read."""

    def __init__(self, data: Any, path: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(path, "must be a table")
        self.data = data
        self.path = path
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def get(self, name: str) -> Any:
        self.seen.add(name)
        return self.data.get(name)

    def table(self, name: str) -> _Table:
        value = self.get(name)
        return _Table({} if value is None else value, self.key(name))

    def string(self, name: str, default: str | None) -> str:
        value = self.get(name)
        if value is None:
            if default is None:
                raise ConfigError(self.key(name), "is required")
            return default
        if not isinstance(value, str) or not value:
            raise ConfigError(self.key(name), "must be a non-empty string")
        return value

    def choice(self, name: str, default: str | None, choices: tuple[str, ...]) -> str:
        value = self.string(name, default)
        if value not in choices:
            raise ConfigError(self.key(name), f"must be one of {', '.join(choices)}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ConfigError(self.key(name), "must be true or false")
        return value

    def integer(self, name: str, default: int | None, minimum: int, maximum: int | None = None) -> int:
        value = self.get(name)
        if value is None:
            if default is None:
                raise ConfigError(self.key(name), "is required")
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum or \
                (maximum is not None and value > maximum):
            span = f"from {minimum} to {maximum}" if maximum is not None else f"of at least {minimum}"
            raise ConfigError(self.key(name), f"must be an integer {span}")
        return value

    def seconds(self, name: str, default: float, minimum: float) -> float:
        value = self.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > minimum:
            raise ConfigError(self.key(name), f"must be a number of seconds greater than {minimum:g}")
        return float(value)

    def strings(self, name: str, default: list[str]) -> list[str]:
        value = self.get(name)
        if value is None:
            return default
        if not isinstance(value, list):
            raise ConfigError(self.key(name), "must be a list of strings")
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item:
                raise ConfigError(f"{self.key(name)}[{i}]", "must be a non-empty string")
        return list(value)

    def finish(self) -> None:
        """Reject keys nobody asked for: they are almost always typos."""
        for name in self.data:
            if name not in self.seen:
                raise ConfigError(self.key(_toml_key(name)), "unknown key")


def _toml_key(name: str) -> str:
    """Quote a key the way it must be written in TOML when it is not a bare key."""
    if name and all(c.isascii() and (c.isalnum() or c in "-_") for c in name):
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _resolve(base: Path, value: str) -> Path:
    return Path(os.path.normpath(base / Path(value).expanduser()))


def _module_list(table: _Table, name: str, default: list[str], known: set[str] | None) -> list[str]:
    given = name in table.data
    modules = table.strings(name, default)
    if known is not None:
        for i, module in enumerate(modules):
            if module not in known:
                valid = ", ".join(sorted(known))
                reason = (f"unknown module {module!r} (valid: {valid})" if given else
                          f"built-in default module {module!r} is not installed; set '{table.key(name)}' "
                          f"to the modules wanted (valid: {valid})")
                raise ConfigError(f"{table.key(name)}[{i}]", reason)
    return list(dict.fromkeys(modules))


def _storage(table: _Table, data_dir: Path) -> StorageConfig:
    url = table.string("url", DEFAULT_STORAGE_URL)
    table.finish()
    scheme, sep, _ = url.partition("://")
    if not sep or scheme not in STORAGE_SCHEMES:
        raise ConfigError(table.key("url"), f"must be a URL with scheme {' or '.join(STORAGE_SCHEMES)}")
    return StorageConfig(url=url.replace("{data_dir}", str(data_dir)))


def _cluster(table: _Table) -> ClusterConfig:
    d = ClusterConfig()
    node = table.string("node", "") or None
    cluster = ClusterConfig(
        workers=table.integer("workers", d.workers, minimum=1, maximum=64),
        redis_url=table.string("redis_url", d.redis_url),
        prefix=table.string("prefix", d.prefix),
        node=node,
    )
    table.finish()
    if not cluster.redis_url.startswith(("redis://", "rediss://", "unix://", *REDIS_CLUSTER_SCHEMES)):
        raise ConfigError(table.key("redis_url"), "must be a redis://, rediss:// or unix:// URL, or a "
                          "redis+cluster:// or rediss+cluster:// URL of one node of a Redis Cluster")
    if cluster.sharded and urlsplit(cluster.redis_url).path not in ("", "/", "/0"):
        raise ConfigError(table.key("redis_url"), "a Redis Cluster has database 0 only: leave out the /N")
    if node is not None and (problem := node_name_problem(node)):
        raise ConfigError(table.key("node"), problem)
    return cluster


def _tenants(table: _Table, base: Path, hosts: dict[str, HostConfig]) -> TenantsConfig:
    d = TenantsConfig()
    template = table.get("template")
    if template is not None:
        template = _domain(table.key("template"), template) if isinstance(template, str) and template else ""
        if template not in hosts:
            raise ConfigError(table.key("template"), "must name a host of [hosts], whose modules new tenants take")
    certificate, key = table.get("certificate"), table.get("key")
    if (certificate is None) != (key is None):
        raise ConfigError(table.key("key" if key is None else "certificate"),
                          "a shared certificate needs both certificate and key")
    tenants = TenantsConfig(
        template=template,
        certificate=_tls_file(table, "certificate", base, Path()) if certificate is not None else None,
        key=_tls_file(table, "key", base, Path()) if key is not None else None,
        removal_grace=table.seconds("removal_grace", d.removal_grace, 0),
        max_accounts=table.integer("max_accounts", d.max_accounts, minimum=0),
        max_storage=table.integer("max_storage", d.max_storage, minimum=0),
        max_upload=table.integer("max_upload", d.max_upload, minimum=0),
        max_rate=table.integer("max_rate", d.max_rate, minimum=0),
    )
    table.finish()
    return tenants


def node_name_problem(name: str) -> str | None:
    """Why a node name cannot be one (it is part of member ids and Redis keys), or None."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", name):
        return "must be 1 to 63 letters, digits, '.', '_' or '-', starting with a letter or digit"
    return None


def check_cluster_storage(cluster: ClusterConfig, storage: StorageConfig) -> None:
    """A named node belongs to a cluster that may span machines, which share one database: SQLite, a file on one
    machine, cannot be it. (Unnamed, several workers of one machine may share a SQLite file; a second node that
    starts against SQLite anyway is refused when it finds the first one live in Redis.)"""
    if cluster.node is not None and storage.url.startswith("sqlite"):
        raise ConfigError("cluster.node", "the nodes of a cluster share one database: set [storage] url to "
                          "PostgreSQL (postgresql+asyncpg://...), SQLite is a file on one machine")


def _logging(table: _Table, base: Path) -> LoggingConfig:
    level = table.string("level", "info").lower()
    if level not in LOG_LEVELS:
        raise ConfigError(table.key("level"), f"must be one of {', '.join(LOG_LEVELS)}")
    file = table.get("file")
    if file is not None and (not isinstance(file, str) or not file):
        raise ConfigError(table.key("file"), "must be a non-empty string")
    syslog = table.boolean("syslog", False)
    if syslog and file is not None:
        raise ConfigError(table.key("syslog"), "log to syslog or to a file, not both: leave out one of them")
    table.finish()
    return LoggingConfig(level=level, file=_resolve(base, file) if file else None, syslog=syslog)


def _limits(table: _Table) -> LimitsConfig:
    d = LimitsConfig()
    limits = LimitsConfig(
        max_stanza_size=table.integer("max_stanza_size", d.max_stanza_size, minimum=1),
        max_depth=table.integer("max_depth", d.max_depth, minimum=1),
        c2s_rate=table.integer("c2s_rate", d.c2s_rate, minimum=1),
        c2s_burst=table.integer("c2s_burst", d.c2s_burst, minimum=1),
        max_connections_per_ip=table.integer("max_connections_per_ip", d.max_connections_per_ip, minimum=1),
        max_connections=table.integer("max_connections", d.max_connections, minimum=0),
        unauthenticated_timeout=table.seconds("unauthenticated_timeout", d.unauthenticated_timeout, 0),
        auth_max_failures=table.integer("auth_max_failures", d.auth_max_failures, minimum=1),
        auth_lockout=table.seconds("auth_lockout", d.auth_lockout, 0),
        offline_quota=table.integer("offline_quota", d.offline_quota, minimum=1),
        max_output_total=table.integer("max_output_total", d.max_output_total, minimum=1),
        output_timeout=table.seconds("output_timeout", d.output_timeout, 0),
    )
    table.finish()
    return limits


def _s2s(table: _Table, base: Path) -> S2SConfig:
    d = S2SConfig()
    limits = _domain_limits(table, d.limits)
    ca_bundle = table.get("ca_bundle")
    if ca_bundle is not None and (not isinstance(ca_bundle, str) or not ca_bundle):
        raise ConfigError(table.key("ca_bundle"), "must be a non-empty string (a file path)")
    config = S2SConfig(
        require_encryption=table.boolean("require_encryption", d.require_encryption),
        require_valid_certificates=table.boolean("require_valid_certificates", d.require_valid_certificates),
        ca_bundle=_resolve(base, ca_bundle) if ca_bundle else None,
        accept_self_signed=_domains(table, "accept_self_signed"),
        allow=_domains(table, "allow"),
        deny=_domains(table, "deny"),
        static=_static_routes(table.table("static")),
        bidi=table.boolean("bidi", d.bidi),
        connect_timeout=table.seconds("connect_timeout", d.connect_timeout, 0),
        idle_timeout=table.seconds("idle_timeout", d.idle_timeout, 0),
        ack_timeout=table.seconds("ack_timeout", d.ack_timeout, 0),
        limits=limits,
        domains=_per_domain_limits(table.table("domains"), limits),
        max_incoming=table.integer("max_incoming", d.max_incoming, minimum=1),
        max_incoming_per_ip=table.integer("max_incoming_per_ip", d.max_incoming_per_ip, minimum=1),
    )
    table.finish()
    return config


def _domain_limits(table: _Table, default: DomainLimits) -> DomainLimits:
    """The limits keys of the [s2s] table or of one [s2s.domains."X"] table, which falls back on [s2s]."""
    return DomainLimits(rate=table.integer("rate", default.rate, minimum=1),
                        burst=table.integer("burst", default.burst, minimum=1),
                        stanza_rate=table.integer("stanza_rate", default.stanza_rate, minimum=1),
                        stanza_burst=table.integer("stanza_burst", default.stanza_burst, minimum=1),
                        max_queue=table.integer("max_queue", default.max_queue, minimum=1))


def _per_domain_limits(table: _Table, default: DomainLimits) -> dict[str, DomainLimits]:
    limits: dict[str, DomainLimits] = {}
    for given in list(table.data):
        entry = _Table(table.get(given), f"{table.path}.{_toml_key(given)}")
        limits[_domain(entry.path, given)] = _domain_limits(entry, default)
        entry.finish()
    return limits


def _domain(key: str, text: str) -> str:
    try:
        jid = JID.make(None, text)
    except JIDError as exc:
        raise ConfigError(key, f"invalid domain {text!r}: {exc}") from None
    return str(jid)


def _domains(table: _Table, name: str) -> list[str]:
    return [_domain(f"{table.key(name)}[{i}]", text) for i, text in enumerate(table.strings(name, []))]


def _static_routes(table: _Table) -> dict[str, StaticRoute]:
    routes: dict[str, StaticRoute] = {}
    for given in list(table.data):
        entry = _Table(table.get(given), f"{table.path}.{_toml_key(given)}")
        address = entry.string("address", None)
        if not _valid_address(address):
            raise ConfigError(entry.key("address"), "must be an IP address or a host name")
        route = StaticRoute(address=address, port=entry.integer("port", 5269, minimum=1, maximum=65535),
                            tls=entry.choice("tls", "starttls", ("starttls", "direct")))
        entry.finish()
        routes[_domain(entry.path, given)] = route
    return routes


def _components(table: _Table, hosts: dict[str, HostConfig]) -> dict[str, ComponentConfig]:
    components: dict[str, ComponentConfig] = {}
    for given in list(table.data):
        entry = _Table(table.get(given), f"{table.path}.{_toml_key(given)}")
        domain = _domain(entry.path, given)
        if domain in hosts:
            raise ConfigError(entry.path, f"{domain} is a host; a component needs a domain of its own")
        components[domain] = ComponentConfig(secret=entry.string("secret", None))
        entry.finish()
    return components


def _http_api(table: _Table) -> HttpApiConfig:
    token = table.get("token")
    if token is not None and (not isinstance(token, str) or len(token) < MIN_TOKEN_LENGTH):
        raise ConfigError(table.key("token"), f"must be a string of at least {MIN_TOKEN_LENGTH} characters")
    networks = _networks(table, "allowed_networks", list(DEFAULT_API_NETWORKS))
    table.finish()
    return HttpApiConfig(token=token, allowed_networks=networks)


def _networks(table: _Table, name: str, default: list[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """A list of addresses or networks ("10.0.0.1", "10.0.0.0/8", "::1")."""
    networks = []
    for i, text in enumerate(table.strings(name, default)):
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError as exc:
            raise ConfigError(f"{table.key(name)}[{i}]", f"invalid network: {exc}") from None
    return networks


def _default_listeners() -> list[dict[str, Any]]:
    return [
        {"type": "c2s", "address": "127.0.0.1", "port": 5222, "tls": "starttls"},
        {"type": "c2s", "address": "127.0.0.1", "port": 5223, "tls": "direct"},
    ]


def _listeners(top: _Table) -> list[ListenerConfig]:
    raw = top.get("listeners")
    if raw is None:
        raw = _default_listeners()
    if not isinstance(raw, list):
        raise ConfigError("listeners", "must be an array of tables ([[listeners]])")
    if not raw:
        raise ConfigError("listeners", "at least one listener is required")
    listeners: list[ListenerConfig] = []
    bound: dict[tuple[str, int], int] = {}
    for i, item in enumerate(raw):
        table = _Table(item, f"listeners[{i}]")
        kind = table.choice("type", None, LISTENER_TYPES)
        address = table.string("address", None)
        if not _valid_address(address):
            raise ConfigError(table.key("address"), "must be an IP address or a host name")
        port = table.integer("port", None, minimum=1, maximum=65535)
        tls = table.choice("tls", _DEFAULT_TLS[kind], TLS_MODES)
        if kind == "http" and tls == "starttls":
            raise ConfigError(table.key("tls"), "HTTP has no STARTTLS: use direct (HTTPS) or none")
        if kind == "component" and tls != "none":
            raise ConfigError(table.key("tls"), "XEP-0114 components speak plain TCP: use none, on a private address")
        table.finish()
        if (address, port) in bound:
            other = bound[address, port]
            raise ConfigError(table.path, f"{address} port {port} is already used by listeners[{other}]")
        bound[address, port] = i
        listeners.append(ListenerConfig(type=kind, address=address, port=port, tls=tls))
    return listeners


def _valid_address(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return _HOSTNAME.fullmatch(address) is not None
    return True


def _hosts(top: _Table, base: Path, data_dir: Path, modules: list[str], options: dict[str, Any],
           known: set[str] | None, errors: list[ConfigError]) -> dict[str, HostConfig]:
    raw = top.get("hosts")
    if raw is None:
        raw = {"localhost": {"admins": ["admin@localhost"]}}
    if not isinstance(raw, dict):
        raise ConfigError("hosts", 'must be a table of hosts ([hosts."example.org"])')
    if not raw:
        raise ConfigError("hosts", "at least one host is required")
    hosts: dict[str, HostConfig] = {}
    for given, item in raw.items():
        table = _Table(item, f"hosts.{_toml_key(given)}")
        try:
            host = JID.make(None, given)
        except JIDError as exc:
            raise ConfigError(table.path, f"invalid host name: {exc}") from None
        name = str(host)
        if name in hosts:
            raise ConfigError(table.path, f"same host as another entry ({name})")
        own = _module_options(table, known, errors)
        host_modules = _host_modules(table, modules, known)
        errors += _unloaded(table.key("module_options"), own, host_modules, "on this host")
        hosts[name] = HostConfig(
            name=name,
            certificate=_tls_file(table, "certificate", base, data_dir / "certs" / f"{name}.crt"),
            key=_tls_file(table, "key", base, data_dir / "certs" / f"{name}.key"),
            registration=table.boolean("registration", False),
            admins=_admins(table, host),
            modules=host_modules,
            options={**options, **own},
        )
        table.finish()
    return hosts


def _tls_file(table: _Table, name: str, base: Path, default: Path) -> Path:
    """A host's certificate or key. Only the default files are generated (self-signed) when missing: a
    configured file that is not there is a mistake, and serving a self-signed certificate in its place would
    hide it until clients refuse to connect."""
    value = table.get(name)
    if value is None:
        return default
    if not isinstance(value, str) or not value:
        raise ConfigError(table.key(name), "must be a non-empty string (a file path)")
    path = _resolve(base, value)
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise ConfigError(table.key(name), f"{path} does not exist (a self-signed pair is generated only "
                                           f"for a host that leaves both out, in {default.parent})") from None
    except OSError:
        pass  # not ours to read (a check-config as another user): loading it at start names the problem
    return path


def _admins(table: _Table, host: JID) -> list[str]:
    admins: list[str] = []
    for i, text in enumerate(table.strings("admins", [])):
        key = f"{table.key('admins')}[{i}]"
        try:
            jid = JID.parse(text)
        except JIDError as exc:
            raise ConfigError(key, f"invalid JID {text!r}: {exc}") from None
        if jid.local is None or jid.resource is not None or jid.domain != host.domain:
            raise ConfigError(key, f"must be a bare JID user@{host} (got {text!r})")
        admins.append(str(jid))
    return admins


def _module_options(table: _Table, known: set[str] | None, errors: list[ConfigError]) -> dict[str, Any]:
    """[module_options.NAME] tables, flattened to 'NAME.option' keys as Module.option() reads them, each value
    checked against the option its module declares; every problem is added to `errors`."""
    options: dict[str, Any] = {}
    section = table.get("module_options")
    if section is None:
        return options
    if not isinstance(section, dict):
        raise ConfigError(table.key("module_options"), "must be a table of modules ([module_options.NAME])")
    installed = known if known is not None else available()
    for module, values in section.items():
        key = f"{table.key('module_options')}.{_toml_key(module)}"
        if module not in installed:
            errors.append(ConfigError(key, f"unknown module {module!r} (valid: {', '.join(sorted(installed))})"))
        elif not isinstance(values, dict):
            errors.append(ConfigError(key, "must be a table of option = value"))
        else:
            declared = load(module).options
            for name, value in values.items():
                try:
                    options[f"{module}.{name}"] = check_option(declared, name, value)
                except ValueError as exc:
                    errors.append(ConfigError(f"{key}.{_toml_key(name)}", str(exc)))
    return options


def _unloaded(section: str, options: dict[str, Any], loaded: Collection[str], where: str) -> list[ConfigError]:
    """Options of a module that is not loaded where they apply would do nothing, as a misspelt key does."""
    modules = dict.fromkeys(key.partition(".")[0] for key in options)
    return [ConfigError(f"{section}.{_toml_key(module)}", f"module {module!r} is not loaded {where}: "
                        "load it or remove its options") for module in modules if module not in loaded]


def _host_modules(table: _Table, modules: list[str], known: set[str] | None) -> list[str]:
    enabled = _module_list(table, "modules_enabled", [], known)
    disabled = set(_module_list(table, "modules_disabled", [], known))
    return [m for m in dict.fromkeys(modules + enabled) if m not in disabled]
