"""The volunteer agent daemon.

It dials out to the coordinator (no open port needed behind NAT), proves itself and checks the
coordinator's key against the one pinned by its token, then serves jobs over one encrypted
stream until told to stop. Packages are verified and run in isolated worker processes, one
pool per package version. On SIGTERM it takes no new jobs, finishes the running ones, says
goodbye and exits 0; when the coordinator goes away it reconnects with backoff.

With `--discover` it finds the coordinator on the LAN (zeroconf), among the advertisements whose
key fingerprint is the one its token pins; the handshake still proves the key, and an address that
fails it is skipped: the agent goes on looking. The volunteer's limits, idle-only mode and
pause/resume live in `agent.volunteer`; its key and id, kept across restarts, in `agent.identity`.

A refusal stops the agent only when it is authentic: sealed after Welcome, or signed by the
pinned key over this attempt's nonce and the handshake messages the agent sent (a relay that
injected or provoked it cannot do that). Anything else ends the attempt, and it retries.
"""
from __future__ import annotations

import asyncio
import logging
import os
import random
import secrets
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil

from microcores import __version__, _codec, _tls
from microcores._chunks import FRAME_PIECE, STREAM_MIN
from microcores._failover import addresses
from microcores._secure import (PROTOCOL, Channel, JoinToken, agent_channel, check_len, collect_parts, derive_keys,
                                fingerprint, handshake_seen, hello_transcript, join_mac, new_ephemeral, public_bytes,
                                refusal_verifies, sealed_frame, sign, split, verify)
from microcores._sandbox import detect as detect_sandbox
from microcores._worker import PROGRESS_INTERVAL_S, LimitExceeded, WorkerCrashed
from microcores.errors import MicroError, ProtocolError, from_code
from microswarm.protos import microswarm_pb2 as pb
from microswarm.protos import microswarm_pb2_grpc as pbg

from .identity import claim
from .packages import PackageStore
from .staged import StagedInputs
from .volunteer import ControlServer, Monitor, VolunteerSettings, socket_path

log = logging.getLogger("microswarm.agent")


LINK_OPTIONS = [("grpc.max_receive_message_length", 4 * 1024 * 1024),
                ("grpc.max_send_message_length", 4 * 1024 * 1024),
                ("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000),
                ("grpc.keepalive_permit_without_calls", 1)]

CANCEL_GRACE_S = 1.0  # a cancelled job already in a worker gets this long to finish before its worker is killed
# Under load a result waits up to LINGER_S for the results of the agent's other jobs (running beside
# it, or next in line for a worker), so that they share one sealed write (and the coordinator's next
# jobs one frame back): each gRPC write costs far more CPU than a short job. Only when recent jobs are
# short (LINGER_BELOW_S), and never when no other job is in a worker (a lone call is answered at once).
LINGER_S = 0.001
LINGER_BELOW_S = 0.005
SPOOF_MEMORY_S = 300.0  # a discovered address that failed the key check is tried last for this long

# Authentic refusals after which retrying cannot help: the agent stops with an error (exit 2). Not
# protocol_error: an on-path relay can provoke that one by garbling frames.
FATAL_REFUSALS = {"bad_join_secret", "agent_id_taken", "token_revoked", "protocol_version", "bad_agent_id",
                  "bad_slots"}
# Authentic refusals that may clear later (another of the volunteer's agents leaves): retried after
# the longest back-off.
WAIT_REFUSALS = {"token_max_agents", "token_max_slots", "token_max_ids"}
KEY_MISMATCH = "coordinator_key_mismatch"


def reconnect_delay(backoff: float, cap: float, rnd: float | None = None) -> float:
    """The wait before reconnecting: the step (at most `cap`) jittered to 50-100% of it, so agents
    that lost the coordinator together do not return together, and never past the documented cap."""
    return min(cap, backoff) * (0.5 + 0.5 * (random.random() if rnd is None else rnd))


class AgentRefused(Exception):
    """A refusal: from the coordinator (`authenticated` when it proved to be), or the agent's own
    finding that the coordinator presented another key than the pinned one."""

    def __init__(self, code: str, message: str, authenticated: bool = True) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.authenticated = authenticated


@dataclass
class AgentConfig:
    coordinator: str
    token: str
    slots: int = 2
    agent_id: str = ""
    state_dir: str = ""
    drain_s: float = 60.0
    max_backoff_s: float = 30.0
    discover: bool = False           # find the coordinator on the LAN instead of `coordinator`
    discover_timeout_s: float = 10.0
    volunteer: VolunteerSettings = field(default_factory=VolunteerSettings)
    control_socket: bool = True      # `microswarm agent pause|resume` through <state_dir>/agent.sock
    max_packages: int = 0            # the most packages it holds (0: no limit)
    worker_idle_s: float = 120.0     # a package's workers stop after sitting idle this long (0: never)
    insecure: bool | None = None     # plaintext to a coordinator run with --insecure (None: MICROSWARM_INSECURE)
    require_sandbox: bool = False    # refuse to start when job workers cannot be sandboxed (bwrap)


@dataclass
class Link:
    call: Any
    channel: Channel
    coordinator_key: bytes
    outbox: asyncio.Queue[pb.ToCoordinator | None] = field(default_factory=asyncio.Queue)
    pending: list[pb.ToAgent] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    nonce: bytes = b""   # this attempt's hello nonce and handshake_seen: what a signed refusal must bind
    seen: bytes = b""

    def send(self, msg: pb.ToCoordinator) -> None:
        self.outbox.put_nowait(msg)


def _send_output(link: Link, job_id: str, output: bytes) -> None:
    """A large output as JobOutput pieces, each sliced from it (one sealed frame apiece)."""
    view = memoryview(output)
    for off in range(0, len(view), FRAME_PIECE):
        link.send(pb.ToCoordinator(output=pb.JobOutput(job_id=job_id, data=bytes(view[off:off + FRAME_PIECE]),
                                                       size=len(view))))


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.token = JoinToken.parse(config.token)  # ValueError with a clear message on a bad token
        if not 1 <= config.slots <= 1024:
            raise ValueError(f"--slots {config.slots} must be between 1 and 1024")
        if config.max_packages < 0:
            raise ValueError(f"--max-packages {config.max_packages} must be 0 (no limit) or more")
        if config.worker_idle_s < 0:
            raise ValueError(f"--worker-idle {config.worker_idle_s} must be 0 (never stop) or more seconds")
        self.identity = claim(config.state_dir, config.agent_id)  # ValueError with a clear message
        self.agent_id = self.identity.agent_id
        self.key = self.identity.key
        self.slots = config.slots  # what the coordinator granted, once joined (Welcome.slots)
        self._spoofed: dict[str, float] = {}  # discovered addresses that failed the key check, and when
        self.packages = PackageStore(Path(config.state_dir).expanduser() / "agent-packages", config.slots,
                                     config.max_packages, config.worker_idle_s, config.volunteer.worker_env)
        self.packages.publisher_keys = self.token.publisher_keys  # msw2 token: packages must be publisher-signed
        self.jobs: dict[str, asyncio.Task[Any]] = {}
        self.claims: dict[str, asyncio.Future[bool]] = {}  # confirm_start jobs waiting for the go
        self.staged = StagedInputs()  # large inputs sent ahead of their jobs (this link's)
        self.in_worker: set[str] = set()  # jobs running in a worker (not waiting for one)
        self.job_s = 0.0  # moving average of the time jobs spend in a worker
        self._linger: asyncio.Future[None] | None = None  # the sender waits for the results of...
        self._linger_for: set[str] = set()                 # ...these jobs (see LINGER_S)
        self.cancelling: set[str] = set()  # told to stop: its answer says cancelled
        self.nested: dict[int, asyncio.Future[pb.CallReply]] = {}
        self._nested_ids = 0
        self.draining = False
        self.stop_event = asyncio.Event()
        self.link: Link | None = None
        self.heartbeat_s = 1.0
        self._proc = psutil.Process()
        self._proc.cpu_percent(None)
        self.volunteer = config.volunteer
        self.volunteer.check()  # ValueError with a clear message
        self.sandbox = detect_sandbox()  # the level every job worker of this agent runs at (_sandbox.py)
        if config.require_sandbox and not self.sandbox.strong:
            raise ValueError(f"--require-sandbox: job workers cannot be sandboxed here, only the weak "
                             f"level '{self.sandbox.level}' is available: {self.sandbox.detail}")
        self.packages.sandbox = self.sandbox
        self.paused = False      # by the owner: `microswarm agent pause`, SIGUSR1
        self.limit_stops = 0
        # Several coordinators of one cluster (--coordinator a:7070,b:7070): each agent starts at a
        # random one, so a fleet spreads over them, and moves on when its own goes away.
        self.addresses = addresses(config.coordinator)
        start = random.randrange(len(self.addresses)) if self.addresses else 0
        self.addresses = self.addresses[start:] + self.addresses[:start]
        self.address = self.addresses[0] if self.addresses else ""
        self._joined = False
        self.monitor = Monitor(self.volunteer, self._workers, self._owner_changed)
        self.control: ControlServer | None = None
        self._log_filter = _AgentLogContext(self.agent_id)

    # ------------------------------------------------------------ volunteer controls

    @property
    def mode(self) -> str:
        if self.draining:
            return "draining"
        if self.paused:
            return "paused"
        if self.monitor.owner_busy:
            return "owner_busy"
        return "active"

    def _workers(self) -> list[tuple[Any, bool]]:
        return [(w, w in pool.busy) for pool in self.packages.pools.values() for w in pool.workers()]

    def _hand_back(self, reason: str, why: str) -> int:
        """Stop every running job; each goes back to the coordinator as an agent fault naming `reason`."""
        self.monitor.release()
        n = 0
        for pool in self.packages.pools.values():
            for w in list(pool.busy):
                w.stop(f"{reason}: {why}")
                n += 1
        if n:
            log.info("handed %d running job(s) back to the coordinator: %s", n, why)
        return n

    def _mode_changed(self) -> None:
        if self.link is not None:
            self.link.send(self._heartbeat())

    def _owner_changed(self, busy: bool) -> None:
        if busy:
            self._hand_back("owner_busy", "the machine's owner came back (--idle-only)")
        self._mode_changed()

    def pause(self, finish: bool = False) -> dict[str, Any]:
        was = self.paused
        self.paused = True
        handed = 0 if finish else self._hand_back("paused", "the agent was paused by its owner")
        if not was:
            log.info("paused: taking no new jobs%s", "" if finish else f" ({handed} handed back)")
        self._mode_changed()
        return {"ok": True, "mode": self.mode, "handed_back": handed}

    def resume(self) -> dict[str, Any]:
        if self.paused:
            log.info("resumed: taking jobs%s", " once the machine is idle" if self.monitor.owner_busy else "")
        self.paused = False
        self._mode_changed()
        return {"ok": True, "mode": self.mode}

    def status(self) -> dict[str, Any]:
        return {"ok": True, "agent_id": self.agent_id, "coordinator": self.address, "connected": self.link is not None,
                "mode": self.mode, "slots": self.slots, "running": len(self.jobs),
                "packages": len(self.packages.pools), "limit_stops": self.limit_stops,
                "jobs_cpu_percent": round(self.monitor.jobs_cpu_percent, 1), "jobs_rss_bytes": self.monitor.jobs_rss,
                "others_cpu_percent": round(self.monitor.others_cpu_percent, 1),
                "throttled_s": round(self.monitor.throttled_s, 2), "settings": self.volunteer.describe()}

    def _control(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("command")
        if cmd == "pause":
            return self.pause(finish=bool(req.get("finish")))
        if cmd == "resume":
            return self.resume()
        if cmd == "status":
            return self.status()
        return {"ok": False, "error": f"unknown command {cmd!r}: use pause, resume or status"}

    # ------------------------------------------------------------ lifecycle

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._begin_stop)
        loop.add_signal_handler(signal.SIGUSR1, self.pause)
        loop.add_signal_handler(signal.SIGUSR2, self.resume)
        for h in logging.getLogger().handlers:
            h.addFilter(self._log_filter)
        sb = self.sandbox
        print(f"agent {self.agent_id}: job sandbox {sb.level} ({sb.detail})", flush=True)
        if sb.strong:
            log.info("job sandbox: %s (%s)", sb.level, sb.detail)
            if os.geteuid() == 0:
                log.warning("this agent runs as root: its job workers are uid 0 outside their namespaces (the "
                            "namespaces confine them, no second user does); run the agent as an unprivileged "
                            "user, as deploy/ does")
        else:
            log.warning("WEAK JOB SANDBOX: shipped code runs with only rlimits and a scrubbed environment "
                        "(%s); it can read what this user can read and use the network. Use "
                        "--require-sandbox to refuse to run like this.", sb.detail)
        monitor = asyncio.create_task(self.monitor.run())
        reaper = asyncio.create_task(self.packages.reap_idle())
        if self.config.control_socket:
            self.control = ControlServer(socket_path(self.config.state_dir), self._control)
            try:
                await self.control.start()
            except OSError as exc:
                log.warning("no control socket at %s: %s; use SIGUSR1/SIGUSR2", self.control.path, exc)
                self.control = None
        if self.volunteer.idle_only:
            log.info("idle-only: taking jobs once others use under %.0f%% of the CPU for %.0f s",
                     self.volunteer.idle_threshold, self.volunteer.idle_wait)
        backoff = 0.5
        try:
            while not self.stop_event.is_set():
                started = time.monotonic()
                try:
                    await self._connect()
                    if self.draining:
                        await self.stop_event.wait()
                        break
                    log.warning("link to the coordinator ended; reconnecting")
                except AgentRefused as r:
                    if self._fatal(r):
                        log.error("the coordinator refused this agent (%s): %s", r.code, r.message)
                        print(f"error: the coordinator refused this agent ({r.code}): {r.message}", flush=True)
                        return 2
                    if not r.authenticated:
                        log.warning("ignored an unauthenticated refusal (%r: %r) from %s: neither sealed nor signed "
                                    "by the coordinator's key over what this agent sent; retrying", r.code[:64],
                                    r.message[:200], self.address or "(not found)")
                    elif r.code == KEY_MISMATCH:
                        log.warning("%s; looking again", r.message)
                    else:
                        log.warning("refused (%s): %s; retrying", r.code, r.message)
                    if r.authenticated and r.code in WAIT_REFUSALS:
                        backoff = self.config.max_backoff_s
                except (grpc.RpcError, ConnectionError, ProtocolError, OSError) as exc:
                    if self.draining:
                        await self.stop_event.wait()
                        break
                    detail = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)
                    log.warning("cannot reach the coordinator at %s: %s", self.address or "(not found)", detail)
                if time.monotonic() - started > 10:
                    backoff = 0.5
                delay = reconnect_delay(backoff, self.config.max_backoff_s)
                log.info("reconnecting in %.1f s", delay)
                try:
                    await asyncio.wait_for(self.stop_event.wait(), delay)
                except asyncio.TimeoutError:
                    pass
                backoff = min(self.config.max_backoff_s, backoff * 2)
            return 0
        finally:
            monitor.cancel()
            reaper.cancel()
            self.monitor.release()
            if self.control is not None:
                await self.control.close()
            await asyncio.gather(*(p.close() for p in self.packages.pools.values()), return_exceptions=True)
            for h in logging.getLogger().handlers:
                h.removeFilter(self._log_filter)
            self.identity.release()

    def _fatal(self, r: AgentRefused) -> bool:
        """Stop for good only on an authentic fatal refusal, or a pinned-key mismatch outside --discover
        (with --discover, anyone may advertise anything: the agent goes on looking)."""
        if r.code == KEY_MISMATCH:
            return not self.config.discover
        return r.authenticated and r.code in FATAL_REFUSALS

    def _begin_stop(self) -> None:
        if self.draining:
            return
        self.draining = True
        log.info("stopping: finishing %d running job(s), taking no new ones", len(self.jobs))
        asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        """Leave without losing a job: say so, keep serving until the coordinator closes the link.

        Jobs may be on the wire when we decide to stop; the coordinator stops dispatching on
        `Leaving` and closes the stream only once every job it sent us is answered."""
        deadline = time.monotonic() + self.config.drain_s
        link = self.link
        if link is not None:
            link.send(self._heartbeat())  # paused
            link.send(pb.ToCoordinator(leaving=pb.Leaving(reason="agent stopping (SIGTERM)")))
            try:
                await asyncio.wait_for(link.closed.wait(), self.config.drain_s)
            except asyncio.TimeoutError:
                log.warning("the coordinator did not release this agent within %.0f s; leaving anyway",
                            self.config.drain_s)
        while self.jobs and time.monotonic() < deadline:
            await asyncio.wait(list(self.jobs.values()), timeout=max(0.01, deadline - time.monotonic()))
        self.stop_event.set()

    # ------------------------------------------------------------ one session

    async def _targets(self) -> list[str]:
        """Where to dial: the configured address, or what LAN discovery finds for this token's key."""
        if not self.config.discover:
            return list(self.addresses)
        from microcores._discovery import browse

        self.address = ""
        now = time.monotonic()
        self._spoofed = {t: when for t, when in self._spoofed.items() if now - when < SPOOF_MEMORY_S}
        # After a spoofed answer, listen a little longer: the real coordinator may answer second.
        settle = min(2.0, self.config.discover_timeout_s) if self._spoofed else 0.3
        matching, others = await browse(self.config.discover_timeout_s, self.token.fingerprint_hex, settle=settle)
        if not matching:
            if others:
                raise ConnectionError(
                    f"LAN discovery found {len(others)} coordinator(s) "
                    f"({', '.join(a.fingerprint[:16] + ' at ' + a.targets[0] for a in others)}), none with the key "
                    f"this token pins ({self.token.fingerprint_hex[:16]})")
            raise ConnectionError(f"LAN discovery found no coordinator in {self.config.discover_timeout_s:.0f} s")
        targets = sorted((t for ad in matching for t in ad.targets), key=lambda t: t in self._spoofed)
        log.info("LAN discovery: coordinator %s at %s", self.token.fingerprint_hex[:16], ", ".join(targets))
        return targets

    async def _connect(self) -> None:
        """One session with the first target that answers. A target that presents another key than
        the pinned one, or answers with an unauthenticated refusal, is skipped for the next; if none
        is left, the last failure is the answer (run() decides whether to go on)."""
        targets = await self._targets()
        last: BaseException | None = None
        for target in targets:
            self.address = target
            self._joined = False
            try:
                await self._session(target)
                if target in self.addresses and len(self.addresses) > 1:  # its link ended: the others first
                    self.addresses.remove(target)
                    self.addresses.append(target)
                return
            except AgentRefused as r:
                if self._joined or (r.authenticated and r.code != KEY_MISMATCH):
                    raise
                if r.code == KEY_MISMATCH and self.config.discover:
                    r.message += " (found by LAN discovery: a spoofed or stale advertisement)"
                    self._spoofed[target] = time.monotonic()
                last = r
            except (grpc.RpcError, ConnectionError, ProtocolError, OSError) as exc:
                if self._joined:
                    raise
                last = exc
            if len(targets) > 1:
                log.warning("could not join %s: %s", target, last)
        assert last is not None
        raise last

    async def _trust(self, address: str) -> _tls.Trust:
        """TLS pinned to the key the token names, proven before anything is sent (microcores._tls)."""
        try:
            return await _tls.resolve_async(address, fingerprint=self.token.fingerprint, insecure=self.config.insecure,
                                            unbound_ok=True)
        except _tls.UntrustedCoordinator as exc:
            raise AgentRefused(KEY_MISMATCH, exc.message) from None  # our own finding, not a remote refusal
        except MicroError as exc:
            raise ConnectionError(exc.message) from None

    async def _session(self, address: str) -> None:
        trust = await self._trust(address)
        async with trust.aio_channel(address, LINK_OPTIONS) as channel:
            stub = pbg.AgentLinkStub(channel)
            call = stub.Connect()
            link = await self._handshake(call)
            self.link = link
            sender = asyncio.create_task(self._sender(link))
            beat = asyncio.create_task(self._heartbeats(link))
            try:
                await self._receive(link)
            finally:
                self.link = None
                link.closed.set()
                beat.cancel()
                sender.cancel()
                for fut in self.nested.values():
                    if not fut.done():
                        fut.set_exception(ConnectionError("link to the coordinator lost"))
                self.nested.clear()
                for claim in self.claims.values():  # no go can come any more: those jobs never start
                    if not claim.done():
                        claim.set_result(False)
                self.claims.clear()
                self.staged = StagedInputs()  # (the next link's jobs never name this one's stages)
                call.cancel()

    async def _read(self, call: Any, nonce: bytes, seen: bytes) -> pb.LinkFrame:
        """The next frame; a plaintext refusal is raised, authenticated only if signed by the pinned
        key over this attempt's `nonce` and `seen` (handshake_seen of what this agent sent)."""
        frame = await call.read()
        if not isinstance(frame, pb.LinkFrame):
            raise ConnectionError("the coordinator closed the stream")
        if frame.WhichOneof("kind") == "refusal":
            raise self._refusal(frame.refusal, nonce, seen)
        return frame

    def _refusal(self, r: pb.Refusal, nonce: bytes, seen: bytes) -> AgentRefused:
        ok = refusal_verifies(self.token.fingerprint, r.coordinator_key, r.signature, nonce, r.code, r.message, seen)
        return AgentRefused(r.code, r.message, authenticated=ok)

    async def _handshake(self, call: Any) -> Link:
        eph, eph_pub = new_ephemeral()
        nonce = secrets.token_bytes(32)
        my_key = public_bytes(self.key)
        await call.write(pb.LinkFrame(agent_hello=pb.AgentHello(
            protocol=PROTOCOL, agent_id=self.agent_id, agent_key=my_key, ephemeral=eph_pub, nonce=nonce,
            slots=self.config.slots, hostname=socket.gethostname(), software=__version__,
            max_packages=self.config.max_packages)))
        t = hello_transcript(PROTOCOL, self.agent_id, my_key, eph_pub, nonce, self.config.slots)
        seen = handshake_seen(t.digest())
        frame = await asyncio.wait_for(self._read(call, nonce, seen), 15)
        if frame.WhichOneof("kind") != "coordinator_hello":
            raise ProtocolError(f"expected CoordinatorHello, got {frame.WhichOneof('kind')}")
        ch = frame.coordinator_hello
        check_len("coordinator_key", ch.coordinator_key, 32)
        presented = fingerprint(ch.coordinator_key)
        if presented != self.token.fingerprint:
            raise AgentRefused(KEY_MISMATCH,
                               f"the coordinator at {self.address} presented key "
                               f"{presented.hex()[:16]}, but the token pins {self.token.fingerprint_hex[:16]}: "
                               "wrong coordinator, a spoofed one, or an old token")
        t.add(ch.coordinator_key, ch.ephemeral, ch.nonce, ch.suite)
        th = t.digest()
        verify(ch.coordinator_key, ch.signature, th, b"coordinator", "the coordinator")
        k_a2c, k_c2a = derive_keys(eph, ch.ephemeral, th)
        proof = pb.AgentProof(signature=sign(self.key, th, b"agent"), join_mac=join_mac(self.token.secret, th))
        await call.write(pb.LinkFrame(agent_proof=proof))
        link = Link(call, agent_channel(ch.suite, k_a2c, k_c2a), bytes(ch.coordinator_key), nonce=nonce,
                    seen=handshake_seen(th, proof.signature, proof.join_mac))
        first = await asyncio.wait_for(self._next(link), 15)
        welcome, link.pending = first[0], first[1:]
        if welcome.WhichOneof("kind") == "refusal":
            # Sealed with this session's keys, but a relay could have altered our proof to provoke it:
            # it counts only if signed over the proof we sent.
            raise self._refusal(welcome.refusal, link.nonce, link.seen)
        if welcome.WhichOneof("kind") != "welcome":
            raise ProtocolError(f"expected Welcome, got {welcome.WhichOneof('kind')}")
        self.heartbeat_s = welcome.welcome.heartbeat_s or 1.0
        self.slots = welcome.welcome.slots or self.config.slots
        self._joined = True
        self._check_publishers(list(welcome.welcome.publisher_fingerprints))
        log.info("joined coordinator %s at %s as %s with %d slots%s", welcome.welcome.coordinator_id[:16],
                 self.address, self.agent_id, self.slots,
                 f" (of {self.config.slots} asked: the token's cap)" if self.slots < self.config.slots else "")
        print(f"agent {self.agent_id} joined {self.address}", flush=True)
        return link

    def _check_publishers(self, announced: list[bytes]) -> None:
        """Warn when the coordinator's --publisher-key set differs from the token's. Only the token's
        keys are trusted: a coordinator cannot add one (that would let a taken coordinator push code)."""
        mine = {fingerprint(k) for k in self.token.publisher_keys}
        if set(announced) != mine:
            log.warning("the coordinator accepts packages from publisher keys [%s] but this agent's token "
                        "carries [%s]; packages are checked against the token's keys only (ask the operator "
                        "for a new token if the publisher keys changed)",
                        ", ".join(f.hex()[:16] for f in announced) or "none",
                        ", ".join(f.hex()[:16] for f in sorted(mine)) or "none")

    async def _next(self, link: Link) -> list[pb.ToAgent]:
        """The next sealed batch of messages."""
        while True:
            frame = await self._read(link.call, link.nonce, link.seen)
            if frame.WhichOneof("kind") != "sealed":
                raise ProtocolError("plaintext frame after the handshake")
            s = frame.sealed
            data = link.channel.open(s.counter, s.ciphertext, s.more)
            if data is not None:
                # (protobuf parses any buffer; its stubs say bytes)
                return [pb.ToAgent.FromString(piece) for piece in split(data)]  # type: ignore[arg-type]

    async def _sender(self, link: Link) -> None:
        while True:
            msg = await link.outbox.get()
            await asyncio.sleep(0)  # let results finishing together share one sealed write
            if self.in_worker and self.job_s < LINGER_BELOW_S and msg is not None \
                    and msg.WhichOneof("kind") == "result":
                await self._gather_results()
            if msg is None:
                await link.call.done_writing()
                return
            parts, stop = collect_parts(msg, link.outbox)  # sealed from its parts: a job's output is not joined
            for counter, ct, more in link.channel.seal_iter(parts):
                await link.call.write(sealed_frame(counter, ct, more))
            if stop:
                await link.call.done_writing()
                return

    async def _gather_results(self) -> None:
        """Wait (at most LINGER_S) until the agent's jobs of now have queued their results."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._linger, self._linger_for = fut, set(self.jobs)
        timer = loop.call_later(LINGER_S, _resolve, fut)
        try:
            await fut
        finally:
            timer.cancel()
            self._linger = None
            self._linger_for.clear()

    def _left_worker(self, job_id: str) -> None:
        self.in_worker.discard(job_id)
        if self._linger is not None and job_id in self._linger_for:
            self._linger_for.discard(job_id)
            if not self._linger_for:
                _resolve(self._linger)

    async def _heartbeats(self, link: Link) -> None:
        while True:
            link.send(self._heartbeat())
            await asyncio.sleep(self.heartbeat_s)

    def _heartbeat(self) -> pb.ToCoordinator:
        try:
            load1 = os.getloadavg()[0]
        except OSError:
            load1 = 0.0
        mode = self.mode
        m = self.monitor
        return pb.ToCoordinator(heartbeat=pb.Heartbeat(
            running=len(self.jobs), slots=self.slots, cpu_percent=self._proc.cpu_percent(None),
            rss_bytes=self._proc.memory_info().rss, load1=load1, paused=mode != "active", mode=mode,
            jobs_cpu_percent=m.jobs_cpu_percent, jobs_rss_bytes=m.jobs_rss,
            others_cpu_percent=m.others_cpu_percent, limit_stops=self.limit_stops, sandbox=self.sandbox.level))

    async def _receive(self, link: Link) -> None:
        batch, link.pending = link.pending, []
        while True:
            for msg in batch:
                if msg.WhichOneof("kind") == "refusal" and msg.refusal.code in FATAL_REFUSALS:
                    raise AgentRefused(msg.refusal.code, msg.refusal.message)  # sealed: authentic
                self._dispatch(link, msg)
            batch = await self._next(link)  # a plaintext refusal ends the session: run() judges it

    def _dispatch(self, link: Link, msg: pb.ToAgent) -> None:
        kind = msg.WhichOneof("kind")
        if kind == "job":
            self._start_job(link, msg.job)
        elif kind == "holdings":
            asyncio.create_task(self.packages.sync(link, list(msg.holdings.packages)))
        elif kind == "package":
            asyncio.create_task(self.packages.install(link, msg.package))
        elif kind == "nested_reply":
            fut = self.nested.pop(msg.nested_id, None)
            if fut is not None and not fut.done():
                fut.set_result(msg.nested_reply)
        elif kind == "ping":
            if msg.ping.heartbeat_s > 0:  # the fleet's pace changed (coordinator/pace.py)
                self.heartbeat_s = min(max(msg.ping.heartbeat_s, 0.1), 3600.0)
            link.send(pb.ToCoordinator(pong=pb.Pong(seq=msg.ping.seq)))
            link.send(self._heartbeat())
        elif kind == "cancel":
            task = self.jobs.get(msg.cancel.job_id)
            if task is not None:
                self.cancelling.add(msg.cancel.job_id)
                if msg.cancel.job_id in self.in_worker:
                    # Let a job already in a worker finish for a moment: killing a healthy worker for a
                    # short job (a hedge's loser) costs a process start, far more than the job.
                    asyncio.get_running_loop().call_later(CANCEL_GRACE_S, task.cancel)
                else:
                    task.cancel()
        elif kind == "staged_input":
            self.staged.take(msg.staged_input)
        elif kind == "start":
            claim = self.claims.pop(msg.start.job_id, None)
            if claim is not None and not claim.done():
                claim.set_result(msg.start.go)
        elif kind == "refusal":
            log.warning("coordinator: %s: %s", msg.refusal.code, msg.refusal.message)

    # ------------------------------------------------------------ jobs

    def _start_job(self, link: Link, job: pb.Job) -> None:
        task = asyncio.create_task(self._run_job(link, job))
        self.jobs[job.job_id] = task

        def done(t: asyncio.Task[Any], jid: str = job.job_id) -> None:
            self.jobs.pop(jid, None)
            self._left_worker(jid)
            self.cancelling.discard(jid)
            if t.cancelled():  # cancelled before it ran at all: the coordinator still hears it stopped
                link.send(pb.ToCoordinator(result=pb.JobResult(
                    job_id=jid, cancelled=True, not_started=True,
                    error=pb.Error(code="cancelled", message="cancelled before it started"))))
        task.add_done_callback(done)

    async def _claim(self, link: Link, job: pb.Job) -> bool:
        """At most once: ask the coordinator before starting; it says no if it gave up on the job."""
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.claims[job.job_id] = fut
        link.send(pb.ToCoordinator(claim=pb.JobClaim(job_id=job.job_id)))
        try:
            async with asyncio.timeout(max(0.5, job.deadline_s)):  # not wait_for: it can swallow a Cancel
                return await fut
        except TimeoutError:
            return False
        finally:
            self.claims.pop(job.job_id, None)

    async def _run_job(self, link: Link, job: pb.Job) -> None:
        reply = pb.ToCoordinator()
        result = reply.result  # filled in place: no copy of the output into the message sent
        result.job_id = job.job_id
        pool = self.packages.pools.get(job.digest)
        started = False
        t_in = 0.0
        try:
            if self.mode in ("paused", "owner_busy"):  # it was on the wire when we stopped taking jobs
                raise LimitExceeded(self.mode, f"{self.mode}: this agent takes no jobs now")
            if pool is None:
                raise WorkerCrashed(f"package {job.digest[:12]} for {job.service} is not installed here")
            if len(self.jobs) > self.slots * 2:
                raise WorkerCrashed(f"all {self.slots} slots are busy")
            try:
                job_input = self.staged.pop(job.staged) if job.staged else job.input
            except KeyError as exc:
                raise WorkerCrashed(str(exc.args[0])) from None

            async def start() -> bool:
                """A worker is ready: a confirm_start job asks the coordinator first (at most once)."""
                nonlocal started, t_in
                if self.mode in ("paused", "owner_busy"):  # paused while its worker was starting
                    raise LimitExceeded(self.mode, f"{self.mode}: this agent takes no jobs now")
                if job.confirm_start and not await self._claim(link, job):
                    return False
                started = True
                self.in_worker.add(job.job_id)
                t_in = time.monotonic()
                return True

            progress = _ProgressForward(link, job.job_id)
            try:
                outcome = await pool.run(job.job_id, job_input, max(0.001, job.deadline_s),
                                         lambda s, d: self._nested_call(link, job, s, d), on_start=start,
                                         on_progress=progress.report)
            finally:
                progress.close()
            if outcome is None:
                result.ok, result.cancelled, result.not_started = False, True, True
                result.error.CopyFrom(pb.Error(code="cancelled", message="the coordinator withdrew the job"))
                link.send(reply)
                return
            result.ok, result.run_ms = outcome.ok, outcome.run_ms
            if len(outcome.output) > STREAM_MIN:  # ahead of its result, in pieces the coordinator passes on
                _send_output(link, job.job_id, outcome.output)
                result.output_size = len(outcome.output)
            else:
                result.output = outcome.output
            self.job_s += 0.1 * (time.monotonic() - t_in - self.job_s)
            if not outcome.ok:
                e = outcome.error
                result.error.CopyFrom(pb.Error(code=e.get("code", "service_error"), message=e.get("message", ""),
                                               field=e.get("field", ""), details=e.get("details", "")))
        except LimitExceeded as exc:  # the agent stays up; the coordinator runs the job itself
            result.ok, result.agent_fault, result.not_started = False, True, not started
            result.error.CopyFrom(pb.Error(code=exc.limit, message=str(exc)))
            if exc.limit not in ("paused", "owner_busy"):
                self.limit_stops += 1
            log.warning("job %s (%s) stopped: %s", job.job_id, job.service, exc, extra={**_ctx(job), "limit": exc.limit})
        except WorkerCrashed as exc:
            result.ok, result.agent_fault, result.not_started = False, True, not started
            result.error.CopyFrom(pb.Error(code="agent_fault", message=str(exc)))
            log.warning("job %s (%s) failed on this agent: %s", job.job_id, job.service, exc, extra=_ctx(job))
        except MicroError as exc:
            result.ok = False
            result.error.CopyFrom(pb.Error(code=exc.code, message=exc.message, field=exc.field, details=exc.details))
        except asyncio.CancelledError:  # a Cancel from the coordinator: its worker was stopped; say so
            result.ok, result.cancelled, result.not_started = False, True, not started
            result.error.CopyFrom(pb.Error(code="cancelled", message="cancelled by the coordinator"))
            link.send(reply)
            log.info("job %s (%s) cancelled%s", job.job_id, job.service, "" if started else " before it started",
                     extra=_ctx(job))
            return
        result.cancelled = job.job_id in self.cancelling  # finished in its grace after a Cancel
        if log.isEnabledFor(logging.DEBUG):  # one event per job; its fields are built only when logged
            said = "ok" if result.ok else result.error.code
            log.debug("job %s (%s): %s", job.job_id, job.service, said,
                      extra={**_ctx(job), "outcome": said, "run_ms": round(result.run_ms, 3)})
        self._left_worker(job.job_id)  # before the send: a sender lingering for this result writes it
        link.send(reply)

    async def _nested_call(self, link: Link, job: pb.Job, service: str, data: dict[str, Any]) -> dict[str, Any]:
        self._nested_ids += 1
        nid = self._nested_ids
        fut: asyncio.Future[pb.CallReply] = asyncio.get_running_loop().create_future()
        self.nested[nid] = fut
        link.send(pb.ToCoordinator(nested_call=pb.NestedCall(
            nested_id=nid, job_id=job.job_id,
            request=pb.CallRequest(service=service, input=_codec.pack(data), encoding=pb.MSGPACK))))
        try:
            reply = await fut
        except ConnectionError as exc:
            raise from_code("unavailable", str(exc)) from None
        if reply.status != "ok":
            raise from_code(reply.error.code, reply.error.message, reply.error.field, reply.error.details)
        return _codec.unpack(reply.result)


class _ProgressForward:
    """A job's `self.progress()` updates on their way to the coordinator: at most one per
    PROGRESS_INTERVAL_S (the worker limits itself too, but its code is not trusted), the last one
    held back and sent when the interval is up; none after the job's end (its result says more)."""

    def __init__(self, link: Link, job_id: str) -> None:
        self.link, self.job_id = link, job_id
        self.last = -1e18
        self.pending: tuple[float, str] | None = None
        self.timer: asyncio.TimerHandle | None = None

    def report(self, fraction: float, message: str) -> None:
        now = time.monotonic()
        if self.timer is None and now - self.last >= PROGRESS_INTERVAL_S:
            self._send(fraction, message, now)
            return
        self.pending = (fraction, message)
        if self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(
                max(0.0, self.last + PROGRESS_INTERVAL_S - now), self._due)

    def _due(self) -> None:
        self.timer = None
        if self.pending is not None:
            (f, m), self.pending = self.pending, None
            self._send(f, m, time.monotonic())

    def _send(self, fraction: float, message: str, now: float) -> None:
        self.last = now
        self.link.send(pb.ToCoordinator(progress=pb.JobProgress(job_id=self.job_id, fraction=fraction,
                                                                message=message)))

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.pending = None


def _ctx(job: pb.Job) -> dict[str, str]:
    return {"job": job.job_id, "service": job.service}


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _AgentLogContext(logging.Filter):
    """Adds this agent's id to every log record (a field of its own in --log-format json)."""

    def __init__(self, agent_id: str) -> None:
        super().__init__()
        self.agent_id = agent_id

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "agent"):
            record.agent = self.agent_id
        return True
