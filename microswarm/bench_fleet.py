"""`microswarm bench --simulated-agents N`: one coordinator under a fleet of N simulated agents.

The agents (simagents.py) do the real handshake, sealing, heartbeats and job protocol, from a few
processes on this machine. Prints a table and, as its last line, one JSON object:
agents (connected and ready), join_s (all of them, from the first dial), coordinator_rss_mib,
heartbeat_cpu_pct (the coordinator's CPU over HEARTBEAT_WINDOW_S while the agents sit idle; one
core = 100), heartbeat_s (the pace the coordinator set for that fleet), status_ms (median of a few
`Status` calls as `microswarm status` makes them: totals and the first 50 agents, each built anew),
status_all_ms (the same with every agent listed, `status --json`), calls_per_s (bench.tick calls
of 0 ms with 64 in flight, answered by the simulated agents) and offload_pct.

The coordinator runs with --local-slots 0 (every call goes to an agent), --verify off (the
simulated agents are ours; verification's cost is `microswarm bench`'s verify_cost_pct) and
--handshake-rate raised (all the agents dial from one address).
"""
from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .bench import _offload_pct, _throughput
from .cluster import LocalCluster
from .coordinator.server import STATUS_TTL_S
from .simagents import AGENTS_PER_PROCESS, Fleet, processes_for, volunteer_tokens

console = Console(stderr=True)
HEARTBEAT_WINDOW_S = 10.0   # idle CPU is measured over this long...
SETTLE_S = 5.0              # ...after this long for the joins' aftermath (holdings, first heartbeats)
STATUS_SAMPLES = 5
THROUGHPUT_S = 5.0
IN_FLIGHT = 64


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _status_ms(cluster: LocalCluster, limit: int) -> float:
    times = []
    with cluster.client() as c:
        c.status(1, agents_limit=limit)  # the channel and the operator's credential, not measured
        for _ in range(STATUS_SAMPLES):
            time.sleep(STATUS_TTL_S * 1.2)  # past the sharing interval: each one is built
            t0 = time.perf_counter()
            c.status(20, agents_limit=limit, timeout=60)
            times.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(times), 1)


async def _ticks(cluster: LocalCluster, seconds: float) -> tuple[float, dict[str, int]]:
    """0 ms bench.tick calls, 64 in flight, after a second of the same as warm-up (the channel, the
    scheduler's view of the service)."""
    for s in (1.0, seconds):
        result = await _throughput(cluster.addr, s, IN_FLIGHT, str(cluster.state), "bench.tick", lambda i: {"ms": 0.0})
    return result


def measure_fleet(n: int, join_timeout: float = 900.0, workdir: str | None = None) -> dict[str, Any]:
    from microcores.client import publish

    args = ["--handshake-rate", "100000", "--local-slots", "0", "--verify", "off"]
    with LocalCluster(agents=0, workdir=workdir, coordinator_args=args) as cluster:
        assert cluster.coordinator is not None
        pid = cluster.coordinator.pid
        publish(str(Path(__file__).with_name("bench_services.py")), coordinator=cluster.addr,
                state_dir=str(cluster.state))
        tokens = volunteer_tokens(str(cluster.state), processes_for(n), AGENTS_PER_PROCESS, env=cluster.env())
        t0 = time.monotonic()
        with Fleet(cluster.addr, tokens, n, env=cluster.env(), log=str(cluster.dir / "simagents.log")) as fleet, \
                Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                         console=console, transient=True) as bar:
            task = bar.add_task("simulated agents joining", total=n)
            ready = fleet.wait_ready(join_timeout, lambda k: bar.update(task, completed=k))
            join_s = time.monotonic() - t0
            bar.update(task, description="agents idle: measuring the coordinator's heartbeat CPU")
            time.sleep(SETTLE_S)
            c0, w0 = _cpu_s(pid), time.monotonic()
            time.sleep(HEARTBEAT_WINDOW_S)
            cpu_pct = 100 * (_cpu_s(pid) - c0) / (time.monotonic() - w0)
            rss = _rss_mib(pid)
            with cluster.client() as c:
                st = c.status(1, agents_limit=1)
            bar.update(task, description="Status, paged and whole")
            status_ms, status_all_ms = _status_ms(cluster, 50), _status_ms(cluster, 0)
            bar.update(task, description="calls over the simulated agents")
            cps, by = asyncio.run(_ticks(cluster, THROUGHPUT_S))
            connected = fleet.poll()
        pace = _pace(cluster)
    return {"agents": min(ready, connected, st.agents_total), "join_s": round(join_s, 1),
            "coordinator_rss_mib": round(rss, 1), "heartbeat_cpu_pct": round(cpu_pct, 1), "heartbeat_s": pace,
            "status_ms": status_ms, "status_all_ms": status_all_ms, "calls_per_s": round(cps),
            "offload_pct": _offload_pct(by), "simulated_agents": n}


def _pace(cluster: LocalCluster) -> float | None:
    """The heartbeat interval the coordinator last announced, from its log."""
    pace = None
    try:
        for line in (cluster.dir / "coordinator.log").read_text(errors="replace").splitlines():
            if "they now heartbeat every" in line:
                pace = float(line.split("every")[1].split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pace or 1.0


def run_fleet_bench(n: int, out_path: str | None = None) -> int:
    result = measure_fleet(n)
    t = Table(title=f"one coordinator, {n:,} simulated agents", title_justify="left")
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_column("target (issue 13)", justify="right")
    rows = [("agents connected and ready", f"{result['agents']:,}", f"{n:,}"),
            ("all joined in", f"{result['join_s']} s", ""),
            ("coordinator RSS", f"{result['coordinator_rss_mib']} MiB", "< 1,024 MiB"),
            ("coordinator CPU, agents idle", f"{result['heartbeat_cpu_pct']}% of a core", "< 25%"),
            ("heartbeat interval set", f"{result['heartbeat_s']} s", ""),
            ("Status (totals + 50 agents)", f"{result['status_ms']} ms", "< 100 ms"),
            ("Status listing every agent", f"{result['status_all_ms']} ms", ""),
            ("calls/s over the fleet, 64 in flight", f"{result['calls_per_s']:,}", ""),
            ("run by agents", f"{result['offload_pct']}%", "")]
    for row in rows:
        t.add_row(*row)
    Console().print(t)
    line = json.dumps(result)
    if out_path:
        Path(out_path).write_text(line + "\n")
    print(line, flush=True)
    return 0 if result["agents"] == n else 1
