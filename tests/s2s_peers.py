"""Real Prosody and ejabberd (Debian packages) on their own loopback addresses, for federation tests.

Each peer runs in the foreground from a config made from tests/peers/ in a fresh directory, as its own
system user, and is stopped again after the tests. Names resolve through /etc/hosts, where the entries
are added when missing (Prosody reads the file through lua-unbound, hence that package).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from slixmpp import ClientXMPP

from bench.servers import fill_template, port_open
from server.tls import ensure_certificate
from tests.conftest import insecure_context
from tests.s2s_support import TestCA

TEMPLATES = Path(__file__).resolve().parent / "peers"
HOSTS_FILE = Path("/etc/hosts")
START_TIMEOUT = 60.0
# Addresses and names: each server on its own loopback address, so all use the standard ports.
PARLEY = ("127.0.0.4", "parley.test")
PROSODY = ("127.0.0.2", "prosody.test")
EJABBERD = ("127.0.0.3", "ejabberd.test")
PACKAGES = "prosody ejabberd lua-unbound"
LOG_LEVEL = os.environ.get("PARLEY_PEER_LOG", "info")  # e.g. debug; the peers' directories are then kept


class PeerUnavailable(Exception):
    """The peers cannot run here (not root, packages missing, addresses taken)."""


def check_environment() -> None:
    if os.geteuid() != 0:
        raise PeerUnavailable("needs root (to run the peers as their own users and edit /etc/hosts)")
    for binary in ("prosody", "prosodyctl", "ejabberdctl"):
        if shutil.which(binary) is None:
            raise PeerUnavailable(f"{binary} not installed (apt-get install -y {PACKAGES})")
    if not any(Path("/usr/lib").glob("*/liblua5.*-unbound.so*")):
        raise PeerUnavailable(f"lua-unbound not installed (apt-get install -y {PACKAGES})")
    if port_open(PARLEY[0], 5269):
        raise PeerUnavailable(f"{PARLEY[0]}:5269 is already in use by another process")


def ensure_hosts_entries() -> None:
    """Map each test domain and its conference subdomain to its address, unless already mapped."""
    text = HOSTS_FILE.read_text()
    known: dict[str, str] = {}
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        for name in fields[1:]:
            known.setdefault(name, fields[0])
    missing = []
    for address, domain in (PARLEY, PROSODY, EJABBERD):
        for name in (domain, f"conference.{domain}"):
            if known.get(name) not in (None, address):
                raise PeerUnavailable(f"/etc/hosts maps {name} to {known[name]}, not {address}")
            if name not in known:
                missing.append(f"{address} {name}")
    if missing:
        HOSTS_FILE.write_text(text + ("" if text.endswith("\n") else "\n") + "\n".join(missing) + "\n")


class Peer:
    """One peer server. `method` is how it authenticates with Parley, both ways; `bidi` whether it uses
    one connection for both directions (XEP-0288); `stream_management` whether it does XEP-0198 on
    server-to-server streams."""

    name = ""
    method = ""
    bidi = False
    stream_management = False
    ports: tuple[int, ...] = ()

    def __init__(self, address: str, domain: str, ca: TestCA) -> None:
        self.address = address
        self.domain = domain
        self.ca = ca
        self.dir = Path(tempfile.mkdtemp(prefix=f"parley-s2s-{self.name}-"))
        self.dir.chmod(0o755)
        self.proc: subprocess.Popen[bytes] | None = None
        self._users = 0

    def start(self) -> None:
        for port in self.ports:
            if port_open(self.address, port):
                raise PeerUnavailable(f"{self.address}:{port} is already in use by another process")
        self.launch()
        self._wait_for_ports(*self.ports)

    def launch(self) -> None:
        """Write the configuration and start the server process."""
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    async def register(self, user: str, password: str) -> None:
        raise NotImplementedError

    async def new_user(self, password: str = "secret") -> str:
        """A fresh account, so that tests sharing the peer never share rosters."""
        self._users += 1
        user = f"u{self._users}"
        await self.register(user, password)
        return f"{user}@{self.domain}"

    def _wait_for_ports(self, *ports: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not all(port_open(self.address, port) for port in ports):
            if self.proc is not None and self.proc.poll() is not None:
                raise PeerUnavailable(f"{self.name} exited with {self.proc.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise PeerUnavailable(f"{self.name} did not open {ports} in time: {self.log_tail()}")
            time.sleep(0.1)

    def _reap(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def log_tail(self) -> str:
        return ""

    def cleanup(self) -> None:
        """Remove the peer's directory, unless PARLEY_PEER_LOG asks to keep its logs for a look."""
        if "PARLEY_PEER_LOG" not in os.environ:
            shutil.rmtree(self.dir, ignore_errors=True)


class Prosody(Peer):
    """Prosody with a certificate from the test CA, which it trusts too: SASL EXTERNAL both ways, over one
    connection (mod_s2s_bidi), with stream management (mod_smacks does s2s too)."""

    name = "prosody"
    method = "external"
    bidi = True
    stream_management = True
    ports = (5222, 5269)

    @property
    def config(self) -> Path:
        return self.dir / "prosody.cfg.lua"

    def launch(self) -> None:
        certs = self.dir / "certs"
        for sub in (certs, self.dir / "data"):
            sub.mkdir(parents=True, exist_ok=True)
        self.ca.issue(self.domain, certs)
        shutil.copy(self.ca.path, certs / "ca.crt")
        self.config.write_text(fill_template((TEMPLATES / "prosody.cfg.lua").read_text(), {
            "ADDRESS": self.address, "DIR": str(self.dir), "DOMAIN": self.domain, "LOG_LEVEL": LOG_LEVEL}))
        subprocess.run(["chown", "-R", "prosody:prosody", str(self.dir)], check=True)
        self.proc = subprocess.Popen(["prosody", "--config", str(self.config)], user="prosody",
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.dir)

    def stop(self) -> None:
        self._reap()

    async def register(self, user: str, password: str) -> None:
        proc = await asyncio.create_subprocess_exec(
            "prosodyctl", "--config", str(self.config), "register", user, self.domain, password,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = await proc.communicate()
        if proc.returncode:
            raise AssertionError(f"prosodyctl register {user} failed: {out.decode(errors='replace')}")

    def log_tail(self) -> str:
        log = self.dir / "prosody.err"
        return log.read_text(errors="replace")[-2000:] if log.exists() else ""


class Ejabberd(Peer):
    """ejabberd with a self-signed certificate that nobody trusts: Server Dialback both ways. Its stream
    management (mod_stream_mgmt) is for clients only."""

    name = "ejabberd"
    method = "dialback"
    ports = (5222, 5269, 5280)
    node = "parley-s2s-ejabberd@localhost"

    def _ctl(self, *args: str) -> list[str]:
        d = self.dir
        return ["ejabberdctl", "--config-dir", str(d), "--ctl-config", str(d / "ejabberdctl.cfg"),
                "--spool", str(d / "spool"), "--logs", str(d / "logs"), "--config", str(d / "ejabberd.yml"),
                "--node", self.node, *args]

    def start(self) -> None:
        super().start()
        # The ports open before every module is up; `started` waits for all of them.
        subprocess.run(self._ctl("started"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.dir,
                       timeout=START_TIMEOUT, check=False)

    def launch(self) -> None:
        d = self.dir
        for sub in ("spool", "logs"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        crt, key = d / f"{self.domain}.crt", d / f"{self.domain}.key"
        ensure_certificate(self.domain, crt, key)
        (d / f"{self.domain}.pem").write_text(crt.read_text() + key.read_text())
        (d / "ejabberd.yml").write_text(fill_template((TEMPLATES / "ejabberd.yml").read_text(), {
            "ADDRESS": self.address, "DIR": str(d), "DOMAIN": self.domain, "LOG_LEVEL": LOG_LEVEL}))
        # Our own ejabberdctl.cfg: Debian's sets EJABBERD_CONFIG_PATH, which would override --config.
        (d / "ejabberdctl.cfg").write_text('ERL_OPTIONS="-env ERL_CRASH_DUMP_BYTES 0"\n')
        shutil.copy("/etc/ejabberd/inetrc", d / "inetrc")
        subprocess.run(["chown", "-R", "ejabberd:ejabberd", str(d)], check=True)
        self.proc = subprocess.Popen(self._ctl("foreground"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     cwd=d)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            subprocess.run(self._ctl("stop"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.dir,
                           timeout=START_TIMEOUT, check=False)
        self._reap()

    async def register(self, user: str, password: str) -> None:
        url = f"http://{self.address}:5280/api/register"
        async with aiohttp.ClientSession() as http, \
                http.post(url, json={"user": user, "host": self.domain, "password": password}) as response:
            if response.status != 200:
                raise AssertionError(f"ejabberd could not register {user}: {await response.text()}")

    def log_tail(self) -> str:
        log = self.dir / "logs" / "error.log"
        return log.read_text(errors="replace")[-2000:] if log.exists() else ""


async def peer_client(jid: str, password: str, address: str, plugins: tuple[str, ...] = ()) -> ClientXMPP:
    """A slixmpp client logged in to a peer server over STARTTLS."""
    client = ClientXMPP(jid, password)
    client.ssl_context = insecure_context()
    client.enable_plaintext = False
    for plugin in plugins:
        client.register_plugin(plugin)
    started: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    def done(result: Any) -> None:
        if not started.done():
            if isinstance(result, Exception):
                started.set_exception(result)
            else:
                started.set_result(True)

    client.add_event_handler("session_start", done)
    client.add_event_handler("failed_all_auth", lambda e: done(AssertionError(f"login failed for {jid}: {e}")))
    client.connect(address, 5222)
    await asyncio.wait_for(started, 15)
    return client
