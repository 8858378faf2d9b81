"""XEP-0050 ad-hoc commands and XEP-0133 service administration, from slixmpp's xep_0050 over sockets."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from slixmpp import ClientXMPP
from slixmpp.exceptions import IqError

from server.jid import JID
from tests.conftest import Harness
from tests.test_basic_modules import wait_for

ADMIN = "http://jabber.org/protocol/admin"
PLUGINS = ("xep_0030", "xep_0050", "xep_0004")


async def admin_client(server: Harness) -> ClientXMPP:
    await server.add_user("admin")
    return await server.client("admin@localhost", plugins=PLUGINS)


def submit(client: ClientXMPP, **values: str | list[str]) -> Any:
    form = client.plugin["xep_0004"].make_form(ftype="submit")
    for var, value in values.items():
        form.add_field(var=var, value=value)
    return form


async def run(client: ClientXMPP, name: str, action: str = "execute", sessionid: str | None = None,
              **values: str | list[str]) -> Any:
    """Send one step of the command `name`; returns the <command/> of the answer."""
    payload = submit(client, **values) if values else None
    iq = await client.plugin["xep_0050"].send_command("localhost", f"{ADMIN}#{name}", action=action,
                                               sessionid=sessionid, payload=payload, timeout=5)
    return iq["command"]


async def error_of(coro: Any) -> tuple[str, list[str]]:
    with pytest.raises(IqError) as info:
        await coro
    error = info.value.iq["error"]
    return error["condition"], [child.tag.split("}")[1] for child in error.xml
                                if child.tag.startswith("{http://jabber.org/protocol/commands}")]


def result_values(command: Any) -> dict[str, Any]:
    return {var: field.get_value() for var, field in command["form"].get_fields().items()}


async def test_command_list_for_admin_and_non_admin(server: Harness) -> None:
    admin = await admin_client(server)
    items = await admin.plugin["xep_0050"].get_commands("localhost", timeout=5)
    nodes = {item[1] for item in items["disco_items"]["items"]}
    assert nodes == {c.node for c in server.server.commands if c.adhoc and c.access in ("admin", "user")}
    assert f"{ADMIN}#restart" not in nodes  # for admins of every host, and the test server has two
    assert f"{ADMIN}#get-user-password" not in nodes
    info = await admin.plugin["xep_0030"].get_info("localhost", node=f"{ADMIN}#add-user", timeout=5)
    assert ("automation", "command-node", None, "Add User") in info["disco_info"]["identities"]

    await server.add_user("bob")
    bob = await server.client("bob@localhost", plugins=PLUGINS)
    items = await bob.plugin["xep_0050"].get_commands("localhost", timeout=5)
    own = {c.node for c in server.server.commands if c.adhoc and c.access == "user"}
    assert {item[1] for item in items["disco_items"]["items"]} == own  # a user's own commands, no admin's
    condition, _ = await error_of(run(bob, "get-registered-users-num"))
    assert condition == "forbidden"
    condition, _ = await error_of(run(admin, "get-user-password"))
    assert condition == "feature-not-implemented"


async def test_add_user_form_then_login(server: Harness) -> None:
    admin = await admin_client(server)
    first = await run(admin, "add-user")
    assert first["status"] == "executing"
    assert set(first["form"].get_fields()) == {"FORM_TYPE", "accountjid", "password", "password-verify", "email",
                                               "given_name", "surname"}
    sessionid = first["sessionid"]
    condition, specific = await error_of(run(admin, "add-user", "next", sessionid, accountjid="carol@localhost"))
    assert (condition, specific) == ("bad-request", ["bad-action"])
    done = await run(admin, "add-user", "complete", sessionid,
                     **{"accountjid": "carol@localhost", "password": "pw1", "password-verify": "pw1"})
    assert done["status"] == "completed"
    assert done["notes"][0][0] == "info"
    carol = await server.client("carol@localhost", "pw1")
    assert carol.boundjid.bare == "carol@localhost"

    # An existing account is refused with an error note.
    sessionid = (await run(admin, "add-user"))["sessionid"]
    done = await run(admin, "add-user", "complete", sessionid,
                     **{"accountjid": "carol@localhost", "password": "x", "password-verify": "x"})
    assert done["notes"][0][0] == "error"


async def test_delete_user_and_registered_users(server: Harness) -> None:
    admin = await admin_client(server)
    await server.add_user("dave")
    listed = await run(admin, "get-registered-users-list", max_items="none")
    assert result_values(listed)["registereduserjids"] == ["admin@localhost", "dave@localhost"]
    sessionid = (await run(admin, "delete-user"))["sessionid"]
    done = await run(admin, "delete-user", "complete", sessionid, accountjids=["dave@localhost"])
    assert done["status"] == "completed"
    counted = await run(admin, "get-registered-users-num")
    assert result_values(counted)["registeredusersnum"] == "1"


async def test_online_users(server: Harness) -> None:
    admin = await admin_client(server)
    await server.add_user("erin")
    await server.client("erin@localhost")
    listed = await run(admin, "get-online-users-list", max_items="none")
    assert result_values(listed)["onlineuserjids"] == ["admin@localhost", "erin@localhost"]
    counted = await run(admin, "get-online-users-num")
    assert result_values(counted)["onlineusersnum"] == "2"


async def test_cancel_and_bad_session(server: Harness) -> None:
    admin = await admin_client(server)
    sessionid = (await run(admin, "add-user"))["sessionid"]
    canceled = await run(admin, "add-user", "cancel", sessionid)
    assert canceled["status"] == "canceled"
    condition, specific = await error_of(run(admin, "add-user", "complete", sessionid, accountjid="x@localhost"))
    assert (condition, specific) == ("bad-request", ["bad-sessionid"])
    sessionid = (await run(admin, "add-user"))["sessionid"]
    condition, specific = await error_of(run(admin, "add-user", "prev", sessionid))
    assert (condition, specific) == ("bad-request", ["bad-action"])
    condition, specific = await error_of(run(admin, "add-user", "jump", sessionid))
    assert (condition, specific) == ("bad-request", ["malformed-action"])


async def test_end_session_disable_and_reenable(server: Harness) -> None:
    admin = await admin_client(server)
    await server.add_user("frank")
    await server.client("frank@localhost", resource="a")
    await server.client("frank@localhost", resource="b")
    frank = JID.parse("frank@localhost")
    sessions = server.server.sessions

    async def resources_are(*expected: str) -> bool:
        return {s.jid.resource for s in sessions.of(frank) if not s.closed} == set(expected)

    sessionid = (await run(admin, "end-user-session"))["sessionid"]
    await run(admin, "end-user-session", "complete", sessionid, accountjids=["frank@localhost/a"])
    await wait_for(lambda: resources_are("b"))
    sessionid = (await run(admin, "disable-user"))["sessionid"]
    await run(admin, "disable-user", "complete", sessionid, accountjids=["frank@localhost"])
    await wait_for(resources_are)
    with pytest.raises(AssertionError, match="login failed"):
        await server.client("frank@localhost", timeout=5)
    sessionid = (await run(admin, "reenable-user"))["sessionid"]
    await run(admin, "reenable-user", "complete", sessionid, accountjids=["frank@localhost"])
    await server.client("frank@localhost")


async def test_announce_user_stats_and_lastlogin(server: Harness) -> None:
    admin = await admin_client(server)
    await server.add_user("gina")
    gina = await server.client("gina@localhost", resource="phone")
    inbox = server.inbox(gina)
    sessionid = (await run(admin, "announce"))["sessionid"]
    await run(admin, "announce", "complete", sessionid, announcement=["Down at 22:00"])
    message = await asyncio.wait_for(inbox.get(), 5)
    assert (message["from"].bare, message["body"]) == ("localhost", "Down at 22:00")
    sessionid = (await run(admin, "user-stats"))["sessionid"]
    stats = result_values(await run(admin, "user-stats", "complete", sessionid, accountjid="gina@localhost"))
    assert (stats["rostersize"], stats["onlineresources"]) == ("0", ["phone"])
    assert stats["ipaddresses"] == ["127.0.0.1"]
    sessionid = (await run(admin, "get-user-lastlogin"))["sessionid"]
    last = result_values(await run(admin, "get-user-lastlogin", "complete", sessionid,
                                   accountjids=["gina@localhost"]))
    assert last["accountjids"] == ["gina@localhost"] and last["lastlogin"].endswith("Z")
