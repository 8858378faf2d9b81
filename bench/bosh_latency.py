"""BOSH latency (XEP-0124/0206): pairs of long-polling web clients, one message at a time.

Each client logs in over BOSH (SCRAM-SHA-1, restart, bind) and keeps one request held open, as Converse.js
and every Strophe.js client do (hold 1, wait 60); a message goes out on a request of its own. Each pair's
sender sends one message to its receiver and waits until the receiver's held request brings it back before
it sends the next, so the figure is the time one message takes from a browser's POST to the other browser's
answered long poll, with the HTTP round trips BOSH adds; messages/s is how many such trips all pairs make.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from typing import TYPE_CHECKING, Any
from xml.etree.ElementTree import Element, fromstring

import aiohttp

from server.sasl.scram import ScramClient

if TYPE_CHECKING:
    from bench.loadgen import Run

HTTPBIND = "http://jabber.org/protocol/httpbind"
XBOSH = "urn:xmpp:xbosh"
SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
BIND = "urn:ietf:params:xml:ns:xmpp-bind"
FEATURES = "{http://etherx.jabber.org/streams}features"
MESSAGE = "{jabber:client}message"


class BoshError(Exception):
    pass


class BoshClient:
    """A long-polling client: one empty request always open, stanzas handed to `inbox`."""

    def __init__(self, http: aiohttp.ClientSession, url: str, domain: str) -> None:
        self.http = http
        self.url = url
        self.domain = domain
        self.rid = 1_000_000
        self.sid = ""
        self.jid = ""
        self.inbox: asyncio.Queue[Element] = asyncio.Queue()
        self._poller: asyncio.Task[None] | None = None

    async def _post(self, attrs: str, payload: str = "") -> Element:
        self.rid += 1
        body = (f"<body xmlns='{HTTPBIND}' xmlns:xmpp='{XBOSH}' rid='{self.rid}'"
                f"{f' sid={chr(39)}{self.sid}{chr(39)}' if self.sid else ''} {attrs}>{payload}</body>")
        async with self.http.post(self.url, data=body.encode(), headers={
                "Content-Type": "text/xml; charset=utf-8", "Host": self.domain}) as response:
            text = await response.read()
        answer = fromstring(text)
        if answer.get("type") == "terminate":
            raise BoshError(f"terminated: {answer.get('condition')}")
        return answer

    async def _until(self, answer: Element, tag: str) -> Element:
        while (found := answer.find(tag)) is None:
            answer = await self._post("")
        return found

    async def login(self, user: str, password: str) -> None:
        answer = await self._post(f"to='{self.domain}' xml:lang='en' ver='1.6' wait='60' hold='1' "
                                  f"content='text/xml; charset=utf-8' xmpp:version='1.0'")
        self.sid = answer.get("sid", "")
        await self._until(answer, FEATURES)
        scram = ScramClient("SCRAM-SHA-1", user, password)
        first = base64.b64encode(scram.first()).decode()
        answer = await self._post("", f"<auth xmlns='{SASL}' mechanism='SCRAM-SHA-1'>{first}</auth>")
        challenge = await self._until(answer, f"{{{SASL}}}challenge")
        final = base64.b64encode(scram.final(base64.b64decode(challenge.text or ""))).decode()
        answer = await self._post("", f"<response xmlns='{SASL}'>{final}</response>")
        await self._until(answer, f"{{{SASL}}}success")
        answer = await self._post(f"to='{self.domain}' xml:lang='en' xmpp:restart='true'")
        await self._until(answer, FEATURES)
        answer = await self._post("", f"<iq xmlns='jabber:client' type='set' id='bind'><bind xmlns='{BIND}'>"
                                      "<resource>web</resource></bind></iq>")
        iq = await self._until(answer, "{jabber:client}iq")
        self.jid = iq.findtext(f"{{{BIND}}}bind/{{{BIND}}}jid") or ""
        self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            self._deliver(await self._post(""))

    def _deliver(self, answer: Element) -> None:
        for child in answer:
            self.inbox.put_nowait(child)

    async def send(self, payload: str) -> None:
        self._deliver(await self._post("", payload))

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        with contextlib.suppress(BoshError, aiohttp.ClientError, asyncio.TimeoutError):
            await asyncio.wait_for(self._post("type='terminate'"), 5)


async def _pair(sender: BoshClient, receiver: BoshClient, stats: dict[str, Any]) -> None:
    n = 0
    while not stats["stop"]:
        n += 1
        stamp = time.perf_counter_ns()
        await sender.send(f"<message xmlns='jabber:client' to='{receiver.jid}' type='chat' id='m{n}'>"
                          f"<body>{stamp}</body></message>")
        while True:
            got = await receiver.inbox.get()
            if got.tag == MESSAGE and got.findtext("{jabber:client}body") == str(stamp):
                break
        if stats["measuring"]:
            stats["latencies"].append(time.perf_counter_ns() - stamp)


async def bosh_latency(run: Run) -> dict[str, Any]:
    from bench.loadgen import percentile, rss_kib

    spec = run.spec
    url, domain = spec["bosh_url"], run.target.domain
    if not url:
        raise ValueError("this server has no BOSH endpoint in the benchmark")
    pairs_wanted = spec["bosh_pairs"]
    users = [f"u{i}" for i in range(2 * pairs_wanted)]
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as http:
        gate = asyncio.Semaphore(20)

        async def one(user: str) -> BoshClient | None:
            client = BoshClient(http, url, domain)
            async with gate:
                try:
                    await client.login(user, run.password)
                except (BoshError, aiohttp.ClientError, OSError, ValueError) as exc:
                    run.failed(exc)
                    return None
            return client

        clients = await asyncio.gather(*(one(u) for u in users))
        pairs = [(clients[2 * i], clients[2 * i + 1]) for i in range(pairs_wanted)
                 if clients[2 * i] is not None and clients[2 * i + 1] is not None]
        if not pairs:
            raise ValueError("no pair of BOSH clients could log in")
        if len(pairs) < pairs_wanted:
            run.notes.append(f"only {len(pairs)} of {pairs_wanted} pairs logged in")
        stats: dict[str, Any] = {"stop": False, "measuring": False, "latencies": []}
        tasks = [asyncio.ensure_future(_pair(s, r, stats)) for s, r in pairs]  # type: ignore[arg-type]
        await asyncio.sleep(spec["warmup"])
        window = run.cpu_window()
        stats["measuring"] = True
        started = time.monotonic()
        await asyncio.sleep(spec["duration"])
        stats["measuring"] = False
        elapsed = time.monotonic() - started
        cpu = window.percent()
        stats["stop"] = True
        await asyncio.wait(tasks, timeout=5)
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                run.failed(task.exception())  # type: ignore[arg-type]
            task.cancel()
        rss = rss_kib(run.server_pid)
        await asyncio.gather(*(c.close() for c in clients if c is not None))
    lat = stats["latencies"]
    p50, p99 = percentile(lat, 0.5), percentile(lat, 0.99)
    return {
        "metrics": {
            "bosh_messages_per_s": len(lat) / elapsed,
            "bosh_latency_p50_ms": p50 / 1e6 if p50 is not None else None,
            "bosh_latency_p99_ms": p99 / 1e6 if p99 is not None else None,
        },
        "counts": {"delivered": len(lat), "pairs": len(pairs), "seconds": round(elapsed, 2)},
        "cpu": cpu,
        "server_rss_kib": rss,
    }
