"""The scheduler's queue with real processes: calls wait for volunteer slots instead of running on the
coordinator, `--queue-wait` hands a waiting call to the coordinator, a full queue answers `overloaded`,
`--local-slots 0` with nothing to serve answers `unavailable`, waits for slots count against the
caller's deadline, `--drain` running out answers the calls still in flight, idle workers stop.

Each cluster is a real coordinator and real agents on loopback (microswarm.cluster.LocalCluster).
Clusters are shared by the tests that do not disturb each other; the ones that kill or break things
start their own. Background calls run in a thread pool entered *before* the cluster, so the cluster
stops first (answering them) and the pool's threads never outlive the test.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import threading
import time
from typing import Any, Iterator

import psutil
import pytest

from microswarm.cluster import LocalCluster, wait_for

# Daemons that stop promptly at the end of a test: a job still running must not hold up the cleanup.
FAST_STOP_COORDINATOR = ["--drain", "1"]
FAST_STOP_AGENT = ["--drain", "1"]


def _agent(st: Any, agent_id: str) -> Any:
    return next((a for a in st.agents if a.agent_id == agent_id), None)


def _running(client: Any, agent_id: str) -> int:
    a = _agent(client.status(), agent_id)
    return a.running if a is not None else -1


def _workers(cluster: LocalCluster, digest: str = "") -> int:
    """Live worker processes (`python -m microcores._worker DIR`) under the cluster's agents; with
    `digest`, only those of that package (its directory is named by its digest)."""
    n = 0
    for p in cluster.agents.values():
        try:
            kids = psutil.Process(p.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            continue
        for k in kids:
            try:
                if k.status() == psutil.STATUS_ZOMBIE:
                    continue
                cmd = " ".join(k.cmdline())
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                continue
            if "microcores._worker" in cmd and digest in cmd:
                n += 1
    return n


def _digest(client: Any, service: str) -> str:
    return next(s.digest for s in client.status().services if s.name == service)


# ---------------------------------------------------------------- clusters

@pytest.fixture(scope="module")
def volunteers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """2 agents x 2 slots whose workers stop after 1 s idle. `--queue-wait 30`: a call that waits
    for an agent slot under a loaded test machine must not reach the coordinator by the clock alone;
    what is tested is that busy agents mean "wait in line", not "run it on the coordinator"."""
    c = LocalCluster(agents=2, slots=2, workdir=str(tmp_path_factory.mktemp("volunteers")),
                     coordinator_args=["--queue-wait", "30", *FAST_STOP_COORDINATOR],
                     agent_args=["--worker-idle", "1", *FAST_STOP_AGENT])
    with c:
        yield c


@pytest.fixture(scope="module")
def no_local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """The coordinator never runs jobs (`--local-slots 0`), at most 2 calls wait (`--queue-limit 2`);
    one agent with one slot."""
    c = LocalCluster(agents=1, slots=1, workdir=str(tmp_path_factory.mktemp("nolocal")),
                     coordinator_args=["--local-slots", "0", "--queue-limit", "2", *FAST_STOP_COORDINATOR],
                     agent_args=FAST_STOP_AGENT)
    with c:
        yield c


# ---------------------------------------------------------------- 1. the queue

def test_no_coordinator_runs_while_agents_have_slots(volunteers):
    c = volunteers
    with c.client() as client:
        before = client.status().scheduler
        depths: list[int] = []
        done = threading.Event()

        def poll() -> None:
            with c.client() as p:
                while not done.is_set():
                    depths.append(p.status().scheduler.queue_depth)
                    done.wait(0.02)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()

        async def burst() -> list[Any]:
            async with c.async_client() as ac:
                return await asyncio.gather(*(ac.envelope("demo.sleep", {"seconds": 0.2}, timeout=60)
                                              for _ in range(32)))
        try:
            envs = asyncio.run(burst())
        finally:
            done.set()
            poller.join(15)
        after = client.status().scheduler

    assert all(e.ok for e in envs), [e.error for e in envs if not e.ok]
    by = [e.executed_by for e in envs]
    assert set(by) <= {"agent1", "agent2"}, by  # never "coordinator", never the cache (demo.sleep is not pure)
    assert set(by) == {"agent1", "agent2"}  # both volunteers shared the work
    assert all(e.result["slept"] >= 0.2 for e in envs)
    assert after.local_total == before.local_total, "the coordinator ran jobs while agents had slots"
    assert after.offloaded_total - before.offloaded_total >= 32
    # 32 calls, 4 slots: most of them waited in line for a volunteer slot.
    assert max(depths, default=0) > 0 or after.queue_wait_p50_ms > 0, (depths, after)
    assert after.queue_depth == 0


# ---------------------------------------------------------------- 2. --queue-wait

def test_queue_wait_then_the_coordinator_takes_over(tmp_path):
    with concurrent.futures.ThreadPoolExecutor(3) as pool, \
            LocalCluster(agents=1, slots=1, workdir=str(tmp_path),
                         coordinator_args=["--queue-wait", "0.3", "--local-slots", "1", *FAST_STOP_COORDINATOR],
                         agent_args=FAST_STOP_AGENT) as c, c.client() as client:
        before = client.status().scheduler
        futs = [pool.submit(client.envelope, "demo.sleep", {"seconds": 1.5}, timeout=60) for _ in range(3)]
        envs = [f.result(timeout=60) for f in futs]
        after = client.status().scheduler

    assert all(e.ok for e in envs), [e.error for e in envs if not e.ok]
    by = [e.executed_by for e in envs]
    assert "coordinator" in by and "agent1" in by, by
    assert set(by) <= {"coordinator", "agent1"}
    assert after.local_total - before.local_total == by.count("coordinator")
    for e in envs:
        if e.executed_by == "coordinator":  # it waited --queue-wait for an agent slot first
            assert e.process_time_ms >= (1.5 + 0.3) * 1000 - 50, e


# ---------------------------------------------------------------- 3. overloaded

def test_full_queue_answers_overloaded_at_once(no_local):
    c = no_local
    with concurrent.futures.ThreadPoolExecutor(8) as pool, c.client() as client:
        before = client.status().scheduler
        assert before.queue_limit == 2 and before.local_slots == 0
        long = pool.submit(client.envelope, "demo.sleep", {"seconds": 4}, timeout=60)
        wait_for(lambda: _running(client, "agent1") >= 1, 15, "the long call to reach agent1")
        # Fill the agent (its slot and what it prefetches), then the queue, one call at a time.
        queued: list[concurrent.futures.Future[Any]] = []
        for _ in range(8):
            if client.status().scheduler.queue_depth >= 2:
                break
            queued.append(pool.submit(client.envelope, "demo.sleep", {"seconds": 0.2}, timeout=60))
            n = len(queued) + 1

            def accounted(n: int = n) -> bool:
                st = client.status()
                return _agent(st, "agent1").running + st.scheduler.queue_depth >= n
            wait_for(accounted, 15, f"{n} calls on agent1 or in the queue")
        assert client.status().scheduler.queue_depth == 2

        overloaded = []
        for _ in range(3):
            t0 = time.monotonic()
            env = client.envelope("demo.sleep", {"seconds": 0.2}, timeout=60)
            overloaded.append((env, time.monotonic() - t0))
        assert not long.done(), "the extra calls were not answered before the long call ended"
        for env, took in overloaded:
            assert env.status == "error" and env.error["code"] == "overloaded", env
            assert "--queue-limit" in env.error["message"]
            assert took < 1.5, f"overloaded after {took:.2f} s: not at once"
        assert client.status().scheduler.overloaded_total - before.overloaded_total >= 3

        env = long.result(timeout=60)
        assert env.ok and env.executed_by == "agent1", env
        for f in queued:  # the calls that waited in line all ran, on the agent
            env = f.result(timeout=60)
            assert env.ok and env.executed_by == "agent1", env
        wait_for(lambda: client.status().scheduler.queue_depth == 0, 10, "the queue to empty")


# ---------------------------------------------------------------- 4. nothing can serve

def test_local_slots_0_and_no_agents_is_unavailable_until_one_joins(tmp_path):
    with LocalCluster(agents=0, slots=1, workdir=str(tmp_path),
                      coordinator_args=["--local-slots", "0", *FAST_STOP_COORDINATOR],
                      agent_args=FAST_STOP_AGENT) as c, c.client() as client:
        t0 = time.monotonic()
        env = client.envelope("math.compute", {"a": 1, "b": 2, "op": "add"}, timeout=30)
        took = time.monotonic() - t0
        assert env.status == "error" and env.error["code"] == "unavailable", env
        assert "--local-slots" in env.error["message"], env.error
        assert took < 5, f"answered after {took:.1f} s: a call nothing can serve must not wait for its deadline"
        assert client.status().scheduler.local_total == 0

        c.start_agent("late")
        c.wait_agents_ready(["late"])
        for i in range(5):
            env = client.envelope("math.compute", {"a": i, "b": 2, "op": "add"}, timeout=30)
            assert env.ok and env.result == {"result": i + 2.0} and env.executed_by == "late", env
        env = client.envelope("demo.sleep", {"seconds": 0.1}, timeout=30)
        assert env.ok and env.executed_by == "late", env
        assert client.status().scheduler.local_total == 0


# ---------------------------------------------------------------- 5. deadlines while waiting for slots

def _deadline_call(client: Any, seconds: float = 1.0) -> tuple[Any, float]:
    t0 = time.monotonic()
    env = client.envelope("demo.sleep", {"seconds": 0.1}, timeout=seconds)
    return env, time.monotonic() - t0


def test_deadline_counts_while_waiting_for_an_agent_slot(no_local):
    c = no_local
    with concurrent.futures.ThreadPoolExecutor(1) as pool, c.client() as client:
        busy = pool.submit(client.envelope, "demo.sleep", {"seconds": 5}, timeout=60)
        wait_for(lambda: _running(client, "agent1") == 1, 15, "demo.sleep 5 to reach agent1")
        env, took = _deadline_call(client)
        assert env.status == "error" and env.error["code"] == "deadline_exceeded", env
        assert env.attempts == 0, env  # it never ran anywhere: it waited in line for the agent's slot
        assert took < 2.5, f"a 1 s deadline answered after {took:.2f} s"
        assert not busy.done(), "the agent's slot was not busy for the whole wait: the test proves nothing"
        st = client.status()
        assert st.scheduler.queue_depth == 0  # it left the queue
        assert _agent(st, "agent1").running == 1 and _agent(st, "agent1").state == "ready"
        env = busy.result(timeout=60)
        assert env.ok and env.executed_by == "agent1", env


def test_deadline_counts_while_waiting_for_a_coordinator_slot(tmp_path):
    with concurrent.futures.ThreadPoolExecutor(2) as pool, \
            LocalCluster(agents=0, slots=1, workdir=str(tmp_path),
                         coordinator_args=["--local-slots", "1", "--queue-wait", "10", *FAST_STOP_COORDINATOR],
                         agent_args=FAST_STOP_AGENT) as c, c.client() as client:
        # No agent yet: the coordinator runs this one itself, on its only slot.
        pool.submit(client.envelope, "demo.sleep", {"seconds": 30}, timeout=60)
        wait_for(lambda: client.status().scheduler.local_running == 1, 15, "the coordinator's slot to be busy")
        c.start_agent("agent1", slots=1)
        c.wait_agents_ready(["agent1"])
        pool.submit(client.envelope, "demo.sleep", {"seconds": 30}, timeout=60)
        wait_for(lambda: _running(client, "agent1") == 1, 15, "agent1's slot to be busy")
        st = client.status()
        assert st.scheduler.local_running == 1 and st.scheduler.queue_depth == 0

        env, took = _deadline_call(client)
        assert env.status == "error" and env.error["code"] == "deadline_exceeded", env
        assert env.attempts == 0, env  # it never ran anywhere: it waited for a slot
        assert took < 2.5, f"a 1 s deadline answered after {took:.2f} s"
        st = client.status()
        assert st.scheduler.local_running == 1 and _agent(st, "agent1").running == 1  # both still busy
        assert st.scheduler.queue_depth == 0


# ---------------------------------------------------------------- 6. drain runs out

def test_drain_running_out_answers_in_flight_calls(tmp_path):
    with concurrent.futures.ThreadPoolExecutor(1) as pool, \
            LocalCluster(agents=1, slots=1, workdir=str(tmp_path), coordinator_args=["--drain", "1"],
                         agent_args=FAST_STOP_AGENT) as c, c.client() as client:
        fut = pool.submit(client.envelope, "demo.sleep", {"seconds": 20})
        wait_for(lambda: _running(client, "agent1") >= 1, 15, "demo.sleep 20 to run on agent1")
        t0 = time.monotonic()
        assert c.coordinator is not None
        os.killpg(c.coordinator.pid, signal.SIGTERM)
        env = fut.result(timeout=30)
        took = time.monotonic() - t0
        assert took < 8, f"the in-flight call was answered {took:.1f} s after SIGTERM (--drain 1)"
        assert env.status == "error" and env.error["code"] == "unavailable", env
        msg = env.error["message"]
        assert "stopped before" in msg and "cannot reach the coordinator" not in msg, msg
        assert c.coordinator.wait(20) is not None  # and then it exits


# ---------------------------------------------------------------- 7. idle workers stop

def test_idle_workers_stop_and_start_again(volunteers):
    c = volunteers
    with concurrent.futures.ThreadPoolExecutor(1) as pool, c.client() as client:
        digest = _digest(client, "demo.sleep")
        fut = pool.submit(client.envelope, "demo.sleep", {"seconds": 2}, timeout=60)
        wait_for(lambda: _workers(c, digest) >= 1, 15, "a demo.sleep worker while the call runs")
        env = fut.result(timeout=60)
        assert env.ok and env.executed_by.startswith("agent"), env
        # --worker-idle 1: every worker of the package, and of every other package, stops.
        wait_for(lambda: _workers(c, digest) == 0, 10, "the idle demo.sleep workers to stop")
        wait_for(lambda: _workers(c) == 0, 10, "every idle worker of the agents to stop")
        assert all(p.poll() is None for p in c.agents.values())

        fut = pool.submit(client.envelope, "demo.sleep", {"seconds": 1.5}, timeout=60)
        wait_for(lambda: _workers(c, digest) >= 1, 15, "a new demo.sleep worker for the next call")
        env = fut.result(timeout=60)
        assert env.ok and env.executed_by.startswith("agent") and env.result["slept"] >= 1.5, env
        env = client.envelope("math.compute", {"a": 3, "b": 4, "op": "mul"}, timeout=30)
        assert env.ok and env.result == {"result": 12.0}


# ---------------------------------------------------------------- a caller's deadline is not the agent's fault

def test_calls_that_hit_their_own_deadline_do_not_quarantine_a_healthy_agent(tmp_path):
    """Three callers whose 1 s deadline is shorter than the job (demo.sleep 3) each get
    `deadline_exceeded`; the agent did nothing wrong, so it must keep taking jobs."""
    with LocalCluster(agents=1, slots=1, workdir=str(tmp_path),
                      coordinator_args=["--local-slots", "0", *FAST_STOP_COORDINATOR],
                      agent_args=FAST_STOP_AGENT) as c, c.client() as client:
        for _ in range(3):
            env = client.envelope("demo.sleep", {"seconds": 3}, timeout=1.0)
            assert env.status == "error" and env.error["code"] == "deadline_exceeded", env
        a = _agent(client.status(), "agent1")
        assert a.state != "quarantined", (f"agent1 quarantined for {a.quarantine_left_s:.0f} s for its callers' "
                                          f"deadlines (jobs_timed_out={a.jobs_timed_out})")
        env = client.envelope("demo.sleep", {"seconds": 0.1}, timeout=30)
        assert env.ok and env.executed_by == "agent1", env


def test_reconnect_backoff_with_jitter_stays_within_its_cap():
    from microswarm.agent.daemon import reconnect_delay
    backoff, cap = 0.5, 30.0
    for _ in range(12):  # 0.5, 1, 2, ... doubling past the cap, as the agent's loop does
        for rnd in (0.0, 0.5, 0.999999, None):
            d = reconnect_delay(backoff, cap, rnd)
            assert min(cap, backoff) * 0.5 <= d <= cap, (backoff, rnd, d)
        backoff = min(cap, backoff * 2)
    assert reconnect_delay(1000.0, cap, 0.999999) <= cap
