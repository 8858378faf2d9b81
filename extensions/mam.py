"""XEP-0313 Message Archive Management for users, with XEP-0359 stanza-ids and XEP-0441 preferences.

Every chat or normal message worth keeping (server/archiving.py: a body, a reaction, a marker, a
retraction or other fastening, a store hint) that a user sends ('message/outbound') or receives
('message/deliver', fired once per message whichever resources get it, offline storage included) is
archived once in that user's archive, unless XEP-0334 hints forbid it or the preferences say no. A
received message is stamped with its archive UID as a <stanza-id/> before delivery; a sent one carries it
only while the carbons module copies it to the user's other resources, and loses it before it leaves.

Queries take the XEP-0313 form (with, start, end, before-id, after-id, ids, and the
'{urn:xmpp:fulltext:0}fulltext' field, answered by the database's full-text index) and XEP-0059 paging
both ways, flipped pages included; results go to the querying session, then the <fin/>.

Options: 'default' (preference when the user set none: always, never or roster), 'max_page' (the largest
page, and the page when a query names none), 'retention_days' (0 keeps messages forever).
"""

from __future__ import annotations

import asyncio
import base64
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from xml.etree.ElementTree import Element, SubElement

from server import ns
from server.archiving import turn_of, worth_archiving
from server.forms import Field, build_form, find_form, first_value, read_form
from server.jid import JID, JIDError
from server.module import Module
from server.options import Option
from server.sessions import Session
from server.stanza import Stanza, element, parse_datetime, parse_stored, xmpp_datetime
from server.storage.archive import ArchiveFilter, ArchiveStore, Page, UnknownArchiveId
from server.storage.kv import CachedDocuments
from server.stream.errors import StanzaError
from server.stream.writer import serialize

MAM = "urn:xmpp:mam:2"
EXTENDED = "urn:xmpp:mam:2#extended"
SID = "urn:xmpp:sid:0"
RSM = "http://jabber.org/protocol/rsm"
FULLTEXT = "{urn:xmpp:fulltext:0}fulltext"
QUERY = ns.qname(MAM, "query")
PREFS = ns.qname(MAM, "prefs")
METADATA = ns.qname(MAM, "metadata")
FLIP_PAGE = ns.qname(MAM, "flip-page")
STANZA_ID = ns.qname(SID, "stanza-id")
BODY = ns.qname(ns.CLIENT, "body")
DEFAULTS = ("always", "never", "roster")
FILTER_FIELDS = ("FORM_TYPE", "with", "start", "end", "before-id", "after-id", "ids", FULLTEXT)
ARCHIVE_PRIORITY = 10  # ahead of carbons, so that copies carry the stanza-id
MAX_PAGE = 250
EXPIRY_INTERVAL = 3600.0


def archivable(el: Element) -> bool:
    """XEP-0313 5.1.1: chat and normal messages whose content an archive keeps (server/archiving.py)."""
    return (el.get("type") or "normal") in ("chat", "normal") and worth_archiving(el)


@dataclass(frozen=True)
class Prefs:
    """XEP-0441 archiving preferences."""

    default: str
    always: frozenset[JID] = frozenset()
    never: frozenset[JID] = frozenset()

    def document(self) -> dict[str, Any]:
        return {"default": self.default, "always": sorted(map(str, self.always)),
                "never": sorted(map(str, self.never))}


class Mam(Module):
    name = "mam"
    options = (
        Option("default", str, "always", "what is archived for a user who set no preferences", choices=DEFAULTS),
        Option("retention_days", float, 0, "days messages are kept (fractions too); 0 keeps them forever", minimum=0),
        Option("max_page", int, MAX_PAGE, "the largest page of an archive query", minimum=1),
    )

    def setup(self) -> None:
        self._prefs = CachedDocuments(self.server.storage.kv, self.name, self._parse_prefs)
        # On the domain too, as ejabberd lists them: Profanity enables MAM only when the domain does.
        for target in ("host", "account"):
            for feature in (MAM, EXTENDED, SID):
                self.add_feature(feature, target)
        self.iq("get", QUERY, self.form, target="own")
        self.iq("set", QUERY, self.query, target="own")
        self.iq("get", PREFS, self.get_prefs, target="own")
        self.iq("set", PREFS, self.set_prefs, target="own")
        self.iq("get", METADATA, self.metadata, target="own")
        self.hook("message/outbound", self.sent, priority=ARCHIVE_PRIORITY)
        self.hook("message/outbound", self.leaving, priority=-ARCHIVE_PRIORITY)
        self.hook("message/deliver", self.received, priority=ARCHIVE_PRIORITY)

    async def start(self) -> None:
        if self.option("retention_days") > 0:
            self.spawn(self._expire())

    async def _expire(self) -> None:
        while True:
            cutoff = datetime.now(UTC) - timedelta(days=self.option("retention_days"))
            try:
                gone = await self.server.storage.archive.expire(self.host.name, cutoff)
                if gone:
                    self.log.info("%d archived messages older than %s expired", gone, cutoff)
            except Exception:
                self.log.exception("archive expiry failed")
            await asyncio.sleep(EXPIRY_INTERVAL)

    # --- archiving --------------------------------------------------------------------------------

    async def sent(self, stanza: Stanza) -> None:
        user = stanza.origin.bare
        # A message to the user's own account is archived once, where it is delivered.
        if stanza.to.bare != user and archivable(stanza.el):
            written = await self._archive(user, stanza.to, stanza.el)
            if written is not None:
                stanza.defer(_quiet(written))

    def leaving(self, stanza: Stanza) -> None:
        """The sender's archive UID is for the sender's resources only (XEP-0313 4.1)."""
        _remove_ids(stanza.el, stanza.origin.bare)

    async def received(self, stanza: Stanza, sessions: list[Session]) -> None:
        user = stanza.to.bare
        _remove_ids(stanza.el, user)  # XEP-0359 3: never trust an id claiming to come from this archive
        turn = turn_of(stanza.el)
        if archivable(stanza.el):
            written = await self._archive(user, stanza.from_, stanza.el)
            if written is not None and turn is not None:
                turn.park()  # its sender's connection reads on while the rows commit (server/archiving.py)
            # Delivered only once archived; when the archive failed, without the id of a row that is not there.
            if written is not None and not await _archived(written):
                _remove_ids(stanza.el, user)
        if turn is not None:
            await turn.in_order()  # delivered after the messages its sender sent before it

    async def _archive(self, user: JID, other: JID, el: Element) -> asyncio.Future[None] | None:
        """Queue the message for `user`'s archive and stamp its stanza-id; None when prefs say no.

        The sender's copy is not waited for before routing (the router waits for it at the end), so that
        it shares a transaction with the recipient's.
        """
        if not await self._wanted(user, other):
            return None
        uid = _uids.next()
        body = " ".join([b.text for b in el if b.tag == BODY and b.text]) or None  # iterfind() parses a path
        written = self.server.storage.archive.append(user.domain, user.local or "", uid, datetime.now(UTC),
                                                     str(other.bare), other.resource, body, serialize(el))
        SubElement(el, STANZA_ID, {"id": uid, "by": str(user)})
        return written

    async def _wanted(self, user: JID, other: JID) -> bool:
        prefs = await self._prefs.get(user.domain, user.local or "")
        if other in prefs.never or other.bare in prefs.never:
            return False
        if other in prefs.always or other.bare in prefs.always or prefs.default == "always":
            return True
        if prefs.default == "roster":
            item = await self.server.storage.roster.get_item(user.domain, user.local or "", str(other.bare))
            return item is not None
        return False

    # --- queries ----------------------------------------------------------------------------------

    async def form(self, stanza: Stanza) -> Element:
        return query_form()

    async def query(self, stanza: Stanza) -> Element:
        session = stanza.origin
        if session is None:
            raise StanzaError("forbidden", "the results go to a client session: query from one")
        return await answer_query(self.server.storage.archive, stanza.to.bare, stanza.el[0], session.jid,
                                  session.send, self.option("max_page"))

    async def metadata(self, stanza: Stanza) -> Element:
        return await archive_metadata(self.server.storage.archive, stanza.to.bare)

    # --- preferences (XEP-0441) -------------------------------------------------------------------

    def _parse_prefs(self, document: dict[str, Any] | None) -> Prefs:
        if document is None:
            return Prefs(self.option("default"))
        return Prefs(document["default"], frozenset(map(JID.parse, document["always"])),
                     frozenset(map(JID.parse, document["never"])))

    async def get_prefs(self, stanza: Stanza) -> Element:
        user = stanza.to.bare
        return _prefs_element(await self._prefs.get(user.domain, user.local or ""))

    async def set_prefs(self, stanza: Stanza) -> Element:
        user = stanza.to.bare
        payload = stanza.el[0]
        default = payload.get("default")
        if default not in DEFAULTS:
            raise StanzaError("bad-request", f"'default' must be one of {', '.join(DEFAULTS)}")
        prefs = Prefs(default, _jids(payload, "always"), _jids(payload, "never"))
        await self._prefs.set(user.domain, user.local or "", prefs.document())
        return _prefs_element(prefs)


# --- queries, for any archive: an account's here, a room's in extensions/muc --------------------------

def query_form() -> Element:
    fields = [Field("with", "jid-single"), Field("start"), Field("end"), Field("before-id"),
              Field("after-id"), Field("ids", "list-multi"), Field(FULLTEXT, label="Words in the message")]
    x = build_form("form", fields, form_type=MAM)
    ids = next(f for f in x if f.get("var") == "ids")
    validate = SubElement(ids, "{http://jabber.org/protocol/xdata-validate}validate", {"datatype": "xs:string"})
    SubElement(validate, "{http://jabber.org/protocol/xdata-validate}open")
    query = Element(QUERY)
    query.append(x)
    return query


async def answer_query(archive: ArchiveStore, owner: JID, payload: Element, recipient: JID,
                       deliver: Callable[[Element], None], max_page: int) -> Element:
    """Run the <query/> `payload` on `owner`'s archive: each result message (from the owner, to `recipient`)
    is given to `deliver`, then the <fin/> is returned for the iq result."""
    max, after, before = _paging(payload.find(ns.qname(RSM, "set")), max_page)
    try:
        page = await archive.query(owner.domain, owner.local or "", _filter(payload), max, after, before)
    except UnknownArchiveId as exc:
        raise StanzaError("item-not-found", f"no message {exc} in the archive") from None
    messages = reversed(page.messages) if payload.find(FLIP_PAGE) is not None else page.messages
    queryid = payload.get("queryid")
    for message in messages:
        out = element("message", from_=str(owner), to=str(recipient), id=secrets.token_hex(8))
        result = SubElement(out, ns.qname(MAM, "result"), {"id": message.id})
        if queryid is not None:
            result.set("queryid", queryid)
        forwarded = SubElement(result, ns.qname(ns.FORWARD, "forwarded"))
        SubElement(forwarded, ns.qname(ns.DELAY, "delay"), {"stamp": xmpp_datetime(message.stamp)})
        forwarded.append(parse_stored(message.stanza_xml))
        deliver(out)
    return _fin(page)


def _paging(rsm: Element | None, limit: int) -> tuple[int, str | None, str | None]:
    """XEP-0059: (page size, 'after' UID, 'before' UID or '' for the last page), within `limit`."""
    if rsm is None:
        return limit, None, None
    try:
        max = int(rsm.findtext(ns.qname(RSM, "max")) or limit)
    except ValueError:
        raise StanzaError("bad-request", "<max/> is not a number") from None
    if max < 0:
        raise StanzaError("bad-request", "<max/> is negative")
    before = rsm.find(ns.qname(RSM, "before"))
    return min(max, limit), rsm.findtext(ns.qname(RSM, "after")) or None, \
        (before.text or "") if before is not None else None


async def archive_metadata(archive: ArchiveStore, owner: JID) -> Element:
    first, last = await archive.bounds(owner.domain, owner.local or "")
    answer = Element(METADATA)
    for tag, message in (("start", first), ("end", last)):
        if message is not None:
            SubElement(answer, ns.qname(MAM, tag), {"id": message.id, "timestamp": xmpp_datetime(message.stamp)})
    return answer


async def _archived(written: asyncio.Future[None]) -> bool:
    """Wait for a message's archive row; False when it failed. A message the archive could not take (a full
    disk) is delivered all the same: chat goes on, and the store has logged and counted the failure."""
    try:
        await written
    except Exception:
        return False
    return True


class _Uids:
    """Archive UIDs: 16 URL-safe characters (96 random bits) each, as secrets.token_urlsafe(12) makes them,
    cut from one read of the system's random source per 256 (a read per message cost a system call)."""

    BATCH = 256

    def __init__(self) -> None:
        self._pool = ""

    def next(self) -> str:
        if not self._pool:
            self._pool = base64.urlsafe_b64encode(secrets.token_bytes(12 * self.BATCH)).decode()
        uid, self._pool = self._pool[:16], self._pool[16:]
        return uid


_uids = _Uids()


def _quiet(written: asyncio.Future[None]) -> asyncio.Future[bool]:
    """What `_archived` says, as a future: routing waits for it without a task of its own per message."""
    quiet: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    def settled(done: asyncio.Future[None]) -> None:
        if not quiet.done():
            quiet.set_result(not done.cancelled() and done.exception() is None)

    written.add_done_callback(settled)
    return quiet


def _remove_ids(el: Element, archive: JID) -> None:
    found = [child for child in el if child.tag == STANZA_ID]  # a child scan: findall() costs a path look-up
    if found:
        by = str(archive)
        for stanza_id in found:
            if stanza_id.get("by") == by:
                el.remove(stanza_id)


def _filter(query: Element) -> ArchiveFilter:
    """The query's XEP-0313 form; feature-not-implemented for a field this archive does not know."""
    x = find_form(query, MAM)
    if x is None:
        return ArchiveFilter()
    values = read_form(x)
    unknown = set(values) - set(FILTER_FIELDS)
    if unknown:
        raise StanzaError("feature-not-implemented", f"unknown field {min(unknown)!r}")
    try:
        with_text, start, end = (first_value(values, var) for var in ("with", "start", "end"))
        with_ = JID.parse(with_text) if with_text else None
        return ArchiveFilter(
            with_jid=str(with_.bare) if with_ else None,
            with_resource=with_.resource if with_ else None,
            start=parse_datetime(start) if start else None,
            end=parse_datetime(end) if end else None,
            after_id=first_value(values, "after-id") or None,
            before_id=first_value(values, "before-id") or None,
            ids=tuple(values.get("ids", ())),
            text=first_value(values, FULLTEXT),
        )
    except (JIDError, ValueError) as exc:
        raise StanzaError("bad-request", str(exc)) from None


def _fin(page: Page) -> Element:
    fin = Element(ns.qname(MAM, "fin"), {"complete": "true"} if page.complete else {})
    rsm = SubElement(fin, ns.qname(RSM, "set"))
    if page.messages:
        SubElement(rsm, ns.qname(RSM, "first"), {"index": str(page.index)}).text = page.messages[0].id
        SubElement(rsm, ns.qname(RSM, "last")).text = page.messages[-1].id
    SubElement(rsm, ns.qname(RSM, "count")).text = str(page.count)
    return fin


def _jids(prefs: Element, tag: str) -> frozenset[JID]:
    try:
        return frozenset(JID.parse(j.text or "") for j in prefs.iterfind(f"{{{MAM}}}{tag}/{{{MAM}}}jid"))
    except JIDError as exc:
        raise StanzaError("jid-malformed", str(exc)) from None


def _prefs_element(prefs: Prefs) -> Element:
    el = Element(PREFS, {"default": prefs.default})
    for tag, jids in (("always", prefs.always), ("never", prefs.never)):
        listed = SubElement(el, ns.qname(MAM, tag))
        for jid in sorted(map(str, jids)):
            SubElement(listed, ns.qname(MAM, "jid")).text = jid
    return el
