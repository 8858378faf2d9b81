"""Reading an ejabberd.yml, so that an ejabberd admin can start Parley on the configuration they have.

The settings that mean the same in both servers are translated by the tables below, and only by them:
top-level options (TOP), listener options (LISTENER), modules (MODULES) and module options (MODULE_OPTIONS).
Every option that is not in a table, or whose value has no Parley equivalent, becomes a warning naming it
(``listen[3].request_handlers./bosh: ...``), so that nothing is ignored silently. Macros (``define_macro``)
are expanded first, as ejabberd does; ``host_config`` and ``append_host_config`` give per-host modules and
module options. The result is the same dictionary a Parley TOML file decodes to, validated by
:func:`server.config.parse_config`.
"""

from __future__ import annotations

import glob
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.config import Config, ConfigError, load_config, parse_config
from server.options import check_option
from server.registry import load

if TYPE_CHECKING:
    from cryptography import x509

ALWAYS = ("presence",)  # Parley modules every server needs; ejabberd has them in its core
STORAGE_SCHEMA = "parley"  # Parley's tables in ejabberd's PostgreSQL database, beside (never inside) ejabberd's
# Parley's data folder for an ejabberd.yml (which has no place to name one), unless $PARLEY_DATA names it:
# not the yml's folder (/etc is configuration, and often read-only to the service), not ejabberd's spool
# (/var/lib/ejabberd holds its Mnesia files, owned by its user), but the FHS place of Parley's own state.
DATA_DIR = "/var/lib/parley"


class Unsupported(Exception):
    """This value has no Parley equivalent; the message says why, and the option is reported."""


@dataclass
class _Translation:
    yml: dict[str, Any]
    base: Path  # relative paths in the file resolve against its folder
    data: dict[str, Any] = field(default_factory=dict)  # the Parley configuration being built
    warnings: list[str] = field(default_factory=list)
    used_acls: set[str] = field(default_factory=set)
    used_rules: set[str] = field(default_factory=set)

    def warn(self, key: str, reason: str) -> None:
        self.warnings.append(f"{key}: {reason}")

    def hosts(self) -> list[str]:
        return list(self.data.get("hosts", {}))

    def put(self, path: str, value: Any, host: str | None = None) -> None:
        """Set a dotted Parley key. 'hosts.*.' keys go to ``host``, or to every host, with '@HOST@' in a
        text value replaced by the host's name."""
        parts = path.split(".")
        if parts[:2] != ["hosts", "*"]:
            self._set(parts, value)
            return
        for name in [host] if host else self.hosts():
            self._set(["hosts", name, *parts[2:]], value.replace("@HOST@", name) if isinstance(value, str) else value)

    def _set(self, parts: list[str], value: Any) -> None:
        node = self.data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value

    def rule(self, name: Any) -> list[tuple[str, str]]:
        """An access rule as (allow|deny, acl name) pairs; 'all' and 'none' are rules of their own."""
        if name in ("all", "none"):
            return [("allow" if name == "all" else "deny", "all")]
        if isinstance(name, list):  # an inline rule: [allow, {allow: admin}]
            return [(r, "all") if isinstance(r, str) else next(iter(r.items())) for r in name]
        rules = self.yml.get("access_rules") or {}
        if not isinstance(name, str) or not isinstance(rules.get(name), dict):
            raise Unsupported(f"access rule {name!r} is not defined (as a mapping)")
        self.used_rules.add(name)
        return [(action, acl) for action, acls in rules[name].items()
                for acl in (acls if isinstance(acls, list) else [acls])]

    def acl_users(self, name: str) -> list[str] | None:
        """The users an ACL names, as 'user' or 'user@host'; None when it matches everyone local."""
        acls = self.yml.get("acl") or {}
        if not isinstance(acls.get(name), dict | None) or name not in acls:
            raise Unsupported(f"ACL {name!r} is not defined (as a mapping)")
        self.used_acls.add(name)
        users: list[str] = []
        for kind, values in (acls[name] or {}).items():
            for value in values if isinstance(values, list) else [values]:
                if kind == "user_regexp" and value == "":
                    return None
                if kind != "user":
                    raise Unsupported(f"ACL {name!r} matches by {kind}, which Parley cannot express")
                if isinstance(value, dict):
                    value = "{}@{}".format(*next(iter(value.items())))
                if value:
                    users.append(str(value))
        return users


# --- conversions of values -------------------------------------------------------------------------------

_LOG_LEVELS = {"none": "error", "emergency": "error", "alert": "error", "critical": "error", "error": "error",
               "warning": "warning", "notice": "warning", "info": "info", "debug": "debug"}
_UNITS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}


def _seconds(value: Any, t: _Translation) -> int:
    """ejabberd timeouts: a number of seconds, or '5 minutes' and the like."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = re.fullmatch(r"\s*(\d+)\s*(second|minute|hour|day)s?\s*", str(value))
    if match is None:
        raise Unsupported(f"{value!r} is not a duration Parley understands")
    return int(match.group(1)) * _UNITS[match.group(2)]


def _boolean(value: Any, t: _Translation) -> bool:
    if not isinstance(value, bool):
        raise Unsupported(f"{value!r} is not true or false")
    return value


def _integer(value: Any, t: _Translation) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise Unsupported(f"{value!r} is not a positive integer")
    return value


def _text(value: Any, t: _Translation) -> str:
    return str(value)


def _loglevel(value: Any, t: _Translation) -> str:
    if str(value) not in _LOG_LEVELS:
        raise Unsupported(f"unknown level {value!r}")
    return _LOG_LEVELS[str(value)]


def _mam_default(value: Any, t: _Translation) -> str:
    if value not in ("always", "roster", "never"):
        raise Unsupported(f"{value!r} is not always, roster or never")
    return str(value)


def _service_domain(value: Any, t: _Translation) -> str:
    """'conference.@HOST@' names one service per host; a fixed name can only serve a single host."""
    text = str(value)
    if "@HOST@" not in text and len(t.hosts()) > 1:
        raise Unsupported(f"{text!r} would be one service for several hosts; Parley has one per host")
    return text


def _create_policy(value: Any, t: _Translation) -> str:
    """Who may create rooms: an access rule whose first 'allow' is all, local users or admins."""
    for action, acl in t.rule(value):
        if action != "allow":
            continue
        if acl == "all":
            return "anyone"
        if acl == "admin" or acl in _admin_acls(t):
            return "admins"
        if t.acl_users(acl) is None:
            return "local"
        break
    raise Unsupported(f"rule {value!r} allows neither everyone, local users nor admins")


def _registration(value: Any, t: _Translation) -> bool:
    pairs = t.rule(value)
    if pairs and pairs[0] == ("allow", "all"):
        return True
    if all(action == "deny" for action, _ in pairs):
        return False
    raise Unsupported(f"rule {value!r} allows some users only; Parley's registration is on or off per host")


def _offline_quota(value: Any, t: _Translation) -> int:
    """A number, or a shaper rule whose value for 'all' is the quota ({5000: admin, 100: all} gives 100)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    rules = t.yml.get("shaper_rules") or {}
    if value not in rules:
        raise Unsupported(f"shaper rule {value!r} is not defined")
    t.used_rules.add(f"shaper_rules.{value}")
    rule = rules[value]
    if isinstance(rule, int):
        return rule
    for number, acl in (rule or {}).items():
        if acl == "all" and isinstance(number, int):
            return number
    raise Unsupported(f"shaper rule {value!r} has no number for 'all'")


def _storage(value: Any, t: _Translation) -> str:
    """PostgreSQL only, and in a schema of Parley's own: ejabberd's tables have names Parley uses too."""
    if value != "pgsql":
        raise Unsupported(f"Parley stores data in PostgreSQL or SQLite files, not {value}; using the default")
    y = t.yml
    user = str(y.get("sql_username", "ejabberd"))
    password = f":{y['sql_password']}" if y.get("sql_password") else ""
    return (f"postgresql+asyncpg://{user}{password}@{y.get('sql_server', 'localhost')}:{y.get('sql_port', 5432)}"
            f"/{y.get('sql_database', 'ejabberd')}?schema={STORAGE_SCHEMA}")


def _starttls(value: Any, t: _Translation) -> bool:
    if value in ("required", "required_trusted"):
        return True
    if value in ("optional", True):
        return False
    raise Unsupported(f"{value!r}: Parley encrypts federation links whenever the peer can")


def _same(value: Any, t: _Translation) -> None:
    """Options whose ejabberd value is what Parley always does: nothing to set, nothing to report."""


Converter = Callable[[Any, _Translation], Any]

# ejabberd top-level option -> (Parley key, conversion). hosts, listen, certfiles, acl, access_rules,
# modules, define_macro, host_config and append_host_config have handlers of their own below.
TOP: dict[str, tuple[str, Converter]] = {
    "loglevel": ("logging.level", _loglevel),
    "s2s_use_starttls": ("s2s.require_encryption", _starttls),
    "sql_type": ("storage.url", _storage),
    "sql_server": ("", _same), "sql_port": ("", _same), "sql_database": ("", _same),
    "sql_username": ("", _same), "sql_password": ("", _same), "new_sql_schema": ("", _same),
    "default_db": ("", _same), "auth_method": ("", _same),
}
_SAME_VALUES = {"auth_password_format": "scram", "auth_method": "sql", "default_db": "sql"}

# ejabberd listener module -> Parley listener type.
LISTENER_TYPES = {"ejabberd_c2s": "c2s", "ejabberd_s2s_in": "s2s", "ejabberd_http": "http",
                  "ejabberd_service": "component"}
# Options of c2s listeners that mean the same (the rest are reported): port, ip, module and tls are read directly.
LISTENER: dict[str, tuple[str, Converter]] = {
    "max_stanza_size": ("limits.max_stanza_size", _integer),
}
# ejabberd HTTP request handler -> the path where Parley serves the same (its mod_http_api-compatible API).
HTTP_HANDLERS = {"mod_http_api": "/api"}

# ejabberd module -> the Parley modules that do its work ([] : Parley does it in its core). Missing: reported.
MODULES: dict[str, list[str]] = {
    "mod_adhoc": ["adhoc"], "mod_announce": ["announce"], "mod_avatar": ["vcard"], "mod_blocking": ["blocking"],
    "mod_caps": ["caps"], "mod_carboncopy": ["carbons"], "mod_client_state": ["csi"], "mod_configure": ["adhoc"],
    "mod_disco": ["disco"], "mod_last": ["last"], "mod_mam": ["mam"], "mod_muc": ["muc"], "mod_offline": ["offline"],
    "mod_ping": ["ping"], "mod_private": ["private", "bookmarks"], "mod_pubsub": ["pubsub", "pep"],
    "mod_push": ["push"], "mod_register": ["register"], "mod_roster": ["roster"],
    "mod_stream_mgmt": ["stream_management"], "mod_time": ["time"], "mod_vcard": ["vcard"],
    "mod_vcard_xupdate": ["vcard"], "mod_version": ["version"],
    "mod_s2s_dialback": [], "mod_fail2ban": [], "mod_admin_extra": [], "mod_muc_admin": [], "mod_http_api": [],
}

# (ejabberd module, option) -> (Parley key, conversion). 'hosts.*.' keys are per host.
MODULE_OPTIONS: dict[tuple[str, str], tuple[str, Converter]] = {
    ("mod_mam", "default"): ("module_options.mam.default", _mam_default),
    ("mod_muc", "host"): ("hosts.*.module_options.muc.domain", _service_domain),
    ("mod_muc", "name"): ("module_options.muc.name", _text),
    ("mod_muc", "access_create"): ("module_options.muc.create", _create_policy),
    ("mod_register", "access"): ("hosts.*.registration", _registration),
    ("mod_offline", "access_max_user_messages"): ("limits.offline_quota", _offline_quota),
    ("mod_stream_mgmt", "resume_timeout"): ("module_options.stream_management.resume_timeout", _seconds),
    ("mod_stream_mgmt", "max_ack_queue"): ("module_options.stream_management.max_queue", _integer),
    ("mod_push", "include_body"): ("module_options.push.include_body", _boolean),
    ("mod_version", "show_os"): ("module_options.version.show_os", _boolean),
    ("mod_fail2ban", "c2s_max_auth_failures"): ("limits.auth_max_failures", _integer),
    ("mod_fail2ban", "c2s_auth_ban_lifetime"): ("limits.auth_lockout", _seconds),
    ("mod_roster", "versioning"): ("", _same),  # Parley always versions rosters
    ("mod_pubsub", "plugins"): ("", _same),  # flat nodes and PEP are what Parley's pubsub and pep modules do
}


# --- reading ---------------------------------------------------------------------------------------------


def load_any_config(path: Path | None, known_modules: set[str] | None = None) -> tuple[Config, list[str]]:
    """A Parley TOML file, or an ejabberd.yml (by its name) with the warnings naming what it could not apply;
    None gives the built-in configuration. What `parley`, parleyctl and reload_config all read."""
    if path is not None and path.suffix in (".yml", ".yaml"):
        return load_ejabberd_config(path, known_modules)
    return load_config(path, known_modules), []


def load_ejabberd_config(path: Path, known_modules: set[str] | None = None) -> tuple[Config, list[str]]:
    """Parley's configuration from an ejabberd.yml, and the warnings naming what it could not apply."""
    import yaml  # loaded for an ejabberd.yml only, not by every `parley` and parleyctl process

    try:
        with open(path, encoding="utf-8") as fh:
            yml = yaml.safe_load(fh)
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError("", f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(yml, dict):
        raise ConfigError("", f"config file {path} is not an ejabberd configuration (a YAML mapping)")
    data, warnings = translate(yml, Path(path).resolve().parent, known_modules)
    return parse_config(data, Path(path), known_modules, data_dir=DATA_DIR), warnings


def translate(yml: dict[str, Any], base: Path, known_modules: set[str] | None = None) -> tuple[dict[str, Any],
                                                                                                list[str]]:
    """The Parley configuration (as decoded TOML) and the warnings, from a decoded ejabberd.yml."""
    macros = yml.get("define_macro") or {}
    t = _Translation(_expand(yml, macros), base)
    y = t.yml
    hosts = y.get("hosts") or []
    if not isinstance(hosts, list) or not hosts:
        raise ConfigError("hosts", "an ejabberd.yml must list its hosts")
    t.data["hosts"] = {str(h): {} for h in hosts}
    for key in ("acl", "access_rules", "shaper_rules", "modules", "host_config", "append_host_config"):
        _mapping(y.get(key), key)
    if not isinstance(y.get("listen") or [], list) or not isinstance(y.get("certfiles") or [], list):
        raise ConfigError("listen" if not isinstance(y.get("listen") or [], list) else "certfiles", "must be a list")
    _admins(t)
    _listen(t, y.get("listen") or [])
    _certfiles(t, y.get("certfiles") or [])
    known = known_modules
    t.data["modules"] = _modules(t, y.get("modules") or {}, "modules", None, known)
    for section in ("host_config", "append_host_config"):
        for host, overrides in (y.get(section) or {}).items():
            _host_overrides(t, section, str(host), overrides or {}, known)
    handled = {"hosts", "listen", "certfiles", "acl", "access_rules", "modules", "define_macro", "host_config",
               "append_host_config", "shaper_rules"}
    for key, value in y.items():
        if key in handled:
            continue
        if key in _SAME_VALUES and value == _SAME_VALUES[key]:
            continue
        if key not in TOP:
            t.warn(key, "not supported by Parley")
            continue
        _apply(t, key, value, *TOP[key])
    _unused(t)
    return t.data, t.warnings


def _mapping(value: Any, key: str) -> None:
    if value is not None and not isinstance(value, dict):
        raise ConfigError(key, "must be a mapping")


def _expand(value: Any, macros: dict[str, Any]) -> Any:
    """ejabberd macros: a string value equal to a macro's name stands for the macro's value."""
    if isinstance(value, str) and value in macros:
        return macros[value]
    if isinstance(value, list):
        return [_expand(v, macros) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v, macros) for k, v in value.items() if k != "define_macro"}
    return value


def _apply(t: _Translation, key: str, value: Any, target: str, convert: Converter, host: str | None = None) -> None:
    try:
        converted = convert(value, t)
        _check(t, target, converted, host)
    except Unsupported as exc:
        t.warn(key, str(exc) or f"{value!r} has no Parley equivalent")
        return
    if target:
        t.put(target, converted, host)


def _check(t: _Translation, target: str, value: Any, host: str | None) -> None:
    """Check a module option against its Parley module's declaration (each host's value, when it has '@HOST@'),
    so that a value the module refuses is reported under the ejabberd option's name, as any other value without
    an equivalent is."""
    section, _, rest = target.removeprefix("hosts.*.").partition(".")
    if section != "module_options":
        return
    module, _, option = rest.partition(".")
    values = [value]
    if target.startswith("hosts.*.") and isinstance(value, str):
        values = [value.replace("@HOST@", name) for name in ([host] if host else t.hosts())]
    for each in values:
        try:
            check_option(load(module).options, option, each)
        except ValueError as exc:
            raise Unsupported(str(exc)) from None


def _admin_acls(t: _Translation) -> list[str]:
    """ACLs that the 'configure' rule allows: ejabberd's admins (as its example configuration has them)."""
    try:
        return [acl for action, acl in t.rule("configure") if action == "allow"]
    except Unsupported:
        return []


def _admins(t: _Translation) -> None:
    for acl in _admin_acls(t):
        try:
            users = t.acl_users(acl)
        except Unsupported as exc:
            t.warn(f"acl.{acl}", str(exc))
            continue
        if users is None:
            t.warn(f"acl.{acl}", "every local user as admin is not supported")
            continue
        for user in users:
            local, _, domain = user.partition("@")
            for host in [domain] if domain else t.hosts():
                if host in t.data["hosts"]:
                    t.data["hosts"][host].setdefault("admins", []).append(f"{local}@{host}")
                else:
                    t.warn(f"acl.{acl}", f"admin {user} is not on a served host")


def _listen(t: _Translation, listeners: list[Any]) -> None:
    out = []
    for i, item in enumerate(listeners):
        key = f"listen[{i}]"
        _mapping(item, key)
        module = item.get("module")
        if module not in LISTENER_TYPES or item.get("transport", "tcp") != "tcp":
            t.warn(key, f"listener module {module} is not supported")
            continue
        kind = LISTENER_TYPES[module]
        handlers = item.get("request_handlers") or {}
        for path, handler in handlers.items():
            if HTTP_HANDLERS.get(handler) != path:
                t.warn(f"{key}.request_handlers.{path}", f"{handler} is not served by Parley")
        if kind == "http" and not any(HTTP_HANDLERS.get(h) == p for p, h in handlers.items()):
            t.warn(key, "serves nothing Parley has; left out")
            continue
        plain = "none" if kind in ("http", "component") else "starttls"
        out.append({"type": kind, "address": str(item.get("ip", "::")), "port": item.get("port"),
                    "tls": "direct" if item.get("tls") else plain})
        for option, value in item.items():
            if option in ("port", "ip", "module", "tls", "starttls", "starttls_required", "request_handlers"):
                continue
            if option in LISTENER and kind == "c2s":
                _apply(t, f"{key}.{option}", value, *LISTENER[option])
            else:
                t.warn(f"{key}.{option}", "not supported by Parley" if option not in LISTENER else
                       "Parley takes it from the c2s listeners only")
    if out:
        t.data["listeners"] = out


def _certfiles(t: _Translation, patterns: list[Any]) -> None:
    """Give each host the certificate whose names cover it, with its key (in the same PEM or a key file beside
    it), as ejabberd picks them; with one certificate for everything, every host gets it. Of several files for a
    host (Let's Encrypt's cert.pem and fullchain.pem), the one with the whole chain."""
    files: list[Path] = []
    for pattern in patterns:
        found = sorted(Path(p) for p in glob.glob(str(t.base / str(pattern))) if Path(p).is_file())
        if not found:
            t.warn("certfiles", f"{pattern} matches no file")
        files.extend(found)
    certs: list[tuple[Path, list[str], int]] = []  # file, names of its first certificate, certificates in it
    keys: dict[Path, Path] = {}
    for path in files:
        try:
            pem = path.read_bytes()
        except OSError as exc:
            t.warn("certfiles", f"cannot read {path}: {exc.strerror}")
            continue
        if b"PRIVATE KEY-----" in pem:
            keys.setdefault(path.parent, path)
        if b"CERTIFICATE-----" in pem:
            from cryptography import x509  # here only: 10 MiB of resident memory, for an ejabberd.yml's certfiles

            try:
                certs.append((path, _names(x509.load_pem_x509_certificate(pem)), pem.count(b"BEGIN CERTIFICATE")))
            except ValueError:
                t.warn("certfiles", f"{path} holds no readable certificate")
    for host in t.hosts():
        match = [c for c in certs if any(_covers(n, host) for n in c[1])] or (certs if len(certs) == 1 else [])
        if not match:
            t.warn("certfiles", f"no certificate for {host}: Parley makes a self-signed one")
            continue
        cert = max(match, key=lambda c: c[2])[0]
        key = cert if b"PRIVATE KEY-----" in cert.read_bytes() else keys.get(cert.parent)
        if key is None:
            t.warn("certfiles", f"no private key beside {cert} for {host}")
            continue
        t.data["hosts"][host].update(certificate=str(cert), key=str(key))


def _names(cert: x509.Certificate) -> list[str]:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                    .get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        return [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]


def _covers(name: str, host: str) -> bool:
    name, host = name.lower(), host.lower()
    return name == host or (name.startswith("*.") and host.partition(".")[2] == name[2:])


def _modules(t: _Translation, modules: dict[str, Any], key: str, host: str | None,
             known: set[str] | None) -> list[str]:
    """The Parley modules for ejabberd's, with their options applied (for ``host`` only, when given)."""
    _mapping(modules, key)
    names: list[str] = list(ALWAYS)
    for module, options in modules.items():
        _mapping(options, f"{key}.{module}")
        if module not in MODULES:
            t.warn(f"{key}.{module}", "no Parley counterpart")
            continue
        missing = [m for m in MODULES[module] if known is not None and m not in known]
        if missing:
            t.warn(f"{key}.{module}", f"Parley's {', '.join(missing)} module is not installed")
            continue
        names.extend(MODULES[module])
        for option, value in (options or {}).items():
            if option in ("db_type", "ram_db_type"):
                continue  # storage is one choice for all of Parley
            where = MODULE_OPTIONS.get((module, option))
            if where is None:
                t.warn(f"{key}.{module}.{option}", "not supported by Parley")
                continue
            target, convert = where
            if host and target.startswith("module_options."):  # host_config: this host's module options
                target = f"hosts.*.{target}"
            _apply(t, f"{key}.{module}.{option}", value, target, convert, host)
    return list(dict.fromkeys(names))


def _host_overrides(t: _Translation, section: str, host: str, overrides: dict[str, Any],
                    known: set[str] | None) -> None:
    key = f"{section}.{host}"
    if host not in t.data["hosts"]:
        t.warn(key, "not one of the hosts")
        return
    _mapping(overrides, key)
    for option, value in overrides.items():
        if option != "modules":
            t.warn(f"{key}.{option}", "per-host settings other than modules are not supported")
            continue
        wanted = _modules(t, value or {}, f"{key}.modules", host, known)
        top = t.data["modules"]
        t.data["hosts"][host]["modules_enabled"] = [m for m in wanted if m not in top]
        if section == "host_config":  # host_config replaces the modules; append_host_config adds to them
            t.data["hosts"][host]["modules_disabled"] = [m for m in top if m not in wanted]


def _unused(t: _Translation) -> None:
    """Access rules, ACLs and shaper rules that no translated setting used are reported too."""
    for name in t.yml.get("access_rules") or {}:
        if name not in t.used_rules:
            t.warn(f"access_rules.{name}", "not used by any setting Parley applies")
    for name in t.yml.get("acl") or {}:
        if name not in t.used_acls:
            t.warn(f"acl.{name}", "not used by any setting Parley applies")
    for name in t.yml.get("shaper_rules") or {}:
        if f"shaper_rules.{name}" not in t.used_rules:
            t.warn(f"shaper_rules.{name}", "not supported by Parley")
