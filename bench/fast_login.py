"""FAST (XEP-0484) against a password login on the same Parley in the same run: how many logins a second,
and how soon a phone that lost its connection gets the first stanza that waited for it.

Two ways in, each over STARTTLS on a fresh TCP connection:
- `scram`: RFC 6120 SASL SCRAM-SHA-256, stream restart, then resource binding, or XEP-0198 <resume/>;
- `fast`: one SASL2 <authenticate/> with a FAST token (HT-SHA-256-NONE) carrying Bind2, or the <resume/>.

`logins`: W workers log in N times each, one after the other, and close; logins/s and the latency of each.
`fast_counted` sends XEP-0484's replay counter, which only TLS 0-RTT needs and which costs a write per login.
`reconnect`: a session enables resumable stream management, its connection is cut, a contact sends it a
message; the time from the new TCP connection to that message on the new stream, on loopback and with a
simulated round-trip time (`--rtt`, a mobile network's): what the server writes reaches the client that
much later, so the password login's extra round trips (challenge, success, stream restart, resumption)
show. The TLS handshake is not delayed: it costs both ways the same. The client keeps its
SCRAM SaltedPassword, as real clients do, so no PBKDF2 runs in the measured loop (bench.client caches it).
Prosody and ejabberd 23.01 have no FAST: Parley only.

    .venv/bin/python -m bench.fast_login [--workers 8] [--logins 50] [--rounds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import Element

from bench.client import (
    FEATURES,
    MESSAGE,
    Connection,
    LoginError,
    LoginOptions,
    Target,
    _sasl_scram,
    _starttls,
    connect,
    login,
)
from bench.procstat import cpu_seconds
from bench.servers import Parley, Profile
from server.sasl.ht import initiator_proof
from server.sasl.scram import ScramClient

PASSWORD = "bench"
TIMEOUT = 30.0
SASL2 = "urn:xmpp:sasl:2"
BIND2 = "urn:xmpp:bind:0"
FAST = "urn:xmpp:fast:0"
SM = "urn:xmpp:sm:3"


class ParleyWithSM(Parley):
    def _modules(self) -> list[str]:
        return [*super()._modules(), "stream_management"]


class Distant(Connection):
    """A client `rtt` seconds away: what the server writes reaches it that much later (the TLS handshake
    excepted), so each request and answer costs one round trip."""

    def __init__(self, domain: str, rtt: float) -> None:
        super().__init__(domain)
        self.rtt = rtt

    def data_received(self, data: bytes) -> None:
        asyncio.get_running_loop().call_later(self.rtt, super().data_received, data)


async def secured(target: Target, rtt: float = 0.0) -> Connection:
    """A stream over STARTTLS, its features read."""
    if rtt:
        _, conn = await asyncio.get_running_loop().create_connection(
            lambda: Distant(target.domain, rtt), target.address, target.port)
    else:
        conn = await connect(target)
    conn.open_stream()
    await conn.expect(FEATURES, TIMEOUT)
    await _starttls(conn, TIMEOUT)
    conn.open_stream()
    await conn.expect(FEATURES, TIMEOUT)
    return conn


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _success(el: Element) -> Element:
    if el.tag != f"{{{SASL2}}}success":
        raise LoginError(f"SASL2 failed: {', '.join(c.tag for c in el) or el.tag}")
    return el


class Device:
    """One account's phone: its user-agent id, its FAST token and how often it used it."""

    def __init__(self, user: str, counted: bool = False) -> None:
        self.user = user
        self.counted = counted  # send XEP-0484's replay counter (needed with TLS 0-RTT only)
        self.agent = str(uuid.uuid4())
        self.token = ""
        self.count = 0

    def _authenticate(self, mechanism: str, initial: bytes, inner: str) -> str:
        return (f"<authenticate xmlns='{SASL2}' mechanism='{mechanism}'><initial-response>{_b64(initial)}"
                f"</initial-response><user-agent id='{self.agent}'><software>bench</software></user-agent>"
                f"{inner}</authenticate>")

    async def get_token(self, target: Target) -> None:
        """A SASL2 SCRAM login that asks for a token."""
        conn = await secured(target)
        client = ScramClient("SCRAM-SHA-256", self.user, PASSWORD)
        conn.send(self._authenticate("SCRAM-SHA-256", client.first(),
                                     f"<request-token xmlns='{FAST}' mechanism='HT-SHA-256-NONE'/>"))
        challenge = await conn.next(TIMEOUT)
        conn.send(f"<response xmlns='{SASL2}'>{_b64(client.final(base64.b64decode(challenge.text)))}</response>")
        token = _success(await conn.next(TIMEOUT)).find(f"{{{FAST}}}token")
        self.token = token.get("token")
        conn.close()

    async def fast(self, target: Target, inner: str, rtt: float = 0.0) -> tuple[Connection, Element]:
        """The one round trip: a FAST login with `inner` (Bind2, a resumption)."""
        conn = await secured(target, rtt)
        self.count += 1
        proof = initiator_proof(self.token, b"")
        count = f" count='{self.count}'" if self.counted else ""
        conn.send(self._authenticate("HT-SHA-256-NONE", self.user.encode() + b"\0" + proof,
                                     f"<fast xmlns='{FAST}'{count}/>{inner}"))
        return conn, _success(await conn.next(TIMEOUT))


async def scram_bound(target: Target, user: str) -> Connection:
    return await login(target, user, PASSWORD, "bench",
                       LoginOptions(mechanism="SCRAM-SHA-256", starttls=True, roster=False, presence=False))


async def fast_bound(target: Target, device: Device) -> Connection:
    conn, success = await device.fast(target, f"<bind xmlns='{BIND2}'><tag>bench</tag></bind>")
    conn.jid = success.findtext(f"{{{SASL2}}}authorization-identifier") or ""
    return conn


def _figures(latencies: list[float], seconds: float | None = None) -> dict[str, float]:
    ordered = sorted(latencies)
    figures = {"p50_ms": round(statistics.median(ordered) * 1000, 2),
               "p95_ms": round(ordered[int(len(ordered) * 0.95) - 1] * 1000, 2)}
    if seconds is not None:
        figures["per_s"] = round(len(ordered) / seconds, 1)
    return figures


async def login_rate(server: Parley, workers: int, logins: int,
                     way: Callable[[int], Awaitable[Connection]]) -> dict[str, float]:
    latencies: list[float] = []

    async def worker(n: int) -> None:
        for _ in range(logins):
            started = time.perf_counter()
            conn = await way(n)
            latencies.append(time.perf_counter() - started)
            conn.close()

    cpu = cpu_seconds(server.pid)
    started = time.perf_counter()
    await asyncio.gather(*(worker(n) for n in range(workers)))
    figures = _figures(latencies, time.perf_counter() - started)
    figures["server_cpu_ms_per_login"] = round((cpu_seconds(server.pid) - cpu) * 1000 / len(latencies), 2)
    return figures


async def _enable_sm(conn: Connection) -> str:
    conn.send(f"<enable xmlns='{SM}' resume='true'/>")
    return (await conn.expect(f"{{{SM}}}enabled", TIMEOUT)).get("id") or ""


async def _first_message(conn: Connection) -> None:
    await conn.expect(MESSAGE, TIMEOUT)


async def resume_scram(target: Target, user: str, previd: str, rtt: float) -> Connection:
    conn = await secured(target, rtt)
    await _sasl_scram(conn, user, PASSWORD, "SHA-256", TIMEOUT)
    conn.open_stream()
    await conn.expect(FEATURES, TIMEOUT)
    conn.send(f"<resume xmlns='{SM}' previd='{previd}' h='0'/>")
    await conn.expect(f"{{{SM}}}resumed", TIMEOUT)
    return conn


async def resume_fast(target: Target, device: Device, previd: str, rtt: float) -> Connection:
    conn, success = await device.fast(target, f"<resume xmlns='{SM}' previd='{previd}' h='0'/>", rtt)
    if success.find(f"{{{SM}}}resumed") is None:
        raise LoginError("the inline resumption failed")
    return conn


async def reconnect(target: Target, rounds: int, sender: Connection, user: str,
                    bound: Callable[[], Awaitable[Connection]],
                    resume: Callable[[str], Awaitable[Connection]]) -> dict[str, float]:
    """Time from a new connection to the first stanza that waited while the session was detached."""
    latencies: list[float] = []
    for i in range(rounds):
        conn = await bound()
        previd = await _enable_sm(conn)
        jid = conn.jid
        conn.abort()
        sender.send(f"<message to='{jid}' type='chat' id='m{i}'><body>while away {i}</body></message>")
        started = time.perf_counter()
        conn = await resume(previd)
        await _first_message(conn)
        latencies.append(time.perf_counter() - started)
        conn.close()
    return _figures(latencies)


async def measure(server: Parley, workers: int, logins: int, rounds: int, rtts: list[float]) -> dict[str, Any]:
    target = server.target
    users = [f"u{n}" for n in range(workers)]
    devices = [Device(u) for u in users]
    counted = [Device(u, counted=True) for u in users]  # another device of each user, with the counter
    for device in [*devices, *counted]:
        await device.get_token(target)
    results: dict[str, Any] = {"logins": {}, "reconnect": {}}
    ways: dict[str, Callable[[int], Awaitable[Connection]]] = {
        "scram": lambda n: scram_bound(target, users[n]),
        "fast": lambda n: fast_bound(target, devices[n]),
        "fast_counted": lambda n: fast_bound(target, counted[n]),
    }
    for name, way in ways.items():
        print(f"logins: {name} ...", file=sys.stderr, flush=True)
        results["logins"][name] = await login_rate(server, workers, logins, way)
    sender = await scram_bound(target, "sender")
    phone = Device("phone")
    await phone.get_token(target)
    for rtt in rtts:
        print(f"reconnect, {rtt:g} ms round trips ...", file=sys.stderr, flush=True)
        seconds = rtt / 1000
        results["reconnect"][f"rtt_{rtt:g}ms"] = {
            "scram": await reconnect(target, rounds, sender, "phone", lambda: scram_bound(target, "phone"),
                                     lambda previd, s=seconds: resume_scram(target, "phone", previd, s)),
            "fast": await reconnect(target, rounds, sender, "phone", lambda: fast_bound(target, phone),
                                    lambda previd, s=seconds: resume_fast(target, phone, previd, s)),
        }
    sender.close()
    scram, fast = results["logins"]["scram"], results["logins"]["fast"]
    results["fast_to_scram"] = {"login_rate": round(fast["per_s"] / scram["per_s"], 2)}
    for name, pair in results["reconnect"].items():
        results["fast_to_scram"][f"reconnect_p50_{name}"] = round(pair["fast"]["p50_ms"] / pair["scram"]["p50_ms"], 2)
    return results


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="parley-fast-bench-") as workdir:
        server = ParleyWithSM(Path(workdir), Profile(), args.address, args.port)
        users = [f"u{n}" for n in range(args.workers)] + ["sender", "phone"]
        await server.setup(users, PASSWORD, {})
        await server.start()
        try:
            figures = await measure(server, args.workers, args.logins, args.rounds, args.rtt)
        finally:
            await server.stop()
    return {"workers": args.workers, "logins_each": args.logins, "rounds": args.rounds, **figures}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--logins", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--address", default=None, help="where the Parley under test listens")
    parser.add_argument("--port", type=int, default=5222)
    parser.add_argument("--rtt", type=float, nargs="+", default=[0.0, 50.0],
                        help="round-trip times (ms) the reconnecting phone is measured at")
    print(json.dumps(asyncio.run(run(parser.parse_args(argv))), indent=2))


if __name__ == "__main__":
    main()
