"""CPU time and memory of processes from /proc, so a saturated generator or server shows in the results."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of all threads of `pid` and of its children (a server's worker processes)."""
    total = 0.0
    for process in (pid, *children(pid)):
        with open(f"/proc/{process}/stat") as fh:
            # The command name may hold spaces; the fields after its closing parenthesis are fixed.
            fields = fh.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / _TICK
    return total


def rss_kib(pid: int) -> int:
    """Resident memory of `pid` and of its children."""
    total = 0
    for process in (pid, *children(pid)):
        with open(f"/proc/{process}/statm") as fh:
            total += int(fh.read().split()[1]) * _PAGE // 1024
    return total


def children(pid: int) -> list[int]:
    """Direct children of `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            found.append(int(entry))
    return found


def find_descendant(pid: int, comm: str) -> int | None:
    """The first process named `comm` in the tree under `pid` (itself included)."""
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            with open(f"/proc/{current}/comm") as fh:
                if fh.read().strip() == comm:
                    return current
        except OSError:
            continue
        pending.extend(children(current))
    return None


@dataclass
class CpuWindow:
    """CPU use of some processes over a wall-clock window, in percent of one core."""

    pids: dict[str, int]

    def __post_init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self._wall = time.monotonic()
        self._cpu = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def percent(self) -> dict[str, float]:
        wall = max(time.monotonic() - self._wall, 1e-6)
        return {name: round(100.0 * (cpu_seconds(pid) - self._cpu[name]) / wall, 1)
                for name, pid in self.pids.items()}
