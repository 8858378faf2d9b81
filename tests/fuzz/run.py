"""Run one fuzz target under atheris (libFuzzer), coverage-guided over Parley's own code.

    python -m tests.fuzz.run TARGET [libFuzzer options] [CORPUS_DIR ...]

e.g. `python -m tests.fuzz.run jid -max_total_time=600 /tmp/jid-corpus tests/fuzz/corpus/jid`: new inputs
go to the first folder, the seeds are read from the others. A crash is written to `-artifact_prefix`
(crash-<sha1>); copy it into tests/fuzz/crashes/TARGET/ so that tests/test_fuzz.py replays it for good.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["server", "extensions.websocket"]):
    from tests.fuzz.targets import TARGETS


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else ""
    if name not in TARGETS:
        sys.exit(f"usage: python -m tests.fuzz.run {{{'|'.join(TARGETS)}}} [libFuzzer options] [corpus ...]")
    atheris.Setup([sys.argv[0], *sys.argv[2:]], TARGETS[name])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
