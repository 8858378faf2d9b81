"""A prioritised event bus: modules hook events, the first handler that returns a value stops the chain.

Policy decisions are events too (e.g. 'message/offline'), so one module can override another by
hooking the same event at a higher priority.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("parley.hooks")

Handler = Callable[..., Any]


class Hooks:
    def __init__(self) -> None:
        # event -> list of (-priority, sequence, handler); sorted so higher priority runs first
        self._chains: dict[str, list[tuple[int, int, Handler]]] = {}
        self._seq = 0

    def add(self, event: str, handler: Handler, priority: int = 0) -> None:
        self._seq += 1
        bisect.insort(self._chains.setdefault(event, []), (-priority, self._seq, handler),
                      key=lambda entry: entry[:2])

    def remove(self, event: str, handler: Handler) -> None:
        chain = self._chains.get(event, [])
        chain[:] = [entry for entry in chain if entry[2] is not handler]
        if not chain:
            self._chains.pop(event, None)

    def has(self, event: str) -> bool:
        return event in self._chains

    async def fire(self, event: str, *args: Any) -> Any:
        """Run handlers in priority order; return the first non-None result (None if all pass)."""
        chain = self._chains.get(event)
        if not chain:
            return None
        for _, _, handler in tuple(chain):
            result = handler(*args)
            if asyncio.iscoroutine(result):
                result = await result
            if result is not None:
                return result
        return None

    async def fire_all(self, event: str, *args: Any) -> None:
        """Run every handler, whatever the others do: for events where each module cleans up its own state.

        A failing handler is logged and the rest still run, so that one module's error (the last-activity
        write on a full disk) cannot keep another (stream management) from handing on what it holds."""
        for _, _, handler in tuple(self._chains.get(event, ())):
            try:
                result = handler(*args)
                if asyncio.iscoroutine(result):
                    await result
            except Exception:
                log.exception("%s: %s failed", event, getattr(handler, "__qualname__", handler))

    def notify(self, event: str, *args: Any) -> None:
        """Tell every handler, synchronously, ignoring results (e.g. adding stream features)."""
        for _, _, handler in tuple(self._chains.get(event, ())):
            handler(*args)
