"""`microswarm bench --coordinators N`: N coordinators of one cluster on this machine, sharing one
PostgreSQL (`--state-url`) and one Redis (`--cache-url`) that the bench starts on free ports.

Each coordinator has its own state directory holding a copy of the first one's identity
(LocalCluster.peer), so one join token and one pin serve all; two agents and the clients are
given every address. Phases: p50_ms (sequential fresh calls), calls_per_s (64 in flight, fresh
inputs), shared_cache_hit_p50_ms (results computed behind the first coordinator, asked of the
second: served from Redis, not a near cache; bench_shared.py), forwarded_p50_ms against
direct_p50_ms and redis_stream_hop_p50_ms (a further coordinator with no agent sends calls on to one
whose agents run them; bench_forward.py), and failover_s: under 8 streams of
calls the first coordinator is SIGKILLed; the time until every agent is attached to another and
calls are answered again, with the calls lost (0 expected: the service is idempotent). The victim
is the coordinator with the most agents and the clients' first address, so both must move.
The last line is one JSON object.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import tempfile
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from microswarm.bench import _latency, _throughput
from microswarm.cluster import LocalCluster, wait_for

ARGS = ["--verify", "off"]


def _agents_on(c: LocalCluster) -> set[str]:
    from microcores.client import Client
    from microcores.errors import MicroError
    try:
        with Client(c.addr, state_dir=str(c.state)) as cl:
            return {a.agent_id for a in cl.status(timeout=3).agents if a.state == "ready" and a.versions}
    except MicroError:
        return set()


async def _failover(everyone: str, state_dir: str, victim: LocalCluster, others: list[LocalCluster],
                    agents: set[str]) -> dict[str, Any]:
    from microcores.client import AsyncClient
    answered: list[float] = []
    lost = 0
    stop = asyncio.Event()
    async with AsyncClient(everyone, client_name="bench", state_dir=state_dir) as ac:
        async def caller(k: int) -> None:
            nonlocal lost
            i = 0
            while not stop.is_set():
                i += 1
                env = await ac.envelope("math.compute", {"a": float(k), "b": float(i), "op": "add"}, timeout=30)
                if env.ok and env.result == {"result": float(k + i)}:
                    answered.append(time.monotonic())
                else:
                    lost += 1
        tasks = [asyncio.create_task(caller(k * 1_000_000)) for k in range(8)]
        await asyncio.sleep(2.0)
        on_victim = len(_agents_on(victim))
        t0 = time.monotonic()
        os.killpg(victim.coordinator.pid, signal.SIGKILL)  # type: ignore[union-attr]

        def moved() -> bool:
            return agents <= set().union(*(_agents_on(o) for o in others)) and any(t > t0 for t in answered)
        await asyncio.to_thread(wait_for, moved, 60, "every agent attached elsewhere and calls answered", 0.05)
        failover_s = time.monotonic() - t0
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*tasks)
    return {"failover_s": round(failover_s, 2), "failover_calls_lost": lost,
            "failover_calls_answered": len(answered), "moved": on_victim}


def measure(n: int, quick: bool = False) -> dict[str, Any]:
    from microswarm.bench_forward import door_ready, forward_figures
    from microswarm.bench_shared import shared_cache_figures
    from microswarm.pgserver import PgServer
    from microswarm.redisserver import RedisServer

    if n < 2:
        raise ValueError("--coordinators N: N must be 2 or more")
    with PgServer() as pg, RedisServer() as redis:
        args = [*ARGS, "--cache-url", redis.url]
        first = LocalCluster(agents=0, workdir=tempfile.mkdtemp(prefix="microswarm-c1-"), coordinator_args=args,
                             state_url=pg.url)
        peers: list[LocalCluster] = []
        try:
            first.start_coordinator()
            for i in range(2, n + 1):
                p = first.peer(workdir=tempfile.mkdtemp(prefix=f"microswarm-c{i}-"))
                p.start_coordinator()
                peers.append(p)
            everyone = ",".join(c.addr for c in [first, *peers])
            first.addr = everyone  # agents are given every address (each starts at a random one)
            for aid in ("agent1", "agent2"):
                first.start_agent(aid)
            first.addr = everyone.split(",")[0]
            wait_for(lambda: set().union(*(_agents_on(c) for c in [first, *peers])) == {"agent1", "agent2"},
                     90, "both agents ready on the coordinators")
            state = str(first.state)
            import microswarm.bench as bench
            bench._STATE_DIR = state
            lat, _ = asyncio.run(_latency(everyone, 100 if quick else 300))
            cps, by = asyncio.run(_throughput(everyone, 3.0 if quick else 8.0, 64, state_dir=state))
            # Computed where agents are (elsewhere the call would be sent on there, and its result
            # land in that coordinator's near cache), asked of another.
            home = max([first, *peers], key=lambda c: len(_agents_on(c)))
            away = next(c for c in [first, *peers] if c is not home)
            shared = shared_cache_figures(home.addr, away.addr, 50 if quick else 200,
                                          a_kwargs={"state_dir": state}, b_kwargs={"state_dir": state})
            door = first.peer(workdir=tempfile.mkdtemp(prefix="microswarm-door-"))  # no agent is given it
            peers.append(door)
            door.start_coordinator()
            wait_for(lambda: door_ready(door.addr, state), 30, "the agentless coordinator to send calls on")
            fwd = forward_figures(door.addr, home.addr, state, redis.url, 100 if quick else 300)
            door.stop()
            peers.remove(door)
            # The victim: the coordinator with the most agents, the clients' first address too (so
            # agents and clients must both move).
            members = [first, *peers]
            victim = max(members, key=lambda c: len(_agents_on(c)))
            others = [c for c in members if c is not victim]
            order = ",".join(c.addr for c in [victim, *others])
            fo = asyncio.run(_failover(order, state, victim, others, {"agent1", "agent2"}))
            fo["failover_agents_moved"] = fo.pop("moved")
            return {"coordinators": n, "p50_ms": round(statistics.median(lat), 3),
                    "p99_ms": round(sorted(lat)[int(0.99 * (len(lat) - 1))], 3), "calls_per_s": round(cps, 1),
                    "executed_by": by, **shared, **fwd, **fo}
        finally:
            for c in [*peers, first]:
                c.stop()


def run_coordinators_bench(n: int, quick: bool = False, out_path: str | None = None) -> int:
    console = Console(stderr=True)
    with console.status(f"{n} coordinators on one PostgreSQL and one Redis: measuring..."):
        result = measure(n, quick)
    t = Table(title=f"microswarm bench --coordinators {n} (this machine)")
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_row("trivial call p50 / p99 (any coordinator)", f"{result['p50_ms']:.2f} / {result['p99_ms']:.2f} ms")
    t.add_row("calls/s, 64 in flight", f"{result['calls_per_s']:.0f}")
    t.add_row("hit served from Redis (not the near cache), p50", f"{result['shared_cache_hit_p50_ms']:.2f} ms")
    t.add_row("near-cache hit, p50", f"{result['near_hit_p50_ms']:.2f} ms")
    t.add_row("call at a coordinator without agents, sent on to one whose agents run it, p50",
              f"{result['forwarded_p50_ms']:.2f} ms (direct {result['direct_p50_ms']:.2f} ms: "
              f"+{result['forward_overhead_ms']:.2f} ms)")
    t.add_row("a Redis Streams request/reply hop alone (the design not taken), p50",
              f"{result['redis_stream_hop_p50_ms']:.2f} ms")
    t.add_row(f"failover: a coordinator SIGKILLed under load ({result['failover_agents_moved']} agent(s) and the "
              "clients on it moved)", f"{result['failover_s']:.2f} s")
    t.add_row("calls lost in the failover (idempotent service)", str(result["failover_calls_lost"]))
    console.print(t)
    line = json.dumps(result)
    if out_path:
        with open(out_path, "w") as f:
            f.write(line + "\n")
    print(line)
    return 0 if result["failover_calls_lost"] == 0 else 1
