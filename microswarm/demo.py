"""`microswarm demo`: a coordinator and two agents on loopback serving real calls, one agent
killed in the middle of a slow call, and the call still answered."""
from __future__ import annotations

import base64
import concurrent.futures
import os
import signal
import time
from pathlib import Path
from typing import Any

from rich.table import Table

from .cluster import LocalCluster, wait_for
from .render import console as wide_console

console = wide_console()  # no 80-column cut under `make` or a pipe

CALLS: list[tuple[str, dict[str, Any]]] = [
    ("math.compute", {"a": 6, "b": 7, "op": "mul"}),
    ("numbers.is_positive", {"n": -3}),
    ("math.compute_and_classify", {"a": 2, "b": -5, "op": "add"}),
    ("demo.cpu_burn", {"rounds": 200_000}),
    ("demo.sleep", {"seconds": 0.2}),
    ("demo.echo_bytes", {"data": base64.b64encode(os.urandom(48)).decode()}),
    ("examples.square_sum", {"n": 10}),
]


def _short(v: object, n: int = 60) -> str:
    s = str(v)
    return s if len(s) <= n else s[: n - 1] + "…"


def run_demo(agents: int = 2) -> int:
    t0 = time.monotonic()
    cluster = LocalCluster(agents=agents, slots=2)
    try:
        with console.status("starting the coordinator…"):
            cluster.start_coordinator()
        console.print(f"[green]✓[/] coordinator on {cluster.addr} (state in {cluster.state})")
        with console.status("publishing examples.square_sum (the README's MicroCore)…"):
            from microcores.client import publish
            example = Path(__file__).parent / "examples" / "square_sum.py"
            publish(str(example), coordinator=cluster.addr, state_dir=str(cluster.state))
        console.print("[green]✓[/] published examples.square_sum")
        with console.status(f"starting {agents} agents, which join and install the packages…"):
            for i in range(agents):
                cluster.start_agent(f"agent{i + 1}")
            cluster.wait_agents_ready()
        console.print(f"[green]✓[/] {agents} agents joined over the encrypted link and hold every package")

        client = cluster.client()
        table = Table(title="one call to every service", title_justify="left")
        for col in ("service", "input", "result", "executed by", "ms"):
            table.add_column(col)
        for service, data in CALLS:
            payload = dict(data)
            if service == "demo.echo_bytes":
                payload = {"data": base64.b64decode(payload["data"])}
            env = client.envelope(service, payload)
            result = env.result if env.ok else env.error
            if service == "demo.echo_bytes" and env.ok:
                result = {"size": env.result["size"], "same bytes back": env.result["data"] == payload["data"]}
            table.add_row(service, _short(data, 40), _short(result), env.executed_by, f"{env.process_time_ms:.1f}")
            if not env.ok:
                console.print(table)
                console.print(f"[red]✗ {service} failed: {env.error}[/]")
                return 1
        console.print(table)

        console.print("\n[bold]failover:[/] a 3-second demo.sleep, and its agent is killed with SIGKILL mid-call")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            fut = pool.submit(client.envelope, "demo.sleep", {"seconds": 3})
            victim = wait_for(lambda: next((a.agent_id for a in client.status().agents if a.running > 0), None),
                              10, "the slow call to reach an agent")
            cluster.kill_agent(victim, signal.SIGKILL)
            console.print(f"  killed [bold]{victim}[/] while it ran the call")
            env = fut.result(timeout=30)
        if not env.ok:
            console.print(f"[red]✗ the call failed: {env.error}[/]")
            return 1
        console.print(f"[green]✓[/] answered anyway: {env.result} executed by [bold]{env.executed_by}[/] "
                      f"after {env.attempts} attempts, {env.process_time_ms:.0f} ms")
        wait_for(lambda: all(a.agent_id != victim for a in client.status().agents), 15,
                 f"{victim} to leave the agent table")
        console.print(f"[green]✓[/] {victim} left the agent table")

        from .cli import status_tables
        st = client.status(recent_calls=len(CALLS) + 4)
        agent_table, scheduler, _services, calls = status_tables(st)[:4]
        for t in (agent_table, scheduler, calls):
            console.print(t)
        client.close()
    except Exception as exc:  # the demo explains what went wrong, then cleans up
        console.print(f"[red]demo failed:[/] {exc}")
        console.print(f"logs are in {cluster.dir}")
        return 1
    finally:
        with console.status("stopping the cluster…"):
            cluster.stop()
    console.print(f"[green]done[/] in {time.monotonic() - t0:.1f} s")
    return 0
