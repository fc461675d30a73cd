"""The scheduler: where one call's job runs, and what happens when that executor fails it.

Volunteers do the work: a call waits in line for a slot on an agent that holds the package
(slots.SlotQueue) and runs on the coordinator only when no agent holds it, after it failed on
agents, or after waiting `queue_wait_s`; never past the caller's deadline. Each attempt on an
agent has a timeout learnt from the service's recent round trips (observed.ServiceTimes); one
that runs past the recent p95 is hedged to a second agent. A job that fails, times out or loses
its agent moves to another executor, up to `max_attempts` counting the coordinator.

At most once: a service that is neither pure nor idempotent is sent with `confirm_start`. The
agent asks before it starts (JobClaim) and starts only on our go (StartJob), so a job we gave
up on before that point cannot start anywhere but where we send it next. Once started, it is
never hedged nor re-run: if its agent vanishes or falls silent the answer is `outcome_unknown`.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Callable

from microcores._worker import NestedHandler, WorkerCrashed
from microcores.errors import DeadlineExceeded, Unavailable, from_code
from microswarm.protos import microswarm_pb2 as pb

from .agents import AgentSession, JobRecord
from .attempts import Attempts, Retry
from .calls import PROGRESS
from .local import LocalRunner
from .observed import Observed
from .quarantine import Quarantine
from .registry import ServiceEntry
from .slots import LocalSlots, SlotQueue
from .staging import STAGE

log = logging.getLogger("microswarm.scheduler")

SAMPLE = 64  # past this many agents, candidates() looks at a random sample of this many
PREFETCH_BELOW_S = 0.05  # jobs whose recent p99 is shorter may queue in an agent (see AgentSession.free_for)


@dataclass
class SchedulerSettings:
    queue_wait_s: float = 2.0
    queue_limit: int = 10_000
    local_slots: int = 2
    max_attempts: int = 3
    hedge: bool = True


class Scheduler:
    def __init__(self, agents: dict[str, AgentSession], local: LocalRunner, settings: SchedulerSettings,
                 pick: Callable[[list[AgentSession]], AgentSession], job_id: Callable[[], str],
                 quarantine: Quarantine, place: Callable[[ServiceEntry], bool],
                 installed: Callable[[float], Any]) -> None:
        self.agents = agents
        self.local = local
        self.s = settings
        self.job_id = job_id
        self.quarantine = quarantine
        self.place = place              # give a package nobody holds to an agent; True if one is installing it
        self.installed = installed      # wait (seconds) for a holdings change
        self.queue = SlotQueue(settings.queue_limit, self.candidates, pick)  # type: ignore[arg-type]
        self.local_slots = LocalSlots(settings.local_slots)
        self.observed = Observed()
        self.short: set[str] = set()  # packages whose jobs are short enough for agents to prefetch
        self._fleet_list: list[AgentSession] | None = None  # self.agents' sessions, for sampling
        self.counts = {"retries": 0, "hedges": 0, "late_results": 0, "outcome_unknown": 0, "offloaded": 0,
                       "local": 0, "staged": 0}
        self.attempts = Attempts(self.queue, quarantine, job_id, self.counts, settings.hedge, settings.local_slots)

    @property
    def ran(self) -> Callable[[str, float], None] | None:
        """Placement's observations: (service, seconds) of each job that ran."""
        return self.attempts.ran

    @ran.setter
    def ran(self, hook: Callable[[str, float], None] | None) -> None:
        self.attempts.ran = hook

    # ------------------------------------------------------------ who can take a job

    def candidates(self, digest: str, excluded: frozenset[str]) -> list[AgentSession]:
        """Agents that hold `digest` and have a free slot. Past SAMPLE agents, those among SAMPLE drawn
        at random (the whole fleet only when none of them qualifies): one call must not cost a scan
        of thousands of agents, and the strategies pick among the sample as p2c does among two."""
        prefetch = digest in self.short
        fleet = self._fleet()
        if len(fleet) > SAMPLE:
            some = [a for a in random.sample(fleet, SAMPLE)
                    if a.dispatchable(digest, prefetch) and a.agent_id not in excluded]
            if some:
                return some
        return [a for a in fleet if a.dispatchable(digest, prefetch) and a.agent_id not in excluded]

    def holders(self, digest: str, excluded: frozenset[str] = frozenset()) -> bool:
        """Whether any agent (not excluded) holds `digest` and takes jobs; stops at the first."""
        return any(a.holds(digest) and a.agent_id not in excluded for a in self.agents.values())

    def _fleet(self) -> list[AgentSession]:
        if self._fleet_list is None:
            self._fleet_list = list(self.agents.values())
        return self._fleet_list

    def fleet_changed(self) -> None:
        """An agent joined or left: the list candidates() samples from is made again when next needed."""
        self._fleet_list = None

    def installing(self, digest: str) -> bool:
        return any(a.installing(digest) for a in self.agents.values())

    def slot_freed(self) -> None:
        self.queue.pump()

    def holdings_changed(self) -> None:
        self.queue.wake_unservable(self.holders)
        self.queue.pump()

    def stage_target(self, entry: ServiceEntry) -> AgentSession | None:
        """The agent the next job of `entry` would go to now, were one free (staging.py sends a
        large input there ahead of its job); nothing is reserved."""
        cands = self.queue.candidates(entry.digest, frozenset())
        return self.queue.pick(cands) if cands else None  # type: ignore[return-value]

    # ------------------------------------------------------------ one call

    async def execute(self, entry: ServiceEntry, input_bytes: bytes, chain: list[str], deadline: float,
                      reply: pb.CallReply, nested: NestedHandler, avoid: frozenset[str] = frozenset(),
                      at_once: bool = False) -> tuple[bytes, str]:
        """Run the call's job until one executor answers; `reply.attempts` and `executed_by` follow.

        `avoid`: agents that must not run it (a result's verification needs another volunteer);
        `at_once`: do not wait in line for an agent when the coordinator has a slot free now.
        The service's own error is raised with `executor` set on it (see ServiceAnswer)."""
        rerun = bool(entry.cls.pure or entry.cls.idempotent)
        times = self.observed.of(entry.name)
        if times.known and times.p99 < PREFETCH_BELOW_S:
            self.short.add(entry.digest)
        else:
            self.short.discard(entry.digest)
        excluded: set[str] = set(avoid)
        failures: list[str] = []
        local_ok = self.local_slots.n > 0
        agent_cap = self.s.max_attempts - (1 if local_ok and self.s.max_attempts > 1 else 0)
        while True:
            if time.monotonic() >= deadline:
                raise DeadlineExceeded(f"{entry.name} did not finish within its deadline"
                                       f"{_after(reply.attempts, failures)}")
            if reply.attempts >= self.s.max_attempts:
                raise Unavailable(f"{entry.name} failed on {reply.attempts} executor(s) (--max-attempts "
                                  f"{self.s.max_attempts}): {'; '.join(failures)}")
            where: AgentSession | None = None
            if reply.attempts < agent_cap:  # without local slots every attempt is an agent's
                where = await self._acquire(entry, deadline, frozenset(excluded), local_ok, at_once)
            elif not await self.local_slots.take(deadline - time.monotonic()):
                raise DeadlineExceeded(f"{entry.name}: no coordinator slot before the deadline"
                                       f"{_after(reply.attempts, failures)}")
            reply.attempts += 1
            if where is None:
                reply.executed_by = "coordinator"
                output = await self._run_local(entry, input_bytes, deadline, nested)
                self.counts["local"] += 1
                return output, "coordinator"
            reply.executed_by = where.agent_id
            try:
                res, winner, output = await (self.attempts.rerunnable(where, entry, input_bytes, chain, deadline, times, excluded)
                                     if rerun else self.attempts.once(where, entry, input_bytes, chain, deadline, times))
            except Retry as exc:
                failures.append(str(exc))
                excluded.add(where.agent_id)
                excluded.update(exc.agents)
                self.counts["retries"] += 1
                log.warning("%s: %s; another executor takes over", entry.name, exc,
                            extra={"agent": where.agent_id, "service": entry.name, "job": exc.job})
                continue
            reply.executed_by = winner.agent_id
            if not res.ok:  # the service's own answer (a validation error, its exception): not retried
                raise answered_by(from_code(res.error.code, res.error.message, res.error.field, res.error.details),
                                 winner.agent_id)
            self.counts["offloaded"] += 1
            return output, winner.agent_id

    async def _acquire(self, entry: ServiceEntry, deadline: float, excluded: frozenset[str],
                       local_ok: bool, at_once: bool = False) -> AgentSession | None:
        """An agent with a slot reserved for this job, or None with a coordinator slot held."""
        stage = STAGE.get()  # the agent its input was sent ahead to, when it can take the job now
        if stage is not None and not stage.used and stage.agent.agent_id not in excluded \
                and stage.agent.dispatchable(entry.digest) and not self.queue.waiting_for(entry.digest):
            stage.agent.reserved += 1
            return stage.agent
        agent = self.queue.take(entry.digest, excluded)
        if agent is not None:
            return agent  # type: ignore[return-value]
        if not self.holders(entry.digest, excluded):
            if not self.holders(entry.digest):
                self.place(entry)  # first call of a package nobody holds: give it to an agent
            limit = min(deadline, time.monotonic() + self.s.queue_wait_s) if local_ok else deadline
            while not self.holders(entry.digest, excluded) and self.installing(entry.digest) \
                    and time.monotonic() < limit:
                await self.installed(limit - time.monotonic())
            if not self.holders(entry.digest, excluded):
                await self._local_only(entry, deadline, local_ok)
                return None
            agent = self.queue.take(entry.digest, excluded)
            if agent is not None:
                return agent  # type: ignore[return-value]
        if local_ok and at_once and self.local_slots.try_take():
            return None
        first = deadline - time.monotonic() if not local_ok else min(self.s.queue_wait_s, deadline - time.monotonic())
        agent = await self.queue.wait(entry.digest, excluded, first)
        if agent is not None:
            return agent  # type: ignore[return-value]
        if not self.holders(entry.digest, excluded):
            await self._local_only(entry, deadline, local_ok)
            return None
        if not local_ok:
            raise DeadlineExceeded(f"{entry.name}: no agent slot came free before the deadline")
        return await self._race(entry, deadline, excluded)

    async def _local_only(self, entry: ServiceEntry, deadline: float, local_ok: bool) -> None:
        if not local_ok:
            if self.holders(entry.digest):
                who = f"every agent that holds {entry.name} failed it"
            elif any(entry.digest in a.holdings and a.quarantined for a in self.agents.values()):
                who = f"every agent that holds {entry.name} is in quarantine (it kept failing jobs)"
            else:
                who = f"no connected agent holds {entry.name}"
            raise Unavailable(f"{who}, and this coordinator runs no jobs itself (--local-slots 0): start an "
                              "agent, or give the coordinator slots")
        if not await self.local_slots.take(deadline - time.monotonic()):
            raise DeadlineExceeded(f"{entry.name}: no coordinator slot came free before the deadline")
        return None

    async def _race(self, entry: ServiceEntry, deadline: float, excluded: frozenset[str]) -> AgentSession | None:
        """Waited `queue_wait_s`: the first of an agent slot and a coordinator slot takes the job."""
        if self.local_slots.try_take():
            return None
        left = deadline - time.monotonic()
        ta = asyncio.ensure_future(self.queue.wait(entry.digest, excluded, left))
        tl = asyncio.ensure_future(self.local_slots.take(left))
        try:
            await asyncio.wait({ta, tl}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (ta, tl):
                t.cancel()
            await asyncio.wait({ta, tl})
        agent = ta.result() if ta.done() and not ta.cancelled() and ta.exception() is None else None
        local = bool(tl.result()) if tl.done() and not tl.cancelled() and tl.exception() is None else False
        if agent is not None:
            if local:
                self.local_slots.release()
            return agent  # type: ignore[return-value]
        if local:
            return None
        raise DeadlineExceeded(f"{entry.name}: no agent or coordinator slot came free before the deadline")

    async def _run_local(self, entry: ServiceEntry, input_bytes: bytes, deadline: float,
                         nested: NestedHandler) -> bytes:
        try:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded(f"{entry.name}: the deadline passed before the coordinator could run it")
            try:
                slot = PROGRESS.get()
                if slot is not None:
                    slot.executor = "coordinator"
                outcome = await self.local.run(entry, self.job_id(), input_bytes,
                                               min(remaining, float(entry.cls.timeout)), nested,
                                               None if slot is None else
                                               lambda f, m: slot.report(f, m, "coordinator"))
            except WorkerCrashed as exc:
                raise Unavailable(f"{entry.name} could not run on the coordinator either: {exc}") from None
        finally:
            self.local_slots.release()
        if self.ran is not None:
            self.ran(entry.name, outcome.run_ms / 1000)
        if not outcome.ok:
            e = outcome.error
            raise answered_by(from_code(e.get("code", "service_error"), e.get("message", "failed"), e.get("field", ""),
                                        e.get("details", "")), "coordinator")
        return outcome.output

    async def referee(self, entry: ServiceEntry, input_bytes: bytes, deadline: float, nested: NestedHandler) -> bytes:
        """Run the job on the coordinator to settle a disagreement between executors: its answer
        stands. Runs even with --local-slots 0 (then one at a time in the coordinator's own worker)."""
        if self.local_slots.n > 0:
            if not await self.local_slots.take(deadline - time.monotonic()):
                raise DeadlineExceeded(f"{entry.name}: no coordinator slot to settle a disagreement before the deadline")
        else:
            self.local_slots.used += 1  # released by _run_local
        return await self._run_local(entry, input_bytes, deadline, nested)

    def late_result(self, agent: AgentSession, rec: JobRecord) -> None:
        self.counts["late_results"] += 1
        log.info("late result of job %s (%s) from agent %s dropped: its call was already answered",
                 rec.job_id, rec.service, agent.agent_id, extra={"agent": agent.agent_id, "job": rec.job_id})


def answered_by(exc: Exception, executor: str) -> Exception:
    """Mark an error as the service's own answer (not a failure to run it), given by `executor`."""
    exc.executor = executor  # type: ignore[attr-defined]
    return exc


def _after(attempts: int, failures: list[str]) -> str:
    if not attempts:
        return ""
    return f" ({attempts} attempt{'s' if attempts != 1 else ''}{': ' + '; '.join(failures) if failures else ''})"

