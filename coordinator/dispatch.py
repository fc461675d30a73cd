"""Dispatch: one call in, exactly one outcome out.

validate (from the service's own model) -> result cache -> the scheduler runs the job on a
volunteer (waiting in line for a slot; retried, hedged or taken over as scheduler.py says) ->
check the output against the service's model (agents are not trusted) -> log the call.
The strategies here pick one agent among those with a free slot (random by default, as in
seed 002's GetNextClient).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from typing import TYPE_CHECKING, Any, Callable

from microcores import _codec
from microcores.core import validate_model
from microcores.errors import (CallCycle, DeadlineExceeded, DepthExceeded, InvalidInput, MicroError,
                               Unavailable, from_code)
from microcores._worker import NestedHandler
from microswarm.protos import microswarm_pb2 as pb

from .agents import AgentSession
from .caller import CALLER, Caller
from .calllog import CallEntry
from .calls import PROGRESS, Progress, new_call_id
from .outflow import OUTFLOW
from .registry import ServiceEntry
from .spool import Spool
from .staging import STAGE, Stage
from .verify import COORDINATOR, Outcome, Verifier, opened, seal

if TYPE_CHECKING:
    from .scheduler import Scheduler
    from .server import Coordinator

log = logging.getLogger("microswarm.dispatch")

MAX_DEPTH = 8


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


class PowerOfTwo(Strategy):
    """Power of two choices: sample two holders, take the one with fewer jobs in flight, ties to the
    one whose recent round trips were faster. Near least-loaded balance without a global scan."""

    name = "p2c"

    def pick(self, candidates: list[AgentSession]) -> AgentSession:
        if len(candidates) == 1:
            return candidates[0]
        a, b = random.sample(candidates, 2)
        return min((a, b), key=lambda x: (x.load, x.ewma_s))


STRATEGIES: dict[str, Callable[[], Strategy]] = {"random": Strategy, "round_robin": RoundRobin,
                                                 "least_loaded": LeastLoaded, "p2c": PowerOfTwo}


class Dispatcher:
    def __init__(self, coordinator: "Coordinator", scheduler: "Scheduler", strategy: Strategy,
                 verifier: Verifier) -> None:
        self.c = coordinator
        self.scheduler = scheduler
        self.verifier = verifier
        self.strategy = strategy
        self.in_flight = 0
        self.accepting = True
        self.observers: list[Callable[[CallEntry, pb.CallReply], None]] = []
        self.tasks: set[asyncio.Task[Any]] = set()  # calls being answered: drain answers them if it runs out
        self.stopped_message = ""
        self.progress: dict[str, Progress] = {}  # call id -> progress of each call in flight (calls.Progress)

    @property
    def fallbacks(self) -> int:
        return self.scheduler.counts["local"]

    def abort_all(self, message: str) -> int:
        """Drain ran out: every call still in flight is answered `unavailable` with `message`."""
        self.stopped_message = message
        for t in self.tasks:
            t.cancel()
        return len(self.tasks)

    # ------------------------------------------------------------ the call pipeline

    async def call(self, req: pb.CallRequest, *, client: str = "", address: str = "",
                   caller: Caller | None = None, call_id: str = "", inflow: Spool | None = None) -> pb.CallReply:
        """One call, run as `caller` (caller.py: its client, token and address; `client` and `address`
        alone make a caller without a token, an in-process one). The caller is in CALLER for the call's
        task, so the jobs it sends carry it and their nested calls run as it, in its scope.
        `inflow`: the input, still arriving (CallRequest.input_size): passed on while it comes."""
        t0 = time.perf_counter()
        if caller is None:
            caller = Caller(client or req.client or "anonymous", None, address)
        self.in_flight += 1
        reply = pb.CallReply(service=req.service, encoding=req.encoding, call_id=call_id or new_call_id())
        task = asyncio.current_task()
        if task is not None:
            self.tasks.add(task)
        as_caller = CALLER.set(caller)
        # A call's task (and the tasks it makes) inherit these: a nested call, made from inside a
        # job of the coordinator's own, must not take its parent's input stage or result stream.
        as_stage = STAGE.set(None)
        as_outflow = OUTFLOW.set(None) if caller.via_agent else None
        store = getattr(self.c, "calls", None)
        slot = (store.slot(reply.call_id) if store is not None and call_id else None) or Progress(req.service)
        self.progress[reply.call_id] = slot  # one per call in flight: removed when it ends
        as_progress = PROGRESS.set(slot)
        try:
            if not self.accepting:
                raise Unavailable("the coordinator is shutting down; retry against another coordinator "
                                  "or after it restarts")
            if caller.via_agent:  # a nested call: only within the scope of the call whose job made it
                caller.check(req.service)
            try:
                await self._call(req, reply, inflow)
            except asyncio.CancelledError:
                if not self.stopped_message or task is None:
                    raise
                task.uncancel()  # we cancelled it to answer it: the caller still gets its one answer
                raise Unavailable(self.stopped_message) from None
            reply.status = "ok"
        except asyncio.CancelledError:  # the caller gave up: the job was stopped; log it, no answer
            reply.status = "error"
            reply.error.CopyFrom(pb.Error(code="cancelled", message="the caller cancelled the call"))
            self._log(req, reply, t0, caller)
            raise
        except MicroError as exc:
            reply.status = "error"
            reply.error.CopyFrom(pb.Error(code=exc.code, message=exc.message, field=exc.field, details=exc.details))
            reply.ClearField("result")
        except Exception as exc:  # a bug of ours: still exactly one answer, and a loud log
            log.exception("internal error while calling %s", req.service)
            reply.status = "error"
            reply.error.CopyFrom(pb.Error(code="internal", message=f"internal error: {type(exc).__name__}: {exc}"))
        finally:
            self.in_flight -= 1
            self.tasks.discard(task)  # type: ignore[arg-type]
            CALLER.reset(as_caller)
            STAGE.reset(as_stage)
            if as_outflow is not None:
                OUTFLOW.reset(as_outflow)
            PROGRESS.reset(as_progress)
            self.progress.pop(reply.call_id, None)
        self._log(req, reply, t0, caller)
        return reply

    def _log(self, req: pb.CallRequest, reply: pb.CallReply, t0: float, caller: Caller) -> None:
        if not reply.executed_by:
            reply.executed_by = "coordinator"  # refused before anything ran: the coordinator answered
        reply.process_time_ms = (time.perf_counter() - t0) * 1000
        entry = CallEntry(time.time(), caller.client, caller.address, req.service,
                          reply.executed_by or "-", reply.status == "ok", reply.process_time_ms,
                          reply.error.code if reply.status != "ok" else "", reply.attempts, reply.cache_hit,
                          caller.via_agent)
        self.c.calllog.add(entry)
        if log.isEnabledFor(logging.DEBUG):  # one event per call: --log-level debug --log-format json
            log.debug("call %s by %s: %s, run by %s in %.1f ms", entry.service, entry.client,
                      "ok" if entry.success else entry.error_code, entry.executed_by, entry.ms,
                      extra={"event": "call", "client": entry.client, "service": entry.service,
                             "executed_by": entry.executed_by, "outcome": "ok" if entry.success else entry.error_code,
                             "ms": round(entry.ms, 3), "attempts": entry.attempts, "address": entry.address})
        for observer in self.observers:
            observer(entry, reply)

    async def _call(self, req: pb.CallRequest, reply: pb.CallReply, inflow: Spool | None = None) -> None:
        if inflow is None:
            return await self._run(req, reply, req.input)
        entry = self.c.registry.get(req.service)
        # Cut-through (staging.py): the input goes on to the agent likely to run the job while it
        # arrives; the job itself is sent once the whole input is here and valid.
        target = self.scheduler.stage_target(entry) if req.encoding == pb.MSGPACK else None
        stage = Stage(target, inflow) if target is not None else None
        as_stage = STAGE.set(stage)
        try:
            budget = req.deadline_s if req.deadline_s > 0 else float(entry.cls.timeout) + 5.0
            try:
                async with asyncio.timeout(budget):
                    await inflow.read(wait_only=True)
            except TimeoutError:
                raise DeadlineExceeded(f"the input of {req.service} did not arrive within the call's deadline "
                                       f"({inflow.received} of {inflow.size} bytes)") from None
            await self._run(req, reply, await inflow.read(), streamed=True)
        finally:
            STAGE.reset(as_stage)
            if stage is not None:
                stage.drop()

    async def _run(self, req: pb.CallRequest, reply: pb.CallReply, raw_input: bytes, streamed: bool = False) -> None:
        entry = self.c.registry.get(req.service)
        reply.version = entry.version
        reply.rerunnable = bool(entry.cls.pure or entry.cls.idempotent)
        chain = list(req.chain)
        if entry.name in chain:
            raise CallCycle(f"call cycle refused: {' -> '.join(chain + [entry.name])}")
        if len(chain) >= MAX_DEPTH:
            raise DepthExceeded(f"call depth {len(chain) + 1} exceeds the limit of {MAX_DEPTH}: "
                                f"{' -> '.join(chain + [entry.name])}")
        timeout = float(entry.cls.timeout)
        budget = req.deadline_s if req.deadline_s > 0 else timeout + 5.0
        deadline = time.monotonic() + budget
        cache = self.c.cache
        cached = cache is not None and entry.cls.pure and entry.cls.cache
        input_bytes, value = _validated_input(entry, req.encoding, raw_input, streamed, cached)
        del raw_input
        key = None
        if cached:
            key = self.c.cache_key(entry, value)
            hit = cache.get(key)
            if hit is not None:
                data, _, verified = opened(hit)
                reply.executed_by, reply.cache_hit, reply.attempts, reply.verified = "cache", True, 0, verified
                reply.result = self._encode_result(entry, _codec.unpack(data), req.encoding)
                return

        chain = chain + [entry.name]
        nested = self.nested_handler(chain, deadline)
        stage = STAGE.get()
        if stage is not None:  # its pieces are all on the agent's link: a job sent now finds them there
            await stage.sent(deadline - time.monotonic())
        packed = b""  # the answer as msgpack, when the executor's bytes can be passed on as they are
        outflow = OUTFLOW.get()
        if outflow is not None and (req.encoding != pb.MSGPACK or (entry.cls.pure and self.verifier.mode != "off")):
            outflow = None  # the answer is re-encoded, or waits for a second opinion: not passed on early
            OUTFLOW.set(None)  # (in the call's task, whose owner resets it)
        if entry.cls.pure and self.verifier.mode != "off":
            answer, verified = await self._verified(entry, input_bytes, chain, deadline, reply, nested)
            reply.executed_by, reply.attempts, reply.verified = answer.executor, answer.attempts, verified
            if answer.error is not None:
                raise from_code(*answer.error, details=answer.details)
            out_value, out = answer.data, answer.model
            producers: tuple[str, ...] = (answer.executor, answer.verified_by)
        else:
            output, executed_by = await self.scheduler.execute(entry, input_bytes, chain, deadline, reply, nested)
            del input_bytes  # (a large input is not held while its output is checked)
            reply.executed_by = executed_by
            decoded = _codec.unpack(output)
            out = entry.cls.validate_output(decoded)
            out_value = out.model_dump(mode="python")
            # Exactly the output model's fields and values (pydantic keeps bytes and str as they are, so
            # this compares them by identity): the executor's bytes are the answer, not packed again.
            if req.encoding == pb.MSGPACK and out_value == decoded:
                packed = output
            del decoded, output
            reply.verified = executed_by == COORDINATOR
            producers = (executed_by,)
        if key is not None:
            cache.put(key, seal(packed or _codec.pack(out_value), producers, reply.verified), entry.cls.cache_ttl)
        if packed and outflow is not None and outflow.carries(outflow.winner):
            reply.result_size = len(packed)  # the client has it, or will before this reply (outflow.py)
            return
        reply.result = packed or self._encode_result(
            entry, out if req.encoding == pb.JSON and out is not None else out_value, req.encoding)

    # ------------------------------------------------------------ verified results (verify.py)

    async def _verified(self, entry: ServiceEntry, input_bytes: bytes, chain: list[str], deadline: float,
                        reply: pb.CallReply, nested: NestedHandler) -> tuple[Outcome, bool]:
        """Run a pure service's job, confirmed by a second executor when the verifier asks for it."""
        first = await self._attempt(entry, input_bytes, chain, deadline, reply, nested)

        async def referee() -> Outcome:
            try:
                output = await self.scheduler.referee(entry, input_bytes, deadline, nested)
            except MicroError as exc:
                if getattr(exc, "executor", ""):
                    return Outcome(COORDINATOR, error=(exc.code, exc.message, exc.field), attempts=1,
                                   details=exc.details)
                raise Unavailable(f"{entry.name}: the result of agent {first.executor} could not be verified "
                                  f"({exc.message}); retry the call") from None
            return _validated(entry, COORDINATOR, output, 1)

        async def second() -> Outcome:
            try:
                return await self._attempt(entry, input_bytes, chain, deadline, pb.CallReply(), nested,
                                           self.c.same_volunteer(first.executor), at_once=True)
            except MicroError as exc:  # no other executor managed it: the coordinator confirms
                log.info("%s: no second executor for agent %s's result (%s); the coordinator checks it",
                         entry.name, first.executor, exc.message)
                return await referee()

        return await self.verifier.settle(first, second, referee, self.c.convict)

    async def _attempt(self, entry: ServiceEntry, input_bytes: bytes, chain: list[str], deadline: float,
                       reply: pb.CallReply, nested: NestedHandler, avoid: frozenset[str] = frozenset(),
                       at_once: bool = False) -> Outcome:
        """One executor's answer: its validated output, or the service's own error."""
        try:
            output, executor = await self.scheduler.execute(entry, input_bytes, chain, deadline, reply, nested,
                                                            avoid, at_once)
        except MicroError as exc:
            executor = getattr(exc, "executor", "")
            if not executor:
                raise  # nobody answered (unavailable, deadline...): the call fails as it would unverified
            return Outcome(executor, error=(exc.code, exc.message, exc.field), attempts=reply.attempts,
                           details=exc.details)
        try:
            out = entry.cls.validate_output(_codec.unpack(output))
        except Exception as exc:
            if executor == COORDINATOR:
                raise
            # an honest agent's worker validates its output before sending it: this one was made up
            why = exc.message if isinstance(exc, MicroError) else f"{type(exc).__name__}: {exc}"
            return Outcome(executor, error=("bad_output", f"agent {executor} sent an output that is not a "
                                            f"{entry.cls.output_model.__name__}: {why}", ""),
                           attempts=reply.attempts, forged=True)
        return Outcome(executor, attempts=reply.attempts, value=out.model_dump(mode="python"), model=out)

    @staticmethod
    def _encode_result(entry: ServiceEntry, out: Any, encoding: int) -> bytes:
        if encoding == pb.JSON:
            if not isinstance(out, entry.cls.output_model):
                out = entry.cls.output_model.model_validate(out)
            return out.model_dump_json().encode()
        if not isinstance(out, dict):
            out = out.model_dump(mode="python")
        return _codec.pack(out)

    def nested_handler(self, chain: list[str], deadline: float) -> Any:
        """Nested calls of a job the coordinator runs itself: as the caller of the call being made
        (read here, in its task), within its scope, logged `via_agent` "coordinator"."""
        caller = (CALLER.get() or Caller("coordinator")).via("coordinator")

        async def nested(service: str, data: dict[str, Any]) -> dict[str, Any]:
            req = pb.CallRequest(service=service, input=_codec.pack(data), encoding=pb.MSGPACK, chain=chain,
                                 deadline_s=max(0.001, deadline - time.monotonic()))
            reply = await self.call(req, caller=caller)
            if reply.status != "ok":
                raise from_code(reply.error.code, reply.error.message, reply.error.field, reply.error.details)
            return _codec.unpack(reply.result)
        return nested


def _validated_input(entry: ServiceEntry, encoding: int, raw_input: bytes, streamed: bool,
                     keep_value: bool) -> tuple[bytes, Any]:
    """The job's input (msgpack) and, when asked for (a cache key), the validated value. A streamed
    input that validates goes on as the client sent it (the worker validates it the same way);
    anything else is packed from the validated value. Nothing of the decoded input outlives this."""
    raw: Any = raw_input if encoding == pb.JSON else _codec.unpack(raw_input)
    if encoding == pb.JSON and len(raw) > _codec.MAX_PAYLOAD:
        raise InvalidInput(f"input of {len(raw)} bytes exceeds the limit of {_codec.MAX_PAYLOAD}")
    model = validate_model(entry.cls.input_model, raw if raw != b"" else b"{}")
    value = model.model_dump(mode="python")
    input_bytes = raw_input if streamed and encoding == pb.MSGPACK else _codec.pack(value)
    return input_bytes, (value if keep_value else None)


def _validated(entry: ServiceEntry, executor: str, output: bytes, attempts: int) -> Outcome:
    out = entry.cls.validate_output(_codec.unpack(output))
    return Outcome(executor, attempts=attempts, value=out.model_dump(mode="python"), model=out)
