"""What an operator finds in the logs: an XML trace without secrets, TLS failures with a reason, quiet stream
ends, library noise kept out, the tls-exporter's absence explained, and files only the server's user reads."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from server.sasl import channel_binding
from server.stream.parser import StreamParser
from server.stream.trace import mask
from server.tls import TlsContexts, ensure_certificate
from tests.conftest import Harness, RawClient, free_port, insecure_context
from tests.test_adhoc import admin_client
from tests.test_c2s import STREAMS, scram_login, stream_error_condition, tls_raw
from tests.test_cli import PARLEY, stop_process, write_config
from tests.test_register import ask, legacy, unauthenticated
from tests.test_service_admin import complete

SECRETS = ("Tr0ub4dor-login", "Tr0ub4dor-scram", "Tr0ub4dor-registered", "Tr0ub4dor-changed", "Tr0ub4dor-admin")


def trace_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "parley.xml"]


async def test_trace_shows_stanzas_both_ways_and_no_secret(server: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="parley.xml")
    login, scram_password, registered, changed, admin_password = SECRETS
    await server.add_user("alice", login)
    alice = await server.client("alice@localhost", login, sasl_mech="PLAIN")
    inbox = server.inbox(alice)
    alice.send_message(mto=alice.boundjid, mbody="hello trace", mtype="chat")
    assert (await asyncio.wait_for(inbox.get(), 5))["body"] == "hello trace"

    await server.add_user("bob", scram_password)
    assert (await scram_login(await tls_raw(server), "bob", scram_password)).tag.endswith("success")

    raw, _ = await unauthenticated(server)  # XEP-0077 registration, then a password change (form-less)
    assert (await ask(raw, "set", legacy("carol", registered))).get("type") == "result"
    carol = await server.client("carol@localhost", registered, plugins=("xep_0077",))
    await carol.plugin["xep_0077"].change_password(changed, timeout=5)

    admin = await admin_client(server)  # XEP-0133, its password in a data form
    command = await complete(admin, "change-user-password", accountjid="bob@localhost", password=admin_password)
    assert command["status"] == "completed"

    lines = trace_lines(caplog)
    assert any("RECV <message" in line and "hello trace" in line for line in lines)
    assert any("SEND <message" in line and "hello trace" in line for line in lines)
    assert any("RECV <message" in line and "alice@localhost/" in line.split(" RECV ")[0] for line in lines)
    assert any('<auth xmlns="urn:ietf:params:xml:ns:xmpp-sasl" mechanism="PLAIN">***</auth>' in line
               for line in lines)
    assert any("<challenge" in line for line in lines) and any("<password>***</password>" in line for line in lines)
    everything = "\n".join(record.getMessage() for record in caplog.records)
    for secret in SECRETS:
        assert secret not in everything
    assert base64.b64encode(f"\0alice\0{login}".encode()).decode() not in everything
    for line in lines:  # every SASL payload masked, whichever direction
        for tag in ("auth", "response", "challenge", "success"):
            if f"<{tag} " in line and f"</{tag}>" in line:
                assert line.split(f"</{tag}>")[0].rsplit(">", 1)[1] == "***", line


def test_mask_covers_every_password_field() -> None:
    form = ('<x xmlns="jabber:x:data" type="submit"><field var="accountjid"><value>a@b</value></field>'
            '<field var="password"><value>one</value></field><field var="password-verify"><value>two</value>'
            '</field><field type="text-private" var="secret"><value>three</value></field></x>')
    masked = mask(form)
    assert "one" not in masked and "two" not in masked and "three" not in masked
    assert "<value>a@b</value>" in masked and masked.count("<value>***</value>") == 3
    assert mask('<handshake xmlns="jabber:component:accept">abc</handshake>').count("abc") == 0
    assert mask("<message><body>password</body></message>") == "<message><body>password</body></message>"


async def test_trace_is_off_unless_debug(server: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="parley")
    await server.add_user("alice")
    await server.client("alice@localhost")
    assert not trace_lines(caplog)


async def starttls_proceeded(server: Harness) -> RawClient:
    raw = await server.raw()
    await raw.open()
    await raw.expect(f"{{{STREAMS}}}features")
    await raw.send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    await raw.expect("{urn:ietf:params:xml:ns:xmpp-tls}proceed")
    return raw


async def logged(caplog: pytest.LogCaptureFixture, words: str, count: int = 1) -> list[str]:
    """Parley's log lines containing `words`, once there are `count` of them (failing after 5 s)."""
    deadline = asyncio.get_running_loop().time() + 5
    while True:
        lines = [r.getMessage() for r in caplog.records if r.name.startswith("parley") and words in r.getMessage()]
        if len(lines) >= count:
            return lines
        assert asyncio.get_running_loop().time() < deadline, lines
        await asyncio.sleep(0.02)


async def handshake_failures(caplog: pytest.LogCaptureFixture, count: int) -> list[str]:
    """The reasons of the first `count` failed-handshake lines."""
    return [line.split("failed: ", 1)[1] for line in await logged(caplog, "TLS handshake with", count)]


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")  # on purpose
async def test_tls_handshake_failures_name_the_reason(server: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="parley.stream")  # STARTTLS is shared by c2s and s2s
    raw = await starttls_proceeded(server)
    raw.writer.close()
    assert await handshake_failures(caplog, 1) == ["client closed during handshake"]
    raw = await starttls_proceeded(server)
    await raw.send(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    await raw.closed()
    assert (await handshake_failures(caplog, 2))[1] == "SSL: HTTP_REQUEST"
    raw = await starttls_proceeded(server)
    old = insecure_context()
    old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("ALL:@SECLEVEL=0")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await raw.writer.start_tls(old, server_hostname="localhost")
    assert (await handshake_failures(caplog, 3))[2].startswith("SSL: ")


async def test_bytes_after_the_closing_tag_are_ignored(server: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="parley")
    await server.add_user("alice")
    raw = await tls_raw(server)
    assert (await scram_login(raw, "alice", "secret")).tag.endswith("success")
    raw.parser.reset()
    await raw.open()
    await raw.expect(f"{{{STREAMS}}}features")
    await raw.send("</stream:stream><presence type='unavailable'/>\x00junk")  # Profanity on quit, and worse
    received = await raw.closed()
    assert received.endswith(b"</stream:stream>") and stream_error_condition(received) is None
    assert not [r for r in caplog.records if "stream error" in r.getMessage()]


def test_parser_ignores_what_follows_the_closing_tag() -> None:
    parser = StreamParser()
    opened = parser.feed(b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>")
    assert len(opened) == 1
    events = parser.feed(b"<presence/></stream:stream>\x00<junk")
    assert [type(e).__name__ for e in events] == ["Element", "StreamClose"]
    assert parser.feed(b"more junk >") == []


async def test_direct_tls_on_a_starttls_port_is_named(server: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="parley")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await asyncio.open_connection("127.0.0.1", server.port, ssl=insecure_context(), server_hostname="localhost")
    [line] = await logged(caplog, "stream error")
    assert "not-well-formed" in line and "Direct TLS to a STARTTLS port" in line


def test_the_exporter_says_when_its_self_check_fails(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    def broken(self: object) -> None:
        raise RuntimeError("_SSLSocket layout mismatch")

    monkeypatch.setattr(channel_binding._Exporter, "_self_test", broken)
    exporter, problem = channel_binding._load_exporter()
    assert exporter is None
    monkeypatch.setattr(channel_binding, "_EXPORTER", exporter)
    monkeypatch.setattr(channel_binding, "_EXPORTER_PROBLEM", problem)
    ensure_certificate("localhost", tmp_path / "cert.pem", tmp_path / "key.pem")
    with caplog.at_level(logging.WARNING, logger="parley.tls"):
        TlsContexts({"localhost": (tmp_path / "cert.pem", tmp_path / "key.pem")})
    [warning] = [r for r in caplog.records if r.name == "parley.tls"]
    assert warning.levelno == logging.WARNING
    text = warning.getMessage()
    assert "_SSLSocket layout mismatch" in text and "no SCRAM-*-PLUS with tls-exporter" in text
    assert "tls-server-end-point" in text


async def test_without_the_exporter_plus_is_offered_with_tls_server_end_point(
        server: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the warning above promises."""
    monkeypatch.setattr(channel_binding, "_EXPORTER", None)
    raw = await tls_raw(server)
    await raw.open()
    features = await raw.expect(f"{{{STREAMS}}}features")
    types = {cb.get("type") for cb in features.iter("{urn:xmpp:sasl-cb:0}channel-binding")}
    assert types == {"tls-server-end-point"}
    mechanisms = {m.text for m in features.iter("{urn:ietf:params:xml:ns:xmpp-sasl}mechanism")}
    assert {"SCRAM-SHA-256-PLUS", "SCRAM-SHA-1-PLUS"} <= mechanisms


async def serve_verbose(config: Path) -> asyncio.subprocess.Process:
    """`parley serve -v`, once it says it is running."""
    proc = await asyncio.create_subprocess_exec(*PARLEY, "serve", "-v", "--config", str(config),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    while "Ctrl-C stops" not in (line := (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()):
        assert line, f"server exited: {(await proc.stderr.read()).decode()[-2000:]}"
    return proc


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_a_served_data_directory_is_private(tmp_path: Path) -> None:
    """`parley serve -v`: data dir 0700; database, its WAL files, key, certificate, socket and log 0600; the
    log has the XML trace and Parley's debug lines but not the libraries' (aiosqlite, asyncio)."""
    port, direct_port = free_port(), free_port()
    proc = await serve_verbose(write_config(tmp_path, port, direct_port, '[logging]\nfile = "parley.log"'))
    data = tmp_path / "data"
    harness = Harness(None, port, direct_port, tmp_path)  # type: ignore[arg-type]
    try:
        password = (data / "admin-password-localhost.txt").read_text().split()[1]
        await harness.client("admin@localhost", password)
    finally:
        await harness.close()
    files = {p.name: mode(p) for p in data.rglob("*") if not p.is_dir()}
    folders = {p.name: mode(p) for p in [data, *data.rglob("*")] if p.is_dir()}
    log_file = tmp_path / "parley.log"
    log_mode = mode(log_file)
    await stop_process(proc)
    assert set(folders.values()) == {0o700}, folders
    assert {"parley.db", "parley.db-wal", "parley.db-shm", "parleyctl.sock", "localhost.key",
            "localhost.crt"} <= set(files), files
    assert all(m == 0o600 for m in files.values()), {n: oct(m) for n, m in files.items() if m != 0o600}
    assert log_mode == 0o600
    log = log_file.read_text()
    assert " parley.xml: " in log and "SEND <stream:features" in log and password not in log
    assert " DEBUG parley." in log
    assert " aiosqlite:" not in log and " asyncio:" not in log and " sqlalchemy" not in log


async def test_sqlite_database_is_private_without_serve(server: Harness) -> None:
    """Also where the server runs in-process, as in these tests, or a command makes the database."""
    assert mode(server.data_dir / "parley.db") == 0o600
    assert mode(server.data_dir / "parley.db-wal") == 0o600


def test_setup_logging_keeps_libraries_quiet(tmp_path: Path) -> None:
    script = f"""
import logging, sys
from server.cli import _setup_logging
from tests.conftest import make_config
config = make_config({str(tmp_path)!r}, 1, 2, "sqlite+aiosqlite:///:memory:")
_setup_logging(config, int(sys.argv[1]))
for name in ("aiosqlite", "sqlalchemy.engine", "asyncio", "slixmpp"):
    logging.getLogger(name).debug("library-noise")
logging.getLogger("parley.xml").debug("parley-trace")
"""
    for verbose, noise in ((1, False), (2, True)):
        result = subprocess.run([sys.executable, "-c", script, str(verbose)], capture_output=True, text=True,
                                timeout=30, cwd=Path(__file__).parent.parent, env={**os.environ})
        assert "parley-trace" in result.stderr, result.stderr
        assert ("library-noise" in result.stderr) is noise, result.stderr
