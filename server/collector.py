"""The cyclic garbage collector, set for a server process once it has started.

CPython's default thresholds (700, 10, 10) suit short programs: with the archive on, the server spent about a
fifth of its CPU in the collector (measured with `gc.callbacks` in `bench.run --profile archive-on`, the
1:1 throughput scenario). Two things made that: every full collection (about two a second under that load,
some 70 ms each) traversed everything start-up made, the modules, SQLAlchemy's tables and compiled
statements, which live as long as the process; and every collection of the middle generation (one per ten
of the youngest) traversed the thousand-odd messages in flight, their elements, futures and tasks, 10-15 ms
each time. The messages' objects are freed by reference counting as soon as they are delivered (the same
measurement found no cyclic garbage under that load), so traversing them again and again found nothing.

So, once the server is up: what start-up made is frozen (`gc.freeze`: kept out of every collection), and the
older generations are collected less often. The youngest keeps its default, so cycles among new objects are
still found as soon as before; a cycle that outlives it waits longer. Measured the same way: the collector's
share went from 21% to about 7%.
"""

from __future__ import annotations

import gc

# The youngest generation as CPython sets it; the middle one collected once per 100 of those, not 10; the
# oldest once per 20 of the middle (and, as always, only when a quarter of it is new since the last one).
# (500 and 100 saved 0.3% more of the CPU, but left a login storm's cyclic garbage longer in the oldest.)
THRESHOLDS = (700, 100, 20)


def settle() -> None:
    """Freeze what start-up made and collect the older generations less often (see the module's text).

    Called by the `serve` command once the server has started, not by `Server` itself: a test process that
    starts many servers would otherwise freeze, for good, the objects of the tests before."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
