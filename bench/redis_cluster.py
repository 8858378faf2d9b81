"""bench.cluster's message phases with two nodes on a Redis Cluster, beside the same on one Redis.

Each run starts a private Redis: one `redis-server`, then a Redis Cluster of three masters (tests/redis_cluster.py),
and two `parley serve --node` nodes on it (bench.cluster's nodes, one worker each, on a fresh PostgreSQL schema).
Then bench.cluster's throughput phase twice: users paired at random over the two nodes, and every pair crossing
nodes. The Redis counters (publications, bytes, CPU) are summed over the cluster's masters; on the Redis Cluster a
publication is an SPUBLISH to the receiving member's shard channel.

    .venv/bin/python -m bench.redis_cluster            # ~3 min; --quick ~2 min; bench/results/redis_cluster.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.cluster import (
    POSTGRES_URL,
    SIZES,
    ClusterNode,
    RedisUnderTest,
    Run,
    _phase,
    create_users,
    drop_schema,
    throughput_phase,
    users_needed,
)
from bench.procstat import cpu_seconds

RESULTS = Path(__file__).resolve().parent / "results" / "redis_cluster.json"


class RedisClusterUnderTest(RedisUnderTest):
    """A private Redis Cluster of three masters; its counters are the sums over the masters."""

    def __init__(self, workdir: Path) -> None:
        from tests.redis_cluster import RedisClusterProcesses

        self.processes = RedisClusterProcesses(workdir / "redis-cluster")
        super().__init__(workdir, self.processes.url)
        self.private = True
        self.shards: list[Any] = []
        self.pids: list[int] = []

    async def start(self) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.cluster import RedisCluster

        await asyncio.to_thread(self.processes.start)
        self.client = RedisCluster(host="127.0.0.1", port=self.processes.ports[0], protocol=2)
        self.shards = [aioredis.Redis(port=port, protocol=2) for port in self.processes.ports]
        self.pids = [int((await shard.info("server"))["process_id"]) for shard in self.shards]
        self.pid = self.pids[0]

    async def counters(self) -> dict[str, float]:
        total = {"publications": 0.0, "commands": 0.0, "bytes_in": 0.0, "bytes_out": 0.0, "cpu_s": 0.0}
        for shard, pid in zip(self.shards, self.pids, strict=True):
            stats = await shard.info("stats")
            commands = await shard.info("commandstats")
            total["publications"] += commands.get("cmdstat_spublish", {}).get("calls", 0)
            total["commands"] += stats["total_commands_processed"]
            total["bytes_in"] += stats["total_net_input_bytes"]
            total["bytes_out"] += stats["total_net_output_bytes"]
            total["cpu_s"] += cpu_seconds(pid)
        return total

    async def sessions(self, prefix: str, member: str) -> int:
        return int(await self.client.hlen(f"{prefix}:sessions:{{{member}}}"))

    async def stop(self, prefixes: list[str]) -> None:
        for client in (self.client, *self.shards):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.aclose()
        self.processes.stop()


async def _two_ways(run: Run, nodes: list[ClusterNode]) -> dict[str, Any]:
    return {"throughput": await throughput_phase(run, nodes),
            "throughput_cross": await throughput_phase(run, nodes, "cross")}


async def bench(mode: str, postgres_url: str, workdir: Path) -> dict[str, Any]:
    size = {**SIZES[mode], "nodes": [2]}
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "mode": mode}
    for label, redis in (("one_redis", RedisUnderTest(workdir, None)),
                         ("redis_cluster", RedisClusterUnderTest(workdir))):
        schema = f"parley_bench_{uuid.uuid4().hex[:12]}"
        run = Run(workdir / label, size, redis, f"{postgres_url}?schema={schema}", schema, random.Random(1))
        run.workdir.mkdir(parents=True, exist_ok=True)
        try:
            await redis.start()
            await create_users(run.storage_url, users_needed(size))
            results[label] = await _phase(run, f"{label}-k2", 2, _two_ways)
        finally:
            await redis.stop(run.prefixes)
            with contextlib.suppress(Exception):
                await drop_schema(postgres_url, schema)
        results[label]["errors"] = run.errors
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.redis_cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="bench.cluster's quick sizes (shorter windows)")
    mode.add_argument("--smoke", action="store_true", help="tiny sizes (tests)")
    parser.add_argument("--postgres", default=POSTGRES_URL, help=f"PostgreSQL database (default {POSTGRES_URL})")
    parser.add_argument("--json", type=Path, default=RESULTS, help=f"where to write results (default {RESULTS})")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="parley-bench-rc-") as tmp:
        mode = "smoke" if args.smoke else "quick" if args.quick else "full"
        results = asyncio.run(bench(mode, args.postgres, Path(tmp)))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    for label in ("one_redis", "redis_cluster"):
        for phase in ("throughput", "throughput_cross"):
            got = results[label].get(phase, {})
            print(f"{label:14} {phase:17} {got.get('messages_per_s')} messages/s, "
                  f"{got.get('node_cpu_us_per_message')} us node CPU/message, "
                  f"{got.get('redis_cpu_us_per_cross_message')} us Redis CPU/cross message, "
                  f"{got.get('redis_messages_per_publication')} messages/publication", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
