"""Services that count their own side effects, so tests can tell how many times a job really ran.

Each run first appends `<token> <pid of its agent>` to `<path>.started` (the job began: who ran
it), sleeps `seconds`, then appends `<token>` to `<path>` (the job's effect took place). Appends
are single O_APPEND writes of one short line, so concurrent runs never interleave.
"""
from __future__ import annotations

import os
import time

from pydantic import BaseModel, Field

from microcores import MicroCore


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
