"""Submitted calls: run now, fetched later by id, from any process of the same client.

A submitted call runs as a task of the coordinator's, whether or not its client stays connected
(Ray's ObjectRef, Dask's futures, Celery's AsyncResult). Its envelope is kept after it ends for
`ttl_s` (one hour by default), and the store holds at most `max_calls` calls and `max_bytes` of
results: past either, the oldest finished calls go first, and a submit while `max_calls` are
still running is refused `overloaded`. An id is 128 random bits and is only found by the client
that submitted it: anyone else (or an expired id) gets `unknown_call`.
"""
from __future__ import annotations

import asyncio
import contextvars
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from microcores.errors import Overloaded, UnknownCall
from microswarm.protos import microswarm_pb2 as pb

TTL_S = 3600.0
MAX_CALLS = 10_000
MAX_BYTES = 256 << 20

PENDING, DONE, CANCELLED = "pending", "done", "cancelled"


def new_call_id() -> str:
    return "c" + secrets.token_hex(16)


@dataclass
class Progress:
    """A call's progress: the last `self.progress()` of a job of it (any executor's), and who ran it.
    The dispatcher keeps one per call in flight (Dispatcher.progress, by call id); a submitted call's
    is its StoredCall's, so it is there for Result and GET /v1/calls/ID."""

    service: str = ""
    fraction: float = 0.0
    message: str = ""
    executor: str = ""   # the agent (or "coordinator") whose job reported last
    updated: float = 0.0  # monotonic; 0: no report yet
    started: float = field(default_factory=time.monotonic)

    def report(self, fraction: float, message: str, executor: str) -> None:
        from microcores.core import clean_progress
        self.fraction, self.message = clean_progress(fraction, message)
        self.executor, self.updated = executor, time.monotonic()


# The progress slot of the call whose task this is (set by Dispatcher.call): jobs sent for it report there.
PROGRESS: contextvars.ContextVar[Progress | None] = contextvars.ContextVar("microswarm_progress", default=None)


@dataclass
class StoredCall:
    call_id: str
    owner: str
    service: str
    created: float = field(default_factory=time.monotonic)
    task: asyncio.Task[None] | None = None
    reply: pb.CallReply | None = None
    state: str = PENDING
    finished: float = 0.0
    size: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)
    slot: Progress = field(default_factory=Progress)

    @property
    def progress(self) -> float:
        return 1.0 if self.state == DONE else self.slot.fraction

    @property
    def message(self) -> str:
        return self.slot.message

    def answer(self) -> pb.ResultReply:
        r = pb.ResultReply(call_id=self.call_id, state=self.state, service=self.service,
                           age_s=round(time.monotonic() - self.created, 3), progress=self.progress,
                           progress_message=self.message)
        if self.reply is not None:
            r.reply.CopyFrom(self.reply)
        return r


class CallStore:
    def __init__(self, ttl_s: float = TTL_S, max_calls: int = MAX_CALLS, max_bytes: int = MAX_BYTES) -> None:
        self.ttl_s, self.max_calls, self.max_bytes = ttl_s, max_calls, max_bytes
        self._calls: OrderedDict[str, StoredCall] = OrderedDict()  # submission order
        self._bytes = 0
        self._scanned = 0.0
        self.expired = 0

    def __len__(self) -> int:
        return len(self._calls)

    @property
    def running(self) -> int:
        return sum(1 for c in self._calls.values() if c.state == PENDING)

    def submit(self, owner: str, service: str, run: Callable[[str], Awaitable[pb.CallReply]]) -> StoredCall:
        """Start `run(call_id)` as a task of its own and keep its envelope when it ends."""
        self._expire()
        if len(self._calls) >= self.max_calls and not self._drop_finished(len(self._calls) - self.max_calls + 1):
            raise Overloaded(f"{self.max_calls} submitted calls are still running: wait for some to finish")
        call = StoredCall(new_call_id(), owner, service)
        call.slot.service = service
        self._calls[call.call_id] = call

        async def runner() -> None:
            try:
                reply = await run(call.call_id)
            except asyncio.CancelledError:
                reply = pb.CallReply(status="error", service=service, executed_by="coordinator",
                                     call_id=call.call_id,
                                     error=pb.Error(code="cancelled", message="the call was cancelled"))
                self._finish(call, reply, CANCELLED)
                return
            self._finish(call, reply, DONE)

        call.task = asyncio.get_running_loop().create_task(runner())
        return call

    def _finish(self, call: StoredCall, reply: pb.CallReply, state: str) -> None:
        if call.state != PENDING:
            return
        reply.call_id = call.call_id
        call.reply, call.state, call.finished = reply, state, time.monotonic()
        call.size = reply.ByteSize()
        call.task = None
        if call.call_id in self._calls:
            self._bytes += call.size
        call.done.set()
        if self._bytes > self.max_bytes:
            self._drop_finished(0)

    def get(self, call_id: str, owner: str) -> StoredCall:
        self._expire()
        call = self._calls.get(call_id)
        if call is None or not secrets.compare_digest(call.owner, owner):
            raise UnknownCall(f"no call {call_id[:40]!r} for this client: never submitted by it, or its result "
                              f"expired ({self.ttl_s:g} s after it ended, or earlier when many results are kept)")
        return call

    async def wait(self, call: StoredCall, timeout: float) -> None:
        if call.state == PENDING and timeout > 0:
            try:
                await asyncio.wait_for(call.done.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    def slot(self, call_id: str) -> Progress | None:
        """The progress slot of a submitted call still running (for the dispatcher running it)."""
        call = self._calls.get(call_id)
        return call.slot if call is not None and call.state == PENDING else None

    def cancel(self, call_id: str, owner: str) -> StoredCall:
        """Stop a running call (its job stops wherever it runs); a finished one is left as it is."""
        call = self.get(call_id, owner)
        if call.state == PENDING and call.task is not None:
            call.task.cancel()
        return call

    def cancel_all(self) -> None:
        for call in self._calls.values():
            if call.task is not None:
                call.task.cancel()

    def _expire(self) -> None:
        now = time.monotonic()
        while self._calls:
            oldest = next(iter(self._calls.values()))
            if oldest.state == PENDING or now - oldest.finished < self.ttl_s:
                break
            self._remove(oldest)
        # submission order is not finish order: behind a long-running call, a full scan once a second
        if self._calls and next(iter(self._calls.values())).state == PENDING and now - self._scanned > 1.0:
            self._scanned = now
            for call in [c for c in self._calls.values() if c.state != PENDING and now - c.finished >= self.ttl_s]:
                self._remove(call)
        if self._bytes > self.max_bytes:
            self._drop_finished(0)

    def _drop_finished(self, count: int) -> bool:
        """Drop the oldest finished calls: `count` of them, and more while over the byte budget."""
        dropped = 0
        for call in list(self._calls.values()):
            if dropped >= count and self._bytes <= self.max_bytes:
                break
            if call.state != PENDING:
                self._remove(call)
                dropped += 1
        return dropped >= count

    def _remove(self, call: StoredCall) -> None:
        del self._calls[call.call_id]
        self._bytes -= call.size
        self.expired += 1
