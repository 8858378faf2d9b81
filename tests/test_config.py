from pathlib import Path

import pytest

from server.config import DEFAULT_MODULES, ConfigError, load_config, parse_config

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "parley.example.toml"
# Modules the example loads beyond the built-in defaults: they need settings only a real deployment has.
EXAMPLE_ONLY = ["external_services", "websocket", "host_meta", "bosh", "http_upload", "invites",
                "spam_reporting", "block_strangers", "abuse_limits", "notifications", "web_admin", "account_page"]


def error_of(data, **kwargs) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(data, **kwargs)
    return info.value


def test_defaults_without_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(None)
    assert config.data_dir == tmp_path / "parley-data"
    assert list(config.hosts) == ["localhost"]
    host = config.hosts["localhost"]
    assert host.certificate == tmp_path / "parley-data" / "certs" / "localhost.crt"
    assert host.key == tmp_path / "parley-data" / "certs" / "localhost.key"
    assert host.modules == DEFAULT_MODULES and host.admins == ["admin@localhost"] and not host.registration
    assert [(lst.type, lst.address, lst.port, lst.tls) for lst in config.listeners] == [
        ("c2s", "127.0.0.1", 5222, "starttls"), ("c2s", "127.0.0.1", 5223, "direct")]
    assert config.storage.url == f"sqlite+aiosqlite:///{tmp_path}/parley-data/parley.db"
    assert config.limits.max_stanza_size == 262144
    assert config.logging.level == "info" and config.logging.file is None
    assert config.require_encryption and config.scram_iterations == 4096 and config.source is None


def test_example_file_loads():
    config = load_config(EXAMPLE, known_modules={*DEFAULT_MODULES, *EXAMPLE_ONLY})
    assert config.source == EXAMPLE
    assert config.data_dir == EXAMPLE.parent / "parley-data"
    host = config.hosts["example.org"]
    assert host.admins == ["admin@example.org"]
    assert host.certificate == EXAMPLE.parent / "parley-data" / "certs" / "example.org.crt"
    assert config.logging.file == EXAMPLE.parent / "parley.log"
    # Every default module, and those that need the example's settings (its http listener, a TURN secret).
    assert sorted(host.modules) == sorted([*DEFAULT_MODULES, *EXAMPLE_ONLY])
    assert [(listener.type, listener.port) for listener in config.listeners if listener.type == "http"] == \
        [("http", 5280)]


def test_relative_paths_resolve_against_config_folder(tmp_path):
    path = tmp_path / "etc" / "parley.toml"
    (tmp_path / "etc" / "tls").mkdir(parents=True)
    (tmp_path / "etc" / "tls" / "x.crt").touch()
    (tmp_path / "abs.key").touch()
    path.write_text('data_dir = "../var"\n[hosts."example.org"]\ncertificate = "tls/x.crt"\n'
                    f'key = "{tmp_path}/abs.key"\n[storage]\nurl = "sqlite+aiosqlite:///{{data_dir}}/db.sqlite"\n')
    config = load_config(path)
    assert config.data_dir == tmp_path / "var"
    host = config.hosts["example.org"]
    assert host.certificate == tmp_path / "etc" / "tls" / "x.crt"
    assert host.key == tmp_path / "abs.key"
    assert config.storage.url == f"sqlite+aiosqlite:///{tmp_path}/var/db.sqlite"


def test_default_certificate_paths_live_under_data_dir(tmp_path):
    config = parse_config({"data_dir": "data", "hosts": {"Example.ORG": {}}}, source=tmp_path / "p.toml")
    host = config.hosts["example.org"]
    assert host.name == "example.org"
    assert host.certificate == tmp_path / "data" / "certs" / "example.org.crt"


def test_bad_port_names_the_key():
    err = error_of({"listeners": [{"type": "c2s", "address": "::", "port": 5222},
                                  {"type": "c2s", "address": "::", "port": 70000}]})
    assert err.key == "listeners[1].port"
    assert str(err) == "config key 'listeners[1].port': must be an integer from 1 to 65535"
    for port in ("5222", True, 0, 5222.0):
        err = error_of({"listeners": [{"type": "c2s", "address": "::", "port": port}]})
        assert err.key == "listeners[0].port"


def test_unknown_keys():
    err = error_of({"limits": {"max_stanza_sise": 1}})
    assert str(err) == "config key 'limits.max_stanza_sise': unknown key"
    assert error_of({"colour": "blue"}).key == "colour"
    assert error_of({"hosts": {"a.example": {"admin": []}}}).key == 'hosts."a.example".admin'
    assert error_of({"listeners": [{"type": "c2s", "address": "::", "port": 1, "ssl": "x"}]}).key == \
        "listeners[0].ssl"


def test_bad_listener_values():
    listener = {"type": "c2s", "address": "127.0.0.1", "port": 5222}
    err = error_of({"listeners": [{**listener, "tls": "yes"}]})
    assert err.key == "listeners[0].tls" and "starttls, direct, none" in err.reason
    assert error_of({"listeners": [{**listener, "type": "bosh"}]}).key == "listeners[0].type"
    assert error_of({"listeners": [{**listener, "address": "not an address"}]}).key == "listeners[0].address"
    assert error_of({"listeners": [{"type": "c2s", "port": 5222}]}).reason == "is required"
    err = error_of({"listeners": [listener, {**listener, "tls": "direct"}]})
    assert err.key == "listeners[1]" and "listeners[0]" in err.reason
    assert error_of({"listeners": []}).key == "listeners"


def test_listener_tls_defaults_by_type():
    config = parse_config({"listeners": [{"type": "c2s", "address": "::", "port": 5222},
                                         {"type": "component", "address": "::", "port": 5347}]})
    assert [lst.tls for lst in config.listeners] == ["starttls", "none"]


def test_unknown_module_lists_valid_names():
    known = {"roster", "ping"}
    err = error_of({"modules": ["roster", "pign"]}, known_modules=known)
    assert err.key == "modules[1]" and "'pign'" in err.reason and "ping, roster" in err.reason
    err = error_of({"modules": ["roster"], "hosts": {"a.example": {"modules_enabled": ["mam"]}}},
                   known_modules=known)
    assert err.key == 'hosts."a.example".modules_enabled[0]'
    # The default list is checked too when the registry is given.
    err = error_of({}, known_modules=known)
    assert err.key == "modules[1]" and "built-in default module" in err.reason
    assert parse_config({"modules": ["anything"]}).hosts["localhost"].modules == ["anything"]


def test_host_module_list_is_global_plus_enabled_minus_disabled():
    config = parse_config({"modules": ["roster", "ping"],
                           "hosts": {"a.example": {"modules_enabled": ["mam", "ping"],
                                                   "modules_disabled": ["roster"]},
                                     "b.example": {}}})
    assert config.hosts["a.example"].modules == ["ping", "mam"]
    assert config.hosts["b.example"].modules == ["roster", "ping"]


@pytest.mark.parametrize("admin", [
    "not a jid@a.example", "a.example", "user@b.example", "user@a.example/r", "@x", 5,
])
def test_bad_admin_jid(admin):
    err = error_of({"hosts": {"a.example": {"admins": ["ok@a.example", admin]}}})
    assert err.key == 'hosts."a.example".admins[1]'


def test_admins_are_normalised():
    config = parse_config({"hosts": {"A.Example": {"admins": ["Boss@A.EXAMPLE"]}}})
    assert config.hosts["a.example"].admins == ["boss@a.example"]


def test_bad_host_names():
    assert error_of({"hosts": {"bad host": {}}}).key == 'hosts."bad host"'
    assert error_of({"hosts": {"a.example": {}, "A.example": {}}}).key == 'hosts."A.example"'
    assert error_of({"hosts": {}}).key == "hosts"


def test_bad_storage_scheme():
    err = error_of({"storage": {"url": "mysql://x/y"}})
    assert err.key == "storage.url" and "sqlite+aiosqlite" in err.reason
    assert error_of({"storage": {"url": "parley.db"}}).key == "storage.url"
    url = "postgresql+asyncpg://parley@db/parley"
    assert parse_config({"storage": {"url": url}}).storage.url == url


def test_bad_scalars():
    assert error_of({"require_encryption": "yes"}).key == "require_encryption"
    assert error_of({"scram_iterations": 0}).key == "scram_iterations"
    assert error_of({"limits": {"unauthenticated_timeout": 0}}).key == "limits.unauthenticated_timeout"
    assert error_of({"limits": {"max_connections": -1}}).key == "limits.max_connections"
    assert error_of({"logging": {"level": "verbose"}}).key == "logging.level"
    assert error_of({"limits": []}).key == "limits"
    assert parse_config({"limits": {"auth_lockout": 5}}).limits.auth_lockout == 5.0


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("data_dir = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_module_options_reach_modules_and_hosts_override() -> None:
    config = parse_config({
        "modules": ["roster", "mam"],
        "module_options": {"mam": {"default": "roster", "retention_days": 30}},
        "hosts": {"a.example": {"module_options": {"mam": {"default": "never"}}}, "b.example": {}},
    }, known_modules={"mam", "roster"})
    assert config.hosts["a.example"].options == {"mam.default": "never", "mam.retention_days": 30}
    assert config.hosts["b.example"].options == {"mam.default": "roster", "mam.retention_days": 30}


@pytest.mark.parametrize(("data", "key"), [
    ({"module_options": {"nosuch": {"x": 1}}}, "module_options.nosuch"),
    ({"module_options": {"mam": 3}}, "module_options.mam"),
    ({"module_options": {"mam": {"default": {"deep": 1}}}}, "module_options.mam.default"),
])
def test_bad_module_options_name_the_key(data: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"modules": ["mam"], **data}, known_modules={"mam"})
    assert err.value.key == key


def test_module_option_errors_come_together_after_the_first_one_s_key() -> None:
    error = error_of({"modules": ["mam"], "module_options": {"mam": {"max_page": 0, "default": "some"}}},
                     known_modules={"mam"})
    assert error.key == "module_options.mam.max_page"
    assert [e.key for e in error.errors] == ["module_options.mam.max_page", "module_options.mam.default"]
    assert str(error).splitlines() == [str(e) for e in error.errors]
