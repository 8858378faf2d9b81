"""The invitation flow end to end in Debian's headless Chromium: alice invites a contact with her client, the
invitee opens the link, creates an account on the page and logs in with slixmpp, already subscribed both ways
with alice. Screenshots go to tests/artifacts/."""

from __future__ import annotations

from typing import Any

from slixmpp import ClientXMPP

from tests.browser_support import chromium, screenshot, wait_for, web_listener
from tests.conftest import Harness
from tests.test_adhoc import PLUGINS
from tests.test_invites import CLOSED, run, subscription

pytestmark = CLOSED
# The labels of the form's fields and its button, by language.
ENGLISH = ("Username", "Password", "Password again", "Create account")
GERMAN = ("Benutzername", "Passwort", "Passwort wiederholen", "Konto erstellen")


async def submit(page: Any, labels: tuple[str, str, str, str], username: str, password: str,
                 confirm: str | None = None) -> None:
    """Fill the registration form by its labels, as a person reads them, and send it."""
    await page.get_by_label(labels[0]).fill(username)
    await page.get_by_label(labels[1], exact=True).fill(password)
    await page.get_by_label(labels[2]).fill(confirm if confirm is not None else password)
    await page.get_by_role("button", name=labels[3]).click()


async def test_register_on_the_invitation_page_then_log_in_subscribed(server: Harness) -> None:
    base = await web_listener(server)
    await server.add_user("alice")
    alice = await server.client("alice@localhost", plugins=PLUGINS)
    await alice.get_roster(timeout=5)  # an interested resource: it gets roster pushes (RFC 6121 2.1.6)
    invitation = await run(alice, "invite")
    assert invitation["landing-url"].startswith(f"{base}/invite/")

    async with chromium() as browser:
        page = await browser.new_page()
        response = await page.goto(invitation["landing-url"])
        assert response is not None and response.status == 200
        await page.get_by_role("heading", name="alice@localhost invites you to chat").wait_for()
        assert await page.get_by_role("link", name="Open in your app").get_attribute("href") == invitation["uri"]
        assert await page.locator("figure svg").count() == 1  # the QR code
        assert await page.get_by_role("link", name="Conversations").count() >= 1
        await screenshot(page, "invite-page.png")
        await submit(page, ENGLISH, "juliet", "balcony-2026")
        await page.get_by_role("status").wait_for()
        assert "juliet@localhost" in await page.get_by_role("status").inner_text()
        await screenshot(page, "invite-registered.png")

    juliet: ClientXMPP = await server.client("juliet@localhost", "balcony-2026")
    await juliet.get_roster(timeout=5)
    assert juliet.client_roster["alice@localhost"]["subscription"] == "both"
    await wait_for(lambda: alice.client_roster.has_jid("juliet@localhost")
                   and alice.client_roster["juliet@localhost"]["subscription"] == "both",
                   5, "alice's roster push of juliet")
    assert await subscription(server, "alice", "juliet@localhost") == "both"


async def test_the_page_speaks_the_browsers_language_and_refuses_a_used_invitation(server: Harness) -> None:
    await web_listener(server)
    await server.add_user("admin")
    admin = await server.client("admin@localhost", plugins=PLUGINS)
    invitation = await run(admin, "create-account")

    async with chromium() as browser:
        await browser.set_extra_http_headers({"Accept-Language": "fr-CH, de;q=0.9, en;q=0.8"})
        page = await browser.new_page()
        await page.goto(invitation["landing-url"])
        assert await page.locator("html").get_attribute("lang") == "de"
        await page.get_by_role("heading", name="Du bist zu localhost eingeladen").wait_for()
        await submit(page, GERMAN, "romeo", "verona-2026", "verona-2027")
        await page.get_by_role("alert").wait_for()
        assert "verschieden" in await page.get_by_role("alert").inner_text()
        assert not await server.server.storage.accounts.exists("localhost", "romeo")

        await submit(page, GERMAN, "romeo", "verona-2026")
        await page.get_by_role("status").wait_for()
        await screenshot(page, "invite-registered-de.png")

        again = await page.goto(invitation["landing-url"])  # single use: spent
        assert again is not None and again.status == 404
        assert "nicht gültig" in await page.get_by_role("alert").inner_text()
    await server.client("romeo@localhost", "verona-2026")
