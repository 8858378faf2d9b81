"""SIGHUP, what `systemctl reload` sends, reloads the configuration of a running `parley serve` as
`parleyctl reload_config` does: the process and its clients stay, the outcome is logged, and with
`--workers` every worker reloads."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from pathlib import Path

from tests.conftest import Harness, free_port
from tests.test_cli import parley, start_process, stop_process
from tests.test_register import FEATURE, unauthenticated

RELOADED = "SIGHUP: configuration reloaded"


async def wait_for_lines(stream: asyncio.StreamReader, text: str, count: int = 1, timeout: float = 20) -> list[str]:
    """Read the server's log until `count` lines hold `text`; fails when the log ends or time runs out."""
    found: list[str] = []
    seen: list[str] = []

    async def read() -> None:
        while len(found) < count:
            line = (await stream.readline()).decode()
            assert line, f"the server's log ended (the process is gone?) after:\n{''.join(seen[-20:])}"
            seen.append(line)
            if text in line:
                found.append(line)

    await asyncio.wait_for(read(), timeout)
    return found


async def offers_registration(harness: Harness) -> bool:
    raw, features = await unauthenticated(harness)
    raw.writer.close()
    return features.find(FEATURE) is not None


async def test_sighup_reloads_the_configuration_and_keeps_the_process_and_its_clients(tmp_path: Path) -> None:
    port, direct_port = free_port(), free_port()
    proc, _ = await start_process(tmp_path, port, direct_port)
    config = tmp_path / "parley.toml"
    harness = Harness(None, port, direct_port, tmp_path)  # type: ignore[arg-type]
    try:
        added = await asyncio.to_thread(parley, "user", "add", "alice@localhost", "--password", "pw",
                                        "--config", str(config))
        assert added.returncode == 0, added.stderr
        alice = await harness.client("alice@localhost", "pw", resource="desk")
        inbox = harness.inbox(alice)
        assert not await offers_registration(harness)

        config.write_text(config.read_text() + "registration = true\n")
        os.kill(proc.pid, signal.SIGHUP)
        await wait_for_lines(proc.stderr, RELOADED)
        assert await offers_registration(harness)
        alice.send_message(mto="alice@localhost/desk", mbody="still here", mtype="chat")
        assert (await asyncio.wait_for(inbox.get(), 10))["body"] == "still here"

        config.write_text(config.read_text() + 'admin = "typo"\n')  # a bad file changes nothing
        os.kill(proc.pid, signal.SIGHUP)
        [line] = await wait_for_lines(proc.stderr, "SIGHUP: configuration not reloaded")
        assert "hosts.localhost.admin': unknown key" in line
        assert await offers_registration(harness)
        assert proc.returncode is None
    finally:
        await harness.close()
        err = await stop_process(proc)
    assert proc.returncode == 0 and "Parley stopped" in err


async def test_sighup_to_the_master_reaches_every_worker(tmp_path: Path) -> None:
    port = free_port()
    proc, _ = await start_process(tmp_path, port, free_port(), extra=f'[cluster]\nworkers = 2\nprefix = '
                                                                     f'"parley-test-{uuid.uuid4().hex[:12]}"\n')
    harness = Harness(None, port, port, tmp_path)  # type: ignore[arg-type]
    config = tmp_path / "parley.toml"
    try:
        config.write_text(config.read_text() + "registration = true\n")
        os.kill(proc.pid, signal.SIGHUP)
        await wait_for_lines(proc.stderr, RELOADED, count=2)
        assert proc.returncode is None
        # The kernel spreads new connections over both workers: every one of them offers registration now.
        assert all([await offers_registration(harness) for _ in range(8)])
    finally:
        await harness.close()
        err = await stop_process(proc)
    assert proc.returncode == 0, err
