"""XEP-0377 Spam Reporting: reports that users attach to a XEP-0191 block, collected for the host's admins.

A client reports an address by blocking it with a <report/> in the block's item: the reason (spam or
abuse), some text and the stanza-ids of the messages it is about. The block goes on as usual (blocking's
'blocking/block' event runs first), and the report is stored for the host's admins, who list them and act
on them with ad-hoc commands or parleyctl: dismiss a report, disable the reported local account, or refuse
the reported remote domain (XEP-0133's federation blacklist) or address (abuse_limits' deny-list). Acting on
a report closes every open report on the same address.
"""

from __future__ import annotations

from typing import Any
from xml.etree.ElementTree import Element

from extensions.abuse_limits import AbuseLimits
from extensions.blocking import ITEM
from server import ns
from server.commands import Arg, CommandError, Context, Declarations, module_on
from server.jid import JID, JIDError
from server.module import Module
from server.options import Option
from server.storage.reports import Report
from server.stream.errors import StanzaError

REPORTING = "urn:xmpp:reporting:1"
REPORT = ns.qname(REPORTING, "report")
TEXT = ns.qname(REPORTING, "text")
STANZA_ID = ns.qname("urn:xmpp:sid:0", "stanza-id")
REASONS = {"urn:xmpp:reporting:spam": "spam", "urn:xmpp:reporting:abuse": "abuse"}
ACTIONS = ("dismiss", "disable-account", "deny-domain", "deny-jid")


class SpamReporting(Module):
    name = "spam_reporting"
    options = (Option("max_text", int, 4000, "characters of a report's text that are kept", minimum=1),
               Option("max_ids", int, 50, "stanza-ids of reported messages kept per report", minimum=0))

    def setup(self) -> None:
        self.add_feature(REPORTING)
        self.hook("blocking/block", self.reported)
        for declared in COMMANDS:
            self.add_command(declared)

    async def reported(self, user: JID, block: Element) -> None:
        """Store the reports of a block; a report with a reason this server does not know refuses the block
        (XEP-0377: a server must not block when it cannot take the report)."""
        reports = []
        for item in block.iterfind(ITEM):
            report = item.find(REPORT)
            if report is None:
                continue
            reason = REASONS.get(report.get("reason") or "")
            if reason is None:
                raise StanzaError("bad-request", f"unknown report reason {report.get('reason')!r}")
            try:
                jid = JID.parse(item.get("jid") or "")
            except JIDError as exc:
                raise StanzaError("jid-malformed", str(exc)) from None
            text = "\n".join((t.text or "").strip() for t in report.iterfind(TEXT)).strip()
            ids = [i.get("id") or "" for i in report.iterfind(STANZA_ID) if i.get("id")]
            reports.append((jid, reason, text[:self.option("max_text")], ids[:self.option("max_ids")]))
        for jid, reason, text, ids in reports:
            await self.server.storage.reports.add(self.host.name, str(user), str(jid), reason, text, ids)


def describe(report: Report) -> str:
    """One line an admin reads in a form: the id to act on, when, who and why."""
    ids = f" [messages {', '.join(report.stanza_ids)}]" if report.stanza_ids else ""
    text = " ".join(report.text.split())
    return (f"#{report.id} {report.created:%Y-%m-%d %H:%M} {report.jid} ({report.reason}) "
            f"reported by {report.reporter}{ids}{': ' + text if text else ''}")


async def act(ctx: Context, report_id: int, action: str) -> str:
    """Carry out an admin's decision on an open report of ctx's host; what was done, for the admin."""
    host = ctx.host
    if action not in ACTIONS:
        raise CommandError(f"unknown action {action!r}: one of {', '.join(ACTIONS)}")
    reports = host.server.storage.reports
    report = await reports.get(host.name, report_id)
    if report is None or report.state != "open":
        raise CommandError(f"no open report #{report_id} on {host.name}")
    if action == "dismiss":
        await reports.set_state(host.name, report_id, "dismissed")
        return f"report #{report_id} dismissed"
    jid = JID.parse(report.jid)
    if action == "disable-account":
        if jid.domain != host.name or jid.local is None:
            raise CommandError(f"{jid} is not an account of {host.name}")
        await host.server.commands.run("disable-user", ctx, {"accountjids": [jid.bare]})
    elif action == "deny-domain":
        if jid.domain in host.server.hosts:
            raise CommandError(f"{jid.domain} is served here: disable the account instead")
        # edit-blacklist takes the whole list, the configured domains included.
        denied = [*host.server.config.s2s.deny, *(await host.server.storage.kv.get("", "", "s2s-lists", "deny") or [])]
        await host.server.commands.run("edit-blacklist", ctx, {"blacklistjids": [
            JID.make(None, d) for d in sorted({*denied, jid.domain})]})
    else:
        await module_on(host, AbuseLimits).deny(jid)
    closed = await reports.close(host.name, report.jid, "acted")
    return f"{action}: {jid}; {closed} open report{'s' if closed != 1 else ''} on it closed"


COMMANDS = Declarations()
REPORTS = Arg("reports", "lines", "Open spam and abuse reports")
REPORT_ID = Arg("report", "int", "Report number")
ACTION = Arg("action", "text", "What to do", options=ACTIONS)
DONE = Arg("done", "text", "Done")
HOST = Arg("host", "text", "Virtual host")
RECORDS = Arg("reports", "records", "Open reports",
              fields=("id", "created", "reporter", "jid", "reason", "stanza_ids", "text"))


@COMMANDS.command("spam-reports", "List Spam Reports", result=(REPORTS,))
async def spam_reports(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    return {"reports": [describe(r) for r in await ctx.host.server.storage.reports.list(ctx.host.name)]}


@COMMANDS.command("act-on-spam-report", "Act on a Spam Report", (REPORT_ID, ACTION), (DONE,))
async def act_on_spam_report(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    return {"done": await act(ctx, args["report"], args["action"])}


@COMMANDS.command("spam_reports", "List a host's open spam and abuse reports", (HOST,), (RECORDS,),
                  returns="records")
async def spam_reports_records(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    host = ctx.target(args["host"])
    return {"reports": [{"id": r.id, "created": f"{r.created:%Y-%m-%dT%H:%M:%SZ}", "reporter": r.reporter,
                         "jid": r.jid, "reason": r.reason, "stanza_ids": ",".join(r.stanza_ids),
                         "text": " ".join(r.text.split())}
                        for r in await host.server.storage.reports.list(host.name)]}


@COMMANDS.command("spam_report_act", "Act on a spam report: dismiss, disable-account, deny-domain or deny-jid",
                  (HOST, Arg("report", "int", "Report number"), Arg("action", "text", "What to do")), (DONE,),
                  returns="string")
async def spam_report_act(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    host = ctx.target(args["host"])
    return {"done": await act(Context(host, ctx.actor, ctx.operator), args["report"], args["action"])}
