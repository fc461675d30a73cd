"""Services that count their own side effects, so tests can tell how many times a job really ran.

Each run first appends `<token> <pid of its agent>` to `<path>.started` (the job began: who ran
it), sleeps `seconds`, then appends `<token>` to `<path>` (the job's effect took place). Appends
are single O_APPEND writes of one short line, so concurrent runs never interleave.

With EFFECTS_SLOW_LATER_WORKERS=<path> in a worker's environment and a file at <path>, the first
worker to load after the file appeared loads at once and every later one takes SLOW_START_S: a test
can hold a job deterministically "waiting for a worker" (accepted by its agent, not started) while
another runs.
"""
from __future__ import annotations

import os
import time

from pydantic import BaseModel, Field

from microcores import MicroCore


SLOW_START_S = 3.0


def _slow_start(flag: str) -> None:
    if not os.path.exists(flag):
        return
    try:
        os.close(os.open(flag + ".taken", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except FileExistsError:
        time.sleep(SLOW_START_S)


if os.environ.get("EFFECTS_SLOW_LATER_WORKERS"):
    _slow_start(os.environ["EFFECTS_SLOW_LATER_WORKERS"])


class AppendIn(BaseModel):
    path: str = Field(description="absolute path of the effects file")
    token: str = Field(min_length=1, max_length=200, description="the line to append")
    seconds: float = Field(default=0.0, ge=0, le=120, description="how long to work before the effect")


class AppendOut(BaseModel):
    token: str
    pid: int


def _append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def _run(data: AppendIn) -> AppendOut:
    _append(data.path + ".started", f"{data.token} {os.getppid()}")
    time.sleep(data.seconds)
    _append(data.path, data.token)
    return AppendOut(token=data.token, pid=os.getpid())


class Append(MicroCore[AppendIn, AppendOut]):
    """Appends a token to a file: a side effect that must happen at most once."""

    name = "effects.append"
    version = "1"
    pure = False
    idempotent = False
    timeout = 30.0

    def process(self, data: AppendIn) -> AppendOut:
        return _run(data)


class AppendIdempotent(MicroCore[AppendIn, AppendOut]):
    """The same, declared idempotent: the scheduler may run it again elsewhere."""

    name = "effects.append_idempotent"
    version = "1"
    pure = False
    idempotent = True
    timeout = 30.0

    def process(self, data: AppendIn) -> AppendOut:
        return _run(data)
