"""The fuzz targets of tests/fuzz/: every seed and every input that once found a defect replayed in-process,
and a bounded coverage-guided run of each target under atheris (at most FUZZ_SECONDS in all), which
fails with the crashing input. The longer run is in docs/fuzzing.md."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.jid import JID, JIDError
from tests.fuzz.targets import TARGETS

HERE = Path(__file__).parent / "fuzz"
ROOT = HERE.parent.parent
FUZZ_SECONDS = int(os.environ.get("PARLEY_FUZZ_SECONDS", "30"))  # with the start-ups, within a minute
SAVED = sorted(p for kind in ("corpus", "crashes") for p in (HERE / kind).glob("*/*") if p.is_file())


@pytest.mark.parametrize("path", [p for p in SAVED if p.parent.name in TARGETS],
                         ids=lambda p: f"{p.parent.parent.name}/{p.parent.name}/{p.name}")
def test_saved_input(path: Path) -> None:
    TARGETS[path.parent.name](path.read_bytes())


def test_every_target_has_seeds() -> None:
    assert set(TARGETS) <= {p.name for p in (HERE / "corpus").iterdir()}


@pytest.mark.timeout(FUZZ_SECONDS + 60)
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzz(target: str, tmp_path: Path) -> None:
    seconds = max(1, FUZZ_SECONDS // len(TARGETS))
    found = tmp_path / "corpus"
    found.mkdir()
    run = subprocess.run(
        [sys.executable, "-m", "tests.fuzz.run", target, f"-max_total_time={seconds}", "-rss_limit_mb=1024",
         f"-artifact_prefix={tmp_path}/", "-print_final_stats=1", str(found), str(HERE / "corpus" / target)],
        cwd=ROOT, capture_output=True, text=True, timeout=seconds + 60)
    crashes = [p for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-", "leak-"))]
    assert run.returncode == 0 and not crashes, (
        f"{target}: {[(p.name, p.read_bytes()[:300]) for p in crashes]}\n{run.stderr[-4000:]}")
    assert "stat::number_of_executed_units" in run.stderr


def test_an_a_label_prepares_as_its_u_label_would() -> None:
    """Found by the jid fuzzer: 'xn--bce' decodes to U+13EB (Cherokee capital), which was kept as it was;
    typed as a U-label it is lower-cased to U+ABBB, which IDNA2008 disallows. So the JID Parley stored
    and wrote could not be read back. Both forms now get the same answer."""
    for domain in ("xn--bce", "\u13eb"):
        with pytest.raises(JIDError):
            JID.parse(f"user@{domain}")
    assert str(JID.parse("user@xn--bcher-kva.example")) == "user@b\u00fccher.example"
