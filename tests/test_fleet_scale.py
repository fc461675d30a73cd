"""A coordinator under a fleet: the heartbeat pace, Status pages, and simulated agents.

The simulated agents (microswarm/simagents.py) do the real handshake, sealing, heartbeats and job
protocol; here a few hundred of them join a real coordinator beside one real agent.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from microcores.client import publish
from microswarm import bench_services
from microswarm.cluster import LocalCluster, wait_for
from microswarm.coordinator.pace import Pace
from microswarm.simagents import Fleet, volunteer_tokens

CLI = [sys.executable, "-m", "microswarm.cli"]


# ---------------------------------------------------------------- the pace, alone

def test_pace_keeps_the_fleet_within_its_heartbeat_budget():
    p = Pace(floor_s=1.0, liveness_s=6.0, budget=1000)
    assert p.update(10) is None and p.heartbeat_s == 1.0 and p.liveness_s == 6.0
    assert p.update(1000) is None  # at the budget
    assert p.update(2000) == 2.0 and p.liveness_s == 12.0  # the silence window grows with it
    assert p.update(2100) is None and p.update(1500) is None  # within 10%, or shrunk a little: no ping storm
    assert p.update(10_000) == 10.0 and 10_000 / p.heartbeat_s <= 1000
    assert p.update(1000) == 1.0  # the fleet shrank: back to the floor, never below it
    assert p.update(0) is None and p.heartbeat_s == 1.0
    for n in range(0, 20_000, 37):  # growing one join at a time, the budget holds within 10%
        p.update(n)
        assert n / p.heartbeat_s <= 1000 * 1.1 + 1e-9, (n, p.heartbeat_s)


# ---------------------------------------------------------------- a fleet, end to end

def _coordinator_log(c: LocalCluster) -> str:
    return (c.dir / "coordinator.log").read_text(errors="replace")


def _pace(c: LocalCluster) -> float:
    found = re.findall(r"they now heartbeat every ([0-9.]+) s", _coordinator_log(c))
    return float(found[-1]) if found else 0.0


def test_simulated_fleet_is_paced_paged_and_served(tmp_path):
    """300 simulated agents and one real one, with a budget of 100 heartbeats a second: the
    coordinator slows everyone's heartbeat to 3 s (the real agent too) and drops none of them,
    Status pages the agents with fleet totals, and calls run on the simulated agents."""
    n = 300
    args = ["--heartbeat-budget", "100", "--handshake-rate", "10000", "--local-slots", "0", "--verify", "off"]
    with LocalCluster(agents=1, slots=2, workdir=str(tmp_path), coordinator_args=args) as c:
        publish(str(Path(bench_services.__file__)), coordinator=c.addr, state_dir=str(c.state))
        tokens = volunteer_tokens(str(c.state), 1, n, env=c.env())
        with Fleet(c.addr, tokens, n, env=c.env(), log=str(tmp_path / "simagents.log")) as fleet, \
                c.client() as client:
            assert fleet.wait_ready(120) == n, (tmp_path / "simagents.log").read_text()[-2000:]
            wait_for(lambda: client.status(1, agents_limit=1).agents_total == n + 1, 30, "every agent in Status")
            # the pace follows the fleet as it joins, the budget held within 10% (pace.py)
            pace = wait_for(lambda: (lambda p: p if p >= 2.8 else 0.0)(_pace(c)), 10, "the pace to reach ~3 s")
            assert (n + 1) / pace <= 100 * 1.1, pace

            # Status: a page by id, and totals for the whole fleet
            page = client.status(1, agents_limit=50, agents_offset=100)
            assert len(page.agents) == 50 and page.agents_total == n + 1
            ids = [a.agent_id for a in client.status(1).agents]
            assert [a.agent_id for a in page.agents] == ids[100:150] and ids == sorted(ids)
            assert page.slots_total == 4 * n + 2

            # the real agent heartbeats at the new pace, and stays in (its old window was 6 s)
            seen: list[float] = []

            def real_agent_slowed() -> bool:
                info = next(a for a in client.status(1).agents if a.agent_id == "agent1")
                assert info.state == "ready", info
                seen.append(info.last_heartbeat_s)
                return max(seen) > 1.8

            wait_for(real_agent_slowed, 15, "the real agent to heartbeat at the slower pace", 0.2)
            time.sleep(8)  # past the floor pace's 6 s window: nobody was dropped
            assert fleet.poll() == n
            assert client.status(1, agents_limit=1).agents_total == n + 1
            assert "removed: silent" not in _coordinator_log(c)

            # calls go to the simulated agents, which answer with their input
            by: dict[str, int] = {}
            for i in range(40):
                env = client.envelope("bench.tick", {"ms": float(i)})
                assert env.ok and env.result == {"ms": float(i)}, env
                by[env.executed_by] = by.get(env.executed_by, 0) + 1
            assert sum(v for k, v in by.items() if k.startswith("sim0-")) >= 30, by


def test_bench_simulated_agents_prints_its_figures(tmp_path):
    """The contract of `microswarm bench --simulated-agents N`: a table, and a JSON last line."""
    r = subprocess.run([*CLI, "bench", "--simulated-agents", "150", "--output", str(tmp_path / "fleet.json")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result == json.loads((tmp_path / "fleet.json").read_text())
    assert result["agents"] == 150
    for key in ("coordinator_rss_mib", "heartbeat_cpu_pct", "status_ms", "calls_per_s"):
        assert isinstance(result[key], (int, float)) and result[key] > 0, (key, result)
    assert result["offload_pct"] == 100.0 and result["coordinator_rss_mib"] < 1024
    assert re.search(r"simulated agents", r.stdout)


def test_bench_simulated_agents_refuses_nonsense():
    r = subprocess.run([*CLI, "bench", "--simulated-agents", "0"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--simulated-agents" in r.stderr


@pytest.mark.parametrize("flag", ["--heartbeat-budget", "--handshake-rate"])
def test_rates_must_be_positive(tmp_path, flag):
    r = subprocess.run([*CLI, "coordinator", "start", "--state-dir", str(tmp_path), "--listen", "127.0.0.1:0",
                        flag, "0"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and flag in (r.stdout + r.stderr)
