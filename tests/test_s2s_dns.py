"""Federation found through DNS SRV (RFC 6120 3.2.1): a real dnsmasq, started by the test as the authoritative
server of `.test`, is what Parley's resolver asks; no static route, no mock. Two SRV records for b.test: the
preferred one points at a closed port, so the link must come up on the second, in priority order."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import dns.asyncresolver
import dns.exception
import pytest

from s2s import resolver
from tests.conftest import unavailable
from tests.s2s_support import A_ADDR, Inbox, Parley, TestCA, chat, free_port_on, start_parley

DNS_ADDR = "127.0.0.21"
SRV_NAME = "_xmpp-server._tcp.b.test"

pytestmark = pytest.mark.timeout(60)


async def dnsmasq(records: list[str]) -> tuple[subprocess.Popen[bytes], dns.asyncresolver.Resolver]:
    """dnsmasq answering for `.test` from `records` only (--srv-host values), on DNS_ADDR and a free port,
    and a resolver that asks it; returned once it answers."""
    if shutil.which("dnsmasq") is None:
        unavailable("dnsmasq is not installed (apt-get install -y dnsmasq)")
    port = free_port_on(DNS_ADDR)
    proc = subprocess.Popen(
        ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--no-poll",
         "--bind-interfaces", f"--listen-address={DNS_ADDR}", f"--port={port}", "--pid-file=", "--local=/test/",
         *(f"--srv-host={record}" for record in records)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    asker = dns.asyncresolver.Resolver(configure=False)
    asker.nameservers = [DNS_ADDR]
    asker.port = port
    deadline = time.monotonic() + 10
    while True:
        try:
            await asker.resolve(SRV_NAME, "SRV", lifetime=0.5)
            return proc, asker
        except dns.exception.DNSException:
            if proc.poll() is not None:
                raise AssertionError(f"dnsmasq exited: {proc.stderr.read().decode()}") from None
            assert time.monotonic() < deadline, "dnsmasq did not answer in time"


@pytest.fixture
async def federation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Parley, Parley]]:
    """A (a.test) with no route to b.test but DNS; B (b.test) listening on 127.0.0.1, where the SRV target
    'localhost' leads. Both trust one CA, so the links authenticate with SASL EXTERNAL."""
    ca = TestCA(tmp_path / "ca")
    hosts = {}
    for domain in ("a.test", "b.test"):
        crt, key = ca.issue(domain)
        hosts[domain] = {"certificate": str(crt), "key": str(key)}
    a_port = free_port_on(A_ADDR)
    b = await start_parley(tmp_path / "b", {"b.test": hosts["b.test"]}, "127.0.0.1", s2s={
        "ca_bundle": str(ca.path), "static": {"a.test": {"address": A_ADDR, "port": a_port}}})
    a = await start_parley(tmp_path / "a", {"a.test": hosts["a.test"]}, A_ADDR, s2s_port=a_port,
                           s2s={"ca_bundle": str(ca.path)})
    closed = free_port_on("127.0.0.1")  # nothing listens there
    proc, asker = await dnsmasq([f"{SRV_NAME},localhost,{closed},0,5", f"{SRV_NAME},localhost,{b.s2s_port},10,5"])
    monkeypatch.setattr(resolver, "RESOLVER", asker)
    try:
        yield a, b
    finally:
        await a.stop()
        await b.stop()
        proc.terminate()
        proc.wait(10)


async def test_the_resolver_reads_srv_records_from_the_dns_server(monkeypatch: pytest.MonkeyPatch) -> None:
    proc, asker = await dnsmasq([f"{SRV_NAME},one.b.test,5270,0,5", f"{SRV_NAME},two.b.test,5271,10,5"])
    monkeypatch.setattr(resolver, "RESOLVER", asker)
    try:
        targets = await resolver.resolve("b.test", {})
        assert targets == [resolver.Target("one.b.test", 5270, False), resolver.Target("two.b.test", 5271, False)]
        assert await resolver.resolve("nothing.test", {}) == [resolver.Target("nothing.test", 5269, False)]
    finally:
        proc.terminate()
        proc.wait(10)


async def test_a_message_reaches_a_domain_found_through_srv(federation: tuple[Parley, Parley]) -> None:
    a, b = federation
    alice, bob = await a.user("alice@a.test"), await b.user("bob@b.test")
    inbox = Inbox(bob)
    await asyncio.wait_for(chat(alice, inbox, "bob@b.test", "found you through DNS"), 20)
    link = a.manager.links["a.test", "b.test"]
    assert link.address[1] == b.s2s_port  # the second record's port, after the first one's refused
