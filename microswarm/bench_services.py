"""Services that `microswarm bench` publishes to its own cluster.

This file ships to agents as a standalone package, so it imports only the public SDK and pydantic.
"""
from __future__ import annotations

import time

from pydantic import BaseModel, Field

from microcores import MicroCore


class TickIn(BaseModel):
    ms: float = Field(default=10.0, ge=0, le=10_000, description="milliseconds to sleep")


class TickOut(BaseModel):
    ms: float


class Tick(MicroCore[TickIn, TickOut]):
    """Sleeps the milliseconds it is given: a short call of known length, never served from the cache."""

    name = "bench.tick"
    version = "1"
    pure = True
    idempotent = True
    cache = False
    timeout = 10.0

    def process(self, data: TickIn) -> TickOut:
        time.sleep(data.ms / 1000)
        return TickOut(ms=data.ms)
