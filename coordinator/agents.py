"""Agent sessions: what the coordinator knows of each connected agent and of the jobs it sent it.

The session's stream is served by link.py (after handshake.py authenticated the agent). Every job
the coordinator sends is tracked until exactly one result, or until the session ends, when it
fails with AgentLost so that the scheduler can take over.
"""
from __future__ import annotations

import asyncio
import functools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from microcores._secure import Channel
from microcores.errors import Unavailable
from microswarm.protos import microswarm_pb2 as pb

from .caller import CALLER, Caller
from .calls import PROGRESS, Progress
from .outflow import OUTFLOW, Outflow
from .placement import AgentView
from .ratelimit import Limits
from .spool import Spool

if TYPE_CHECKING:
    from .server import Coordinator

OUTBOX_BASE = 4096  # messages queued for one agent (plus 16 a slot) before it counts as not reading its link


class AgentLost(Exception):
    """The agent's session ended before it answered."""


class AgentSilent(AgentLost):
    """The agent stopped sending anything (frozen, cut off): its jobs are given up on."""


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
    caller: Caller | None = None  # whose call it is: its nested calls run as them (caller.py)
    nested: set[asyncio.Task[Any]] | None = None  # its nested calls running now (cancelled when it ends)
    nested_total: int = 0
    progress: Progress | None = None  # where its self.progress() goes: its call's slot (calls.Progress)
    output: Spool | None = None        # a large output arriving in pieces (JobOutput), ahead of its result
    outflow: Outflow | None = None     # where those pieces go on to, for a call on a CallStream (outflow.py)

    @property
    def in_flight(self) -> bool:
        """Still wanted from its agent: not given up on, not answered, and (confirm_start) let start."""
        return not self.abandoned and not self.future.done() and (self.claimed is None or self.started)

    def end_nested(self) -> None:
        """The job is over (answered or given up on): its nested calls stop at once."""
        if self.nested:
            for t in list(self.nested):
                t.cancel()

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
    join_secret: bytes = b""  # sha256 of the join secret it proved: dropped when that is revoked
    token_name: str = ""      # the volunteer token it joined with ("" for a shared one)
    slots_asked: int = 0      # what it asked for; `slots` is what the token's caps granted
    max_packages: int = 0
    planned: set[str] = field(default_factory=set)  # service names placement gave it
    welcomed: bool = False    # Welcome sent: other messages may follow
    reserved: int = 0         # slots promised to calls about to send a job here
    strikes: int = 0          # failures in a row (timeouts, faults): quarantined at the limit
    quarantined_until: float = 0.0
    jobs_timed_out: int = 0
    ewma_s: float = 0.0       # moving average of its recent round trips (p2c breaks ties with it)
    # the link's limits (link.py): message buckets, what it claimed that was not so, memory it holds
    limits: Limits = field(default_factory=Limits)
    jobs_bogus: int = 0       # results for jobs it was never sent (or already answered): faults, not work
    claims_ignored: int = 0   # installed/fetch for packages not given to it, repeated fetches, stray claims
    fetched: dict[str, float] = field(default_factory=dict)  # digest -> when its package was last sent
    install_logged: set[tuple[str, bool]] = field(default_factory=set)  # (digest, ok) install reports logged
    charged: int = 0          # partial-frame bytes counted against the coordinator's link budget
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # set when the coordinator drops it
    end_reason: str = ""      # why the link ended it (a stall), when it did
    drained: asyncio.Event | None = None  # set by the link's sender when it took messages (room())

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
            if self.outbox.qsize() > OUTBOX_BASE + 16 * self.slots:  # it does not read what we send
                self.coordinator.drop_agent(self, f"it stopped reading its link ({self.outbox.qsize()} "
                                                  "messages waiting for it)")

    async def room(self, window: int) -> None:
        """Wait until fewer than `window` messages wait for its link (or it is gone): a payload
        sent ahead in pieces (staging.py) is held by the link at that pace, not queued whole."""
        while self.outbox.qsize() >= window and not self.closed:
            if self.drained is None:
                self.drained = asyncio.Event()
            try:
                async with asyncio.timeout(1.0):  # (re-checks `closed`: a dropped agent never drains)
                    await self.drained.wait()
            except TimeoutError:
                pass

    def took(self) -> None:
        """The link's sender wrote what was queued: wake those waiting for room()."""
        if self.drained is not None:
            self.drained.set()
            self.drained = None

    def start_job(self, job: pb.Job) -> JobRecord:
        """Send a job on a slot reserved for it (see slots.SlotQueue); its result resolves the record."""
        loop = asyncio.get_running_loop()
        rec = JobRecord(job.job_id, loop.create_future(), list(job.chain), time.monotonic() + job.deadline_s,
                        job.service, loop.create_future() if job.confirm_start else None, caller=CALLER.get(),
                        progress=PROGRESS.get(), outflow=OUTFLOW.get())
        if rec.progress is not None:
            rec.progress.executor = self.agent_id  # (the dashboard's "executed by" of a call in flight)
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
        rec.end_nested()
        if rec.output is not None:  # its pieces stop going on to the client
            rec.output.fail(Unavailable(f"job {rec.job_id} was given up on"))
        if not rec.future.done():
            rec.future.cancel()
        if rec.claimed is not None and not rec.claimed.done():
            rec.claimed.cancel()
        self.send(pb.ToAgent(cancel=pb.Cancel(job_id=rec.job_id)))

    def fail_all(self, reason: str, silent: bool = False) -> None:
        """Wake every call waiting on this agent (the session ended, or the agent fell silent)."""
        exc = AgentSilent(reason) if silent else AgentLost(reason)
        for rec in list(self.jobs.values()):
            if rec.output is not None:
                rec.output.fail(Unavailable(f"agent {self.agent_id}: {reason}"))
            if not rec.future.done():
                rec.future.set_exception(exc)
            if rec.claimed is not None and not rec.claimed.done():
                rec.claimed.set_exception(exc)

    @functools.cached_property
    def view(self) -> AgentView:
        """What placement sees of it (fixed once it has joined: slots and limits are granted then)."""
        return AgentView(self.agent_id, self.max_packages, self.slots)

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
                            limit_stops=self.heartbeat.limit_stops, slots_asked=self.slots_asked or self.slots,
                            token_name=self.token_name, sandbox=self.heartbeat.sandbox)
