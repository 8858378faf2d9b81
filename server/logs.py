"""Where the server logs: standard error (journald under systemd), a file, or syslog, at the configured level.

Set up once by `parley serve`; `reload_config` (SIGHUP) applies a new level and reopens the file, and
`parleyctl reopen_log` reopens it after logrotate moved it away.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import socket
import sys
from pathlib import Path

from server.config import Config, ConfigError

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
SYSLOG_SOCKET = "/dev/log"

_verbose = 0  # -v on the command line: debug whatever the configuration says
_serving = False  # set up by `parley serve`: a server inside another program (the tests) leaves its logging alone


def _handler(config: Config) -> logging.Handler:
    if config.logging.syslog:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:  # the handler would drop lines silently
            try:
                probe.connect(SYSLOG_SOCKET)
            except OSError as exc:
                raise ConfigError("logging.syslog", f"no syslog daemon listens on {SYSLOG_SOCKET} "
                                                    f"({exc.strerror}): start one (rsyslog), or log to standard "
                                                    f"error or a file") from None
        handler: logging.Handler = logging.handlers.SysLogHandler(
            SYSLOG_SOCKET, facility=logging.handlers.SysLogHandler.LOG_DAEMON)
        handler.setFormatter(logging.Formatter("parley[%(process)d]: %(levelname)s %(name)s: %(message)s"))
        return handler
    if config.logging.file:
        _create_private(config.logging.file)
        handler = logging.FileHandler(config.logging.file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    return handler


def _create_private(path: Path) -> None:
    """A log file the server creates is readable by its user only."""
    if not path.exists():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))


def setup(config: Config, verbose: int) -> None:
    """Parley's loggers at the configured level (debug with -v, which adds the XML trace on `parley.xml`).

    Libraries (aiosqlite, SQLAlchemy, asyncio, ...) stay at WARNING, or they would bury Parley's lines
    at debug level; -vv lets them speak too.
    """
    global _verbose, _serving
    _verbose, _serving = verbose, True
    level = _level(config)
    logging.basicConfig(level=logging.DEBUG if verbose > 1 else max(logging.WARNING, level),
                        handlers=[_handler(config)])
    logging.getLogger("parley").setLevel(level)


def _level(config: Config) -> int:
    return logging.DEBUG if _verbose else getattr(logging, config.logging.level.upper())


def destination(config: Config) -> logging.Handler | None:
    """Where a reloaded configuration logs, opened (the log file reopened, a new name taken too) but not yet in
    use; None when the server does not run under `parley serve`. Raises ConfigError when it cannot be opened."""
    return _handler(config) if _serving else None


def apply(config: Config, handler: logging.Handler | None) -> None:
    """A reloaded configuration: its level, and `destination`'s handler in place of the current one."""
    if handler is None:
        return
    logging.getLogger("parley").setLevel(_level(config))
    root = logging.getLogger()
    if _verbose < 2:
        root.setLevel(max(logging.WARNING, _level(config)))
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)


def reopen() -> list[Path]:
    """Reopen every log file (logrotate moved it away): the files reopened."""
    reopened: list[Path] = []
    if not _serving:
        return reopened
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            path = Path(handler.baseFilename)
            _create_private(path)
            old = handler.setStream(handler._open())
            if old is not None:
                old.close()
            reopened.append(path)
    return reopened
