"""A second, independent client library (aioxmpp) logs in and chats with a slixmpp user."""

from __future__ import annotations

import asyncio

import aioxmpp
import aioxmpp.connector
import aioxmpp.dispatcher
import pytest

from tests.conftest import Harness


def aioxmpp_client(server: Harness, jid: str, direct: bool) -> aioxmpp.PresenceManagedClient:
    connector = aioxmpp.connector.XMPPOverTLSConnector() if direct else aioxmpp.connector.STARTTLSConnector()
    port = server.direct_port if direct else server.port
    return aioxmpp.PresenceManagedClient(
        aioxmpp.JID.fromstr(jid), aioxmpp.make_security_layer("secret", no_verify=True),
        override_peer=[("127.0.0.1", port, connector)])


@pytest.mark.parametrize("direct", [False, True], ids=["starttls", "direct-tls"])
async def test_aioxmpp_chats_with_slixmpp(server: Harness, direct: bool) -> None:
    await server.add_user("alice")
    await server.add_user("bob")
    bob = await server.client("bob@localhost", resource="desk")
    to_bob = server.inbox(bob)
    alice = aioxmpp_client(server, "alice@localhost", direct)
    to_alice: asyncio.Queue = asyncio.Queue()
    async with alice.connected():
        alice.summon(aioxmpp.dispatcher.SimpleMessageDispatcher).register_callback(
            aioxmpp.MessageType.CHAT, None, to_alice.put_nowait)
        msg = aioxmpp.Message(to=aioxmpp.JID.fromstr("bob@localhost/desk"), type_=aioxmpp.MessageType.CHAT)
        msg.body[None] = "hello from aioxmpp"
        await alice.send(msg)
        got = await asyncio.wait_for(to_bob.get(), 5)
        assert got["body"] == "hello from aioxmpp"
        assert str(got["from"]) == str(alice.local_jid)
        bob.send_message(mto=str(alice.local_jid), mbody="hello from slixmpp", mtype="chat")
        reply = await asyncio.wait_for(to_alice.get(), 5)
        assert reply.body.any() == "hello from slixmpp"
