"""What `systemctl reload` (SIGHUP) and `parleyctl reload_config` change in a running server besides hosts'
admins, registration and module options (tests/test_sighup.py): limits, log level, certificates, the
federation policy and lists; the log file reopened; and `parleyctl reopen_log`, `restart` and `stop`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from parley import build_server, read_config
from server.config import load_config
from server.tls import ensure_certificate
from tests.conftest import free_port
from tests.test_cli import start_process, stop_process
from tests.test_parleyctl import PARLEYCTL

pytestmark = pytest.mark.timeout(90)

HEADER = "<?xml version='1.0'?><stream:stream to='localhost' xmlns='jabber:client' " \
         "xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>"
EXTRA = '[logging]\nfile = "parley.log"\nlevel = "info"\n[limits]\nmax_connections_per_ip = 64\n'


async def eventually(condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
    """Poll `condition` until it holds; fail naming `what` when it does not in time."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def logged(path: Path, text: str) -> Callable[[], bool]:
    return lambda: path.exists() and text in path.read_text()


async def served_certificate(port: int) -> bytes:
    """The certificate a new Direct TLS connection gets."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    return der


async def stream_answered(port: int) -> tuple[bool, asyncio.StreamWriter]:
    """Whether a new connection gets a stream header back (False: refused), and the connection to keep."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(HEADER.encode())
    try:
        data = await asyncio.wait_for(reader.read(100), 10)
    except ConnectionError:
        data = b""
    return data.startswith(b"<?xml"), writer


async def parleyctl(config: Path, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(PARLEYCTL, "--config", str(config), *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_sighup_reloads_limits_level_and_certificates_and_reopens_the_log(tmp_path: Path) -> None:
    port, direct_port = free_port(), free_port()
    proc, _ = await start_process(tmp_path, port, direct_port, extra=EXTRA)
    config, log_file = tmp_path / "parley.toml", tmp_path / "parley.log"
    host = load_config(config).hosts["localhost"]
    kept: list[asyncio.StreamWriter] = []
    try:
        old_certificate = await served_certificate(direct_port)
        host.certificate.unlink()
        host.key.unlink()
        ensure_certificate("localhost", host.certificate, host.key)  # renewed, as certbot would
        config.write_text(config.read_text().replace('level = "info"', 'level = "debug"')
                          .replace("max_connections_per_ip = 64", "max_connections_per_ip = 1"))
        log_file.rename(tmp_path / "parley.log.1")  # logrotate moved it
        os.kill(proc.pid, signal.SIGHUP)
        await eventually(logged(log_file, "SIGHUP: configuration reloaded"), "the reload in the reopened log")

        new_certificate = await served_certificate(direct_port)
        assert new_certificate != old_certificate and new_certificate == ensure_der(host.certificate)
        kept.append(await first_connection(port))
        await eventually(logged(log_file, " DEBUG "), "debug lines at the reloaded level")
        second, writer = await stream_answered(port)
        kept.append(writer)
        assert not second  # one connection per address now
        assert proc.returncode is None
    finally:
        for writer in kept:
            writer.close()
        await stop_process(proc)
    assert proc.returncode == 0


async def first_connection(port: int, timeout: float = 20) -> asyncio.StreamWriter:
    """A connection the server answers, once the connections closed before are gone from its count."""
    deadline = time.monotonic() + timeout
    while True:
        answered, writer = await stream_answered(port)
        if answered:
            return writer
        writer.close()
        assert time.monotonic() < deadline, "no connection answered"
        await asyncio.sleep(0.05)


def ensure_der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


async def test_a_certificate_that_does_not_load_changes_nothing(tmp_path: Path) -> None:
    port, direct_port = free_port(), free_port()
    proc, _ = await start_process(tmp_path, port, direct_port, extra=EXTRA)
    config, log_file = tmp_path / "parley.toml", tmp_path / "parley.log"
    host = load_config(config).hosts["localhost"]
    try:
        before = await served_certificate(direct_port)
        host.certificate.write_text("not a certificate\n")
        config.write_text(config.read_text().replace("max_connections_per_ip = 64", "max_connections_per_ip = 1"))
        code, _, err = await parleyctl(config, "reload_config")
        assert code == 1 and f"certificates not reloaded: certificate {host.certificate} is not a valid PEM" in err
        assert await served_certificate(direct_port) == before
        answered = [await stream_answered(port) for _ in range(2)]
        for _, writer in answered:
            writer.close()
        assert all(ok for ok, _ in answered)  # the limit stayed
    finally:
        await stop_process(proc)
    assert "reloaded" not in log_file.read_text()


async def test_parleyctl_reopen_log_restart_and_stop(tmp_path: Path) -> None:
    port, direct_port = free_port(), free_port()
    proc, _ = await start_process(tmp_path, port, direct_port, extra=EXTRA)
    config, log_file = tmp_path / "parley.toml", tmp_path / "parley.log"
    try:
        log_file.rename(tmp_path / "parley.log.1")
        assert (await parleyctl(config, "reopen_log"))[0] == 0
        await eventually(logged(log_file, "reopened the log file"), "the line in the new log file")
        assert oct(log_file.stat().st_mode & 0o777) == "0o600"

        code, _, err = await parleyctl(config, "restart")
        assert code == 0, err
        await eventually(logged(log_file, "Parley started"), "the restart")  # the second start; the first
        # logged into parley.log.1
        answered, writer = await stream_answered(port)
        writer.close()
        assert answered and proc.returncode is None

        code, _, err = await parleyctl(config, "stop")
        assert code == 0, err
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            await stop_process(proc)


async def test_reload_applies_the_federation_policy_and_lists(tmp_path: Path) -> None:
    config = tmp_path / "parley.toml"
    config.write_text(f"""data_dir = "data"
scram_iterations = 4096
[[listeners]]
type = "c2s"
address = "127.0.0.1"
port = {free_port()}
[[listeners]]
type = "s2s"
address = "127.0.0.1"
port = {free_port()}
[hosts."localhost"]
[s2s]
max_incoming_per_ip = 32
""")
    server = build_server(read_config(config))
    await server.start()
    try:
        manager = server.s2s
        assert manager is not None and manager.policy.allowed("evil.example")
        config.write_text(config.read_text().replace("max_incoming_per_ip = 32", "max_incoming_per_ip = 3")
                          + 'deny = ["evil.example"]\nrequire_encryption = false\n[s2s.domains."big.example"]\n'
                            'rate = 1000\n')
        answer = await server.control.answer(json.dumps({"argv": ["reload_config"], "cwd": str(tmp_path)}).encode())
        assert answer["exit"] == 0, answer
        assert not manager.policy.allowed("evil.example") and manager.policy.allowed("friend.example")
        assert manager.policy.require_encryption is False
        assert manager.limits.per_ip.max_per_ip == 3
        assert manager.limits.of("www.big.example").rate == 1000
    finally:
        await server.stop()
