"""Archive queries on a large archive: what a client waits for when it opens a chat or searches.

    python -m bench.mam_query [--messages 1000000] [--contacts 100] [--stores sqlite,postgresql]
                              [--queries 20] [--pg-schema bench_mam] [--json FILE]

For each store, one user's archive is filled with `--messages` chat messages spread over `--contacts`
contacts and about a month (written straight into the store, in batches, as the archive module would write
them), then Parley starts on it and the user logs in over a socket and sends XEP-0313 queries, each kind
`--queries` times, timing each from the send of the <iq/> to the receipt of its result (all result
messages come before it). The kinds:

- `contact-last-page`: the last 50 messages with one contact (`with`, RSM `<before/>`): opening a chat;
- `contact-page-back`: the 50 before a message in the middle of that conversation (scrolling back);
- `contact-first-page`: the first 50 with one contact, forwards;
- `time-range`: the messages of one hour, all contacts, first page;
- `all-last-page`: the last 50 of the whole archive (a new device catching up);
- `fulltext`: a word found in about one body in 1,000 (`{urn:xmpp:fulltext:0}fulltext`), last page.

Each query counts the matching messages too (RSM `<count/>`), which is part of the time. Prosody and
ejabberd are not run: filling their archives with a million messages has no bulk path comparable to this
one (Prosody's file store keeps one list per day; ejabberd's needs its SQL schema), so the figures are
Parley's own on the two stores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.client import IQ, LoginOptions, login
from bench.loadgen import percentile
from bench.servers import Parley, Profile

PASSWORD = "bench"
OWNER = "owner"
MAM = "urn:xmpp:mam:2"
RSM = "http://jabber.org/protocol/rsm"
PAGE = 50
BATCH = 20000
SPAN = timedelta(days=30)
RARE_WORD = "zanzibar"  # put in about one body in RARE_EVERY
RARE_EVERY = 1000
WORDS = ("hello", "meeting", "tomorrow", "lunch", "project", "deploy", "review", "coffee", "thanks", "later",
         "weekend", "release", "ticket", "phone", "train", "docs", "server", "bug", "fixed", "great")
STORES = {
    "sqlite": None,  # Parley's default, in the server's data directory
    "postgresql": "postgresql+asyncpg://postgres@127.0.0.1:5432/test?schema={schema}",
}


class ParleyOnStore(Parley):
    """Parley with the archive on, on the given store (None: the default SQLite file)."""

    def __init__(self, workdir: Path, url: str | None, address: str | None, port: int) -> None:
        super().__init__(workdir, Profile(archive=True), address, port)
        self.url = url

    def _write_config(self) -> None:
        super()._write_config()
        if self.url:
            with self.config_file.open("a") as config:
                config.write(f'\n[storage]\nurl = "{self.url}"\n')


def body(rng: random.Random, n: int) -> str:
    words = rng.choices(WORDS, k=rng.randint(3, 12))
    if n % RARE_EVERY == 0:
        words[rng.randrange(len(words))] = RARE_WORD
    return " ".join(words)


async def fill(server: ParleyOnStore, messages: int, contacts: int) -> dict[str, Any]:
    """Create the owner and write the archive through its store, oldest first."""
    from sqlalchemy import text

    from server.config import load_config
    from server.registry import available
    from server.storage import open_storage
    from server.storage.archive import NewMessage

    await server.setup([OWNER], PASSWORD, {})
    config = load_config(server.config_file, known_modules=available())
    storage = await open_storage(config.storage.url)
    domain = server.domain
    rng = random.Random(7)
    start = datetime.now(UTC) - SPAN
    step = SPAN / messages
    began = time.perf_counter()
    try:
        for first in range(0, messages, BATCH):
            rows = []
            for n in range(first, min(first + BATCH, messages)):
                contact = f"c{n % contacts}@{domain}"
                outgoing = n % 2 == 0
                text_ = body(rng, n)
                sid = f"bench-{n:08d}"
                sender, receiver = (f"{OWNER}@{domain}/phone", contact) if outgoing else \
                    (f"{contact}/laptop", f"{OWNER}@{domain}")
                rows.append(NewMessage(
                    sid, start + step * n, contact, None if outgoing else "laptop", text_,
                    f"<message xmlns='jabber:client' from='{sender}' to='{receiver}' type='chat' "
                    f"id='m{n}'><body>{text_}</body><origin-id xmlns='urn:xmpp:sid:0' id='o{n}'/></message>",
                ))
            # Through the store, as the archive module writes: it queues the bodies for the full-text index.
            await storage.archive.append_many(domain, OWNER, rows)
            print(f"  {min(first + BATCH, messages):,} messages written", file=sys.stderr, end="\r", flush=True)
        async with storage.engine.begin() as conn:
            await conn.execute(text("ANALYZE"))
    finally:
        await storage.close()
    print(file=sys.stderr)
    return {"fill_seconds": time.perf_counter() - began, "start": start}


def query_xml(qid: str, fields: dict[str, str], rsm: str) -> str:
    form = "".join(f"<field var='{var}'><value>{value}</value></field>" for var, value in fields.items())
    return (f"<iq type='set' id='{qid}'><query xmlns='{MAM}' queryid='{qid}'><x xmlns='jabber:x:data' "
            f"type='submit'><field var='FORM_TYPE' type='hidden'><value>{MAM}</value></field>{form}</x>"
            f"<set xmlns='{RSM}'>{rsm}</set></query></iq>")


def kinds(domain: str, messages: int, contacts: int, start: datetime) -> dict[str, tuple[dict[str, str], str]]:
    contact = f"c{contacts // 2}@{domain}"
    middle = (messages // 2) - (messages // 2) % contacts + contacts // 2  # a message with that contact
    hour = start + SPAN / 2
    return {
        "contact-last-page": ({"with": contact}, f"<max>{PAGE}</max><before/>"),
        "contact-page-back": ({"with": contact}, f"<max>{PAGE}</max><before>bench-{middle:08d}</before>"),
        "contact-first-page": ({"with": contact}, f"<max>{PAGE}</max>"),
        "time-range": ({"start": stamp(hour), "end": stamp(hour + timedelta(hours=1))}, f"<max>{PAGE}</max>"),
        "all-last-page": ({}, f"<max>{PAGE}</max><before/>"),
        "fulltext": ({"{urn:xmpp:fulltext:0}fulltext": RARE_WORD}, f"<max>{PAGE}</max><before/>"),
    }


def stamp(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


async def measure(server: ParleyOnStore, messages: int, contacts: int, start: datetime,
                  queries: int) -> dict[str, Any]:
    conn = await login(server.target, OWNER, PASSWORD, "bench", LoginOptions(roster=False, presence=False))
    results: dict[str, Any] = {}
    try:
        for kind, (fields, rsm) in kinds(server.domain, messages, contacts, start).items():
            times = []
            for k in range(queries):
                qid = f"{kind}-{k}"
                received = 0
                sent = time.perf_counter()
                conn.send(query_xml(qid, fields, rsm))
                while (el := await conn.next(60.0)).tag != IQ or el.get("id") != qid:
                    received += 1
                times.append((time.perf_counter() - sent) * 1000)
                if el.get("type") != "result":
                    raise RuntimeError(f"{kind}: the server answered {el.get('type')}")
                total = el.find(f"{{{MAM}}}fin/{{{RSM}}}set/{{{RSM}}}count")
            results[kind] = {"p50_ms": statistics.median(times), "p95_ms": percentile(times, 0.95),
                             "page": received, "count": int(total.text) if total is not None else None}
    finally:
        conn.close()
    return results


async def drop_schema(url: str, schema: str) -> None:
    """Start and end with no bench schema, so that a run never sees another run's archive."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url.split("?")[0])
    try:
        async with engine.begin() as conn:
            await conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
    finally:
        await engine.dispose()


async def run_store(store: str, args: argparse.Namespace) -> dict[str, Any]:
    url = STORES[store] and STORES[store].format(schema=args.pg_schema)
    if url:
        await drop_schema(url, args.pg_schema)
    try:
        return await measure_store(store, url, args)
    finally:
        if url:
            await drop_schema(url, args.pg_schema)


async def measure_store(store: str, url: str | None, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="parley-mam-bench-") as workdir:
        server = ParleyOnStore(Path(workdir), url, args.address, args.port)
        print(f"{store}: filling an archive of {args.messages:,} messages ...", file=sys.stderr, flush=True)
        filled = await fill(server, args.messages, args.contacts)
        await server.start()
        try:
            queries = await measure(server, args.messages, args.contacts, filled["start"], args.queries)
        finally:
            await server.stop()
        return {"fill_seconds": filled["fill_seconds"], "queries": queries}


def table(results: dict[str, Any]) -> str:
    stores = list(results["stores"])
    lines = ["| query | " + " | ".join(f"{s} p50 ms | {s} p95 ms" for s in stores) + " | page | matching |",
             "| --- | " + " | ".join("---: | ---:" for _ in stores) + " | ---: | ---: |"]
    first = results["stores"][stores[0]]["queries"]
    for kind in first:
        cells = [f"{results['stores'][s]['queries'][kind]['p50_ms']:.1f} | "
                 f"{results['stores'][s]['queries'][kind]['p95_ms']:.1f}" for s in stores]
        lines.append(f"| {kind} | " + " | ".join(cells) + f" | {first[kind]['page']} | {first[kind]['count']:,} |")
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"messages": args.messages, "contacts": args.contacts, "queries": args.queries,
                               "stores": {}}
    for store in args.stores.split(","):
        if store not in STORES:
            raise SystemExit(f"unknown store {store!r}; choose from {', '.join(STORES)}")
        results["stores"][store] = await run_store(store, args)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--contacts", type=int, default=100)
    parser.add_argument("--stores", default="sqlite,postgresql")
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--address", default=None)
    parser.add_argument("--port", type=int, default=5222)
    parser.add_argument("--pg-schema", default="bench_mam", help="PostgreSQL schema, dropped before and after")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    results = asyncio.run(main_async(args))
    print(table(results))
    for store, figures in results["stores"].items():
        print(f"{store}: archive filled in {figures['fill_seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
