"""Volunteer controls on real agent processes: CPU time, memory, CPU share, idle-only, pause and resume.

Every limit is broken by a real job; the agent stays up, the job is reported with the limit's
name, and the coordinator's fallback still answers the caller.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from microswarm.agent.volunteer import IdleProbe, VolunteerSettings, parse_size
from microcores.client import publish
from microswarm.cluster import LocalCluster, wait_for

DATA = Path(__file__).parent / "data"
CLI = [sys.executable, "-m", "microswarm.cli"]


@pytest.fixture(scope="module")
def vc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A coordinator without agents: each test starts the agent it needs, with its limits."""
    c = LocalCluster(agents=0, workdir=str(tmp_path_factory.mktemp("volunteer")))
    with c:
        publish(str(DATA / "hog.py"), coordinator=c.addr, state_dir=str(c.state))
        yield c


@contextlib.contextmanager
def agent(c: LocalCluster, agent_id: str, *flags: str, slots: int = 1,
          env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    p = c.start_agent(agent_id, slots=slots, extra=list(flags), env=env)
    try:
        c.wait_agents_ready([agent_id], timeout=60)
        yield p
        assert p.poll() is None, "the agent went down:\n" + c.log(f"agent-{agent_id}.log")[-3000:]
    finally:
        c.kill_agent(agent_id, signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            c.kill_agent(agent_id, signal.SIGKILL)
            p.wait(10)
        with c.client() as cl:
            wait_for(lambda: agent_id not in {a.agent_id for a in cl.status().agents}, 10, f"{agent_id} to leave")


def agent_info(c: LocalCluster, agent_id: str):  # type: ignore[no-untyped-def]
    with c.client() as cl:
        return next((a for a in cl.status().agents if a.agent_id == agent_id), None)


def control(c: LocalCluster, agent_id: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "agent", *args, "--state-dir", str(c.agent_state(agent_id))],
                          capture_output=True, text=True, timeout=30, env=c.env())


def local_status(c: LocalCluster, agent_id: str) -> dict:
    r = control(c, agent_id, "status")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


# ---------------------------------------------------------------- units

def test_sizes_and_settings_are_checked():
    assert parse_size("512MiB") == 512 * 2**20 and parse_size("2G") == 2 * 10**9
    assert parse_size("1.5GiB") == int(1.5 * 2**30) and parse_size(4096) == 4096
    with pytest.raises(ValueError, match="not understood"):
        parse_size("lots")
    with pytest.raises(ValueError, match="--max-cpu"):
        VolunteerSettings(max_cpu=150).check()
    with pytest.raises(ValueError, match="below 64 MiB"):
        VolunteerSettings(max_memory=2**20).check()


def _burner() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def test_the_idle_probe_counts_other_processes_but_not_the_agents_own():
    """The real probe (kernel CPU counters): a busy process that is not the agent's counts as the
    owner's; the agent's own workers do not. Checked against each process's own CPU time, so
    other load on the machine cannot make it pass or fail."""
    ncpu = psutil.cpu_count() or 1
    own = _burner()      # stands for a job worker of the agent
    other = _burner()    # stands for the machine's owner
    try:
        excluding = IdleProbe(lambda: [own.pid])
        counting_all = IdleProbe(list)
        procs = [psutil.Process(own.pid), psutil.Process(other.pid)]
        time.sleep(0.3)
        excluding.sample(), counting_all.sample()
        c0, t0 = [sum(p.cpu_times()[:2]) for p in procs], time.monotonic()
        time.sleep(2.0)
        ex, al = excluding.sample(), counting_all.sample()
        c1, t1 = [sum(p.cpu_times()[:2]) for p in procs], time.monotonic()
    finally:
        for p in (own, other):
            p.kill()
            p.wait()
    own_pct, other_pct = (100.0 * (b - a) / ((t1 - t0) * ncpu) for a, b in zip(c0, c1))
    assert ex is not None and al is not None
    assert other_pct > 2 and own_pct > 2, "the burners did not run"
    assert ex >= other_pct - 8, f"the owner's busy process was missed: probe {ex:.0f}%, it used {other_pct:.0f}%"
    assert abs((al - ex) - own_pct) <= 8, (
        f"the agent's own worker ({own_pct:.0f}%) was not subtracted: {al:.0f}% counting it, {ex:.0f}% without")


# ---------------------------------------------------------------- limits on real jobs

def test_cpu_time_limit_stops_the_job_and_the_coordinator_answers(vc):
    with agent(vc, "cpu", "--max-job-cpu", "1"):
        with vc.client() as cl:
            env = cl.envelope("demo.cpu_burn", {"rounds": 3_600_000}, timeout=90)  # ~1.8 s of CPU
            assert env.ok, env.error
            assert env.executed_by == "coordinator" and env.attempts == 2
            small = cl.envelope("demo.cpu_burn", {"rounds": 1000})
            assert small.ok and small.executed_by == "cpu"  # the agent stayed up and serves
        assert "cpu_time_limit" in vc.log("agent-cpu.log")
        assert local_status(vc, "cpu")["limit_stops"] == 1
        wait_for(lambda: agent_info(vc, "cpu").limit_stops == 1, 5, "the limit stop in the heartbeat")


def test_memory_limit_stops_the_job_and_the_coordinator_answers(vc):
    with agent(vc, "mem", "--max-memory", "200MiB"):
        with vc.client() as cl:
            env = cl.envelope("tests.memory_hog", {"mib": 400}, timeout=60)
            assert env.ok and env.result == {"mib": 400}, env.error
            assert env.executed_by == "coordinator" and env.attempts == 2
            small = cl.envelope("tests.memory_hog", {"mib": 20})
            assert small.ok and small.executed_by == "mem"
        log = vc.log("agent-mem.log")
        assert "memory_limit" in log and "address-space limit of 200 MiB" in log


def test_memory_budget_covers_all_running_jobs_together(vc):
    """Two jobs, each under the limit alone, together over it: the larger is stopped, both answered."""
    async def two() -> list:
        async with vc.async_client() as cl:
            return await asyncio.gather(cl.envelope("tests.memory_hog", {"mib": 140, "hold_s": 3}, timeout=60),
                                        cl.envelope("tests.memory_hog", {"mib": 160, "hold_s": 3}, timeout=60))

    with agent(vc, "budget", "--max-memory", "300MiB", slots=2):
        envs = asyncio.run(two())
        assert all(e.ok for e in envs), [e.error for e in envs]
        assert sorted(e.executed_by for e in envs) == ["budget", "coordinator"]
        assert "running jobs hold" in vc.log("agent-budget.log")


def _worker_ratio(agent_pid: int, seconds: float) -> float:
    """CPU seconds per second of the agent's busiest worker while it runs a job, measured from outside."""
    def cpu(p: psutil.Process) -> float:
        return sum(p.cpu_times()[:2])

    def burning() -> psutil.Process | None:
        kids = psutil.Process(agent_pid).children(recursive=True)
        before = {k: cpu(k) for k in kids}
        time.sleep(0.3)
        moved = {k: cpu(k) - c for k, c in before.items()}
        best = max(moved, key=moved.__getitem__, default=None)
        return best if best is not None and moved[best] > 0.01 else None

    w = wait_for(burning, 20, "a worker burning CPU")
    c0, t0 = cpu(w), time.monotonic()
    time.sleep(seconds)
    return (cpu(w) - c0) / (time.monotonic() - t0)


def test_max_cpu_throttles_the_jobs(vc):
    ncpu = psutil.cpu_count() or 1
    pct = 20.0
    cores = pct / 100 * ncpu  # the jobs' share, in cores
    with agent(vc, "slow", "--max-cpu", str(pct)) as p:
        with vc.client() as cl, concurrent.futures.ThreadPoolExecutor(1) as pool:
            fut = pool.submit(cl.envelope, "demo.cpu_burn", {"rounds": 3_200_000}, timeout=90)
            ratio = _worker_ratio(p.pid, 2.0)
            env = fut.result(90)
        assert env.ok and env.executed_by == "slow"
        print(f"worker ran at {ratio:.2f} cores under --max-cpu {pct}% ({cores:.2f} cores)")
        assert 0.02 < ratio <= min(1.0, cores) + 0.15, f"the worker used {ratio:.2f} cores, over --max-cpu {pct}%"
        assert local_status(vc, "slow")["throttled_s"] > 0


# ---------------------------------------------------------------- idle-only, pause and resume

def test_idle_only_hands_running_work_back_when_the_owner_returns(vc, tmp_path):
    """The probe's reading comes from a file here (MICROSWARM_IDLE_PROBE_FILE); the real probe is tested above."""
    reading = tmp_path / "others-cpu"
    reading.write_text("0")
    with agent(vc, "idle", "--idle-only", "--idle-wait", "1", "--idle-threshold", "25",
               env={"MICROSWARM_IDLE_PROBE_FILE": str(reading)}):
        wait_for(lambda: agent_info(vc, "idle").mode == "active", 15, "the agent to find the machine idle")
        with vc.client() as cl, concurrent.futures.ThreadPoolExecutor(1) as pool:
            fut = pool.submit(cl.envelope, "demo.sleep", {"seconds": 3.0})
            wait_for(lambda: agent_info(vc, "idle").running, 15, "the slow job to reach the agent")
            reading.write_text("80")  # the owner is back
            env = fut.result(60)
            assert env.ok and env.executed_by == "coordinator" and env.attempts == 2
            assert agent_info(vc, "idle").mode == "owner_busy"
            assert cl.envelope("math.compute", {"a": 1, "b": 2}).executed_by == "coordinator"
            reading.write_text("3")  # idle again
            wait_for(lambda: agent_info(vc, "idle").mode == "active", 15, "the agent to take jobs again")
            env = cl.envelope("demo.sleep", {"seconds": 0})
            assert env.executed_by == "idle"
        assert "owner_busy" in vc.log("agent-idle.log")


def test_pause_and_resume(vc):
    with agent(vc, "pr", slots=2) as p:
        with vc.client() as cl, concurrent.futures.ThreadPoolExecutor(1) as pool:
            assert cl.envelope("demo.sleep", {"seconds": 0}).executed_by == "pr"
            fut = pool.submit(cl.envelope, "demo.sleep", {"seconds": 3.0})
            wait_for(lambda: agent_info(vc, "pr").running, 15, "the slow job to reach the agent")
            r = control(vc, "pr", "pause")
            assert r.returncode == 0 and "paused" in r.stdout, r.stderr
            env = fut.result(60)  # handed back: the coordinator ran it
            assert env.ok and env.executed_by == "coordinator" and env.attempts == 2
            wait_for(lambda: agent_info(vc, "pr").mode == "paused", 5, "the coordinator to see the pause")
            assert {cl.envelope("demo.sleep", {"seconds": 0}).executed_by for _ in range(5)} == {"coordinator"}
            r = control(vc, "pr", "resume")
            assert r.returncode == 0 and "resumed" in r.stdout, r.stderr
            wait_for(lambda: agent_info(vc, "pr").mode == "active", 5, "the coordinator to see the resume")
            assert cl.envelope("demo.sleep", {"seconds": 0}).executed_by == "pr"
            # the same with signals, for service managers: SIGUSR1 pauses, SIGUSR2 resumes
            os.kill(p.pid, signal.SIGUSR1)
            wait_for(lambda: agent_info(vc, "pr").mode == "paused", 5, "SIGUSR1 to pause")
            assert cl.envelope("demo.sleep", {"seconds": 0}).executed_by == "coordinator"
            os.kill(p.pid, signal.SIGUSR2)
            wait_for(lambda: agent_info(vc, "pr").mode == "active", 5, "SIGUSR2 to resume")
            assert cl.envelope("demo.sleep", {"seconds": 0}).executed_by == "pr"


def test_pause_without_an_agent_is_a_clear_error(tmp_path):
    r = subprocess.run([*CLI, "agent", "pause", "--state-dir", str(tmp_path)], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 1 and "no agent control socket" in r.stderr
