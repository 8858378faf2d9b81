"""Tenants at run time (server/tenants.py): created with parleyctl and the HTTP API, served at once (TLS SNI
included) and after a restart, disabled (sessions end, logins refused), removed after a grace period or kept
by cancel-tenant-removal, a tenant's admins confined to their tenant, quotas, and a cluster's members
following each other's changes. Real servers on real sockets."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import Element

import pytest
from slixmpp import ClientXMPP
from slixmpp.exceptions import IqError

from server.accounts import AccountsFull, create_account
from server.commands import Context
from server.config import ConfigError, parse_config
from server.control import execute
from server.jid import JID
from server.registry import available
from server.storage.muc import MucStore, StoredRoom
from server.storage.tenants import Quotas
from server.tenants import TenantError, parse_options
from tests.conftest import PG_URL, Harness, drop_pg_schema, insecure_context, make_pg_schema
from tests.s2s_support import RawPeer, start_parley
from tests.test_http_api import TOKEN, basic, with_http_api
from tests.test_http_upload import put
from tests.test_parleyctl import ok, run
from tests.test_register import ask, condition_of, legacy, unauthenticated
from tests.test_session_directory import cluster_config, redis_prefix, until, worker

EMPTY = ("", "", "", "")  # create-tenant's modules, options, certificate and key: the defaults


async def create(server: Harness, domain: str, *admins: str) -> None:
    lines = await ok(server, "create-tenant", domain, ",".join(admins), *EMPTY)
    assert lines == [f"Tenant {domain} created and served"]


async def tenants(server: Harness) -> dict[str, dict[str, str]]:
    """list-tenants through parleyctl, by domain."""
    found = {}
    for line in await ok(server, "list-tenants"):
        record = dict(zip(("domain", "state", "accounts", "admins", "max_accounts", "max_storage", "max_upload",
                           "max_rate", "remove_at"), line.split("\t"), strict=False))
        found[record["domain"]] = record
    return found


def peer_certificate(port: int, name: str) -> bytes:
    """The certificate the Direct TLS listener presents to a client naming `name` in SNI."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            insecure_context().wrap_socket(raw, server_hostname=name) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


async def login_fails(server: Harness, jid: str, direct: bool = False) -> None:
    with pytest.raises((AssertionError, TimeoutError, ConnectionError, ssl.SSLError)):
        await server.client(jid, direct=direct, timeout=3)


async def test_a_tenant_created_with_parleyctl_is_served_at_once_and_after_a_restart(server: Harness) -> None:
    await create(server, "t1.test", "boss@t1.test")
    assert await ok(server, "register", "alice", "t1.test", "secret") == ["User alice@t1.test successfully registered"]
    alice = await server.client("alice@t1.test")  # STARTTLS: the stream names the tenant
    assert alice.boundjid.bare == "alice@t1.test"
    await server.client("alice@t1.test", resource="direct", direct=True)  # Direct TLS: SNI picks its certificate
    tls = server.server.tls
    assert tls is not None
    own = await asyncio.to_thread(peer_certificate, server.direct_port, "t1.test")
    assert own == tls.cert_der("t1.test") != tls.cert_der("localhost")
    # Everything else the host's modules add is there: the room service of the tenant answers.
    assert "conference.t1.test" in server.server.services
    listed = await tenants(server)
    assert listed["t1.test"]["state"] == "enabled" and listed["t1.test"]["accounts"] == "1"
    assert listed["t1.test"]["admins"] == "boss@t1.test"

    # The configuration's hosts, and tenants already there, cannot be created again.
    code, _, err = await run(server, "create-tenant", "localhost", "", *EMPTY)
    assert code == 1 and "host of the configuration file" in err
    code, _, err = await run(server, "create-tenant", "t1.test", "", *EMPTY)
    assert code == 1 and "tenant already" in err

    await server.restart()
    await server.client("alice@t1.test")
    assert "t1.test" in server.server.hosts and server.server.hosts["t1.test"].tenant
    assert (await tenants(server))["t1.test"]["accounts"] == "1"


async def test_disabling_ends_sessions_and_refuses_logins_until_enabled(server: Harness) -> None:
    await create(server, "t2.test")
    await server.add_user("bob", host="t2.test")
    await server.add_user("alice")
    bob = await server.client("bob@t2.test")
    alice = await server.client("alice@localhost")
    ended = asyncio.get_running_loop().create_future()
    bob.add_event_handler("disconnected", lambda _: ended.done() or ended.set_result(True))
    stream_errors: list[str] = []
    bob.add_event_handler("stream_error", lambda error: stream_errors.append(error["condition"]))
    bob.reconnect_max_attempts = 0
    assert await ok(server, "disable-tenant", "t2.test") == ["Tenant t2.test disabled"]
    await asyncio.wait_for(ended, 5)
    assert stream_errors == ["host-gone"]
    assert "t2.test" not in server.server.hosts and "conference.t2.test" not in server.server.services
    await login_fails(server, "bob@t2.test")
    raw = await server.raw()
    await raw.open("t2.test")
    assert b"host-unknown" in await raw.closed()
    # Other hosts go on.
    assert alice.is_connected()
    assert (await tenants(server))["t2.test"]["state"] == "disabled"
    await server.restart()
    assert "t2.test" not in server.server.hosts  # disabled stays disabled

    assert await ok(server, "enable-tenant", "t2.test") == ["Tenant t2.test enabled"]
    await server.client("bob@t2.test")


@pytest.mark.parley_config(tenants={"removal_grace": 0.3})
async def test_removal_deletes_the_data_after_the_grace(server: Harness) -> None:
    await create(server, "gone.test")
    await server.add_user("carol", host="gone.test")
    await server.add_user("alice")
    alice = await server.client("alice@localhost")
    alice.send_message(mto="carol@gone.test", mbody="for later", mtype="chat")  # stored offline, then archived
    storage = server.server.storage
    await until(lambda: _offline(storage, "gone.test", "carol"), "the message stored offline")
    await storage.kv.set("gone.test", "carol", "notes", "k", {"v": 1})
    rooms = MucStore(storage.engine)
    await rooms.save_room("conference.gone.test", StoredRoom("r", {}, datetime.now(UTC), "", ""))
    await rooms.save_room("conference.localhost", StoredRoom("r", {}, datetime.now(UTC), "", ""))
    code, _, err = await run(server, "remove-tenant", "gone.test", "other.test")
    assert code == 1 and "confirm" in err
    assert await storage.accounts.exists("gone.test", "carol")
    [message] = await ok(server, "remove-tenant", "gone.test", "gone.test")
    assert "data is deleted at" in message
    assert "gone.test" not in server.server.hosts
    await until(lambda: _no_tenant(storage, "gone.test"), "the data deleted", timeout=10)
    assert not await storage.accounts.exists("gone.test", "carol")
    assert await storage.kv.get("gone.test", "carol", "notes", "k") is None
    assert not await _offline(storage, "gone.test", "carol")
    assert await rooms.rooms("conference.gone.test") == []  # the services it served go with it
    assert [r.name for r in await rooms.rooms("conference.localhost")] == ["r"]
    assert await storage.accounts.exists("localhost", "alice")  # other hosts keep theirs
    # The domain is free again.
    await create(server, "gone.test")
    assert not await storage.accounts.exists("gone.test", "carol")


@pytest.mark.parley_config(tenants={"removal_grace": 1.5})
async def test_cancel_within_the_grace_keeps_the_tenant_and_a_restart_keeps_the_removal(server: Harness) -> None:
    await create(server, "kept.test")
    await server.add_user("dave", host="kept.test")
    await ok(server, "remove-tenant", "kept.test", "kept.test")
    assert (await tenants(server))["kept.test"]["state"] == "removing"
    code, _, err = await run(server, "enable-tenant", "kept.test")
    assert code == 1 and "cancel-tenant-removal" in err
    assert await ok(server, "cancel-tenant-removal", "kept.test") == ["Tenant kept.test kept (enabled)"]
    await asyncio.sleep(2.0)
    assert await server.server.storage.accounts.exists("kept.test", "dave")
    await server.client("dave@kept.test")
    # Removed again, the time survives a restart and the deletion happens after it.
    await ok(server, "remove-tenant", "kept.test", "kept.test")
    await server.restart()
    assert "kept.test" not in server.server.hosts
    await until(lambda: _no_tenant(server.server.storage, "kept.test"), "the data deleted after a restart", timeout=10)
    assert not await server.server.storage.accounts.exists("kept.test", "dave")


async def _offline(storage: Any, host: str, user: str) -> bool:
    return bool(await storage.offline.count(host, user))


async def _no_tenant(storage: Any, domain: str) -> bool:
    return await storage.tenants.get(domain) is None


async def test_http_api_creates_tenants_and_a_tenants_admin_sees_only_its_own(server: Harness) -> None:
    api = await with_http_api(server)
    for domain in ("a.test", "b.test"):
        answer = await api.ok("create-tenant", {"domain": domain, "admins": f"boss@{domain}", "modules": "",
                                                "options": "", "certificate": "", "key": ""}, token=TOKEN)
        assert answer == {"message": f"Tenant {domain} created and served"}
        await server.add_user("boss", "bosspw", host=domain)
    status, _ = await api.call("create-tenant", {"domain": "localhost", "admins": "", "modules": "", "options": "",
                                                 "certificate": "", "key": ""}, token=TOKEN)
    assert status == 409
    everything = await api.ok("list-tenants", token=TOKEN)
    assert [t["domain"] for t in everything] == ["a.test", "b.test"]

    boss_a = basic("boss@a.test", "bosspw")
    assert [t["domain"] for t in await api.ok("list-tenants", auth=boss_a)] == ["a.test"]
    for command, body in (("disable-tenant", {"domain": "b.test"}),
                          ("remove-tenant", {"domain": "b.test", "confirm": "b.test"}),
                          ("create-tenant", {"domain": "c.test", "admins": "", "modules": "", "options": "",
                                             "certificate": "", "key": ""}),
                          ("set-tenant-quotas", {"domain": "a.test", "max_accounts": 1000, "max_storage": "",
                                                 "max_upload": "", "max_rate": ""}),
                          ("set-tenant-admins", {"domain": "b.test", "admins": "boss@b.test"})):
        status, _ = await api.call(command, body, auth=boss_a)
        assert status == 403, command
    # Commands over a host's accounts know only the caller's hosts, as for configured hosts.
    status, answer = await api.call("register", {"user": "x", "host": "b.test", "password": "pw"}, auth=boss_a)
    assert status == 400 and "Unknown virtual host" in answer
    assert "b.test" in server.server.hosts and not await server.server.storage.accounts.exists("b.test", "x")
    # Its own tenant it does administer: accounts and its admins.
    await api.ok("register", {"user": "ann", "host": "a.test", "password": "pw"}, auth=boss_a)
    await api.ok("set-tenant-admins", {"domain": "a.test", "admins": "boss@a.test, ann@a.test"}, auth=boss_a)
    assert server.server.hosts["a.test"].is_admin(JID.parse("ann@a.test"))
    assert not server.server.hosts["b.test"].is_admin(JID.parse("boss@a.test"))

    # Ad-hoc commands: the server-wide ones are forbidden, the list shows its own tenant only.
    client = await server.client("boss@a.test", "bosspw", plugins=("xep_0030", "xep_0004", "xep_0050"))
    nodes = {item[1] for item in (await client.plugin["xep_0030"].get_items(jid="a.test",
                                                                            node="http://jabber.org/protocol/commands")
                                  )["disco_items"]["items"]}
    assert "urn:parley:tenants#list-tenants" in nodes
    assert "urn:parley:tenants#disable-tenant" not in nodes
    with pytest.raises(IqError) as refused:
        await _adhoc(client, "a.test", "disable-tenant", {"domain": "b.test"})
    assert refused.value.condition == "forbidden"
    with pytest.raises(IqError) as refused:
        await _adhoc(client, "a.test", "set-tenant-admins", {"domain": "b.test", "admins": "boss@b.test"})
    assert refused.value.condition == "forbidden"
    listed = await _adhoc(client, "a.test", "list-tenants", {})
    assert [line.split("\t")[0] for line in listed["tenants"]] == ["domain=a.test"]


async def _adhoc(client: ClientXMPP, host: str, name: str, values: dict[str, str]) -> dict[str, Any]:
    """Run an admin ad-hoc command with its one form submitted at once; the result form's values."""
    form = client.plugin["xep_0004"].make_form(ftype="submit")
    for var, value in values.items():
        form.add_field(var=var, value=value)
    iq = client.make_iq_set(ito=host)
    iq["command"]["node"] = f"urn:parley:tenants#{name}"
    iq["command"]["action"] = "execute"
    iq["command"].append(form)
    answer = await iq.send(timeout=10)
    return dict(answer["command"]["form"].get_values())


async def test_federation_with_a_disabled_tenant_is_refused(tmp_path: Path) -> None:
    fed = await start_parley(tmp_path / "fed", {"fed.test": {}}, "127.0.0.1")
    try:
        await fed.server.tenants.create("t3.test", [], [], [], None, None)
        peer = await RawPeer.connect("127.0.0.1", fed.s2s_port)
        assert await peer.open("remote.example", "t3.test") is not None  # served: the stream goes on
        peer.close()
        await fed.server.tenants.set_enabled("t3.test", False)
        peer = await RawPeer.connect("127.0.0.1", fed.s2s_port)
        await peer.send("<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' "
                        "from='remote.example' to='t3.test' version='1.0'>")
        assert b"host-unknown" in await peer.closed()
        peer.close()
    finally:
        await fed.stop()


# --- quotas -----------------------------------------------------------------------------------------------

@pytest.mark.parley_config(tenants={"template": "localhost"})
async def test_account_quota_refuses_every_way_of_creating_accounts(server: Harness) -> None:
    await create(server, "small.test")
    await ok(server, "set-tenant-quotas", "small.test", "2", "", "", "")
    await ok(server, "register", "one", "small.test", "pw")
    # In-band registration, open as on the template, localhost.
    raw, _ = await unauthenticated(server, "small.test")
    answer = await ask(raw, "set", legacy("two", "pw"))
    assert answer.get("type") == "result", condition_of(answer)
    raw, _ = await unauthenticated(server, "small.test")
    answer = await ask(raw, "set", legacy("three", "pw"))
    assert condition_of(answer) == "resource-constraint"
    assert "limit of 2 accounts" in _text(answer)
    code, _, err = await run(server, "register", "four", "small.test", "pw")
    assert code == 1 and "limit of 2 accounts" in err
    add_user = server.server.commands["add-user"]  # XEP-0133's, as an admin of the tenant runs it
    host = server.server.hosts["small.test"]
    answer = await execute(add_user, Context(host, JID.parse("admin@localhost")), {
        "accountjid": "five@small.test", "password": "pw", "password-verify": "pw", "email": "", "given_name": "",
        "surname": ""})
    assert "limit of 2 accounts" in answer["error"]
    with pytest.raises(AccountsFull):  # what invitations and the CLI go through as well
        await create_account(server.server.storage, "small.test", "five", "pw", 4096)
    assert await server.server.storage.accounts.count("small.test") == 2
    await server.add_user("plenty")  # the configured host has no quota
    await ok(server, "set-tenant-quotas", "small.test", "3", "", "", "")
    await ok(server, "register", "three", "small.test", "pw")


def _text(iq: Element) -> str:
    return "".join(iq.itertext())


async def test_message_rate_quota_holds_one_tenant_back_and_not_the_others(server: Harness) -> None:
    await create(server, "chatty.test")
    await ok(server, "set-tenant-quotas", "chatty.test", "", "", "", "3")
    for name in ("a", "b"):
        await server.add_user(name, host="chatty.test")
        await server.add_user(name)
    sender, receiver = await server.client("a@chatty.test"), await server.client("b@chatty.test")
    local_sender, local_receiver = await server.client("a@localhost"), await server.client("b@localhost")
    errors: asyncio.Queue[Any] = asyncio.Queue()
    sender.add_event_handler("message_error", errors.put_nowait)
    inbox, local_inbox = server.inbox(receiver), server.inbox(local_receiver)
    for i in range(20):
        sender.send_message(mto=receiver.boundjid.full, mbody=f"m{i}", mtype="chat")
        local_sender.send_message(mto=local_receiver.boundjid.full, mbody=f"m{i}", mtype="chat")
    refused = await asyncio.wait_for(errors.get(), 5)
    assert refused["error"]["condition"] == "resource-constraint"
    assert "messages a second" in refused["error"]["text"]
    for i in range(20):  # the other host is not limited
        assert (await asyncio.wait_for(local_inbox.get(), 5))["body"] == f"m{i}"
    assert (await asyncio.wait_for(inbox.get(), 5))["body"] == "m0"  # within the rate
    delivered = 1
    while not inbox.empty():
        inbox.get_nowait()
        delivered += 1
    assert 1 <= delivered < 20


async def test_storage_quota_counts_archived_and_offline_messages(server: Harness) -> None:
    await create(server, "full.test")
    await ok(server, "set-tenant-quotas", "full.test", "", "1000", "", "")
    await server.add_user("a", host="full.test")
    await server.add_user("b", host="full.test")
    sender = await server.client("a@full.test")
    errors: asyncio.Queue[Any] = asyncio.Queue()
    sender.add_event_handler("message_error", errors.put_nowait)
    sender.send_message(mto="b@full.test", mbody="x" * 1200, mtype="chat")  # b is offline: stored
    tenants_ = server.server.tenants
    await until(lambda: _offline(server.server.storage, "full.test", "b"), "stored offline")
    assert await tenants_.count_usage("full.test") > 1000
    sender.send_message(mto="b@full.test", mbody="one more", mtype="chat")
    refused = await asyncio.wait_for(errors.get(), 5)
    assert refused["error"]["condition"] == "resource-constraint"
    assert "storage" in refused["error"]["text"]
    assert await server.server.storage.offline.count("full.test", "b") == 1
    await ok(server, "set-tenant-quotas", "full.test", "", "0", "", "")  # no limit any more
    sender.send_message(mto="b@full.test", mbody="now it fits", mtype="chat")
    await until(lambda: _count_is(server.server.storage, "full.test", "b", 2), "stored again")


async def _count_is(storage: Any, host: str, user: str, count: int) -> bool:
    return bool(await storage.offline.count(host, user) == count)


async def test_upload_quota_refuses_a_slot_past_the_tenants_space(server: Harness) -> None:
    if "http_upload" not in available():
        pytest.skip("no http_upload module")
    await with_http_api(server)  # the upload module serves its files on an http listener
    # Modules of its own, the template's and the upload module, with an option.
    modules = ",".join([*server.server.config.hosts["localhost"].modules, "http_upload"])
    await ok(server, "create-tenant", "files.test", "", modules, "http_upload.max_file_size = 100000", "", "")
    assert server.server.hosts["files.test"].modules["http_upload"].option("max_file_size") == 100000
    await ok(server, "set-tenant-quotas", "files.test", "", "", "100", "")
    await server.add_user("up", host="files.test")
    client = await server.client("up@files.test", plugins=("xep_0030", "xep_0363"))
    upload = client.plugin["xep_0363"]
    slot = (await upload.request_slot("upload.files.test", "a.bin", 60, "application/octet-stream"))["http_upload_slot"]
    with pytest.raises(IqError) as refused:
        await upload.request_slot("upload.files.test", "b.bin", 50, "application/octet-stream")
    assert refused.value.condition == "resource-constraint"
    await upload.request_slot("upload.files.test", "c.bin", 40, "application/octet-stream")  # exactly the quota

    # Removed, its files go with its data.
    status, _, _ = await put(slot["put"]["url"], b"x" * 60)
    assert status == 201
    files = server.data_dir / "uploads" / "files.test"
    assert any(files.iterdir())
    await ok(server, "remove-tenant", "files.test", "files.test")
    tenants_ = server.server.tenants
    stored = await tenants_.get("files.test")
    assert {"conference.files.test", "upload.files.test"} <= set(stored.services)  # their data goes too
    await server.server.storage.tenants.save(replace(stored, remove_at=datetime.now(UTC)))  # the grace is over
    assert await tenants_.purge_due() == ["files.test"]
    assert not files.exists() and await server.server.storage.uploads.usage("files.test") == (0, 0)


# --- configuration ------------------------------------------------------------------------------------------

def test_tenants_section_is_checked(tmp_path: Path) -> None:
    config = parse_config({"hosts": {"example.org": {}}, "tenants": {"template": "example.org",
                                                                    "removal_grace": 60, "max_accounts": 5}})
    assert config.tenants.template == "example.org" and config.tenants.max_accounts == 5
    assert config.tenants.removal_grace == 60.0
    assert parse_config({}).tenants.removal_grace == 7 * 86400
    with pytest.raises(ConfigError, match=r"tenants\.template"):
        parse_config({"tenants": {"template": "nowhere.org"}})
    with pytest.raises(ConfigError, match=r"tenants\.key"):
        parse_config({"tenants": {"certificate": str(tmp_path)}})
    with pytest.raises(ConfigError, match=r"tenants\.max_rate"):
        parse_config({"tenants": {"max_rate": -1}})
    with pytest.raises(ConfigError, match=r"tenants\.colour"):
        parse_config({"tenants": {"colour": "blue"}})


def test_module_options_of_a_tenant_are_checked_as_the_configurations() -> None:
    modules = ["muc", "mam"]
    assert parse_options(["muc.max_page = 50\nmam.default = 'always'", ""], modules) == {
        "muc.max_page": 50, "mam.default": "always"}
    assert parse_options(["mam.default = roster"], modules) == {"mam.default": "roster"}  # a bare word is text
    for bad, reason in (("muc.max_page = 0", "at least"), ("vcard.max_size = 1", "not loaded"),
                        ("muc.colour = 1", "unknown option"), ("muc max_page", "module.option = value")):
        with pytest.raises(TenantError, match=reason):
            parse_options([bad], modules)


@pytest.mark.parley_config(tenants={"template": "example.test"})
async def test_template_and_shared_certificate(server: Harness, tmp_path: Path) -> None:
    """A tenant takes the template's modules; one made with a shared certificate presents that one."""
    await create(server, "like-example.test")
    assert list(server.server.hosts["like-example.test"].modules) == list(server.server.hosts["example.test"].modules)
    shared = server.server.config.hosts["example.test"]
    server.server.config.tenants.certificate, server.server.config.tenants.key = shared.certificate, shared.key
    await create(server, "shared.test")
    tls = server.server.tls
    assert tls is not None and tls.cert_der("shared.test") == tls.cert_der("example.test")
    # Files of its own, given to create-tenant; a pair that is not there is refused.
    own = server.server.config.hosts["localhost"]
    code, _, err = await run(server, "create-tenant", "own.test", "", "", "", str(tmp_path / "no.crt"), str(own.key))
    assert code == 1 and "is not a file" in err and "own.test" not in server.server.hosts
    await ok(server, "create-tenant", "own.test", "", "", "", str(own.certificate), str(own.key))
    assert tls.cert_der("own.test") == tls.cert_der("localhost")
    # A configuration reload keeps the tenants and their certificates.
    source = tmp_path / "parley.toml"
    source.write_text(_toml(server))
    server.server.config.source = source
    await ok(server, "reload_config")
    assert tls.cert_der("own.test") == tls.cert_der("localhost") != tls.cert_der("shared.test")
    await server.add_user("eve", host="own.test")
    await server.client("eve@own.test", direct=True)


def _toml(server: Harness) -> str:
    """The running configuration as a file, as far as a reload reads it."""
    config = server.server.config
    listeners = "".join(f'[[listeners]]\ntype = "{item.type}"\naddress = "{item.address}"\nport = {item.port}\n'
                        f'tls = "{item.tls}"\n' for item in config.listeners)
    return (f'data_dir = "{config.data_dir}"\n[storage]\nurl = "{config.storage.url}"\n{listeners}'
            '[hosts.localhost]\nregistration = true\nadmins = ["admin@localhost"]\n[hosts."example.test"]\n'
            '[tenants]\ntemplate = "example.test"\n')


# --- a cluster ----------------------------------------------------------------------------------------------

async def test_every_member_of_a_cluster_follows_a_tenants_changes(tmp_path: Path) -> None:
    schema = await make_pg_schema()
    url = f"{PG_URL}?schema={schema}"
    try:
        async with redis_prefix() as prefix:
            # A short grace: removals, and the sweep that takes up lost changes, come quickly.
            first_config = cluster_config(tmp_path, prefix, storage={"url": url}, tenants={"removal_grace": 0.4})
            second_config = cluster_config(tmp_path, prefix, storage={"url": url}, tenants={"removal_grace": 0.4})
            async with worker(first_config, 0) as first, worker(second_config, 1) as second:
                cluster = first.cluster
                assert cluster is not None
                await until(lambda: len(cluster.members()) == 2, "both members live", timeout=10)
                one = Harness(first, first_config.listeners[0].port, first_config.listeners[1].port, tmp_path)
                two = Harness(second, second_config.listeners[0].port, second_config.listeners[1].port, tmp_path)
                try:
                    await first.tenants.create("cl.test", [], [], [], None, None)
                    await until(lambda: "cl.test" in second.hosts, "the second member serving the tenant")
                    await one.add_user("x", host="cl.test")
                    await one.add_user("y", host="cl.test")
                    x = await two.client("x@cl.test")
                    y = await one.client("y@cl.test")
                    inbox = one.inbox(y)
                    x.send_message(mto=y.boundjid.full, mbody="across", mtype="chat")
                    assert (await asyncio.wait_for(inbox.get(), 5))["body"] == "across"
                    await first.tenants.set_enabled("cl.test", False)
                    await until(lambda: "cl.test" not in second.hosts, "the second member stopping the tenant")
                    await login_fails(two, "x@cl.test")
                    await second.tenants.set_enabled("cl.test", True)  # from either member
                    await until(lambda: "cl.test" in first.hosts, "the first member serving it again")
                    await second.tenants.set_quotas("cl.test", {"max_rate": 7})
                    await until(lambda: first.tenants.quotas.get("cl.test") == Quotas(max_rate=7),
                                "the new quota on the first")
                    # A change whose frame never came (Redis out of reach) is taken up from storage by the sweep.
                    stored = await first.tenants.get("cl.test")
                    await first.storage.tenants.save(replace(stored, quotas=Quotas(max_rate=9)))
                    await until(lambda: second.tenants.quotas.get("cl.test") == Quotas(max_rate=9),
                                "the stored quota on the second")
                    await second.tenants.remove("cl.test", "cl.test")
                    await until(lambda: "cl.test" not in first.hosts, "the first member stopping the removed tenant")
                    await until(lambda: _no_tenant(first.storage, "cl.test"), "the data deleted")
                    assert not await first.storage.accounts.exists("cl.test", "x")
                finally:
                    await one.close()
                    await two.close()
    finally:
        await drop_pg_schema(schema)
