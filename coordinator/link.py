"""The AgentLink stream: after the handshake (handshake.py), one encrypted stream per agent that
multiplexes package holdings and transfers, jobs and their results, nested calls and heartbeats.

No agent can flood it (figures and reasons in docs/design.md, "Link limits"):
- before the handshake (preauth.py): at most PREAUTH_TOTAL handshakes read at once (PREAUTH_PER_HOST from one
  host, PREAUTH_QUEUE_PER_HOST more waiting, PREAUTH_RATE started a second per host), a slot taken
  before the first read (with BDP probing off, server.py, gRPC does not take a message off the wire
  until the handler asks for it), each hello at most HELLO_MAX bytes and the whole handshake within
  HANDSHAKE_S;
- after it: messages per kind are rate-limited (ratelimit.py; past a limit: a sealed `rate_limited`
  refusal and the stream ends); a partial message may hold PARTIAL_IDLE bytes, or up to the
  channel's MAX_MESSAGE while the agent owes us a job's result, must keep flowing (PARTIAL_STALL_S,
  PARTIAL_MAX_S), and every session's partial bytes together stay under LINK_BUDGET;
- claims are checked against what was published and given to that agent; results for jobs not in
  flight are faults, not work; the text an agent sends is escaped before it reaches a log;
- a dropped agent's stream ends at once (its sender sees the end of its outbox), its buffers freed.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import TYPE_CHECKING, Any, AsyncIterator

from microcores import _codec
from microcores._secure import MAX_FRAME, MAX_MESSAGE, collect_parts, fingerprint, sealed_frame, split
from microcores.errors import MicroError, ProtocolError
from microswarm.protos import microswarm_pb2 as pb

from .agents import AgentSession, JobRecord
from .caller import Caller
from .handshake import Refused, accept
from .logsafe import safe
from .preauth import HANDSHAKE_S, PREAUTH_RATE, Busy, Handshaking, PreAuthGate, peer_host
from .ratelimit import KIND_TEXT
from .spool import Spool

if TYPE_CHECKING:
    from .server import Coordinator

log = logging.getLogger("microswarm.agents")

# After the handshake: partial messages (frames of a message that is not complete).
PARTIAL_IDLE = 4 * MAX_FRAME   # a few frames: no honest message is larger unless it is a job's result
PARTIAL_STALL_S = 10.0         # a partial message that gets no frame this long ends the session
PARTIAL_MAX_S = 120.0          # nor may one take longer than this in all (64 MiB at ~4 Mbit/s)
LINK_BUDGET = 256 * 1024 * 1024  # partial bytes of all sessions together (4 results of the largest size)
FETCH_AGAIN_S = 5.0            # a package is sent again to the same agent at most this often
FLUSH_S = 1.0                  # an ended session's sender gets this long for what was queued before the end,
REFUSAL_FLUSH_S = 10.0         # and this long when a refusal is among it (only an agent that stopped reading
                               # takes it all; 1 s was too short under load: the stream ended without it)
NESTED_AT_ONCE = 4             # nested calls of one job running at once (a worker makes them one by one)
NESTED_PER_JOB = 128           # nested calls of one job in all
MODES = frozenset({"", "active", "paused", "owner_busy", "draining"})


class LinkLimit(Exception):
    """The agent broke a limit of the link: it is told (sealed) and disconnected."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class AgentLinkService:
    """The AgentLink gRPC servicer."""

    def __init__(self, coordinator: "Coordinator", handshake_rate: float = PREAUTH_RATE[0]) -> None:
        self.c = coordinator
        self._job_ids = itertools.count(1)
        self.gate = PreAuthGate(rate=handshake_rate)
        self.budget = LINK_BUDGET
        self.partial_bytes = 0      # partial-frame bytes held by every session together
        self.counts = {"rate_limited": 0, "too_large": 0, "over_budget": 0, "stalled": 0, "bogus_results": 0,
                       "claims_ignored": 0}

    async def Connect(self, request_iterator: AsyncIterator[pb.LinkFrame], context: Any) -> None:
        address = context.peer()
        try:
            async with self.gate.slot(peer_host(address)):  # before the first read: see PreAuthGate
                session = await self._handshake(context, address)  # a refusal is answered inside the slot
        except Busy as b:
            log.warning("agent from %s not let in: %s", address, b)
            await context.write(pb.LinkFrame(refusal=pb.Refusal(code="busy", message=str(b))))
            return
        if session is not None:
            await self._serve(session, context)

    async def _handshake(self, context: Any, address: str) -> AgentSession | None:
        try:
            return await asyncio.wait_for(accept(self.c, Handshaking(context), address), HANDSHAKE_S)
        except Refused as r:
            log.warning("refused agent from %s: %s", address, safe(r.message))
            await context.write(r.frame)  # signed, and sealed once keys exist (handshake.py)
        except asyncio.TimeoutError:
            log.warning("agent from %s did not finish the handshake in %.0f s", address, HANDSHAKE_S)
        except ProtocolError as exc:
            log.warning("handshake with %s failed: %s", address, safe(exc.message))
            await context.write(pb.LinkFrame(refusal=pb.Refusal(code=exc.code, message=exc.message)))
        return None

    async def _serve(self, s: AgentSession, context: Any) -> None:
        c = self.c
        log.info("agent %s joined from %s with %d slots", s.agent_id, s.address, s.slots,
                 extra={"agent": s.agent_id})
        s.send(pb.ToAgent(welcome=pb.Welcome(agent_id=s.agent_id, heartbeat_s=c.pace.heartbeat_s,
                                             liveness_s=c.pace.liveness_s, max_frame=MAX_FRAME,
                                             coordinator_id=c.state.fingerprint.hex(), slots=s.slots,
                                             publisher_fingerprints=[fingerprint(k) for k in
                                                                     c.registry.publisher_keys])))
        s.welcomed = True
        c.agent_joined(s)
        sender = asyncio.create_task(self._sender(s, context))
        reader = asyncio.create_task(self._reader(s, context))
        reason, refusal = "stream closed", None
        try:
            # The reader ends the session, or its removal (liveness, revocation, a stall found by
            # sweep()...), even while its sender is stuck writing to an agent that stopped reading
            ended = asyncio.ensure_future(s.ended.wait())
            try:
                done, _ = await asyncio.wait((reader, sender, ended), return_when=asyncio.FIRST_COMPLETED)
            finally:
                ended.cancel()
            if reader in done:
                reason, refusal = reader.result()
            elif s.end_reason:
                reason = s.end_reason
            refused = bool(s.end_reason)  # (a stall found by sweep(): its refusal is queued)
            if refusal is not None and not s.closed:
                s.send(pb.ToAgent(refusal=refusal))  # sealed: the sender writes it before the end
                refused = True
            c.drop_agent(s, reason)
            if not sender.done():  # what was queued before the end (a refusal among it) still goes out
                await asyncio.wait((sender,), timeout=REFUSAL_FLUSH_S if refused else FLUSH_S)
        except asyncio.CancelledError:
            reason = "session cancelled"
            reader.cancel()
            raise
        finally:
            c.drop_agent(s, reason)
            s.outbox.put_nowait(None)
            sender.cancel()
            # The reader is not cancelled: its pending read ends by itself once this handler has returned
            # (cancelling a read in progress makes gRPC end the stream INTERNAL instead of OK).
            reader.add_done_callback(_retrieved)
            for t in list(s.nested_tasks):
                t.cancel()
            self._release(s)
            if s.jobs_bogus or s.claims_ignored:  # counted, not logged one by one
                log.warning("agent %s sent %d result(s) for jobs it was not given and %d claim(s) that were "
                            "ignored", s.agent_id, s.jobs_bogus, s.claims_ignored, extra={"agent": s.agent_id})
        # returning ends the gRPC stream: a dropped agent's link is closed, not left open

    async def _reader(self, s: AgentSession, context: Any) -> tuple[str, pb.Refusal | None]:
        """Read, open and handle frames until the stream ends; (why, the refusal to send or None)."""
        c = self.c
        ch = s.channel
        try:
            while True:
                frame = await context.read()
                if frame is None or not isinstance(frame, pb.LinkFrame):
                    return "stream closed", None
                if s.closed:  # dropped (revoked, replaced, silent): end its stream too
                    return "removed", None
                if frame.WhichOneof("kind") != "sealed":
                    raise ProtocolError("plaintext frame after the handshake")
                sealed = frame.sealed
                data = ch.open(sealed.counter, sealed.ciphertext, sealed.more)
                if data is None or s.charged:
                    self._account(s)
                now = time.monotonic()
                s.last_seen = now
                if s.state == "suspect":
                    s.state = "ready"
                    c.slot_freed(s)
                if data is None:
                    continue
                left = False
                for piece in split(data):
                    msg = pb.ToCoordinator()
                    msg.ParseFromString(piece)  # type: ignore[arg-type]  # any buffer parses; the stubs say bytes
                    left = self._handle(s, msg, now) or left
                data = None  # (a large result is not held twice while the next frame is awaited)
                if left:
                    s.state = "leaving"  # no new jobs; close once every job sent is answered
                if s.state == "leaving" and all(r.future.done() for r in s.jobs.values()):
                    return "agent left", None
        except LinkLimit as exc:
            self.counts[exc.code if exc.code in self.counts else "rate_limited"] += 1
            log.warning("agent %s disconnected: %s", s.agent_id, exc.message, extra={"agent": s.agent_id})
            code = "rate_limited" if exc.code == "rate_limited" else "too_large" if exc.code != "over_budget" \
                else "overloaded"
            return exc.message, pb.Refusal(code=code, message=exc.message)
        except MicroError as exc:
            log.warning("agent %s: %s", s.agent_id, safe(exc.message), extra={"agent": s.agent_id})
            return exc.message, pb.Refusal(code=exc.code, message=exc.message)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {safe(exc)}"
            if not s.closed:  # (a read pending when the session ended fails once the stream is over)
                log.warning("agent %s stream ended: %s", s.agent_id, reason, extra={"agent": s.agent_id})
            return reason, None

    # ------------------------------------------------------------ link memory

    def _account(self, s: AgentSession) -> None:
        """Charge the session's partial message to the link budget; LinkLimit past a bound."""
        held = s.channel.buffered
        if held > s.charged:
            limit = MAX_MESSAGE if s.jobs else PARTIAL_IDLE  # a job's result may be large; nothing else is
            if held > limit:
                s.channel.discard()
                self._release(s)
                raise LinkLimit("too_large", f"a partial message of over {held} bytes while "
                                f"{'it owes results' if s.jobs else 'no job of it is in flight'} (limit {limit})")
            if self.partial_bytes + held - s.charged > self.budget:
                s.channel.discard()
                self._release(s)
                raise LinkLimit("over_budget", f"partial messages of all agents would exceed the coordinator's "
                                f"link budget of {self.budget >> 20} MiB")
        self.partial_bytes += held - s.charged
        s.charged = held

    def _release(self, s: AgentSession) -> None:
        self.partial_bytes -= s.charged
        s.charged = 0
        s.channel.discard()

    def sweep(self, sessions: list[AgentSession]) -> None:
        """The coordinator's liveness loop, twice a second: end the sessions whose partial message stalled."""
        for s in sessions:
            stalled = self._stalled(s) if s.channel.buffered and not s.closed else None
            if stalled is not None:
                s.end_reason = stalled[0]
                s.send(pb.ToAgent(refusal=stalled[1]))  # sealed; the sender writes it before the end
                self.c.drop_agent(s, stalled[0])

    def _stalled(self, s: AgentSession) -> tuple[str, pb.Refusal] | None:
        ch = s.channel
        if not ch.buffered:
            return None
        now = time.monotonic()
        if now - ch.partial_last > PARTIAL_STALL_S:
            why = f"a partial message got no frame for {now - ch.partial_last:.0f} s"
        elif now - ch.partial_since > PARTIAL_MAX_S:
            why = f"a partial message took over {PARTIAL_MAX_S:.0f} s"
        else:
            return None
        self.counts["stalled"] += 1
        log.warning("agent %s disconnected: %s (%d bytes held)", s.agent_id, why, ch.buffered,
                    extra={"agent": s.agent_id})
        self._release(s)
        return why, pb.Refusal(code="too_large", message=why)

    # ------------------------------------------------------------ sending

    async def _sender(self, s: AgentSession, context: Any) -> None:
        try:
            while True:
                msg = await s.outbox.get()
                await asyncio.sleep(0)  # let tasks that are ready queue theirs: one write carries them all
                if msg is None:
                    return
                parts, stop = collect_parts(msg, s.outbox)  # sealed from its parts: a job's input is not joined
                s.took()
                for counter, ct, more in s.channel.seal_iter(parts):
                    await context.write(sealed_frame(counter, ct, more))
                if stop:
                    return
        except asyncio.CancelledError:
            pass
        except Exception as exc:
            log.info("agent %s: sending failed: %s", s.agent_id, exc)
            self.c.drop_agent(s, f"send failed: {exc}")

    # ------------------------------------------------------------ what an agent sends

    def _limit(self, s: AgentSession, kind: str, now: float) -> None:
        if not s.limits.allow(kind, now):
            b = s.limits.buckets[kind]
            raise LinkLimit("rate_limited", f"more {KIND_TEXT.get(kind, kind)} than the limit of {b.rate:g}/s "
                            f"(burst {b.burst:g}): disconnected")

    def _handle(self, s: AgentSession, msg: pb.ToCoordinator, now: float) -> bool:
        kind = msg.WhichOneof("kind")
        if kind == "result":
            r = msg.result
            rec = s.jobs.pop(r.job_id, None)
            if rec is None:  # never sent to it, or answered already: a fault, not work
                s.jobs_bogus += 1
                self.counts["bogus_results"] += 1
                self.c.quarantine.strike(s, "it sent a result for a job it was not given")
                self._limit(s, "bogus", now)
                self._limit(s, "all", now)
                return False
            rec.end_nested()
            if r.output_size and not (rec.output is not None and rec.output.complete
                                      and rec.output.size == r.output_size):
                r.ok, r.agent_fault = False, True  # its pieces did not add up: the job may go elsewhere
                r.error.CopyFrom(pb.Error(code="agent_fault", message=(
                    f"agent {s.agent_id} announced an output of {r.output_size} bytes that did not arrive whole")))
                if rec.output is not None:  # (and whoever passes its pieces on stops)
                    rec.output.fail(ProtocolError(r.error.message))
            if rec.claimed is not None and not rec.claimed.done():
                rec.claimed.cancel()
            if rec.future.done():  # given up on (abandoned) or already failed: a late answer, dropped
                # (a hedge's loser that finished in its grace after a Cancel is not late, it is the
                # price of the hedge; a job that must run at most once and still ran is)
                if not r.cancelled or (r.ok and rec.claimed is not None):
                    self.c.late_result(s, rec)
            else:
                rec.future.set_result(r)
            if r.ok:
                s.jobs_done += 1
            elif not r.cancelled:
                s.jobs_failed += 1
            self.c.slot_freed(s)
            return False
        if kind == "output":  # a piece of a large output, ahead of its result (bounded by its size)
            self._output(s, msg.output, now)
            return False
        if kind == "claim":
            rec = s.jobs.get(msg.claim.job_id)
            go = (rec is not None and rec.claimed is not None and not rec.claimed.done() and not rec.abandoned)
            if go:  # one per job sent (bounded by them): not charged
                rec.claimed.set_result(None)  # type: ignore[union-attr]
            else:
                self._limit(s, "all", now)
                if rec is None or rec.claimed is None:  # no such job, or one that needs no claim
                    s.claims_ignored += 1
                    self.counts["claims_ignored"] += 1
                    self._limit(s, "bogus", now)
                else:  # asked again, or after we gave up on it: the answer is no
                    self._limit(s, "claim", now)
            s.send(pb.ToAgent(start=pb.StartJob(job_id=msg.claim.job_id, go=go)))
            return False
        self._limit(s, "all", now)
        if kind == "heartbeat":
            self._limit(s, "heartbeat", now)
            hb = msg.heartbeat
            if hb.mode not in MODES:
                hb.mode = safe(hb.mode, 20)
            was_paused = s.heartbeat.paused
            s.heartbeat = hb
            if was_paused and not hb.paused:
                self.c.slot_freed(s)
        elif kind == "fetch":
            self._limit(s, "fetch", now)
            digest = msg.fetch.ref.digest
            entry = self.c.registry.by_digest.get(digest)
            last = s.fetched.get(digest)
            if entry is None or not s.planned_digest(digest) or (last is not None and now - last < FETCH_AGAIN_S):
                s.claims_ignored += 1  # not given to it, or just sent: no package, no log line
                self.counts["claims_ignored"] += 1
                return False
            s.fetched[digest] = now
            p = entry.package
            s.send(pb.ToAgent(package=pb.PackageData(ref=entry.ref, manifest=p.manifest,
                                                     signature=p.signature, archive=p.archive,
                                                     publisher_signature=p.publisher_signature)))
        elif kind == "installed":
            self._limit(s, "installed", now)
            self._installed(s, msg.installed)
        elif kind == "nested_call":
            self._nested_call(s, msg.nested_call, now)
        elif kind == "progress":
            self._limit(s, "progress", now)
            jp = msg.progress
            rec = s.jobs.get(jp.job_id)
            if rec is None:  # no job of this id on this agent: it cannot write into another's call
                self._limit(s, "bogus", now)
                s.claims_ignored += 1
                self.counts["claims_ignored"] += 1
            elif rec.in_flight and rec.progress is not None:  # (a hedge's loser, given up on: dropped)
                rec.progress.report(jp.fraction, jp.message, s.agent_id)
        elif kind == "pong":
            self._limit(s, "pong", now)
        elif kind == "leaving":
            log.info("agent %s is leaving: %s", s.agent_id, safe(msg.leaving.reason), extra={"agent": s.agent_id})
            return True
        return False

    def _output(self, s: AgentSession, out: pb.JobOutput, now: float) -> None:
        rec = s.jobs.get(out.job_id)
        if rec is None:  # no such job on this agent: it cannot write into another's call
            s.claims_ignored += 1
            self.counts["claims_ignored"] += 1
            self._limit(s, "bogus", now)
            return
        if rec.output is None:
            if not 0 < out.size <= _codec.MAX_PAYLOAD:
                raise LinkLimit("too_large", f"an output of {out.size} bytes exceeds the limit of "
                                f"{_codec.MAX_PAYLOAD}: disconnected")
            rec.output = Spool(out.size, f"the output of job {rec.job_id} from agent {s.agent_id}")
            if rec.outflow is not None and rec.in_flight:
                rec.outflow.follow(rec.job_id, rec.output)
        if out.size != rec.output.size:
            rec.output.fail(ProtocolError(f"agent {s.agent_id} changed the size of job {rec.job_id}'s output"))
        rec.output.feed(out.data)

    def _installed(self, s: AgentSession, inst: pb.Installed) -> None:
        """A holdings claim: counted only for a package published and given to this agent. The names
        logged are the registry's, not the agent's; its error text is escaped."""
        entry = self.c.registry.by_digest.get(inst.ref.digest)
        if entry is None or not s.planned_digest(entry.digest):
            s.claims_ignored += 1  # not published, or not (any more) given to it: not counted, not logged
            self.counts["claims_ignored"] += 1
            return
        if inst.ok:
            s.holdings.add(entry.digest)
            s.install_failed.discard(entry.digest)
            if s.state == "joining":
                s.state = "ready"
        else:
            s.holdings.discard(entry.digest)
            s.install_failed.add(entry.digest)
        self.c.holdings_changed()
        said = (entry.digest, inst.ok)
        if said not in s.install_logged:  # one line per package and outcome a session: a flood logs nothing more
            s.install_logged.add(said)
            if inst.ok:
                log.info("agent %s holds %s", s.agent_id, entry.label, extra={"agent": s.agent_id})
            else:
                log.warning("agent %s could not install %s: %s", s.agent_id, entry.label, safe(inst.error),
                            extra={"agent": s.agent_id})
        if s.state == "joining" and not self.c.holdings_for(s).packages:
            s.state = "ready"

    # ------------------------------------------------------------ nested calls

    def _nested_call(self, s: AgentSession, nc: pb.NestedCall, now: float) -> None:
        """A nested call runs as the caller of its job, only while that job is in flight here, at most
        NESTED_AT_ONCE at once and NESTED_PER_JOB in all for one job."""
        self._limit(s, "nested_call", now)
        rec = s.jobs.get(nc.job_id)
        if rec is None or not rec.in_flight:
            self._limit(s, "bogus", now)
            s.claims_ignored += 1
            self.counts["claims_ignored"] += 1
            self._nested_reply(s, nc, "protocol_error" if rec is None else "cancelled",
                               f"nested call from unknown job {safe(nc.job_id, 40)!r}" if rec is None
                               else f"job {nc.job_id} is no longer running here: its nested calls are refused")
            return
        running = rec.nested or ()
        if len(running) >= NESTED_AT_ONCE or rec.nested_total >= NESTED_PER_JOB:
            self._nested_reply(s, nc, "rate_limited", (
                f"job {nc.job_id} already has {len(running)} nested calls running (the limit is {NESTED_AT_ONCE})"
                if len(running) >= NESTED_AT_ONCE else
                f"job {nc.job_id} made {rec.nested_total} nested calls: the limit for one job is {NESTED_PER_JOB}"))
            return
        rec.nested_total += 1
        t = asyncio.create_task(self._nested(s, rec, nc))
        if rec.nested is None:
            rec.nested = set()
        rec.nested.add(t)
        s.nested_tasks.add(t)
        t.add_done_callback(s.nested_tasks.discard)
        t.add_done_callback(rec.nested.discard)

    def _nested_reply(self, s: AgentSession, nc: pb.NestedCall, code: str, message: str) -> None:
        s.send(pb.ToAgent(nested_id=nc.nested_id, nested_reply=pb.CallReply(
            status="error", service=nc.request.service, executed_by="coordinator",
            error=pb.Error(code=code, message=message))))

    async def _nested(self, s: AgentSession, rec: JobRecord, nc: pb.NestedCall) -> None:
        req = pb.CallRequest()
        req.CopyFrom(nc.request)
        del req.chain[:]
        req.chain.extend(rec.chain)
        req.deadline_s = max(0.001, rec.deadline - time.monotonic())
        caller = rec.caller or Caller(f"unknown caller of job {rec.job_id}", _NO_SCOPE, s.address)
        try:
            reply = await self.c.dispatcher.call(req, caller=caller.via(s.agent_id))
        except asyncio.CancelledError:  # its job ended: the call stopped; the agent's worker hears so
            self._nested_reply(s, nc, "cancelled", f"job {rec.job_id} ended: its nested call was stopped")
            return
        s.send(pb.ToAgent(nested_reply=reply, nested_id=nc.nested_id))

    def next_job_id(self) -> str:
        return f"j{next(self._job_ids)}"


def _retrieved(t: asyncio.Task[Any]) -> None:
    if not t.cancelled():
        t.exception()


class _NoScope:
    """The scope of a job whose caller is not known: nothing."""

    revoked = False
    scopes: tuple[str, ...] = ()

    @staticmethod
    def permits(service: str) -> bool:
        return False


_NO_SCOPE = _NoScope()
