"""Services with distinct, fixed costs for the placement tests (tests/test_placement_e2e.py).

Each sleeps a fixed time, so its run time is known whatever its input: `placement.cheap` (10 ms,
called often), `placement.medium` (100 ms), `placement.slow` (600 ms, called rarely) and
`placement.unused` (never called). None is pure: no call is answered from the result cache, so
every call is a run that placement observes.

`placement.slow_start` takes SLOW_START_S to load in a worker (agents and the coordinator start a
worker when they install a package): a long install, during which placement can change its mind.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from pydantic import BaseModel, Field

from microcores import MicroCore


SLOW_START_S = 4.0


def _loading_in_worker_of(name: str) -> bool:
    """True while a worker (`python -m microcores._worker DIR`) loads the package of `name`."""
    if not os.environ.get("MICROSWARM_WORKER_PARENT") or len(sys.argv) < 2:
        return False
    try:
        return json.loads((Path(sys.argv[-1]) / ".manifest.json").read_bytes()).get("name") == name
    except (OSError, ValueError, AttributeError):
        return False


if _loading_in_worker_of("placement.slow_start"):
    time.sleep(SLOW_START_S)


class WorkIn(BaseModel):
    n: int = Field(default=0, description="any number: echoed back")


class WorkOut(BaseModel):
    n: int
    pid: int


def _work(seconds: float, data: WorkIn) -> WorkOut:
    time.sleep(seconds)
    return WorkOut(n=data.n, pid=os.getpid())


class Cheap(MicroCore[WorkIn, WorkOut]):
    """Sleeps 10 ms."""

    name = "placement.cheap"
    version = "1"
    pure = False
    idempotent = True
    timeout = 30.0

    def process(self, data: WorkIn) -> WorkOut:
        return _work(0.01, data)


class Medium(MicroCore[WorkIn, WorkOut]):
    """Sleeps 100 ms."""

    name = "placement.medium"
    version = "1"
    pure = False
    idempotent = True
    timeout = 30.0

    def process(self, data: WorkIn) -> WorkOut:
        return _work(0.1, data)


class Slow(MicroCore[WorkIn, WorkOut]):
    """Sleeps 600 ms."""

    name = "placement.slow"
    version = "1"
    pure = False
    idempotent = True
    timeout = 30.0

    def process(self, data: WorkIn) -> WorkOut:
        return _work(0.6, data)


class Unused(MicroCore[WorkIn, WorkOut]):
    """Never called by the tests: placement must give it to nobody."""

    name = "placement.unused"
    version = "1"
    pure = False
    idempotent = True
    timeout = 30.0

    def process(self, data: WorkIn) -> WorkOut:
        return _work(0.0, data)


class SlowStart(MicroCore[WorkIn, WorkOut]):
    """Quick to run, SLOW_START_S to load in a worker."""

    name = "placement.slow_start"
    version = "1"
    pure = False
    idempotent = True
    timeout = 30.0

    def process(self, data: WorkIn) -> WorkOut:
        return _work(0.0, data)
