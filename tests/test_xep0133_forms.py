"""XEP-0133's commands shaped as the XEP's examples: node names, form fields and their types, one form per
command, the result fields; and add-user submitted exactly as the XEP shows it, by a client that asks for
the form first and by one that submits it at once. From slixmpp over sockets."""

from __future__ import annotations

from typing import Any
from xml.etree.ElementTree import Element, fromstring

from slixmpp import ClientXMPP

from server.commands import ADMIN_NS
from server.jid import JID
from tests.conftest import Harness
from tests.test_adhoc import PLUGINS, admin_client, error_of, result_values, run

ACCOUNTJIDS = [("accountjids", "jid-multi")]
MAX_ITEMS = [("max_items", "list-single")]
# The form each command returns to 'execute', as (var, type) in the XEP's order, FORM_TYPE aside; the
# types the examples leave out (blacklistjids, whitelistjids) are those of the XEP's field registry.
FORMS: dict[str, list[tuple[str, str]]] = {
    "add-user": [("accountjid", "jid-single"), ("password", "text-private"), ("password-verify", "text-private"),
                 ("email", "text-single"), ("given_name", "text-single"), ("surname", "text-single")],
    "delete-user": ACCOUNTJIDS, "disable-user": ACCOUNTJIDS, "reenable-user": ACCOUNTJIDS,
    "end-user-session": ACCOUNTJIDS,
    "change-user-password": [("accountjid", "jid-single"), ("password", "text-private")],
    "get-user-roster": ACCOUNTJIDS, "get-user-lastlogin": ACCOUNTJIDS,
    "user-stats": [("accountjid", "jid-single")],
    "edit-blacklist": [("blacklistjids", "jid-multi")], "edit-whitelist": [("whitelistjids", "jid-multi")],
    "get-registered-users-list": MAX_ITEMS, "get-disabled-users-list": MAX_ITEMS,
    "get-online-users-list": MAX_ITEMS, "get-active-users": MAX_ITEMS, "get-idle-users": MAX_ITEMS,
    "announce": [("announcement", "text-multi")],
    "set-motd": [("motd", "text-multi")], "edit-motd": [("motd", "text-multi")],
    "set-welcome": [("welcome", "text-multi")],
    "edit-admin": [("adminjids", "jid-multi")],
    "restart": [("delay", "list-single"), ("announcement", "text-multi")],
    "shutdown": [("delay", "list-single"), ("announcement", "text-multi")],
}
# Commands the XEP completes at once, with the fields of their result.
AT_ONCE: dict[str, list[str]] = {
    "get-registered-users-num": ["registeredusersnum"], "get-disabled-users-num": ["disabledusersnum"],
    "get-online-users-num": ["onlineusersnum"], "get-active-users-num": ["activeusersnum"],
    "get-idle-users-num": ["idleusersnum"], "delete-motd": [], "delete-welcome": [],
}
# The result fields of the commands with a form that answer with one.
RESULTS: dict[str, tuple[dict[str, str | list[str]], list[str]]] = {
    "get-registered-users-list": ({"max_items": "100"}, ["registereduserjids"]),
    "get-disabled-users-list": ({"max_items": "100"}, ["disableduserjids"]),
    "get-online-users-list": ({"max_items": "100"}, ["onlineuserjids"]),
    "get-active-users": ({"max_items": "100"}, ["activeuserjids"]),
    "get-idle-users": ({"max_items": "100"}, ["activeuserjids"]),  # sic: the XEP's example
    "get-user-roster": ({"accountjids": ["admin@localhost"]}, ["accountjids"]),
    "get-user-lastlogin": ({"accountjids": ["admin@localhost"]}, ["accountjids", "lastlogin"]),
    "user-stats": ({"accountjid": "admin@localhost"}, ["rostersize", "onlineresources", "ipaddresses"]),
}


def fields(command: Any) -> list[tuple[str, str]]:
    """(var, type) of each field of the command's form but FORM_TYPE, which must be XEP-0133's."""
    form = command["form"]
    form_type = form.get_fields()["FORM_TYPE"]
    assert (form_type["type"], form_type.xml.findtext("{jabber:x:data}value")) == ("hidden", ADMIN_NS)
    return [(var, field["type"]) for var, field in form.get_fields().items() if var != "FORM_TYPE"]


async def test_every_xep_0133_command_is_checked(server: Harness) -> None:
    xep_0133 = {c.name for c in server.server.commands if c.adhoc and c.namespace == ADMIN_NS}
    assert xep_0133 == set(FORMS) | set(AT_ONCE)


async def test_forms_and_results_are_shaped_as_the_xep_examples(server: Harness) -> None:
    admin = await admin_client(server)
    # Admin of both hosts of the test server, so that the server-wide commands are shown too.
    await server.server.hosts["example.test"].set_admins({JID.parse("admin@localhost")})
    for name, expected in FORMS.items():
        shown = await run(admin, name)
        assert shown["status"] == "executing", name
        assert fields(shown) == expected, name
        assert [action for action in shown["actions"]] == ["complete"], name
        canceled = await run(admin, name, "cancel", shown["sessionid"])
        assert canceled["status"] == "canceled", name
    options = (await run(admin, "get-online-users-list"))["form"].get_fields()["max_items"]["options"]
    assert [o["value"] for o in options] == ["25", "50", "75", "100", "150", "200", "none"]
    for name, result in AT_ONCE.items():
        done = await run(admin, name)
        assert done["status"] == "completed", name
        assert (fields(done) if result else []) == [(var, "text-single") for var in result], name
    for name, (values, result) in RESULTS.items():
        done = await run(admin, name, "execute", None, **values)  # submitted with the first request
        assert done["status"] == "completed", name
        assert [var for var, _ in fields(done)] == result, name


def command_iq(client: ClientXMPP, command: str) -> Any:
    """An iq set to the server carrying `command`, a <command/> written as in the XEP's examples."""
    iq = client.make_iq_set(ito="localhost")
    iq.append(fromstring(command))
    return iq


def add_user_submission(user: str, sessionid: str | None, action: str | None) -> str:
    """XEP-0133 Example 3 ('Admin Submits Add User Form to Service') for `user` at localhost."""
    attrs = "".join(f" {k}='{v}'" for k, v in (("sessionid", sessionid), ("action", action)) if v)
    return f"""<command xmlns='http://jabber.org/protocol/commands'
           node='http://jabber.org/protocol/admin#add-user'{attrs}>
    <x xmlns='jabber:x:data' type='submit'>
      <field type='hidden' var='FORM_TYPE'><value>http://jabber.org/protocol/admin</value></field>
      <field var='accountjid'><value>juliet@localhost</value></field>
      <field var='password'><value>R0m30</value></field>
      <field var='password-verify'><value>R0m30</value></field>
      <field var='email'><value>juliet@capulet.com</value></field>
      <field var='given_name'><value>Juliet</value></field>
      <field var='surname'><value>Capulet</value></field>
    </x>
  </command>""".replace("juliet", user)


async def test_add_user_as_the_xep_examples_show_it(server: Harness) -> None:
    """Examples 1-4: execute, the form, the form submitted under the sessionid; then the one form submitted
    with the first request and action='complete', as a script does. Both users can log in."""
    admin = await admin_client(server)
    asked = await command_iq(admin, "<command xmlns='http://jabber.org/protocol/commands' action='execute' "
                                    "node='http://jabber.org/protocol/admin#add-user'/>").send(timeout=5)
    sessionid = asked["command"]["sessionid"]
    done = await command_iq(admin, add_user_submission("juliet", sessionid, None)).send(timeout=5)
    assert done["command"]["status"] == "completed"
    at_once = await command_iq(admin, add_user_submission("julia", None, "complete")).send(timeout=5)
    assert (at_once["command"]["status"], at_once["command"]["notes"][0][0]) == ("completed", "info")

    for user in ("juliet", "julia"):
        client = await server.client(f"{user}@localhost", "R0m30")
        assert client.boundjid.bare == f"{user}@localhost"
        vcard = await server.server.hosts["localhost"].modules["vcard"].load(JID.parse(f"{user}@localhost"))
        assert isinstance(vcard, Element)
        assert vcard.findtext("{vcard-temp}N/{vcard-temp}GIVEN") == "Juliet"
        assert vcard.findtext("{vcard-temp}N/{vcard-temp}FAMILY") == "Capulet"
        assert vcard.findtext("{vcard-temp}EMAIL/{vcard-temp}USERID") == f"{user}@capulet.com"


async def test_one_shot_submissions_that_do_not_fit_are_refused(server: Harness) -> None:
    admin = await admin_client(server)
    condition, specific = await error_of(run(admin, "add-user", "complete", None, password="x"))
    assert (condition, specific) == ("bad-request", ["bad-payload"])  # no accountjid
    mismatch = await run(admin, "add-user", "complete", None,
                         **{"accountjid": "romeo@localhost", "password": "a", "password-verify": "b"})
    assert mismatch["notes"][0] == ("error", "the passwords do not match")
    refused = await run(admin, "get-registered-users-list", "execute", None, max_items="many")
    assert refused["notes"][0][0] == "error"
    listed = result_values(await run(admin, "get-registered-users-list", "complete"))
    assert listed["registereduserjids"] == ["admin@localhost"]
    other = await server.client("admin@localhost", plugins=PLUGINS, resource="other")
    sessionid = (await run(admin, "add-user"))["sessionid"]
    condition, specific = await error_of(run(other, "add-user", "complete", sessionid, accountjid="x@localhost"))
    assert (condition, specific) == ("bad-request", ["bad-sessionid"])
