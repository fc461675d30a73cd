"""The call log (the paper's figure 3): who called what, when, from where, run where, and how it went.

A nested call is logged as its caller's (client, address) with `via_agent`, the agent whose job
asked for it; the JSON-lines file has that key only on such lines (older readers see no change).
"""
from __future__ import annotations

import collections
import json
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("microswarm.calls")
_encode = json.JSONEncoder(separators=(",", ":")).encode  # one encoder, not one per call


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

    def __init__(self, capacity: int = 2000, path: Path | None = None, max_file_bytes: int = 64 << 20) -> None:
        self.entries: collections.deque[CallEntry] = collections.deque(maxlen=capacity)
        self.path = path
        self.max_file_bytes = max_file_bytes
        self._file = open(path, "a", buffering=1 << 16) if path else None
        self._written = path.stat().st_size if path and path.exists() else 0  # tell() on text files is slow
        self.total = 0
        self.failures = 0

    def add(self, entry: CallEntry) -> None:
        self.entries.append(entry)
        self.total += 1
        if not entry.success:
            self.failures += 1
        if self._file is not None:
            d = entry.__dict__
            if not entry.via_agent:  # lines of direct calls stay as they were (readers of the old format)
                d = d.copy()
                del d["via_agent"]
            line = _encode(d) + "\n"
            self._file.write(line)
            self._written += len(line)
            if self._written > self.max_file_bytes:
                self._rotate()

    def _rotate(self) -> None:
        assert self._file is not None and self.path is not None
        self._file.close()
        self.path.replace(self.path.with_suffix(self.path.suffix + ".1"))
        self._file = open(self.path, "a", buffering=1 << 16)
        self._written = 0

    def recent(self, n: int) -> list[CallEntry]:
        if n <= 0:
            return []
        return list(self.entries)[-n:]

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
