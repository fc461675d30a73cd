"""A misbehaving agent for fault tests: the real handshake and encrypted link, then bad service.

    python blackhole_agent.py --coordinator HOST:PORT --token TOKEN --id ID [--slots N]
                              [--mode blackhole|fault] [--heartbeat S] [--jobs-log PATH]

It answers every Holdings by claiming each package installed (Installed ok=True, nothing fetched)
and heartbeats every `--heartbeat` seconds, so it looks alive, ready and holding everything.
Jobs:
  blackhole  accepted and never answered (no JobResult, no JobClaim; Cancels ignored)
  fault      answered at once with JobResult(ok=False, agent_fault=True): the agent failed them
Each job received is appended to `--jobs-log` as one line: `<job_id> <service> <confirm_start>`.
It exits when the coordinator closes the link.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from microcores import _tls  # noqa: E402
from microcores._secure import (PROTOCOL, JoinToken, agent_channel, collect, derive_keys,  # noqa: E402
                                hello_transcript, join_mac, new_ephemeral, public_bytes, sign, split)
from microswarm.protos import microswarm_pb2 as pb  # noqa: E402
from microswarm.protos import microswarm_pb2_grpc as pbg  # noqa: E402


def log_job(path: str, job: pb.Job) -> None:
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{job.job_id} {job.service} {int(job.confirm_start)}\n".encode())
    finally:
        os.close(fd)


async def run(a: argparse.Namespace) -> int:
    tok = JoinToken.parse(a.token)
    key = Ed25519PrivateKey.generate()
    eph, eph_pub = new_ephemeral()
    nonce = secrets.token_bytes(32)
    trust = await _tls.resolve_async(a.coordinator, fingerprint=tok.fingerprint)  # pinned as a real agent does
    async with trust.aio_channel(a.coordinator) as ch:
        call = pbg.AgentLinkStub(ch).Connect()
        await call.write(pb.LinkFrame(agent_hello=pb.AgentHello(
            protocol=PROTOCOL, agent_id=a.id, agent_key=public_bytes(key), ephemeral=eph_pub, nonce=nonce,
            slots=a.slots, hostname="blackhole", software="test")))
        frame = await call.read()
        if not isinstance(frame, pb.LinkFrame) or frame.WhichOneof("kind") != "coordinator_hello":
            print(f"handshake failed: {frame}", flush=True)
            return 2
        hello = frame.coordinator_hello
        t = hello_transcript(PROTOCOL, a.id, public_bytes(key), eph_pub, nonce, a.slots)
        t.add(hello.coordinator_key, hello.ephemeral, hello.nonce, hello.suite)
        th = t.digest()
        await call.write(pb.LinkFrame(agent_proof=pb.AgentProof(signature=sign(key, th, b"agent"),
                                                                join_mac=join_mac(tok.secret, th))))
        chan = agent_channel(hello.suite, *derive_keys(eph, hello.ephemeral, th))
        outbox: asyncio.Queue[pb.ToCoordinator | None] = asyncio.Queue()

        async def sender() -> None:
            while True:
                msg = await outbox.get()
                if msg is None:
                    return
                plaintext, stop = collect(msg, outbox)
                for counter, ct, more in chan.seal_iter(plaintext):
                    await call.write(pb.LinkFrame(sealed=pb.Sealed(counter=counter, ciphertext=ct, more=more)))
                if stop:
                    return

        async def heartbeats() -> None:
            while True:
                outbox.put_nowait(pb.ToCoordinator(heartbeat=pb.Heartbeat(slots=a.slots, mode="active")))
                await asyncio.sleep(a.heartbeat)

        tasks = [asyncio.create_task(sender()), asyncio.create_task(heartbeats())]
        jobs = 0
        try:
            while True:
                frame = await call.read()
                if not isinstance(frame, pb.LinkFrame):
                    print("the coordinator closed the link", flush=True)
                    return 0
                kind = frame.WhichOneof("kind")
                if kind == "refusal":
                    print(f"refused: {frame.refusal.code}: {frame.refusal.message}", flush=True)
                    return 2
                if kind != "sealed":
                    continue
                data = chan.open(frame.sealed.counter, frame.sealed.ciphertext, frame.sealed.more)
                if data is None:
                    continue
                for piece in split(data):
                    msg = pb.ToAgent()
                    msg.ParseFromString(piece)
                    k = msg.WhichOneof("kind")
                    if k == "welcome":
                        print(f"agent {a.id} joined {a.coordinator} ({a.mode})", flush=True)
                    elif k == "holdings":
                        for ref in msg.holdings.packages:
                            outbox.put_nowait(pb.ToCoordinator(installed=pb.Installed(ref=ref, ok=True)))
                    elif k == "ping":
                        outbox.put_nowait(pb.ToCoordinator(pong=pb.Pong(seq=msg.ping.seq)))
                    elif k == "job":
                        jobs += 1
                        log_job(a.jobs_log, msg.job)
                        if a.mode == "fault":
                            outbox.put_nowait(pb.ToCoordinator(result=pb.JobResult(
                                job_id=msg.job.job_id, ok=False, agent_fault=True, not_started=True,
                                error=pb.Error(code="agent_fault", message="this agent is broken (test)"))))
                        # blackhole: accepted, never claimed, never answered
        finally:
            for task in tasks:
                task.cancel()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--coordinator", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--id", required=True)
    p.add_argument("--slots", type=int, default=2)
    p.add_argument("--mode", choices=["blackhole", "fault"], default="blackhole")
    p.add_argument("--heartbeat", type=float, default=1.0)
    p.add_argument("--jobs-log", default="")
    return asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
