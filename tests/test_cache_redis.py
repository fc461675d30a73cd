"""The shared result region on Redis (--cache-url) and coordinators' presence, with real processes.

Each test starts its own redis-server on a free port (microswarm/redisserver.py: persistence off, a
temporary directory), never the machine's own, and two coordinators on it (LocalCluster, each with
its own state directory: the built-in services have the same digest everywhere, so their cache keys
agree). What the issue asks: a result computed behind A served from Redis by B, write-through's
entry in Redis when the answer arrives, write-behind's loss on SIGKILL bounded by the reported
queue, a convicted agent's entries purged from Redis and from the other coordinator's near cache,
Redis going away and coming back with calls answered throughout, and `status` on any coordinator
listing every live one (a SIGKILLed one gone within its TTL).
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from microswarm.cluster import LocalCluster, wait_for
from microswarm.redisserver import RedisServer, redis_binary

redis = pytest.importorskip("redis")
pytestmark = pytest.mark.skipif(redis_binary() is None, reason="redis-server is not installed")

LIAR = Path(__file__).parent / "data" / "lying_agent.py"
PREFIX = "microswarm"


@pytest.fixture
def rs() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def make(tmp_path: Path, rs: RedisServer) -> Iterator[Callable[..., LocalCluster]]:
    made: list[LocalCluster] = []

    def start(*args: str, agents: int = 0) -> LocalCluster:
        d = tmp_path / f"c{len(made)}"
        d.mkdir()
        c = LocalCluster(agents=agents, slots=2, workdir=str(d), coordinator_args=[
            "--insecure", "--cache-url", rs.url, "--local-slots", "1", "--queue-wait", "0.2", *args])
        made.append(c)
        return c.start()
    yield start
    for c in made:
        c.stop()


def db(rs: RedisServer) -> Any:
    return redis.Redis(host="127.0.0.1", port=rs.port, socket_timeout=2)


def entries(r: Any) -> list[bytes]:
    return sorted(r.scan_iter(match=f"{PREFIX}:r:*", count=1000))


def stats(c: LocalCluster) -> dict[str, Any]:
    with c.client() as cl:
        return json.loads(cl.status(timeout=5).cache_json)


def coordinators(c: LocalCluster) -> list[str]:
    with c.client() as cl:
        return [co.listen for co in cl.status(timeout=5).coordinators]


# ---------------------------------------------------------------- read-through, write-through, presence


def test_a_result_computed_behind_a_is_in_redis_at_once_and_served_by_b_then_from_its_near_cache(make, rs) -> None:
    a, b = make(), make()
    r = db(rs)
    x = {"a": 6.0, "b": 7.0, "op": "mul"}
    with a.client() as ca, b.client() as cb:
        env = ca.envelope("math.compute", x)
        assert env.ok and env.result == {"result": 42.0} and not env.cache_hit
        assert len(entries(r)) == 1  # write-through: in Redis before the answer came, no waiting
        assert r.ttl(entries(r)[0]) > 0  # Redis evicts it (a TTL for volatile-lru), not our governor
        env = cb.envelope("math.compute", x)
        assert env.ok and env.result == {"result": 42.0} and env.cache_hit and env.executed_by == "cache"
        s = stats(b)
        assert s["shared_hits"] == 1 and s["entries"] == 1  # read from Redis, then kept in B's near cache
        again = cb.envelope("math.compute", x)
        assert again.cache_hit and stats(b)["shared_hits"] == 1 and stats(b)["hits"] >= 2  # the near cache now
        env = cb.envelope("math.compute", {"a": 1.0, "b": 1.0})  # B computes: A reads it
        assert env.ok and not env.cache_hit
        assert ca.envelope("math.compute", {"a": 1.0, "b": 1.0}).cache_hit


def test_status_on_any_coordinator_lists_every_live_one_and_a_killed_one_leaves_within_its_ttl(make) -> None:
    a, b = make(), make()
    both = sorted([a.addr, b.addr])
    wait_for(lambda: sorted(coordinators(a)) == both and sorted(coordinators(b)) == both, 10,
             "each coordinator to list both")
    with a.client() as ca:
        st = ca.status(timeout=5)
        assert st.coordinators[0].here and st.coordinators[0].listen == a.addr  # the one that answered first
        peer = st.coordinators[1]
        assert not peer.here and peer.listen == b.addr and peer.uptime_s > 0 and peer.seen_s < 3
    out = subprocess.run([sys.executable, "-m", "microswarm.cli", "status", "--json", "--coordinator", a.addr],
                         capture_output=True, text=True, env=a.env(), timeout=60)
    assert out.returncode == 0, out.stderr
    assert sorted(co["listen"] for co in json.loads(out.stdout)["coordinators"]) == both
    table = subprocess.run([sys.executable, "-m", "microswarm.cli", "status", "--coordinator", b.addr],
                           capture_output=True, text=True, env=b.env(), timeout=60)
    assert "coordinators (2)" in table.stdout and "(this one)" in table.stdout
    killed = time.monotonic()
    b.kill_coordinator()
    wait_for(lambda: coordinators(a) == [a.addr], 3.0 + 1.5, "the killed coordinator to leave A's status")
    assert time.monotonic() - killed <= 3.0 + 1.5  # its TTL (3 s), plus a status round trip


# ---------------------------------------------------------------- write-behind


def test_write_behind_loses_at_most_the_reported_queue_on_sigkill(make, rs) -> None:
    a = make("--cache-write", "behind", "--cache-write-batch", "4", "--cache-write-interval", "600")
    r = db(rs)
    with a.client() as ca:
        for i in range(10):
            assert ca.envelope("math.compute", {"a": float(i), "b": 2.0}).ok
    # a batch goes as soon as 4 wait; the last 2 wait for the interval (600 s): the queue holds them
    wait_for(lambda: stats(a)["write_queue"] == 2 and len(entries(r)) == 8, 10, "two batches written, two queued")
    s = stats(a)
    assert s["shared_write"] == "behind" and s["write_queue_limit"] == 10_000 and s["write_batches"] == 2
    a.kill_coordinator()
    assert len(entries(r)) == 10 - s["write_queue"]  # lost: exactly what was reported queued


def test_write_behind_queue_is_bounded_and_kept_while_redis_is_away() -> None:
    from microswarm.coordinator.cache_shared import NearCache, SharedRegion
    from microswarm.coordinator.verify import seal

    async def run(server: RedisServer) -> None:
        region = SharedRegion(server.url, write="behind", queue_limit=3, batch=100, interval_s=0.02)
        near = NearCache(region)
        await region.start()
        await asyncio.wait_for(region._up_event.wait(), 5)
        server.stop()  # Redis goes away
        await asyncio.sleep(0.05)
        for i in range(5):
            near.put(bytes([i]) * 32, seal(b"\x90", ["agentX"], True), None)
        deadline = time.monotonic() + 5
        while region.up and time.monotonic() < deadline:  # the flusher finds out
            await asyncio.sleep(0.02)
        s = near.stats()
        assert not s["shared_up"] and s["write_queue"] == 3 and s["write_dropped"] == 2 and s["entries"] == 5
        server.start()  # back, on the same port: the queue is flushed
        deadline = time.monotonic() + 10
        while (region.queue or not region.up) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert region.up and not region.queue and region.n["writes"] == 3
        await region.stop()

    with RedisServer() as server:
        asyncio.run(run(server))
        assert len(entries(db(server))) == 3


# ---------------------------------------------------------------- purge of a convicted agent


def start_liar(c: LocalCluster, agent_id: str, *liar_args: str) -> Path:
    lies = c.dir / f"{agent_id}.lies"
    f = open(c.dir / f"agent-{agent_id}.log", "ab")
    c._logs.append(f)
    c.agents[agent_id] = subprocess.Popen(
        [sys.executable, str(LIAR), "--lie-log", str(lies), *liar_args, "--", "--coordinator", c.addr,
         "--token", c.token, "--id", agent_id, "--slots", "2", "--state-dir", str(c.agent_state(agent_id))],
        stdout=f, stderr=subprocess.STDOUT, env=c.env(), start_new_session=True)
    c.wait_agents_ready([agent_id], timeout=60)
    return lies


def test_a_convicted_agents_entries_are_purged_from_redis_and_from_the_other_near_cache(make, rs) -> None:
    a, b = make("--verify", "always"), make()
    lies = start_liar(a, "liar", "--lie-after", "4")
    r = db(rs)
    honest = [{"a": float(i), "b": 10.0, "op": "add"} for i in range(4)]
    with a.client() as ca, b.client() as cb:
        for x in honest:  # confirmed by the coordinator, cached with both producers
            assert ca.envelope("math.compute", x).ok
        assert not lies.exists() or not lies.read_text().strip(), "it lied too early: the test shows nothing"
        assert r.scard(f"{PREFIX}:by:liar") == 4 and len(entries(r)) == 4
        for x in honest:  # B reads them from Redis into its near cache
            assert cb.envelope("math.compute", x).cache_hit
        assert stats(b)["entries"] == 4
        for i in range(10, 30):  # now it lies: A's own answer stands and the liar is convicted
            env = ca.envelope("math.compute", {"a": float(i), "b": 10.0, "op": "add"})
            assert env.ok and env.result == {"result": i + 10.0}
            if lies.exists() and lies.read_text().strip():
                break
        wait_for(lambda: stats(b)["purged"] >= 4, 10, "B's near cache to drop the liar's entries")
        assert not r.exists(f"{PREFIX}:by:liar") and r.hexists(f"{PREFIX}:convicted", "liar")
        assert all(b"liar" not in (r.get(k) or b"")[:64] for k in entries(r))
        assert stats(a)["shared_purged"] >= 4
        for x in honest:  # computed anew by B (no agent there), right
            env = cb.envelope("math.compute", x)
            assert env.ok and not env.cache_hit and env.result == {"result": x["a"] + 10.0}


# ---------------------------------------------------------------- Redis goes away and comes back


def test_calls_are_answered_while_redis_is_away_and_entries_flow_again_after(make, rs) -> None:
    a, b = make(), make()
    with a.client() as ca, b.client() as cb:
        assert ca.envelope("math.compute", {"a": 1.0, "b": 1.0}).ok
        rs.stop()  # SIGKILL: Redis is gone
        t0 = time.monotonic()
        for i in range(20):  # new inputs run, known ones come from the near cache: every call answered
            env = ca.envelope("math.compute", {"a": float(i), "b": 1.0}, timeout=10)
            assert env.ok and env.result == {"result": i + 1.0}
            env = cb.envelope("math.compute", {"a": float(i), "b": 2.0}, timeout=10)
            assert env.ok and env.result == {"result": i + 2.0}
        assert time.monotonic() - t0 < 20
        assert ca.envelope("math.compute", {"a": 1.0, "b": 1.0}).cache_hit  # A's near cache
        s = stats(a)
        assert s["shared_up"] is False and s["shared_outages"] == 1
        assert a.log("coordinator.log").count("unreachable") == 1  # logged once
        rs.start()  # back on the same port (empty: persistence is off)
        wait_for(lambda: stats(a)["shared_up"] and stats(b)["shared_up"], 15, "both to reconnect")
        assert "reachable again" in a.log("coordinator.log")
        x = {"a": 100.0, "b": 5.0}
        assert not ca.envelope("math.compute", x).cache_hit
        env = cb.envelope("math.compute", x)
        assert env.cache_hit and env.executed_by == "cache" and env.result == {"result": 105.0}
        wait_for(lambda: len(coordinators(a)) == 2, 5, "presence to be back")
