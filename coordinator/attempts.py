"""One attempt of a job on agents: how long it may take, when it is hedged, and what its
failures mean. The scheduler (scheduler.py) decides where the next attempt goes.

A job that may run again (pure or idempotent) gets a timeout learnt from its service's recent
round trips and, past the recent p95, a second copy on another agent: the first answer wins.
A job that must not run twice starts only on the coordinator's go (JobClaim/StartJob): given up
on before that, it never ran and may go elsewhere; lost after that, it is `outcome_unknown`.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

from microcores.errors import OutcomeUnknown
from microswarm.protos import microswarm_pb2 as pb

from .agents import AgentLost, AgentSession, AgentSilent, JobRecord
from .logsafe import safe
from .observed import HedgeBudget, ServiceTimes
from .quarantine import Quarantine
from .registry import ServiceEntry
from .slots import SlotQueue
from .staging import STAGE

log = logging.getLogger("microswarm.scheduler")

CLAIM_TIMEOUT_S = 1.0   # an agent that does not ask to start a confirm_start job in this time loses it
RESULT_GRACE_S = 1.0    # past a started job's own deadline, the agent has this long to report
HANDED_BACK = {"paused", "owner_busy", "cpu_time_limit", "memory_limit"}  # the volunteer's limits, not faults


class Retry(Exception):
    """This attempt failed in a way that lets the job run elsewhere (but not on `agents` again)."""

    def __init__(self, message: str, agents: list[str] | None = None, job: str = "") -> None:
        super().__init__(message)
        self.agents = agents or []
        self.job = job


class Attempts:
    def __init__(self, queue: SlotQueue, quarantine: Quarantine, job_id: Callable[[], str],
                 counts: dict[str, int], hedge: bool, local_slots: int) -> None:
        self.queue = queue              # a hedge takes a free slot from it, never waits in it
        self.quarantine = quarantine
        self.job_id = job_id
        self.counts = counts            # the scheduler's: hedges, outcome_unknown
        self.hedge_on = hedge
        self.local_slots = local_slots  # > 0: leave the coordinator time to run the job after an attempt
        self.hedges = HedgeBudget()
        self.ran: Callable[[str, float], None] | None = None

    def _job(self, agent: AgentSession, entry: ServiceEntry, input_bytes: bytes, chain: list[str], deadline: float,
             confirm: bool) -> pb.Job:
        job = pb.Job(job_id=self.job_id(), service=entry.name, digest=entry.digest,
                     deadline_s=max(0.001, min(deadline - time.monotonic(), float(entry.cls.timeout))),
                     chain=chain, confirm_start=confirm)
        stage = STAGE.get()  # its input already went to this agent (staging.py): the job names it
        staged = stage.claim_for(agent) if stage is not None else ""
        if staged:
            job.staged = staged
            self.counts["staged"] += 1
        else:
            job.input = input_bytes
        return job

    async def rerunnable(self, agent: AgentSession, entry: ServiceEntry, input_bytes: bytes, chain: list[str],
                         deadline: float, times: ServiceTimes,
                         excluded: set[str]) -> tuple[pb.JobResult, AgentSession, bytes]:
        """A job that may run again: learnt timeout, hedged past the recent p95, first answer wins."""
        job = self._job(agent, entry, input_bytes, chain, deadline, False)
        t0 = time.monotonic()
        end = t0 + self._timeout(entry, times, deadline - t0, len(excluded))
        hedge = times.hedge_after() if self.hedge_on else None
        hedge_at = t0 + hedge if hedge is not None else None
        runs: dict[asyncio.Future[pb.JobResult], tuple[AgentSession, JobRecord]] = {}
        rec = agent.start_job(job)
        runs[rec.future] = (agent, rec)
        self.hedges.earn()
        faults: list[str] = []
        pending = set(runs)
        try:
            while pending:
                wake = end if hedge_at is None else min(end, hedge_at)
                done, pending = await asyncio.wait(pending, timeout=max(0.0, wake - time.monotonic()),
                                                   return_when=asyncio.FIRST_COMPLETED)
                for fut in done:
                    a, r = runs[fut]
                    exc = fut.exception()
                    if exc is None and (fut.result().ok or not fut.result().agent_fault):
                        self._succeeded(a, r, times)
                        return fut.result(), a, await _output(fut.result(), r)
                    faults.append(self._fault(a, entry, exc, fut.result() if exc is None else None))
                now = time.monotonic()
                if pending and hedge_at is not None and now >= hedge_at:
                    hedge_at = None
                    second = self._hedge(entry, job, input_bytes, excluded | {a.agent_id for a, _ in runs.values()})
                    if second is not None:
                        runs[second[1].future] = second
                        pending.add(second[1].future)
                elif pending and now >= end:
                    if now < deadline - 0.001:  # the learnt timeout, not the caller's deadline, ran out
                        times.add(now - t0)  # censored, but it lets a service that got slower get more time
                        for a, r in runs.values():
                            if not r.future.done():
                                a.jobs_timed_out += 1
                                self.quarantine.strike(a, f"job {r.job_id} of {entry.name} timed out")
                    raise Retry(f"{entry.name} timed out after {now - t0:.2f} s on "
                                 f"{', '.join(a.agent_id for a, r in runs.values() if not r.future.done())}",
                                 [a.agent_id for a, _ in runs.values()], job.job_id)
            raise Retry("; ".join(faults), [a.agent_id for a, _ in runs.values()], job.job_id)
        finally:
            for a, r in runs.values():
                a.abandon(r)  # the loser of a hedge, a job that timed out or went silent: cancel it there
                _release(r)

    def _hedge(self, entry: ServiceEntry, job: pb.Job, input_bytes: bytes,
               excluded: set[str]) -> tuple[AgentSession, JobRecord] | None:
        if self.hedges.tokens < 1.0:
            return None
        b = self.queue.take(entry.digest, frozenset(excluded))
        if b is None:
            return None
        self.hedges.spend()
        self.counts["hedges"] += 1
        copy = pb.Job()
        copy.CopyFrom(job)
        copy.job_id = self.job_id()
        if copy.staged:  # the input went ahead to the first agent only
            copy.ClearField("staged")
            copy.input = input_bytes
        log.debug("hedging %s: job %s also sent to %s", entry.name, job.job_id, b.agent_id)
        return b, b.start_job(copy)  # type: ignore[attr-defined, return-value]

    async def once(self, agent: AgentSession, entry: ServiceEntry, input_bytes: bytes, chain: list[str],
                   deadline: float, times: ServiceTimes) -> tuple[pb.JobResult, AgentSession, bytes]:
        """A job that must not run twice: it starts only with our go, and is never re-run once started."""
        job = self._job(agent, entry, input_bytes, chain, deadline, True)
        rec = agent.start_job(job)
        assert rec.claimed is not None
        try:
            claim_wait = min(CLAIM_TIMEOUT_S, max(0.0, deadline - time.monotonic()))
            either: set[asyncio.Future[Any]] = {rec.claimed, rec.future}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED, timeout=claim_wait)
            if rec.future.done() and rec.future.exception() is None:
                res = rec.future.result()
                if res.agent_fault:  # refused before it started (paused, busy, not installed)
                    raise Retry(self._fault(agent, entry, None, res), job=job.job_id)
                return res, agent, await _output(res, rec)
            if not rec.started:
                exc = rec.claimed.exception() if rec.claimed.done() and not rec.claimed.cancelled() else None
                if exc is None and claim_wait >= CLAIM_TIMEOUT_S:
                    self.quarantine.strike(agent, f"job {job.job_id} of {entry.name} was not started in time")
                raise Retry(f"{entry.name} did not start on {agent.agent_id} "
                             f"({exc or f'no claim within {CLAIM_TIMEOUT_S:g} s'}); it never ran there", job=job.job_id)
            try:
                async with asyncio.timeout(job.deadline_s + RESULT_GRACE_S):  # (wait_for can swallow a cancel)
                    res = await asyncio.shield(rec.future)
            except AgentLost as exc:
                self.counts["outcome_unknown"] += 1
                raise OutcomeUnknown(
                    f"{entry.name} started on agent {agent.agent_id}, which then "
                    f"{'fell silent' if isinstance(exc, AgentSilent) else 'vanished'} ({exc}); it was not run "
                    "again because the service is not idempotent: it may or may not have taken effect") from None
            except asyncio.TimeoutError:
                agent.jobs_timed_out += 1
                self.quarantine.strike(agent, f"job {job.job_id} of {entry.name} never reported")
                self.counts["outcome_unknown"] += 1
                raise OutcomeUnknown(
                    f"{entry.name} started on agent {agent.agent_id}, which did not report it within its deadline; "
                    "it was not run again because the service is not idempotent") from None
            if res.agent_fault and not res.not_started:
                self.counts["outcome_unknown"] += 1
                raise OutcomeUnknown(
                    f"{entry.name} failed mid-run on agent {agent.agent_id} ({res.error.message}); it was not run "
                    "again because the service is not idempotent: it may or may not have taken effect")
            if res.agent_fault:
                raise Retry(self._fault(agent, entry, None, res), job=job.job_id)
            if res.ok:
                self._succeeded(agent, rec, times)
            return res, agent, await _output(res, rec)
        finally:
            agent.abandon(rec)
            _release(rec)
            for fut in (rec.future, rec.claimed):  # failures were read above: mark them seen
                if fut.done() and not fut.cancelled():
                    fut.exception()

    # ------------------------------------------------------------ outcomes

    def _timeout(self, entry: ServiceEntry, times: ServiceTimes, remaining: float, tried: int) -> float:
        """The learnt timeout, four times longer on each retry: a job that takes longer than the
        recent ones because of its input (not its agent) still gets done on an agent."""
        ceiling = min(float(entry.cls.timeout), remaining)
        t = min(ceiling, times.job_timeout(ceiling) * 4 ** tried)
        if self.local_slots > 0 and times.known:  # leave the coordinator time to run it after this
            keep = min(float(entry.cls.timeout), 2 * times.p99 + 0.05)
            if remaining - keep >= t * 0.5:
                t = min(t, remaining - keep)
        return max(0.001, t)

    def _succeeded(self, agent: AgentSession, rec: JobRecord, times: ServiceTimes) -> None:
        rtt = time.monotonic() - rec.sent_at
        times.add(rtt)
        agent.ewma_s = rtt if agent.ewma_s == 0 else 0.8 * agent.ewma_s + 0.2 * rtt
        self.quarantine.cleared(agent)
        if self.ran is not None:
            self.ran(rec.service, rtt)

    def _fault(self, agent: AgentSession, entry: ServiceEntry, exc: BaseException | None,
               res: pb.JobResult | None) -> str:
        if exc is not None:
            return f"agent {agent.agent_id} {'fell silent' if isinstance(exc, AgentSilent) else 'was lost'}: {exc}"
        assert res is not None
        if res.error.code not in HANDED_BACK:
            self.quarantine.strike(agent, f"{entry.name} failed there: {safe(res.error.message)}")
        return f"agent {agent.agent_id}: {safe(res.error.message or res.error.code)}"  # logged: the agent's text escaped


async def _output(res: pb.JobResult, rec: JobRecord) -> bytes:
    """The answer's output: one that came ahead in pieces is read back from its spool (checked
    whole there by the link); the call's Outflow learns which job answered."""
    if rec.outflow is not None:
        rec.outflow.winner = rec.job_id
    if res.output_size and rec.output is not None:
        return await rec.output.read()
    return res.output


def _release(rec: JobRecord) -> None:
    """A job's output spool goes with it, unless its pieces are being passed on to the client."""
    if rec.output is not None and (rec.outflow is None or rec.outflow.spool is not rec.output):
        rec.output.close()
