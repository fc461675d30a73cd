"""An on-path attacker for refusal tests: a gRPC relay between an agent and its coordinator that
cannot read the sealed frames but forges and provokes refusals.

    python refusal_relay.py --listen HOST:PORT --upstream HOST:PORT [--plan forge,tamper,inject]

Each agent connection is relayed frame by frame to the coordinator. The n-th connection gets the
n-th attack of --plan; later ones are relayed untouched:
  forge   instead of the coordinator's hello, a plaintext Refusal(duplicate_agent_id), unsigned
  sign    instead of the coordinator's hello, a Refusal(bad_join_secret) signed by a key of the
          relay's own (not the pinned one)
  tamper  the agent's AgentProof is altered on the way (its join MAC flipped): the coordinator's
          own refusal (bad_join_secret, signed and sealed) is real, but refuses what the agent never sent
  inject  the session is relayed; once the agent has been in for --inject-after seconds, a
          plaintext Refusal(bad_join_secret) is injected towards it
Each attack done is printed as one line: `attack <n> <name>`.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import grpc  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from microcores._secure import public_bytes, sign_refusal  # noqa: E402
from microswarm.protos import microswarm_pb2 as pb  # noqa: E402
from microswarm.protos import microswarm_pb2_grpc as pbg  # noqa: E402


class Relay(pbg.AgentLinkServicer):
    def __init__(self, upstream: str, plan: list[str], inject_after: float) -> None:
        self.upstream = upstream
        self.plan = plan
        self.inject_after = inject_after
        self.n = 0

    async def Connect(self, request_iterator: Any, context: Any) -> None:
        self.n += 1
        n = self.n
        attack = self.plan[n - 1] if n <= len(self.plan) else ""
        async with grpc.aio.insecure_channel(self.upstream) as ch:
            up = pbg.AgentLinkStub(ch).Connect()
            hello_nonce = b""

            def done(what: str) -> None:
                print(f"attack {n} {what}", flush=True)

            async def to_coordinator() -> None:
                nonlocal hello_nonce
                while True:
                    frame = await context.read()
                    if not isinstance(frame, pb.LinkFrame):
                        await up.done_writing()
                        return
                    kind = frame.WhichOneof("kind")
                    if kind == "agent_hello":
                        hello_nonce = frame.agent_hello.nonce
                    if kind == "agent_proof" and attack == "tamper":
                        mac = bytearray(frame.agent_proof.join_mac)
                        mac[0] ^= 0x01
                        frame.agent_proof.join_mac = bytes(mac)
                        done("tamper")
                    await up.write(frame)

            async def to_agent() -> None:
                joined_at = 0.0
                loop = asyncio.get_running_loop()
                injected = False
                while True:
                    if attack == "inject" and joined_at and not injected:
                        try:
                            frame = await asyncio.wait_for(up.read(), max(0.01, joined_at + self.inject_after
                                                                          - loop.time()))
                        except asyncio.TimeoutError:
                            injected = True
                            done("inject")  # first: the agent's answer to it may cancel this handler
                            await context.write(pb.LinkFrame(refusal=pb.Refusal(
                                code="bad_join_secret", message="forged by the relay")))
                            continue
                    else:
                        frame = await up.read()
                    if not isinstance(frame, pb.LinkFrame):
                        return
                    kind = frame.WhichOneof("kind")
                    if kind == "coordinator_hello" and attack == "forge":
                        done("forge")
                        await context.write(pb.LinkFrame(refusal=pb.Refusal(
                            code="duplicate_agent_id", message="forged by the relay")))
                        return
                    if kind == "coordinator_hello" and attack == "sign":
                        key = Ed25519PrivateKey.generate()
                        msg = "forged and signed by the relay"
                        done("sign")
                        await context.write(pb.LinkFrame(refusal=pb.Refusal(
                            code="bad_join_secret", message=msg, coordinator_key=public_bytes(key),
                            signature=sign_refusal(key, hello_nonce, "bad_join_secret", msg))))
                        return
                    if kind == "sealed" and not joined_at:
                        joined_at = loop.time()
                    await context.write(frame)

            tasks = [asyncio.create_task(to_coordinator()), asyncio.create_task(to_agent())]
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in tasks:
                    t.cancel()
                up.cancel()


async def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--listen", required=True)
    p.add_argument("--upstream", required=True)
    p.add_argument("--plan", default="forge,sign,tamper,inject")
    p.add_argument("--inject-after", type=float, default=1.0)
    a = p.parse_args()
    server = grpc.aio.server()
    pbg.add_AgentLinkServicer_to_server(Relay(a.upstream, [x for x in a.plan.split(",") if x], a.inject_after),
                                        server)
    if server.add_insecure_port(a.listen) == 0:
        print(f"cannot listen on {a.listen}", flush=True)
        return 1
    await server.start()
    print(f"relay on {a.listen} to {a.upstream}", flush=True)
    await server.wait_for_termination()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
