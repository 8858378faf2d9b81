"""`parley check`: configuration, certificates, DNS (against a real dnsmasq) and ports, each problem with its fix."""

from __future__ import annotations

import asyncio
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from server.check import check_certificates
from server.config import load_config
from server.tls import ensure_certificate
from tests.conftest import free_port
from tests.s2s_support import TestCA
from tests.test_cli import parley
from tests.test_s2s_dns import DNS_ADDR, SRV_NAME, dnsmasq

pytestmark = pytest.mark.timeout(60)


def write(tmp_path: Path, host: str = "a.test", host_table: str = "", extra: str = "", port: int = 0) -> Path:
    """A configuration of one host with a STARTTLS, a Direct TLS and an s2s listener on free ports."""
    path = tmp_path / "parley.toml"
    path.write_text(f"""data_dir = "data"
{extra}
[[listeners]]
type = "c2s"
address = "127.0.0.1"
port = {port or free_port()}
tls = "starttls"

[[listeners]]
type = "c2s"
address = "127.0.0.1"
port = {free_port()}
tls = "direct"

[[listeners]]
type = "s2s"
address = "127.0.0.1"
port = {free_port()}

[hosts."{host}"]
{host_table}
""")
    return path


def with_certificate(tmp_path: Path, ca: TestCA, issued_for: str, host: str = "a.test") -> Path:
    """A configuration whose host serves a certificate `ca` issued for `issued_for`, and which trusts `ca`."""
    crt, key = ca.issue(issued_for, tmp_path)
    return write(tmp_path, host, f'certificate = "{crt}"\nkey = "{key}"\n', f'[s2s]\nca_bundle = "{ca.path}"\n')


def check(config: Path, *args: str) -> tuple[int, str]:
    result = parley("check", "--config", str(config), *args)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stdout


def test_a_sound_deployment_passes(tmp_path: Path) -> None:
    code, out = check(with_certificate(tmp_path, TestCA(tmp_path / "ca"), "a.test"), "--no-dns")
    assert code == 0, out
    assert "Configuration" in out and "Certificates: OK" in out and "Ports: OK" in out and "PROBLEM" not in out


def test_a_certificate_for_other_names(tmp_path: Path) -> None:
    code, out = check(with_certificate(tmp_path, TestCA(tmp_path / "ca"), "other.test"), "--no-dns")
    assert code == 1
    assert "Certificates: 1 problem(s)" in out
    assert "is for other.test, *.other.test, not for a.test, conference.a.test, pubsub.a.test" in out
    assert "fix: get one that names a.test, conference.a.test, pubsub.a.test too (or *.a.test)" in out


def test_an_expired_certificate(tmp_path: Path) -> None:
    config = load_config(with_certificate(tmp_path, TestCA(tmp_path / "ca"), "a.test"))
    assert not check_certificates(config).problems
    later = datetime.now(UTC) + timedelta(days=60)  # TestCA's certificates are good for 30 days
    [problem] = check_certificates(config, now=later).problems
    assert f"the certificate {config.hosts['a.test'].certificate} expired on" in problem
    assert "fix: renew it" in problem
    assert "expires on" in check_certificates(config, now=later - timedelta(days=40)).warnings[0]


def test_a_self_signed_certificate_and_an_issuer_nobody_trusts(tmp_path: Path) -> None:
    config = write(tmp_path, host_table=f'certificate = "{tmp_path / "a.crt"}"\nkey = "{tmp_path / "a.key"}"\n')
    ensure_certificate("a.test", tmp_path / "a.crt", tmp_path / "a.key")
    code, out = check(config, "--no-dns")
    assert code == 1 and "a.test: self-signed" in out and "certbot certonly -d a.test" in out
    ca = TestCA(tmp_path / "ca")  # trusted by nobody here: the system's roots are asked
    config = with_certificate(tmp_path, ca, "a.test")
    config.write_text(config.read_text().replace(f'ca_bundle = "{ca.path}"', ""))
    code, out = check(config, "--no-dns")
    assert code == 1 and "a.test: the issuer CN=Parley test CA is neither in" in out
    assert "fix: append the intermediate certificates to" in out


def test_a_key_that_does_not_match(tmp_path: Path) -> None:
    ca = TestCA(tmp_path / "ca")
    config = with_certificate(tmp_path, ca, "a.test")
    ca.issue("b.test", tmp_path)
    config.write_text(config.read_text().replace("a.test.key", "b.test.key"))
    code, out = check(config, "--no-dns")
    assert code == 1 and f"the key {tmp_path / 'b.test.key'} does not go with" in out


def test_a_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out = check(write(tmp_path, port=port), "--no-dns")
    assert code == 1
    assert f"listeners[0] (c2s) 127.0.0.1:{port}: in use by another program" in out
    assert f"fix: stop it (`ss -ltnp 'sport = :{port}'` names it) or change the listener's port" in out


def test_configuration_problems_are_each_named(tmp_path: Path) -> None:
    config = write(tmp_path, host_table='[hosts."a.test".module_options.muc]\nbogus = 1\n',
                   extra='[module_options.vcard]\nmax_size = "x"\n')
    code, out = check(config, "--no-dns")
    assert code == 1 and "parley.toml: 2 problem(s)" in out
    assert "PROBLEM: config key 'module_options.vcard.max_size': must be an integer of at least 1" in out
    assert "PROBLEM: config key 'hosts.\"a.test\".module_options.muc.bogus': unknown option 'bogus'" in out
    assert "fix: correct it in" in out


async def test_missing_srv_records_and_addresses(tmp_path: Path) -> None:
    config = write(tmp_path)
    client_port = load_config(config).listeners[0].port
    proc, asker = await dnsmasq([f"_xmpp-client._tcp.a.test,a.test,{client_port},0,5", f"{SRV_NAME},b.test,5269,0,5"])
    try:
        code, out = await asyncio.to_thread(check, config, "--nameserver", f"{DNS_ADDR}:{asker.port}")
    finally:
        proc.terminate()
        proc.wait()
    assert code == 1
    assert "no SRV record _xmpp-client._tcp.a.test" not in out
    assert "_xmpp-client._tcp.a.test points to a.test., which has no A or AAAA record" in out
    for name in ("_xmpps-client._tcp.a.test", "_xmpp-server._tcp.a.test", "_xmpp-server._tcp.conference.a.test",
                 "_xmpp-server._tcp.pubsub.a.test"):
        assert f"no SRV record {name}: nobody finds Parley's port" in out
        assert f"fix: add `{name}. 3600 IN SRV 0 5 " in out
    assert "conference.a.test has no A or AAAA record and no SRV record" in out
