"""The call log (the paper's figure 3): who called what, when, from where, run where, and how it went.

A nested call is logged as its caller's (client, address) with `via_agent`, the agent whose job
asked for it; the JSON-lines file has that key only on such lines (older readers see no change).

Records reach the file (one os.write, so they survive the process being SIGKILLed; no fsync) within
FLUSH_INTERVAL_S of the call: `add` keeps the line in memory and, on an event loop, arms one timer
that writes everything pending in one go; past FLUSH_BYTES pending it writes at once (nothing is
dropped), without a running loop at once too, and `flush`/`close` write what is left.
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("microswarm.calls")
_encode = json.JSONEncoder(separators=(",", ":")).encode  # one encoder, not one per call

FLUSH_INTERVAL_S = 0.1    # a record is in the file at most this long after its call (SIGKILL loses at most this)
FLUSH_BYTES = 64 << 10    # pending past this: written at once (the memory bound; records are never dropped)


@dataclass
class CallEntry:
    time: float
    client: str
    address: str
    service: str
    executed_by: str
    success: bool
    ms: float
    error_code: str = ""
    attempts: int = 0
    cache_hit: bool = False
    via_agent: str = ""   # a nested call: the agent (or "coordinator") whose job asked; `client` is the caller


class CallLog:
    """A bounded in-memory ring for the status view, mirrored to a JSON-lines file when given one."""

    def __init__(self, capacity: int = 2000, path: Path | None = None, max_file_bytes: int = 64 << 20,
                 flush_interval_s: float = FLUSH_INTERVAL_S, flush_bytes: int = FLUSH_BYTES) -> None:
        self.entries: collections.deque[CallEntry] = collections.deque(maxlen=capacity)
        self.path = path
        self.max_file_bytes = max_file_bytes
        self.flush_interval_s = flush_interval_s
        self.flush_bytes = flush_bytes
        self._fd = self._open() if path else -1
        self._written = os.fstat(self._fd).st_size if self._fd >= 0 else 0
        self._pending: list[str] = []   # encoded lines not yet written
        self._pending_bytes = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None
        self.total = 0
        self.failures = 0

    def _open(self) -> int:
        assert self.path is not None
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)  # as open(): umask

    def add(self, entry: CallEntry) -> None:
        self.entries.append(entry)
        self.total += 1
        if not entry.success:
            self.failures += 1
        if self._fd < 0:
            return
        d = entry.__dict__
        if not entry.via_agent:  # lines of direct calls stay as they were (readers of the old format)
            d = d.copy()
            del d["via_agent"]
        line = _encode(d) + "\n"  # ASCII (ensure_ascii): characters are bytes
        self._pending.append(line)
        self._pending_bytes += len(line)
        if self._pending_bytes >= self.flush_bytes:
            self.flush()
            return
        # one timer per interval: the running loop is asked for only to arm it (~0.5 us, not per call);
        # a timer left on a loop since closed never runs, so it is armed again on the new one
        if self._timer is None or self._timer_loop is None or self._timer_loop.is_closed():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop to flush later: write now
                self.flush()
                return
            self._timer, self._timer_loop = loop.call_later(self.flush_interval_s, self.flush), loop

    def flush(self) -> None:
        """Write every pending line (one write per file; rotating when a line crosses the bound)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending or self._fd < 0:
            return
        lines, self._pending, self._pending_bytes = self._pending, [], 0
        start = 0
        for i, line in enumerate(lines):
            self._written += len(line)
            if self._written > self.max_file_bytes:  # this line crosses the bound: it ends the old file
                self._write(lines[start:i + 1])
                start = i + 1
                self._rotate()
        if start < len(lines):
            self._write(lines[start:])

    def _write(self, lines: list[str]) -> None:
        data = memoryview("".join(lines).encode())
        try:
            while data:
                data = data[os.write(self._fd, data):]
        except OSError as exc:  # a full disk: the calls go on, these records are lost (and said so)
            log.error("call log %s: %d record(s) not written: %s", self.path, len(lines), exc)

    def _rotate(self) -> None:
        assert self._fd >= 0 and self.path is not None
        os.close(self._fd)
        self.path.replace(self.path.with_suffix(self.path.suffix + ".1"))
        self._fd = self._open()
        self._written = 0

    def recent(self, n: int) -> list[CallEntry]:
        if n <= 0:
            return []
        return list(self.entries)[-n:]

    def close(self) -> None:
        self.flush()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
