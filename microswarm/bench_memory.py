"""`microswarm bench`'s memory figure: the coordinator's resident memory while one 50 MB call runs.

coordinator_rss_peak_mib_50m is the highest RSS sampled (every 5 ms, from /proc) between sending a
50 MB demo.echo_bytes call and its answer; coordinator_rss_before_mib_50m is the RSS just before
(the coordinator's own size, warmed by the bench's earlier phases), so the call's cost is the
difference. The target is a peak under 3x the payload: a payload held once on the way in and once
on the way out, not copied at every step.
"""
from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any, Callable

SIZE = 50_000_000


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def _echo(addr: str, state_dir: str, data: bytes) -> None:
    from microcores.client import AsyncClient
    async with AsyncClient(addr, client_name="bench", state_dir=state_dir) as c:
        env = await c.envelope("demo.echo_bytes", {"data": data}, timeout=120)
        if not env.ok or env.result["data"] != data:
            raise RuntimeError(f"echo of {len(data)} bytes failed: {env.error}")


def rss_during(pid: int, run: Callable[[], Any]) -> tuple[float, float]:
    """(RSS before, highest RSS sampled every 5 ms while `run()` runs), in MiB, of process `pid`."""
    before = rss_mib(pid)
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.005):
            peak = max(peak, rss_mib(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        run()
    finally:
        done.set()
        sampler.join()
    return before, max(peak, rss_mib(pid))


def rss_peak_50m(addr: str, state_dir: str, pid: int) -> dict[str, Any]:
    data = os.urandom(SIZE)
    before, peak = rss_during(pid, lambda: asyncio.run(_echo(addr, state_dir, data)))
    return {"coordinator_rss_peak_mib_50m": round(peak, 1), "coordinator_rss_before_mib_50m": round(before, 1),
            "payload_mib_50m": round(SIZE / 2**20, 1)}
