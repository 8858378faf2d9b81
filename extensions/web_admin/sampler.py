"""What the dashboard charts: the server's metrics sampled every few seconds into ring buffers.

The server keeps counters and gauges for Prometheus (`server.metrics`), which keeps no history: that is
Prometheus's job. An admin without one still wants to see the last hour and the last day, so the web
admin reads the same metrics (the registry's families, federation's collector included) at an interval
and keeps two rings per series: every sample of the last hour, and the day in five-minute averages.
Counters become rates (per second over the interval); a counter that went down (a restart of a worker's
count) counts as zero, not as a negative rate. The history is per process, and starts with it.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.server import Server

HOUR = 3600.0
DAY = 86400.0
DAY_STEP = 300.0  # seconds that one point of the day's chart stands for


@dataclass(frozen=True)
class Series:
    """One chart: how to read its value from the metric samples (name -> labels -> value)."""

    key: str
    title: str
    unit: str
    read: Callable[[dict[str, list[tuple[dict[str, str], float]]]], float | None]
    rate: bool = False  # the value is a counter: chart its increase per second


def _total(name: str, **labels: str) -> Callable[[dict[str, list[tuple[dict[str, str], float]]]], float | None]:
    """The sum of the samples of `name` whose labels include `labels`; None when the metric is not exported
    (federation off: no s2s chart points rather than zeros that look like a fact)."""
    def read(samples: dict[str, list[tuple[dict[str, str], float]]]) -> float | None:
        found = samples.get(name)
        if found is None:
            return None
        return sum(value for have, value in found if all(have.get(k) == v for k, v in labels.items()))
    return read


def _sum(*readers: Callable[[dict[str, list[tuple[dict[str, str], float]]]], float | None]
         ) -> Callable[[dict[str, list[tuple[dict[str, str], float]]]], float | None]:
    def read(samples: dict[str, list[tuple[dict[str, str], float]]]) -> float | None:
        values = [v for v in (r(samples) for r in readers) if v is not None]
        return sum(values) if values else None
    return read


SERIES = (
    Series("sessions", "Client sessions", "sessions", _total("parley_sessions")),
    Series("messages", "Messages from clients", "per second",
           _total("parley_c2s_stanzas_received_total", kind="message"), rate=True),
    Series("logins", "Logins", "per second", _total("parley_c2s_authentications_total", outcome="success"),
           rate=True),
    Series("failed_logins", "Failed logins", "per second",
           _total("parley_c2s_authentications_total", outcome="failure"), rate=True),
    Series("s2s_links", "Server-to-server links", "links", _total("parley_s2s_links")),
    Series("queues", "Queued stanzas (archive, federation)", "stanzas",
           _sum(_total("parley_archive_queue"), _total("parley_s2s_queued_stanzas"))),
)


@dataclass
class Ring:
    """The points of one series: (time, value), the oldest dropped first."""

    size: int
    points: deque[tuple[float, float]] = field(default_factory=deque)

    def add(self, when: float, value: float) -> None:
        self.points.append((when, value))
        while len(self.points) > self.size:
            self.points.popleft()


@dataclass
class History:
    """A series' hour (every sample) and day (DAY_STEP averages, the current step still filling)."""

    hour: Ring
    day: Ring = field(default_factory=lambda: Ring(int(DAY / DAY_STEP)))
    _step: float = -1.0
    _step_values: list[float] = field(default_factory=list)

    def add(self, when: float, value: float) -> None:
        self.hour.add(when, value)
        step = when - when % DAY_STEP
        if step != self._step and self._step_values:
            self.day.add(self._step, sum(self._step_values) / len(self._step_values))
            self._step_values = []
        self._step = step
        self._step_values.append(value)

    def day_points(self) -> list[tuple[float, float]]:
        """The day's averages and the step now filling."""
        current = [(self._step, sum(self._step_values) / len(self._step_values))] if self._step_values else []
        return [*self.day.points, *current]


class Sampler:
    """Reads the metrics every `interval` seconds into a `History` per series."""

    def __init__(self, server: Server, interval: float, clock: Callable[[], float] = time.time) -> None:
        self.server = server
        self.interval = interval
        self.clock = clock
        self.histories = {s.key: History(Ring(max(2, int(HOUR / interval)))) for s in SERIES}
        # Each host's sessions in this process, for its own admins, who see nothing of the others.
        self.host_sessions: dict[str, History] = {}
        self._last: dict[str, tuple[float, float]] = {}  # a counter's previous reading, for its rate
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval)

    def _samples(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in self.server.metrics.registry.collect():
            for sample in family.samples:
                samples.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
        return samples

    def sample(self) -> None:
        """Read every series once (the loop does it each interval; a test may call it)."""
        now = self.clock()
        samples = self._samples()
        for series in SERIES:
            value = series.read(samples)
            if value is None:
                continue
            if series.rate:
                previous = self._last.get(series.key)
                self._last[series.key] = (now, value)
                if previous is None or now <= previous[0]:
                    continue
                value = max(0.0, value - previous[1]) / (now - previous[0])
            self.histories[series.key].add(now, value)
        by_host = Counter(session.host.name for session in self.server.sessions.all() if not session.elsewhere)
        for name in {*by_host, *self.host_sessions}:
            if name not in self.server.hosts:
                self.host_sessions.pop(name, None)  # a tenant removed
                continue
            history = self.host_sessions.setdefault(name, History(Ring(self.histories["sessions"].hour.size)))
            history.add(now, by_host.get(name, 0))

    def points(self, key: str, span: str, host: str | None = None) -> list[tuple[float, float]]:
        """The points of a series (of a host's sessions with `host`): every sample of the last hour, or the
        day's averages for 'day'."""
        history = self.histories[key] if host is None else self.host_sessions.get(host)
        if history is None:
            return []
        return history.day_points() if span == "day" else list(history.hour.points)


def latest(sampler: Sampler) -> Iterable[tuple[Series, float | None]]:
    """Each series and its last value (None before the first sample)."""
    for series in SERIES:
        points = sampler.histories[series.key].hour.points
        yield series, points[-1][1] if points else None
