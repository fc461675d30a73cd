"""What sending a call on to another coordinator costs, and what Redis Streams would have cost.

`forwarded_p50_ms`: sequential fresh calls at a coordinator with no agent of its own (the "door"),
each sent on to a peer whose agents run it (coordinator/forward.py); `direct_p50_ms`: the same
calls made at that peer (both as `bench`'s p50_ms, bench._latency). Their difference,
`forward_overhead_ms`, is one gRPC round trip between coordinators plus the door's own handling.
The door's count of calls sent on must have grown by every call, or the figure would be of
something else: it raises then.

`redis_stream_hop_p50_ms` is the transport alone of the other design the issue offered: a request
XADDed to a stream, read by a consumer group's XREADGROUP (BLOCK), its reply XADDed to a reply
stream and read with XREAD (BLOCK), with an XACK, measured on the same Redis in the same run with
nothing of a call's work in it; `grpc_hop_p50_ms` is the same for direct gRPC: a bare unary echo
over TLS on the same loopback (bench_floor.py). The two designs share everything else (the door's
handling, the peer's dispatch), so these two figures are the comparison; forward.py's docstring
says what they showed and why calls go over gRPC.
"""
from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from typing import Any


def _forwarded(door: str, state_dir: str) -> int:
    """Calls the door has sent on so far (its own presence record, in its status)."""
    from microcores.client import Client
    with Client(door, state_dir=state_dir) as c:
        return next(int(co.forwarded) for co in c.status(timeout=10).coordinators if co.here)


async def stream_hop_ms(redis_url: str, n: int) -> list[float]:
    """Round trips of an empty request and reply through two Redis streams and a consumer group."""
    import redis.asyncio as aioredis
    key = f"bench:{uuid.uuid4().hex[:8]}"
    req, rep = f"{key}:calls", f"{key}:replies"
    caller: Any = aioredis.from_url(redis_url)  # (redis-py's stubs type replies loosely)
    worker: Any = aioredis.from_url(redis_url)
    await caller.xgroup_create(req, "coordinators", id="$", mkstream=True)
    stop = asyncio.Event()

    async def serve() -> None:
        while not stop.is_set():
            got = await worker.xreadgroup("coordinators", "peer", {req: ">"}, count=16, block=200)
            for _, entries in got or []:
                for entry_id, fields in entries:
                    await worker.xadd(rep, {"id": fields[b"id"], "ok": b"1"})
                    await worker.xack(req, "coordinators", entry_id)
    server = asyncio.create_task(serve())
    lat: list[float] = []
    last: Any = "0-0"  # (a new stream: every reply in it is one of ours)
    try:
        for i in range(-10, n):
            t0 = time.perf_counter()
            await caller.xadd(req, {"id": str(i), "input": b""})
            while True:
                got = await caller.xread({rep: last}, block=5000, count=1)
                if not got:
                    raise RuntimeError("no reply through the Redis stream within 5 s")
                last, fields = got[0][1][0]
                if fields[b"id"] == str(i).encode():
                    break
            if i >= 0:
                lat.append((time.perf_counter() - t0) * 1000)
    finally:
        stop.set()
        await server
        await caller.delete(req, rep)
        await caller.aclose()
        await worker.aclose()
    return lat


def door_ready(door: str, state_dir: str) -> bool:
    """The door sends math.compute on already (it has seen a peer's agents hold it, through Redis):
    an empty input, which the peer refuses without running anything."""
    from microcores.client import Client
    with Client(door, state_dir=state_dir) as c:
        return bool(c.envelope("math.compute", {}, timeout=10).coordinator)


def forward_figures(door: str, peer: str, state_dir: str, redis_url: str, n: int) -> dict[str, Any]:
    from microswarm.bench import _floor, _latency  # (its sequential fresh calls, as `bench`'s p50_ms)
    direct, _ = asyncio.run(_latency(peer, n))
    before = _forwarded(door, state_dir)
    forwarded, by = asyncio.run(_latency(door, n))
    if _forwarded(door, state_dir) - before < n:
        raise RuntimeError(f"{door} answered calls itself instead of sending them on (executed_by {by}): "
                           "has it agents of its own?")
    hop = asyncio.run(stream_hop_ms(redis_url, n))
    grpc_hop = _floor(n, 0.5)["floor_p50_ms"]
    d, f, h = statistics.median(direct), statistics.median(forwarded), statistics.median(hop)
    return {"direct_p50_ms": round(d, 3), "forwarded_p50_ms": round(f, 3), "forward_overhead_ms": round(f - d, 3),
            "redis_stream_hop_p50_ms": round(h, 3), "grpc_hop_p50_ms": grpc_hop}
