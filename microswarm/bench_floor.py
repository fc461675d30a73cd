"""The bare-gRPC floor for `microswarm bench`: the same loopback, the same machine, the same run,
with nothing of microswarm in the path. A grpc.aio server in its own process echoes bytes; the
bench times unary calls to it, one at a time and 64 in flight, so that microswarm's figures can
be quoted as ratios to what gRPC alone costs here. It speaks TLS like the coordinator does by
default (a certificate made the same way, pinned the same way), so the ratio is microswarm's own
cost, not TLS's; with MICROSWARM_INSECURE=1 both are plaintext.

Run as `python -m microswarm.bench_floor PORT` (the bench starts and stops it).
"""
from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

METHOD = "/microswarm.floor.Echo/Echo"
BULK = 10_000_000        # the 10 MB echo, sent as one message (microswarm's mb_s_10m counts the same way)
BULK_ROUNDS = 8
MESSAGE_LIMIT = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


def _echo(request: bytes, context: Any) -> bytes:
    return request


def _tls_dir() -> Path | None:
    """Where the floor's certificate is (made once per run like a coordinator's); None: plaintext."""
    from microcores._tls import insecure_from_env
    return None if insecure_from_env() else Path(os.environ.get("MICROSWARM_FLOOR_TLS") or _make_tls_dir())


def _make_tls_dir() -> str:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from microswarm.coordinator.tls import prepare
    d = tempfile.mkdtemp(prefix="microswarm-floor-")
    prepare(Path(d), Ed25519PrivateKey.generate(), ["127.0.0.1:0"])
    return d


async def _serve(port: int) -> None:
    server = aio.server(options=MESSAGE_LIMIT)
    handler = grpc.method_handlers_generic_handler(
        "microswarm.floor.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(_echo)})
    server.add_generic_rpc_handlers((handler,))
    tls = _tls_dir()
    if tls is not None:
        creds = grpc.ssl_server_credentials([((tls / "tls_key.pem").read_bytes(), (tls / "coordinator.crt").read_bytes())])
        bound = server.add_secure_port(f"127.0.0.1:{port}", creds)
    else:
        bound = server.add_insecure_port(f"127.0.0.1:{port}")
    if bound == 0:
        raise SystemExit(f"bench floor: cannot listen on 127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


def start(port: int) -> tuple[subprocess.Popen[str], Path | None]:
    """The echo server, started and answering, and where its certificate is (None: plaintext)."""
    tls = _tls_dir()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"MICROSWARM_FLOOR_TLS": str(tls)} if tls else {})}
    p = subprocess.Popen([sys.executable, "-m", "microswarm.bench_floor", str(port)], stdout=subprocess.PIPE,
                         text=True, env=env)
    assert p.stdout is not None
    if p.stdout.readline().strip() != "ready":
        p.kill()
        raise RuntimeError("the bare-gRPC echo server did not start")
    return p, tls


async def measure(port: int, n: int, seconds: float, in_flight: int, tls: Path | None = None) -> dict[str, float]:
    """p50 of `n` sequential unary echoes of a small payload, echoes/s with `in_flight` at once, and
    MB/s of 10 MB echoes (payload bytes over the median round trip)."""
    payload = b"x" * 64
    from microcores._tls import Trust, from_state_dir
    trust = (from_state_dir(tls) if tls else None) or Trust(insecure=True)
    async with trust.aio_channel(f"127.0.0.1:{port}", MESSAGE_LIMIT) as channel:
        echo: Any = channel.unary_unary(METHOD)
        for _ in range(100):
            await echo(payload)
        lat = []
        for _ in range(n):
            t0 = time.perf_counter()
            await echo(payload)
            lat.append((time.perf_counter() - t0) * 1000)
        done = 0
        stop = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                await echo(payload)
                done += 1
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        cps = done / (time.perf_counter() - t0)
        bulk = os.urandom(BULK)
        await echo(bulk)
        trips = []
        for _ in range(BULK_ROUNDS):
            t0 = time.perf_counter()
            back = await echo(bulk)
            trips.append(time.perf_counter() - t0)
            assert back == bulk
    return {"floor_p50_ms": round(statistics.median(lat), 3), "floor_calls_per_s": round(cps, 1),
            "floor_mb_s_10m": round(BULK / statistics.median(trips) / 1e6, 1)}


if __name__ == "__main__":
    asyncio.run(_serve(int(sys.argv[1])))
