"""Message Archive Management (XEP-0313) over real clients: archiving, paging, filters, search, preferences."""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from xml.etree.ElementTree import Element, SubElement, fromstring

import pytest
from slixmpp import ClientXMPP
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from server.stanza import xmpp_datetime
from server.storage import RosterItem
from tests.conftest import Harness
from tests.test_basic_modules import iq_error, send_iq
from tests.test_offline import collect
from tests.test_roster_presence import sync

MAM = "urn:xmpp:mam:2"
RSM = "http://jabber.org/protocol/rsm"
FULLTEXT = "{urn:xmpp:fulltext:0}fulltext"
STANZA_ID = "{urn:xmpp:sid:0}stanza-id"
BODY = "{jabber:client}body"
FORWARDED = "{urn:xmpp:forward:0}forwarded"


@dataclass
class Result:
    id: str
    body: str | None
    from_: str
    to: str
    stamp: datetime


class Archive:
    """Queries alice's archive from one of her clients and collects what comes back."""

    def __init__(self, client: ClientXMPP) -> None:
        self.client = client
        self._results: dict[str, list[Result]] = {}
        client.register_handler(Callback("mam results", MatchXPath(f"{{jabber:client}}message/{{{MAM}}}result"),
                                         self._result))

    def _result(self, msg: Any) -> None:
        result = msg.xml.find(f"{{{MAM}}}result")
        forwarded = result.find(FORWARDED)
        inner = forwarded.find("{jabber:client}message")
        stamp = datetime.fromisoformat(forwarded.find("{urn:xmpp:delay}delay").get("stamp"))
        assert msg["from"] == msg["to"].bare  # results come from the archive itself
        self._results.setdefault(result.get("queryid"), []).append(
            Result(result.get("id"), inner.findtext(BODY), inner.get("from"), inner.get("to"), stamp))

    async def query(self, fields: dict[str, str | list[str]] | None = None, *, max: int | None = None,
                    after: str | None = None, before: str | None = None,
                    flip: bool = False) -> tuple[list[Result], dict[str, Any]]:
        """The results and the <fin/> as {'complete', 'first', 'index', 'last', 'count'}."""
        queryid = secrets.token_hex(4)
        query = Element(f"{{{MAM}}}query", {"queryid": queryid})
        if fields:
            x = SubElement(query, "{jabber:x:data}x", {"type": "submit"})
            for var, value in {"FORM_TYPE": MAM, **fields}.items():
                field = SubElement(x, "{jabber:x:data}field", {"var": var})
                for v in [value] if isinstance(value, str) else value:
                    SubElement(field, "{jabber:x:data}value").text = v
        if (max, after, before) != (None, None, None):
            rsm = SubElement(query, f"{{{RSM}}}set")
            for tag, value in (("max", max), ("after", after), ("before", before)):
                if value is not None:
                    SubElement(rsm, f"{{{RSM}}}{tag}").text = str(value)
        if flip:
            SubElement(query, f"{{{MAM}}}flip-page")
        iq = self.client.Iq(stype="set")
        iq.append(query)
        fin = (await iq.send(timeout=10)).xml.find(f"{{{MAM}}}fin")
        rsm = fin.find(f"{{{RSM}}}set")
        first = rsm.find(f"{{{RSM}}}first")
        summary = {"complete": fin.get("complete") == "true", "count": int(rsm.findtext(f"{{{RSM}}}count")),
                   "first": first.text if first is not None else None,
                   "index": int(first.get("index")) if first is not None else None,
                   "last": rsm.findtext(f"{{{RSM}}}last")}
        return self._results.pop(queryid, []), summary

    async def all(self, fields: dict[str, str | list[str]] | None = None, *, page: int = 10,
                  backward: bool = False) -> list[Result]:
        """Every match, page by page in either direction, checking what each <fin/> says on the way."""
        found: list[Result] = []
        cursor: str | None = "" if backward else None
        while True:
            if backward:
                results, fin = await self.query(fields, max=page, before=cursor)
            else:
                results, fin = await self.query(fields, max=page, after=cursor)
            assert len(results) <= page
            if results:
                assert (fin["first"], fin["last"]) == (results[0].id, results[-1].id)
                position = fin["count"] - len(found) - len(results) if backward else len(found)
                assert fin["index"] == position
            found = results + found if backward else found + results
            if fin["complete"]:
                assert len(found) == fin["count"]
                return found
            assert len(results) == page
            cursor = results[0].id if backward else results[-1].id


def chat(client: ClientXMPP, to: str, body: str | None, *extra: str, mtype: str = "chat") -> None:
    msg = client.make_message(mto=to, mbody=body, mtype=mtype)
    for xml in extra:
        msg.append(fromstring(xml))
    msg.send()


def body_of(i: int) -> str:
    return f"message number {i}" + (" with a Banana split" if i % 10 == 3 else "")


async def instant_between() -> datetime:
    """A moment, to the millisecond that queries carry, after every stamp so far and before every later one."""
    now = datetime.now(UTC)
    mark = now.replace(microsecond=now.microsecond // 1000 * 1000) + timedelta(milliseconds=1)
    while datetime.now(UTC) <= mark:
        await asyncio.sleep(0)
    return mark


@pytest.mark.parametrize("server", ["sqlite", "postgresql"], indirect=True)
async def test_paging_filters_and_search_over_a_hundred_messages(server: Harness) -> None:
    for name in ("alice", "bob", "carol"):
        await server.add_user(name)
    phone = await server.client("alice@localhost", resource="phone", plugins=("xep_0280",))
    laptop = await server.client("alice@localhost", resource="laptop", plugins=("xep_0280",))
    bob = await server.client("bob@localhost", resource="desk")
    carol = await server.client("carol@localhost", resource="home")
    for client in (phone, laptop, bob):
        client.send_presence()
    await phone.plugin["xep_0280"].enable()
    await laptop.plugin["xep_0280"].enable()
    await sync(phone, laptop, bob)
    marks: dict[int, datetime] = {}
    for i in range(100):
        if i in (30, 60):
            marks[i] = await instant_between()
        # carol writes every fifth message, bob the other even ones; alice answers bob from the phone.
        sender, to = (carol, "alice@localhost") if i % 5 == 0 else \
            (bob, "alice@localhost") if i % 2 == 0 else (phone, "bob@localhost")
        chat(sender, to, body_of(i))
        await sync(sender)  # archived before the next one, which may come on another connection

    archive = Archive(laptop)
    everything = await archive.all()
    assert [r.body for r in everything] == [body_of(i) for i in range(100)]  # once each, in order
    assert len({r.id for r in everything}) == 100
    assert [r.stamp for r in everything] == sorted(r.stamp for r in everything)
    assert await archive.all(backward=True, page=7) == everything
    uid = [r.id for r in everything]

    # A flipped page holds the same results, newest first; <fin/> still names them in archive order.
    results, fin = await archive.query(max=10, before="", flip=True)
    assert results == everything[:-11:-1]
    assert (fin["first"], fin["last"], fin["index"], fin["complete"]) == (uid[90], uid[99], 90, False)
    results, fin = await archive.query(max=0)
    assert (results, fin["count"]) == ([], 100)

    with_bob = [r for i, r in enumerate(everything) if i % 5 != 0]
    assert await archive.all({"with": "bob@localhost"}, page=25) == with_bob
    assert await archive.all({"with": "bob@localhost"}, page=30, backward=True) == with_bob
    # A full JID matches exactly: what bob sent from his desk, not what alice sent to his bare JID.
    assert await archive.all({"with": "bob@localhost/desk"}) == [r for r in with_bob if r.from_ == "bob@localhost/desk"]
    with_carol = [r for i, r in enumerate(everything) if i % 5 == 0]
    assert await archive.all({"with": "carol@localhost/home"}) == with_carol
    assert await archive.all({"with": "carol@localhost/other"}) == []
    assert await archive.all({"with": "alice@localhost"}) == []  # nothing to herself
    assert {(r.from_.split("/")[0], r.to.split("/")[0]) for r in with_bob} == \
        {("bob@localhost", "alice@localhost"), ("alice@localhost", "bob@localhost")}

    between = {"start": xmpp_datetime(marks[30]), "end": xmpp_datetime(marks[60])}
    assert await archive.all(between) == everything[30:60]
    assert await archive.all({"start": xmpp_datetime(marks[60])}, backward=True) == everything[60:]
    assert await archive.all({"end": xmpp_datetime(marks[30])}) == everything[:30]
    assert await archive.all({"after-id": uid[9], "before-id": uid[20]}) == everything[10:20]
    assert await archive.all({"after-id": uid[89]}, backward=True, page=3) == everything[90:]
    assert await archive.all({"ids": [uid[50], uid[5], uid[99]]}) == [everything[5], everything[50], everything[99]]
    assert await archive.all({"with": "carol@localhost", "after-id": uid[40], "end": xmpp_datetime(marks[60])}) \
        == [everything[i] for i in (45, 50, 55)]

    bananas = [everything[i] for i in range(3, 100, 10)]
    assert await archive.all({FULLTEXT: "banana"}) == bananas
    assert await archive.all({FULLTEXT: "SPLIT banana"}, backward=True, page=4) == bananas
    assert await archive.all({FULLTEXT: "banana 73"}) == [everything[73]]
    assert await archive.all({FULLTEXT: "banana cherry"}) == []
    assert await archive.all({FULLTEXT: "number", "with": "carol@localhost"}) == with_carol

    for fields, rsm in (({"ids": ["nope"]}, {}), ({"after-id": "nope"}, {}), ({}, {"after": "nope"}),
                        ({}, {"before": "nope"})):
        with pytest.raises(Exception, match="item-not-found"):
            await archive.query(fields, max=5, **rsm)


async def test_live_messages_carry_their_archive_id(server: Harness) -> None:
    for name in ("alice", "bob"):
        await server.add_user(name)
    phone = await server.client("alice@localhost", resource="phone", plugins=("xep_0280",))
    laptop = await server.client("alice@localhost", resource="laptop", plugins=("xep_0280",))
    bob = await server.client("bob@localhost", resource="desk")
    for client in (phone, laptop, bob):
        client.send_presence()
    await phone.plugin["xep_0280"].enable()
    await laptop.plugin["xep_0280"].enable()
    inbox = {"phone": collect(phone), "laptop": collect(laptop), "bob": collect(bob)}
    await sync(phone, laptop, bob)

    spoofed = "<stanza-id xmlns='urn:xmpp:sid:0' by='alice@localhost' id='forged'/>"
    chat(bob, "alice@localhost/phone", "hello alice", spoofed)
    received = await asyncio.wait_for(inbox["phone"].get(), 5)
    carbon = (await asyncio.wait_for(inbox["laptop"].get(), 5)).find(f"{{urn:xmpp:carbons:2}}received/{FORWARDED}")
    ids = [(s.get("by"), s.get("id")) for s in received.findall(STANZA_ID)]
    assert len(ids) == 1 and ids[0][0] == "alice@localhost" and ids[0][1] != "forged"
    assert carbon[0].find(STANZA_ID).get("id") == ids[0][1]  # XEP-0313 4.1: in the carbon too

    chat(phone, "bob@localhost", "hello bob")
    got = await asyncio.wait_for(inbox["bob"].get(), 5)
    sent = (await asyncio.wait_for(inbox["laptop"].get(), 5)).find(f"{{urn:xmpp:carbons:2}}sent/{FORWARDED}")
    assert [s.get("by") for s in got.findall(STANZA_ID)] == ["bob@localhost"]
    alices = sent[0].find(STANZA_ID)
    assert alices.get("by") == "alice@localhost"

    results, _ = await Archive(laptop).query()
    assert [(r.id, r.body) for r in results] == [(ids[0][1], "hello alice"), (alices.get("id"), "hello bob")]
    bobs, _ = await Archive(bob).query()
    assert [r.body for r in bobs] == ["hello alice", "hello bob"]
    assert bobs[1].id == got.find(STANZA_ID).get("id")


async def test_what_is_archived(server: Harness) -> None:
    for name in ("alice", "bob"):
        await server.add_user(name)
    alice = await server.client("alice@localhost", resource="phone")
    bob = await server.client("bob@localhost", resource="desk")
    chat(bob, "alice@localhost", "offline, still archived")
    chat(bob, "alice@localhost", "not kept", "<no-store xmlns='urn:xmpp:hints'/>")
    chat(bob, "alice@localhost", "not for ever", "<no-permanent-store xmlns='urn:xmpp:hints'/>")
    chat(bob, "alice@localhost", None, "<composing xmlns='http://jabber.org/protocol/chatstates'/>")
    chat(bob, "alice@localhost", None, "<store xmlns='urn:xmpp:hints'/>",
         "<received xmlns='urn:xmpp:receipts' id='r1'/>")
    chat(bob, "alice@localhost", "news", mtype="headline")
    chat(bob, "alice@localhost", "a normal one", mtype="normal")
    chat(bob, "alice@localhost", "an error", mtype="error")
    await sync(bob)
    chat(alice, "alice@localhost", "note to self")
    await sync(alice)
    results, fin = await Archive(alice).query()
    assert [r.body for r in results] == ["offline, still archived", None, "a normal one", "note to self"]
    assert fin["complete"] and fin["count"] == 4


async def test_preferences(server: Harness) -> None:
    for name in ("alice", "bob", "carol", "dave"):
        await server.add_user(name)
    alice = await server.client("alice@localhost", resource="phone")
    senders = {name: await server.client(f"{name}@localhost") for name in ("bob", "carol", "dave")}
    prefs = await send_iq(alice, "get", f"<prefs xmlns='{MAM}'/>")
    assert prefs.find(f"{{{MAM}}}prefs").get("default") == "always"

    async def archived_after(new: str) -> list[str | None]:
        answer = await send_iq(alice, "set", new)
        assert answer.find(f"{{{MAM}}}prefs") is not None
        for name, client in senders.items():
            chat(client, "alice@localhost", f"{name} after {new[:40]}")
            await sync(client)
        results, _ = await Archive(alice).query({"start": xmpp_datetime(stamp)})
        return [r.body.split()[0] for r in results]

    await server.server.storage.roster.put("localhost", "alice", RosterItem("carol@localhost", subscription="both"))
    stamp = datetime.now(UTC)
    assert await archived_after(f"<prefs xmlns='{MAM}' default='roster'><always><jid>dave@localhost</jid>"
                                "</always></prefs>") == ["carol", "dave"]
    stamp = datetime.now(UTC)
    assert await archived_after(f"<prefs xmlns='{MAM}' default='always'><never><jid>bob@localhost</jid>"
                                "</never></prefs>") == ["carol", "dave"]
    stamp = datetime.now(UTC)
    assert await archived_after(f"<prefs xmlns='{MAM}' default='never'><always/><never/></prefs>") == []
    got = (await send_iq(alice, "get", f"<prefs xmlns='{MAM}'/>")).find(f"{{{MAM}}}prefs")
    assert got.get("default") == "never" and got.find(f"{{{MAM}}}always") is not None
    bad = f"<prefs xmlns='{MAM}' default='sometimes'/>"
    assert (await iq_error(alice, "set", bad))[0] == "bad-request"


async def test_form_metadata_errors_and_expiry(server: Harness) -> None:
    for name in ("alice", "bob"):
        await server.add_user(name)
    alice = await server.client("alice@localhost", resource="phone")
    bob = await server.client("bob@localhost", resource="desk")
    metadata = (await send_iq(alice, "get", f"<metadata xmlns='{MAM}'/>")).find(f"{{{MAM}}}metadata")
    assert len(metadata) == 0  # an empty archive

    form = (await send_iq(alice, "get", f"<query xmlns='{MAM}'/>")).find(f"{{{MAM}}}query/{{jabber:x:data}}x")
    fields = {f.get("var") for f in form}
    assert {"FORM_TYPE", "with", "start", "end", "before-id", "after-id", "ids", FULLTEXT} <= fields
    info = await send_iq(alice, "get", "<query xmlns='http://jabber.org/protocol/disco#info'/>", "alice@localhost")
    features = {f.get("var") for f in info.iter("{http://jabber.org/protocol/disco#info}feature")}
    assert {MAM, f"{MAM}#extended", "urn:xmpp:sid:0"} <= features

    for body in ("first", "second", "third"):
        chat(bob, "alice@localhost", body)
    await sync(bob)
    metadata = (await send_iq(alice, "get", f"<metadata xmlns='{MAM}'/>")).find(f"{{{MAM}}}metadata")
    results, _ = await Archive(alice).query()
    assert [m.get("id") for m in metadata] == [results[0].id, results[-1].id]

    archive = Archive(alice)
    with pytest.raises(Exception, match="feature-not-implemented"):
        await archive.query({"include-groupchat": "true"})
    with pytest.raises(Exception, match="bad-request"):
        await archive.query({"start": "yesterday"})
    assert (await iq_error(bob, "set", f"<query xmlns='{MAM}'/>", "alice@localhost"))[0] == "forbidden"

    storage = server.server.storage.archive
    assert await storage.expire("localhost", datetime.now(UTC) - timedelta(days=1)) == 0
    assert await storage.expire("localhost", datetime.now(UTC) + timedelta(seconds=1)) == 6  # bob's copies too
    assert (await archive.query({FULLTEXT: "second"}))[1]["count"] == 0


async def test_the_domain_advertises_the_archive(server: Harness) -> None:
    """Profanity enables MAM only when the server's domain lists urn:xmpp:mam:2 (issue 19, defect 8)."""
    await server.add_user("alice")
    alice = await server.client("alice@localhost", plugins=("xep_0030",))
    info = await alice.plugin["xep_0030"].get_info(jid="localhost", timeout=5)
    assert {MAM, f"{MAM}#extended", "urn:xmpp:sid:0"} <= set(info["disco_info"]["features"])
