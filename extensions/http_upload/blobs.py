"""Where uploaded files live: a small interface (`BlobStore`), and its files-on-disk implementation.

Bytes stream in and out in chunks, so a 1 GB file never sits in memory. An object store (S3 and the like)
would implement the same four operations; serving then goes through `open`, which gives aiohttp a path
to send (with ranges, ETag and Last-Modified) for a local file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterable
from pathlib import Path
from typing import Protocol

# Bytes gathered before each write, which runs in a thread: one hop per quarter megabyte, not per network
# chunk; what each upload holds in memory besides aiohttp's read buffer.
WRITE_BATCH = 1 << 18


class TooLong(Exception):
    """The body went past the length the upload announced."""


class BlobStore(Protocol):
    async def put(self, key: str, chunks: AsyncIterable[bytes], limit: int) -> int:
        """Store the bytes of `chunks` under `key` (replacing what was there) and return how many there were;
        TooLong past `limit` bytes, and nothing is stored when it fails."""

    def open(self, key: str) -> Path | None:
        """A local file to serve for `key`, or None."""

    async def delete(self, key: str) -> None:
        """Forget `key` (nothing if it is absent)."""

    async def size(self, key: str) -> int | None:
        """The stored bytes of `key`, or None."""

    def keys(self) -> list[str]:
        """Every stored key, for the sweep that removes what has no slot any more."""


class DiskStore:
    """One file per key in a folder only the server's user can read; a file being written is '.KEY.part'
    and takes its name when complete, so a reader never sees half a file."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"bad blob key {key!r}")
        return self.folder / key

    async def put(self, key: str, chunks: AsyncIterable[bytes], limit: int) -> int:
        final = self._path(key)
        part = self.folder / f".{key}.part"
        loop = asyncio.get_running_loop()
        total = 0
        with open(os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out:
            try:
                batch = bytearray()
                async for chunk in chunks:
                    total += len(chunk)
                    if total > limit:
                        raise TooLong(f"more than {limit} bytes")
                    batch += chunk
                    if len(batch) >= WRITE_BATCH:
                        await loop.run_in_executor(None, out.write, batch)
                        batch = bytearray()
                if batch:
                    await loop.run_in_executor(None, out.write, batch)
            except BaseException:
                part.unlink(missing_ok=True)
                raise
        os.replace(part, final)
        return total

    def open(self, key: str) -> Path | None:
        path = self._path(key)
        return path if path.is_file() else None

    async def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)
        (self.folder / f".{key}.part").unlink(missing_ok=True)

    async def size(self, key: str) -> int | None:
        with contextlib.suppress(FileNotFoundError):
            return self._path(key).stat().st_size
        return None

    def keys(self) -> list[str]:
        return [name.removeprefix(".").removesuffix(".part") for name in os.listdir(self.folder)]
