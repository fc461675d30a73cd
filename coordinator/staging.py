"""A large input sent ahead to the agent likely to run its job, while the client still sends it.

Cut-through: the coordinator passes each piece of a streamed input (spool.py) on to one agent as
it arrives, at most STAGE_WINDOW pieces ahead of what that agent's link has taken, so neither a
slow agent nor a fast client makes the coordinator hold the payload. The agent only keeps the
pieces: the job starts when the coordinator, having validated the whole input, sends a Job that
names them (Job.staged). Any other executor (a retry, a hedge, a second opinion, the coordinator)
gets the input as before, read back from the spool: the scheduler's rules do not change.

The stage of a call is in STAGE (a context variable of the call's task, like CALLER): the
scheduler prefers its agent, and the job sent there names it instead of carrying the input.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
from contextvars import ContextVar
from typing import TYPE_CHECKING

from microcores._chunks import FRAME_PIECE
from microswarm.protos import microswarm_pb2 as pb

from .spool import Spool

if TYPE_CHECKING:
    from .agents import AgentSession

log = logging.getLogger("microswarm.staging")

STAGE_WINDOW = 4               # pieces queued on the agent's link before we wait for it
_ids = itertools.count(1)


class Stage:
    def __init__(self, agent: "AgentSession", spool: Spool) -> None:
        self.agent = agent
        self.stage_id = f"s{next(_ids)}"
        self.used = False
        self.task = asyncio.ensure_future(self._send(spool))

    async def _send(self, spool: Spool) -> None:
        agent = self.agent
        async for piece in spool.pieces(FRAME_PIECE):
            await agent.room(STAGE_WINDOW)
            if agent.closed:
                raise ConnectionError(f"agent {agent.agent_id} left while its input was sent ahead")
            agent.send(pb.ToAgent(staged_input=pb.StagedInput(stage_id=self.stage_id, data=piece)))
        agent.send(pb.ToAgent(staged_input=pb.StagedInput(stage_id=self.stage_id, last=True)))

    async def sent(self, timeout: float) -> bool:
        """Wait until every piece is on the agent's link (a job sent after them finds them there)."""
        try:
            async with asyncio.timeout(max(0.0, timeout)):
                await asyncio.shield(self.task)
            return True
        except Exception:  # (the agent left, the input failed, or time ran out: the job goes inline)
            return False

    def claim_for(self, agent: "AgentSession") -> str:
        """The stage's id when a job for `agent` can name it instead of carrying the input (once)."""
        if self.used or agent is not self.agent or not self.task.done() or self.task.cancelled() \
                or self.task.exception() is not None:
            return ""
        self.used = True
        return self.stage_id

    def drop(self) -> None:
        """The call is over: stop sending, and let the agent forget what it holds unless a job used it."""
        if not self.task.done():
            self.task.cancel()
        elif not self.task.cancelled():
            self.task.exception()  # (seen: the call answered without it)
        if not self.used and not self.agent.closed:
            self.agent.send(pb.ToAgent(staged_input=pb.StagedInput(stage_id=self.stage_id, drop=True)))


STAGE: ContextVar[Stage | None] = ContextVar("stage", default=None)
