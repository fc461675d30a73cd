"""An adversarial agent for the link-limit and nested-call tests: a real process that holds a valid
join token, does the real handshake (microcores._secure) and then misbehaves as its flags say.

    python rogue_agent.py --coordinator HOST:PORT --token TOKEN --id ID [--slots N] [mode flags]

By default it behaves like tests/data/blackhole_agent.py: it claims every package of each Holdings
installed (nothing fetched), heartbeats every `--heartbeat` seconds, answers pings, and never
answers a job (`--jobs blackhole`). Modes (combine as needed):

  --flood KIND        after joining, send KIND messages as fast as it can, `--batch` of them in one
                      sealed message, for `--seconds` (or until the coordinator ends the link):
                        heartbeat      heartbeats
                        installed      Installed claims: random digests never published, and the
                                       real ones flipping ok/failed; with --inject-log their names and
                                       errors carry a newline and a forged log line (FORGED_LINE)
                        fetch          Fetch of the packages it was given, again and again
                        claims         JobClaim for jobs it was never sent
                        pongs          Pong with no Ping
                        nested         NestedCall for jobs it was never sent
                        bogus-results  JobResult(ok) for jobs it was never sent
  --count N --interval S   instead of flooding: N messages of the --flood kind, S seconds apart
  --park-partial-mib N     after joining (and `--park-after-jobs` jobs received), send N MiB of
                        1 MiB frames of one message that never ends (`more`), then go silent and
                        wait (at most `--seconds`) for the coordinator to end the link
  --big-hello-mib N   no handshake: on `--connections` streams at once, again and again for
                        `--seconds`, send an AgentHello of N MiB (its hostname) and read the answer
  --jobs MODE         blackhole (default): jobs are never answered; fault: answered at once with
                        agent_fault; nested: its first job makes the `--nested` calls (in parallel),
                        prints their replies, answers the job with agent_fault, then makes
                        `--nested-after-end` more calls for that job (with `--end-job-after S` the job
                        is answered S seconds after its calls went out, replies or not); later jobs
                        get agent_fault
  --nested SERVICE=JSON     a nested call to make (repeatable)
  --nested-after-end N
  --reconnect         join again each time the coordinator ends the link (until --seconds)

It prints one JSON object a line on stdout, each with an "event": joined, refused (code, message,
sealed), closed (after_s: since the misbehaviour began), job, nested_reply (service, status, code,
phase), parked, hello (answer), summary (sent, per kind). A test reads them with `events()`.

To add a mode (e.g. lying results): add its flag in `parser()` and its branch in `Rogue.on_job`
or `Rogue.misbehave`, and print what a test needs as a new event.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import grpc  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from microcores import _codec, _tls  # noqa: E402
from microcores._secure import (PROTOCOL, Channel, JoinToken, agent_channel, collect, derive_keys,  # noqa: E402
                                hello_transcript, join_mac, new_ephemeral, public_bytes, sign, split)
from microswarm.protos import microswarm_pb2 as pb  # noqa: E402
from microswarm.protos import microswarm_pb2_grpc as pbg  # noqa: E402

FORGED_LINE = "2030-01-01 00:00:00 ERROR microswarm.coordinator FORGED: the operator credential is hunter2"
OPTIONS = [("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 128 << 20)]


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def events(text: str) -> list[dict[str, Any]]:
    """The JSON events in a rogue's output (other lines skipped)."""
    out = []
    for line in text.splitlines():
        try:
            d = json.loads(line)
        except ValueError:
            continue
        if isinstance(d, dict) and "event" in d:
            out.append(d)
    return out


def batch(msgs: list[pb.ToCoordinator]) -> bytes:
    """One sealed message's plaintext carrying `msgs` (the batching of microcores._secure.collect)."""
    parts = []
    for m in msgs:
        data = m.SerializeToString()
        parts.append(len(data).to_bytes(4, "big") + data)
    return b"".join(parts)


class Link:
    def __init__(self, call: Any, chan: Channel) -> None:
        self.call = call
        self.chan = chan
        # pb.ToCoordinator; bytes: a whole plaintext; (bytes, more): one frame of a message, `more` as we please
        self.outbox: asyncio.Queue[Any] = asyncio.Queue()
        self.closed = asyncio.Event()

    def send(self, msg: Any) -> None:
        self.outbox.put_nowait(msg)

    async def write_plaintext(self, plaintext: bytes) -> None:
        for counter, ct, more in self.chan.seal_iter(plaintext):
            await self.call.write(pb.LinkFrame(sealed=pb.Sealed(counter=counter, ciphertext=ct, more=more)))

    async def write_piece(self, piece: bytes, more: bool) -> None:
        """One frame of a message, `more` as we please (a message that never ends)."""
        c = self.chan.send_counter
        self.chan.send_counter += 1
        ct = self.chan._send.encrypt(self.chan._nonce(c), piece, self.chan._send_label + (b"\1" if more else b"\0"))
        await self.call.write(pb.LinkFrame(sealed=pb.Sealed(counter=c, ciphertext=ct, more=more)))

    async def sender(self) -> None:
        while True:
            item = await self.outbox.get()
            if item is None:
                return
            if isinstance(item, bytes):
                await self.write_plaintext(item)
                continue
            if isinstance(item, tuple):
                await self.write_piece(*item)
                continue
            plaintext, stop = collect(item, self.outbox)
            await self.write_plaintext(plaintext)
            if stop:
                return


class Rogue:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.token = JoinToken.parse(a.token)
        self.key = Ed25519PrivateKey.generate()
        self.t0 = time.monotonic()
        self.end = self.t0 + a.seconds
        self.sent: dict[str, int] = {}
        self.refs: list[pb.PackageRef] = []
        self.jobs = 0
        self.first_job: pb.Job | None = None
        self.started = 0.0  # when the misbehaviour began
        self.nested_ids = 0
        self.nested_waiting: dict[int, tuple[str, str, asyncio.Future[pb.CallReply]]] = {}
        self.quiet = False  # parked: no heartbeats, no answers

    # ------------------------------------------------------------ one session

    async def session(self) -> str:
        """Join, misbehave, and return how the link ended."""
        trust = await _tls.resolve_async(self.a.coordinator, fingerprint=JoinToken.parse(self.a.token).fingerprint)
        async with trust.aio_channel(self.a.coordinator, OPTIONS) as ch:
            call = pbg.AgentLinkStub(ch).Connect()
            link = await self.handshake(call)
            if link is None:
                return "refused"
            tasks = [asyncio.create_task(link.sender()), asyncio.create_task(self.heartbeats(link)),
                     asyncio.create_task(self.misbehave(link))]
            try:
                return await self.receive(link)
            finally:
                link.closed.set()
                for t in tasks:
                    t.cancel()
                for _, _, fut in self.nested_waiting.values():
                    if not fut.done():
                        fut.cancel()
                call.cancel()

    async def handshake(self, call: Any) -> Link | None:
        a = self.a
        eph, eph_pub = new_ephemeral()
        nonce = secrets.token_bytes(32)
        await call.write(pb.LinkFrame(agent_hello=pb.AgentHello(
            protocol=PROTOCOL, agent_id=a.id, agent_key=public_bytes(self.key), ephemeral=eph_pub, nonce=nonce,
            slots=a.slots, hostname="rogue", software="test")))
        frame = await call.read()
        if not isinstance(frame, pb.LinkFrame) or frame.WhichOneof("kind") != "coordinator_hello":
            if isinstance(frame, pb.LinkFrame) and frame.WhichOneof("kind") == "refusal":
                emit("refused", code=frame.refusal.code, message=frame.refusal.message, sealed=False)
            else:
                emit("refused", code="no_hello", message=str(frame), sealed=False)
            return None
        hello = frame.coordinator_hello
        t = hello_transcript(PROTOCOL, a.id, public_bytes(self.key), eph_pub, nonce, a.slots)
        t.add(hello.coordinator_key, hello.ephemeral, hello.nonce, hello.suite)
        th = t.digest()
        await call.write(pb.LinkFrame(agent_proof=pb.AgentProof(signature=sign(self.key, th, b"agent"),
                                                                join_mac=join_mac(self.token.secret, th))))
        return Link(call, agent_channel(hello.suite, *derive_keys(eph, hello.ephemeral, th)))

    async def heartbeats(self, link: Link) -> None:
        while not self.quiet:
            link.send(pb.ToCoordinator(heartbeat=pb.Heartbeat(slots=self.a.slots, mode="active")))
            await asyncio.sleep(self.a.heartbeat)

    async def receive(self, link: Link) -> str:
        while True:
            frame = await link.call.read()
            if not isinstance(frame, pb.LinkFrame):
                return "closed"
            kind = frame.WhichOneof("kind")
            if kind == "refusal":
                emit("refused", code=frame.refusal.code, message=frame.refusal.message, sealed=False)
                continue
            if kind != "sealed":
                continue
            data = link.chan.open(frame.sealed.counter, frame.sealed.ciphertext, frame.sealed.more)
            if data is None:
                continue
            for piece in split(data):
                self.on_message(link, pb.ToAgent.FromString(piece))

    def on_message(self, link: Link, msg: pb.ToAgent) -> None:
        k = msg.WhichOneof("kind")
        if k == "welcome":
            emit("joined", agent_id=msg.welcome.agent_id, slots=msg.welcome.slots)
        elif k == "refusal":
            emit("refused", code=msg.refusal.code, message=msg.refusal.message, sealed=True)
        elif k == "holdings":
            self.refs = list(msg.holdings.packages)
            for ref in self.refs:
                link.send(pb.ToCoordinator(installed=pb.Installed(ref=ref, ok=True)))
        elif k == "ping" and not self.quiet:
            link.send(pb.ToCoordinator(pong=pb.Pong(seq=msg.ping.seq)))
        elif k == "nested_reply":
            w = self.nested_waiting.pop(msg.nested_id, None)
            if w is not None and not w[2].done():
                w[2].set_result(msg.nested_reply)
        elif k == "job":
            self.jobs += 1
            emit("job", job_id=msg.job.job_id, service=msg.job.service)
            self.on_job(link, msg.job)

    # ------------------------------------------------------------ jobs

    def on_job(self, link: Link, job: pb.Job) -> None:
        mode = self.a.jobs
        if mode == "nested" and self.first_job is None:
            self.first_job = job
            asyncio.get_running_loop().create_task(self.nested_from(link, job))
        elif mode in ("fault", "nested") and not self.quiet:
            self.fault(link, job.job_id)
        # blackhole: accepted, never answered

    @staticmethod
    def fault(link: Link, job_id: str) -> None:
        link.send(pb.ToCoordinator(result=pb.JobResult(
            job_id=job_id, ok=False, agent_fault=True, not_started=True,
            error=pb.Error(code="agent_fault", message="this agent is a rogue (test)"))))

    def nested(self, link: Link, job_id: str, service: str, data: dict[str, Any],
               phase: str) -> asyncio.Future[pb.CallReply]:
        self.nested_ids += 1
        fut: asyncio.Future[pb.CallReply] = asyncio.get_running_loop().create_future()
        self.nested_waiting[self.nested_ids] = (service, phase, fut)
        link.send(pb.ToCoordinator(nested_call=pb.NestedCall(
            nested_id=self.nested_ids, job_id=job_id,
            request=pb.CallRequest(service=service, input=_codec.pack(data), encoding=pb.MSGPACK))))
        self.sent["nested"] = self.sent.get("nested", 0) + 1
        return fut

    async def nested_from(self, link: Link, job: pb.Job) -> None:
        calls = [(s, json.loads(d or "{}")) for s, _, d in (n.partition("=") for n in self.a.nested)]
        futs = [self.nested(link, job.job_id, s, d, "in_flight") for s, d in calls]
        if self.a.end_job_after:  # the parent ends while its nested calls may still run
            services = {id(f): s for s, _, f in self.nested_waiting.values()}
            await asyncio.sleep(self.a.end_job_after)
            self.fault(link, job.job_id)
            emit("parent_ended")
            await self.report(futs, "in_flight", services)
        else:
            await self.report(futs, "in_flight")
            self.fault(link, job.job_id)  # the parent job ends here
            emit("parent_ended")
        if self.a.nested_after_end:
            s, d = calls[0] if calls else ("math.compute", {"a": 1, "b": 1, "op": "add"})
            futs = [self.nested(link, job.job_id, s, d, "after_end") for _ in range(self.a.nested_after_end)]
            await self.report(futs, "after_end")

    async def report(self, futs: list[asyncio.Future[pb.CallReply]], phase: str,
                     services: dict[int, str] | None = None) -> None:
        t0 = time.monotonic()
        services = services or {id(f): s for s, _, f in self.nested_waiting.values()}
        for fut in futs:
            service = services.get(id(fut), "")
            try:
                reply = await asyncio.wait_for(fut, max(0.1, self.end - time.monotonic()))
            except (asyncio.TimeoutError, asyncio.CancelledError):
                emit("nested_reply", service=service, status="none", code="no_reply", phase=phase)
                continue
            emit("nested_reply", service=reply.service or service, status=reply.status, code=reply.error.code,
                 message=reply.error.message, executed_by=reply.executed_by, phase=phase,
                 after_s=round(time.monotonic() - t0, 3))

    # ------------------------------------------------------------ misbehaviour

    async def misbehave(self, link: Link) -> None:
        a = self.a
        await asyncio.sleep(a.settle)
        self.started = time.monotonic()
        if a.park_partial_mib:
            while self.jobs < a.park_after_jobs and time.monotonic() < self.end:
                await asyncio.sleep(0.05)
            self.quiet = True  # no heartbeat, no answer: nothing may come between the pieces
            self.started = time.monotonic()
            piece = secrets.token_bytes(1 << 20)
            for _ in range(a.park_partial_mib):
                link.send((piece, True))
            while not link.outbox.empty() and not link.closed.is_set():
                await asyncio.sleep(0.01)
            emit("parked", mib=a.park_partial_mib, after_s=round(time.monotonic() - self.started, 3))
            return
        if not a.flood:
            return
        make = self.maker(a.flood)
        if a.count:
            for _ in range(a.count):
                link.send(make())
                self.sent[a.flood] = self.sent.get(a.flood, 0) + 1
                await asyncio.sleep(a.interval)
            return
        while time.monotonic() < self.end and not link.closed.is_set():
            link.send(batch([make() for _ in range(a.batch)]))  # one sealed message of `batch` of them
            self.sent[a.flood] = self.sent.get(a.flood, 0) + a.batch
            while link.outbox.qsize() > 2 and not link.closed.is_set():
                await asyncio.sleep(0.001)
            await asyncio.sleep(0)

    def maker(self, kind: str) -> Any:
        n = [0]
        real = self.refs

        def fake_ref() -> pb.PackageRef:
            name = "math.compute\n" + FORGED_LINE if self.a.inject_log else "rogue.pkg"
            return pb.PackageRef(name=name, version="1\n" + FORGED_LINE if self.a.inject_log else "1",
                                 digest=secrets.token_hex(32))

        def make() -> pb.ToCoordinator:
            n[0] += 1
            i = n[0]
            if kind == "heartbeat":
                return pb.ToCoordinator(heartbeat=pb.Heartbeat(slots=self.a.slots, mode="active"))
            if kind == "installed":
                err = ("disk full\n" + FORGED_LINE) if self.a.inject_log else "disk full"
                if real and i % 2 == 0:  # a package it was given, flipping between held and failed
                    return pb.ToCoordinator(installed=pb.Installed(ref=real[i % len(real)], ok=i % 4 == 0,
                                                                   error=err))
                return pb.ToCoordinator(installed=pb.Installed(ref=fake_ref(), ok=i % 3 == 0, error=err))
            if kind == "fetch":
                ref = real[i % len(real)] if real else fake_ref()
                return pb.ToCoordinator(fetch=pb.Fetch(ref=ref))
            if kind == "claims":
                return pb.ToCoordinator(claim=pb.JobClaim(job_id=f"j{10**9 + i}"))
            if kind == "pongs":
                return pb.ToCoordinator(pong=pb.Pong(seq=i))
            if kind == "nested":
                self.nested_ids += 1
                return pb.ToCoordinator(nested_call=pb.NestedCall(
                    nested_id=self.nested_ids, job_id=f"j{10**9 + i}",
                    request=pb.CallRequest(service="math.compute", encoding=pb.MSGPACK,
                                           input=_codec.pack({"a": 1, "b": 2, "op": "add"}))))
            if kind == "bogus-results":
                return pb.ToCoordinator(result=pb.JobResult(job_id=f"j{10**9 + i}", ok=True,
                                                            output=_codec.pack({"result": 3.0}), run_ms=1.0))
            raise ValueError(f"unknown flood kind {kind!r}")
        return make

    # ------------------------------------------------------------ before any handshake

    async def big_hellos(self) -> int:
        a = self.a
        hostname = "h" * (a.big_hello_mib << 20)
        answers: dict[str, int] = {}
        trust = await _tls.resolve_async(a.coordinator, fingerprint=self.token.fingerprint)

        async def one_stream() -> None:
            while time.monotonic() < self.end:
                try:
                    async with trust.aio_channel(a.coordinator, OPTIONS) as ch:
                        call = pbg.AgentLinkStub(ch).Connect()
                        await call.write(pb.LinkFrame(agent_hello=pb.AgentHello(
                            protocol=PROTOCOL, agent_id=f"{a.id}-{secrets.token_hex(3)}",
                            agent_key=secrets.token_bytes(32), ephemeral=secrets.token_bytes(32),
                            nonce=secrets.token_bytes(32), slots=1, hostname=hostname, software="test")))
                        frame = await asyncio.wait_for(call.read(), max(0.1, self.end - time.monotonic() + 10))
                        kind = frame.WhichOneof("kind") if isinstance(frame, pb.LinkFrame) else "closed"
                        what = f"refusal:{frame.refusal.code}" if kind == "refusal" else kind
                        call.cancel()
                except (grpc.RpcError, asyncio.TimeoutError) as exc:
                    what = f"error:{type(exc).__name__}"
                    if isinstance(exc, grpc.RpcError):
                        what += f":{exc.code().name}:{(exc.details() or '')[:80]}"
                answers[what] = answers.get(what, 0) + 1

        await asyncio.gather(*(one_stream() for _ in range(a.connections)))
        emit("hello", answers=answers)
        return 0

    # ------------------------------------------------------------ main

    async def run(self) -> int:
        if self.a.big_hello_mib:
            return await self.big_hellos()
        while True:
            self.started = 0.0
            try:
                how = await asyncio.wait_for(self.session(), max(0.1, self.end - time.monotonic()))
            except asyncio.TimeoutError:
                how = "still open"  # --seconds ran out and the coordinator had not ended the link
            except grpc.RpcError as exc:
                how = f"rpc error: {exc.code().name}: {exc.details()}"
            if self.started:
                emit("closed", how=how, after_s=round(time.monotonic() - self.started, 3))
            else:
                emit("closed", how=how, after_s=-1)
            if not self.a.reconnect or time.monotonic() >= self.end:
                break
            await asyncio.sleep(self.a.reconnect_delay)
        emit("summary", sent=self.sent, jobs=self.jobs)
        return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--coordinator", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--id", required=True)
    p.add_argument("--slots", type=int, default=2)
    p.add_argument("--heartbeat", type=float, default=1.0)
    p.add_argument("--seconds", type=float, default=10.0, help="how long it misbehaves at most")
    p.add_argument("--settle", type=float, default=0.3, help="seconds after joining before it misbehaves")
    p.add_argument("--flood", choices=["heartbeat", "installed", "fetch", "claims", "pongs", "nested",
                                       "bogus-results"], default="")
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--count", type=int, default=0)
    p.add_argument("--interval", type=float, default=0.0)
    p.add_argument("--inject-log", action="store_true")
    p.add_argument("--park-partial-mib", type=int, default=0)
    p.add_argument("--park-after-jobs", type=int, default=0)
    p.add_argument("--big-hello-mib", type=int, default=0)
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--jobs", choices=["blackhole", "fault", "nested"], default="blackhole")
    p.add_argument("--nested", action="append", default=[], metavar="SERVICE=JSON")
    p.add_argument("--nested-after-end", type=int, default=0)
    p.add_argument("--end-job-after", type=float, default=0.0,
                   help="with --jobs nested: answer the parent this many seconds after its nested calls went out")
    p.add_argument("--reconnect", action="store_true")
    p.add_argument("--reconnect-delay", type=float, default=0.0)
    return p


def main() -> int:
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    return asyncio.run(Rogue(parser().parse_args()).run())


if __name__ == "__main__":
    sys.exit(main())
