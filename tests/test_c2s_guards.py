"""What the README promises of client connections, seen by raw clients over real sockets: whitespace
keepalives, the `conflict` stream error of a replaced session, and login throttling per address."""

from __future__ import annotations

import asyncio

import pytest

from server import server as server_module
from tests.conftest import Harness
from tests.test_c2s import SASL, logged_in_raw, scram_login, stream_error_condition, tls_raw
from tests.test_stream_management import bound


@pytest.fixture
def quick_keepalive(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keepalives after 0.3 s of silence, checked every 0.1 s; requested before `server`, which starts with them."""
    monkeypatch.setattr(server_module, "KEEPALIVE_INTERVAL", 0.3)
    monkeypatch.setattr(server_module, "SWEEP_INTERVAL", 0.1)


async def test_an_idle_stream_gets_a_single_space_between_stanzas(quick_keepalive: None, server: Harness) -> None:
    raw = await logged_in_raw(server)
    for _ in range(2):
        assert await asyncio.wait_for(raw.reader.read(100), 5) == b" "
    await raw.send("<iq type='get' id='p' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
    answer = await raw.expect("{jabber:client}iq")
    assert (answer.get("id"), answer.get("type")) == ("p", "result")  # the stream goes on after them


async def test_the_same_resource_again_ends_the_first_stream_with_conflict(server: Harness) -> None:
    first = await bound(server, "alice", "same")
    second = await bound(server, "alice", "same")
    assert stream_error_condition(await first.closed()) == "conflict"
    await second.send("<iq type='get' id='p' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
    answer = await second.expect("{jabber:client}iq")
    assert answer.get("type") == "result"


async def test_wrong_passwords_for_several_accounts_throttle_the_address(server: Harness) -> None:
    """The test config locks out after 3 failures: one wrong password each for three accounts is enough,
    and then a fourth account is refused from that address even with its right password."""
    for name in ("alice", "bob", "carol", "dave"):
        await server.add_user(name, "right")
    for name in ("alice", "bob", "carol"):
        result = await scram_login(await tls_raw(server), name, "wrong")
        assert result.find(f"{{{SASL}}}not-authorized") is not None
    result = await scram_login(await tls_raw(server), "dave", "right")
    assert result.find(f"{{{SASL}}}temporary-auth-failure") is not None
    assert "try again" in result.findtext(f"{{{SASL}}}text")
