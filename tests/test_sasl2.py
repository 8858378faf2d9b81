"""SASL2 (XEP-0388), Bind2 (XEP-0386), FAST (XEP-0484) and SCRAM downgrade protection (XEP-0474) on raw
streams, following the XEPs' examples: one <authenticate/> takes a device to a bound session, a FAST token
does it in one round trip, and what a token is refused for."""

from __future__ import annotations

import base64
import hashlib
import uuid
from datetime import UTC, datetime, timedelta
from xml.etree.ElementTree import Element

import pytest
from slixmpp import ClientXMPP
from sqlalchemy import update

from server.jid import JID
from server.sasl.channel_binding import tls_exporter
from server.sasl.ht import initiator_proof, responder_proof
from server.sasl.scram import ScramClient, derive_credentials, downgrade_hash
from server.storage.schema import fast_tokens
from tests.conftest import Harness, RawClient
from tests.test_adhoc import PLUGINS, admin_client, result_values, submit
from tests.test_c2s import SASL, STREAMS, stream_error_condition, tls_raw
from tests.test_parleyctl import ok
from tests.test_stream_management import cut, detached

SASL2 = "urn:xmpp:sasl:2"
BIND2 = "urn:xmpp:bind:0"
FAST = "urn:xmpp:fast:0"
SM = "urn:xmpp:sm:3"
CARBONS = "urn:xmpp:carbons:2"
CSI = "urn:xmpp:csi:0"
SASL_CB = "urn:xmpp:sasl-cb:0"
AGENT = "d4565fa7-4d72-4749-b3d3-740edbf87770"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def offered(server: Harness) -> tuple[RawClient, Element]:
    """A TLS stream and its pre-authentication features."""
    raw = await tls_raw(server)
    await raw.open()
    return raw, await raw.expect(f"{{{STREAMS}}}features")


def agent_xml(agent: str | None = AGENT) -> str:
    if agent is None:
        return ""
    return f"<user-agent id='{agent}'><software>Test</software><device>Phone</device></user-agent>"


async def authenticate(raw: RawClient, mechanism: str, initial: bytes, inner: str = "",
                       agent: str | None = AGENT) -> Element:
    await raw.send(f"<authenticate xmlns='{SASL2}' mechanism='{mechanism}'>"
                   f"<initial-response>{b64(initial)}</initial-response>{agent_xml(agent)}{inner}</authenticate>")
    return await raw.next()


async def scram2(raw: RawClient, inner: str = "", user: str = "alice", password: str = "secret",
                 agent: str | None = AGENT, mechanism: str = "SCRAM-SHA-256") -> tuple[Element, bytes]:
    """A SASL2 SCRAM login; the final answer and the server-first-message."""
    client = ScramClient(mechanism, user, password, cb_type="tls-exporter", plus_supported_by_server=True)
    challenge = await authenticate(raw, mechanism, client.first(), inner, agent)
    assert challenge.tag == f"{{{SASL2}}}challenge", challenge.tag
    server_first = base64.b64decode(challenge.text)
    await raw.send(f"<response xmlns='{SASL2}'>{b64(client.final(server_first))}</response>")
    answer = await raw.next()
    if answer.tag == f"{{{SASL2}}}success":
        client.verify(base64.b64decode(answer.findtext(f"{{{SASL2}}}additional-data")))
    return answer, server_first


def bind_xml(*inline: str, tag: str = "Test") -> str:
    return f"<bind xmlns='{BIND2}'><tag>{tag}</tag>{''.join(inline)}</bind>"


def request_token(mechanism: str = "HT-SHA-256-NONE") -> str:
    return f"<request-token xmlns='{FAST}' mechanism='{mechanism}'/>"


def token_of(success: Element) -> str:
    token = success.find(f"{{{FAST}}}token")
    assert token is not None, "no FAST token in the success"
    expiry = datetime.strptime(token.get("expiry"), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert expiry > datetime.now(UTC)
    return token.get("token")


def cb_data(raw: RawClient, mechanism: str) -> bytes:
    ssl_object = raw.writer.get_extra_info("ssl_object")
    if mechanism.endswith("-ENDP"):
        return hashlib.sha256(ssl_object.getpeercert(binary_form=True)).digest()
    if mechanism.endswith("-EXPR"):
        return tls_exporter(ssl_object)
    return b""


async def fast_login(raw: RawClient, token: str, count: int, inner: str = "", mechanism: str = "HT-SHA-256-NONE",
                     binding: bytes | None = None, user: str = "alice", agent: str = AGENT) -> Element:
    data = cb_data(raw, mechanism) if binding is None else binding
    initial = user.encode() + b"\0" + initiator_proof(token, data)
    answer = await authenticate(raw, mechanism, initial, f"<fast xmlns='{FAST}' count='{count}'/>{inner}", agent)
    if answer.tag == f"{{{SASL2}}}success":
        proof = base64.b64decode(answer.findtext(f"{{{SASL2}}}additional-data"))
        assert proof == responder_proof(token, data), "the server did not prove it knows the token"
    return answer


def condition(failure: Element) -> str:
    assert failure.tag == f"{{{SASL2}}}failure", failure.tag
    return failure[0].tag.split("}")[1]


async def refused(server: Harness, token: str) -> bool:
    """Whether a new stream's FAST login with `token` is refused as not authorized."""
    raw, _ = await offered(server)
    return condition(await fast_login(raw, token, 1)) == "not-authorized"


async def expire_tokens(server: Harness, after: timedelta) -> None:
    """Every stored token expires `after` from now (negative: it has expired)."""
    async with server.server.storage.engine.begin() as conn:
        await conn.execute(update(fast_tokens).values(expires=datetime.now(UTC) + after))


async def issued_token(server: Harness, mechanism: str = "HT-SHA-256-NONE") -> str:
    raw, _ = await offered(server)
    success, _ = await scram2(raw, request_token(mechanism))
    assert success.tag == f"{{{SASL2}}}success"
    raw.writer.close()
    return token_of(success)


# --- offering ------------------------------------------------------------------------------------


async def test_sasl2_is_offered_with_bind2_fast_and_sm_over_tls_only(server: Harness) -> None:
    plain = await server.raw()
    await plain.open()
    features = await plain.expect(f"{{{STREAMS}}}features")
    assert features.find(f"{{{SASL2}}}authentication") is None
    _, features = await offered(server)
    auth = features.find(f"{{{SASL2}}}authentication")
    assert [m.text for m in auth.iter(f"{{{SASL2}}}mechanism")] == \
        [m.text for m in features.iter(f"{{{SASL}}}mechanism")]
    inline = auth.find(f"{{{SASL2}}}inline")
    assert {f.get("var") for f in inline.iter(f"{{{BIND2}}}feature")} >= {SM, CARBONS, CSI}
    assert inline.find(f"{{{SM}}}sm") is not None
    fast = {m.text for m in inline.iter(f"{{{FAST}}}mechanism")}
    assert fast >= {"HT-SHA-256-NONE", "HT-SHA-256-ENDP"}


async def test_authenticate_before_tls_is_refused(server: Harness) -> None:
    await server.add_user("alice")
    raw = await server.raw()
    await raw.open()
    await raw.expect(f"{{{STREAMS}}}features")
    answer = await authenticate(raw, "PLAIN", b"\0alice\0secret")
    assert condition(answer) == "encryption-required"


# --- SCRAM with inline Bind2 -----------------------------------------------------------------------


async def test_scram_with_inline_bind2_carbons_csi_and_sm_in_one_exchange(server: Harness) -> None:
    await server.add_user("alice")
    raw, _ = await offered(server)
    inline = (f"<enable xmlns='{CARBONS}'/>", f"<inactive xmlns='{CSI}'/>", f"<enable xmlns='{SM}' resume='true'/>")
    success, _ = await scram2(raw, bind_xml(*inline))
    assert success.tag == f"{{{SASL2}}}success"
    jid = JID.parse(success.findtext(f"{{{SASL2}}}authorization-identifier"))
    assert jid.bare == JID.parse("alice@localhost") and jid.resource.startswith("Test/")
    enabled = success.find(f"{{{BIND2}}}bound/{{{SM}}}enabled")
    assert enabled is not None and enabled.get("resume") == "true" and enabled.get("id")
    session = server.server.sessions.get(jid)
    assert session.data.get("carbons") is True and "csi" in session.data
    # No stream restart: the session takes stanzas at once.
    await raw.send("<iq type='get' id='p1'><ping xmlns='urn:xmpp:ping'/></iq>")
    result = await raw.expect("{jabber:client}iq")
    assert result.get("id") == "p1" and result.get("type") == "result"


async def test_the_same_device_gets_the_same_resource_and_others_another(server: Harness) -> None:
    await server.add_user("alice")
    resources = []
    for agent in (AGENT, AGENT, str(uuid.uuid4())):
        raw, _ = await offered(server)
        success, _ = await scram2(raw, bind_xml(), agent=agent)
        resources.append(JID.parse(success.findtext(f"{{{SASL2}}}authorization-identifier")).resource)
        raw.writer.close()
    assert resources[0] == resources[1] != resources[2]
    assert AGENT not in resources[0]


async def test_plain_over_sasl2_without_bind_gives_the_bare_jid(server: Harness) -> None:
    await server.add_user("alice")
    raw, _ = await offered(server)
    success = await authenticate(raw, "PLAIN", b"\0alice\0secret")
    assert success.findtext(f"{{{SASL2}}}authorization-identifier") == "alice@localhost"


async def test_wrong_password_gets_a_sasl2_failure_and_the_stream_goes_on(server: Harness) -> None:
    await server.add_user("alice")
    raw, _ = await offered(server)
    failure, _ = await scram2(raw, password="wrong")
    assert condition(failure) == "not-authorized"
    success, _ = await scram2(raw)
    assert success.tag == f"{{{SASL2}}}success"


async def test_an_over_long_user_agent_id_is_refused(server: Harness) -> None:
    await server.add_user("alice")
    raw, _ = await offered(server)
    answer = await authenticate(raw, "PLAIN", b"\0alice\0secret", agent="a" * 65)
    assert condition(answer) == "malformed-request"
    answer = await authenticate(raw, "PLAIN", b"\0alice\0secret", agent="has space")
    assert condition(answer) == "malformed-request"
    assert (await authenticate(raw, "PLAIN", b"\0alice\0secret")).tag == f"{{{SASL2}}}success"


async def test_sasl2_abort_and_a_response_out_of_turn(server: Harness) -> None:
    raw, _ = await offered(server)
    await raw.send(f"<response xmlns='{SASL2}'>AAAA</response>")
    assert condition(await raw.next()) == "malformed-request"
    await raw.send(f"<abort xmlns='{SASL2}'/>")
    assert condition(await raw.next()) == "aborted"


# --- XEP-0474 ---------------------------------------------------------------------------------------


def offered_lists(features: Element, namespace: str = SASL) -> tuple[list[str], list[str]]:
    mechanisms = [m.text for m in features.iter(f"{{{namespace}}}mechanism")]
    bindings = [cb.get("type") for cb in features.iter(f"{{{SASL_CB}}}channel-binding")]
    return mechanisms, bindings


def ssdp(algorithm: str, mechanisms: list[str], bindings: list[str]) -> str:
    """XEP-0474 section 6.1, written out from the XEP: mechanisms sorted, joined by 0x1E; 0x1F; bindings."""
    text = "\x1e".join(sorted(mechanisms)) + "\x1f" + "\x1e".join(sorted(bindings))
    return b64(hashlib.new(algorithm, text.encode("ascii")).digest())


def h_attribute(server_first: bytes) -> str:
    attrs = dict(part.split("=", 1) for part in server_first.decode().split(","))
    return attrs["h"]


async def test_server_first_message_hashes_what_was_offered_in_sasl2(server: Harness) -> None:
    await server.add_user("alice")
    raw, features = await offered(server)
    mechanisms, _ = offered_lists(features.find(f"{{{SASL2}}}authentication"), SASL2)
    _, bindings = offered_lists(features)
    assert "tls-server-end-point" in bindings and "SCRAM-SHA-256-PLUS" in mechanisms
    for mechanism, algorithm in (("SCRAM-SHA-256", "sha256"), ("SCRAM-SHA-1", "sha1")):
        failure, server_first = await scram2(raw, mechanism=mechanism, password="wrong")
        assert condition(failure) == "not-authorized"
        assert h_attribute(server_first) == ssdp(algorithm, mechanisms, bindings)
        # What a man in the middle stripped changes the hash the client computes.
        stripped = [m for m in mechanisms if "PLUS" not in m]
        assert h_attribute(server_first) != ssdp(algorithm, stripped, bindings)
        assert h_attribute(server_first) != ssdp(algorithm, mechanisms, ["tls-server-end-point"])


async def legacy_challenge(server: Harness) -> tuple[bytes, Element]:
    await server.add_user("alice")
    raw, features = await offered(server)
    client = ScramClient("SCRAM-SHA-256", "alice", "secret", cb_type="tls-exporter", plus_supported_by_server=True)
    await raw.send(f"<auth xmlns='{SASL}' mechanism='SCRAM-SHA-256'>{b64(client.first())}</auth>")
    challenge = await raw.expect(f"{{{SASL}}}challenge")
    return base64.b64decode(challenge.text), features


@pytest.mark.parley_config(scram_downgrade_protection=True)
async def test_server_first_message_hashes_what_was_offered_in_legacy_sasl(server: Harness) -> None:
    server_first, features = await legacy_challenge(server)
    assert h_attribute(server_first) == ssdp("sha256", *offered_lists(features))


async def test_legacy_sasl_leaves_the_hash_out_unless_configured(server: Harness) -> None:
    """Strophe.js before 2.0 fails SCRAM on any attribute it does not know (Converse.js logs 'incorrect
    nonce'): RFC 5802's r, s and i only, as Prosody and ejabberd's defaults of their time sent."""
    server_first, _ = await legacy_challenge(server)
    assert [part.split("=", 1)[0] for part in server_first.decode().split(",")] == ["r", "s", "i"]


def test_without_channel_bindings_the_hash_covers_the_mechanisms_only() -> None:
    assert downgrade_hash("SHA-256", ["SCRAM-SHA-256", "PLAIN"], []) == \
        b64(hashlib.sha256(b"PLAIN\x1eSCRAM-SHA-256").digest())


# --- FAST ---------------------------------------------------------------------------------------------


async def test_a_fast_token_logs_in_and_binds_in_one_round_trip(server: Harness) -> None:
    await server.add_user("alice")
    token = await issued_token(server)
    raw, _ = await offered(server)
    success = await fast_login(raw, token, 1, bind_xml())
    assert success.tag == f"{{{SASL2}}}success"  # no challenge: one round trip
    jid = success.findtext(f"{{{SASL2}}}authorization-identifier")
    assert JID.parse(jid).resource.startswith("Test/")
    assert success.find(f"{{{BIND2}}}bound") is not None


async def test_a_token_is_stored_only_as_its_seed(server: Harness) -> None:
    await server.add_user("alice")
    token = await issued_token(server)
    (stored,) = await server.server.storage.fast.of_device("localhost", "alice", AGENT)
    assert token.encode() not in stored.seed and base64.urlsafe_b64encode(stored.seed).decode() not in token


@pytest.mark.parametrize("server", ["sqlite", "postgresql"], indirect=True)
async def test_a_reused_count_and_a_forged_token_are_refused(server: Harness) -> None:
    await server.add_user("alice")
    token = await issued_token(server)
    raw, _ = await offered(server)
    assert (await fast_login(raw, token, 5)).tag == f"{{{SASL2}}}success"
    raw, _ = await offered(server)
    assert condition(await fast_login(raw, token, 5)) == "not-authorized"  # replayed
    assert condition(await fast_login(raw, token[:-2] + "AA", 6)) == "not-authorized"  # forged
    assert condition(await fast_login(raw, token, 6, user="bob")) == "not-authorized"  # another account
    # Three wrong credentials end the stream, as wrong passwords do.
    assert stream_error_condition(await raw.closed()) == "policy-violation"


async def test_an_expired_token_is_refused(server: Harness) -> None:
    await server.add_user("alice")
    token = await issued_token(server)
    await expire_tokens(server, timedelta(seconds=-1))
    raw, _ = await offered(server)
    assert condition(await fast_login(raw, token, 1)) == "credentials-expired"


@pytest.mark.parametrize("server", ["sqlite", "postgresql"], indirect=True)
async def test_rotation_retires_the_old_token_once_the_new_one_is_used(server: Harness) -> None:
    await server.add_user("alice")
    old = await issued_token(server)
    raw, _ = await offered(server)
    success = await fast_login(raw, old, 1, request_token())
    new = token_of(success)
    assert new != old
    raw, _ = await offered(server)
    assert (await fast_login(raw, old, 2)).tag == f"{{{SASL2}}}success"  # kept until the new one is used
    raw, _ = await offered(server)
    assert (await fast_login(raw, new, 1)).tag == f"{{{SASL2}}}success"
    raw, _ = await offered(server)
    assert condition(await fast_login(raw, old, 3)) == "not-authorized"


async def test_a_token_near_its_expiry_is_replaced_unasked(server: Harness) -> None:
    await server.add_user("alice")
    old = await issued_token(server)
    await expire_tokens(server, timedelta(hours=1))
    raw, _ = await offered(server)
    assert token_of(await fast_login(raw, old, 1)) != old


async def test_a_password_change_ends_the_tokens(server: Harness) -> None:
    await server.add_user("alice")
    token = await issued_token(server)
    await ok(server, "change_password", "alice", "localhost", "new")  # as an admin would, with parleyctl
    assert await refused(server, token)


async def test_invalidate_ends_the_token_with_its_last_login(server: Harness) -> None:
    await server.add_user("alice")
    token = await issued_token(server)
    raw, _ = await offered(server)
    initial = b"alice\0" + initiator_proof(token, b"")
    answer = await authenticate(raw, "HT-SHA-256-NONE", initial, f"<fast xmlns='{FAST}' count='1' invalidate='true'/>")
    assert answer.tag == f"{{{SASL2}}}success"
    raw, _ = await offered(server)
    assert condition(await fast_login(raw, token, 2)) == "not-authorized"


async def test_a_token_works_only_over_its_channel_binding(server: Harness) -> None:
    await server.add_user("alice")
    token = await issued_token(server, "HT-SHA-256-ENDP")
    raw, _ = await offered(server)
    assert condition(await fast_login(raw, token, 1, mechanism="HT-SHA-256-NONE")) == "not-authorized"
    assert condition(await fast_login(raw, token, 2, mechanism="HT-SHA-256-ENDP",
                                      binding=b"\0" * 32)) == "not-authorized"
    assert (await fast_login(raw, token, 3, mechanism="HT-SHA-256-ENDP")).tag == f"{{{SASL2}}}success"


async def test_a_token_is_the_device_s_own(server: Harness) -> None:
    await server.add_user("alice")
    token = await issued_token(server)
    raw, _ = await offered(server)
    assert condition(await fast_login(raw, token, 1, agent=str(uuid.uuid4()))) == "not-authorized"


# --- stream management inline ------------------------------------------------------------------------


async def test_sm_resumes_inline_and_replays_after_the_success(server: Harness) -> None:
    await server.add_user("alice")
    await server.add_user("bob")
    raw, _ = await offered(server)
    token_request = request_token()
    success, _ = await scram2(raw, bind_xml(f"<enable xmlns='{SM}' resume='true'/>") + token_request)
    token = token_of(success)
    jid = success.findtext(f"{{{SASL2}}}authorization-identifier")
    previd = success.find(f"{{{BIND2}}}bound/{{{SM}}}enabled").get("id")
    cut(raw)
    await detached(server, jid)
    bob = await server.client("bob@localhost")
    bob.send_message(mto=jid, mbody="while you were away", mtype="chat")
    raw, _ = await offered(server)
    success = await fast_login(raw, token, 1, f"<resume xmlns='{SM}' previd='{previd}' h='0'/>" + bind_xml())
    assert success.tag == f"{{{SASL2}}}success"
    assert success.find(f"{{{SM}}}resumed") is not None and success.find(f"{{{BIND2}}}bound") is None
    assert success.findtext(f"{{{SASL2}}}authorization-identifier") == jid
    message = await raw.expect("{jabber:client}message")
    assert message.findtext("{jabber:client}body") == "while you were away"


async def test_a_failed_inline_resumption_binds_a_new_session(server: Harness) -> None:
    await server.add_user("alice")
    raw, _ = await offered(server)
    success, _ = await scram2(raw, f"<resume xmlns='{SM}' previd='gone' h='0'/>" + bind_xml())
    assert success.find(f"{{{SM}}}failed") is not None
    assert success.find(f"{{{BIND2}}}bound") is not None


# --- revoking ---------------------------------------------------------------------------------------------


async def revoke(client: ClientXMPP, name: str, **values: str) -> str:
    """Run a FAST command (XEP-0050, in the FAST namespace) with its form submitted at once; tokens revoked."""
    iq = await client.plugin["xep_0050"].send_command("localhost", f"{FAST}#{name}", action="complete",
                                                       payload=submit(client, **values), timeout=5)
    return result_values(iq["command"])["revoked"]


async def test_an_admin_revokes_a_device_s_tokens_by_ad_hoc_command(server: Harness) -> None:
    await server.add_user("alice")
    token = await issued_token(server)
    admin = await admin_client(server)
    assert await revoke(admin, "revoke-fast-tokens", accountjid="alice@localhost", device=AGENT) == "1"
    assert await refused(server, token)


async def test_a_user_revokes_its_own_tokens(server: Harness) -> None:
    await server.add_user("alice")
    token = await issued_token(server)
    alice = await server.client("alice@localhost", plugins=PLUGINS)
    assert await revoke(alice, "revoke-my-fast-tokens") == "1"
    assert await refused(server, token)


async def test_a_login_without_a_count_is_taken_and_a_token_needs_fast_and_a_device(server: Harness) -> None:
    """The count is for TLS 0-RTT (XEP-0484 3.4), which is not offered: a login may leave it out."""
    await server.add_user("alice")
    token = await issued_token(server)
    raw, _ = await offered(server)
    initial = b"alice\0" + initiator_proof(token, b"")
    assert condition(await authenticate(raw, "HT-SHA-256-NONE", initial)) == "malformed-request"  # no <fast/>
    fast = f"<fast xmlns='{FAST}'/>"
    assert condition(await authenticate(raw, "HT-SHA-256-NONE", initial, fast, agent=None)) == "malformed-request"
    assert (await authenticate(raw, "HT-SHA-256-NONE", initial, fast)).tag == f"{{{SASL2}}}success"


# --- XEP-0480 ---------------------------------------------------------------------------------------------

UPGRADE = "urn:xmpp:sasl:upgrade:0"
SCRAM_UPGRADE = "urn:xmpp:scram-upgrade:0"
ASK_UPGRADE = f"<upgrade xmlns='{UPGRADE}'>UPGR-SCRAM-SHA-256</upgrade>"


async def sha1_only(server: Harness) -> None:
    """alice as imported from a server that kept SHA-1 keys only."""
    await server.add_user("alice")
    await server.server.storage.accounts.set_credentials("localhost", "alice", [derive_credentials("secret", "SHA-1")])


async def test_scram_upgrade_task_gives_a_sha1_account_sha256_keys(server: Harness) -> None:
    await sha1_only(server)
    raw, features = await offered(server)
    assert features.findtext(f"{{{SASL2}}}authentication/{{{UPGRADE}}}upgrade") == "UPGR-SCRAM-SHA-256"
    client = ScramClient("SCRAM-SHA-1", "alice", "secret", cb_type="tls-exporter", plus_supported_by_server=True)
    challenge = await authenticate(raw, "SCRAM-SHA-1", client.first(), ASK_UPGRADE + bind_xml())
    await raw.send(f"<response xmlns='{SASL2}'>{b64(client.final(base64.b64decode(challenge.text)))}</response>")
    proceed = await raw.next()
    assert proceed.tag == f"{{{SASL2}}}continue"
    client.verify(base64.b64decode(proceed.findtext(f"{{{SASL2}}}additional-data")))
    assert [t.text for t in proceed.iter(f"{{{SASL2}}}task")] == ["UPGR-SCRAM-SHA-256"]
    assert server.server.sessions.of(JID.parse("alice@localhost")) == []  # not yet authenticated
    await raw.send(f"<next xmlns='{SASL2}' task='UPGR-SCRAM-SHA-256'/>")
    data = await raw.next()
    salt_el = data.find(f"{{{SCRAM_UPGRADE}}}salt")
    salt, iterations = base64.b64decode(salt_el.text), int(salt_el.get("iterations"))
    salted = hashlib.pbkdf2_hmac("sha256", b"secret", salt, iterations)
    await raw.send(f"<task-data xmlns='{SASL2}'><hash xmlns='{SCRAM_UPGRADE}'>{b64(salted)}</hash></task-data>")
    success = await raw.next()
    assert success.tag == f"{{{SASL2}}}success" and success.find(f"{{{BIND2}}}bound") is not None
    account = await server.server.storage.accounts.get("localhost", "alice")
    assert set(account.credentials) == {"SHA-1", "SHA-256"}
    raw, _ = await offered(server)
    success, _ = await scram2(raw, mechanism="SCRAM-SHA-256")  # the new keys work
    assert success.tag == f"{{{SASL2}}}success"


async def test_no_upgrade_when_not_asked_or_not_needed(server: Harness) -> None:
    await sha1_only(server)
    raw, _ = await offered(server)
    success, _ = await scram2(raw, mechanism="SCRAM-SHA-1")
    assert success.tag == f"{{{SASL2}}}success"
    assert set((await server.server.storage.accounts.get("localhost", "alice")).credentials) == {"SHA-1"}
    await server.add_user("bob")
    raw, _ = await offered(server)
    success, _ = await scram2(raw, ASK_UPGRADE, user="bob", mechanism="SCRAM-SHA-1")
    assert success.tag == f"{{{SASL2}}}success"  # bob has SHA-256 keys already: no task


async def test_a_bad_upgrade_hash_fails_and_a_task_out_of_turn_is_refused(server: Harness) -> None:
    await sha1_only(server)
    raw, _ = await offered(server)
    await raw.send(f"<next xmlns='{SASL2}' task='UPGR-SCRAM-SHA-256'/>")
    assert condition(await raw.next()) == "malformed-request"
    client = ScramClient("SCRAM-SHA-1", "alice", "secret")
    challenge = await authenticate(raw, "SCRAM-SHA-1", client.first(), ASK_UPGRADE)
    await raw.send(f"<response xmlns='{SASL2}'>{b64(client.final(base64.b64decode(challenge.text)))}</response>")
    assert (await raw.next()).tag == f"{{{SASL2}}}continue"
    await raw.send(f"<next xmlns='{SASL2}' task='UPGR-SCRAM-SHA-256'/>")
    await raw.next()
    await raw.send(f"<task-data xmlns='{SASL2}'><hash xmlns='{SCRAM_UPGRADE}'>{b64(b'short')}</hash></task-data>")
    assert condition(await raw.next()) == "malformed-request"
    assert set((await server.server.storage.accounts.get("localhost", "alice")).credentials) == {"SHA-1"}


async def test_parleyctl_revokes_an_account_s_tokens(server: Harness) -> None:
    await server.add_user("alice")
    token = await issued_token(server)
    assert await ok(server, "revoke_fast_tokens", "alice", "localhost") == ["1"]
    assert await refused(server, token)
