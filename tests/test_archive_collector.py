"""The garbage collector's settings for a started server (server/collector.py), which the archive-on
throughput depends on: a fifth of the server's CPU went to the collector with CPython's defaults."""

from __future__ import annotations

import subprocess
import sys

from server import collector

PROBE = """
import gc
from server import collector
before = gc.get_freeze_count()
kept = [[i] for i in range(10000)]  # what a server's start-up leaves, as far as the collector is concerned
collector.settle()
print(before, gc.get_freeze_count(), *gc.get_threshold())
"""


def test_settle_freezes_what_start_up_made_and_spaces_the_older_collections() -> None:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=60)
    before, frozen, *thresholds = map(int, done.stdout.split())
    assert before == 0 and frozen >= 10000
    assert tuple(thresholds) == collector.THRESHOLDS
    assert collector.THRESHOLDS[0] == 700 and collector.THRESHOLDS[1] > 10  # the youngest as CPython's default

