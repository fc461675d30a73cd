"""The scheduler against misbehaving volunteers: real coordinator and agent processes on loopback.

A blackhole agent (real handshake, heartbeats, never answers a job), a frozen agent (SIGSTOP, then
SIGCONT), an agent SIGKILLed mid-run, a slow copy hedged past the recent p95, and an agent that
fails every job until it is quarantined. Side effects are counted by the services themselves
(tests/data/side_effects.py): every run appends to `<file>.started` when it begins and to `<file>`
when its effect takes place, so a second run of a job shows up as a second line.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from microcores.client import publish
from microswarm.cluster import LocalCluster, wait_for

DATA = Path(__file__).parent / "data"
SIDE_EFFECTS = DATA / "side_effects.py"
ROGUE = DATA / "blackhole_agent.py"
CLI = [sys.executable, "-m", "microswarm.cli"]


# ---------------------------------------------------------------- helpers

@contextlib.contextmanager
def cluster(tmp_path: Path, agents: int = 2, slots: int = 2, coordinator_args: list[str] | None = None,
            effects: bool = True, env: dict[str, str] | None = None) -> Iterator[LocalCluster]:
    """A cluster of its own, with the side-effect services published unless `effects` is False.
    On the way out every agent gets SIGCONT first, so that a frozen one stops as fast as the rest."""
    (tmp_path / "cluster").mkdir()
    # the side-effect services write to files of the test and name their agent by its pid: both out of
    # a sandboxed worker's sight, so these agents (and the coordinator) run jobs without the namespaces
    c = LocalCluster(agents=agents, slots=slots, workdir=str(tmp_path / "cluster"),
                     coordinator_args=coordinator_args, env={"MICROSWARM_SANDBOX": "off", **(env or {})})
    try:
        c.start()
        if effects:
            publish(str(SIDE_EFFECTS), coordinator=c.addr, state_dir=str(c.state))
            c.wait_agents_ready()
        yield c
    finally:
        for aid in list(c.agents):
            c.kill_agent(aid, signal.SIGCONT)
        c.stop()


def start_rogue(c: LocalCluster, agent_id: str, mode: str, slots: int = 2, heartbeat: float = 1.0) -> Path:
    """A hand-made agent (tests/data/blackhole_agent.py) joined for real; returns its jobs log."""
    jobs_log = c.dir / f"{agent_id}.jobs"
    f = open(c.dir / f"agent-{agent_id}.log", "ab")
    c._logs.append(f)  # closed by c.stop()
    p = subprocess.Popen([sys.executable, str(ROGUE), "--coordinator", c.addr, "--token", c.token, "--id", agent_id,
                          "--slots", str(slots), "--mode", mode, "--heartbeat", str(heartbeat),
                          "--jobs-log", str(jobs_log)],
                         stdout=f, stderr=subprocess.STDOUT, env=c.env(), start_new_session=True)
    c.agents[agent_id] = p  # c.stop() and c.kill_agent() reach it like any agent
    c.wait_agents_ready([agent_id], timeout=30)
    return jobs_log


def lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def effects_of(path: Path) -> Counter[str]:
    """How many times each token's effect took place."""
    return Counter(lines(path))


def starts_of(path: Path) -> list[tuple[str, int]]:
    """(token, pid of the agent process that ran it) for every run that began."""
    out = []
    for line in lines(Path(str(path) + ".started")):
        token, pid = line.rsplit(" ", 1)
        out.append((token, int(pid)))
    return out


def agent_info(client: Any, agent_id: str) -> Any:
    return next((a for a in client.status().agents if a.agent_id == agent_id), None)


def cli(c: LocalCluster, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=c.env(), timeout=timeout)


# ---------------------------------------------------------------- 1. blackhole

def test_blackhole_agent_costs_no_failed_call_and_runs_nothing_twice(tmp_path):
    """An agent that looks healthy (handshake, holdings, heartbeats) but never answers a job nor
    asks to start one: every call still succeeds, and every non-idempotent effect happens once."""
    with cluster(tmp_path, agents=1, slots=2) as c:
        jobs_log = start_rogue(c, "blackhole", "blackhole", slots=2)
        effects = tmp_path / "effects.txt"
        tokens = [f"bh-{i}" for i in range(10)]
        with c.client() as client, concurrent.futures.ThreadPoolExecutor(10) as pool:
            computes, appends = [], {}
            for i in range(40):  # interleaved, so that both kinds of job reach the blackhole
                if i % 2 == 0 and i // 2 < len(tokens):
                    t = tokens[i // 2]
                    appends[t] = pool.submit(client.envelope, "effects.append", {"path": str(effects), "token": t})
                computes.append(pool.submit(client.envelope, "math.compute", {"a": i, "b": 0.25, "op": "add"}))
            envs = [f.result(timeout=120) for f in computes]
            eenvs = {t: f.result(timeout=120) for t, f in appends.items()}
            bh = agent_info(client, "blackhole")
            sched = client.status().scheduler
        print(f"blackhole: {bh.state if bh else None}, running {bh.running if bh else '-'}, jobs {lines(jobs_log)}; "
              f"retries {sched.retries_total}, quarantines {sched.quarantines_total}")
        failed = [(e.error, e.executed_by) for e in [*envs, *eenvs.values()] if not e.ok]
        assert not failed, f"calls failed with a blackhole agent present: {failed}"
        assert [e.result["result"] for e in envs] == [i + 0.25 for i in range(40)]
        assert all(e.executed_by != "blackhole" for e in [*envs, *eenvs.values()])
        got = lines(jobs_log)
        assert got, "the blackhole never received a job: the test exercised nothing"
        assert all(e.result["token"] == t for t, e in eenvs.items())
        counted = effects_of(effects)
        assert counted == Counter({t: 1 for t in tokens}), f"effects not exactly once: {counted}"
        starts = Counter(t for t, _ in starts_of(effects))
        assert starts == Counter({t: 1 for t in tokens}), f"runs not exactly once: {starts}"
        assert bh is not None, "the blackhole was dropped although it heartbeats"
        # Its unanswered jobs hold its slots until it answers (never), or it is quarantined.
        assert bh.state == "quarantined" or bh.running >= bh.slots, (
            f"the blackhole still takes jobs: state {bh.state}, running {bh.running} of {bh.slots} slots")
        assert sched.retries_total >= 1


# ---------------------------------------------------------------- 2. frozen agent

def test_frozen_agent_costs_no_failed_call_and_no_second_run(tmp_path):
    with cluster(tmp_path, agents=2, slots=2) as c:
        pids = {p.pid: aid for aid, p in c.agents.items()}
        effects = tmp_path / "effects.txt"
        with c.client() as client, concurrent.futures.ThreadPoolExecutor(12) as pool:
            for i in range(20):
                env = client.envelope("math.compute", {"a": i, "b": 1, "op": "mul"})
                assert env.ok, env.error
            # Long non-idempotent jobs first: freeze an agent while one of them is mid-run there.
            calls = {f"run-{i}": pool.submit(client.envelope, "effects.append",
                                             {"path": str(effects), "token": f"run-{i}", "seconds": 1.5})
                     for i in range(4)}
            victim = wait_for(lambda: next((pids[pid] for _, pid in starts_of(effects) if pid in pids), None),
                              30, "an effect to start on an agent")
            c.kill_agent(victim, signal.SIGSTOP)
            frozen_at = time.monotonic()
            resumed: list[float] = []

            def resume() -> None:
                c.kill_agent(victim, signal.SIGCONT)
                resumed.append(time.monotonic() - frozen_at)
            cont = threading.Timer(4.0, resume)  # before the 6 s liveness window ends
            cont.start()
            try:
                # More non-idempotent calls while it is frozen, and sequential pure calls.
                calls.update({f"frozen-{i}": pool.submit(client.envelope, "effects.append",
                                                         {"path": str(effects), "token": f"frozen-{i}", "seconds": 0.2})
                              for i in range(6)})
                lat = []
                for i in range(60):
                    t0 = time.perf_counter()
                    env = client.envelope("math.compute", {"a": 100 + i, "b": 2, "op": "mul"})
                    lat.append(time.perf_counter() - t0)
                    assert env.ok, f"call {i} failed while {victim} is frozen: {env.error}"
                    assert env.result == {"result": (100 + i) * 2.0}
                cont.join(10)
                assert resumed and resumed[0] < 5.5, f"SIGCONT came {resumed} s after SIGSTOP"
            finally:
                cont.cancel()
                c.kill_agent(victim, signal.SIGCONT)
            lat.sort()
            p99 = lat[int(0.99 * (len(lat) - 1))]
            assert p99 < 2.0, f"p99 {p99 * 1000:.0f} ms with {victim} frozen (max {lat[-1] * 1000:.0f} ms)"
            envs = {t: f.result(timeout=60) for t, f in calls.items()}

            # It resumed within the liveness window: back to ready, its abandoned jobs answered.
            def settled() -> bool:
                a = agent_info(client, victim)
                return a is not None and a.state == "ready" and a.running == 0
            wait_for(settled, 30, f"{victim} to resume and settle")
            time.sleep(3)
            late = client.status().scheduler.late_results_total
        print(f"effects {effects_of(effects)}, starts {starts_of(effects)}")
        print(f"frozen {victim}: p99 {p99 * 1000:.0f} ms, max {lat[-1] * 1000:.0f} ms, late results {late}, "
              f"answers {[(t, e.status, e.executed_by, e.error and e.error['code']) for t, e in envs.items()]}")
        assert isinstance(late, int) and late >= 0
        counted = effects_of(effects)
        starts = Counter(t for t, _ in starts_of(effects))
        assert all(n == 1 for n in counted.values()), f"a non-idempotent effect took place twice: {counted}"
        assert all(n == 1 for n in starts.values()), f"a non-idempotent job ran twice: {starts}"
        unknown = []
        for t, env in envs.items():
            if env.ok:
                assert counted[t] == 1 and starts[t] == 1, (t, counted[t], starts[t])
            else:
                assert env.error["code"] == "outcome_unknown", f"{t} failed: {env.error}"
                assert victim in env.error["message"] and "not idempotent" in env.error["message"], env.error
                assert counted[t] <= 1 and starts[t] <= 1
                unknown.append(t)
        # The job mid-run on the frozen agent started there: it must not have been re-run elsewhere.
        on_victim = {t for t, pid in starts_of(effects) if pids.get(pid) == victim and t.startswith("run-")}
        assert on_victim, "no effect was running on the frozen agent"
        for t in on_victim:
            assert not envs[t].ok or envs[t].executed_by == victim, (t, envs[t])
        assert all(t.startswith("run-") for t in unknown), f"calls sent during the freeze got {unknown}"


# ---------------------------------------------------------------- 3. SIGKILL mid-run

def test_sigkill_mid_run_gives_outcome_unknown_and_idempotent_twin_is_retried(tmp_path):
    with cluster(tmp_path, agents=2, slots=2) as c:
        effects = tmp_path / "effects.txt"
        with c.client() as client, concurrent.futures.ThreadPoolExecutor(1) as pool:
            def started(token: str) -> str | None:
                pids = {p.pid: aid for aid, p in c.agents.items()}
                ran = [pids.get(pid) for t, pid in starts_of(effects) if t == token]
                if not ran:
                    return None
                busy = {a.agent_id for a in client.status().agents if a.running}
                return ran[0] if ran[0] in busy else None

            # Not idempotent: killed mid-run, it is answered outcome_unknown and never re-run.
            fut = pool.submit(client.envelope, "effects.append",
                              {"path": str(effects), "token": "once", "seconds": 3.0})
            victim = wait_for(lambda: started("once"), 30, "effects.append to start on an agent")
            c.kill_agent(victim, signal.SIGKILL)
            env = fut.result(timeout=60)
            assert env.status == "error" and env.error["code"] == "outcome_unknown", env
            msg = env.error["message"]
            assert victim in msg, msg
            assert "not idempotent" in msg and ("not run again" in msg or "not re-run" in msg), msg
            assert effects_of(effects)["once"] <= 1
            time.sleep(5)  # the other agent had all the time it needed to run it, had it been sent there
            assert effects_of(effects)["once"] <= 1
            assert [t for t, _ in starts_of(effects)].count("once") == 1, starts_of(effects)
            assert client.status().scheduler.outcome_unknown_total >= 1

            # The idempotent twin, same scenario: another agent runs it again and the call succeeds.
            assert c.agents[victim].wait(10) is not None
            c.start_agent(victim)
            c.wait_agents_ready([victim])
            fut = pool.submit(client.envelope, "effects.append_idempotent",
                              {"path": str(effects), "token": "twice", "seconds": 3.0})
            victim2 = wait_for(lambda: started("twice"), 30, "effects.append_idempotent to start on an agent")
            c.kill_agent(victim2, signal.SIGKILL)
            env = fut.result(timeout=60)
            assert env.ok, env.error
            assert env.executed_by not in (victim2, "") and env.attempts == 2, env
            assert effects_of(effects)["twice"] == 1
            assert [t for t, _ in starts_of(effects)].count("twice") == 2


# ---------------------------------------------------------------- 4. hedging

def test_hedging_past_p95_answers_well_before_the_learnt_timeout(tmp_path):
    with cluster(tmp_path, agents=2, slots=1, effects=False) as c:
        with c.client() as client:
            for _ in range(30):
                env = client.envelope("demo.sleep", {"seconds": 0.05})
                assert env.ok and env.executed_by.startswith("agent"), env
            hedges = client.status().scheduler.hedges_total
            c.kill_agent("agent1", signal.SIGSTOP)
            lat = []
            for _ in range(10):  # done well before agent1 is suspected (3 s): some go to it, and are hedged
                t0 = time.perf_counter()
                env = client.envelope("demo.sleep", {"seconds": 0.05})
                lat.append(time.perf_counter() - t0)
                assert env.ok, env.error
                assert env.executed_by != "agent1"
            c.kill_agent("agent1", signal.SIGCONT)
            after = client.status().scheduler.hedges_total
        print(f"hedging: {[round(x * 1000) for x in lat]} ms, hedges {hedges} -> {after}")
        # The learnt timeout is at least 1 s (TIMEOUT_FLOOR_S): a call to the frozen agent that was
        # not hedged would wait for it, then run again elsewhere.
        assert max(lat) < 0.95, f"latencies {[round(x * 1000) for x in lat]} ms: a call waited out its timeout"
        assert after > hedges, f"no hedge with agent1 frozen ({hedges} -> {after})"


# ---------------------------------------------------------------- 5. quarantine

def test_quarantine_is_not_lifted_by_heartbeats_expires_and_doubles(tmp_path):
    with cluster(tmp_path, agents=0, coordinator_args=["--quarantine", "2"], effects=False) as c:
        jobs_log = start_rogue(c, "faulty", "fault", slots=2, heartbeat=0.25)
        n = iter(range(10**6))
        with c.client() as client:
            def call() -> Any:
                i = next(n)
                env = client.envelope("math.compute", {"a": i, "b": 0.5, "op": "sub"})
                assert env.ok and env.result == {"result": i - 0.5}, env
                return env

            def fail_until_quarantined() -> tuple[Any, float]:
                """Calls (each fails on the faulty agent, then runs elsewhere) 0.6 s apart, so that each
                counts as a strike, until status shows it quarantined."""
                for _ in range(20):
                    call()
                    a = agent_info(client, "faulty")
                    if a.state == "quarantined":
                        return a, time.monotonic()
                    assert a.state == "ready", a
                    time.sleep(0.6)
                raise AssertionError("the faulty agent was never quarantined")

            def until_ready() -> float:
                wait_for(lambda: agent_info(client, "faulty").state == "ready", 20, "the quarantine to end", 0.02)
                return time.monotonic()

            a1, seen1 = fail_until_quarantined()
            assert len(lines(jobs_log)) == 3, lines(jobs_log)  # three failures in a row
            assert 0 < a1.quarantine_left_s <= 2.0, a1
            time.sleep(0.6)
            t0 = time.monotonic()
            a = agent_info(client, "faulty")
            # A heartbeat came after it was quarantined (every 0.25 s), and it is still quarantined.
            assert a.state == "quarantined", a
            assert a.last_heartbeat_s < t0 - seen1, a
            ready1 = until_ready()
            assert ready1 - seen1 >= a1.quarantine_left_s - 0.3

            # Back in rotation: it gets jobs, fails them, and the second quarantine lasts about twice as long.
            a2, seen2 = fail_until_quarantined()
            assert len(lines(jobs_log)) == 6, lines(jobs_log)
            assert 2.3 < a2.quarantine_left_s <= 4.0, a2
            r = cli(c, "status", "--json")
            assert r.returncode == 0, r.stderr
            row = next(x for x in json.loads(r.stdout)["agents"] if x["agent_id"] == "faulty")
            assert row["state"] in ("quarantined", "ready") and "quarantine_left_s" in row, row
            if time.monotonic() - seen2 < a2.quarantine_left_s - 0.2:  # the CLI answered within the period
                assert row["state"] == "quarantined" and row["quarantine_left_s"] > 0, row
            jobs = len(lines(jobs_log))
            while (a := agent_info(client, "faulty")).quarantine_left_s > 1.5:
                env = call()  # no new jobs while quarantined
                assert env.executed_by == "coordinator", env
                time.sleep(0.2)
            assert len(lines(jobs_log)) == jobs, "a quarantined agent got a job"
            ready2 = until_ready()
            assert ready2 - seen2 >= a2.quarantine_left_s - 0.3
            assert ready2 - seen2 > ready1 - seen1
            assert client.status().scheduler.quarantines_total == 2
            call()
            assert len(lines(jobs_log)) == jobs + 1, "the agent got no job after its quarantine ended"


# ---------------------------------------------------------------- 6. started means started

def test_job_waiting_for_a_worker_when_its_agent_dies_has_not_started(tmp_path):
    """At most once, and no more cautious than that: a non-idempotent job that an agent accepted but
    that never reached a worker (the agent was still starting one for it) has not started, so when
    the agent dies it may run elsewhere, and its call must not be answered outcome_unknown."""
    # from here on, the first worker to load does so at once; the second waits seconds (side_effects.py)
    flag = tmp_path / "slow-workers"
    slow = {"EFFECTS_SLOW_LATER_WORKERS": str(flag), "MICROSWARM_WORKER_ENV": "EFFECTS_SLOW_LATER_WORKERS"}
    with cluster(tmp_path, agents=1, slots=2, env=slow) as c:
        flag.touch()
        effects = tmp_path / "effects.txt"
        with c.client() as client, concurrent.futures.ThreadPoolExecutor(2) as pool:
            futs = {t: pool.submit(client.envelope, "effects.append",
                                   {"path": str(effects), "token": t, "seconds": 3.0}) for t in ("first", "second")}
            # both calls are on agent1 from the start (two slots); kill it as soon as one has begun
            first = wait_for(lambda: starts_of(effects), 30, "a job to start on agent1", 0.01)[0][0]
            c.kill_agent("agent1", signal.SIGKILL)
            envs = {t: f.result(timeout=60) for t, f in futs.items()}
        started = Counter(t for t, _ in starts_of(effects))
        print(f"started {dict(started)}, answers {[(t, e.status, e.executed_by, e.error) for t, e in envs.items()]}")
        assert all(n == 1 for n in started.values()), started
        waiting = next(t for t in envs if t != first)
        assert envs[first].error is not None and envs[first].error["code"] == "outcome_unknown", envs[first]
        env = envs[waiting]
        assert env.ok, (f"{waiting!r} never started (it was waiting for a worker on agent1), yet its call was "
                        f"not run elsewhere: {env.error}")
        assert env.executed_by == "coordinator" and started[waiting] == 1 and effects_of(effects)[waiting] == 1, env
