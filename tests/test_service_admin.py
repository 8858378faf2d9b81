"""XEP-0133 beyond user management: rosters, disabled/active/idle users, the message of the day, the
welcome message, the admin list, federation lists, restart and shutdown, from slixmpp over sockets."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from slixmpp import ClientXMPP
from slixmpp.plugins.xep_0004 import Form
from slixmpp.stanza.roster import Roster
from slixmpp.xmlstream import register_stanza_plugin

from s2s.policy import Policy
from server.commands.service_admin import IDLE_AFTER
from server.config import S2SConfig
from server.jid import JID
from tests.conftest import Harness, free_port
from tests.s2s_support import Inbox, running_pair, start_parley
from tests.test_adhoc import PLUGINS, admin_client, error_of, result_values, run
from tests.test_cli import start_process
from tests.test_register import ask, legacy, unauthenticated

# XEP-0133 puts the roster <query/> inside the result form; slixmpp reads it once told where to look.
register_stanza_plugin(Form, Roster)

MINE = ("get-user-roster", "get-disabled-users-num", "get-disabled-users-list", "get-active-users-num",
        "get-active-users", "get-idle-users-num", "get-idle-users", "set-motd", "edit-motd",
        "delete-motd", "set-welcome", "delete-welcome", "edit-admin", "edit-blacklist", "edit-whitelist",
        "restart", "shutdown")
SERVER_WIDE = ("edit-blacklist", "edit-whitelist", "restart", "shutdown")


async def complete(client: ClientXMPP, name: str, to: str = "localhost", **values: str | list[str]) -> Any:
    """Run a one-stage command: ask for its form, submit `values`; returns the final <command/>."""
    first = await client.plugin["xep_0050"].send_command(to, f"http://jabber.org/protocol/admin#{name}", timeout=5)
    form = client.plugin["xep_0004"].make_form(ftype="submit")
    for var, value in values.items():
        form.add_field(var=var, value=value)
    done = await client.plugin["xep_0050"].send_command(to, f"http://jabber.org/protocol/admin#{name}",
                                                 action="complete", sessionid=first["command"]["sessionid"],
                                                 payload=form, timeout=5)
    return done["command"]


def note(command: Any) -> tuple[str, str]:
    return command["notes"][0] if command["notes"] else ("", "")


async def settled(client: ClientXMPP) -> None:
    """Wait until the server has handled what `client` sent before (its stanzas are handled in order)."""
    await client.plugin["xep_0199"].send_ping("localhost", timeout=5)


async def logged_in(server: Harness, jid: str) -> tuple[ClientXMPP, asyncio.Queue]:
    """A client that is available, with the messages it got up to then (and later) in its inbox."""
    client = await server.client(jid, plugins=("xep_0199",))
    inbox = server.inbox(client)
    client.send_presence()
    await settled(client)
    return client, inbox


async def test_non_admins_are_refused_and_server_wide_commands_need_every_host(server: Harness) -> None:
    """The test server has two hosts, so the admin of localhost may not restart example.test's server."""
    admin = await admin_client(server)
    await server.add_user("bob")
    bob = await server.client("bob@localhost", plugins=PLUGINS)
    for name in MINE:
        condition, _ = await error_of(run(bob, name))
        assert condition == "forbidden", name
    nodes = {item[1] for item in (await admin.plugin["xep_0050"].get_commands("localhost", timeout=5))
             ["disco_items"]["items"]}
    assert {node for node in nodes if node.rsplit("#")[1] in MINE} == \
        {f"http://jabber.org/protocol/admin#{name}" for name in MINE if name not in SERVER_WIDE}
    for name in SERVER_WIDE:
        condition, _ = await error_of(run(admin, name))
        assert condition == "forbidden", name


async def test_get_user_roster(server: Harness) -> None:
    admin = await admin_client(server)
    await server.add_user("alice")
    alice = await server.client("alice@localhost")
    await alice.update_roster("romeo@example.net", name="Romeo", groups=["Friends", "Lovers"], timeout=5)
    await alice.update_roster("mercutio@example.org", timeout=5)
    result = await complete(admin, "get-user-roster", accountjids=["alice@localhost"])
    assert result_values(result)["accountjids"] == ["alice@localhost"]
    items = {str(jid): item for jid, item in result["form"]["roster"]["items"].items()}
    assert set(items) == {"romeo@example.net", "mercutio@example.org"}
    romeo = items["romeo@example.net"]
    assert (romeo["name"], romeo["subscription"], sorted(romeo["groups"])) == ("Romeo", "none", ["Friends", "Lovers"])

    assert note(await complete(admin, "get-user-roster", accountjids=["nobody@localhost"]))[0] == "error"
    assert note(await complete(admin, "get-user-roster", accountjids=["alice@example.test"]))[0] == "error"
    both = await complete(admin, "get-user-roster", accountjids=["alice@localhost", "admin@localhost"])
    assert note(both) == ("error", "give one account: the result describes a single account")


@pytest.mark.parametrize("server", ["sqlite", "postgresql"], indirect=True)
async def test_disabled_users(server: Harness) -> None:
    admin = await admin_client(server)
    for name in ("carl", "dora", "emil"):
        await server.add_user(name)
    assert result_values(await run(admin, "get-disabled-users-num"))["disabledusersnum"] == "0"
    await complete(admin, "disable-user", accountjids=["emil@localhost", "carl@localhost"])
    assert result_values(await run(admin, "get-disabled-users-num"))["disabledusersnum"] == "2"
    listed = result_values(await complete(admin, "get-disabled-users-list", max_items="none"))["disableduserjids"]
    assert listed == ["carl@localhost", "emil@localhost"]
    assert result_values(await complete(admin, "get-disabled-users-list", max_items="1"))["disableduserjids"] == \
        ["carl@localhost"]
    await complete(admin, "reenable-user", accountjids=["carl@localhost"])
    assert result_values(await complete(admin, "get-disabled-users-list"))["disableduserjids"] == ["emil@localhost"]


async def test_active_and_idle_users(server: Harness) -> None:
    """Active: a stanza in the last IDLE_AFTER seconds and not XEP-0352 inactive; online = active + idle."""
    admin = await admin_client(server)
    for name in ("fay", "gus"):
        await server.add_user(name)
    fay = await server.client("fay@localhost", plugins=("xep_0352", "xep_0199"))
    await server.client("gus@localhost")
    fay.plugin["xep_0352"].send_inactive()
    await settled(fay)
    for session in server.server.sessions.of(JID.parse("gus@localhost")):
        session.last_active -= IDLE_AFTER  # as if gus had been quiet for that long
    values = {name: result_values(await run(admin, name, max_items="none")) for name in (
        "get-active-users", "get-idle-users")}
    values.update({name: result_values(await run(admin, name)) for name in (
        "get-active-users-num", "get-idle-users-num")})
    assert values["get-active-users"]["activeuserjids"] == ["admin@localhost"]
    assert values["get-active-users-num"]["activeusersnum"] == "1"
    # XEP-0133's example lists idle users in 'activeuserjids' too (its registry has no 'idleuserjids').
    assert values["get-idle-users"]["activeuserjids"] == ["fay@localhost", "gus@localhost"]
    assert values["get-idle-users-num"]["idleusersnum"] == "2"

    fay.plugin["xep_0352"].send_active()
    await settled(fay)
    assert result_values(await run(admin, "get-idle-users", max_items="none"))["activeuserjids"] == ["gus@localhost"]


@pytest.mark.parametrize("server", ["sqlite", "postgresql"], indirect=True)
async def test_message_of_the_day(server: Harness) -> None:
    admin = await admin_client(server)
    for name in ("hal", "ivy", "jon", "kim"):
        await server.add_user(name)
    _, hal_inbox = await logged_in(server, "hal@localhost")
    done = await complete(admin, "set-motd", motd=["Maintenance on Sunday", "-- the admins"])
    assert done["status"] == "completed"
    motd = await asyncio.wait_for(hal_inbox.get(), 5)  # online: at once
    assert (motd["type"], motd["from"].full, motd["body"]) == ("headline", "localhost",
                                                                "Maintenance on Sunday\n-- the admins")

    _, ivy_inbox = await logged_in(server, "ivy@localhost")  # offline when it was set: after login
    assert (await asyncio.wait_for(ivy_inbox.get(), 5))["body"] == "Maintenance on Sunday\n-- the admins"
    _, ivy_again = await logged_in(server, "ivy@localhost")  # once only
    _, hal_again = await logged_in(server, "hal@localhost")
    assert ivy_again.empty() and hal_again.empty()

    first = await admin.plugin["xep_0050"].send_command("localhost", "http://jabber.org/protocol/admin#edit-motd",
                                                 timeout=5)
    assert first["command"]["form"].get_fields()["motd"].get_value() == ["Maintenance on Sunday", "-- the admins"]
    await complete(admin, "edit-motd", motd=["Maintenance on Saturday"])
    _, jon_inbox = await logged_in(server, "jon@localhost")  # has not had it: gets the correction
    assert (await asyncio.wait_for(jon_inbox.get(), 5))["body"] == "Maintenance on Saturday"
    _, ivy_third = await logged_in(server, "ivy@localhost")  # had it: a correction is not sent again
    assert ivy_third.empty() and hal_inbox.empty()

    await run(admin, "delete-motd")
    _, kim_inbox = await logged_in(server, "kim@localhost")
    assert kim_inbox.empty()


async def register(server: Harness, username: str) -> None:
    raw, _ = await unauthenticated(server)
    result = await ask(raw, "set", legacy(username, "secret"))
    assert result.get("type") == "result"


async def test_welcome_message_for_registered_accounts(server: Harness) -> None:
    admin = await admin_client(server)
    await complete(admin, "set-welcome", welcome=["Welcome aboard!", "Rules: be nice."])
    first = await admin.plugin["xep_0050"].send_command("localhost", "http://jabber.org/protocol/admin#set-welcome",
                                                 timeout=5)
    assert first["command"]["form"].get_fields()["welcome"].get_value() == ["Welcome aboard!", "Rules: be nice."]
    await register(server, "newbie")
    _, inbox = await logged_in(server, "newbie@localhost")
    welcome = await asyncio.wait_for(inbox.get(), 5)
    assert (welcome["from"].full, welcome["subject"], welcome["body"]) == (
        "localhost", "Welcome to localhost", "Welcome aboard!\nRules: be nice.")

    await run(admin, "delete-welcome")
    await register(server, "latecomer")
    _, inbox = await logged_in(server, "latecomer@localhost")
    assert inbox.empty()


@pytest.mark.parametrize("server", ["sqlite", "postgresql"], indirect=True)
async def test_edit_admin_list_survives_restart(server: Harness) -> None:
    admin = await admin_client(server)
    await server.add_user("lea")
    first = await admin.plugin["xep_0050"].send_command("localhost", "http://jabber.org/protocol/admin#edit-admin",
                                                 timeout=5)
    assert first["command"]["form"].get_fields()["adminjids"].get_value() == ["admin@localhost"]
    await complete(admin, "edit-admin", adminjids=["admin@localhost", "lea@localhost"])
    await server.restart()
    lea = await server.client("lea@localhost", plugins=PLUGINS)
    assert result_values(await run(lea, "get-registered-users-num"))["registeredusersnum"] == "2"

    refused = await complete(lea, "edit-admin", adminjids=["lea@localhost"])  # the configured admin stays
    assert note(refused)[0] == "error" and "admin@localhost" in note(refused)[1]
    await complete(lea, "edit-admin", adminjids=["admin@localhost"])
    condition, _ = await error_of(run(lea, "get-registered-users-num"))
    assert condition == "forbidden"


async def test_federation_lists_take_effect_and_survive_restart(tmp_path: Path) -> None:
    async with running_pair(tmp_path) as (a, b):
        await a.server.hosts["a.test"].set_admins({JID.parse("admin@a.test")})
        await a.harness.add_user("admin", host="a.test")
        admin = await a.harness.client("admin@a.test", plugins=PLUGINS)
        alice, bob = await a.user("alice@a.test"), await b.user("bob@b.test")
        errors, received = Inbox(alice, "message_error"), Inbox(bob)

        alice_got, bob_errors = Inbox(alice), Inbox(bob, "message_error")
        bob.send_message(mto="alice@a.test", mbody="before", mtype="chat")  # b.test's stream to a.test opens
        await alice_got.wait(lambda m: m["body"] == "before")

        await complete(admin, "edit-blacklist", "a.test", blacklistjids=["b.test"])
        alice.send_message(mto="bob@b.test", mbody="blocked", mtype="chat")
        assert (await errors.wait())["error"]["condition"] == "not-allowed"
        bob.send_message(mto="alice@a.test", mbody="after", mtype="chat")  # that stream was closed
        assert (await bob_errors.wait())["type"] == "error"
        assert all(m["body"] != "after" for m in alice_got.received)
        refused = await complete(admin, "edit-blacklist", "a.test", blacklistjids=["bob@b.test"])
        assert note(refused)[0] == "error"
        await complete(admin, "edit-blacklist", "a.test", blacklistjids=[])
        alice.send_message(mto="bob@b.test", mbody="through", mtype="chat")
        assert (await received.wait(lambda m: m["body"] == "through"))["from"].bare == "alice@a.test"

        await complete(admin, "edit-whitelist", "a.test", whitelistjids=["c.test"])
        await a.server.restart()  # in-process: the stored list is read back
        alice = await a.user("alice@a.test")
        errors = Inbox(alice, "message_error")
        alice.send_message(mto="bob@b.test", mbody="not on the list", mtype="chat")
        assert (await errors.wait())["error"]["condition"] == "not-allowed"
        admin = await a.harness.client("admin@a.test", plugins=PLUGINS)
        shown = await admin.plugin["xep_0050"].send_command("a.test", "http://jabber.org/protocol/admin#edit-whitelist",
                                                     timeout=5)
        assert shown["command"]["form"].get_fields()["whitelistjids"].get_value() == ["c.test"]


async def test_restart_announces_and_comes_back(tmp_path: Path) -> None:
    """On a server of one host, its admin may restart it."""
    solo = await start_parley(tmp_path, {"solo.test": {"admins": ["admin@solo.test"]}}, "127.0.0.1")
    try:
        for name in ("admin", "max"):
            await solo.harness.add_user(name, host="solo.test")
        admin = await solo.harness.client("admin@solo.test", plugins=PLUGINS)
        inbox = solo.harness.inbox(await solo.harness.client("max@solo.test"))
        started = asyncio.Event()
        solo.server.hooks.add("server/started", lambda _: started.set())
        form = (await admin.plugin["xep_0050"].send_command("solo.test", "http://jabber.org/protocol/admin#restart",
                                                     timeout=5))["command"]["form"]
        delay = form.get_fields()["delay"]
        assert delay["type"] == "list-single" and "30" in [o["value"] for o in delay["options"]]
        refused = await complete(admin, "restart", "solo.test", delay="-5")
        assert note(refused)[0] == "error" and not started.is_set()
        done = await complete(admin, "restart", "solo.test", delay="1", announcement=["Back in a moment"])
        assert done["status"] == "completed"
        assert (await asyncio.wait_for(inbox.get(), 5))["body"] == "Back in a moment"
        await asyncio.wait_for(started.wait(), 10)
        again = await solo.harness.client("max@solo.test")
        assert again.boundjid.bare == "max@solo.test"
    finally:
        await solo.stop()


async def test_shutdown_stops_the_server_process(tmp_path: Path) -> None:
    port, direct_port = free_port(), free_port()
    proc, _ = await start_process(tmp_path, port, direct_port)
    password = (tmp_path / "data" / "admin-password-localhost.txt").read_text().split()[1]
    harness = Harness(None, port, direct_port, tmp_path)  # type: ignore[arg-type]
    try:
        admin = await harness.client("admin@localhost", password, plugins=PLUGINS)
        inbox = harness.inbox(admin)
        disconnected = asyncio.Event()
        admin.add_event_handler("disconnected", lambda _: disconnected.set())
        await complete(admin, "shutdown", delay="0", announcement=["Going down"])
        assert (await asyncio.wait_for(inbox.get(), 5))["body"] == "Going down"
        await asyncio.wait_for(disconnected.wait(), 10)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        await harness.close()
        if proc.returncode is None:
            proc.kill()


@pytest.mark.parley_config(hosts={"localhost": {"admins": ["admin@localhost"], "modules_disabled": ["announce"]}})
async def test_message_commands_without_the_announce_module(server: Harness) -> None:
    admin = await admin_client(server)
    first = await admin.plugin["xep_0050"].send_command("localhost", "http://jabber.org/protocol/admin#edit-motd",
                                                 timeout=5)
    assert first["command"]["status"] == "completed"
    assert note(first["command"]) == ("error", "the announce module is not loaded on localhost")
    assert note(await complete(admin, "set-motd", motd=["hi"]))[0] == "error"


def test_domains_added_at_runtime_join_the_configured_lists() -> None:
    policy = Policy(S2SConfig(deny=["bad.example"]))
    policy.added = {"deny": ["worse.example"], "allow": []}
    assert not policy.allowed("bad.example") and not policy.allowed("conference.worse.example")
    assert policy.allowed("good.example")
    policy.added["allow"] = ["good.example"]  # a whitelist, once not empty, is the only way in
    assert policy.allowed("good.example") and not policy.allowed("other.example")
