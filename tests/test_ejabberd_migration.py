"""Moving from the real ejabberd (Debian's 23.01) to Parley: its XEP-0227 export, and its PostgreSQL database.

One ejabberd per module keeps its data in a PostgreSQL database created for it (ejabberd's own ``pg.new.sql``
schema, dropped afterwards). Users, rosters, vCards, private storage, offline messages, the archive and a
room are all made through its own ``ejabberdctl``; Parley imports them and users log in with their original
passwords through slixmpp.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from xml.etree.ElementTree import Element

import asyncpg
import pytest
from slixmpp import ClientXMPP

from bench.servers import fill_template
from ejabberd_compat.config import STORAGE_SCHEMA, load_ejabberd_config
from ejabberd_compat.piefxis import export_piefxis, import_piefxis
from ejabberd_compat.sql_import import SqlImportError, import_ejabberd_sql
from parley import build_server, main
from server.registry import available
from server.storage import RosterItem
from tests.conftest import Harness, free_port, unavailable
from tests.s2s_peers import Ejabberd, PeerUnavailable
from tests.test_basic_modules import send_iq
from tests.test_mam import MAM, RSM, Archive
from tests.test_offline import DELAY, collect, take

pytestmark = pytest.mark.timeout(90)

DATA = Path(__file__).resolve().parent / "data"
DOMAIN = "example.test"
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
SCHEMA = Path("/usr/share/ejabberd/sql/pg.new.sql")
DISCO_INFO = "http://jabber.org/protocol/disco#info"
MUC_ADMIN = "http://jabber.org/protocol/muc#admin"
FORWARD = "urn:xmpp:forward:0"
NOTES = "http://miranda-im.org/storage#notes"
PASSWORDS = {"alice": "wonderland", "bob": "builder", "carol": "Très secret ünïcode"}


class MigrationEjabberd(Ejabberd):
    """ejabberd with no listener at all (ejabberdctl talks to it over Erlang distribution) and its data in
    PostgreSQL; node and database are named after this process, so that parallel test runs do not meet."""

    name = "ejabberd-migration"
    ports = ()

    def __init__(self, database: str) -> None:
        super().__init__("127.0.0.1", DOMAIN, None)  # type: ignore[arg-type]
        self.database = database
        self.node = f"parley-migration-{os.getpid()}@localhost"

    def launch(self) -> None:
        d = self.dir
        for sub in ("spool", "logs", "export"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        (d / "ejabberd.yml").write_text(fill_template((DATA / "ejabberd-migration.yml").read_text(),
                                              {"DOMAIN": self.domain, "DATABASE": self.database}))
        (d / "ejabberdctl.cfg").write_text('ERL_OPTIONS="-env ERL_CRASH_DUMP_BYTES 0"\n')
        shutil.copy("/etc/ejabberd/inetrc", d / "inetrc")
        subprocess.run(["chown", "-R", "ejabberd:ejabberd", str(d)], check=True)
        self.proc = subprocess.Popen(self._ctl("foreground"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     cwd=d)

    def ctl(self, *args: str) -> str:
        done = subprocess.run(self._ctl(*args), capture_output=True, text=True, cwd=self.dir, timeout=30)
        if done.returncode:
            raise AssertionError(f"ejabberdctl {' '.join(args)}: {done.stdout}{done.stderr}")
        return done.stdout


@dataclass
class EjabberdData:
    export: Path  # the main file of export_piefxis
    database_url: str  # ejabberd's database, for the SQL importer
    archive: dict[str, list[str]]  # archive owner (user, or room JID) -> stanza ids, oldest first
    peer: MigrationEjabberd


async def _create_database(name: str) -> None:
    admin = await asyncpg.connect(PG_ADMIN)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:5432/{name}")
    try:
        await conn.execute(SCHEMA.read_text())
    finally:
        await conn.close()


async def _drop_database(name: str) -> None:
    admin = await asyncpg.connect(PG_ADMIN)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def _archive(name: str) -> dict[str, list[str]]:
    conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:5432/{name}")
    try:
        rows = await conn.fetch("SELECT username, timestamp FROM archive ORDER BY timestamp")
    finally:
        await conn.close()
    found: dict[str, list[str]] = {}
    for row in rows:
        found.setdefault(row["username"], []).append(str(row["timestamp"]))
    return found


def _populate(peer: MigrationEjabberd) -> None:
    for user, password in PASSWORDS.items():
        peer.ctl("register", user, DOMAIN, password)
    peer.ctl("add_rosteritem", "alice", DOMAIN, "bob", DOMAIN, "Bobby", "Friends;Work", "both")
    peer.ctl("add_rosteritem", "alice", DOMAIN, "carol", DOMAIN, "Carol", "", "to")
    # add_rosteritem writes one side only; the other makes the pairs consistent (Parley checks on login).
    peer.ctl("add_rosteritem", "bob", DOMAIN, "alice", DOMAIN, "Alice", "", "both")
    peer.ctl("add_rosteritem", "carol", DOMAIN, "alice", DOMAIN, "Alice", "", "from")
    peer.ctl("set_vcard", "alice", DOMAIN, "FN", "Alice Liddell")
    peer.ctl("set_vcard2", "alice", DOMAIN, "N", "GIVEN", "Alice")
    peer.ctl("private_set", "alice", DOMAIN,
             f"<notes xmlns='{NOTES}'><note>remember</note></notes>")
    # alice is offline: both messages wait in her offline spool, and mod_mam archives them for both users.
    peer.ctl("send_message", "chat", f"bob@{DOMAIN}", f"alice@{DOMAIN}", "", "hello alice")
    peer.ctl("send_message", "chat", f"bob@{DOMAIN}", f"alice@{DOMAIN}", "", "are you there?")
    service = f"conference.{DOMAIN}"
    peer.ctl("create_room", "lobby", service, DOMAIN)
    peer.ctl("change_room_option", "lobby", service, "persistent", "true")
    peer.ctl("change_room_option", "lobby", service, "title", "The Lobby")
    peer.ctl("set_room_affiliation", "lobby", service, f"alice@{DOMAIN}", "owner")
    peer.ctl("set_room_affiliation", "lobby", service, f"bob@{DOMAIN}", "member")
    # A MucSub subscriber may post without joining: the room's archive gets a message from ejabberdctl.
    for option in ("mam", "allow_subscription"):
        peer.ctl("change_room_option", "lobby", service, option, "true")
    peer.ctl("subscribe_room", f"bob@{DOMAIN}/phone", "Bobby", f"lobby@{service}", "urn:xmpp:mucsub:nodes:messages")
    peer.ctl("send_message", "groupchat", f"bob@{DOMAIN}/phone", f"lobby@{service}", "", "hello room")


@pytest.fixture(scope="module")
def ejabberd_data() -> Iterator[EjabberdData]:
    database = f"parley_ejabberd_{os.getpid()}"
    try:
        if os.geteuid() != 0 or shutil.which("ejabberdctl") is None or not SCHEMA.exists():
            raise PeerUnavailable("needs root and Debian's ejabberd (apt-get install -y ejabberd erlang-p1-pgsql)")
        if not list(Path("/usr/lib/erlang/lib").glob("p1_pgsql-*")):
            raise PeerUnavailable("ejabberd's PostgreSQL driver is missing (apt-get install -y erlang-p1-pgsql)")
        asyncio.run(_create_database(database))
    except (PeerUnavailable, OSError) as exc:
        unavailable(f"ejabberd cannot run: {exc}")
    peer = MigrationEjabberd(database)
    try:
        peer.start()
        _populate(peer)
        peer.ctl("export_piefxis", str(peer.dir / "export"))
        exports = sorted((peer.dir / "export").glob("*.xml"), key=lambda p: len(p.name))
        yield EjabberdData(exports[0], f"postgresql+asyncpg://postgres@127.0.0.1:5432/{database}",
                           asyncio.run(_archive(database)), peer)
    finally:
        peer.stop()
        peer.cleanup()
        asyncio.run(_drop_database(database))


async def _log_in_and_check(server: Harness, data: EjabberdData) -> ClientXMPP:
    """Everyone logs in with their ejabberd password; alice finds her roster, vCard, private data and
    offline messages, in order and with ejabberd's delay stamps."""
    for user in ("bob", "carol"):
        await server.client(f"{user}@{DOMAIN}", PASSWORDS[user])
    alice = await server.client(f"alice@{DOMAIN}", PASSWORDS["alice"], plugins=("xep_0054",))
    inbox = collect(alice)
    alice.send_presence()
    offline = await take(inbox, 2)
    assert [m.findtext("{jabber:client}body") for m in offline] == ["hello alice", "are you there?"]
    assert all(m.find(DELAY) is not None and m.get("from") == f"bob@{DOMAIN}" for m in offline)
    items = (await alice.get_roster())["roster"]["items"]
    assert set(items) == {f"bob@{DOMAIN}", f"carol@{DOMAIN}"}
    bob = items[f"bob@{DOMAIN}"]
    assert (bob["name"], set(bob["groups"]), bob["subscription"]) == ("Bobby", {"Friends", "Work"}, "both")
    assert items[f"carol@{DOMAIN}"]["subscription"] == "to"
    vcard = (await alice.plugin["xep_0054"].get_vcard(f"alice@{DOMAIN}"))["vcard_temp"]
    assert (vcard["FN"], vcard["N"]["GIVEN"]) == ("Alice Liddell", "Alice")
    private = await send_iq(alice, "get", f"<query xmlns='jabber:iq:private'><notes xmlns='{NOTES}'/></query>")
    assert private.findtext(f"{{jabber:iq:private}}query/{{{NOTES}}}notes/{{{NOTES}}}note") == "remember"
    return alice


async def test_export_piefxis_of_ejabberd_imports_with_passwords_and_data(
        server: Harness, ejabberd_data: EjabberdData) -> None:
    report = await import_piefxis(server.server.storage, ejabberd_data.export, server.server.config.hosts)
    # bob has one offline message too: the room message, which his MucSub subscription sent him
    assert (report.users, report.roster_items, report.vcards, report.private, report.offline) == (3, 4, 1, 1, 3)
    assert report.problems == []
    await _log_in_and_check(server, ejabberd_data)
    again = await import_piefxis(server.server.storage, ejabberd_data.export, server.server.config.hosts)
    assert again.users == 0 and len(again.problems) == 3  # existing accounts are left as they are


async def _room_archive(client: ClientXMPP, room: str) -> list[Element]:
    """The <result/> elements of one query of a room's archive (read by a member without joining)."""
    results = collect(client)
    fin = await send_iq(client, "set", f"<query xmlns='{MAM}' queryid='r'/>", room)
    count = int(fin.findtext(f"{{{MAM}}}fin/{{{RSM}}}set/{{{RSM}}}count") or 0)
    found = []
    while len(found) < count:
        result = (await asyncio.wait_for(results.get(), 5)).find(f"{{{MAM}}}result")
        if result is not None and result.get("queryid") == "r":
            found.append(result)
    return found


@pytest.mark.parametrize("server", ["postgresql"], indirect=True)
async def test_ejabberd_database_imports_with_archive_and_rooms(server: Harness, ejabberd_data: EjabberdData) -> None:
    storage, hosts = server.server.storage, server.server.config.hosts
    report = await import_ejabberd_sql(storage, ejabberd_data.database_url, hosts)
    archived = sum(len(ids) for ids in ejabberd_data.archive.values())
    assert (report.users, report.roster_items, report.vcards, report.private, report.offline, report.archived,
            report.rooms) == (3, 4, 1, 1, 3, archived, 1)
    assert report.problems == []
    await server.restart()  # the MUC service reads its rooms on start
    alice = await _log_in_and_check(server, ejabberd_data)
    for user, client in (("alice", alice), ("bob", await server.client(f"bob@{DOMAIN}", PASSWORDS["bob"]))):
        history = await Archive(client).all()
        assert [r.id for r in history] == ejabberd_data.archive[user]  # ejabberd's ids, so clients resume syncing
        # ejabberd's timestamps, as far as XEP-0082 stamps go (milliseconds)
        assert all(abs(r.stamp - datetime.fromtimestamp(int(r.id) / 1e6, UTC)) < timedelta(milliseconds=1)
                   for r in history)
    assert [r.body for r in await Archive(alice).all({"with": f"bob@{DOMAIN}"})] == ["hello alice", "are you there?"]
    room = f"lobby@conference.{DOMAIN}"
    info = await send_iq(alice, "get", f"<query xmlns='{DISCO_INFO}'/>", room)
    assert info.find(f"{{{DISCO_INFO}}}query/{{{DISCO_INFO}}}identity").get("name") == "The Lobby"
    members = await send_iq(alice, "get", f"<query xmlns='{MUC_ADMIN}'><item affiliation='member'/></query>", room)
    assert [i.get("jid") for i in members.iter(f"{{{MUC_ADMIN}}}item")] == [f"bob@{DOMAIN}"]
    results = await _room_archive(alice, room)
    assert [r.get("id") for r in results] == ejabberd_data.archive[room]
    message = results[0].find(f"{{{FORWARD}}}forwarded/{{jabber:client}}message")
    assert (message.get("from"), message.findtext("{jabber:client}body")) == (f"{room}/Bobby", "hello room")
    again = await import_ejabberd_sql(storage, ejabberd_data.database_url, hosts)
    assert (again.users, again.rooms, again.archived) == (0, 0, 0) and len(again.problems) == 4


OLD_SCHEMA = Path("/usr/share/ejabberd/sql/pg.sql")
COPIED = ("users", "rosterusers", "rostergroups", "spool", "archive", "vcard", "private_storage", "muc_room")


async def _single_host_copy(database: str) -> None:
    """ejabberd's older single-host schema (pg.sql) in the schema 'single', holding the rows the running ejabberd
    wrote, less their server_host column: the database of an ejabberd set up before pg.new.sql."""
    conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:5432/{database}")
    try:
        await conn.execute("DROP SCHEMA IF EXISTS single CASCADE; CREATE SCHEMA single; SET search_path TO single")
        await conn.execute(OLD_SCHEMA.read_text())
        for table in COPIED:
            columns = ", ".join(f'"{r["column_name"]}"' for r in await conn.fetch(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = 'single' "
                "AND table_name = $1", table))
            await conn.execute(f"INSERT INTO single.{table} ({columns}) SELECT {columns} FROM public.{table}")
    finally:
        await conn.close()


async def test_ejabberds_older_single_host_schema(server: Harness, ejabberd_data: EjabberdData) -> None:
    await _single_host_copy(ejabberd_data.database_url.rsplit("/", 1)[1])
    url = f"{ejabberd_data.database_url}?schema=single"
    storage, hosts = server.server.storage, server.server.config.hosts
    with pytest.raises(SqlImportError, match="single-host schema"):
        await import_ejabberd_sql(storage, url, hosts)  # its rows do not say their host: it must be named
    assert await storage.accounts.count(DOMAIN) == 0
    conn = await asyncpg.connect(ejabberd_data.database_url.replace("+asyncpg", ""))
    try:  # what ejabberd's mod_last writes when alice logs out: Parley has no place for it, so it is reported
        await conn.execute("INSERT INTO single.last (username, seconds, state) VALUES ('alice', '1795298000', '')")
    finally:
        await conn.close()
    report = await import_ejabberd_sql(storage, url, hosts, host=DOMAIN)
    assert (report.users, report.roster_items, report.offline, report.rooms) == (3, 4, 3, 1)
    assert report.problems == [f"{DOMAIN}: 1 row(s) of ejabberd's last (last activity) not imported"]
    alice = await server.client(f"alice@{DOMAIN}", PASSWORDS["alice"])
    assert [r.id for r in await Archive(alice).all()] == ejabberd_data.archive["alice"]


@pytest.mark.parametrize("url, reason", [
    ("mysql://ejabberd@localhost/ejabberd", "not a PostgreSQL URL"),
    ("postgresql://postgres@127.0.0.1:5432/test?schema=parley_no_such_schema", "no ejabberd 'users' table"),
    ("postgresql://postgres@127.0.0.1:1/ejabberd", "cannot connect"),
])
async def test_what_is_not_an_ejabberd_database_is_refused(server: Harness, url: str, reason: str) -> None:
    with pytest.raises(SqlImportError, match=reason):
        await import_ejabberd_sql(server.server.storage, url, server.server.config.hosts)
    assert await server.server.storage.accounts.count(DOMAIN) == 0


async def test_parleys_export_imports_into_ejabberd(server: Harness, ejabberd_data: EjabberdData) -> None:
    """The way back: ejabberd's import_piefxis reads Parley's export (made for it) and its users keep their
    passwords, rosters and vCards."""
    storage, peer = server.server.storage, ejabberd_data.peer
    await server.add_user("zoe", "zebra crossing", host=DOMAIN)
    await storage.roster.put(DOMAIN, "zoe", RosterItem(f"alice@{DOMAIN}", "Alice", "to", groups=("Friends",)))
    await storage.kv.set(DOMAIN, "zoe", "vcard", "", "<vCard xmlns='vcard-temp'><FN>Zoe Zebra</FN></vCard>")
    main = await export_piefxis(storage, peer.dir / "from-parley", [DOMAIN], for_ejabberd=True)
    subprocess.run(["chown", "-R", "ejabberd", str(main.parent)], check=True)
    peer.ctl("import_piefxis", str(main))
    peer.ctl("check_password", "zoe", DOMAIN, "zebra crossing")  # fails (exit 1) on a wrong password
    assert peer.ctl("get_roster", "zoe", DOMAIN).split() == [f"alice@{DOMAIN}", "Alice", "to", "undefined", "Friends"]
    assert peer.ctl("get_vcard", "zoe", DOMAIN, "FN").strip() == "Zoe Zebra"
    with pytest.raises(AssertionError, match="false"):
        peer.ctl("check_password", "zoe", DOMAIN, "zebra")


async def test_one_ejabberd_yml_for_parley_and_for_the_import(ejabberd_data: EjabberdData, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The drop-in case: Parley started on an ejabberd.yml with sql_type pgsql keeps its tables in a schema of
    ejabberd's database, `parley import-ejabberd-sql --config` finds ejabberd's tables there, and the users log
    in with their passwords."""
    monkeypatch.setenv("PARLEY_DATA", str(tmp_path / "parley-data"))  # not /var/lib/parley
    database = ejabberd_data.database_url.rsplit("/", 1)[1]
    port = free_port()
    yml = tmp_path / "ejabberd.yml"
    yml.write_text(f"hosts: [{DOMAIN}]\nsql_type: pgsql\nsql_server: 127.0.0.1\nsql_database: {database}\n"
                   f"sql_username: postgres\nlisten:\n  - {{port: {port}, ip: 127.0.0.1, module: ejabberd_c2s}}\n"
                   "modules: {mod_roster: {}, mod_offline: {}, mod_vcard: {}, mod_private: {}, mod_mam: {}}\n")
    conn = await asyncpg.connect(ejabberd_data.database_url.replace("+asyncpg", ""))
    try:
        users = await conn.fetchval("SELECT count(*) FROM public.users")  # other tests of the module may add some
        assert await asyncio.to_thread(main, ["import-ejabberd-sql", "--config", str(yml)]) == 0
        assert capsys.readouterr().out.startswith(f"imported {users} user(s)")
        config, _ = load_ejabberd_config(yml, available())
        server = Harness(build_server(config), port, port, tmp_path)
        await server.server.start()
        try:
            alice = await server.client(f"alice@{DOMAIN}", PASSWORDS["alice"])
            assert [r.id for r in await Archive(alice).all()] == ejabberd_data.archive["alice"]
        finally:
            await server.close()
            await server.server.stop()
    finally:
        await conn.execute(f"DROP SCHEMA IF EXISTS {STORAGE_SCHEMA} CASCADE")
        await conn.close()
