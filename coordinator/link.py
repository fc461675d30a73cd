"""The AgentLink stream: after the handshake (handshake.py), one encrypted stream per agent that
multiplexes package holdings and transfers, jobs and their results, nested calls and heartbeats.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import TYPE_CHECKING, Any, AsyncIterator

from microcores._secure import MAX_FRAME, collect, split
from microcores.errors import MicroError, ProtocolError
from protos import microswarm_pb2 as pb

from .agents import AgentSession
from .handshake import HANDSHAKE_TIMEOUT, Refused, accept

if TYPE_CHECKING:
    from .server import Coordinator

log = logging.getLogger("microswarm.agents")


class AgentLinkService:
    """The AgentLink gRPC servicer."""

    def __init__(self, coordinator: "Coordinator") -> None:
        self.c = coordinator
        self._job_ids = itertools.count(1)

    async def Connect(self, request_iterator: AsyncIterator[pb.LinkFrame], context: Any) -> None:
        address = context.peer()
        try:
            session = await asyncio.wait_for(accept(self.c, context, address), HANDSHAKE_TIMEOUT)
        except Refused as r:
            log.warning("refused agent from %s: %s", address, r.message)
            await context.write(r.frame)  # signed, and sealed once keys exist (handshake.py)
            return
        except asyncio.TimeoutError:
            log.warning("agent from %s did not finish the handshake in %.0f s", address, HANDSHAKE_TIMEOUT)
            return
        except ProtocolError as exc:
            log.warning("handshake with %s failed: %s", address, exc.message)
            await context.write(pb.LinkFrame(refusal=pb.Refusal(code=exc.code, message=exc.message)))
            return
        await self._serve(session, context)

    async def _serve(self, s: AgentSession, context: Any) -> None:
        c = self.c
        log.info("agent %s joined from %s with %d slots", s.agent_id, s.address, s.slots,
                 extra={"agent": s.agent_id})
        s.send(pb.ToAgent(welcome=pb.Welcome(agent_id=s.agent_id, heartbeat_s=c.heartbeat_s,
                                             liveness_s=c.liveness_s, max_frame=MAX_FRAME,
                                             coordinator_id=c.state.fingerprint.hex(), slots=s.slots)))
        s.welcomed = True
        c.agent_joined(s)
        sender = asyncio.create_task(self._sender(s, context))
        reason = "stream closed"
        try:
            while True:
                frame = await context.read()
                if frame is None or not isinstance(frame, pb.LinkFrame):
                    break
                if s.closed:  # dropped (revoked, replaced, silent): end its stream too
                    break
                if frame.WhichOneof("kind") != "sealed":
                    raise ProtocolError("plaintext frame after the handshake")
                sealed = frame.sealed
                data = s.channel.open(sealed.counter, sealed.ciphertext, sealed.more)
                s.last_seen = time.monotonic()
                if s.state == "suspect":
                    s.state = "ready"
                    self.c.slot_freed(s)
                if data is None:
                    continue
                left = False
                for piece in split(data):
                    msg = pb.ToCoordinator()
                    msg.ParseFromString(piece)
                    left = self._handle(s, msg) or left
                if left:
                    s.state = "leaving"  # no new jobs; close once every job sent is answered
                if s.state == "leaving" and all(r.future.done() for r in s.jobs.values()):
                    reason = "agent left"
                    break
        except MicroError as exc:
            reason = exc.message
            log.warning("agent %s: %s", s.agent_id, exc.message)
            try:
                await context.write(pb.LinkFrame(refusal=pb.Refusal(code=exc.code, message=exc.message)))
            except Exception:  # the stream may already be gone
                pass
        except asyncio.CancelledError:
            reason = "session cancelled"
            raise
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            log.warning("agent %s stream ended: %s", s.agent_id, reason)
        finally:
            c.drop_agent(s, reason)
            s.outbox.put_nowait(None)
            sender.cancel()
            for t in list(s.nested_tasks):
                t.cancel()

    async def _sender(self, s: AgentSession, context: Any) -> None:
        try:
            while True:
                msg = await s.outbox.get()
                await asyncio.sleep(0)  # let tasks that are ready queue theirs: one write carries them all
                if msg is None:
                    return
                plaintext, stop = collect(msg, s.outbox)
                for counter, ct, more in s.channel.seal_iter(plaintext):
                    await context.write(pb.LinkFrame(sealed=pb.Sealed(counter=counter, ciphertext=ct, more=more)))
                if stop:
                    return
        except asyncio.CancelledError:
            pass
        except Exception as exc:
            log.info("agent %s: sending failed: %s", s.agent_id, exc)
            self.c.drop_agent(s, f"send failed: {exc}")

    def _handle(self, s: AgentSession, msg: pb.ToCoordinator) -> bool:
        kind = msg.WhichOneof("kind")
        if kind == "result":
            r = msg.result
            rec = s.jobs.pop(r.job_id, None)
            if rec is None:
                return False  # never sent to it, or answered twice: nothing to count
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
        elif kind == "claim":
            rec = s.jobs.get(msg.claim.job_id)
            go = (rec is not None and rec.claimed is not None and not rec.claimed.done() and not rec.abandoned)
            if go:
                rec.claimed.set_result(None)  # type: ignore[union-attr]
            s.send(pb.ToAgent(start=pb.StartJob(job_id=msg.claim.job_id, go=go)))
        elif kind == "heartbeat":
            was_paused = s.heartbeat.paused
            s.heartbeat = msg.heartbeat
            if was_paused and not msg.heartbeat.paused:
                self.c.slot_freed(s)
        elif kind == "fetch":
            entry = self.c.registry.by_digest.get(msg.fetch.ref.digest)
            if entry is None:
                s.send(pb.ToAgent(refusal=pb.Refusal(code="unknown_package",
                                                     message=f"no package with digest {msg.fetch.ref.digest[:12]}")))
            else:
                p = entry.package
                s.send(pb.ToAgent(package=pb.PackageData(ref=entry.ref, manifest=p.manifest,
                                                         signature=p.signature, archive=p.archive)))
        elif kind == "installed":
            ref = msg.installed.ref
            if msg.installed.ok and not s.planned_digest(ref.digest):
                log.debug("agent %s installed %s@%s, which placement no longer gives it: not counted", s.agent_id,
                          ref.name, ref.version)
            elif msg.installed.ok:
                s.holdings.add(ref.digest)
                s.install_failed.discard(ref.digest)
                self.c.holdings_changed()
                if s.state == "joining":
                    s.state = "ready"
                log.info("agent %s holds %s@%s", s.agent_id, ref.name, ref.version)
            else:
                s.holdings.discard(ref.digest)
                s.install_failed.add(ref.digest)
                self.c.holdings_changed()
                log.warning("agent %s could not install %s@%s: %s", s.agent_id, ref.name, ref.version,
                            msg.installed.error)
            if s.state == "joining" and not self.c.holdings_for(s).packages:
                s.state = "ready"
        elif kind == "nested_call":
            t = asyncio.create_task(self._nested(s, msg.nested_call))
            s.nested_tasks.add(t)
            t.add_done_callback(s.nested_tasks.discard)
        elif kind == "pong":
            pass
        elif kind == "leaving":
            log.info("agent %s is leaving: %s", s.agent_id, msg.leaving.reason)
            return True
        return False

    async def _nested(self, s: AgentSession, nc: pb.NestedCall) -> None:
        rec = s.jobs.get(nc.job_id)
        if rec is None or rec.abandoned:
            reply = pb.CallReply(status="error", error=pb.Error(
                code="protocol_error" if rec is None else "cancelled",
                message=f"nested call from unknown job {nc.job_id!r}" if rec is None
                else f"job {nc.job_id} was cancelled: its nested calls are refused"))
        else:
            req = pb.CallRequest()
            req.CopyFrom(nc.request)
            del req.chain[:]
            req.chain.extend(rec.chain)
            req.deadline_s = max(0.001, rec.deadline - time.monotonic())
            reply = await self.c.dispatcher.call(req, client=f"agent:{s.agent_id}", address=s.address)
        s.send(pb.ToAgent(nested_reply=reply, nested_id=nc.nested_id))

    def next_job_id(self) -> str:
        return f"j{next(self._job_ids)}"
