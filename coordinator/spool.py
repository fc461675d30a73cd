"""A large payload passing through the coordinator: written to a temporary file as its pieces
arrive, read back by whoever follows it (the agent it is staged on, the client its result goes
to) as soon as each piece is there, and read whole only when it must be (validation, a retry).

The coordinator's memory holds at most a window of pieces per call, not the payload: the file
is in the page cache, which the kernel may write out and reclaim. A payload that never completes
(its sender vanished, or sent more than it announced) fails every reader with the reason.
"""
from __future__ import annotations

import asyncio
import os
import tempfile
from typing import AsyncIterator

from microcores._chunks import PIECE
from microcores.errors import InvalidInput, MicroError, Unavailable



class Spool:
    def __init__(self, size: int, what: str, directory: str | None = None) -> None:
        self.size = size            # announced: the payload must be exactly this long
        self.what = what            # "the input of demo.echo_bytes": for errors
        self._file = tempfile.TemporaryFile(prefix="microswarm-spool-", dir=directory)
        self.received = 0
        self.error: MicroError | None = None
        self._changed = asyncio.Event()

    @property
    def complete(self) -> bool:
        return self.error is None and self.received == self.size

    def feed(self, data: bytes) -> None:
        """One piece, in order. More than announced fails the payload (and says so)."""
        if self.error is not None or self._file.closed:
            return
        if self.received + len(data) > self.size:
            self.fail(InvalidInput(f"{self.what} is longer than the {self.size} bytes announced"))
            return
        os.pwrite(self._file.fileno(), data, self.received)
        self.received += len(data)
        self._wake()

    def end(self) -> None:
        """The sender says it is done: short of the announced size is a failure."""
        if self.error is None and self.received != self.size:
            self.fail(InvalidInput(f"{self.what} ended after {self.received} of the {self.size} bytes announced"))

    def fail(self, error: MicroError) -> None:
        if self.error is None:
            self.error = error
            self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _until(self, offset: int) -> None:
        while self.error is None and self.received <= offset < self.size:
            await self._changed.wait()
        if self.error is not None:
            raise self.error

    async def pieces(self, piece: int = PIECE) -> AsyncIterator[bytes]:
        """The payload in pieces of at most `piece` bytes, each as soon as it has arrived."""
        offset = 0
        while offset < self.size:
            await self._until(offset)
            n = min(piece, self.received - offset)
            yield os.pread(self._file.fileno(), n, offset)
            offset += n

    async def read(self, wait_only: bool = False) -> bytes:
        """The whole payload, once it has all arrived (b"" with `wait_only`: just wait for it)."""
        await self._until(self.size - 1 if self.size else 0)
        if wait_only:
            return b""
        if self._file.closed:
            raise Unavailable(f"{self.what} is no longer held")
        return os.pread(self._file.fileno(), self.size, 0)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.fail(Unavailable(f"{self.what} was dropped: the call ended"))
