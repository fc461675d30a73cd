"""Dispatch: one call in, exactly one outcome out.

validate (from the service's own model) -> result cache -> pick an agent that holds the
package and has a free slot (random by default) -> run it there under the deadline -> on an
agent fault, timeout or disconnect, the coordinator runs it itself -> check the output
against the service's model (agents are not trusted) -> log the call.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from typing import TYPE_CHECKING, Any, Callable

from microcores import _codec
from microcores._worker import WorkerCrashed
from microcores.core import validate_model
from microcores.errors import (CallCycle, DeadlineExceeded, DepthExceeded, InvalidInput, MicroError,
                               Unavailable, from_code)
from protos import microswarm_pb2 as pb

from .agents import AgentLost, AgentSession
from .calllog import CallEntry
from .registry import ServiceEntry

if TYPE_CHECKING:
    from .server import Coordinator

log = logging.getLogger("microswarm.dispatch")

MAX_DEPTH = 8
INSTALL_WAIT_S = 5.0  # how long a call waits for an agent that is installing its package


class Strategy:
    """Picks one of the candidate agents (all hold the package and have a free slot)."""

    name = "random"

    def pick(self, candidates: list[AgentSession]) -> AgentSession:
        return random.choice(candidates)


class RoundRobin(Strategy):
    name = "round_robin"

    def __init__(self) -> None:
        self._n = itertools.count()

    def pick(self, candidates: list[AgentSession]) -> AgentSession:
        candidates.sort(key=lambda a: a.agent_id)
        return candidates[next(self._n) % len(candidates)]


class LeastLoaded(Strategy):
    name = "least_loaded"

    def pick(self, candidates: list[AgentSession]) -> AgentSession:
        best = max(a.free / a.slots for a in candidates)
        return random.choice([a for a in candidates if a.free / a.slots == best])


STRATEGIES: dict[str, Callable[[], Strategy]] = {"random": Strategy, "round_robin": RoundRobin,
                                                 "least_loaded": LeastLoaded}


class Dispatcher:
    def __init__(self, coordinator: "Coordinator", strategy: str = "random") -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown dispatch strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
        self.c = coordinator
        self.strategy = STRATEGIES[strategy]()
        self.in_flight = 0
        self.fallbacks = 0
        self.accepting = True
        self.observers: list[Callable[[CallEntry, pb.CallReply], None]] = []

    # ------------------------------------------------------------ the call pipeline

    async def call(self, req: pb.CallRequest, *, client: str = "", address: str = "") -> pb.CallReply:
        t0 = time.perf_counter()
        self.in_flight += 1
        reply = pb.CallReply(service=req.service, encoding=req.encoding)
        try:
            if not self.accepting:
                raise Unavailable("the coordinator is shutting down; retry against another coordinator "
                                  "or after it restarts")
            await self._call(req, reply)
            reply.status = "ok"
        except MicroError as exc:
            reply.status = "error"
            reply.error.CopyFrom(pb.Error(code=exc.code, message=exc.message, field=exc.field))
            reply.ClearField("result")
        except Exception as exc:  # a bug of ours: still exactly one answer, and a loud log
            log.exception("internal error while calling %s", req.service)
            reply.status = "error"
            reply.error.CopyFrom(pb.Error(code="internal", message=f"internal error: {type(exc).__name__}: {exc}"))
        finally:
            self.in_flight -= 1
        if not reply.executed_by:
            reply.executed_by = "coordinator"  # refused before anything ran: the coordinator answered
        reply.process_time_ms = (time.perf_counter() - t0) * 1000
        entry = CallEntry(time.time(), client or req.client or "anonymous", address, req.service,
                          reply.executed_by or "-", reply.status == "ok", reply.process_time_ms,
                          reply.error.code if reply.status != "ok" else "", reply.attempts, reply.cache_hit)
        self.c.calllog.add(entry)
        if log.isEnabledFor(logging.DEBUG):  # one event per call: --log-level debug --log-format json
            log.debug("call %s by %s: %s, run by %s in %.1f ms", entry.service, entry.client,
                      "ok" if entry.success else entry.error_code, entry.executed_by, entry.ms,
                      extra={"event": "call", "client": entry.client, "service": entry.service,
                             "executed_by": entry.executed_by, "outcome": "ok" if entry.success else entry.error_code,
                             "ms": round(entry.ms, 3), "attempts": entry.attempts, "address": entry.address})
        for observer in self.observers:
            observer(entry, reply)
        return reply

    async def _call(self, req: pb.CallRequest, reply: pb.CallReply) -> None:
        entry = self.c.registry.get(req.service)
        reply.version = entry.version
        chain = list(req.chain)
        if entry.name in chain:
            raise CallCycle(f"call cycle refused: {' -> '.join(chain + [entry.name])}")
        if len(chain) >= MAX_DEPTH:
            raise DepthExceeded(f"call depth {len(chain) + 1} exceeds the limit of {MAX_DEPTH}: "
                                f"{' -> '.join(chain + [entry.name])}")
        timeout = float(entry.cls.timeout)
        budget = req.deadline_s if req.deadline_s > 0 else timeout + 5.0
        deadline = time.monotonic() + budget
        raw: Any = req.input if req.encoding == pb.JSON else _codec.unpack(req.input)
        if req.encoding == pb.JSON and len(raw) > _codec.MAX_PAYLOAD:
            raise InvalidInput(f"input of {len(raw)} bytes exceeds the limit of {_codec.MAX_PAYLOAD}")
        model = validate_model(entry.cls.input_model, raw if raw != b"" else b"{}")
        value = model.model_dump(mode="python")
        input_bytes = _codec.pack(value)

        cache = self.c.cache
        key = None
        if cache is not None and entry.cls.pure and entry.cls.cache:
            key = self.c.cache_key(entry, value)
            hit = cache.get(key)
            if hit is not None:
                reply.executed_by, reply.cache_hit, reply.attempts = "cache", True, 0
                reply.result = self._encode_result(entry, _codec.unpack(hit), req.encoding)
                return

        output, executed_by, attempts = await self._execute(entry, input_bytes, chain + [entry.name], deadline, reply)
        reply.executed_by, reply.attempts = executed_by, attempts
        out = entry.cls.validate_output(_codec.unpack(output))
        out_value = out.model_dump(mode="python")
        if key is not None:
            cache.put(key, _codec.pack(out_value), entry.cls.cache_ttl)
        reply.result = self._encode_result(entry, out, req.encoding)

    @staticmethod
    def _encode_result(entry: ServiceEntry, out: Any, encoding: int) -> bytes:
        if encoding == pb.JSON:
            if not isinstance(out, entry.cls.output_model):
                out = entry.cls.output_model.model_validate(out)
            return out.model_dump_json().encode()
        if not isinstance(out, dict):
            out = out.model_dump(mode="python")
        return _codec.pack(out)

    # ------------------------------------------------------------ placement of one job

    def candidates(self, digest: str) -> list[AgentSession]:
        return [a for a in self.c.agents.values() if a.dispatchable(digest)]

    async def _execute(self, entry: ServiceEntry, input_bytes: bytes, chain: list[str],
                       deadline: float, reply: pb.CallReply) -> tuple[bytes, str, int]:
        """Run the job; an error still tells who ran it and after how many attempts (set on `reply`)."""
        attempts = 0
        cands = self.candidates(entry.digest)
        wait_until = min(time.monotonic() + INSTALL_WAIT_S, deadline - 1.0)
        while not cands and time.monotonic() < wait_until and any(
                a.installing(entry.digest) for a in self.c.agents.values()):
            # An agent is installing this package right now (just published, or just joined):
            # it will hold it in a moment, and the coordinator's own slots are the last resort.
            await self.c.wait_holdings(wait_until - time.monotonic())
            cands = self.candidates(entry.digest)
        if cands:
            agent = self.strategy.pick(cands)
            attempts += 1
            remaining = deadline - time.monotonic()
            job = pb.Job(job_id=self.c.link.next_job_id(), service=entry.name, digest=entry.digest,
                         input=input_bytes, deadline_s=min(remaining, float(entry.cls.timeout)), chain=chain)
            try:
                res = await agent.run_job(job, remaining)
            except AgentLost as exc:
                log.warning("%s on agent %s lost (%s); the coordinator takes over", entry.name, agent.agent_id, exc,
                            extra={"agent": agent.agent_id, "job": job.job_id, "service": entry.name})
                self.c.suspect(agent, f"lost job {job.job_id}")
            except asyncio.TimeoutError:
                log.warning("%s on agent %s timed out", entry.name, agent.agent_id,
                            extra={"agent": agent.agent_id, "job": job.job_id, "service": entry.name})
                self.c.suspect(agent, f"job {job.job_id} timed out")
            else:
                if res.ok:
                    return res.output, agent.agent_id, attempts
                if not res.agent_fault:
                    reply.executed_by, reply.attempts = agent.agent_id, attempts
                    raise from_code(res.error.code, res.error.message, res.error.field)
                log.warning("agent %s failed %s: %s; the coordinator takes over", agent.agent_id, entry.name,
                            res.error.message, extra={"agent": agent.agent_id, "job": job.job_id,
                                                      "service": entry.name, "error_code": res.error.code})
        remaining = deadline - time.monotonic()
        reply.attempts = attempts
        if remaining <= 0:
            raise DeadlineExceeded(f"{entry.name} did not finish within its deadline "
                                   f"({attempts} attempt{'s' if attempts != 1 else ''})")
        attempts += 1
        reply.executed_by, reply.attempts = "coordinator", attempts
        self.fallbacks += 1
        job_id = self.c.link.next_job_id()
        try:
            outcome = await self.c.local.run(entry, job_id, input_bytes, min(remaining, float(entry.cls.timeout)),
                                             self.nested_handler(chain, deadline))
        except WorkerCrashed as exc:
            raise Unavailable(f"{entry.name} could not run on the coordinator either: {exc}") from None
        if not outcome.ok:
            e = outcome.error
            raise from_code(e.get("code", "service_error"), e.get("message", "failed"), e.get("field", ""))
        return outcome.output, "coordinator", attempts

    def nested_handler(self, chain: list[str], deadline: float) -> Any:
        async def nested(service: str, data: dict[str, Any]) -> dict[str, Any]:
            req = pb.CallRequest(service=service, input=_codec.pack(data), encoding=pb.MSGPACK, chain=chain,
                                 deadline_s=max(0.001, deadline - time.monotonic()))
            reply = await self.call(req, client="coordinator")
            if reply.status != "ok":
                raise from_code(reply.error.code, reply.error.message, reply.error.field)
            return _codec.unpack(reply.result)
        return nested
