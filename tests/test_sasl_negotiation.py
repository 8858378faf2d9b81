"""SASL negotiation refusals are not password guesses: clients walk down their mechanism list on one stream.

Older slixmpp (poezio 0.14) under TLS 1.3 tries SCRAM-*-PLUS with tls-unique, then SCRAM with the 'y' flag
while -PLUS is offered; both are rightly refused, and neither may cost the client its stream.
"""

from __future__ import annotations

import asyncio
import base64

from slixmpp import ClientXMPP

from server.sasl.scram import ScramClient
from tests.conftest import Harness, RawClient, insecure_context
from tests.test_c2s import SASL, STREAMS, scram_login, stream_error_condition, tls_raw


async def ready_stream(server: Harness) -> RawClient:
    """A raw stream over TLS that has been offered its SASL mechanisms."""
    raw = await tls_raw(server)
    await raw.open()
    await raw.expect(f"{{{STREAMS}}}features")
    return raw


async def auth(raw: RawClient, mechanism: str, initial: bytes) -> object:
    """Send <auth/>; return what the server answers (challenge, success or failure)."""
    await raw.send(f"<auth xmlns='{SASL}' mechanism='{mechanism}'>{base64.b64encode(initial).decode()}</auth>")
    return await raw.next()


def scram_first(gs2_flag: str) -> bytes:
    """client-first-message with a chosen gs2 flag, as a client that got it wrong would send it."""
    return f"{gs2_flag},,n=alice,r=fyko+d2lbbFgONRv9qkxdawL".encode()


def plain(user: str, password: str) -> bytes:
    return f"\0{user}\0{password}".encode()


async def refused(raw: RawClient, mechanism: str, initial: bytes) -> str:
    """The condition of the <failure/> the server answers with."""
    answer = await auth(raw, mechanism, initial)
    assert answer.tag == f"{{{SASL}}}failure", answer.tag
    return answer[0].tag.split("}")[1]


async def negotiation_refusals(raw: RawClient) -> list[str]:
    """What older slixmpp sends under TLS 1.3, and a mechanism the server lacks."""
    return [
        await refused(raw, "SCRAM-SHA-256-PLUS", scram_first("p=tls-unique")),
        await refused(raw, "SCRAM-SHA-1-PLUS", scram_first("p=tls-unique")),
        await refused(raw, "SCRAM-SHA-256", scram_first("y")),
        await refused(raw, "SCRAM-SHA-1", scram_first("y")),
        await refused(raw, "DIGEST-MD5", b""),
    ]


async def test_stock_slixmpp_logs_in_on_its_first_connection(server: Harness) -> None:
    await server.add_user("alice")
    client = ClientXMPP("alice@localhost", "secret")  # no mechanism or TLS restrictions, as poezio
    client.ssl_context = insecure_context()  # the test certificate is self-signed
    events: list[str] = []
    for name in ("connected", "disconnected", "failed_auth", "stream_error"):
        client.add_event_handler(name, lambda _, name=name: events.append(name))
    started = asyncio.get_running_loop().create_future()
    client.add_event_handler("session_start", lambda _: started.done() or started.set_result(True))
    client.connect("127.0.0.1", server.port)
    try:
        await asyncio.wait_for(started, 15)
    finally:
        client.abort()
    assert events[0] == "connected" and "disconnected" not in events and "stream_error" not in events, events


async def test_the_old_slixmpp_sequence_gets_in_on_one_stream(server: Harness) -> None:
    await server.add_user("alice")
    raw = await ready_stream(server)
    assert await negotiation_refusals(raw) == [
        "malformed-request", "malformed-request", "not-authorized", "not-authorized", "invalid-mechanism"]
    success = await auth(raw, "PLAIN", plain("alice", "secret"))
    assert success.tag == f"{{{SASL}}}success"


async def test_wrong_passwords_still_close_the_stream_and_are_throttled(server: Harness) -> None:
    await server.add_user("alice")
    raw = await ready_stream(server)
    for _ in range(2):
        await negotiation_refusals(raw)
        assert await refused(raw, "PLAIN", plain("alice", "wrong")) == "not-authorized"
    await negotiation_refusals(raw)  # two guesses so far, the stream stays
    assert await refused(raw, "PLAIN", plain("alice", "wrong")) == "not-authorized"
    assert stream_error_condition(await raw.closed()) == "policy-violation"
    # Those three guesses count for the throttle too: the right password is refused for now.
    result = await scram_login(await tls_raw(server), "alice", "secret")
    assert result.find(f"{{{SASL}}}temporary-auth-failure") is not None


async def test_a_wrong_scram_proof_counts_as_a_guess(server: Harness) -> None:
    await server.add_user("alice")
    raw = await ready_stream(server)
    for attempt in range(3):
        client = ScramClient("SCRAM-SHA-256", "alice", "wrong", plus_supported_by_server=True)
        challenge = await auth(raw, "SCRAM-SHA-256", client.first())
        final = base64.b64encode(client.final(base64.b64decode(challenge.text))).decode()
        await raw.send(f"<response xmlns='{SASL}'>{final}</response>")
        assert (await raw.next()).tag == f"{{{SASL}}}failure", attempt
    assert stream_error_condition(await raw.closed()) == "policy-violation"
