"""Import straight from an ejabberd PostgreSQL database: what XEP-0227 carries, plus the message archive and
the persistent rooms with their affiliations and archives.

Both of ejabberd's schemas are read: ``pg.new.sql`` (a ``server_host`` column, several hosts in one database)
and the older single-host ``pg.sql``, whose rows do not say their host, so the caller names it. Archived
messages keep their timestamps and their ids (ejabberd's stanza-id is the archive row's microsecond timestamp),
so clients that remember where they stopped syncing carry on. Only the data of accounts created by this import
is written: an account that exists here already is left as it is and reported.

Public API: ``await import_ejabberd_sql(storage, url, hosts, host=None, iterations=4096)`` -> ImportReport.
"""

from __future__ import annotations

import base64
import binascii
import re
import sys
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from xml.etree.ElementTree import Element, ParseError, SubElement

from ejabberd_compat.piefxis import ROSTER, VCARD_STORE, ImportReport, archived, roster_item, store_private
from server import ns
from server.accounts import AccountError, credentials_for, prepare_username
from server.jid import JID, JIDError
from server.stanza import add_delay, parse_datetime, parse_stored
from server.storage import Storage, StoredCredentials
from server.storage.archive import NewMessage
from server.storage.muc import Affiliation, MucStore, StoredRoom
from server.stream.writer import not_xml, serialize

if TYPE_CHECKING:
    import asyncpg

_SUBSCRIPTION = {"B": "both", "T": "to", "F": "from", "N": "none"}
_ASK_OUT, _ASK_IN = frozenset("SOB"), frozenset("IB")  # ejabberd's ask: subscribe, out, both / in, both
_KEY_HASH = {20: "SHA-1", 32: "SHA-256"}  # SCRAM key length -> hash
_DELAY = ns.qname(ns.DELAY, "delay")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# ejabberd tables holding data this importer does not bring over, reported when they have rows.
NOT_IMPORTED = {"privacy_list": "privacy lists", "archive_prefs": "archiving preferences",
                "muc_registered": "registered room nicknames", "sr_group": "shared roster groups",
                "motd": "messages of the day", "last": "last activity"}


class SqlImportError(Exception):
    """The database cannot be read as ejabberd's; nothing was imported."""


async def import_ejabberd_sql(storage: Storage, url: str, hosts: Collection[str], host: str | None = None,
                              iterations: int = 4096) -> ImportReport:
    """Import the served ``hosts`` (or only ``host``) from the ejabberd database at ``url``
    (``postgresql://user@server/db``; ``?schema=NAME`` reads a schema other than the default)."""
    import asyncpg  # only this import reads ejabberd's PostgreSQL directly: `parley` does not load it otherwise

    dsn, schema = _dsn(url)
    try:
        conn = await asyncpg.connect(dsn, server_settings={"search_path": schema} if schema else None)
    except (OSError, asyncpg.PostgresError) as exc:
        raise SqlImportError(f"cannot connect to {url}: {exc}") from None
    try:
        source = await _Source.open(conn)
        if source.multihost:
            wanted = [host] if host else list(hosts)
        elif host is None:
            raise SqlImportError("this database has ejabberd's single-host schema (no server_host column): "
                                 "name its host")
        else:
            wanted = [host]
        report = ImportReport()
        for name in wanted:
            if name not in hosts:
                report.problems.append(f"host {name} is not served here")
                continue
            await _import_host(source, storage, name, iterations, report)
        nodes = len(await source.rows("pubsub_node", "1", ""))  # rows not marked with their host
        if nodes:
            report.problems.append(f"{nodes} publish-subscribe and PEP node(s) of ejabberd's pubsub_node not imported")
        return report
    finally:
        await conn.close()


def _dsn(url: str) -> tuple[str, str | None]:
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("postgresql", "postgres", "postgresql+asyncpg"):
        raise SqlImportError(f"{url!r} is not a PostgreSQL URL (postgresql://user@server/database)")
    match = re.search(r"[?&]schema=([^&]+)", rest)
    rest = re.sub(r"[?&]schema=[^&]+", "", rest)
    return f"postgresql://{rest}", match.group(1) if match else None


@dataclass
class _Source:
    """ejabberd's tables, read for one host at a time in either schema."""

    conn: asyncpg.Connection
    multihost: bool
    tables: dict[str, set[str]]  # table -> its columns

    @classmethod
    async def open(cls, conn: asyncpg.Connection) -> _Source:
        rows = await conn.fetch("SELECT table_name, column_name FROM information_schema.columns "
                                "WHERE table_schema = current_schema()")
        tables: dict[str, set[str]] = {}
        for row in rows:
            tables.setdefault(row["table_name"], set()).add(row["column_name"])
        if "users" not in tables:
            raise SqlImportError("no ejabberd 'users' table in this database (wrong database or schema?)")
        return cls(conn, "server_host" in tables["users"], tables)

    async def rows(self, table: str, columns: str, host: str, where: str = "", order: str = "") -> list[Any]:
        """The host's rows of a table (all its rows when they do not say their host); none when the table is
        not there (an older ejabberd)."""
        if table not in self.tables:
            return []
        by_host = self.multihost and "server_host" in self.tables[table]
        conditions = [c for c in ("server_host = $1" if by_host else "", where) if c]
        sql = f"SELECT {columns} FROM {table}"  # table and columns are this module's constants
        if conditions:
            sql += " WHERE " + " AND ".join(conditions)
        if order:
            sql += f" ORDER BY {order}"
        return await self.conn.fetch(sql, host) if by_host else await self.conn.fetch(sql)


async def _import_host(source: _Source, storage: Storage, host: str, iterations: int, report: ImportReport) -> None:
    created: dict[str, str] = {}  # ejabberd's username -> Parley's (prepared) one, for accounts made here
    for row in await source.rows("users", "username, password, serverkey, salt, iterationcount", host):
        try:
            user = prepare_username(row["username"], host)
            credentials = sql_credentials(row["password"], row["serverkey"], row["salt"], row["iterationcount"],
                                          iterations)
        except (AccountError, ValueError) as exc:
            report.problems.append(f"user {row['username']!r}@{host}: {exc}")
            continue
        if await storage.accounts.create(host, user, credentials):
            created[row["username"]] = user
            report.users += 1
        else:
            report.problems.append(f"{user}@{host} exists already; left as it is")
    await _rosters(source, storage, host, created, report)
    for row in await source.rows("vcard", "username, vcard", host):
        vcard = _parse(row["vcard"], f"vCard of {row['username']}", report) if row["username"] in created else None
        if vcard is not None:
            await storage.kv.set(host, created[row["username"]], VCARD_STORE, "", serialize(vcard))
            report.vcards += 1
    for row in await source.rows("private_storage", "username, data", host):
        document = _parse(row["data"], f"private data of {row['username']}", report) \
            if row["username"] in created else None
        if document is not None:
            await store_private(storage, host, created[row["username"]], document, report)
    for row in await source.rows("spool", "username, xml, created_at", host, order="seq"):
        message = _parse(row["xml"], f"offline message of {row['username']}", report) \
            if row["username"] in created else None
        if message is not None:
            stamp = _stamp(message, row["created_at"])
            if message.find(_DELAY) is None:
                add_delay(message, host, stamp, "Offline Storage")
            await storage.offline.push(host, created[row["username"]], serialize(message), stamp, sys.maxsize)
            report.offline += 1
    await _archives(source, storage, host, created, report)
    await _rooms(source, storage, host, report)
    for table, what in NOT_IMPORTED.items():
        found = len(await source.rows(table, "1", host))
        if found:
            report.problems.append(f"{host}: {found} row(s) of ejabberd's {table} ({what}) not imported")


def sql_credentials(password: str, server_key: str, salt: str, count: int, iterations: int) -> list[StoredCredentials]:
    """ejabberd's users row: SCRAM keys in base64 when it stores them (iterationcount > 0), else the
    plaintext password, which is hashed here."""
    if not count:
        return credentials_for(password, iterations)
    try:
        stored, server, raw_salt = (base64.b64decode(v.encode("ascii"), validate=True)
                                    for v in (password, server_key, salt))
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError("its SCRAM keys are not base64") from None
    if len(stored) != len(server) or len(stored) not in _KEY_HASH or not raw_salt:
        raise ValueError(f"its SCRAM keys ({len(stored)} bytes) are of a hash this server does not support")
    return [StoredCredentials(_KEY_HASH[len(stored)], raw_salt, count, stored, server)]


async def _rosters(source: _Source, storage: Storage, host: str, created: dict[str, str],
                   report: ImportReport) -> None:
    groups: dict[tuple[str, str], list[str]] = {}
    for row in await source.rows("rostergroups", "username, jid, grp", host):
        groups.setdefault((row["username"], row["jid"]), []).append(row["grp"])
    rows = await source.rows("rosterusers", "username, jid, nick, subscription, ask, askmessage", host)
    for row in rows:
        if row["username"] not in created:
            continue
        user = created[row["username"]]
        subscription, ask = _SUBSCRIPTION.get(row["subscription"].strip(), "none"), row["ask"].strip()
        item_el = Element("item", {"jid": row["jid"], "subscription": subscription, "name": row["nick"] or "",
                                   **({"ask": "subscribe"} if ask in _ASK_OUT else {})})
        for group in groups.get((row["username"], row["jid"]), []):
            SubElement(item_el, ns.qname(ROSTER, "group")).text = group
        try:
            _xml_text(f"roster item {row['jid']}", row["nick"], row["askmessage"], groups.get((row["username"],
                                                                                             row["jid"])))
            item = roster_item(item_el)
        except ValueError as exc:
            report.problems.append(f"{user}@{host}: {exc}")
            continue
        if ask in _ASK_IN:
            await storage.roster.add_pending(host, user, item.jid, _subscribe_request(item.jid, f"{user}@{host}",
                                                                                        row["askmessage"]))
        if subscription != "none" or item.ask or ask not in _ASK_IN:  # a bare inbound request is no roster item
            await storage.roster.put(host, user, item)
            report.roster_items += 1


def _subscribe_request(contact: str, user: str, message: str) -> str:
    presence = Element(ns.qname(ns.CLIENT, "presence"), {"from": contact, "to": user, "type": "subscribe"})
    if message:
        SubElement(presence, ns.qname(ns.CLIENT, "status")).text = message
    return serialize(presence)


async def _archives(source: _Source, storage: Storage, host: str, created: dict[str, str],
                    report: ImportReport) -> None:
    """Users' archives; a room's rows (username 'room@service') go with the room."""
    batches: dict[str, list[NewMessage]] = {}
    for row in await source.rows("archive", "username, timestamp, xml", host, where="username NOT LIKE '%@%'",
                                 order="timestamp, id"):
        if row["username"] not in created:
            continue
        message = _parse(row["xml"], f"archived message of {row['username']}", report)
        if message is not None:
            try:
                user = created[row["username"]]
                batches.setdefault(user, []).append(
                    archived(JID.make(user, host), str(row["timestamp"]), _when(row["timestamp"]),
                             message))
            except JIDError as exc:
                report.problems.append(f"archived message {row['timestamp']} of {row['username']}: {exc}")
    for user, batch in batches.items():
        await storage.archive.append_many(host, user, batch)
        report.archived += len(batch)


async def _rooms(source: _Source, storage: Storage, host: str, report: ImportReport) -> None:
    rooms = MucStore(storage.engine)
    archives: dict[str, list[Any]] = {}
    for row in await source.rows("archive", "username, timestamp, xml, nick", host, where="username LIKE '%@%'",
                                 order="timestamp, id"):
        archives.setdefault(row["username"], []).append(row)
    existing: dict[str, set[str]] = {}
    for row in await source.rows("muc_room", "name, host, opts, created_at", host):
        service, name = row["host"], row["name"]
        if service not in existing:
            existing[service] = {room.name for room in await rooms.rooms(service)}
        if name in existing[service]:
            report.problems.append(f"room {name}@{service} exists already; left as it is")
            continue
        try:
            jid = JID.make(name, service)
            room = stored_room(jid.local or "", parse_term(row["opts"]), row["created_at"].replace(tzinfo=UTC))
        except (ValueError, JIDError) as exc:
            report.problems.append(f"room {name}@{service}: {exc}")
            continue
        await rooms.save_room(service, room)
        report.rooms += 1
        await _room_archive(storage, jid, archives.get(str(jid), []), report)


async def _room_archive(storage: Storage, room: JID, rows: list[Any], report: ImportReport) -> None:
    """ejabberd archives what the occupant sent, from their real JID; Parley keeps what the room broadcast,
    from room/nick, with the nick as the 'with' resource."""
    batch = []
    for row in rows:
        message = _parse(row["xml"], f"archived message of {room}", report)
        if message is None:
            continue
        nick = row["nick"] or None
        message.attrib.pop("to", None)
        message.set("from", f"{room}/{nick}" if nick else str(room))
        body = " ".join(b.text for b in message.iterfind(ns.qname(ns.CLIENT, "body")) if b.text) or None
        batch.append(NewMessage(str(row["timestamp"]), _when(row["timestamp"]), str(room), nick, body,
                                serialize(message)))
    if batch:
        await storage.archive.append_many(room.domain, room.local or "", batch)
        report.archived += len(batch)


def _when(microseconds: int) -> datetime:
    return _EPOCH + timedelta(microseconds=microseconds)


def _stamp(message: Element, fallback: datetime) -> datetime:
    delay = message.find(_DELAY)
    try:
        return parse_datetime(delay.get("stamp", "")) if delay is not None else fallback.replace(tzinfo=UTC)
    except ValueError:
        return fallback.replace(tzinfo=UTC)


def _xml_text(what: str, *texts: Any) -> None:
    """ValueError naming `what` when one of `texts` (strings, or lists and tuples of them, as in room
    options) holds a character XML cannot carry: Parley writes these texts into stanzas."""
    for text in texts:
        if isinstance(text, str) and (char := not_xml(text)):
            raise ValueError(f"{what} contains {char}, a character XML does not allow; not imported")
        if isinstance(text, list | tuple):
            _xml_text(what, *text)


def _parse(xml: str, what: str, report: ImportReport) -> Element | None:
    try:
        _xml_text(what, xml)
    except ValueError as exc:
        report.problems.append(str(exc))
        return None
    try:
        return parse_stored(xml)
    except (ParseError, IndexError):
        report.problems.append(f"{what}: not well-formed XML")
        return None


# --- ejabberd's room options: an Erlang term, as io_lib:format("~p") writes it ------------------------------


class Atom(str):
    """An Erlang atom, told apart from a binary (which becomes a plain str)."""


_TOKEN = re.compile(r"""\s*(?:(<<)|(>>)|([\[\]{},])|("(?:[^"\\]|\\.)*")(/utf8)?|(-?\d+(?:\.\d+(?:e-?\d+)?)?)"""
                    r"""|([a-z][A-Za-z0-9_@]*)|('(?:[^'\\]|\\.)*'))""")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'"}


def _unescape(quoted: str) -> str:
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(1)), quoted[1:-1])


def parse_term(text: str) -> Any:
    """Lists, tuples, binaries, atoms, numbers and strings: what room options are made of. ValueError if not."""
    tokens = []
    pos = 0
    while pos < len(text.rstrip(". \n")):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise ValueError(f"room options: cannot read the Erlang term at {text[pos:pos + 20]!r}")
        tokens.append(match)
        pos = match.end()
    value, end = _term(tokens, 0)
    if end != len(tokens):
        raise ValueError("room options: text after the Erlang term")
    return value


def _term(tokens: list[re.Match[str]], i: int) -> tuple[Any, int]:
    if i >= len(tokens):
        raise ValueError("room options: the Erlang term ends early")
    t = tokens[i]
    if t.group(3) in ("[", "{"):
        close = "]" if t.group(3) == "[" else "}"
        items: list[Any] = []
        i += 1
        while i < len(tokens) and tokens[i].group(3) != close:
            item, i = _term(tokens, i)
            items.append(item)
            if i < len(tokens) and tokens[i].group(3) == ",":
                i += 1
        if i >= len(tokens):
            raise ValueError(f"room options: no closing {close!r}")
        return (items if close == "]" else tuple(items)), i + 1
    if t.group(1):
        return _binary(tokens, i + 1)
    if t.group(4):
        return _unescape(t.group(4)), i + 1
    if t.group(6):
        return (float(t.group(6)) if "." in t.group(6) else int(t.group(6))), i + 1
    if t.group(7) or t.group(8):
        return Atom(t.group(7) or _unescape(t.group(8))), i + 1
    raise ValueError(f"room options: unexpected {t.group(0).strip()!r}")


def _binary(tokens: list[re.Match[str]], i: int) -> tuple[str, int]:
    """<<"text"/utf8, 195, 169>> and the like, decoded as UTF-8 (what ejabberd puts in binaries)."""
    data = bytearray()
    while i < len(tokens) and not tokens[i].group(2):
        t = tokens[i]
        if t.group(4):
            text = _unescape(t.group(4))
            data += text.encode("utf-8") if t.group(5) else text.encode("latin-1", "replace")
        elif t.group(6) and t.group(6).isdigit() and int(t.group(6)) < 256:
            data.append(int(t.group(6)))
        elif t.group(3) != ",":
            raise ValueError(f"room options: unexpected {t.group(0).strip()!r} in a binary")
        i += 1
    if i >= len(tokens):
        raise ValueError("room options: no closing '>>'")
    return data.decode("utf-8", "replace"), i + 1


# ejabberd room option -> Parley RoomConfig field, for the options that mean the same.
_ROOM_OPTIONS = {"title": "name", "description": "description", "lang": "language", "persistent": "persistent",
                 "public": "public", "members_only": "members_only", "moderated": "moderated",
                 "max_users": "max_users", "allow_change_subj": "change_subject",
                 "allow_user_invites": "allow_invites", "mam": "archive"}
_AFFILIATIONS = ("owner", "admin", "member", "outcast")


def stored_room(name: str, options: Any, created: datetime) -> StoredRoom:
    """A Parley room from ejabberd's option list ([{Key, Value}]); ValueError if it is not one."""
    if not isinstance(options, list) or not all(isinstance(o, tuple) and len(o) == 2 for o in options):
        raise ValueError("room options are not a list of {Key, Value}")
    _xml_text("room options", options)
    opts = dict(options)
    config: dict[str, Any] = {}
    for key, field_name in _ROOM_OPTIONS.items():
        value = opts.get(key)
        if isinstance(value, Atom) and value in ("true", "false"):
            config[field_name] = value == "true"
        elif isinstance(value, int | str) and not isinstance(value, Atom):
            config[field_name] = value
    if opts.get("password_protected") == "true":
        config["password"] = str(opts.get("password", ""))
    config["whois"] = "moderators" if opts.get("anonymous", Atom("true")) == "true" else "anyone"
    if opts.get("allow_private_messages") == "false":
        config["allow_pm"] = "none"
    affiliations = {}
    for entry in opts.get("affiliations", []):
        jid, affiliation, reason = _affiliation(entry)
        if affiliation in _AFFILIATIONS:
            affiliations[jid] = Affiliation(affiliation, None, reason or None)
    return StoredRoom(name, config, created, _subject(opts.get("subject")), str(opts.get("subject_author", "")),
                      affiliations)


def _affiliation(entry: Any) -> tuple[str, str, str]:
    """{{User, Server, Resource}, {Affiliation, Reason}} (or a bare Affiliation) -> (bare JID, affiliation, reason)."""
    if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], tuple) and len(entry[0]) == 3):
        raise ValueError(f"room affiliation {entry!r} is not {{{{User, Server, Resource}}, Affiliation}}")
    user, server, _ = entry[0]
    value = entry[1]
    affiliation, reason = (value[0], value[1]) if isinstance(value, tuple) and len(value) == 2 else (value, "")
    try:
        jid = JID.make(user or None, server)
    except JIDError as exc:
        raise ValueError(f"room affiliation of {user}@{server}: {exc}") from None
    return str(jid), str(affiliation), str(reason)


def _subject(value: Any) -> str:
    """A binary in older versions; a list of {text, Lang, Text} in newer ones."""
    if isinstance(value, list):
        texts = [v[2] for v in value if isinstance(v, tuple) and len(v) == 3]
        return str(texts[0]) if texts else ""
    return "" if value is None or isinstance(value, Atom) else str(value)
