"""A call routed to a coordinator whose agents can take it (issue 14; coordinator/forward.py).

Real processes on a PostgreSQL and a Redis these tests start themselves: coordinator A has no
agent (but a worker slot of its own, which it must not use while a peer's agents can take the
call), coordinator B of the same cluster has one. Calls made at A run on B's agent and come back
through A; nested calls keep the original client's scope; a client cannot pass itself off as a
forwarding coordinator; local agents come first; when B dies with a call in flight, a pure or
idempotent call runs at A instead and any other is answered `outcome_unknown`, never run twice.
"""
from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from microswarm import pgserver
from microswarm.cluster import LocalCluster, wait_for
from microswarm.redisserver import RedisServer, redis_binary

pytestmark = [pytest.mark.skipif(not pgserver.available(), reason="PostgreSQL binaries not installed"),
              pytest.mark.skipif(redis_binary() is None, reason="redis-server is not installed")]

DATA = Path(__file__).parent / "data"
ARGS = ["--local-slots", "1", "--queue-wait", "0.2"]
SANDBOX_OFF = {"MICROSWARM_SANDBOX": "off"}
SERVICES = ("math.compute", "math.compute_and_classify", "demo.echo_bytes", "effects.append",
            "effects.append_idempotent")


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[pgserver.PgServer, RedisServer]]:  # (pairs come and go on the same two)
    with pgserver.PgServer() as pg, RedisServer() as rs:
        yield pg, rs


class Pair:
    """A (no agents) and B (one agent, b-agentN): one identity, one PostgreSQL, one Redis."""

    made = 0

    def __init__(self, pg: pgserver.PgServer, rs: RedisServer) -> None:
        Pair.made += 1  # agent ids are bound to their keys in the shared database: new ones each time
        self.agent = f"b-agent{Pair.made}"
        url = pg.database(f"cluster{Pair.made}")  # a cluster's packages are signed by its own identity
        # (the side-effect service writes to the test's files: agents run jobs without the namespaces)
        self.a = LocalCluster(agents=0, slots=2, state_url=url, coordinator_args=[*ARGS, "--cache-url", rs.url],
                              env=SANDBOX_OFF, http=True)
        self.b: LocalCluster | None = None

    def start(self) -> "Pair":
        from microcores.client import publish
        self.a.start()
        publish(str(DATA / "side_effects.py"), coordinator=self.a.addr, state_dir=str(self.a.state))
        b = self.b = self.a.peer(agents=0, env=SANDBOX_OFF)
        b.start_coordinator()
        b.start_agent(self.agent)
        b.wait_agents_ready()
        wait_for(lambda: self.peer_holds(*SERVICES), 30, "A to see that B's agent holds the services")
        return self

    def peer_holds(self, *services: str) -> bool:
        """A's view of B, through Redis (refreshed each second): B's agent holds every one of
        `services`. Probed with an empty input, which B refuses (invalid_input) without running."""
        with self.a.client() as ca:
            return all(ca.envelope(s, {}, timeout=10).coordinator for s in services)

    def coordinators(self) -> dict[str, Any]:
        """Each coordinator's own record (fresh: a peer's, as seen through Redis, is up to 1 s old)."""
        out = {}
        for name, c in (("a", self.a), ("b", self.b)):
            with c.client() as cl:  # type: ignore[union-attr]
                out[name] = next(x for x in cl.status(timeout=5).coordinators if x.here)
        return out

    def stop(self) -> None:
        if self.b is not None:
            self.b.stop()
        self.a.stop()

    def __enter__(self) -> "Pair":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="module")
def pair(servers: tuple[pgserver.PgServer, RedisServer]) -> Iterator[Pair]:
    with Pair(*servers) as p:
        yield p


@pytest.fixture
def fresh(servers: tuple[pgserver.PgServer, RedisServer]) -> Iterator[Pair]:
    with Pair(*servers) as p:
        yield p


def test_a_call_at_a_coordinator_without_agents_runs_on_the_agents_of_another(pair: Pair) -> None:
    before = pair.coordinators()
    with pair.a.client() as ca:
        for i in range(20):
            env = ca.envelope("math.compute", {"a": i, "b": 3, "op": "mul"}, timeout=30)
            assert env.ok and env.result == {"result": float(i * 3)}, env
            # B's agent ran it, not A's own worker slot (--local-slots 1), and the envelope says where
            assert env.executed_by == pair.agent and env.coordinator and env.coordinator != "", env
    after = pair.coordinators()
    assert after["a"].forwarded - before["a"].forwarded >= 20
    assert after["b"].received - before["b"].received >= 20
    assert pair.b is not None and after["b"].peer == pair.b.addr
    from prometheus_client.parser import text_string_to_metric_families
    with pair.a.urlopen(pair.a.http_url + "/metrics", timeout=10) as r:
        samples = {s.name: s.value for f in text_string_to_metric_families(r.read().decode()) for s in f.samples}
    assert samples["microswarm_calls_forwarded_total"] >= after["a"].forwarded


def test_a_large_input_and_output_go_through_the_peer(pair: Pair) -> None:
    """Past 1 MiB both ways: the input goes to B in pieces, the output comes back whole."""
    import asyncio
    blob = os.urandom(3 << 20)

    async def main() -> Any:
        async with pair.a.async_client() as ac:
            return await ac.envelope("demo.echo_bytes", {"data": blob}, timeout=60)
    env = asyncio.run(main())
    assert env.ok and env.result["data"] == blob and env.executed_by == pair.agent, env.error


def test_nested_calls_of_a_forwarded_call_stay_within_the_clients_scope(pair: Pair) -> None:
    from microcores.client import Client
    narrow = pair.a.create_client("narrow", "math.compute_and_classify", "math.compute")
    wide = pair.a.create_client("wide", "math.*", "numbers.*")
    for creds, ok in ((narrow, False), (wide, True)):
        with Client(pair.a.addr, client_id=creds["client_id"], client_secret=creds["client_secret"],
                    state_dir=str(pair.a.state)) as cl:
            env = cl.envelope("math.compute_and_classify", {"a": 2, "b": 3, "op": "add"}, timeout=30)
        if ok:
            assert env.ok and env.executed_by == pair.agent, env
        else:  # its job's nested call to math.is_positive is outside the client's scope, on B too
            assert not env.ok and "numbers.is_positive" in env.error["message"] and "scope" in env.error["message"], env


def test_a_client_cannot_pass_itself_off_as_a_forwarding_coordinator(pair: Pair) -> None:
    """`forwarded_by`, `client` and `scopes` count only on the operator's credential: a client that
    sets them is still itself, within its own scope, and its call is still sent on as usual."""
    from microcores import _codec, _tls
    from microcores.client import CHANNEL_OPTIONS, Client
    from microswarm.protos import microswarm_pb2 as pb
    from microswarm.protos import microswarm_pb2_grpc as pbg
    creds = pair.a.create_client("forger", "math.compute_and_classify", "math.compute")
    with Client(pair.a.addr, client_id=creds["client_id"], client_secret=creds["client_secret"],
                state_dir=str(pair.a.state)) as cl:
        token = cl.token()
    ch = _tls.resolve(pair.a.addr, state_dir=str(pair.a.state), insecure=False).channel(pair.a.addr, CHANNEL_OPTIONS)
    try:
        stub = pbg.CoordinatorStub(ch)
        forged = pb.CallRequest(service="math.compute_and_classify", encoding=pb.MSGPACK,
                                input=_codec.pack({"a": 5, "b": 7, "op": "add"}), client="operator",
                                forwarded_by="some-coordinator", scopes=["*"])
        reply = stub.Call(forged, metadata=[("authorization", f"Bearer {token}")], timeout=30)
    finally:
        ch.close()
    assert reply.status == "error" and "scope" in reply.error.message, reply
    assert reply.coordinator  # it was sent on to B (not taken as already forwarded), and refused there


def test_a_forged_presence_record_draws_no_call_and_no_credential(pair: Pair, servers: Any, tmp_path: Path) -> None:
    """Someone who can write to Redis adds a record with the cluster's fingerprint, a great many free
    slots for math.compute and the address of an impostor (a real process with a key of its own):
    A tries it first, the TLS pin to the cluster's identity fails before anything is sent, and the
    calls go to B. The impostor's log stays empty."""
    import json
    import subprocess
    import sys

    import redis

    from microswarm.cluster import free_port
    addr, log = f"127.0.0.1:{free_port()}", tmp_path / "impostor.jsonl"
    out = open(tmp_path / "impostor.out", "ab")
    fake = subprocess.Popen([sys.executable, str(DATA / "fake_coordinator.py"), "--listen", addr, "--log", str(log)],
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    r = redis.Redis(port=servers[1].port)
    try:
        wait_for(lambda: "fake coordinator on" in (tmp_path / "impostor.out").read_text(), 20, "the impostor")
        with pair.a.client() as ca:
            st = ca.status(timeout=5)
        digest = {x.name: x.digest for x in st.services}["math.compute"]
        fingerprint = next(c.fingerprint for c in st.coordinators if c.here)
        forged = {"id": "evil/1", "listen": addr, "peer": addr, "fingerprint": fingerprint, "agents": 50,
                  "slots": 1000, "holds": {digest: 1000}, "seen": time.time(), "ttl_s": 3600}
        r.set("microswarm:coordinator:evil/1", json.dumps(forged))
        r.sadd("microswarm:coordinators", "evil/1")
        with pair.a.client() as ca:
            def tried() -> bool:
                env = ca.envelope("math.compute", {"a": time.time(), "b": 1.0, "op": "add"}, timeout=30)
                assert env.ok and env.executed_by == pair.agent, env
                return "evil/1" in pair.a.log("coordinator.log")
            wait_for(tried, 30, "A to try the forged peer")
            for i in range(10):
                env = ca.envelope("math.compute", {"a": time.time(), "b": float(i), "op": "add"}, timeout=30)
                assert env.ok and env.executed_by == pair.agent and env.coordinator != "evil/1", env
    finally:
        r.delete("microswarm:coordinator:evil/1")
        r.srem("microswarm:coordinators", "evil/1")
        fake.kill()
        fake.wait(10)
    assert not log.exists() or log.read_text() == "", log.read_text()


def test_local_agents_come_first(fresh: Pair) -> None:
    a = fresh.a
    a.start_agent(f"a-{fresh.agent}")
    a.wait_agents_ready()
    with a.client() as ca:
        got = {ca.envelope("math.compute", {"a": i, "b": 1, "op": "add"}, timeout=30).executed_by for i in range(20)}
    assert got == {f"a-{fresh.agent}"}, got


def test_peer_killed_mid_call_idempotent_runs_here_other_is_outcome_unknown(pair: Pair, fresh: Pair,
                                                                           tmp_path: Path) -> None:
    """B is SIGKILLed while its agent runs two calls sent on from A: the idempotent one is run again
    at A (its own worker: no agent left in its cluster), the other is answered `outcome_unknown`,
    once. The module's pair, another cluster (another identity) on the same Redis whose agent holds
    the same packages, is never sent anything."""
    effects = tmp_path / "effects"
    idem = tmp_path / "idem"

    def call(service: str, path: Path) -> Any:
        with fresh.a.client() as ca:
            return ca.envelope(service, {"path": str(path), "token": "t1", "seconds": 3}, timeout=30)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        once = pool.submit(call, "effects.append", effects)
        again = pool.submit(call, "effects.append_idempotent", idem)
        wait_for(lambda: (tmp_path / "effects.started").exists() and (tmp_path / "idem.started").exists(), 30,
                 "both jobs to start on B's agent")
        assert fresh.b is not None and fresh.b.coordinator is not None
        os.killpg(fresh.b.coordinator.pid, signal.SIGKILL)
        for p in list(fresh.b.agents.values()):  # its agent goes too: nothing left but A
            os.killpg(p.pid, signal.SIGKILL)
        t0 = time.monotonic()
        env_once, env_again = once.result(60), again.result(60)
    assert not env_once.ok and env_once.error["code"] == "outcome_unknown", env_once
    assert "may or may not have run" in env_once.error["message"]
    assert env_again.ok and env_again.executed_by == "coordinator" and not env_again.coordinator, env_again
    time.sleep(0.5)
    assert (tmp_path / "effects.started").read_text().count("t1") == 1  # never run a second time
    print(f"answered {time.monotonic() - t0:.2f} s after B was killed")


def test_peer_frozen_mid_call_an_idempotent_call_runs_here_within_the_presence_ttl(fresh: Pair,
                                                                                  tmp_path: Path) -> None:
    """B is frozen (SIGSTOP, its agent too) while its agent runs an idempotent call sent on from A:
    its connection stays open, but its presence record lapses (3 s), and A runs the call itself,
    well before the call's deadline (30 s)."""
    assert fresh.b is not None and fresh.b.coordinator is not None
    frozen = [fresh.b.coordinator.pid, *(p.pid for p in fresh.b.agents.values())]

    def call() -> Any:
        with fresh.a.client() as ca:
            return ca.envelope("effects.append_idempotent", {"path": str(tmp_path / "idem"), "token": "t1",
                                                             "seconds": 2}, timeout=30)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            fut = pool.submit(call)
            wait_for(lambda: (tmp_path / "idem.started").exists(), 30, "the job to start on B's agent")
            for pid in frozen:
                os.killpg(pid, signal.SIGSTOP)
            t0 = time.monotonic()
            env = fut.result(60)
            took = time.monotonic() - t0
    finally:
        for pid in frozen:
            os.killpg(pid, signal.SIGCONT)
    assert env.ok and env.executed_by == "coordinator" and not env.coordinator, env
    assert took < 15, f"answered {took:.1f} s after B froze"
