"""A service that reports its progress, for tests/test_progress.py.

`progress.steps` reports 0.25, 0.5 and 0.75 (each with a message), sleeping `pause` seconds
before each and once more before it answers."""
from __future__ import annotations

import time

from pydantic import BaseModel

from microcores import MicroCore


class StepsIn(BaseModel):
    pause: float = 0.6


class StepsOut(BaseModel):
    done: int


class Steps(MicroCore[StepsIn, StepsOut]):
    """Three steps, reported with self.progress()."""

    name = "progress.steps"
    timeout = 60.0
    idempotent = True  # (a cold worker may start slower than a confirm_start job's 1 s claim window)

    def process(self, data: StepsIn) -> StepsOut:
        for i, f in enumerate((0.25, 0.5, 0.75), 1):
            time.sleep(data.pause)
            self.progress(f, f"step {i} of 3")
        time.sleep(data.pause)
        return StepsOut(done=3)
