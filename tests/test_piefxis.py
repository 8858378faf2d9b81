"""XEP-0227 export and import (ejabberd_compat/piefxis.py): a round trip through Parley's own export, hand-written
and hostile files, and Prosody's export made by Debian's prosody-migrator (mod_storage_xep0227)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from slixmpp import ClientXMPP

from bench.servers import fill_template, port_open
from ejabberd_compat.piefxis import PiefxisError, export_piefxis, import_piefxis, read_xml
from parley import main
from server.storage import RosterItem, open_storage
from server.tls import ensure_certificate
from tests.conftest import Harness, free_port, insecure_context, unavailable
from tests.test_basic_modules import send_iq
from tests.test_cli import create_database
from tests.test_mam import Archive
from tests.test_offline import collect, take

PIE = "urn:xmpp:pie:0"
MAM = "urn:xmpp:mam:2"
NOTES = "http://miranda-im.org/storage#notes"
DATA = Path(__file__).resolve().parent / "data"


async def test_round_trip_through_parleys_own_export(server: Harness, tmp_path: Path) -> None:
    """Everything exported comes back after the accounts are deleted: passwords, roster, vCard, private data,
    offline messages and the archive with its ids."""
    storage = server.server.storage
    alice_jid, bob_jid = await server.add_user("alice", "wonderland"), await server.add_user("bob", "builder")
    await storage.roster.put("localhost", "alice", RosterItem(bob_jid, "Bobby", "both", groups=("Friends", "Work")))
    await storage.roster.put("localhost", "bob", RosterItem(alice_jid, None, "both"))
    alice = await server.client(alice_jid, "wonderland", plugins=("xep_0054",))
    bob = await server.client(bob_jid, "builder")
    inbox = collect(bob)
    await alice.plugin["xep_0054"].publish_vcard(alice.plugin["xep_0054"].make_vcard())
    await send_iq(alice, "set", "<vCard xmlns='vcard-temp'><FN>Alice Liddell</FN></vCard>")
    await send_iq(alice, "set", f"<query xmlns='jabber:iq:private'><notes xmlns='{NOTES}'><note>n</note></notes>"
                                "</query>")
    alice.send_message(mto=bob.boundjid.full, mbody="archived", mtype="chat")
    await take(inbox, 1)
    history = [r.id for r in await Archive(alice).all()]
    await server.close()
    await storage.offline.push("localhost", "bob", "<message from='alice@localhost' to='bob@localhost' "
                               "type='chat'><body>while away</body></message>", datetime.now(UTC), 10)

    main = await export_piefxis(storage, tmp_path / "export", ["localhost"])
    exported = read_xml(tmp_path / "export" / next(iter(read_xml(main))).get("href"))
    assert exported.find(f"{{{PIE}}}user").get("password") is None  # keys only: the password is never known
    for user in ("alice", "bob"):
        assert await storage.accounts.delete("localhost", user)
    report = await import_piefxis(storage, main, ["localhost"])
    assert (report.users, report.roster_items, report.vcards, report.private, report.offline, report.archived) == \
        (2, 2, 1, 1, 1, 2)
    assert report.problems == []

    alice = await server.client(alice_jid, "wonderland", plugins=("xep_0054",))
    items = (await alice.get_roster())["roster"]["items"]
    assert (items[bob_jid]["name"], set(items[bob_jid]["groups"]), items[bob_jid]["subscription"]) == \
        ("Bobby", {"Friends", "Work"}, "both")
    assert (await alice.plugin["xep_0054"].get_vcard(alice_jid))["vcard_temp"]["FN"] == "Alice Liddell"
    private = await send_iq(alice, "get", f"<query xmlns='jabber:iq:private'><notes xmlns='{NOTES}'/></query>")
    assert private.findtext(f".//{{{NOTES}}}note") == "n"
    assert [r.id for r in await Archive(alice).all()] == history
    bob = await server.client(bob_jid, "builder")
    inbox = collect(bob)
    bob.send_presence()
    [message] = await take(inbox, 1)
    assert message.findtext("{jabber:client}body") == "while away"


SAMPLE = """<?xml version='1.0' encoding='UTF-8'?>
<server-data xmlns='urn:xmpp:pie:0'>
  <host jid='localhost'>
    <user name='Carol' password='pässwörd'>
      <query xmlns='jabber:iq:roster'>
        <item jid='dave@example.org' subscription='none' ask='subscribe' name='Dave'><group>Later</group></item>
        <item jid='@@' subscription='both'/>
        <item jid='erin@example.org' subscription='sometimes'/>
      </query>
      <query xmlns='jabber:iq:privacy'><list name='quiet'/></query>
    </user>
    <user name='nokeys'/>
    <user name='bad user' password='x'/>
    <user name='frank'>
      <scram-credentials xmlns='urn:xmpp:pie:0#scram' mechanism='SCRAM-SHA-512'>
        <iter-count>4096</iter-count><salt>c2FsdA==</salt><server-key>AA==</server-key><stored-key>AA==</stored-key>
      </scram-credentials>
    </user>
  </host>
  <host jid='elsewhere.test'><user name='gina' password='x'/></host>
</server-data>
"""


async def test_plaintext_passwords_are_hashed_and_what_cannot_be_imported_is_reported(
        server: Harness, tmp_path: Path) -> None:
    (tmp_path / "sample.xml").write_text(SAMPLE, encoding="utf-8")
    report = await import_piefxis(server.server.storage, tmp_path / "sample.xml", server.server.config.hosts)
    assert (report.users, report.roster_items) == (1, 1)
    assert report.problems == [
        "carol@localhost: {jabber:iq:privacy}query is not imported (Parley keeps no such data)",
        "carol@localhost: roster item '@@': empty localpart",
        "carol@localhost: roster item erin@example.org: subscription 'sometimes'",
        "user 'nokeys'@localhost: it has neither a password nor SCRAM credentials",
        report.problems[4],
        "user 'frank'@localhost: unsupported SCRAM mechanism 'SCRAM-SHA-512'",
        "host elsewhere.test is not served here (1 user(s))",
    ]
    assert report.problems[4].startswith("user 'bad user'@localhost: invalid username")
    assert await server.server.storage.accounts.list("localhost") == ["carol"]
    carol = await server.client("carol@localhost", "pässwörd")  # SCRAM-SHA-256 too: the password was hashed here
    items = (await carol.get_roster())["roster"]["items"]
    assert (items["dave@example.org"]["name"], items["dave@example.org"]["ask"]) == ("Dave", "subscribe")


@pytest.mark.parametrize("content, reason", [
    ("<?xml version='1.0'?><!DOCTYPE lolz [<!ENTITY lol 'lol'>]><server-data xmlns='urn:xmpp:pie:0'/>",
     "document type declarations are not accepted"),
    ("<server-data xmlns='urn:xmpp:pie:0'><host jid='localhost'>", "not well-formed XML"),
    ("<users/>", "not {urn:xmpp:pie:0}server-data"),
    ("<server-data xmlns='urn:xmpp:pie:0' xmlns:xi='http://www.w3.org/2001/XInclude'>"
     "<xi:include href='../secret.xml'/></server-data>", "must name a file in the same folder"),
    ("<server-data xmlns='urn:xmpp:pie:0' xmlns:xi='http://www.w3.org/2001/XInclude'>"
     "<host jid='localhost'><user name='ok' password='x'/></host><xi:include href='missing.xml'/></server-data>",
     "cannot read"),
])
async def test_bad_files_are_refused_before_anything_is_written(tmp_path: Path, content: str, reason: str) -> None:
    storage = await open_storage(f"sqlite+aiosqlite:///{tmp_path}/parley.db")
    try:
        (tmp_path / "in.xml").write_text(content)
        with pytest.raises(PiefxisError, match=reason):
            await import_piefxis(storage, tmp_path / "in.xml", ["localhost"])
        assert await storage.accounts.count("localhost") == 0
    finally:
        await storage.close()


PROSODY_HOST = f"p{os.getpid()}.prosody.test"
PROSODY_DATA = Path("/var/lib/prosody")  # where Debian's prosody-migrator writes XEP-0227 files


async def _populate_prosody(port: int) -> list[str]:
    """alice, logged in to the real Prosody, fills her roster, vCard and private storage and writes to bob
    (offline, so the message is archived on both sides); returns the id Prosody gave it in alice's archive."""
    alice = ClientXMPP(f"alice@{PROSODY_HOST}", "wonder land")
    alice.ssl_context = insecure_context()
    alice.enable_plaintext = False
    started: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    alice.add_event_handler("session_start", lambda _: started.done() or started.set_result(True))
    alice.connect("127.0.0.1", port)
    await asyncio.wait_for(started, 10)
    try:
        await alice.update_roster(f"bob@{PROSODY_HOST}", name="Bobby", groups=["Friends"])
        await send_iq(alice, "set", "<vCard xmlns='vcard-temp'><FN>Alice Prosody</FN></vCard>")
        await send_iq(alice, "set", f"<query xmlns='jabber:iq:private'><notes xmlns='{NOTES}'><note>n</note></notes>"
                                    "</query>")
        alice.send_message(mto=f"bob@{PROSODY_HOST}", mbody="hi bob", mtype="chat")
        results = collect(alice)
        for _ in range(50):  # archived right after routing; a query may just precede it
            await send_iq(alice, "set", f"<query xmlns='{MAM}' queryid='q'/>")  # results come before the answer
            ids = []
            while not results.empty():
                result = results.get_nowait().find(f"{{{MAM}}}result")
                ids += [result.get("id")] if result is not None else []
            if ids:
                return ids
            await asyncio.sleep(0.1)
        raise AssertionError("Prosody did not archive the message")
    finally:
        alice.disconnect()


@pytest.fixture
async def prosody_export(tmp_path: Path) -> AsyncIterator[tuple[Path, list[str]]]:
    """Two users of a real Prosody (Debian's 0.12) with data made by a client, exported by prosody-migrator to
    XEP-0227 files (which it writes into Prosody's data folder, from where they are moved), with alice's archive
    ids. Prosody runs as its own user, so its folder is under /tmp, not in pytest's private one."""
    if os.geteuid() != 0 or shutil.which("prosodyctl") is None or shutil.which("prosody-migrator") is None:
        unavailable("needs root and Debian's prosody (apt-get install -y prosody)")
    work = Path(tempfile.mkdtemp(prefix="parley-prosody-export-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        work.chmod(0o755)
        (work / "data").mkdir()
        ensure_certificate(PROSODY_HOST, work / f"{PROSODY_HOST}.crt", work / f"{PROSODY_HOST}.key")
        port = free_port()
        config = work / "prosody.cfg.lua"
        config.write_text(fill_template((DATA / "prosody-migration.cfg.lua").read_text(), {
            "PORT": str(port), "S2S_PORT": str(free_port()), "DIR": str(work), "DOMAIN": PROSODY_HOST}))
        migrator = work / "migrator.cfg.lua"
        migrator.write_text(f'input {{ type = "internal"; path = "{work}/data"; hosts = {{ ["{PROSODY_HOST}"] = '
                            '{ "accounts", "roster", "vcard", "private", "archive-archive" } } }\n'
                            'output { type = "xep0227" }\n')
        subprocess.run(["chown", "-R", "prosody:prosody", str(work)], check=True)
        for user, password in (("alice", "wonder land"), ("bob", "builder")):
            _run("prosodyctl", "--config", str(config), "register", user, PROSODY_HOST, password)
        proc = subprocess.Popen(["prosody", "--config", str(config)], user="prosody", cwd=work,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while not port_open("127.0.0.1", port):
            assert proc.poll() is None and time.monotonic() < deadline, "Prosody did not start"
            await asyncio.sleep(0.05)
        ids = await _populate_prosody(port)
        proc.terminate()
        proc.wait(10)
        try:
            _run("prosody-migrator", "--config", str(migrator), "input", "output")
        finally:
            for written in PROSODY_DATA.glob(f"*@{PROSODY_HOST}.xml"):
                shutil.move(written, tmp_path / written.name)
        yield tmp_path, ids
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)


def _run(*command: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if done.returncode:
        raise AssertionError(f"{' '.join(command)}: {done.stdout}{done.stderr}")


@pytest.mark.parley_config(hosts={PROSODY_HOST: {}})
async def test_prosodys_export_imports_and_users_keep_their_passwords_and_data(
        server: Harness, prosody_export: tuple[Path, list[str]]) -> None:
    folder, history = prosody_export
    report = await import_piefxis(server.server.storage, folder, server.server.config.hosts)
    assert (report.users, report.roster_items, report.vcards, report.private, report.archived, report.problems) == \
        (2, 1, 1, 1, 2, [])
    await server.client(f"bob@{PROSODY_HOST}", "builder")
    alice = await server.client(f"alice@{PROSODY_HOST}", "wonder land", plugins=("xep_0054",))
    items = (await alice.get_roster())["roster"]["items"]
    bob = items[f"bob@{PROSODY_HOST}"]
    assert (bob["name"], bob["groups"]) == ("Bobby", ["Friends"])
    assert (await alice.plugin["xep_0054"].get_vcard(f"alice@{PROSODY_HOST}"))["vcard_temp"]["FN"] == "Alice Prosody"
    private = await send_iq(alice, "get", f"<query xmlns='jabber:iq:private'><notes xmlns='{NOTES}'/></query>")
    assert private.findtext(f".//{{{NOTES}}}note") == "n"
    archived = await Archive(alice).all()
    assert [(r.id, r.body) for r in archived] == [(history[0], "hi bob")]  # Prosody's archive id is kept


def _config(folder: Path) -> str:
    folder.mkdir()
    (folder / "parley.toml").write_text(f'data_dir = "{folder}/data"\n[hosts."example.test"]\n')
    return str(folder / "parley.toml")


def test_the_parley_commands_move_accounts_between_servers(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    old, new = _config(tmp_path / "old"), _config(tmp_path / "new")
    create_database(Path(old))  # as the old server's first start did: user commands create no database
    assert main(["user", "--config", old, "add", "ann@example.test", "--password", "a password"]) == 0
    assert main(["export-piefxis", str(tmp_path / "export"), "--host", "example.test", "--config", old]) == 0
    main_file = capsys.readouterr().out.strip().rsplit(" ", 1)[1]
    assert main(["import-piefxis", str(tmp_path / "export"), "--config", new]) == 0
    assert capsys.readouterr().out.startswith("imported 1 user(s), 0 roster item(s)")
    assert main(["user", "--config", new, "list"]) == 0
    assert capsys.readouterr().out.split() == ["ann@example.test"]
    assert main(["export-piefxis", str(tmp_path / "x"), "--host", "elsewhere.test", "--config", old]) == 2
    (tmp_path / "bad.xml").write_text("<server-data xmlns='urn:xmpp:pie:0'>")
    assert main(["import-piefxis", str(tmp_path / "bad.xml"), "--config", new]) == 1
    assert "not well-formed XML" in capsys.readouterr().err
    assert Path(main_file).exists()
