"""A service that holds memory on purpose: volunteer memory limits are tested with it."""
from __future__ import annotations

import time

from pydantic import BaseModel, Field

from microcores import MicroCore


class HogIn(BaseModel):
    mib: int = Field(ge=0, le=8192, description="MiB to allocate and touch")
    hold_s: float = Field(default=0.0, ge=0, le=60, description="seconds to hold it")


class HogOut(BaseModel):
    mib: int


class MemoryHog(MicroCore[HogIn, HogOut]):
    """Allocates `mib` MiB, writes every page, holds it for `hold_s` seconds."""

    name = "tests.memory_hog"
    version = "1"
    timeout = 60.0
    idempotent = True  # no side effects: a job stopped by a volunteer's limit may run elsewhere

    def process(self, data: HogIn) -> HogOut:
        block = bytearray(data.mib * 2**20)
        for i in range(0, len(block), 4096):
            block[i] = 1
        time.sleep(data.hold_s)
        return HogOut(mib=len(block) // 2**20)
