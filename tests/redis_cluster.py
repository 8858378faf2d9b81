"""A real Redis Cluster of the test's own: three masters (`redis-server --cluster-enabled yes`, no persistence)
on free ports in a temporary directory, joined with `redis-cli --cluster create` and waited for until every
node says `cluster_state:ok`. Reusable by any test: the `redis_cluster` fixture, or `RedisClusterProcesses`
directly (as the benchmark does). Without redis-server or redis-cli the test skips, and fails under CI=true.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests.conftest import unavailable


def cluster_ports(count: int) -> list[int]:
    """Ports free now, each with its cluster bus port (10000 higher, so at most 55535) free as well: the kernel's
    ephemeral ports are too high, so candidates come from below them, at random to avoid other tests' picks."""
    picked: list[int] = []
    while len(picked) < count:
        port = random.randrange(20000, 30000)
        if port in picked or port + 10000 in picked:
            continue
        with contextlib.ExitStack() as stack:
            try:
                for candidate in (port, port + 10000):
                    stack.enter_context(socket.socket()).bind(("127.0.0.1", candidate))
            except OSError:
                continue
        picked.append(port)
    return picked


class RedisClusterProcesses:
    """Masters of a Redis Cluster started by the test; `url` is what `[cluster] redis_url` takes."""

    def __init__(self, directory: Path, masters: int = 3) -> None:
        self.dir = directory
        self.ports = cluster_ports(masters)
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def start(self, timeout: float = 20.0) -> None:
        self._spawn()
        deadline = time.monotonic() + timeout
        for port in self.ports:
            self._until(lambda p=port: self._ping(p), deadline, f"redis-server on port {port}")
        subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout)
        self._until_ok(deadline)

    def _spawn(self) -> None:
        for port in self.ports:
            node_dir = self.dir / f"redis-{port}"
            node_dir.mkdir(parents=True, exist_ok=True)
            self.procs.append(subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                 "--cluster-config-file", str(node_dir / "nodes.conf"), "--cluster-node-timeout", "2000",
                 "--save", "", "--appendonly", "no", "--dir", str(node_dir)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def _until_ok(self, deadline: float) -> None:
        for port in self.ports:
            self._until(lambda p=port: self._ping(p) and self._state_ok(p), deadline,
                        f"cluster_state:ok on port {port}")

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.wait(10)
        self.procs = []

    def client(self) -> redis.RedisCluster:
        """A synchronous client of the whole cluster (for assertions on keys and slots)."""
        return redis.RedisCluster(host="127.0.0.1", port=self.ports[0])

    def node_of(self, key: str) -> str:
        """The master (host:port) that serves a key's hash slot."""
        with self.client() as client:
            node = client.get_node_from_key(key)
            return f"{node.host}:{node.port}"

    @staticmethod
    def _ping(port: int) -> bool:
        try:
            with redis.Redis(port=port, socket_connect_timeout=0.5) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    @staticmethod
    def _state_ok(port: int) -> bool:
        with redis.Redis(port=port, socket_connect_timeout=0.5) as client:
            return client.cluster("info").get("cluster_state") == "ok"

    @staticmethod
    def _until(check: Callable[[], bool], deadline: float, what: str) -> None:
        while not check():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not ready in time")
            time.sleep(0.05)


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisClusterProcesses]:
    """A three-master Redis Cluster, private to the test, stopped afterwards."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        unavailable("redis-server and redis-cli are not installed")
    cluster = RedisClusterProcesses(tmp_path)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
