"""Starting Parley on an ejabberd.yml: ejabberd's own example configuration (Debian's /etc/ejabberd/ejabberd.yml,
copied to tests/data) loads with every option Parley does not apply named, and a configuration written the
ejabberd way serves clients with its listener, certificate, macros and limits."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ejabberd_compat.config import load_ejabberd_config, translate
from parley import build_server, main
from server.accounts import create_account
from server.config import ConfigError
from server.registry import available
from server.tls import ensure_certificate
from tests.conftest import Harness, RawClient, free_port
from tests.test_offline import collect, take
from tests.test_parleyctl import PARLEYCTL
from tests.test_register import FEATURE, unauthenticated

EXAMPLE = Path(__file__).resolve().parent / "data" / "ejabberd.yml"


def test_ejabberds_example_configuration_loads_with_what_is_not_applied_listed() -> None:
    config, warnings = load_ejabberd_config(EXAMPLE, available())
    assert list(config.hosts) == ["localhost"]
    host = config.hosts["localhost"]
    pem = Path("/etc/ejabberd/ejabberd.pem")  # made by Debian's package when it is installed
    if pem.exists():
        assert host.certificate == host.key == pem  # the certificate and its key in one file
    else:
        assert f"certfiles: {pem} matches no file" in warnings
    assert [(lc.type, lc.port, lc.tls) for lc in config.listeners] == [
        ("c2s", 5222, "starttls"), ("c2s", 5223, "direct"), ("s2s", 5269, "starttls"), ("http", 5443, "direct")]
    assert config.limits.max_stanza_size == 262144
    assert config.limits.offline_quota == 100  # shaper rule max_user_offline_messages, for 'all'
    assert config.s2s.require_encryption
    assert host.options["muc.create"] == "local"  # access_create: muc_create, which allows the 'local' ACL
    assert host.admins == [] and not host.registration  # its admin ACL names nobody; no mod_register
    assert {"roster", "offline", "muc", "pep", "pubsub", "carbons", "csi", "adhoc"} <= set(host.modules)
    for module in ("stream_management", "push"):  # mod_stream_mgmt and mod_push, when Parley has them
        assert (module in host.modules) == (module in available())
    for expected in ("listen[0].shaper: not supported by Parley",
                     "listen[3].request_handlers./bosh: mod_bosh is not served by Parley",
                     "listen[4]: serves nothing Parley has; left out",
                     "listen[5]: listener module ejabberd_stun is not supported",
                     "modules.mod_muc.default_room_options: not supported by Parley",
                     "modules.mod_shared_roster: no Parley counterpart",
                     "modules.mod_stream_mgmt.resend_on_timeout: not supported by Parley",
                     "c2s_ciphers: not supported by Parley",
                     "shaper_rules.max_user_sessions: not supported by Parley",
                     "acl.loopback: not used by any setting Parley applies"):
        assert expected in warnings
    # Each warning names an option of the file, once.
    top = set(yaml.safe_load(EXAMPLE.read_text())) | {"listen", "certfiles"}
    assert len(warnings) == len(set(warnings))
    assert all(w.split(":")[0].split(".")[0].split("[")[0] in top for w in warnings)


def test_check_config_lists_what_is_not_applied(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(EXAMPLE)]) == 0
    out, err = capsys.readouterr()
    assert "OK (1 host(s), 4 listener(s)" in out
    assert f"parley: {EXAMPLE}: not applied: modules.mod_bosh: no Parley counterpart" in err.splitlines()


def _translate(text: str, tmp_path: Path) -> tuple[dict, list[str]]:
    return translate(yaml.safe_load(text), tmp_path, available())


def test_macros_host_config_and_the_tables(tmp_path: Path) -> None:
    data, warnings = _translate("""
define_macro:
  'PORT': 5333
  'MODS':
    mod_roster: {}
    mod_vcard: {}
hosts: [a.test, b.test]
listen:
  - {port: PORT, ip: "127.0.0.1", module: ejabberd_c2s}
acl:
  admin:
    user: ["alice@a.test", "root"]
access_rules:
  configure: {allow: admin}
  register: {allow: all}
modules:
  mod_register: {access: register, welcome_message: {subject: hi}}
  mod_muc: {host: "rooms.@HOST@", access_create: all}
  mod_fail2ban: {c2s_max_auth_failures: 7, c2s_auth_ban_lifetime: "5 minutes"}
  mod_http_upload: {put_url: "https://@HOST@:5443/upload"}
host_config:
  b.test:
    modules: MODS
sql_type: pgsql
sql_server: db.internal
sql_database: xmpp
sql_username: ejabberd
sql_password: secret
""", tmp_path)
    assert data["listeners"] == [{"type": "c2s", "address": "127.0.0.1", "port": 5333, "tls": "starttls"}]
    a, b = data["hosts"]["a.test"], data["hosts"]["b.test"]
    assert a["admins"] == ["alice@a.test", "root@a.test"] and b["admins"] == ["root@b.test"]
    assert a["registration"] is b["registration"] is True
    assert (a["module_options"]["muc"]["domain"], b["module_options"]["muc"]["domain"]) == ("rooms.a.test",
                                                                                            "rooms.b.test")
    assert data["module_options"] == {"muc": {"create": "anyone"}}
    assert data["limits"] == {"auth_max_failures": 7, "auth_lockout": 300}
    assert data["storage"]["url"] == "postgresql+asyncpg://ejabberd:secret@db.internal:5432/xmpp?schema=parley"
    assert b["modules_disabled"] == ["register", "muc"] and b["modules_enabled"] == ["roster", "vcard"]
    assert "modules.mod_http_upload: no Parley counterpart" in warnings
    assert "modules.mod_register.welcome_message: not supported by Parley" in warnings
    assert "certfiles: no certificate for a.test: Parley makes a self-signed one" in warnings


def test_values_without_an_equivalent_are_reported_not_applied(tmp_path: Path) -> None:
    data, warnings = _translate("""
hosts: [a.test, b.test]
acl:
  net: {ip: ["10.0.0.0/8"]}
access_rules:
  register: {allow: net}
modules:
  mod_register: {access: register}
  mod_mam: {default: sometimes}
  mod_muc: {host: "conference.example.org"}
sql_type: mysql
""", tmp_path)
    assert "registration" not in data["hosts"]["a.test"] and "storage" not in data
    assert any(w.startswith("modules.mod_register.access: rule 'register' allows some users only") for w in warnings)
    assert "modules.mod_mam.default: 'sometimes' is not always, roster or never" in warnings
    assert any(w.startswith("modules.mod_muc.host: 'conference.example.org' would be one service") for w in warnings)
    assert any(w.startswith("sql_type: Parley stores data in PostgreSQL or SQLite files, not mysql") for w in warnings)


def test_lets_encrypt_folders_give_each_host_its_full_chain_and_key(tmp_path: Path) -> None:
    ca_crt = tmp_path / "ca.crt"  # stands for the intermediate certificate of chain.pem
    ensure_certificate("ca.test", ca_crt, tmp_path / "ca.key")
    for host in ("a.test", "b.test"):
        live = tmp_path / "live" / host
        live.mkdir(parents=True)
        ensure_certificate(host, live / "cert.pem", live / "privkey.pem")
        (live / "chain.pem").write_text(ca_crt.read_text())
        (live / "fullchain.pem").write_text((live / "cert.pem").read_text() + ca_crt.read_text())
    data, warnings = _translate("hosts: [a.test, b.test, c.test]\ncertfiles: ['live/*/*.pem']", tmp_path)
    for host in ("a.test", "b.test"):
        live = tmp_path / "live" / host
        assert data["hosts"][host] == {"certificate": str(live / "fullchain.pem"), "key": str(live / "privkey.pem")}
    assert warnings == ["certfiles: no certificate for c.test: Parley makes a self-signed one"]


@pytest.mark.parametrize("text, reason", [
    ("hosts: [", "not valid YAML"),
    ("- just a list", "not an ejabberd configuration"),
    ("loglevel: info", "must list its hosts"),
    ("hosts: [a.test]\nlisten: {port: 5222}", "config key 'listen': must be a list"),
    ("hosts: [a.test]\nmodules: [mod_roster]", "config key 'modules': must be a mapping"),
    ("hosts: [a.test]\nlisten: [5222]", r"config key 'listen\[0\]': must be a mapping"),
    ("hosts: [a.test]\nhost_config: {a.test: {modules: [mod_roster]}}",
     "config key 'host_config.a.test.modules': must be a mapping"),
    ("hosts: ['not a host']", "invalid host name"),
])
def test_unusable_files_are_refused_with_the_reason(tmp_path: Path, text: str, reason: str) -> None:
    path = tmp_path / "ejabberd.yml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=reason):
        load_ejabberd_config(path, available())


async def test_parley_serves_clients_on_a_configuration_written_for_ejabberd(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARLEY_DATA", str(tmp_path / "parley-data"))
    crt, key = tmp_path / "example.test.crt", tmp_path / "example.test.key"
    ensure_certificate("example.test", crt, key)
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "example.test.pem").write_text(crt.read_text() + key.read_text())
    port = free_port()
    (tmp_path / "ejabberd.yml").write_text(f"""
define_macro:
  'C2S_PORT': {port}
hosts:
  - example.test
certfiles:
  - "certs/*.pem"
listen:
  -
    port: C2S_PORT
    ip: "127.0.0.1"
    module: ejabberd_c2s
    starttls_required: true
shaper_rules:
  max_user_offline_messages:
    5000: admin
    2: all
modules:
  mod_roster: {{}}
  mod_offline:
    access_max_user_messages: max_user_offline_messages
""")
    config, _ = load_ejabberd_config(tmp_path / "ejabberd.yml", available())
    server = build_server(config)
    await server.start()
    try:
        raw_reader, raw_writer = await asyncio.open_connection("127.0.0.1", port)
        raw = RawClient(raw_reader, raw_writer)
        await raw.starttls("example.test")
        served = raw.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        raw_writer.close()
        assert served == x509.load_pem_x509_certificate(crt.read_bytes()).public_bytes(Encoding.DER)
        for user in ("alice", "bob"):
            await create_account(server.storage, "example.test", user, "secret", config.scram_iterations)
        harness = Harness(server, port, port, tmp_path)
        try:
            bob = await harness.client("bob@example.test")
            errors = collect(bob, "error")
            for body in ("one", "two", "three"):
                bob.send_message(mto="alice@example.test", mbody=body, mtype="chat")
            [error] = await take(errors, 1)  # the quota of the shaper rule: the third is bounced
            assert error.find("{jabber:client}error/{urn:ietf:params:xml:ns:xmpp-stanzas}resource-constraint") \
                is not None
        finally:
            await harness.close()
    finally:
        await server.stop()


def test_the_data_folder_of_an_ejabberd_yml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not the yml's folder (/etc/ejabberd/parley-data): /var/lib/parley, or $PARLEY_DATA."""
    monkeypatch.delenv("PARLEY_DATA", raising=False)
    config, _ = load_ejabberd_config(EXAMPLE, available())
    assert config.data_dir == Path("/var/lib/parley")
    assert config.storage.url == "sqlite+aiosqlite:////var/lib/parley/parley.db"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PARLEY_DATA", "spool")  # relative to the folder it is set in, not the yml's
    config, _ = load_ejabberd_config(EXAMPLE, available())
    assert config.data_dir == tmp_path / "spool"


YML = """
hosts: [example.test]
listen:
  - {{port: {port}, ip: 127.0.0.1, module: ejabberd_c2s, starttls_required: true}}
acl:
  admin: {{user: alice@example.test}}
access_rules:
  configure: {{allow: admin}}
modules:
  mod_roster: {{}}
  mod_register: {{access: {register}}}
"""


async def test_the_ejabberd_path_end_to_end(tmp_path: Path) -> None:
    """The README's way from ejabberd: `parley serve --config ejabberd.yml`, then parleyctl and `parley user`
    with that file (before or after the command), and reload_config after an edit."""
    port, yml = free_port(), tmp_path / "ejabberd.yml"
    yml.write_text(YML.format(port=port, register="none"))
    env = {**os.environ, "PARLEY_DATA": str(tmp_path / "data"), "PYTHONUNBUFFERED": "1"}
    env.pop("PARLEY_CONFIG", None)

    async def run(*command: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE, env=env)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode or 0, out.decode(), err.decode()

    server = await asyncio.create_subprocess_exec(sys.executable, "-m", "parley", "serve", "--config", str(yml),
                                                  stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                  env=env)
    harness = Harness(None, port, port, tmp_path)  # type: ignore[arg-type]
    try:
        banner = ""
        while "Ctrl-C stops" not in banner:
            line = (await asyncio.wait_for(server.stdout.readline(), 30)).decode()
            assert line, f"server exited: {(await server.stderr.read()).decode()[-2000:]}"
            banner += line
        assert f"data in {tmp_path / 'data'}" in banner and "created admin account alice@example.test" in banner
        code, out, err = await run(PARLEYCTL, "--config", str(yml), "register", "bob", "example.test", "pw")
        assert code == 0, err
        code, out, err = await run(sys.executable, "-m", "parley", "user", "add", "carol@example.test",
                                   "--password", "pw", "--config", str(yml))
        assert code == 0, err
        code, out, err = await run(PARLEYCTL, "registered_users", "example.test", "--config", str(yml))
        assert (code, out.split()) == (0, ["alice", "bob", "carol"]), err
        _, features = await unauthenticated(harness, "example.test")
        assert features.find(FEATURE) is None

        yml.write_text(YML.format(port=port, register="all"))
        assert await run(PARLEYCTL, "--config", str(yml), "reload_config") == (0, "", "")
        _, features = await unauthenticated(harness, "example.test")
        assert features.find(FEATURE) is not None
        await harness.client("bob@example.test", "pw")
    finally:
        await harness.close()
        server.terminate()
        _, err = await asyncio.wait_for(server.communicate(), 20)
    assert server.returncode == 0, err.decode()[-2000:]
