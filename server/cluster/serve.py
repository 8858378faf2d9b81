"""Running a node: the supervisor of its worker processes, and the check of Redis before they start."""

from __future__ import annotations

import logging
import os
import select
import signal
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import redis
from redis.exceptions import RedisClusterException

from server.cluster.transport import alive_key, connect_sync
from server.config import ConfigError

if TYPE_CHECKING:
    from server.config import Config

log = logging.getLogger("parley.cluster")


def check_redis(config: Config) -> None:
    """Before the workers start: Redis answers, and no other node is live when this one's storage is SQLite (a
    file on this machine that another node cannot share). Nothing is deleted: the keys of this node's previous
    run are taken by its workers as they start (and the sessions they describe ended), the other nodes' are
    theirs."""
    cluster = config.cluster
    client: redis.Redis | None = None
    try:
        client = connect_sync(cluster.redis_url, socket_connect_timeout=5)
        listed = sorted(m.decode() for m in client.smembers(f"{cluster.prefix}:members"))
        keys = [alive_key(cluster.prefix, m, cluster.sharded) for m in listed]
        alive = [client.get(key) for key in keys]
    except (redis.RedisError, RedisClusterException) as exc:
        raise ConfigError("cluster.redis_url", f"cannot use Redis at {cluster.redis_url}: {exc}") from None
    finally:
        if client is not None:
            client.close()
    others = sorted({m.partition("/")[0] for m, value in zip(listed, alive, strict=True) if value is not None}
                    - {cluster.node_name})
    if others and config.storage.url.startswith("sqlite"):
        raise ConfigError("storage.url", f"node(s) {', '.join(others)} already run on Redis prefix "
                          f"{cluster.prefix!r}: the nodes of a cluster share one PostgreSQL database, not SQLite")


def supervise(config: Config, serve: Callable[[int, int], None], started: Callable[[], None]) -> int:
    """Fork the workers and keep them running: `serve(index, ready_fd)` runs one and writes a byte to
    `ready_fd` once it listens. A worker that dies is restarted; SIGTERM or SIGINT stops them all, SIGHUP goes
    to every worker (each reloads the configuration)."""
    workers = config.cluster.workers
    check_redis(config)
    ready_read, ready_write = os.pipe()
    children: dict[int, int] = {}  # pid -> worker index
    stopping = False

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the worker's own handler is in place
            code = 1
            try:
                serve(index, ready_write)
                code = 0
            except BaseException:
                log.exception("worker %d failed", index)
            finally:
                sys.stderr.flush()
                os._exit(code)
        children[pid] = index

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            os.kill(pid, signal.SIGTERM)

    def reload(_signum: int, _frame: object) -> None:
        log.info("SIGHUP: passed on to %d workers", len(children))
        for pid in list(children):
            os.kill(pid, signal.SIGHUP)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, reload)
    for index in range(workers):
        spawn(index)
    ready, failed = 0, False
    while ready < workers and not stopping:
        if select.select([ready_read], [], [], 0.5)[0]:
            ready += len(os.read(ready_read, workers - ready))
        pid, _ = os.waitpid(-1, os.WNOHANG)
        if pid:
            log.error("worker %d exited while starting", children.pop(pid))
            failed = True
            stop(0, None)
    if not stopping:
        started()
    while children:
        pid, status = os.wait()
        index = children.pop(pid)
        if not stopping:
            log.error("worker %d exited (status %d); restarting it", index, status)
            time.sleep(1.0)
            spawn(index)
    return 1 if failed else 0
