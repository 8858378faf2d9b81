"""Iqs that only the account itself may send (target "own"): one rule in the router, one error for all.

Bob addresses every such payload to Alice's bare JID and gets `forbidden` (RFC 6121 2.3.3; ejabberd answers
the same), with the same text whatever the module, and Alice's data is as it was.
"""

from __future__ import annotations

from xml.etree.ElementTree import fromstring

from slixmpp.exceptions import IqError

from tests.conftest import Harness
from tests.test_basic_modules import send_iq
from tests.test_push import registrations

ALICE = "alice@localhost"
PUSH_SERVICE = "push.example.org"

# (type, payload): every iq a module serves for the account's own clients only.
OWN_ONLY = [
    ("get", "<query xmlns='jabber:iq:roster'/>"),
    ("set", "<query xmlns='jabber:iq:roster'><item jid='mallory@localhost'/></query>"),
    ("get", "<query xmlns='jabber:iq:private'><prefs xmlns='urn:example:prefs'/></query>"),
    ("set", "<query xmlns='jabber:iq:private'><prefs xmlns='urn:example:prefs'><theme>x</theme></prefs></query>"),
    ("get", "<blocklist xmlns='urn:xmpp:blocking'/>"),
    ("set", "<block xmlns='urn:xmpp:blocking'><item jid='mallory@localhost'/></block>"),
    ("set", "<unblock xmlns='urn:xmpp:blocking'/>"),
    ("set", f"<enable xmlns='urn:xmpp:push:0' jid='{PUSH_SERVICE}' node='n'/>"),
    ("set", f"<disable xmlns='urn:xmpp:push:0' jid='{PUSH_SERVICE}'/>"),
    ("get", "<query xmlns='jabber:iq:register'/>"),
    ("set", "<query xmlns='jabber:iq:register'><username>alice</username><password>stolen</password></query>"),
    ("set", "<query xmlns='jabber:iq:register'><remove/></query>"),
    ("get", "<query xmlns='urn:xmpp:mam:2'/>"),
    ("set", "<query xmlns='urn:xmpp:mam:2'/>"),
    ("get", "<prefs xmlns='urn:xmpp:mam:2'/>"),
    ("set", "<prefs xmlns='urn:xmpp:mam:2' default='never'/>"),
    ("get", "<metadata xmlns='urn:xmpp:mam:2'/>"),
    ("set", "<enable xmlns='urn:xmpp:carbons:2'/>"),
    ("set", "<disable xmlns='urn:xmpp:carbons:2'/>"),
    ("set", "<vCard xmlns='vcard-temp'><FN>Mallory</FN></vCard>"),
]


async def test_everyone_else_gets_one_error(server: Harness) -> None:
    # A module that adds an own-account iq adds it to OWN_ONLY too, so that this test covers it.
    registered = {(type_, tag) for type_, target, tag in server.server.hosts["localhost"].iq_handlers
                  if target == "own"}
    assert registered == {(type_, fromstring(payload).tag) for type_, payload in OWN_ONLY}

    await server.add_user("alice", "wonderland")
    await server.add_user("bob")
    bob = await server.client("bob@localhost")
    errors = {}
    for type_, payload in OWN_ONLY:
        try:
            await send_iq(bob, type_, payload, ALICE)
        except IqError as exc:
            error = exc.iq["error"]
            errors[payload] = (exc.iq["from"].bare, error["type"], error["condition"], error["text"])
        else:
            errors[payload] = "answered"
    expected = (ALICE, "auth", "forbidden", "only the account itself may do this")
    assert errors == {payload: expected for _, payload in OWN_ONLY}

    # Nothing of Alice's changed, and her own clients are still served (with or without 'to').
    alice = await server.client(ALICE, password="wonderland")
    for to in (None, ALICE):
        roster = await send_iq(alice, "get", "<query xmlns='jabber:iq:roster'/>", to)
        assert len(roster.find("{jabber:iq:roster}query")) == 0
        blocklist = await send_iq(alice, "get", "<blocklist xmlns='urn:xmpp:blocking'/>", to)
        assert len(blocklist.find("{urn:xmpp:blocking}blocklist")) == 0
        stored = await send_iq(alice, "get", OWN_ONLY[2][1], to)
        assert len(stored.find("{jabber:iq:private}query/{urn:example:prefs}prefs")) == 0
        prefs = await send_iq(alice, "get", "<prefs xmlns='urn:xmpp:mam:2'/>", to)
        assert prefs.find("{urn:xmpp:mam:2}prefs").get("default") != "never"
    assert (await registrations(server)).apps == ()
    vcard = await send_iq(bob, "get", "<vCard xmlns='vcard-temp'/>", ALICE)  # a contact may read it
    assert vcard.find("{vcard-temp}vCard/{vcard-temp}FN") is None
