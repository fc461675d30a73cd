"""Simulated agents: thousands of real agent links from a few processes, to measure a coordinator.

Each simulated agent does what a real one does on the wire and nothing else: the pinned TLS
connection, the signed hello with its join MAC, the X25519 key agreement, every frame sealed,
heartbeats at the pace the coordinator sets (Welcome, then Ping.heartbeat_s), every package in
its holdings answered as installed, and every job answered at once with its own input as output
(claimed first when the job asks for a go). It runs no code: what it measures is the coordinator.

    python -m microswarm.simagents --coordinator HOST:PORT --token TOKEN --count N [--prefix sim0-]

prints `ready K` lines as its agents get their Welcome and runs until killed. `Fleet` starts
several such processes (agents spread over them) for `microswarm bench --simulated-agents` and
for tests.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from microcores import _tls
from microcores._secure import (PROTOCOL, JoinToken, agent_channel, collect, derive_keys, hello_transcript, join_mac,
                                new_ephemeral, public_bytes, sealed_frame, sign, split)
from microswarm.protos import microswarm_pb2 as pb
from microswarm.protos import microswarm_pb2_grpc as pbg

AGENTS_PER_CHANNEL = 100   # HTTP/2 streams on one TLS connection
AGENTS_PER_PROCESS = 2500  # one process's event loop comfortably seals this many heartbeats
JOIN_AT_ONCE = 8           # handshakes one process has under way at once


class SimAgent:
    """One agent link. `ready` is set once its Welcome arrives."""

    def __init__(self, agent_id: str, token: JoinToken, slots: int) -> None:
        self.agent_id, self.token, self.slots = agent_id, token, slots
        self.key = Ed25519PrivateKey.generate()
        self.heartbeat_s = 1.0
        self.ready = asyncio.Event()
        self.jobs = 0

    async def run(self, channel: Any, joining: asyncio.Semaphore) -> str:
        """Join and serve until the link ends; returns why it ended."""
        async with joining:  # the stream opens here: the coordinator counts open handshakes, not joined links
            call = pbg.AgentLinkStub(channel).Connect()
            chan = await self._handshake(call)
            if isinstance(chan, str):
                call.cancel()
                return chan
        outbox: asyncio.Queue[pb.ToCoordinator | None] = asyncio.Queue()
        tasks = [asyncio.create_task(self._sender(call, chan, outbox)),
                 asyncio.create_task(self._heartbeats(outbox))]
        claims: dict[str, pb.Job] = {}
        try:
            while True:
                frame = await call.read()
                if not isinstance(frame, pb.LinkFrame):
                    return "the coordinator closed the link"
                if frame.WhichOneof("kind") == "refusal":
                    return f"refused: {frame.refusal.code}: {frame.refusal.message}"
                if frame.WhichOneof("kind") != "sealed":
                    continue
                data = chan.open(frame.sealed.counter, frame.sealed.ciphertext, frame.sealed.more)
                if data is None:
                    continue
                for piece in split(data):
                    msg = pb.ToAgent()
                    msg.ParseFromString(piece)  # type: ignore[arg-type]  # any buffer parses; the stubs say bytes
                    self._on(msg, outbox, claims)
        finally:
            for t in tasks:
                t.cancel()
            call.cancel()

    def _on(self, msg: pb.ToAgent, outbox: asyncio.Queue[pb.ToCoordinator | None], claims: dict[str, pb.Job]) -> None:
        kind = msg.WhichOneof("kind")
        if kind == "job":
            self.jobs += 1
            if msg.job.confirm_start:
                claims[msg.job.job_id] = msg.job
                outbox.put_nowait(pb.ToCoordinator(claim=pb.JobClaim(job_id=msg.job.job_id)))
            else:
                outbox.put_nowait(self._answer(msg.job))
        elif kind == "start":
            job = claims.pop(msg.start.job_id, None)
            if job is not None and msg.start.go:
                outbox.put_nowait(self._answer(job))
        elif kind == "welcome":
            self.heartbeat_s = msg.welcome.heartbeat_s or 1.0
            self.ready.set()
        elif kind == "holdings":
            for ref in msg.holdings.packages:
                outbox.put_nowait(pb.ToCoordinator(installed=pb.Installed(ref=ref, ok=True)))
        elif kind == "ping":
            if msg.ping.heartbeat_s > 0:
                self.heartbeat_s = msg.ping.heartbeat_s
            outbox.put_nowait(pb.ToCoordinator(pong=pb.Pong(seq=msg.ping.seq)))
            outbox.put_nowait(self._heartbeat())

    @staticmethod
    def _answer(job: pb.Job) -> pb.ToCoordinator:
        return pb.ToCoordinator(result=pb.JobResult(job_id=job.job_id, ok=True, output=job.input, run_ms=0.01))

    def _heartbeat(self) -> pb.ToCoordinator:
        return pb.ToCoordinator(heartbeat=pb.Heartbeat(slots=self.slots, mode="active", sandbox="simulated"))

    async def _handshake(self, call: Any) -> Any:
        eph, eph_pub = new_ephemeral()
        nonce = secrets.token_bytes(32)
        mine = public_bytes(self.key)
        await call.write(pb.LinkFrame(agent_hello=pb.AgentHello(
            protocol=PROTOCOL, agent_id=self.agent_id, agent_key=mine, ephemeral=eph_pub, nonce=nonce,
            slots=self.slots, hostname="simulated", software="simagents")))
        frame = await call.read()
        if not isinstance(frame, pb.LinkFrame) or frame.WhichOneof("kind") != "coordinator_hello":
            return f"handshake refused: {frame.refusal.code if isinstance(frame, pb.LinkFrame) else 'closed'}"
        hello = frame.coordinator_hello
        t = hello_transcript(PROTOCOL, self.agent_id, mine, eph_pub, nonce, self.slots)
        t.add(hello.coordinator_key, hello.ephemeral, hello.nonce, hello.suite)
        th = t.digest()
        await call.write(pb.LinkFrame(agent_proof=pb.AgentProof(signature=sign(self.key, th, b"agent"),
                                                                join_mac=join_mac(self.token.secret, th))))
        return agent_channel(hello.suite, *derive_keys(eph, hello.ephemeral, th))

    async def _sender(self, call: Any, chan: Any, outbox: asyncio.Queue[pb.ToCoordinator | None]) -> None:
        while True:
            msg = await outbox.get()
            if msg is None:
                return
            plaintext, stop = collect(msg, outbox)  # what is queued goes in one sealed write
            for counter, ct, more in chan.seal_iter(plaintext):
                await call.write(sealed_frame(counter, ct, more))
            if stop:
                return

    async def _heartbeats(self, outbox: asyncio.Queue[pb.ToCoordinator | None]) -> None:
        await self.ready.wait()
        await asyncio.sleep(self.heartbeat_s * (0.1 + 0.9 * secrets.randbelow(1000) / 1000))  # spread out
        while True:
            outbox.put_nowait(self._heartbeat())
            await asyncio.sleep(self.heartbeat_s)


async def run_agents(coordinator: str, token_text: str, count: int, prefix: str, slots: int = 4) -> None:
    """`count` agents over channels of AGENTS_PER_CHANNEL; reports `ready K` on stdout as they join,
    and rejoins an agent whose link ended (after a pause), as a real agent would."""
    token = JoinToken.parse(token_text)
    trust = await _tls.resolve_async(coordinator, fingerprint=token.fingerprint)
    joining = asyncio.Semaphore(JOIN_AT_ONCE)
    channels = [trust.aio_channel(coordinator) for _ in range(0, count, AGENTS_PER_CHANNEL)]
    agents = [SimAgent(f"{prefix}{i}", token, slots) for i in range(count)]
    ready = 0

    async def report() -> None:
        nonlocal ready
        while True:
            n = sum(a.ready.is_set() for a in agents)
            if n != ready:
                ready = n
                print(f"ready {n}", flush=True)
            await asyncio.sleep(0.2)

    async def keep(i: int, a: SimAgent) -> None:
        while True:
            try:
                why = await a.run(channels[i // AGENTS_PER_CHANNEL], joining)
            except grpc.RpcError as exc:
                why = f"link failed: {exc.code().name if hasattr(exc, 'code') else exc}"
            except (ConnectionError, OSError) as exc:
                why = f"link failed: {exc}"
            a.ready.clear()
            print(f"agent {a.agent_id}: {why}", file=sys.stderr, flush=True)
            await asyncio.sleep(1.0 + secrets.randbelow(1000) / 1000)

    reporter = asyncio.create_task(report())
    try:
        await asyncio.gather(*(keep(i, a) for i, a in enumerate(agents)))
    finally:
        reporter.cancel()


def volunteer_tokens(state_dir: str, processes: int, per_process: int, env: dict[str, str] | None = None) -> list[str]:
    """One named join token per simulated-agent process (`sim0`, `sim1`, ...), each allowing its
    share of agents: the shared token binds at most 4,096 agent ids, and a real fleet of thousands
    would come as many volunteers anyway."""
    tokens = []
    for i in range(processes):
        r = subprocess.run([sys.executable, "-m", "microswarm.cli", "coordinator", "token", "--state-dir", state_dir,
                            "--name", f"sim{i}", "--max-agents", str(per_process)],
                           capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})})
        if r.returncode != 0:
            raise RuntimeError(f"could not mint a join token for the simulated agents: {r.stderr.strip()}")
        tokens.append(r.stdout.strip().splitlines()[-1].strip())
    return tokens


def processes_for(count: int) -> int:
    return max(1, -(-count // AGENTS_PER_PROCESS))


class Fleet:
    """N simulated agents in processes_for(N) processes (`tokens`: one join token for all, or one per
    process); `wait_ready` counts them in."""

    def __init__(self, coordinator: str, tokens: str | list[str], count: int, env: dict[str, str] | None = None,
                 slots: int = 4, log: str = os.devnull) -> None:
        self.count = count
        self._log = open(log, "ab")
        n = processes_for(count)
        if isinstance(tokens, str):
            tokens = [tokens] * n
        shares = [count // n + (1 if i < count % n else 0) for i in range(n)]
        self.procs = [subprocess.Popen(
            [sys.executable, "-m", "microswarm.simagents", "--coordinator", coordinator, "--count", str(k),
             "--prefix", f"sim{i}-", "--slots", str(slots)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log, text=True,
            env={**os.environ, **(env or {}), "MICROSWARM_SIM_TOKEN": tokens[i]}, start_new_session=True)
            for i, k in enumerate(shares)]
        self.ready = [0] * n

    def poll(self) -> int:
        """Ready agents as the processes last said (non-blocking reads of their `ready K` lines)."""
        import select
        for i, p in enumerate(self.procs):
            assert p.stdout is not None
            while select.select([p.stdout], [], [], 0)[0]:
                line = p.stdout.readline()
                if not line:
                    break
                if line.startswith("ready "):
                    self.ready[i] = int(line.split()[1])
        return sum(self.ready)

    def wait_ready(self, timeout: float, on_progress: Any = None) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            n = self.poll()
            if on_progress is not None:
                on_progress(n)
            if n >= self.count:
                return n
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError("a simulated-agent process exited")
            time.sleep(0.2)
        return self.poll()

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            p.wait(10)
        self._log.close()

    def __enter__(self) -> "Fleet":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m microswarm.simagents", description=__doc__.split("\n\n")[0])
    p.add_argument("--coordinator", required=True, help="HOST:PORT of the coordinator")
    p.add_argument("--token", default=os.environ.get("MICROSWARM_SIM_TOKEN", ""),
                   help="join token (default: $MICROSWARM_SIM_TOKEN, kept out of the process list)")
    p.add_argument("--count", type=int, required=True, help="agents in this process")
    p.add_argument("--prefix", default="sim-", help="agent ids are PREFIX0, PREFIX1, ...")
    p.add_argument("--slots", type=int, default=4, help="slots each agent offers")
    a = p.parse_args(argv)
    if not a.token:
        p.error("a join token is needed: --token or MICROSWARM_SIM_TOKEN")
    try:
        asyncio.run(run_agents(a.coordinator, a.token, a.count, a.prefix, a.slots))
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
