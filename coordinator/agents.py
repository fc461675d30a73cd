"""Agent sessions: the coordinator's side of each agent's long-lived encrypted stream.

A session authenticates the agent (handshake in microcores._secure), then multiplexes over one
stream: package holdings and transfers, jobs and their results, nested calls, heartbeats.
Every job the coordinator sends is tracked until exactly one result, or until the session
ends, when it fails with AgentLost so that dispatch can take over.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import logging
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator

from microcores._secure import (MAX_FRAME, PROTOCOL, Channel, check_len, collect, coordinator_channel, derive_keys,
                                hello_transcript, join_mac, new_ephemeral, sign, split, verify)
from microcores.errors import MicroError, ProtocolError
from protos import microswarm_pb2 as pb

if TYPE_CHECKING:
    from .server import Coordinator

log = logging.getLogger("microswarm.agents")

AGENT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
HANDSHAKE_TIMEOUT = 10.0
SUITE = "AES-256-GCM"


class AgentLost(Exception):
    """The agent's session ended before it answered."""


class AgentSilent(AgentLost):
    """The agent stopped sending anything (frozen, cut off): its jobs are given up on."""


class Refused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(eq=False)
class JobRecord:
    """A job sent to an agent. It holds one of the agent's slots until the agent answers for it,
    even after the coordinator gave up on it (abandoned): the slot is free when the agent says the
    job stopped, not when we stop waiting."""

    job_id: str
    future: asyncio.Future[pb.JobResult]
    chain: list[str]
    deadline: float  # monotonic
    service: str
    claimed: asyncio.Future[None] | None = None  # confirm_start jobs: set when we let it start
    abandoned: bool = False
    sent_at: float = field(default_factory=time.monotonic)

    @property
    def started(self) -> bool:
        c = self.claimed
        return c is not None and c.done() and not c.cancelled() and c.exception() is None


@dataclass(eq=False)
class AgentSession:
    agent_id: str
    agent_key: bytes
    address: str
    slots: int
    hostname: str
    channel: Channel
    coordinator: "Coordinator"
    state: str = "joining"
    holdings: set[str] = field(default_factory=set)   # digests installed and ready
    install_failed: set[str] = field(default_factory=set)
    jobs: dict[str, JobRecord] = field(default_factory=dict)
    connected_at: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.monotonic)
    heartbeat: pb.Heartbeat = field(default_factory=pb.Heartbeat)
    jobs_done: int = 0
    jobs_failed: int = 0
    outbox: asyncio.Queue[pb.ToAgent | None] = field(default_factory=asyncio.Queue)
    closed: bool = False
    ping_seq: int = 0
    nested_tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    join_secret: bytes = b""  # sha256 of the join secret it proved: SIGHUP drops it if revoked
    max_packages: int = 0
    planned: set[str] = field(default_factory=set)  # service names placement gave it
    welcomed: bool = False    # Welcome sent: other messages may follow
    reserved: int = 0         # slots promised to calls about to send a job here
    strikes: int = 0          # failures in a row (timeouts, faults): quarantined at the limit
    quarantined_until: float = 0.0
    jobs_timed_out: int = 0
    ewma_s: float = 0.0       # moving average of its recent round trips (p2c breaks ties with it)

    @property
    def running(self) -> int:
        return len(self.jobs)

    @property
    def load(self) -> int:
        return len(self.jobs) + self.reserved

    @property
    def free(self) -> int:
        return self.free_for(False)

    def free_for(self, prefetch: bool) -> int:
        """Slots it can take a job on. With `prefetch` (short jobs) it takes twice its slots, as Celery's
        prefetch: the next job waits in the agent, not a link round trip away."""
        if self.heartbeat.paused:
            return 0
        return self.slots * (2 if prefetch else 1) - len(self.jobs) - self.reserved

    def installing(self, digest: str) -> bool:
        """Connected, told to hold `digest`, and neither done nor failed installing it yet."""
        return (not self.closed and self.state in ("joining", "ready") and digest not in self.holdings
                and digest not in self.install_failed and self.planned_digest(digest))

    def planned_digest(self, digest: str) -> bool:
        entry = self.coordinator.registry.by_digest.get(digest)
        return entry is not None and entry.name in self.planned

    def holds(self, digest: str) -> bool:
        """Holds the package and takes jobs (busy or not)."""
        return (self.state == "ready" and digest in self.holdings and not self.closed
                and self.quarantined_until <= time.monotonic())

    def dispatchable(self, digest: str, prefetch: bool = False) -> bool:
        return self.free_for(prefetch) > 0 and self.holds(digest)

    def send(self, msg: pb.ToAgent) -> None:
        if not self.closed:
            self.outbox.put_nowait(msg)

    def start_job(self, job: pb.Job) -> JobRecord:
        """Send a job on a slot reserved for it (see slots.SlotQueue); its result resolves the record."""
        loop = asyncio.get_running_loop()
        rec = JobRecord(job.job_id, loop.create_future(), list(job.chain), time.monotonic() + job.deadline_s,
                        job.service, loop.create_future() if job.confirm_start else None)
        if self.reserved > 0:
            self.reserved -= 1
        self.jobs[job.job_id] = rec
        self.send(pb.ToAgent(job=job))
        return rec

    def abandon(self, rec: JobRecord) -> None:
        """Give up on a job: cancel it on the agent. Its slot stays taken until the agent answers."""
        if rec.abandoned or self.jobs.get(rec.job_id) is not rec:
            return
        rec.abandoned = True
        if not rec.future.done():
            rec.future.cancel()
        if rec.claimed is not None and not rec.claimed.done():
            rec.claimed.cancel()
        self.send(pb.ToAgent(cancel=pb.Cancel(job_id=rec.job_id)))

    def fail_all(self, reason: str, silent: bool = False) -> None:
        """Wake every call waiting on this agent (the session ended, or the agent fell silent)."""
        exc = AgentSilent(reason) if silent else AgentLost(reason)
        for rec in list(self.jobs.values()):
            if not rec.future.done():
                rec.future.set_exception(exc)
            if rec.claimed is not None and not rec.claimed.done():
                rec.claimed.set_exception(exc)

    @property
    def quarantined(self) -> bool:
        return self.quarantined_until > time.monotonic()

    def info(self) -> pb.AgentInfo:
        reg = self.coordinator.registry
        held = sorted((reg.by_digest[d] for d in self.holdings if d in reg.by_digest), key=lambda e: e.name)
        return pb.AgentInfo(agent_id=self.agent_id, address=self.address, packages=[e.name for e in held],
                            versions=[e.label for e in held], max_packages=self.max_packages,
                            quarantine_left_s=max(0.0, self.quarantined_until - time.monotonic())
                            if self.quarantined else 0.0, jobs_timed_out=self.jobs_timed_out,
                            mean_run_ms=self.ewma_s * 1000, slots=self.slots,
                            running=self.running, last_heartbeat_s=time.monotonic() - self.last_seen,
                            state="quarantined" if self.quarantined and self.state == "ready" else self.state,
                            connected_s=time.time() - self.connected_at,
                            jobs_done=self.jobs_done, jobs_failed=self.jobs_failed,
                            cpu_percent=self.heartbeat.cpu_percent, rss_bytes=self.heartbeat.rss_bytes,
                            mode=self.heartbeat.mode or ("paused" if self.heartbeat.paused else "active"),
                            load1=self.heartbeat.load1, jobs_cpu_percent=self.heartbeat.jobs_cpu_percent,
                            jobs_rss_bytes=self.heartbeat.jobs_rss_bytes,
                            others_cpu_percent=self.heartbeat.others_cpu_percent,
                            limit_stops=self.heartbeat.limit_stops)


class AgentLinkService:
    """The AgentLink gRPC servicer."""

    def __init__(self, coordinator: "Coordinator") -> None:
        self.c = coordinator
        self._job_ids = itertools.count(1)

    async def Connect(self, request_iterator: AsyncIterator[pb.LinkFrame], context: Any) -> None:
        address = context.peer()
        try:
            session = await asyncio.wait_for(self._handshake(context, address), HANDSHAKE_TIMEOUT)
        except Refused as r:
            log.warning("refused agent from %s: %s", address, r.message)
            await context.write(pb.LinkFrame(refusal=pb.Refusal(code=r.code, message=r.message)))
            return
        except asyncio.TimeoutError:
            log.warning("agent from %s did not finish the handshake in %.0f s", address, HANDSHAKE_TIMEOUT)
            return
        except ProtocolError as exc:
            log.warning("handshake with %s failed: %s", address, exc.message)
            await context.write(pb.LinkFrame(refusal=pb.Refusal(code=exc.code, message=exc.message)))
            return
        await self._serve(session, context)

    async def _read(self, context: Any) -> pb.LinkFrame:
        frame = await context.read()
        if not isinstance(frame, pb.LinkFrame):  # grpc.aio.EOF
            raise ProtocolError("agent closed the stream during the handshake")
        return frame

    async def _handshake(self, context: Any, address: str) -> AgentSession:
        c = self.c
        frame = await self._read(context)
        if frame.WhichOneof("kind") != "agent_hello":
            raise Refused("protocol_error", "expected AgentHello as the first frame")
        h = frame.agent_hello
        if h.protocol != PROTOCOL:
            raise Refused("protocol_version", f"agent speaks protocol {h.protocol}, this coordinator "
                          f"speaks {PROTOCOL}; upgrade the older side")
        if not AGENT_ID_RE.match(h.agent_id):
            raise Refused("bad_agent_id", f"agent id {h.agent_id[:70]!r} must be 1-64 letters, digits, "
                          "'.', '_' or '-'")
        check_len("agent_key", h.agent_key, 32)
        check_len("ephemeral", h.ephemeral, 32)
        check_len("nonce", h.nonce, 32)
        if not 1 <= h.slots <= 1024:
            raise Refused("bad_slots", f"slots {h.slots} must be between 1 and 1024")
        t = hello_transcript(h.protocol, h.agent_id, h.agent_key, h.ephemeral, h.nonce, h.slots)
        eph, eph_pub = new_ephemeral()
        nonce = secrets.token_bytes(32)
        t.add(c.state.public_key, eph_pub, nonce, SUITE)
        th = t.digest()
        await context.write(pb.LinkFrame(coordinator_hello=pb.CoordinatorHello(
            coordinator_key=c.state.public_key, ephemeral=eph_pub, nonce=nonce,
            signature=sign(c.state.identity, th, b"coordinator"), suite=SUITE)))
        frame = await self._read(context)
        if frame.WhichOneof("kind") != "agent_proof":
            raise Refused("protocol_error", "expected AgentProof as the third frame")
        verify(h.agent_key, frame.agent_proof.signature, th, b"agent", "agent")
        proved = next((s for s in c.state.join_secrets()
                       if hmac.compare_digest(join_mac(s, th), frame.agent_proof.join_mac)), None)
        if proved is None:
            raise Refused("bad_join_secret", "join secret not accepted: get a current token with "
                          "`microswarm coordinator token` on the coordinator")
        existing = c.agents.get(h.agent_id)
        if existing is not None:
            if existing.agent_key != h.agent_key:
                raise Refused("duplicate_agent_id", f"an agent with id {h.agent_id!r} is already connected; "
                              "give each agent its own --id")
            log.info("agent %s reconnected; replacing its old session", h.agent_id)
            self.c.drop_agent(existing, "replaced by a new connection from the same agent")
        k_a2c, k_c2a = derive_keys(eph, h.ephemeral, th)
        session = AgentSession(h.agent_id, bytes(h.agent_key), address, h.slots, h.hostname,
                               coordinator_channel(SUITE, k_a2c, k_c2a), c)
        session.join_secret = hashlib.sha256(proved).digest()
        session.max_packages = h.max_packages
        c.quarantine.joined(session)
        c.agents[h.agent_id] = session
        return session

    async def _serve(self, s: AgentSession, context: Any) -> None:
        c = self.c
        log.info("agent %s joined from %s with %d slots", s.agent_id, s.address, s.slots,
                 extra={"agent": s.agent_id})
        s.send(pb.ToAgent(welcome=pb.Welcome(agent_id=s.agent_id, heartbeat_s=c.heartbeat_s,
                                             liveness_s=c.liveness_s, max_frame=MAX_FRAME,
                                             coordinator_id=c.state.fingerprint.hex())))
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
