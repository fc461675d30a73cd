"""A large result on its way back: pieces of a job's output go on to the client as they arrive.

An agent sends an output past 1 MiB as JobOutput pieces ahead of its JobResult; the link writes
them to the job's spool (spool.py) and, when the call came on a CallStream (OUTFLOW is set in the
call's task), the call's Outflow passes them on to the client, at most DOWN_WINDOW pieces queued on
the stream. Only the first job of a call whose output starts is followed (a hedge's twin is not),
and again after that one failed, then from the first piece (`restart`). The client keeps the pieces
and takes them as the result only when the call's reply says so (CallReply.result_size): the
dispatcher says so when the answer is exactly that job's output, validated whole. Otherwise the
reply carries the result itself and the client drops the pieces.
"""
from __future__ import annotations

import asyncio
from contextvars import ContextVar
from typing import Awaitable, Callable

from microcores._chunks import PIECE
from microswarm.protos import microswarm_pb2 as pb

from .spool import Spool

DOWN_WINDOW = 4

Put = Callable[[pb.StreamChunk], Awaitable[None]]


class Outflow:
    def __init__(self, cid: int, put: Put) -> None:
        self.cid = cid
        self.put = put                  # queues one chunk on the stream (waits while the window is full)
        self.job = ""                   # the job being followed
        self.spool: Spool | None = None
        self.task: asyncio.Task[None] | None = None
        self.sent_any = False
        self.winner = ""                # the job whose answer the call took (set by the scheduler's attempts)

    def follow(self, job_id: str, spool: Spool) -> bool:
        """Pass this job's output on, unless another job's is being passed on and has not failed."""
        if self.task is not None and not (self.task.done() and self.task.exception() is not None):
            return False
        if self.spool is not None and self.spool is not spool:
            self.spool.close()
        self.job, self.spool = job_id, spool
        self.task = asyncio.ensure_future(self._forward(spool, restart=self.sent_any))
        return True

    async def _forward(self, spool: Spool, restart: bool) -> None:
        first = True
        async for piece in spool.pieces(PIECE):
            self.sent_any = True
            await self.put(pb.StreamChunk(call=self.cid, data=piece, more=True, restart=restart and first))
            first = False

    def carries(self, job_id: str) -> bool:
        """This job's output is the one passed on (so far without a failure)."""
        return bool(job_id) and self.job == job_id and self.task is not None \
            and not (self.task.done() and self.task.exception() is not None)

    async def finish(self, reply: pb.CallReply) -> None:
        """Before the reply goes: every piece queued when it points at them, else stop sending."""
        try:
            if reply.result_size and self.task is not None:
                try:
                    await self.task
                except Exception:  # the pieces could not all go: the reply carries the result itself
                    assert self.spool is not None
                    reply.result = await self.spool.read()
                    reply.result_size = 0
            elif self.task is not None and not self.task.done():
                self.task.cancel()
        finally:
            if self.spool is not None:
                self.spool.close()

    def close(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
        if self.spool is not None:
            self.spool.close()


OUTFLOW: ContextVar[Outflow | None] = ContextVar("outflow", default=None)
