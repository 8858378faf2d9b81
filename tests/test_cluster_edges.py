"""Federation, components and HTTP on every member of a cluster: `parley serve --workers 2` subprocesses (real
Redis under a prefix of their own), real Prosody and ejabberd, slixmpp clients and components.

The kernel spreads the connections to a shared port over the workers (SO_REUSEPORT), so which worker holds a
server-to-server stream or serves an HTTP request is chance: the tests put users on both workers, so that
whichever worker holds a link, one of them is on the other, and repeat HTTP requests on new connections so
that both workers serve some.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from slixmpp import ClientXMPP

from s2s.dialback import make_key
from s2s.manager import DIALBACK_STORE
from server.component import handshake_digest
from server.storage import open_storage
from tests import test_s2s_interop
from tests.browser_support import ws_client
from tests.conftest import PG_URL, drop_pg_schema, free_port, make_pg_schema
from tests.s2s_peers import PARLEY, Peer
from tests.s2s_support import Inbox, RawPeer, TestCA, free_port_on, online
from tests.test_bosh import Bosh, stanzas
from tests.test_c2s import stream_error_condition
from tests.test_cluster import REDIS_URL, Workers, redis_or_skip, run_workers
from tests.test_component import app_component, condition_of, raw_component, received
from tests.test_http_api import TOKEN
from tests.test_offline import collect
from tests.test_service_admin import complete
from tests.test_websocket import logged_in

REPO = Path(__file__).resolve().parent.parent
COMPONENT_DOMAIN, SECRET = "push.localhost", "component-secret"
# The peers of tests/test_s2s_interop.py, started once for this module.
ca, prosody, ejabberd, peer, clients = (test_s2s_interop.ca, test_s2s_interop.prosody, test_s2s_interop.ejabberd,
                                        test_s2s_interop.peer, test_s2s_interop.clients)


@contextlib.asynccontextmanager
async def serve(tmp_path: Path, domain: str, extra: str = "", host: str = "", *, node: str | None = None,
                workers: int = 2, url: str | None = None, prefix: str | None = None) -> AsyncIterator[Workers]:
    """`parley serve` with `workers` workers for `domain` (its table given `host`), a c2s listener on 127.0.0.1
    and the `extra` configuration, as `node` of the cluster under `prefix` when given; stopped afterwards, and
    unless it shares the prefix, its Redis keys checked gone."""
    redis = await redis_or_skip()
    own_prefix = prefix is None
    prefix = prefix or f"parley-test-{uuid.uuid4().hex[:12]}"
    url = url or f"sqlite+aiosqlite:///{tmp_path}/parley.db"
    port = free_port()
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = tmp_path / "parley.toml"
    config.write_text(f"""\
data_dir = "{tmp_path}"
[storage]
url = "{url}"
[limits]
unauthenticated_timeout = 15.0
[cluster]
workers = {workers}
redis_url = "{REDIS_URL}"
prefix = "{prefix}"
[[listeners]]
type = "c2s"
address = "127.0.0.1"
port = {port}
{extra}
[hosts."{domain}"]
{host}
""")
    storage = await open_storage(url)
    command = [sys.executable, "-m", "parley", "serve", "--config", str(config)] + (["--node", node] if node else [])

    async def started(_: Workers) -> bool:
        return b"is running" in (tmp_path / "server.log").read_bytes()

    async with run_workers(command, tmp_path, storage, port, redis, prefix, started, own_prefix) as harness:
        yield harness


async def test_processes_starting_together_on_a_new_database_share_one_host_secret(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/parley.db"
    first, second = await open_storage(url), await open_storage(url)
    try:
        secrets = await asyncio.gather(*(store.kv.host_secret("localhost", "test")
                                         for store in (first, second, first, second)))
        assert len(set(secrets)) == 1
        assert await second.kv.host_secret("localhost", "test") == secrets[0]
    finally:
        await first.close()
        await second.close()


async def test_every_worker_verifies_dialback_keys_and_applies_the_lists_an_admin_edits_on_one(tmp_path: Path) -> None:
    """A remote server checks our key over a connection of its own, which may reach either worker; a domain an
    admin denies on one worker (XEP-0133) is refused by both."""
    address = "127.0.0.7"
    port = free_port_on(address)
    listener = f'[[listeners]]\ntype = "s2s"\naddress = "{address}"\nport = {port}\n'
    async with serve(tmp_path, "a.test", f"[s2s]\nrequire_encryption = false\n{listener}",
                     'admins = ["admin@a.test"]') as workers:
        secret = await workers.storage.kv.host_secret("a.test", DIALBACK_STORE)
        answers = []
        for attempt in range(8):  # both workers answer some, but for a chance of 1 in 128
            peer = await RawPeer.connect(address, port)
            await peer.open("b.test", "a.test")
            stream_id = f"stream-{attempt}"
            for key, expected in ((make_key(secret, "b.test", "a.test", stream_id), "valid"), ("forged", "invalid")):
                await peer.send(f"<db:verify from='b.test' to='a.test' id='{stream_id}'>{key}</db:verify>")
                answer = await peer.expect("{jabber:server:dialback}verify")
                answers.append((answer.get("type"), expected))
            peer.close()
        assert all(got == expected for got, expected in answers), answers

        password = (tmp_path / "admin-password-a.test.txt").read_text().split()[1]  # made at the first start
        admin = await workers.client("admin@a.test", password, plugins=("xep_0004", "xep_0030", "xep_0050"))
        await complete(admin, "edit-blacklist", "a.test", blacklistjids=["b.test"])
        await asyncio.sleep(0.2)  # the other worker hears of it after its next turn
        for _ in range(8):
            peer = await RawPeer.connect(address, port)
            await peer.send("<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' "
                            "from='b.test' to='a.test' version='1.0'>")
            assert b"policy-violation" in await peer.closed()


@pytest.fixture
async def federated(ca: TestCA, tmp_path: Path) -> AsyncIterator[Workers]:
    """Parley on PARLEY's address with two workers, with a self-signed certificate the peers do not trust: they
    check our dialback keys by connecting back to us, on whichever worker the kernel picks."""
    address, domain = PARLEY
    extra = f"""\
[[listeners]]
type = "s2s"
address = "{address}"
port = 5269
[s2s]
ca_bundle = "{ca.path}"
accept_self_signed = ["{test_s2s_interop.EJABBERD[1]}"]
bidi = false
"""
    async with serve(tmp_path, domain, extra) as workers:
        yield workers


async def test_federation_from_both_workers(prosody: Peer, federated: Workers, clients: list[ClientXMPP]) -> None:
    """Users on both workers: Prosody's stream reaches one of them and delivers to both; each worker opens its
    own link to Prosody, which checks our key over its stream to us, held by one worker for both (with
    ejabberd as well: see the test of two nodes)."""
    domain = PARLEY[1]
    users = {}
    for worker, name in ((0, "alice"), (1, "bob")):
        await federated.add_user(name, host=domain)
        users[name] = await federated.client_on(worker, f"{name}@{domain}", f"w{worker}", ("xep_0199",))
        await online(users[name])
    remote = await test_s2s_interop.remote_user(prosody, clients, plugins=("xep_0199",))
    remote_inbox = Inbox(remote)
    for name, client in users.items():
        inbox = Inbox(client)
        remote.send_message(mto=f"{name}@{domain}", mbody=f"to {name}", mtype="chat")
        got = await inbox.wait(lambda m, n=name: m["body"] == f"to {n}", timeout=20)
        assert got["from"] == remote.boundjid
        client.send_message(mto=remote.boundjid.bare, mbody=f"from {name}", mtype="chat")
        got = await remote_inbox.wait(lambda m, n=name: m["body"] == f"from {n}", timeout=20)
        assert got["from"] == client.boundjid
    # An iq to a full JID: asked on the peer's stream, answered by the client over its own worker's link.
    await remote.plugin["xep_0199"].ping(jid=users["bob"].boundjid.full, timeout=20)


@pytest.fixture
async def two_nodes(peer: Peer, ca: TestCA, tmp_path: Path) -> AsyncIterator[tuple[Workers, Workers]]:
    """Nodes A and B of one cluster (one worker each, sharing a PostgreSQL schema and a Redis prefix): the peers
    reach parley.test at A's address only; B listens for servers on an address nobody is told of."""
    schema = await make_pg_schema()
    url, prefix = f"{PG_URL}?schema={schema}", f"parley-test-{uuid.uuid4().hex[:12]}"
    address, domain = PARLEY
    trust = f'[s2s]\nca_bundle = "{ca.path}"\naccept_self_signed = ["{test_s2s_interop.EJABBERD[1]}"]\nbidi = false\n'
    a_s2s = f'[[listeners]]\ntype = "s2s"\naddress = "{address}"\nport = 5269\n'
    b_s2s = f'[[listeners]]\ntype = "s2s"\naddress = "127.0.0.8"\nport = {free_port_on("127.0.0.8")}\n'
    redis = await redis_or_skip()
    try:
        async with serve(tmp_path / "a", domain, a_s2s + trust, node="a", workers=1, url=url, prefix=prefix) as a, \
                serve(tmp_path / "b", domain, b_s2s + trust, node="b", workers=1, url=url, prefix=prefix) as b:
            yield a, b
        leftover = [key async for key in redis.scan_iter(f"{prefix}:*")]
        assert not leftover, f"the nodes left {leftover} in Redis"
    finally:
        await redis.aclose()
        await drop_pg_schema(schema)


async def test_federation_through_a_node_that_holds_none_of_the_users(two_nodes: tuple[Workers, Workers],
                                                                     peer: Peer, clients: list[ClientXMPP]) -> None:
    """The peer's stream reaches node A, for alice on node B; alice's replies go over B's own link, whose
    dialback key the peer checks with A (which never made it)."""
    _, b = two_nodes
    domain = PARLEY[1]
    await b.add_user("alice", host=domain)
    alice = await b.client(f"alice@{domain}", resource="b", plugins=("xep_0199",))
    await online(alice)
    remote = await test_s2s_interop.remote_user(peer, clients, plugins=("xep_0199",))
    alice_inbox, remote_inbox = Inbox(alice), Inbox(remote)
    remote.send_message(mto=f"alice@{domain}", mbody="to alice", mtype="chat")
    assert (await alice_inbox.wait(lambda m: m["body"] == "to alice", timeout=20))["from"] == remote.boundjid
    alice.send_message(mto=remote.boundjid.bare, mbody="from alice", mtype="chat")
    assert (await remote_inbox.wait(lambda m: m["body"] == "from alice", timeout=20))["from"] == alice.boundjid
    await remote.plugin["xep_0199"].ping(jid=alice.boundjid.full, timeout=20)
    await alice.plugin["xep_0199"].ping(jid=remote.boundjid.full, timeout=20)


async def test_uploads_slot_on_one_worker_put_and_get_on_any(tmp_path: Path) -> None:
    """Every PUT and GET on a new connection, so both workers serve some (but for a chance of 1 in 2^17); the
    workers started together on a new database, each reading the host's upload secret at once."""
    port = free_port()
    extra = f"""\
[[listeners]]
type = "http"
address = "127.0.0.1"
port = {port}
[module_options.http_upload]
url = "http://127.0.0.1:{port}"
"""
    async with serve(tmp_path, "localhost", extra, 'modules_enabled = ["http_upload"]') as workers:
        await workers.add_user("alice")
        client = await workers.client("alice@localhost", plugins=("xep_0030", "xep_0363"))
        for n in range(6):
            iq = await client.plugin["xep_0363"].request_slot("upload.localhost", f"{n}.txt", 2, "text/plain")
            put_url, get_url = iq["http_upload_slot"]["put"]["url"], iq["http_upload_slot"]["get"]["url"]
            async with aiohttp.ClientSession() as http, \
                    http.put(put_url, data=f"{n}!".encode(), headers={"Content-Type": "text/plain"}) as response:
                assert response.status == 201, await response.text()
            for _ in range(2):
                async with aiohttp.ClientSession() as http, http.get(get_url) as response:
                    assert (response.status, await response.read()) == (200, f"{n}!".encode())


async def registered(workers: Workers, domain: str) -> str | None:
    """The member the cluster's registry says holds `domain`'s component."""
    member = await workers.redis.hget(f"{workers.prefix}:components", domain)
    return member.decode() if member else None


async def until_registered(workers: Workers, domain: str, wanted: object) -> str | None:
    """Wait until the registry's entry for `domain` is `wanted` (a member, None, or ANY member)."""
    deadline = time.monotonic() + 15
    while True:
        member = await registered(workers, domain)
        if member == wanted or (wanted is ANY and member is not None):
            return member
        assert time.monotonic() < deadline, f"{domain}: registered at {member}, not {wanted}"
        await asyncio.sleep(0.05)


ANY = object()


async def bounced(client: ClientXMPP) -> None:
    """A message from `client` to the component comes back with service-unavailable."""
    errors = collect(client, "error")
    client.send_message(mto=COMPONENT_DOMAIN, mbody="anyone there?")
    assert condition_of(await asyncio.wait_for(errors.get(), 10)) == "service-unavailable"


async def test_a_component_on_one_worker_is_reached_from_both(tmp_path: Path) -> None:
    port = free_port()
    extra = f"""\
[[listeners]]
type = "component"
address = "127.0.0.1"
port = {port}
[components."{COMPONENT_DOMAIN}"]
secret = "{SECRET}"
"""
    async with serve(tmp_path, "localhost", extra) as workers:
        workers.component_port = port
        users = {}
        for worker, name in ((0, "alice"), (1, "bob")):
            await workers.add_user(name)
            users[name] = await workers.client_on(worker, f"{name}@localhost", f"w{worker}")
            await online(users[name])
        async with app_component(workers, COMPONENT_DOMAIN, SECRET) as component:
            holder = await until_registered(workers, COMPONENT_DOMAIN, ANY)
            got = received(component, "message")
            for name, client in users.items():  # one of them on the component's worker, the other not
                inbox = Inbox(client)
                component.send_message(mto=f"{name}@localhost", mfrom=COMPONENT_DOMAIN, mbody=f"to {name}")
                assert (await inbox.wait(lambda m, n=name: m["body"] == f"to {n}"))["from"] == COMPONENT_DOMAIN
                client.send_message(mto=COMPONENT_DOMAIN, mbody=f"from {name}")
                message = await asyncio.wait_for(got.get(), 10)
                assert (message.get("from"), message.findtext("{jabber:component:accept}body")) == \
                       (str(client.boundjid), f"from {name}")
            for _ in range(3):  # on either worker, a second connection for the domain is refused
                async with raw_component(workers, COMPONENT_DOMAIN) as (raw, stream_id):
                    await raw.send(f"<handshake>{handshake_digest(stream_id, SECRET)}</handshake>")
                    assert stream_error_condition(await raw.closed()) == "conflict"
        await until_registered(workers, COMPONENT_DOMAIN, None)
        for client in users.values():  # gone: both workers bounce what is sent to it
            await bounced(client)
        # The worker holding it dies: its entry goes and the other worker bounces instead of forwarding.
        async with app_component(workers, COMPONENT_DOMAIN, SECRET):
            holder = await until_registered(workers, COMPONENT_DOMAIN, ANY)
            os.kill(await workers.pid(int(holder.rpartition("/")[2])), signal.SIGKILL)
            await until_registered(workers, COMPONENT_DOMAIN, None)
        await bounced(users["alice" if holder.endswith("/1") else "bob"])


async def test_websocket_and_bosh_sessions_on_either_worker(tmp_path: Path) -> None:
    """And the HTTP API, answered by either worker, counts the sessions of both. BOSH needs no sticky sessions:
    its requests, each on a new connection, reach either worker, which passes them to the session's."""
    port = free_port()
    extra = f'[[listeners]]\ntype = "http"\naddress = "127.0.0.1"\nport = {port}\n[http_api]\ntoken = "{TOKEN}"\n'
    host = 'modules_enabled = ["websocket", "bosh"]'
    async with serve(tmp_path, "localhost", extra, host) as workers:
        await workers.add_user("juliet")
        async with ws_client(f"ws://127.0.0.1:{port}/xmpp-websocket") as juliet:
            jid = await logged_in(juliet, "juliet")
            landed, _ = await workers.until_state(jid)
            await workers.add_user("romeo")
            romeo = await workers.client_on(1 - landed, "romeo@localhost", "tcp")
            inbox = workers.inbox(romeo)
            await juliet.send("<presence xmlns='jabber:client'/>")
            await juliet.send(f"<message xmlns='jabber:client' to='{romeo.boundjid}' type='chat'>"
                              "<body>Wherefore</body></message>")
            got = await asyncio.wait_for(inbox.get(), 10)
            assert (got["body"], str(got["from"])) == ("Wherefore", jid)
            romeo.send_message(mto=jid, mbody="By a name", mtype="chat")
            reply = await juliet.expect("{jabber:client}message")
            assert reply.findtext("{jabber:client}body") == "By a name"
            for _ in range(6):  # each on a new connection: both workers answer some
                async with aiohttp.ClientSession() as http, http.post(
                        f"http://127.0.0.1:{port}/api/connected_users_number", json={},
                        headers={"Authorization": f"Bearer {TOKEN}"}) as response:
                    assert (response.status, await response.json()) == (200, {"num_sessions": 2})
            await workers.add_user("mercutio")
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
                bosh = Bosh(f"http://127.0.0.1:{port}/http-bind", http)
                mercutio = await bosh.login("mercutio")
                romeo.send_message(mto=mercutio, mbody="A plague", mtype="chat")
                message = await stanzas(bosh, "{jabber:client}message", 10)
                assert message.findtext("{jabber:client}body") == "A plague"
                # The worker holding the session dies: the other answers for it that it is gone.
                holder = bytes.fromhex(bosh.sid.partition(".")[0]).decode()
                os.kill(await workers.pid(int(holder.rpartition("/")[2])), signal.SIGKILL)
                started = time.monotonic()
                for _ in range(5):  # a request the dying worker had accepted fails: the client sends it again
                    with contextlib.suppress(aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
                        answer = await bosh.send(rid=bosh.rid + 1)
                        break
                else:
                    raise AssertionError("no answer from the worker left")
                assert (answer.get("type"), answer.get("condition")) == ("terminate", "item-not-found")
                assert time.monotonic() - started < 10
