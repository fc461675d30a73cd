"""The coordinator's own worker pool: the fallback that runs a job when no agent can (paper: the
server takes over after RecordClientError). Same isolated workers as an agent's, started lazily."""
from __future__ import annotations

import asyncio
import os

from microcores._sandbox import detect as detect_sandbox
from microcores._worker import JobOutcome, NestedHandler, ProgressHandler, WorkerPool

from .registry import ServiceEntry
from .state import StateDir


class LocalRunner:
    def __init__(self, state: StateDir, slots: int | None = None, idle_s: float = 0.0) -> None:
        self.state = state
        self.slots = slots or max(1, os.cpu_count() or 1)
        self.idle_s = idle_s  # workers idle this long stop (0: never)
        self.pools: dict[str, WorkerPool] = {}
        self.running = 0
        # the same sandbox as agents' workers (when the kernel allows it): shipped code run here must
        # not reach the coordinator's state directory (its identity key, admin credential) either
        self.sandbox = detect_sandbox()

    async def reap(self) -> None:
        if self.idle_s > 0:
            for p in list(self.pools.values()):
                await p.reap(self.idle_s)

    def pool(self, entry: ServiceEntry) -> WorkerPool:
        p = self.pools.get(entry.digest)
        if p is None:
            p = self.pools[entry.digest] = WorkerPool(self.state.package_dir(entry.digest) / "files", self.slots,
                                                      sandbox=self.sandbox, digest=entry.digest)
        return p

    async def run(self, entry: ServiceEntry, job_id: str, input_bytes: bytes, timeout_s: float,
                  nested: NestedHandler, on_progress: ProgressHandler | None = None) -> JobOutcome:
        self.running += 1
        try:
            outcome = await self.pool(entry).run(job_id, input_bytes, timeout_s, nested,
                                                 on_progress=on_progress)
            assert outcome is not None  # only a start hook can hold a job back, and there is none here
            return outcome
        finally:
            self.running -= 1

    async def retire(self, digest: str) -> None:
        p = self.pools.pop(digest, None)
        if p is not None:
            await p.close()

    async def close(self) -> None:
        await asyncio.gather(*(p.close() for p in self.pools.values()), return_exceptions=True)
        self.pools.clear()
