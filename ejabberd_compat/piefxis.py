"""XEP-0227 (Portable Import/Export Format for XMPP-IM Servers): move accounts and their data between servers.

The format is what ejabberd's ``export_piefxis`` and Prosody's ``mod_storage_xep0227`` write, so one import
path serves admins of both. What moves: accounts with their SCRAM keys (the ``urn:xmpp:pie:0#scram``
extension; users keep their passwords without the server ever knowing them) or a plaintext password, which
is hashed on import; rosters with names, groups, subscription and pending ``ask``; vCards; private XML
storage; offline messages; and the message archive in Prosody's ``urn:xmpp:pie:0#mam`` extension.

Public API, used by ``parley import-piefxis``/``export-piefxis`` and by parleyctl:

- ``await import_piefxis(storage, path, hosts, iterations)`` reads a file or a directory of files and
  returns an :class:`ImportReport`. The whole input is parsed before anything is written, so a malformed
  file raises :class:`PiefxisError` and changes nothing. An account that exists already is left as it is,
  and so are users of hosts not in ``hosts``; each such problem is a line of ``ImportReport.problems``.
- ``await export_piefxis(storage, directory, hosts)`` writes ejabberd's layout: one file per host and a
  ``server-data`` file that includes them (XInclude), and returns the path of that main file.
- ``await export_account(storage, host, user)`` is one account's document, for the user to download.
"""

from __future__ import annotations

import base64
import binascii
import sys
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from xml.etree.ElementTree import Element, SubElement, TreeBuilder
from xml.parsers import expat

from sqlalchemy import select

from extensions.bookmarks import STORAGE as BOOKMARKS_STORAGE
from extensions.bookmarks import legacy_list, note_imported
from server import ns
from server.accounts import AccountError, credentials_for, prepare_username
from server.jid import JID, JIDError
from server.stanza import add_delay, parse_datetime, parse_stored, xmpp_datetime
from server.storage import RosterItem, Storage, StoredCredentials
from server.storage.archive import ArchiveFilter, NewMessage
from server.storage.engine import user_rows
from server.storage.roster import SUBSCRIPTIONS
from server.storage.schema import offline
from server.stream.writer import escape_attr, serialize

PIE = "urn:xmpp:pie:0"
PIE_SCRAM = "urn:xmpp:pie:0#scram"
PIE_MAM = "urn:xmpp:pie:0#mam"
XINCLUDE = "http://www.w3.org/2001/XInclude"
ROSTER = "jabber:iq:roster"
PRIVATE = "jabber:iq:private"
MAM = "urn:xmpp:mam:2"
FORWARD = "urn:xmpp:forward:0"
VCARD_STORE, PRIVATE_STORE = "vcard", "private"  # the key-value stores of extensions/vcard.py and private.py
_MESSAGE = ns.qname(ns.CLIENT, "message")
_DELAY = ns.qname(ns.DELAY, "delay")
_BODY = ns.qname(ns.CLIENT, "body")
# SCRAM mechanism -> (Parley's hash name, key length in bytes).
_SCRAM = {"SCRAM-SHA-1": ("SHA-1", 20), "SCRAM-SHA-256": ("SHA-256", 32)}
_ARCHIVE_PAGE = 500
_IMPORTED = frozenset({ns.qname(PIE_SCRAM, "scram-credentials"), ns.qname(ROSTER, "query"), ns.qname(ns.VCARD, "vCard"),
                       ns.qname(PRIVATE, "query"), ns.qname(PIE, "offline-messages"), ns.qname(PIE_MAM, "archive")})


class PiefxisError(Exception):
    """The input cannot be read as XEP-0227; nothing was imported."""


@dataclass
class ImportReport:
    users: int = 0
    roster_items: int = 0
    vcards: int = 0
    private: int = 0
    offline: int = 0
    archived: int = 0
    rooms: int = 0
    problems: list[str] = field(default_factory=list)  # what was skipped, and why

    def summary(self) -> str:
        counts = (f"imported {self.users} user(s), {self.roster_items} roster item(s), {self.vcards} vCard(s), "
                  f"{self.private} private document(s), {self.offline} offline message(s), "
                  f"{self.archived} archived message(s)" + (f", {self.rooms} room(s)" if self.rooms else ""))
        return "\n".join([counts, *(f"skipped: {p}" for p in self.problems)])


def pie(tag: str) -> str:
    return ns.qname(PIE, tag)


def read_xml(path: Path) -> Element:
    """Parse a file, refusing DTDs: an export never needs one, and entities could expand without bound."""
    builder = TreeBuilder()
    parser = expat.ParserCreate(namespace_separator="}")

    def start(name: str, attrs: dict[str, str]) -> None:
        builder.start(_clark(name), {_clark(k): v for k, v in attrs.items()})

    def refuse(*_: object) -> None:
        raise PiefxisError(f"{path}: document type declarations are not accepted")

    parser.StartElementHandler = start
    parser.EndElementHandler = lambda name: builder.end(_clark(name))
    parser.CharacterDataHandler = builder.data
    parser.StartDoctypeDeclHandler = refuse
    try:
        with open(path, "rb") as fh:
            parser.ParseFile(fh)
    except OSError as exc:
        raise PiefxisError(f"cannot read {path}: {exc.strerror or exc}") from None
    except expat.ExpatError as exc:
        raise PiefxisError(f"{path} is not well-formed XML: {exc}") from None
    return builder.close()


def _clark(name: str) -> str:
    """expat gives 'uri}local' for a qualified name; ElementTree wants '{uri}local'."""
    return "{" + name if "}" in name else name


def _host_elements(path: Path) -> list[Element]:
    """The <host/> elements of an export: a server-data file (with XIncludes resolved), a host file, or a
    directory whose server-data files are read (ejabberd's host files are reached through its main file)."""
    if path.is_dir():
        roots = [(f, read_xml(f)) for f in sorted(path.glob("*.xml"))]
        hosts = [h for f, root in roots if root.tag == pie("server-data") for h in _server_data(f, root)]
        if not hosts:
            raise PiefxisError(f"{path} holds no XEP-0227 server-data file")
        return hosts
    root = read_xml(path)
    if root.tag == pie("host"):
        return [root]
    if root.tag == pie("server-data"):
        return _server_data(path, root)
    raise PiefxisError(f"{path}: the top element is {root.tag}, not {{{PIE}}}server-data")


def _server_data(path: Path, root: Element) -> list[Element]:
    hosts = []
    for child in root:
        if child.tag == pie("host"):
            hosts.append(child)
        elif child.tag == ns.qname(XINCLUDE, "include"):
            hosts.append(_included(path, child.get("href", "")))
    return hosts


def _included(path: Path, href: str) -> Element:
    """A host file named by an XInclude: only a file beside the main one, never a path elsewhere."""
    target = path.parent / href
    if not href or "/" in href or "\\" in href or href in (".", ".."):
        raise PiefxisError(f"{path}: XInclude href {href!r} must name a file in the same folder")
    root = read_xml(target)
    if root.tag != pie("host"):
        raise PiefxisError(f"{target}: the top element is {root.tag}, not {{{PIE}}}host")
    return root


def _b64(text: str | None, what: str) -> bytes:
    try:
        return base64.b64decode((text or "").strip().encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError(f"{what} is not base64") from None


def scram_credentials(el: Element) -> StoredCredentials:
    """One <scram-credentials/> element; ValueError names what is wrong with it."""
    mechanism = el.get("mechanism", "")
    if mechanism not in _SCRAM:
        raise ValueError(f"unsupported SCRAM mechanism {mechanism!r}")
    hash_name, size = _SCRAM[mechanism]
    count = (el.findtext(ns.qname(PIE_SCRAM, "iter-count")) or "").strip()
    if not count.isdigit() or int(count) < 1:
        raise ValueError("iter-count must be a positive integer")
    fields = [_b64(el.findtext(ns.qname(PIE_SCRAM, name)), name) for name in ("salt", "stored-key", "server-key")]
    if len(fields[1]) != size:
        # ejabberd (23.01 at least) encodes its database's values, base64 already, a second time.
        fields = [_b64(value.decode("ascii", "replace"), name)
                  for value, name in zip(fields, ("salt", "stored-key", "server-key"), strict=True)]
    salt, stored_key, server_key = fields
    if len(stored_key) != size or len(server_key) != size or not salt:
        raise ValueError(f"the keys are not {mechanism} keys")
    return StoredCredentials(hash_name, salt, int(count), stored_key, server_key)


def _user_credentials(user: Element, iterations: int) -> list[StoredCredentials]:
    password = user.get("password")
    if password is not None:
        return credentials_for(password, iterations)
    found = [scram_credentials(el) for el in user.iterfind(ns.qname(PIE_SCRAM, "scram-credentials"))]
    if not found:
        raise ValueError("it has neither a password nor SCRAM credentials")
    return found


def roster_item(el: Element) -> RosterItem:
    """A jabber:iq:roster <item/>; ValueError for an unusable one."""
    try:
        contact = JID.parse(el.get("jid", ""))
    except JIDError as exc:
        raise ValueError(f"roster item {el.get('jid')!r}: {exc}") from None
    subscription = el.get("subscription", "none")
    if subscription not in SUBSCRIPTIONS:
        raise ValueError(f"roster item {contact}: subscription {subscription!r}")
    groups = tuple(dict.fromkeys(g.text.strip() for g in el.iterfind(ns.qname(ROSTER, "group"))
                                 if g.text and g.text.strip()))
    return RosterItem(str(contact.bare), el.get("name") or None, subscription, el.get("ask") == "subscribe",
                      False, groups)


def archived(owner: JID, stanza_id: str, stamp: datetime, message: Element) -> NewMessage:
    """An archive row for a message the owner sent or received: the other party is whoever is not the owner."""
    sender = JID.parse(message.get("from") or str(owner))
    other = JID.parse(message.get("to") or str(owner)) if sender.bare == owner.bare else sender
    body = " ".join(b.text for b in message.iterfind(_BODY) if b.text) or None
    return NewMessage(stanza_id, stamp, str(other.bare), other.resource, body, serialize(message))


def _stamp(message: Element) -> datetime:
    delay = message.find(_DELAY)
    if delay is not None:
        try:
            return parse_datetime(delay.get("stamp", ""))
        except ValueError:
            pass
    return datetime.now(UTC)


async def import_piefxis(storage: Storage, path: Path, hosts: Collection[str],
                         iterations: int = 4096) -> ImportReport:
    """Import every user of the served ``hosts`` from a XEP-0227 file or folder; ``iterations`` is the
    SCRAM iteration count for plaintext passwords. Raises PiefxisError (nothing imported) for bad input."""
    elements = _host_elements(Path(path))
    report = ImportReport()
    for host_el in elements:
        try:
            host = str(JID.make(None, host_el.get("jid", "")))
        except JIDError as exc:
            raise PiefxisError(f"host {host_el.get('jid')!r}: {exc}") from None
        users = host_el.findall(pie("user"))
        if host not in hosts:
            report.problems.append(f"host {host} is not served here ({len(users)} user(s))")
            continue
        for user_el in users:
            await _import_user(storage, host, user_el, iterations, report)
    return report


async def store_private(storage: Storage, host: str, user: str, document: Element, report: ImportReport) -> None:
    """Keep an imported private XML document. XEP-0048 bookmarks, which ejabberd and Prosody keep there, are
    noted for extensions/bookmarks.py, which makes them PEP bookmarks at the next start."""
    await storage.kv.set(host, user, PRIVATE_STORE, document.tag, serialize(document))
    if document.tag == BOOKMARKS_STORAGE:
        await note_imported(storage, host)
    report.private += 1


async def _import_user(storage: Storage, host: str, user_el: Element, iterations: int,
                       report: ImportReport) -> None:
    name = user_el.get("name", "")
    try:
        user = prepare_username(name, host)
        credentials = _user_credentials(user_el, iterations)
    except (AccountError, ValueError) as exc:
        report.problems.append(f"user {name!r}@{host}: {exc}")
        return
    if not await storage.accounts.create(host, user, credentials):
        report.problems.append(f"{user}@{host} exists already; left as it is")
        return
    report.users += 1
    owner = JID.make(user, host)
    for tag in dict.fromkeys(child.tag for child in user_el if child.tag not in _IMPORTED):
        report.problems.append(f"{owner}: {tag} is not imported (Parley keeps no such data)")
    for item_el in user_el.iterfind(f"{ns.qname(ROSTER, 'query')}/{ns.qname(ROSTER, 'item')}"):
        try:
            item = roster_item(item_el)
        except ValueError as exc:
            report.problems.append(f"{owner}: {exc}")
            continue
        await storage.roster.put(host, user, item)
        report.roster_items += 1
    vcard = user_el.find(ns.qname(ns.VCARD, "vCard"))
    if vcard is not None:
        await storage.kv.set(host, user, VCARD_STORE, "", serialize(vcard))
        report.vcards += 1
    for document in user_el.iterfind(f"{ns.qname(PRIVATE, 'query')}/*"):
        await store_private(storage, host, user, document, report)
    for message in user_el.iterfind(f"{pie('offline-messages')}/{_MESSAGE}"):
        stamp = _stamp(message)
        if message.find(_DELAY) is None:
            add_delay(message, host, stamp, "Offline Storage")
        await storage.offline.push(host, user, serialize(message), stamp, sys.maxsize)
        report.offline += 1
    rows = []
    for result in user_el.iterfind(f"{ns.qname(PIE_MAM, 'archive')}/{ns.qname(MAM, 'result')}"):
        forwarded = result.find(ns.qname(FORWARD, "forwarded"))
        message = forwarded.find(_MESSAGE) if forwarded is not None else None
        if message is None or not result.get("id"):
            report.problems.append(f"{owner}: an archived message without id or <forwarded/> message")
            continue
        try:
            rows.append(archived(owner, result.get("id", ""), _stamp(forwarded), message))
        except JIDError as exc:
            report.problems.append(f"{owner}: archived message {result.get('id')}: {exc}")
    if rows:
        await storage.archive.append_many(host, user, rows)
        report.archived += len(rows)


async def export_piefxis(storage: Storage, directory: Path, hosts: Sequence[str], for_ejabberd: bool = False) -> Path:
    """Write the users of ``hosts`` with all their data into ``directory`` (created if needed), one file per
    host and a main file including them; returns the main file's path. ``for_ejabberd`` writes the SCRAM keys
    the way ejabberd's import_piefxis reads them: SHA-1 only, each value base64-encoded twice."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    includes = []
    for host in hosts:
        host_el = Element(pie("host"), {"jid": host})
        for user in await storage.accounts.list(host):
            host_el.append(await _export_user(storage, host, user, for_ejabberd))
        name = f"{stamp}_{host.replace('.', '_')}.xml"
        _write(directory / name, serialize(host_el))
        includes.append(f'<xi:include href="{escape_attr(name)}"/>')
    path = directory / f"{stamp}.xml"
    # The 'xi' prefix written out: ejabberd's importer knows the include by that name, not by its namespace.
    _write(path, f'<server-data xmlns="{PIE}" xmlns:xi="{XINCLUDE}">{"".join(includes)}</server-data>')
    return path


def _write(path: Path, xml: str) -> None:
    path.write_text(_document(xml), encoding="utf-8")


def _document(xml: str) -> str:
    return "<?xml version='1.0' encoding='UTF-8'?>\n" + xml + "\n"


async def export_account(storage: Storage, host: str, user: str) -> str:
    """One account with all its data as a XEP-0227 document: a server-data file holding its host inline,
    which `import_piefxis` (and ejabberd's and Prosody's importers) read as they read a whole export, so a
    user can take their account to another server."""
    user_el = await _export_user(storage, host, user, for_ejabberd=False)
    server_data = Element(pie("server-data"))
    SubElement(server_data, pie("host"), {"jid": host}).append(user_el)
    return _document(serialize(server_data))


async def _export_user(storage: Storage, host: str, user: str, for_ejabberd: bool) -> Element:
    el = Element(pie("user"), {"name": user})
    account = await storage.accounts.get(host, user)
    for creds in (account.credentials.values() if account else ()):
        if for_ejabberd and creds.hash_name != "SHA-1":
            continue
        scram = SubElement(el, ns.qname(PIE_SCRAM, "scram-credentials"), {"mechanism": f"SCRAM-{creds.hash_name}"})
        SubElement(scram, ns.qname(PIE_SCRAM, "iter-count")).text = str(creds.iterations)
        for name, value in (("salt", creds.salt), ("server-key", creds.server_key), ("stored-key", creds.stored_key)):
            text = base64.b64encode(value)
            SubElement(scram, ns.qname(PIE_SCRAM, name)).text = \
                (base64.b64encode(text) if for_ejabberd else text).decode()
    _, items = await storage.roster.get(host, user)
    if items:
        query = SubElement(el, ns.qname(ROSTER, "query"))
        for item in items.values():
            attrs = {"jid": item.jid, "subscription": item.subscription,
                     **({"name": item.name} if item.name else {}), **({"ask": "subscribe"} if item.ask else {})}
            item_el = SubElement(query, ns.qname(ROSTER, "item"), attrs)
            for group in item.groups:
                SubElement(item_el, ns.qname(ROSTER, "group")).text = group
    vcard = await storage.kv.get(host, user, VCARD_STORE)
    if vcard:
        el.append(parse_stored(vcard))
    keys = await storage.kv.keys(host, user, PRIVATE_STORE)
    # Bookmarks live in PEP (XEP-0402); exports carry them as XEP-0048 ones in private storage, where an
    # import (Parley's, ejabberd's, Prosody's) looks. An imported list not converted yet is there already.
    bookmarks = None if BOOKMARKS_STORAGE in keys else await legacy_list(storage, JID.make(user, host))
    if keys or (bookmarks is not None and len(bookmarks)):
        query = SubElement(el, ns.qname(PRIVATE, "query"))
        for key in keys:
            query.append(parse_stored(await storage.kv.get(host, user, PRIVATE_STORE, key)))
        if bookmarks is not None and len(bookmarks):
            query.append(bookmarks)
    messages = await _offline_messages(storage, host, user)
    if messages:
        SubElement(el, pie("offline-messages")).extend(parse_stored(xml) for xml in messages)
    await _export_archive(storage, host, user, el)
    return el


async def _offline_messages(storage: Storage, host: str, user: str) -> list[str]:
    """Read without removing: the offline store's own API only pops, for delivery."""
    async with storage.engine.begin() as conn:
        rows = await conn.execute(select(offline.c.stanza_xml).where(*user_rows(offline, host, user))
                                  .order_by(offline.c.id))
        return [row.stanza_xml for row in rows]


async def _export_archive(storage: Storage, host: str, user: str, el: Element) -> None:
    """The archive in Prosody's urn:xmpp:pie:0#mam extension, read page by page."""
    archive: Element | None = None
    after: str | None = None
    while True:
        page = await storage.archive.query(host, user, ArchiveFilter(), _ARCHIVE_PAGE, after=after)
        for message in page.messages:
            if archive is None:
                archive = SubElement(el, ns.qname(PIE_MAM, "archive"))
            result = SubElement(archive, ns.qname(MAM, "result"), {"id": message.id})
            forwarded = SubElement(result, ns.qname(FORWARD, "forwarded"))
            SubElement(forwarded, _DELAY, {"stamp": xmpp_datetime(message.stamp)})
            forwarded.append(parse_stored(message.stanza_xml))
        if page.complete or not page.messages:
            return
        after = page.messages[-1].id
