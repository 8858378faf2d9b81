"""Client connections over real sockets: negotiation, authentication, and what bad input gets."""

from __future__ import annotations

import asyncio
import base64
import hashlib

import pytest

from server.sasl.scram import ScramClient
from tests.conftest import Harness, RawClient
from tests.test_basic_modules import wait_for

SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
STREAMS = "http://etherx.jabber.org/streams"
STREAM_ERR = "urn:ietf:params:xml:ns:xmpp-streams"


def stream_error_condition(raw: bytes) -> str | None:
    text = raw.decode(errors="replace")
    start = text.find("<stream:error>")
    if start < 0:
        return None
    rest = text[start + len("<stream:error>"):]
    return rest[1:].split(" ", 1)[0].split("/", 1)[0]


async def scram_login(raw: RawClient, user: str, password: str, mechanism: str = "SCRAM-SHA-256",
                      cb_type: str | None = None) -> object:
    """Authenticate a raw TLS stream; returns the <success/> or <failure/> element."""
    await raw.open()
    features = await raw.expect(f"{{{STREAMS}}}features")
    mechs = [m.text for m in features.iter(f"{{{SASL}}}mechanism")]
    assert mechanism in mechs, mechs
    cb_data = b""
    if cb_type == "tls-server-end-point":
        der = raw.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        cb_data = hashlib.sha256(der).digest()
    client = ScramClient(mechanism, user, password, cb_type=cb_type, cb_data=cb_data,
                         plus_supported_by_server=any(m.endswith("-PLUS") for m in mechs))
    await raw.send(f"<auth xmlns='{SASL}' mechanism='{mechanism}'>{base64.b64encode(client.first()).decode()}</auth>")
    event = await raw.next()
    if event.tag != f"{{{SASL}}}challenge":
        return event
    final = client.final(base64.b64decode(event.text))
    await raw.send(f"<response xmlns='{SASL}'>{base64.b64encode(final).decode()}</response>")
    result = await raw.next()
    if result.tag == f"{{{SASL}}}success":
        client.verify(base64.b64decode(result.text))
    return result


async def tls_raw(server: Harness) -> RawClient:
    raw = await server.raw()
    await raw.starttls()
    return raw


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-1", "SCRAM-SHA-256", "PLAIN"])
async def test_slixmpp_login_over_starttls(server: Harness, mechanism: str) -> None:
    await server.add_user("alice")
    client = await server.client("alice@localhost", sasl_mech=mechanism)
    assert client.boundjid.bare == "alice@localhost"
    assert client.boundjid.resource


async def test_slixmpp_login_over_direct_tls(server: Harness) -> None:
    await server.add_user("alice")
    client = await server.client("alice@localhost", resource="phone", direct=True)
    assert str(client.boundjid) == "alice@localhost/phone"


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-1-PLUS", "SCRAM-SHA-256-PLUS"])
async def test_scram_plus_with_tls_server_end_point(server: Harness, mechanism: str) -> None:
    await server.add_user("alice", "pencil")
    raw = await tls_raw(server)
    result = await scram_login(raw, "alice", "pencil", mechanism, cb_type="tls-server-end-point")
    assert result.tag == f"{{{SASL}}}success"


async def test_channel_binding_types_advertised(server: Harness) -> None:
    raw = await tls_raw(server)
    await raw.open()
    features = await raw.expect(f"{{{STREAMS}}}features")
    types = {cb.get("type") for cb in features.iter("{urn:xmpp:sasl-cb:0}channel-binding")}
    assert "tls-server-end-point" in types


async def test_plus_with_wrong_binding_data_fails(server: Harness) -> None:
    await server.add_user("alice", "pencil")
    raw = await tls_raw(server)
    await raw.open()
    await raw.expect(f"{{{STREAMS}}}features")
    client = ScramClient("SCRAM-SHA-256-PLUS", "alice", "pencil", cb_type="tls-server-end-point",
                         cb_data=b"\x00" * 32, plus_supported_by_server=True)
    await raw.send(f"<auth xmlns='{SASL}' mechanism='SCRAM-SHA-256-PLUS'>"
                   f"{base64.b64encode(client.first()).decode()}</auth>")
    challenge = await raw.expect(f"{{{SASL}}}challenge")
    final = client.final(base64.b64decode(challenge.text))
    await raw.send(f"<response xmlns='{SASL}'>{base64.b64encode(final).decode()}</response>")
    failure = await raw.expect(f"{{{SASL}}}failure")
    assert failure.find(f"{{{SASL}}}not-authorized") is not None


async def test_starttls_is_required_before_auth(server: Harness) -> None:
    raw = await server.raw()
    await raw.open()
    features = await raw.expect(f"{{{STREAMS}}}features")
    starttls = features.find("{urn:ietf:params:xml:ns:xmpp-tls}starttls")
    assert starttls is not None and starttls.find("{urn:ietf:params:xml:ns:xmpp-tls}required") is not None
    assert features.find(f"{{{SASL}}}mechanisms") is None
    await raw.send(f"<auth xmlns='{SASL}' mechanism='PLAIN'>AGFsaWNlAHNlY3JldA==</auth>")
    failure = await raw.expect(f"{{{SASL}}}failure")
    assert failure.find(f"{{{SASL}}}encryption-required") is not None


async def test_plain_is_not_offered_without_tls(server: Harness) -> None:
    server.server.config.require_encryption = False
    raw = await server.raw()
    await raw.open()
    features = await raw.expect(f"{{{STREAMS}}}features")
    mechs = {m.text for m in features.iter(f"{{{SASL}}}mechanism")}
    assert "PLAIN" not in mechs and "SCRAM-SHA-256" in mechs
    assert not any(m.endswith("-PLUS") for m in mechs)


async def test_wrong_password_then_throttling_then_recovery(server: Harness) -> None:
    await server.add_user("alice", "right")
    for _ in range(3):
        raw = await tls_raw(server)
        result = await scram_login(raw, "alice", "wrong")
        assert result.find(f"{{{SASL}}}not-authorized") is not None
    raw = await tls_raw(server)
    result = await scram_login(raw, "alice", "right")
    assert result.find(f"{{{SASL}}}temporary-auth-failure") is not None
    assert "try again" in result.findtext(f"{{{SASL}}}text")

    async def let_in() -> bool:
        """Whether the right password gets in now; an attempt during the lockout counts as no failure."""
        raw = await tls_raw(server)
        result = await scram_login(raw, "alice", "right")
        raw.writer.close()
        assert result.tag == f"{{{SASL}}}success" or result.find(f"{{{SASL}}}temporary-auth-failure") is not None
        return result.tag == f"{{{SASL}}}success"

    await wait_for(let_in, timeout=5)  # the test config's lockout is 2 s


async def test_unknown_user_fails_like_a_wrong_password(server: Harness) -> None:
    raw = await tls_raw(server)
    result = await scram_login(raw, "nobody", "whatever")
    assert result.find(f"{{{SASL}}}not-authorized") is not None


async def test_an_unknown_users_salt_outlives_a_restart(server: Harness) -> None:
    """The salt made up for an account that does not exist must not change when the server restarts (or differ
    between the processes of a cluster) while real accounts' salts stay: the change would tell them apart."""

    async def salt_of(user: str) -> str:
        raw = await tls_raw(server)
        await raw.open()
        await raw.expect(f"{{{STREAMS}}}features")
        client = ScramClient("SCRAM-SHA-256", user, "whatever")
        first = base64.b64encode(client.first()).decode()
        await raw.send(f"<auth xmlns='{SASL}' mechanism='SCRAM-SHA-256'>{first}</auth>")
        challenge = base64.b64decode((await raw.next()).text).decode()
        raw.writer.close()
        return dict(part.split("=", 1) for part in challenge.split(","))["s"]

    before = await salt_of("nobody")
    await server.restart()
    assert await salt_of("nobody") == before


async def test_unknown_host(server: Harness) -> None:
    raw = await server.raw()
    await raw.open(to="elsewhere.example")
    assert stream_error_condition(await raw.closed()) == "host-unknown"


async def test_stanza_before_auth_is_a_stream_error(server: Harness) -> None:
    raw = await server.raw()
    await raw.open()
    await raw.expect(f"{{{STREAMS}}}features")
    await raw.send("<message to='bob@localhost'><body>hi</body></message>")
    assert stream_error_condition(await raw.closed()) == "not-authorized"


async def logged_in_raw(server: Harness, user: str = "mallory") -> RawClient:
    await server.add_user(user)
    raw = await tls_raw(server)
    result = await scram_login(raw, user, "secret")
    assert result.tag == f"{{{SASL}}}success"
    raw.parser.reset()
    await raw.open()
    await raw.expect(f"{{{STREAMS}}}features")
    await raw.send("<iq type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>")
    await raw.expect("{jabber:client}iq")
    return raw


@pytest.mark.parametrize(("payload", "condition"), [
    (b"<message><body>unclosed</message>", "not-well-formed"),
    (b"<!-- sneaky comment -->", "restricted-xml"),
    (b"<message><body>&xxe;</body></message>", "not-well-formed"),
    (b"<message><body>" + b"A" * 1_100_000 + b"</body></message>", "policy-violation"),
    (b"<foo xmlns='urn:unknown'/>", "unsupported-stanza-type"),
])
async def test_bad_input_kills_only_that_stream(server: Harness, payload: bytes, condition: str) -> None:
    await server.add_user("bob")
    bob = await server.client("bob@localhost", resource="desk")
    received = server.inbox(bob)
    raw = await logged_in_raw(server)
    await raw.send(payload)
    assert stream_error_condition(await raw.closed()) == condition
    # Everyone else is unaffected and a new login works.
    alice_jid = await server.add_user("alice")
    alice = await server.client(alice_jid)
    alice.send_message(mto="bob@localhost/desk", mbody="still here", mtype="chat")
    msg = await asyncio.wait_for(received.get(), 5)
    assert msg["body"] == "still here"
    assert await server.server.storage.accounts.exists("localhost", "mallory")


async def test_entity_bomb_in_header(server: Harness) -> None:
    raw = await server.raw()
    await raw.send(b"<?xml version='1.0'?><!DOCTYPE x [<!ENTITY a 'aaaaaaaaaaaaaaaa'>"
                   b"<!ENTITY b '&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;'>"
                   b"<!ENTITY c '&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;'>]>")
    await raw.open()
    assert stream_error_condition(await raw.closed()) == "restricted-xml"


async def test_iq_with_unknown_payload_gets_service_unavailable(server: Harness) -> None:
    raw = await logged_in_raw(server)
    await raw.send("<iq type='get' id='u1' to='localhost'><frobnicate xmlns='urn:example:nothing'/></iq>")
    iq = await raw.expect("{jabber:client}iq")
    assert iq.get("type") == "error" and iq.get("id") == "u1"
    assert iq.find("{jabber:client}error/{urn:ietf:params:xml:ns:xmpp-stanzas}service-unavailable") is not None


async def test_iq_without_child_is_bad_request(server: Harness) -> None:
    raw = await logged_in_raw(server)
    await raw.send("<iq type='get' id='u2' to='localhost'/>")
    iq = await raw.expect("{jabber:client}iq")
    assert iq.find("{jabber:client}error/{urn:ietf:params:xml:ns:xmpp-stanzas}bad-request") is not None


async def test_malformed_to_gets_jid_malformed(server: Harness) -> None:
    raw = await logged_in_raw(server)
    await raw.send("<message to='a@b@c/' id='m1' type='chat'><body>x</body></message>")
    msg = await raw.expect("{jabber:client}message")
    assert msg.find("{jabber:client}error/{urn:ietf:params:xml:ns:xmpp-stanzas}jid-malformed") is not None


async def test_spoofed_from_never_reaches_anyone(server: Harness) -> None:
    await server.add_user("bob")
    bob = await server.client("bob@localhost", resource="desk")
    received = server.inbox(bob)
    raw = await logged_in_raw(server)
    await raw.send("<message from='admin@localhost/x' to='bob@localhost/desk' type='chat'>"
                   "<body>trust me</body></message>")
    assert stream_error_condition(await raw.closed()) == "invalid-from"
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(received.get(), 0.5)


async def test_from_is_stamped_by_the_server(server: Harness) -> None:
    await server.add_user("bob")
    bob = await server.client("bob@localhost", resource="desk")
    received = server.inbox(bob)
    raw = await logged_in_raw(server)
    await raw.send("<message from='mallory@localhost' to='bob@localhost/desk' type='chat'><body>hi</body></message>")
    msg = await asyncio.wait_for(received.get(), 5)
    assert str(msg["from"]).startswith("mallory@localhost/")


async def test_resource_conflict_replaces_old_session(server: Harness) -> None:
    await server.add_user("alice")
    first = await server.client("alice@localhost", resource="same")
    gone = asyncio.get_running_loop().create_future()
    first.add_event_handler("disconnected", lambda _: gone.done() or gone.set_result(True))
    second = await server.client("alice@localhost", resource="same")
    await asyncio.wait_for(gone, 5)
    assert str(second.boundjid) == "alice@localhost/same"


async def test_graceful_shutdown_tells_clients(server: Harness) -> None:
    raw = await logged_in_raw(server)
    await server.server.stop()
    assert stream_error_condition(await raw.closed()) == "system-shutdown"
    await server.server.start()  # the fixture stops it again


@pytest.mark.parametrize("server", ["postgresql"], indirect=True)
async def test_login_and_chat_on_postgresql(server: Harness) -> None:
    await server.add_user("alice")
    await server.add_user("bob")
    bob = await server.client("bob@localhost", resource="r")
    received = server.inbox(bob)
    alice = await server.client("alice@localhost")
    alice.send_message(mto="bob@localhost/r", mbody="on postgres", mtype="chat")
    assert (await asyncio.wait_for(received.get(), 5))["body"] == "on postgres"


async def test_connection_limit_refuses_new_and_keeps_existing(server: Harness) -> None:
    await server.add_user("alice")
    await server.add_user("bob")
    bob = await server.client("bob@localhost", resource="r")
    received = server.inbox(bob)
    alice = await server.client("alice@localhost")
    server.server.max_connections = len(server.server.connections)
    refused = []
    for _ in range(5):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        refused.append(await asyncio.wait_for(reader.read(100), 5))
        writer.close()
    assert refused == [b""] * 5
    alice.send_message(mto="bob@localhost/r", mbody="over the limit", mtype="chat")
    assert (await asyncio.wait_for(received.get(), 5))["body"] == "over the limit"


async def test_scram_plus_with_tls_exporter(server: Harness) -> None:
    from server.sasl.channel_binding import EXPORTER_AVAILABLE, tls_exporter

    if not EXPORTER_AVAILABLE:
        pytest.fail("tls-exporter is expected to work on this Python/OpenSSL")
    await server.add_user("alice", "pencil")
    raw = await tls_raw(server)
    await raw.open()
    features = await raw.expect(f"{{{STREAMS}}}features")
    types = {cb.get("type") for cb in features.iter("{urn:xmpp:sasl-cb:0}channel-binding")}
    assert "tls-exporter" in types
    exporter = tls_exporter(raw.writer.get_extra_info("ssl_object"))
    client = ScramClient("SCRAM-SHA-256-PLUS", "alice", "pencil", cb_type="tls-exporter", cb_data=exporter,
                         plus_supported_by_server=True)
    await raw.send(f"<auth xmlns='{SASL}' mechanism='SCRAM-SHA-256-PLUS'>"
                   f"{base64.b64encode(client.first()).decode()}</auth>")
    challenge = await raw.expect(f"{{{SASL}}}challenge")
    await raw.send(f"<response xmlns='{SASL}'>"
                   f"{base64.b64encode(client.final(base64.b64decode(challenge.text))).decode()}</response>")
    success = await raw.expect(f"{{{SASL}}}success")
    client.verify(base64.b64decode(success.text))


@pytest.mark.parley_config(limits={"c2s_rate": 2000, "c2s_burst": 2000})
async def test_read_rate_is_limited_per_connection(server: Harness) -> None:
    """8 KB against a 2 KB/s budget cannot be processed in under about 3 seconds."""
    raw = await logged_in_raw(server)
    padding = "x" * 150
    pings = "".join(f"<iq type='get' id='p{i}' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>"
                    f"<message to='nobody@localhost' type='headline'><body>{padding}</body></message>"
                    for i in range(40))
    loop = asyncio.get_running_loop()
    start = loop.time()
    await raw.send(pings)
    for _ in range(40):
        await raw.expect("{jabber:client}iq", timeout=15)
    assert loop.time() - start > 2.5


@pytest.mark.parley_config(limits={"max_connections_per_ip": 3})
async def test_connections_per_address_are_capped(server: Harness) -> None:
    conns = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(3)]
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    assert await asyncio.wait_for(reader.read(100), 5) == b""
    for _, w in conns:
        w.close()
    writer.close()

    async def all_closed() -> bool:
        return not server.server.connections

    await wait_for(all_closed)
    raw = await server.raw()
    await raw.open()
    await raw.expect(f"{{{STREAMS}}}features")


async def test_an_account_with_sha1_keys_only_gets_sha256_keys_at_its_first_plain_login(server: Harness) -> None:
    """Accounts imported from ejabberd or Prosody carry SCRAM-SHA-1 keys only; the password completes them."""
    from server.sasl.scram import derive_credentials

    storage = server.server.storage
    await storage.accounts.create("localhost", "imported", [derive_credentials("old secret", "SHA-1", iterations=4096)])
    client = await server.client("imported@localhost", "old secret", sasl_mech="PLAIN")
    client.disconnect()
    account = await storage.accounts.get("localhost", "imported")
    assert sorted(account.credentials) == ["SHA-1", "SHA-256"]
    client = await server.client("imported@localhost", "old secret", sasl_mech="SCRAM-SHA-256")
    assert client.boundjid.bare == "imported@localhost"
    with pytest.raises(AssertionError, match="login failed"):
        await server.client("imported@localhost", "wrong", sasl_mech="PLAIN", timeout=5)
