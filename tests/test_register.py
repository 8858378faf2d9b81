"""In-band registration (XEP-0077): creating accounts before login, password change and removal after."""

from __future__ import annotations

import asyncio
from xml.etree.ElementTree import Element

import pytest

from tests.conftest import Harness, RawClient
from tests.test_basic_modules import iq_error, send_iq

REGISTER = "jabber:iq:register"
FEATURE = "{http://jabber.org/features/iq-register}register"
STREAMS = "http://etherx.jabber.org/streams"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
DATA = "jabber:x:data"


async def unauthenticated(server: Harness, host: str = "localhost",
                          tls: bool = True) -> tuple[RawClient, Element]:
    """A raw stream (over STARTTLS unless `tls` is false) before authentication, and its features."""
    raw = await server.raw()
    if tls:
        await raw.starttls(host)
    await raw.open(host)
    return raw, await raw.expect(f"{{{STREAMS}}}features")


async def ask(raw: RawClient, type_: str, payload: str = "") -> Element:
    await raw.send(f"<iq type='{type_}' id='reg'><query xmlns='{REGISTER}'>{payload}</query></iq>")
    return await raw.expect("{jabber:client}iq")


def legacy(username: str, password: str) -> str:
    return f"<username>{username}</username><password>{password}</password>"


def condition_of(iq: Element) -> str | None:
    error = iq.find("{jabber:client}error")
    if error is None:
        return None
    return next(child.tag.split("}")[1] for child in error if child.tag != f"{{{STANZAS}}}text")


async def test_register_then_log_in(server: Harness) -> None:
    raw, features = await unauthenticated(server)
    assert features.find(FEATURE) is not None
    result = await ask(raw, "get")
    assert result.get("type") == "result"
    query = result.find(f"{{{REGISTER}}}query")
    assert query.find(f"{{{REGISTER}}}username") is not None
    assert query.find(f"{{{REGISTER}}}password") is not None
    assert query.findtext(f"{{{REGISTER}}}instructions")
    form = query.find(f"{{{DATA}}}x")
    fields = {f.get("var"): f for f in form.iter(f"{{{DATA}}}field")}
    assert fields["FORM_TYPE"].findtext(f"{{{DATA}}}value") == REGISTER
    assert fields["password"].get("type") == "text-private"
    assert fields["username"].find(f"{{{DATA}}}required") is not None

    result = await ask(raw, "set", legacy("carol", "pencil"))
    assert result.get("type") == "result", condition_of(result)
    carol = await server.client("carol@localhost", password="pencil")
    assert carol.boundjid.bare == "carol@localhost"


async def test_register_with_a_data_form(server: Harness) -> None:
    raw, _ = await unauthenticated(server)
    form = (f"<x xmlns='{DATA}' type='submit'>"
            f"<field var='FORM_TYPE'><value>{REGISTER}</value></field>"
            "<field var='username'><value>dave</value></field>"
            "<field var='password'><value>quill</value></field></x>")
    result = await ask(raw, "set", form)
    assert result.get("type") == "result", condition_of(result)
    await server.client("dave@localhost", password="quill")


async def test_register_conflict_and_bad_input(server: Harness) -> None:
    await server.add_user("alice")
    raw, _ = await unauthenticated(server)
    result = await ask(raw, "set", legacy("alice", "hunter2"))
    assert condition_of(result) == "conflict"
    assert b"hunter2" not in raw.raw
    assert condition_of(await ask(raw, "set", "<username>erin</username><password/>")) == "not-acceptable"
    assert condition_of(await ask(raw, "set", legacy("bad@name", "pw"))) == "not-acceptable"
    assert condition_of(await ask(raw, "set", "<remove/>")) == "registration-required"
    assert not await server.server.storage.accounts.exists("localhost", "erin")


async def test_registration_off_is_not_allowed(server: Harness) -> None:
    raw, features = await unauthenticated(server, "example.test")
    assert features.find(FEATURE) is None
    assert condition_of(await ask(raw, "get")) == "not-allowed"
    assert condition_of(await ask(raw, "set", legacy("frank", "pw"))) == "not-allowed"
    assert not await server.server.storage.accounts.exists("example.test", "frank")

    server.server.hosts["localhost"].config.registration = False
    raw, features = await unauthenticated(server)
    assert features.find(FEATURE) is None
    assert condition_of(await ask(raw, "set", legacy("frank", "pw"))) == "not-allowed"


async def test_registration_needs_an_encrypted_stream(server: Harness) -> None:
    raw, features = await unauthenticated(server, tls=False)
    assert features.find(FEATURE) is None
    assert condition_of(await ask(raw, "set", legacy("grace", "pw"))) == "not-authorized"
    assert not await server.server.storage.accounts.exists("localhost", "grace")


async def test_registrations_per_address_are_limited(server: Harness) -> None:
    server.server.hosts["localhost"].config_options["register.per_ip_limit"] = 2
    raw, _ = await unauthenticated(server)
    assert condition_of(await ask(raw, "set", legacy("u1", "pw"))) is None
    assert condition_of(await ask(raw, "set", legacy("u1", "pw"))) == "conflict"  # a failure costs nothing
    assert condition_of(await ask(raw, "set", legacy("u2", "pw"))) is None
    other, _ = await unauthenticated(server)
    assert condition_of(await ask(other, "set", legacy("u3", "pw"))) == "policy-violation"
    assert not await server.server.storage.accounts.exists("localhost", "u3")


async def test_password_change(server: Harness) -> None:
    await server.add_user("alice", "old")
    await server.add_user("bob")
    alice = await server.client("alice@localhost", password="old")
    info = (await send_iq(alice, "get", f"<query xmlns='{REGISTER}'/>")).find(f"{{{REGISTER}}}query")
    assert info.find(f"{{{REGISTER}}}registered") is not None
    assert info.findtext(f"{{{REGISTER}}}username") == "alice"

    condition, _ = await iq_error(alice, "set", f"<query xmlns='{REGISTER}'>{legacy('bob', 'x')}</query>")
    assert condition == "not-allowed"
    condition, _ = await iq_error(alice, "set", f"<query xmlns='{REGISTER}'>{legacy('bob', 'x')}</query>",
                                  "bob@localhost")
    assert condition == "forbidden"
    no_password = f"<query xmlns='{REGISTER}'><username>alice</username></query>"
    condition, _ = await iq_error(alice, "set", no_password)
    assert condition == "bad-request"

    await send_iq(alice, "set", f"<query xmlns='{REGISTER}'>{legacy('alice', 'new')}</query>", "localhost")
    await server.client("alice@localhost", password="new")
    with pytest.raises(AssertionError, match="login failed"):
        await server.client("alice@localhost", password="old")


async def test_account_removal_ends_every_session(server: Harness) -> None:
    await server.add_user("alice")
    phone = await server.client("alice@localhost", resource="phone")
    laptop = await server.client("alice@localhost", resource="laptop")
    errors: list[str] = []
    laptop.add_event_handler("stream_error", lambda error: errors.append(error["condition"]))

    result = await send_iq(phone, "set", f"<query xmlns='{REGISTER}'><remove/></query>")
    assert result.get("type") == "result"
    await asyncio.wait_for(asyncio.gather(phone.disconnected, laptop.disconnected), 5)
    assert errors == ["not-authorized"]
    assert not await server.server.storage.accounts.exists("localhost", "alice")
    with pytest.raises(AssertionError, match="login failed"):
        await server.client("alice@localhost")

