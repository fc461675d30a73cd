"""Several coordinators of one cluster (issue 14): agents and clients given `a:7070,b:7070` move to
another coordinator when theirs dies, and a client sends a call again only when that cannot run it
twice. The second coordinator here shares the first one's identity, operator credential and
certificate by a copy of its state directory (what deploy/ does for a cluster), so one join token
and one pin serve both."""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from microcores._failover import Cluster, addresses, never_sent
from microcores.client import AsyncClient, Client, publish
from microcores.errors import Unavailable
from microswarm.cluster import LocalCluster, free_port, wait_for

DATA = Path(__file__).parent / "data"
ARGS = ["--verify", "off"]  # (each runs jobs itself too while its agents move: no call waits on a move)


# ---------------------------------------------------------------- the rules

def test_addresses_and_the_resend_rule() -> None:
    assert addresses("a:1, b:2") == ["a:1", "b:2"] and addresses("a:1") == ["a:1"]
    with pytest.raises(ValueError, match="empty entry"):
        addresses("a:1,,b:2")
    one = Cluster("a:1")
    assert not one.may_resend("s", sent=False)  # nowhere else to go
    two = Cluster("a:1,b:2")
    assert two.may_resend("s", sent=False)      # it reached nobody: anywhere is fine
    assert not two.may_resend("s", sent=True)   # in flight, not known to be idempotent: never twice
    two.learn("s", True)
    assert two.may_resend("s", sent=True)
    two.learn("s", False)
    assert not two.may_resend("s", sent=True)
    assert two.advance("a:1") and two.target == "b:2"
    assert not two.advance("a:1")               # someone moved already: not again
    assert "may or may not have run" in two.lost("s", "a:1").message
    assert never_sent("failed to connect to all addresses; last error: UNKNOWN: Connection refused")
    assert not never_sent("Socket closed")


# ---------------------------------------------------------------- two coordinators, one cluster

class Pair:
    def __init__(self, tmp: Path) -> None:
        # (the side-effect service writes to the test's files: its agents run jobs without the namespaces)
        self.c = LocalCluster(agents=0, slots=2, workdir=str(tmp), coordinator_args=ARGS,
                              env={"MICROSWARM_SANDBOX": "off"})
        self.b_proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "Pair":
        c = self.c
        c.start_coordinator()
        publish(str(DATA / "side_effects.py"), coordinator=c.addr, state_dir=str(c.state))
        self.a = c.addr
        b_state = c.dir / "state-b"  # the same identity, credential, certificate, join secrets, packages
        shutil.copytree(c.state, b_state, ignore=shutil.ignore_patterns("*.lock", "calls.jsonl"))
        self.b = f"127.0.0.1:{free_port()}"
        self.b_proc = c._spawn(["coordinator", "start", "--listen", self.b, "--state-dir", str(b_state), *ARGS],
                               "coordinator-b.log")
        with Client(self.b, state_dir=str(c.state), insecure=False) as cb:
            wait_for(lambda: _answers(cb), 30, "coordinator b to answer", 0.1)
        c.addr = f"{self.a},{self.b}"  # what agents and clients are given from here on
        return self

    def agents_on(self, addr: str) -> set[str]:
        try:
            with Client(addr, state_dir=str(self.c.state)) as cl:
                return {a.agent_id for a in cl.status(timeout=3).agents if a.state == "ready" and a.versions}
        except Unavailable:
            return set()

    def stop(self) -> None:
        if self.b_proc is not None and self.b_proc.poll() is None:
            os.killpg(self.b_proc.pid, signal.SIGTERM)
            try:
                self.b_proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.b_proc.pid, signal.SIGKILL)
        self.c.stop()


def _answers(c: Client) -> bool:
    try:
        c.status(timeout=2)
        return True
    except Unavailable:
        return False


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    p = Pair(tmp_path)
    try:
        yield p.start()
    finally:
        p.stop()


def test_a_dead_first_address_is_skipped(pair: Pair) -> None:
    """Nothing listens at the first address: calls (any service) and agents go to the next one."""
    dead = f"127.0.0.1:{free_port()}"
    with Client(f"{dead},{pair.b}", state_dir=str(pair.c.state)) as cl:
        assert cl.status().coordinator_id  # (status goes through the same channel)
    pair.c.addr = f"{dead},{pair.b}"
    pair.c.start_agent("agent1")
    wait_for(lambda: pair.agents_on(pair.b) == {"agent1"}, 60, "agent1 to join b past the dead address")

    async def main() -> None:
        async with AsyncClient(f"{dead},{pair.b}", state_dir=str(pair.c.state)) as ac:
            env = await ac.envelope("math.compute", {"a": 6, "b": 7, "op": "mul"}, timeout=30)
            assert env.ok and env.result == {"result": 42.0} and env.executed_by == "agent1"
    asyncio.run(main())


def test_coordinator_killed_under_load_loses_no_idempotent_call(pair: Pair) -> None:
    c = pair.c
    for aid in ("agent1", "agent2", "agent3"):
        c.start_agent(aid)
    wait_for(lambda: pair.agents_on(pair.a) | pair.agents_on(pair.b) == {"agent1", "agent2", "agent3"}, 60,
             "three agents on the two coordinators")
    outcomes: list[Any] = []
    killed_at: list[float] = []
    stop = asyncio.Event

    async def main() -> None:
        done = stop()
        async with AsyncClient(c.addr, state_dir=str(c.state)) as ac:
            async def caller(k: int) -> None:
                i = 0
                while not done.is_set():
                    i += 1
                    env = await ac.envelope("math.compute", {"a": k, "b": i, "op": "add"}, timeout=30)
                    outcomes.append((env.ok, env.result, float(k + i), env.error, time.monotonic()))
            tasks = [asyncio.create_task(caller(k * 1000)) for k in range(8)]
            await asyncio.sleep(1.5)
            os.killpg(c.coordinator.pid, signal.SIGKILL)  # type: ignore[union-attr]
            killed_at.append(time.monotonic())
            await asyncio.sleep(4.0)
            done.set()
            await asyncio.gather(*tasks)
    asyncio.run(main())
    wrong = [o for o in outcomes if not o[0] or o[1] != {"result": o[2]}]
    assert not wrong, wrong[:5]
    assert sum(1 for o in outcomes if o[4] > killed_at[0]) > 20  # calls went on, on b
    t0 = killed_at[0]
    wait_for(lambda: pair.agents_on(pair.b) == {"agent1", "agent2", "agent3"}, 30, "every agent on b")
    failover_s = time.monotonic() - t0
    assert failover_s < 30


def test_non_idempotent_call_in_flight_is_not_sent_again(pair: Pair, tmp_path: Path) -> None:
    c = pair.c
    c.addr = pair.a  # the agent on a only, so the job runs behind the coordinator we kill
    c.start_agent("agent1")
    wait_for(lambda: pair.agents_on(pair.a) == {"agent1"}, 60, "agent1 on a")
    effects = tmp_path / "effects"

    def slow_call() -> Any:
        with Client(f"{pair.a},{pair.b}", state_dir=str(c.state)) as cl:
            cl.call("math.compute", {"a": 1, "b": 1, "op": "add"}, timeout=30)  # learns nothing of effects.*
            try:
                return cl.envelope("effects.append", {"path": str(effects), "token": "t1", "seconds": 3},
                                   timeout=30)
            except Unavailable as exc:
                return exc
    import concurrent.futures
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(slow_call)
        wait_for(lambda: (tmp_path / "effects.started").exists(), 30, "the job to start on agent1")
        os.killpg(c.coordinator.pid, signal.SIGKILL)  # type: ignore[union-attr]
        got = fut.result(60)
    assert isinstance(got, Unavailable) and "may or may not have run" in got.message, got
    time.sleep(1.0)
    assert (tmp_path / "effects.started").read_text().count("t1") == 1  # not run again behind b
