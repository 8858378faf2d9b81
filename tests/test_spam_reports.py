"""XEP-0377 spam reports over real sockets: a report travels with a XEP-0191 block, is stored, and the host's
admins list it and act on it through ad-hoc commands and parleyctl."""

from __future__ import annotations

import asyncio

import pytest
from slixmpp import ClientXMPP

from extensions.spam_reporting import REPORTING
from server.config import DEFAULT_MODULES
from tests.conftest import Harness
from tests.test_adhoc import PLUGINS, admin_client
from tests.test_adhoc import run as run_adhoc
from tests.test_basic_modules import iq_error, send_iq
from tests.test_offline import collect
from tests.test_parleyctl import ok, run
from tests.test_roster_presence import sync
from tests.test_service_admin import complete, note

pytestmark = pytest.mark.parley_config(modules=[*DEFAULT_MODULES, "spam_reporting"])


def block_with_report(jid: str, reason: str = "urn:xmpp:reporting:spam", text: str = "",
                      ids: tuple[str, ...] = ()) -> str:
    stanza_ids = "".join(f"<stanza-id xmlns='urn:xmpp:sid:0' by='alice@localhost' id='{i}'/>" for i in ids)
    body = f"<text xml:lang='en'>{text}</text>" if text else ""
    return (f"<block xmlns='urn:xmpp:blocking'><item jid='{jid}'>"
            f"<report xmlns='{REPORTING}' reason='{reason}'>{stanza_ids}{body}</report></item></block>")


async def reporter(server: Harness) -> ClientXMPP:
    await server.add_user("alice")
    return await server.client("alice@localhost", plugins=("xep_0191",))


async def test_a_report_blocks_and_is_listed_for_admins_who_disable_the_account(server: Harness) -> None:
    alice = await reporter(server)
    await server.add_user("bob")
    admin = await admin_client(server)
    info = await admin.plugin["xep_0030"].get_info("localhost", timeout=5)
    assert REPORTING in info["disco_info"]["features"]
    await send_iq(alice, "set", block_with_report("bob@localhost", text="Buy cheap watches", ids=("m1", "m2")))
    assert {str(j) for j in await alice.plugin["xep_0191"].get_blocked_jids()} == {"bob@localhost"}

    listed = await run_adhoc(admin, "spam-reports")
    [line] = listed["form"].get_fields()["reports"].get_value()
    assert "bob@localhost (spam) reported by alice@localhost [messages m1, m2]: Buy cheap watches" in line
    report_id = line.split()[0].lstrip("#")

    done = await complete(admin, "act-on-spam-report", report=report_id, action="disable-account")
    assert "disable-account: bob@localhost" in done["form"].get_fields()["done"].get_value()
    account = await server.server.storage.accounts.get("localhost", "bob")
    assert account is not None and account.disabled
    assert not (await run_adhoc(admin, "spam-reports"))["form"].get_fields()["reports"].get_value()
    # A report acted on cannot be acted on again.
    again = await complete(admin, "act-on-spam-report", report=report_id, action="dismiss")
    assert note(again) == ("error", f"no open report #{report_id} on localhost")


async def test_parleyctl_lists_reports_and_dismisses_one(server: Harness) -> None:
    alice = await reporter(server)
    await send_iq(alice, "set", block_with_report("spammer@elsewhere.example", "urn:xmpp:reporting:abuse",
                                                  "threats"))
    [record] = await ok(server, "spam_reports", "localhost")
    report_id, _, who, jid, reason, ids, text = record.split("\t")
    assert (who, jid, reason, ids, text) == ("alice@localhost", "spammer@elsewhere.example", "abuse", "", "threats")
    assert await ok(server, "spam_report_act", "localhost", report_id, "dismiss") == [f"report #{report_id} dismissed"]
    assert await ok(server, "spam_reports", "localhost") == []
    code, _, err = await run(server, "spam_report_act", "localhost", report_id, "dismiss")
    assert code == 1 and "no open report" in err


async def test_deny_domain_puts_the_reported_domain_on_the_federation_blacklist(server: Harness) -> None:
    alice = await reporter(server)
    await send_iq(alice, "set", block_with_report("spammer@spam.example"))
    await send_iq(alice, "set", block_with_report("other@spam.example"))
    [first, _] = await ok(server, "spam_reports", "localhost")
    done = await ok(server, "spam_report_act", "localhost", first.split("\t")[0], "deny-domain")
    assert done == ["deny-domain: spammer@spam.example; 1 open report on it closed"]
    assert await server.server.storage.kv.get("", "", "s2s-lists", "deny") == ["spam.example"]


@pytest.mark.parley_config(modules=[*DEFAULT_MODULES, "spam_reporting", "abuse_limits"])
async def test_deny_jid_drops_the_reported_address_on_the_host(server: Harness) -> None:
    alice = await reporter(server)
    inbox = collect(alice)
    await server.add_user("mallory", host="example.test")
    await server.add_user("carol", host="example.test")
    mallory = await server.client("mallory@example.test")
    carol = await server.client("carol@example.test")
    alice.send_presence()
    await sync(alice)
    await send_iq(alice, "set", block_with_report("mallory@example.test"))
    await send_iq(alice, "set", "<unblock xmlns='urn:xmpp:blocking'/>")  # blocking alone would hide her too
    [record] = await ok(server, "spam_reports", "localhost")
    await ok(server, "spam_report_act", "localhost", record.split("\t")[0], "deny-jid")
    mallory.send_message(mto="alice@localhost", mbody="spam again", mtype="chat")
    await sync(mallory)
    carol.send_message(mto="alice@localhost", mbody="hi alice", mtype="chat")
    first = await asyncio.wait_for(inbox.get(), 5)
    assert first.findtext("{jabber:client}body") == "hi alice"


async def test_deny_jid_needs_abuse_limits(server: Harness) -> None:
    alice = await reporter(server)
    await send_iq(alice, "set", block_with_report("mallory@example.test"))
    [record] = await ok(server, "spam_reports", "localhost")
    code, _, err = await run(server, "spam_report_act", "localhost", record.split("\t")[0], "deny-jid")
    assert code == 1 and "the abuse_limits module is not loaded on localhost" in err


async def test_a_report_with_an_unknown_reason_blocks_nothing_and_stores_nothing(server: Harness) -> None:
    alice = await reporter(server)
    condition, _ = await iq_error(alice, "set", block_with_report("bob@localhost", "urn:example:annoying"))
    assert condition == "bad-request"
    assert await alice.plugin["xep_0191"].get_blocked_jids() == set()
    assert await server.server.storage.reports.list("localhost") == []


async def test_non_admins_cannot_list_reports(server: Harness) -> None:
    await server.add_user("carol")
    carol = await server.client("carol@localhost", plugins=PLUGINS)
    items = await carol.plugin["xep_0050"].get_commands("localhost", timeout=5)
    assert not {i[1] for i in items["disco_items"]["items"]} & {
        "http://jabber.org/protocol/admin#spam-reports", "http://jabber.org/protocol/admin#act-on-spam-report"}
