"""`microswarm bench`: latency, throughput and payload figures through the real client path.

Starts its own coordinator and two agents on loopback (or measures `--coordinator`), prints a
table, and as its last line one JSON object: p50_ms, p99_ms, calls_per_s, mb_s_100k, mb_s_10m,
and for the HTTP gateway gateway_overhead_p50_ms, gateway_overhead_p99_ms (an HTTP call minus the
same call over gRPC, interleaved) and http_calls_per_s (its own cluster's gateway, or the one at
MICROSWARM_GATEWAY_URL when measuring `--coordinator`), observability_overhead_pct: the share
of calls/s lost while /metrics is scraped and the dashboard's feed polled once a second, and
offload_pct: the percentage of the throughput phase's calls that agents executed (neither the
coordinator nor the cache). verify_cost_pct: the share of calls/s that result verification costs
at the default (--verify adaptive, the agents trusted by then, 5% spot checks) against
--verify off: two fresh clusters alike but for that flag, in interleaved bursts
(calls_per_s_verify_adaptive, _off); null with `--coordinator`.
The bare-gRPC floor of the same run (bench_floor.py): floor_p50_ms and floor_calls_per_s (unary
echoes, one at a time and 64 in flight), floor_mb_s_10m (10 MB unary echoes, one message each), and
p50_vs_floor, calls_per_s_vs_floor, mb_s_10m_vs_floor: microswarm's figures as ratios to them.
With its own cluster, coordinator_rss_peak_mib_50m and coordinator_rss_before_mib_50m: the
coordinator's RSS during one 50 MB echo and just before it (bench_memory.py).
With its own cluster, route_overhead_p50_ms and route_overhead_p99_ms: a call through a route minus
the same request sent straight to its source, interleaved, 200 each (bench_routes.py); null with
`--coordinator`.
`--simulated-agents N` measures something else: one coordinator under N simulated agents
(bench_fleet.py).
Latency uses math.compute with a fresh input each call, so no answer comes from the cache.
MB/s counts payload bytes per second of echo round trips (each trip carries them both ways).

With its own cluster it also starts a second one (two agents, two slots each), publishes
bench.tick (microswarm/bench_services.py: a pure 10 ms sleep, not cached), warms it up, freezes one
agent with SIGSTOP and makes sequential calls (200; 60 with `--quick`) with a 15 s deadline each:
frozen_agent_p50_ms, frozen_agent_p99_ms, frozen_agent_max_ms (call latency; p99 is the nearest
rank, so it does not show one or two stalled calls: the max does) and frozen_agent_errors (calls
not ok or raising). With `--coordinator` these four are null.
A phase that fails raises PhaseFailed (a RuntimeError) naming the phase.
"""
from __future__ import annotations

import asyncio
import json
import os
import platform
import random
import signal
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .cluster import LocalCluster

if TYPE_CHECKING:
    from microcores.client import Client

console = Console(stderr=True)
_STATE_DIR: str | None = None  # where the clients find the operator's credential (None: the default)


FROZEN_CALLS = 200         # sequential calls with one agent frozen
FROZEN_CALLS_QUICK = 60    # the same with --quick
FROZEN_WARM_UP = 20        # calls before the freeze, so that the scheduler knows the service's times
FROZEN_TICK_MS = 10.0      # what each of those calls sleeps on its agent
FROZEN_DEADLINE_S = 15.0   # each call's deadline
FROZEN_AGENT = "agent1"    # the agent stopped with SIGSTOP
FROZEN_KEYS = ("frozen_agent_p50_ms", "frozen_agent_p99_ms", "frozen_agent_max_ms", "frozen_agent_errors")


class PhaseFailed(RuntimeError):
    """A bench phase failed; the message names the phase."""


@contextmanager
def _phase(name: str) -> Iterator[None]:
    """Turn any failure inside into PhaseFailed naming `name` (an inner phase's name is kept)."""
    try:
        yield
    except PhaseFailed:
        raise
    except Exception as exc:
        raise PhaseFailed(f"bench phase '{name}' failed: {type(exc).__name__}: {exc}") from exc


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def _offload_pct(executed_by: dict[str, int]) -> float:
    """The percentage of calls that agents executed: neither the coordinator nor the cache."""
    total = sum(executed_by.values())
    remote = sum(v for k, v in executed_by.items() if k not in ("coordinator", "cache"))
    return round(100 * remote / total, 1) if total else 0.0


async def _latency(addr: str, n: int) -> tuple[list[float], dict[str, int]]:
    from microcores.client import AsyncClient
    by: dict[str, int] = {}
    lat: list[float] = []
    base = random.random() * 1e9  # fresh inputs on every run: nothing comes from the cache
    async with AsyncClient(addr, client_name="bench", state_dir=_STATE_DIR) as c:
        for i in range(n):
            t0 = time.perf_counter()
            env = await c.envelope("math.compute", {"a": base + i, "b": 1.0, "op": "add"})
            lat.append((time.perf_counter() - t0) * 1000)
            if not env.ok:
                raise RuntimeError(f"latency call failed: {env.error}")
            by[env.executed_by] = by.get(env.executed_by, 0) + 1
    return lat, by


async def _throughput(addr: str, seconds: float, in_flight: int, state_dir: str | None = None,
                      service: str = "math.compute",
                      make: Callable[[int], dict[str, Any]] | None = None) -> tuple[float, dict[str, int]]:
    """Calls/s with `in_flight` at once for `seconds`, and who ran them. Inputs come from `make(i)`;
    by default fresh math.compute inputs, so that none is answered from the cache."""
    from microcores.client import AsyncClient
    by: dict[str, int] = {}
    done = 0
    stop = time.perf_counter() + seconds
    base = random.random() * 1e9
    counter = iter(range(10**15))
    if make is None:
        def make(i: int) -> dict[str, Any]:
            return {"a": base + i, "b": 2.0, "op": "mul"}

    async with AsyncClient(addr, client_name="bench", state_dir=state_dir or _STATE_DIR) as c:
        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                env = await c.envelope(service, make(next(counter)))
                if not env.ok:
                    raise RuntimeError(f"throughput call failed: {env.error}")
                by[env.executed_by] = by.get(env.executed_by, 0) + 1
                done += 1
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        elapsed = time.perf_counter() - t0
    return done / elapsed, by


async def _payload(addr: str, size: int, rounds: int) -> tuple[float, list[float]]:
    from microcores.client import AsyncClient
    data = os.urandom(size)
    times = []
    async with AsyncClient(addr, client_name="bench", state_dir=_STATE_DIR) as c:
        for _ in range(rounds):
            t0 = time.perf_counter()
            env = await c.envelope("demo.echo_bytes", {"data": data}, timeout=60)
            times.append(time.perf_counter() - t0)
            if not env.ok or env.result["data"] != data:
                raise RuntimeError(f"echo of {size} bytes failed: {env.error}")
    med = statistics.median(times)
    return size / med / 1e6, times


def _gateway_ssl() -> Any:
    """HTTPS to the gateway trusting the coordinator's certificate, as clients of its state dir do."""
    from microcores import _tls
    from microcores.client import default_state_dir
    trust = _tls.from_state_dir(_STATE_DIR or default_state_dir())
    ctx = trust.ssl_context() if trust is not None else None
    return ctx if ctx is not None else True  # True: aiohttp's default verification


async def _gateway(addr: str, http_url: str, n: int, seconds: float, in_flight: int) -> dict[str, Any]:
    """The same trivial call over HTTP (keep-alive) and over gRPC (unary Call), interleaved so that
    both see the same machine; then HTTP calls per second with `in_flight` connections."""
    import aiohttp

    from microcores.client import AsyncClient
    base = random.random() * 1e9
    http_ms: list[float] = []
    grpc_ms: list[float] = []
    async with AsyncClient(addr, client_name="bench", state_dir=_STATE_DIR, multiplex=False) as c:
        headers = {"Authorization": f"Bearer {await c.token()}", "Content-Type": "application/json"}
        url = http_url + "/v1/math/compute"
        conn = aiohttp.TCPConnector(limit=in_flight, force_close=False, ssl=_gateway_ssl())
        async with aiohttp.ClientSession(connector=conn, headers=headers) as http:
            async def over_http(i: float) -> None:
                async with http.post(url, data=json.dumps({"a": base + i, "b": 1.0, "op": "add"})) as r:
                    body = await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"HTTP gateway call failed: {r.status} {body[:200]!r}")

            async def over_grpc(i: float) -> None:
                env = await c.envelope("math.compute", {"a": base + i, "b": 1.0, "op": "add"})
                if not env.ok:
                    raise RuntimeError(f"gRPC call failed: {env.error}")

            for i in range(100):  # warm up both paths
                await over_http(-i - 1)
                await over_grpc(-i - 1e6)
            for i in range(n):
                for fn, out, x in ((over_http, http_ms, 2 * i), (over_grpc, grpc_ms, 2 * i + 1)):
                    t0 = time.perf_counter()
                    await fn(x + 0.5)
                    out.append((time.perf_counter() - t0) * 1000)
            done = 0
            counter = iter(range(10**9, 10**15))
            stop = time.perf_counter() + seconds

            async def worker() -> None:
                nonlocal done
                while time.perf_counter() < stop:
                    await over_http(next(counter))
                    done += 1
            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(in_flight)))
            cps = done / (time.perf_counter() - t0)
    return {"gateway_overhead_p50_ms": round(statistics.median(http_ms) - statistics.median(grpc_ms), 3),
            "gateway_overhead_p99_ms": round(_pct(http_ms, 99) - _pct(grpc_ms, 99), 3),
            "http_p50_ms": round(statistics.median(http_ms), 3), "http_p99_ms": round(_pct(http_ms, 99), 3),
            "grpc_unary_p50_ms": round(statistics.median(grpc_ms), 3),
            "grpc_unary_p99_ms": round(_pct(grpc_ms, 99), 3),
            "http_calls_per_s": round(cps, 1)}


async def _observability(addr: str, http_url: str, rounds: int, seconds: float) -> dict[str, Any]:
    """Calls/s with /metrics scraped and the dashboard's feed polled every second, against calls/s
    without them, in interleaved rounds so the machine's drift hits both alike."""
    import base64

    import aiohttp

    headers = {}
    if _STATE_DIR:
        admin = open(os.path.join(_STATE_DIR, "admin.token")).read().strip()
        headers["Authorization"] = "Basic " + base64.b64encode(f"operator:{admin}".encode()).decode()
    plain: list[float] = []
    observed: list[float] = []
    scrapes = 0
    async with aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(ssl=_gateway_ssl())) as http:
        async def observer(stop: asyncio.Event) -> None:
            nonlocal scrapes
            while not stop.is_set():
                for path in ("/metrics", "/dashboard/data"):
                    async with http.get(http_url + path) as r:
                        await r.read()
                        scrapes += r.status == 200
                try:
                    await asyncio.wait_for(stop.wait(), 1.0)
                except asyncio.TimeoutError:
                    pass
        for _ in range(rounds):
            plain.append((await _throughput(addr, seconds, 64))[0])
            stop = asyncio.Event()
            task = asyncio.create_task(observer(stop))
            observed.append((await _throughput(addr, seconds, 64))[0])
            stop.set()
            await task
    base, obs = statistics.median(plain), statistics.median(observed)
    return {"observability_overhead_pct": round(100 * (base - obs) / base, 1),
            "calls_per_s_observed": round(obs, 1), "observability_scrapes": scrapes}


async def _measure(addr: str, n_lat: int, tp_s: float, quick: bool, http_url: str | None = None) -> tuple[Any, ...]:
    """Every phase in one event loop: grpc.aio channels must not outlive their loop."""
    with _phase("warm-up"):
        await _latency(addr, 50)  # workers started, connections open
    with _phase("latency"):
        lat, lat_by = await _latency(addr, n_lat)
    with _phase("throughput warm-up"):
        await _throughput(addr, 1.0, 64)
    with _phase("throughput"):
        cps, tp_by = await _throughput(addr, tp_s, 64)
    with _phase("payload 100 KB"):
        mb100k, _ = await _payload(addr, 100_000, 50 if quick else 200)
    with _phase("payload 10 MB"):
        mb10m, _ = await _payload(addr, 10_000_000, 5 if quick else 15)
    gw: dict[str, Any] = {}
    if http_url:
        with _phase("HTTP gateway"):
            gw = await _gateway(addr, http_url, n_lat // 2, tp_s / 2, 64)
        with _phase("observability overhead"):
            gw.update(await _observability(addr, http_url, 2 if quick else 4, 2.0))
    return lat, lat_by, cps, tp_by, mb100k, mb10m, gw


def _publish_tick(cluster: LocalCluster) -> None:
    """Publish bench.tick to `cluster` and wait until every agent holds it."""
    from microcores.client import publish
    publish(str(Path(__file__).with_name("bench_services.py")), coordinator=cluster.addr,
            state_dir=str(cluster.state))
    cluster.wait_agents_ready()


@contextmanager
def _frozen(cluster: LocalCluster, agent_id: str) -> Iterator[None]:
    """`agent_id` (its whole process group) stopped with SIGSTOP inside, continued on the way out."""
    cluster.kill_agent(agent_id, signal.SIGSTOP)
    try:
        yield
    finally:
        cluster.kill_agent(agent_id, signal.SIGCONT)


def _warm_up_tick(client: Client, n: int) -> None:
    """`n` bench.tick calls that must all succeed, so that the scheduler has seen its run times."""
    for _ in range(n):
        env = client.envelope("bench.tick", {"ms": FROZEN_TICK_MS}, timeout=FROZEN_DEADLINE_S)
        if not env.ok:
            raise RuntimeError(f"bench.tick call failed with every agent up: {env.error}")


def _tick_calls(client: Client, n: int) -> tuple[list[float], int]:
    """`n` sequential bench.tick calls: each one's latency in ms, and how many failed (not ok or raised)."""
    lat: list[float] = []
    errors = 0
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[errors]} failed"))
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(f"{FROZEN_TICK_MS:.0f} ms calls, {FROZEN_AGENT} frozen", total=n, errors=0)
        for _ in range(n):
            t0 = time.perf_counter()
            try:
                ok = client.envelope("bench.tick", {"ms": FROZEN_TICK_MS}, timeout=FROZEN_DEADLINE_S).ok
            except Exception:
                ok = False
            lat.append((time.perf_counter() - t0) * 1000)
            errors += not ok
            progress.update(task, advance=1, errors=errors)
    return lat, errors


def _verify_cost(rounds: int, seconds: float) -> dict[str, Any]:
    """Throughput of two fresh clusters alike but for --verify: adaptive (the default; its agents
    earn trust in the warm-up, then only spot checks) and off, in interleaved bursts so that both
    see the same host: verify_cost_pct is the share of calls/s that verification costs."""
    on, off = LocalCluster(agents=2, slots=2), LocalCluster(agents=2, slots=2, coordinator_args=["--verify", "off"])

    async def bursts() -> tuple[float, float]:
        for c in (on, off):  # workers started; the adaptive cluster's agents earn their trust
            await _throughput(c.addr, 1.0, 64, str(c.state))
        on_total = off_total = 0.0
        for _ in range(rounds):
            off_total += (await _throughput(off.addr, seconds, 64, str(off.state)))[0]
            on_total += (await _throughput(on.addr, seconds, 64, str(on.state)))[0]
        return on_total / rounds, off_total / rounds
    try:
        with _phase("verification cost: starting two clusters"), \
                console.status("verification cost: starting two clusters (--verify adaptive, off)…"):
            on.start()
            off.start()
        with _phase("verification cost"), console.status("measuring what --verify adaptive costs against off…"):
            on_cps, off_cps = asyncio.run(bursts())
    finally:
        for c in (on, off):
            c.stop()
    return {"verify_cost_pct": round(100 * (off_cps - on_cps) / off_cps, 1),
            "calls_per_s_verify_off": round(off_cps, 1), "calls_per_s_verify_adaptive": round(on_cps, 1)}


def _frozen_agent(n: int) -> dict[str, Any]:
    """Two agents of their own cluster, one frozen with SIGSTOP for the whole phase: `n` sequential
    10 ms calls: their p50, p99 and slowest latency, and how many failed."""
    cluster = LocalCluster(agents=2, slots=2)
    try:
        with _phase("frozen agent: starting its cluster"), console.status("frozen agent: starting a second cluster…"):
            cluster.start()
        with _phase("frozen agent: publishing bench.tick"), console.status("frozen agent: publishing bench.tick…"):
            _publish_tick(cluster)
        with cluster.client(client_name="bench") as client:
            with _phase("frozen agent: warm-up"), console.status("frozen agent: warming up bench.tick…"):
                _warm_up_tick(client, FROZEN_WARM_UP)
            with _phase("frozen agent: calls"), _frozen(cluster, FROZEN_AGENT):
                lat, errors = _tick_calls(client, n)
    finally:
        with console.status("frozen agent: stopping its cluster…"):
            cluster.stop()
    return {"frozen_agent_p50_ms": round(statistics.median(lat), 1),
            "frozen_agent_p99_ms": round(_pct(lat, 99), 1),
            "frozen_agent_max_ms": round(max(lat), 1),
            "frozen_agent_errors": errors}


def _table(result: dict[str, Any], n_frozen: int) -> Table:
    """The figures of `result` against their targets, for people."""
    t = Table(title="microswarm bench", title_justify="left")
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_column("target", justify="right")
    t.add_row("trivial remote call p50", f"{result['p50_ms']:.2f} ms", "<= 2 ms")
    t.add_row("trivial remote call p99", f"{result['p99_ms']:.2f} ms", "")
    t.add_row("calls/s, 2 agents, 64 in flight", f"{result['calls_per_s']:.0f}", ">= 2000")
    t.add_row("bare gRPC floor: unary echo p50 / echoes/s, 64 in flight",
              f"{result['floor_p50_ms']:.2f} ms / {result['floor_calls_per_s']:.0f}", "")
    t.add_row("p50 / calls/s as a ratio to that floor",
              f"{result['p50_vs_floor']:.2f}x / {result['calls_per_s_vs_floor']:.2f}x", "")
    t.add_row("echo 100 KB", f"{result['mb_s_100k']:.0f} MB/s", "")
    t.add_row("echo 10 MB", f"{result['mb_s_10m']:.0f} MB/s", ">= 250 MB/s")
    t.add_row("bare gRPC floor: 10 MB unary echo (one message)", f"{result['floor_mb_s_10m']:.0f} MB/s", "")
    t.add_row("echo 10 MB as a ratio to that floor", f"{result['mb_s_10m_vs_floor']:.2f}x", ">= 0.8x")
    t.add_row("latency calls run by an agent", f"{result['remote_share']:.0%}", "100%")
    t.add_row("throughput calls run by an agent (offload)", f"{result['offload_pct']:.1f}%", ">= 95%")
    if "http_calls_per_s" in result:
        t.add_row("HTTP gateway overhead p50 (vs gRPC unary)", f"{result['gateway_overhead_p50_ms']:.2f} ms", "< 2 ms")
        t.add_row("HTTP gateway overhead p99", f"{result['gateway_overhead_p99_ms']:.2f} ms", "")
        t.add_row("HTTP calls/s, 64 connections", f"{result['http_calls_per_s']:.0f}", "")
        t.add_row("calls/s cost of /metrics + dashboard, each 1/s", f"{result['observability_overhead_pct']:.1f}%", "< 5%")
    if result.get("route_overhead_p50_ms") is not None:
        t.add_row("route overhead p50 / p99 (vs calling its source directly)",
                  f"{result['route_overhead_p50_ms']:.2f} / {result['route_overhead_p99_ms']:.2f} ms", "p50 < 1 ms")
    if result.get("verify_cost_pct") is not None:
        t.add_row("calls/s cost of --verify adaptive (trusted agents, 5% spot checks) vs off",
                  f"{result['verify_cost_pct']:.1f}% ({result['calls_per_s_verify_adaptive']:.0f} vs "
                  f"{result['calls_per_s_verify_off']:.0f})", "")
    if result.get("coordinator_rss_peak_mib_50m") is not None:
        t.add_row("coordinator RSS during one 50 MB call (before it)",
                  f"{result['coordinator_rss_peak_mib_50m']:.0f} MiB ({result['coordinator_rss_before_mib_50m']:.0f})",
                  f"< {3 * result['payload_mib_50m']:.0f} MiB")
    if result.get("frozen_agent_errors") is not None:
        what = f"{n_frozen} calls of {FROZEN_TICK_MS:.0f} ms"
        t.add_row(f"frozen agent: p50 of {what}", f"{result['frozen_agent_p50_ms']:.0f} ms", "")
        t.add_row(f"frozen agent: p99 of {what}", f"{result['frozen_agent_p99_ms']:.0f} ms", "< 1000 ms")
        t.add_row("frozen agent: slowest call", f"{result['frozen_agent_max_ms']:.0f} ms", "")
        t.add_row("frozen agent: failed calls", f"{result['frozen_agent_errors']}", "0")
    return t


def _floor(n: int, seconds: float) -> dict[str, float]:
    """Bare grpc.aio unary echoes on the same loopback, in the same run (bench_floor.py)."""
    from . import bench_floor
    from .cluster import free_port

    port = free_port()
    server, tls = bench_floor.start(port)
    try:
        return asyncio.run(bench_floor.measure(port, n, seconds, 64, tls))
    finally:
        server.kill()
        server.wait(10)


def run_bench(coordinator: str | None = None, quick: bool = False, out_path: str | None = None) -> int:
    global _STATE_DIR
    cluster = None
    http_url = os.environ.get("MICROSWARM_GATEWAY_URL") or None
    cost: dict[str, Any] = {"verify_cost_pct": None}
    memory: dict[str, Any] = {"coordinator_rss_peak_mib_50m": None}
    from .bench_routes import KEYS as ROUTE_KEYS, route_overhead
    routes: dict[str, Any] = dict.fromkeys(ROUTE_KEYS)
    try:
        if coordinator is None:
            cluster = LocalCluster(agents=2, slots=2, http=True)
            with _phase("starting the cluster"), console.status("starting a coordinator and two agents on loopback…"):
                cluster.start()
            addr, http_url, _STATE_DIR = cluster.addr, cluster.http_url, str(cluster.state)
        else:
            addr = coordinator
        n_lat = 300 if quick else 2000
        tp_s = 3.0 if quick else 8.0
        with console.status("measuring: latency, throughput, payloads…"):
            lat, lat_by, cps, tp_by, mb100k, mb10m, gw = asyncio.run(_measure(addr, n_lat, tp_s, quick, http_url))
        if cluster is not None and cluster.coordinator is not None:
            from .bench_memory import rss_peak_50m
            with _phase("memory of a 50 MB call"), console.status("the coordinator's memory during a 50 MB call…"):
                memory = rss_peak_50m(addr, str(cluster.state), cluster.coordinator.pid)
            with _phase("route overhead"), console.status("a route against its source, interleaved…"):
                routes = route_overhead(addr, str(cluster.state), http_url)
    finally:
        if cluster is not None:
            cluster.stop()
    if coordinator is None:
        cost = _verify_cost(2 if quick else 3, 1.5 if quick else 2.5)
    n_frozen = FROZEN_CALLS_QUICK if quick else FROZEN_CALLS
    frozen = _frozen_agent(n_frozen) if coordinator is None else dict.fromkeys(FROZEN_KEYS)
    with _phase("bare-gRPC floor"), console.status("measuring the bare-gRPC floor…"):
        floor = _floor(n_lat, tp_s)
    remote = sum(v for k, v in lat_by.items() if k not in ("coordinator", "cache"))
    result: dict[str, Any] = {
        "p50_ms": round(statistics.median(lat), 3),
        "p99_ms": round(_pct(lat, 99), 3),
        "calls_per_s": round(cps, 1),
        "mb_s_100k": round(mb100k, 1),
        "mb_s_10m": round(mb10m, 1),
        "remote_share": round(remote / len(lat), 3),
        "throughput_executed_by": tp_by,
        "offload_pct": _offload_pct(tp_by),
        **floor,
        "p50_vs_floor": round(statistics.median(lat) / floor["floor_p50_ms"], 2),
        "calls_per_s_vs_floor": round(cps / floor["floor_calls_per_s"], 3),
        "mb_s_10m_vs_floor": round(mb10m / floor["floor_mb_s_10m"], 3),
        **gw,
        **cost,
        **memory,
        **routes,
        **frozen,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
    }
    Console().print(_table(result, n_frozen))
    line = json.dumps(result)
    if out_path:
        with open(out_path, "w") as f:
            f.write(line + "\n")
    print(line, flush=True)
    return 0
