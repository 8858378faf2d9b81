"""Prometheus metrics (`/metrics`) and a health check (`/health`) on the `http` listeners.

The hot path only adds to plain ints (`Stats`, `LatencyHistogram`); nothing is formatted or looked up
by label per stanza. A collector reads those ints, the session directory and the stores when Prometheus
scrapes, and turns them into metric families. Parts outside the core (federation) add collectors of
their own with `Metrics.add_collector`; stores that count failed writes (`Outage`) are watched with
`Metrics.watch`.

`/metrics` answers the networks the HTTP API answers (`[http_api] allowed_networks`, loopback by
default): the same operators read both, and a second list to keep in step would only drift. `/health`
answers anyone, as a load balancer or an orchestrator asks it from wherever it runs; it says no more
than whether storage answers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from sqlalchemy import Connection, func, select

from server.http import within
from server.stanza import KINDS
from server.storage.engine import Outage, read, storage_error_text
from server.storage.schema import offline

if TYPE_CHECKING:
    from aiohttp import web
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import HistogramMetricFamily, Metric

    from server.server import Server

log = logging.getLogger("parley.metrics")

# Seconds: a delivery or a commit is a few milliseconds on a healthy server, seconds on a sick one.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LAG_INTERVAL = 0.25  # seconds between two looks at the event loop
STORAGE_TIMEOUT = 2.0  # seconds /health and /metrics wait for the database


class LatencyHistogram:
    """A histogram of plain ints: `observe` costs a bisection and two additions."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one: above every bucket
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.buckets, seconds)] += 1
        self.sum += seconds

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        from prometheus_client.core import HistogramMetricFamily

        cumulative, total = [], 0
        for bound, count in zip((*map(str, self.buckets), "+Inf"), self.counts, strict=True):
            total += count
            cumulative.append((bound, total))
        return HistogramMetricFamily(name, documentation, buckets=cumulative, sum_value=self.sum)


class Stats:
    """What the core counts as it goes, read at scrape time."""

    def __init__(self) -> None:
        # Stanza tag -> count, from clients and to clients; a Counter, so that an element of another name
        # (a module's mistake) is counted as 'other' rather than failing the send.
        self.received: Counter[str] = Counter(dict.fromkeys(KINDS, 0))
        self.sent: Counter[str] = Counter(dict.fromkeys(KINDS, 0))
        self.auth: dict[tuple[str, str], int] = {}  # (mechanism, "success" or "failure") -> count
        self.delivery = LatencyHistogram()  # a client's message: read -> handed to its recipients
        self.loop_lag = LatencyHistogram()

    def authenticated(self, mechanism: str, outcome: str) -> None:
        key = (mechanism, outcome)
        self.auth[key] = self.auth.get(key, 0) + 1


class Metrics:
    """The registry Prometheus scrapes, its HTTP paths and the event-loop lag sampler."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self._registry: CollectorRegistry | None = None  # made at the first scrape: see `registry`
        self._collectors: list[_Collector] = []  # the parts' collectors, registered with the registry
        self._outages: weakref.WeakSet[Outage] = weakref.WeakSet()
        self._lag_task: asyncio.Task[None] | None = None
        self.offline_depth: int | None = None  # read before each scrape
        self.storage_up = False
        server.http.add("GET", "/metrics", self.scrape)
        server.http.add("GET", "/health", self.health)

    @property
    def registry(self) -> CollectorRegistry:
        """The registry Prometheus reads, made when first asked for: prometheus_client is imported only by a
        server that is scraped (or whose metrics a test reads), not by every process."""
        if self._registry is None:
            from prometheus_client import CollectorRegistry, ProcessCollector

            self._registry = CollectorRegistry(auto_describe=False)
            self._registry.register(_CoreCollector(self))
            ProcessCollector(namespace="", registry=self._registry)  # resident memory, descriptors, CPU time
            for collector in self._collectors:
                self._registry.register(collector)
        return self._registry

    def add_collector(self, collect: Callable[[], Iterable[Metric]]) -> Callable[[], None]:
        """Export what `collect` returns at each scrape (a part outside the core: federation); returns the undo,
        which may be called more than once (a part stopped twice)."""
        collector = _Collector(collect)
        self._collectors.append(collector)
        if self._registry is not None:
            self._registry.register(collector)

        def remove() -> None:
            if collector in self._collectors:
                self._collectors.remove(collector)
                if self._registry is not None:
                    self._registry.unregister(collector)
        return remove

    def watch(self, outage: Outage) -> None:
        """Export the failed writes `outage` counts, for as long as its owner lives."""
        self._outages.add(outage)

    def start(self) -> None:
        self.watch(self.server.storage.archive.outage)
        self._lag_task = asyncio.get_running_loop().create_task(self._sample_lag())

    def stop(self) -> None:
        if self._lag_task is not None:
            self._lag_task.cancel()
            self._lag_task = None

    async def _sample_lag(self) -> None:
        """How late the loop wakes a sleeper: the time every reader and timer waits behind busy callbacks."""
        loop = asyncio.get_running_loop()
        lag = self.server.stats.loop_lag
        while True:
            due = loop.time() + LAG_INTERVAL
            await asyncio.sleep(LAG_INTERVAL)
            lag.observe(max(0.0, loop.time() - due))

    async def _check_storage(self) -> str | None:
        """None when the database answers within STORAGE_TIMEOUT, else why not; reads the offline depth."""
        engine = self.server.storage.engine
        try:
            async with asyncio.timeout(STORAGE_TIMEOUT):
                self.offline_depth = int(await read(engine, _count_offline) or 0)
        except Exception as exc:
            self.storage_up = False
            return storage_error_text(exc) if not isinstance(exc, TimeoutError) else "no answer in time"
        self.storage_up = True
        return None

    async def scrape(self, request: web.Request) -> web.Response:
        from aiohttp import web
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        if not self._allowed(request):
            raise web.HTTPForbidden(text="metrics are not served to this address")
        await self._check_storage()
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def health(self, _: web.Request) -> web.Response:
        from aiohttp import web

        problem = await self._check_storage()
        body = {"status": "ok" if problem is None else "unavailable", "storage": problem or "ok",
                "uptime": int(time.time() - self.server.started), "sessions": self.server.sessions.count()}
        return web.Response(status=200 if problem is None else 503, text=json.dumps(body),
                            content_type="application/json")

    def _allowed(self, request: web.Request) -> bool:
        """The HTTP API's networks, for the client behind a trusted proxy too (a proxy on loopback must not
        open the metrics to everyone it forwards)."""
        return within(self.server.http.peer(request).address, self.server.config.http_api.allowed_networks)

    def outages(self) -> dict[str, int]:
        failures: dict[str, int] = {}
        for outage in list(self._outages):
            failures[outage.what] = failures.get(outage.what, 0) + outage.failures
        return failures


def _count_offline(conn: Connection) -> int | None:
    """The messages stored for offline users: the probe of /health, and a gauge."""
    return conn.execute(select(func.count()).select_from(offline)).scalar()


class _Collector:
    """A collector as prometheus_client's registry calls it (`collect`), without its base class: this module is
    imported by every server, prometheus_client only by one that is scraped."""

    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterator[Metric]:
        yield from self._collect()


class _CoreCollector:
    """The core's counters, read when Prometheus scrapes."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        server = self.metrics.server
        stats: Stats = server.stats
        sessions = GaugeMetricFamily("parley_c2s_sessions", "bound client sessions by transport",
                                     labels=["transport"])
        by_transport: dict[str, int] = {}
        for conn in server.connections:
            if conn.session is not None:
                by_transport[conn.transport_label] = by_transport.get(conn.transport_label, 0) + 1
        for transport, count in sorted(by_transport.items()):
            sessions.add_metric([transport], count)
        yield sessions
        yield GaugeMetricFamily("parley_sessions", "sessions in the session directory, detached ones included",
                                value=server.sessions.count())
        yield GaugeMetricFamily("parley_c2s_connections", "open client connections, bound or not",
                                value=len(server.connections))
        for name, what, counts in (("parley_c2s_stanzas_received", "stanzas read from clients", stats.received),
                                   ("parley_c2s_stanzas_sent", "stanzas written to clients", stats.sent)):
            family = CounterMetricFamily(name, what + ", by kind", labels=["kind"])
            by_kind: Counter[str] = Counter()
            for tag, count in counts.items():
                by_kind[KINDS.get(tag, "other")] += count
            for kind, count in sorted(by_kind.items()):
                family.add_metric([kind], count)
            yield family
        auth = CounterMetricFamily("parley_c2s_authentications", "SASL authentications by mechanism and outcome",
                                   labels=["mechanism", "outcome"])
        for (mechanism, outcome), count in sorted(stats.auth.items()):
            auth.add_metric([mechanism, outcome], count)
        yield auth
        yield stats.delivery.family("parley_delivery_seconds",
                                    "a client's message from read to handed to its recipients or storage")
        yield stats.loop_lag.family("parley_event_loop_lag_seconds", "how late the event loop wakes a timer")
        archive = server.storage.archive
        yield archive.commits.family("parley_archive_commit_seconds", "one group commit of the message archive")
        yield GaugeMetricFamily("parley_archive_queue", "messages waiting for the archive's next commit",
                                value=archive.queued)
        if self.metrics.offline_depth is not None:
            yield GaugeMetricFamily("parley_offline_messages", "messages stored for offline users",
                                    value=self.metrics.offline_depth)
        yield GaugeMetricFamily("parley_storage_up", "1 when the database answered before this scrape",
                                value=int(self.metrics.storage_up))
        failures = CounterMetricFamily("parley_storage_write_failures", "failed writes (a full disk, an outage)",
                                       labels=["store"])
        for what, count in sorted(self.metrics.outages().items()):
            failures.add_metric([what], count)
        yield failures
        yield GaugeMetricFamily("parley_uptime_seconds", "seconds since the server started",
                                value=time.time() - server.started)
