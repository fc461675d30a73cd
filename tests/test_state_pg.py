"""Shared state on PostgreSQL (issue 14): real coordinators sharing a throwaway PostgreSQL that these
tests start themselves (microswarm/pgserver.py); never a server they did not create.

Two coordinators, A and B, with copies of one identity and one --state-url; one agent on each.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from microswarm import pgserver
from microswarm.cluster import LocalCluster, wait_for

pytestmark = pytest.mark.skipif(not pgserver.available(), reason="PostgreSQL binaries not installed "
                                "(apt-get install postgresql; .ci/run does)")

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def pg() -> Iterator[pgserver.PgServer]:
    with pgserver.PgServer() as server:
        yield server


@pytest.fixture(scope="module")
def pair(pg: pgserver.PgServer) -> Iterator[tuple[LocalCluster, LocalCluster]]:
    a = LocalCluster(agents=1, slots=2, state_url=pg.url, coordinator_args=["--local-slots", "0"])
    b: LocalCluster | None = None
    try:
        a.start()
        b = a.peer(agents=0)
        b.start_coordinator()
        b.start_agent("b-agent1")
        b.wait_agents_ready()
        yield a, b
    finally:
        if b is not None:
            b.stop()
        a.stop()


def _cli(c: LocalCluster, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "microswarm.cli", *args], capture_output=True, text=True,
                          env=c.env(), timeout=timeout)


def _versioned(tmp_path: Path, name: str, factor: int) -> Path:
    src = (DATA / "versioned.py").read_text().replace('"tests.versioned"', f'"tests.{name}"') \
        .replace("data.x * 1", f"data.x * {factor}")
    p = tmp_path / f"{name}_{factor}" / f"{name}.py"
    p.parent.mkdir(parents=True)
    p.write_text(src)
    return p


def _publish(c: LocalCluster, path: Path) -> Any:
    from microcores.client import publish
    (rep,) = publish(str(path), coordinator=c.addr, state_dir=str(c.state))
    return rep


def test_migrations_apply_once_even_when_started_at_once(pg: pgserver.PgServer) -> None:
    """Two processes migrate a fresh database at the same moment: each migration is applied once."""
    import psycopg

    from microswarm.coordinator.pgstate import MIGRATIONS, PgState
    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute("CREATE DATABASE fresh")
    url = pg.url.rsplit("/", 1)[0] + "/fresh"
    env = {**os.environ, "MICROSWARM_STATE_URL": url}
    procs = [subprocess.Popen([sys.executable, "-m", "microswarm.cli", "coordinator", "token", "--state-dir",
                               str(Path(pg.dir) / f"cli{i}")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert all(o[0].strip().startswith("msw") for o in outs)
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT version, name FROM schema_migrations ORDER BY version").fetchall()
    assert [r[1] for r in rows] == sorted(f.name for f in MIGRATIONS.glob("[0-9]*.sql"))
    results: list[list[str]] = []
    threads = [threading.Thread(target=lambda: results.append(PgState(url).migrate())) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [[], [], []]  # idempotent


def test_publish_on_a_is_served_by_agents_of_b(pair: tuple[LocalCluster, LocalCluster], tmp_path: Path) -> None:
    a, b = pair
    rep = _publish(a, _versioned(tmp_path, "shared", 3))
    with b.client() as cb:
        def rolled_out() -> bool:
            st = cb.status()
            svc = {s.name: s for s in st.services}.get("tests.shared")
            agent = next((x for x in st.agents if x.agent_id == "b-agent1"), None)
            return svc is not None and svc.digest == rep.digest and agent is not None \
                and "tests.shared@1" in agent.versions
        t0 = time.monotonic()
        wait_for(rolled_out, 30, "B's registry and B's agent to follow the publish on A")
        env = cb.envelope("tests.shared", {"x": 7})
        assert env.ok and env.result["y"] == 21 and env.executed_by == "b-agent1", env
    # a new revision on A: B follows the rollout too
    rep2 = _publish(a, _versioned(tmp_path, "shared", 5))
    assert rep2.revision == rep.revision + 1
    with b.client() as cb:
        wait_for(lambda: cb.envelope("tests.shared", {"x": 2}).result["y"] == 10, 30, "revision 2 on B")
    print(f"rollout seen on B after {time.monotonic() - t0:.2f} s")


def test_client_made_on_a_works_on_b_and_its_revocation_is_seen_within_a_second(
        pair: tuple[LocalCluster, LocalCluster]) -> None:
    from microcores.client import Client
    from microcores.errors import MicroError
    a, b = pair
    creds = a.create_client("shared-client", "math.*", "tests.*")
    kw = dict(client_id=creds["client_id"], client_secret=creds["client_secret"], state_dir=str(b.state),
              insecure=not b.tls)
    with Client(b.addr, **kw) as cl:  # type: ignore[arg-type]
        def works() -> bool:
            try:
                return bool(cl.envelope("math.compute", {"a": 1, "b": 1}).ok)
            except MicroError:
                return False
        wait_for(works, 5, "the client made on A to be accepted by B")
        r = _cli(a, "clients", "revoke", creds["client_id"])
        assert r.returncode == 0, r.stderr
        t0 = time.monotonic()

        def refused() -> bool:
            try:
                env = cl.envelope("math.compute", {"a": 1, "b": 1})
            except MicroError as exc:
                return exc.code == "unauthenticated"
            return not env.ok and env.error.code == "unauthenticated"
        wait_for(refused, 1.0, "B to refuse the client revoked on A", 0.02)
        print(f"revocation seen on B after {time.monotonic() - t0:.3f} s")


def _stub(c: LocalCluster) -> tuple[Any, Any]:
    from microcores import _tls
    from microcores.client import CHANNEL_OPTIONS
    from microswarm.protos import microswarm_pb2_grpc as pbg
    ch = _tls.resolve(c.addr, state_dir=str(c.state), insecure=not c.tls).channel(c.addr, CHANNEL_OPTIONS)
    return ch, pbg.CoordinatorStub(ch)


def test_bearer_token_from_b_works_on_a_and_its_revocation_on_a_reaches_b(
        pair: tuple[LocalCluster, LocalCluster]) -> None:
    """Tokens are written behind, with the journal record in the NOTIFY: issued on one, good on all;
    revoked (RFC 7009) on one, refused on all."""
    from microcores.client import Client
    from microcores.errors import MicroError
    from microswarm.protos import microswarm_pb2 as pb
    a, b = pair
    creds = a.create_client("bearer-client", "math.*")
    chb, stub_b = _stub(b)
    cha, stub_a = _stub(a)
    with chb, cha:
        def token() -> Any:
            try:
                return stub_b.Token(pb.TokenRequest(grant_type="client_credentials", client_id=creds["client_id"],
                                                    client_secret=creds["client_secret"]), timeout=10)
            except Exception:
                return None
        reply = wait_for(token, 5, "B to know the client made on A")

        def ok_on(c: LocalCluster) -> bool:
            with Client(c.addr, bearer=reply.access_token, state_dir=str(c.state), insecure=not c.tls) as cl:
                try:
                    return bool(cl.envelope("math.compute", {"a": 5, "b": 5}).ok)
                except MicroError:
                    return False
        wait_for(lambda: ok_on(a), 2, "a token issued on B to be accepted by A", 0.05)
        stub_a.Revoke(pb.RevokeRequest(client_id=creds["client_id"], client_secret=creds["client_secret"],
                                       token=reply.refresh_token), timeout=10)  # the family goes with it
        t0 = time.monotonic()
        wait_for(lambda: not ok_on(b), 1.5, "B to refuse a token revoked on A", 0.05)
        print(f"token revocation seen on B after {time.monotonic() - t0:.3f} s")


def test_join_token_revoked_on_a_disconnects_its_agents_on_b(pair: tuple[LocalCluster, LocalCluster]) -> None:
    a, b = pair
    r = _cli(b, "coordinator", "token", "--name", "short-lived")  # minted beside B this time
    assert r.returncode == 0, r.stderr
    shared, b.token = b.token, r.stdout.strip()
    try:
        p = b.start_agent("short1")
        b.wait_agents_ready(["short1"], timeout=30)
    finally:
        b.token = shared
    r = _cli(a, "coordinator", "tokens", "revoke", "short-lived")
    assert r.returncode == 0, r.stderr
    t0 = time.monotonic()
    try:
        p.wait(15)
    except subprocess.TimeoutExpired:
        pytest.fail("the agent of a token revoked on A still runs on B:\n" + b.log("agent-short1.log")[-2000:])
    assert "token_revoked" in b.log("agent-short1.log") or "revoked" in b.log("agent-short1.log")
    print(f"agent of the revoked token gone from B after {time.monotonic() - t0:.2f} s")
    b.agents.pop("short1")
    r = _cli(a, "coordinator", "tokens", "list", "--json")
    assert r.returncode == 0 and any(t["name"] == "short-lived" and t["revoked"] for t in json.loads(r.stdout)), \
        r.stdout


def test_join_token_and_key_binding_are_shared(pair: tuple[LocalCluster, LocalCluster], pg: pgserver.PgServer) -> None:
    import psycopg
    a, b = pair
    r = _cli(a, "coordinator", "token", "--name", "mover-vol")  # minted on A's side (its state_url)
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip()
    b.token, a_token = token, a.token
    b.start_agent("mover")  # the agent's own key, in its own state directory
    b.wait_agents_ready(["mover"], timeout=30)
    with psycopg.connect(pg.url) as conn:
        wait_for(lambda: conn.execute("SELECT 1 FROM agent_keys WHERE agent_id = 'mover'").fetchone(), 10,
                 "the binding of 'mover' to be stored")
    time.sleep(0.3)  # the NOTIFY's way to A
    # another key under the same id, on A: refused (the binding made on B holds there too)
    a.token = token
    imp = a.start_agent("mover", extra=["--state-dir", str(a.dir / "impostor")])
    try:
        imp.wait(30)
    except subprocess.TimeoutExpired:
        pytest.fail("the impostor was not refused:\n" + a.log("agent-mover.log")[-2000:])
    assert "agent_id_taken" in a.log("agent-mover.log")
    # the agent itself moves from B to A (same key): accepted
    b.kill_agent("mover")
    b.agents.pop("mover").wait(10)
    p = a._spawn(["agent", "start", "--coordinator", a.addr, "--token", token, "--id", "mover", "--slots", "1",
                  "--state-dir", str(b.agent_state("mover"))], "agent-mover-moved.log")
    a.agents["mover"] = p
    a.token = a_token
    a.wait_agents_ready(["mover"], timeout=30)


def test_postgres_away_then_back(pair: tuple[LocalCluster, LocalCluster], pg: pgserver.PgServer,
                                 tmp_path: Path) -> None:
    from microcores.errors import MicroError
    a, b = pair
    with a.client() as ca, b.client() as cb:
        assert cb.envelope("math.compute", {"a": 1, "b": 1}).ok  # a token in B's memory already
        pg.stop()
        t0 = time.monotonic()
        for _ in range(5):
            env = cb.envelope("math.compute", {"a": 2, "b": 1})
            assert env.ok, env
        with pytest.raises(MicroError) as exc:
            _publish(a, _versioned(tmp_path, "outage", 2))
        assert f"PostgreSQL at 127.0.0.1:{pg.port}/microswarm is unreachable" in exc.value.message
        rc = _cli(a, "clients", "create", "during-outage")
        assert rc.returncode != 0 and "unreachable" in rc.stderr, rc.stderr
        rc = _cli(a, "clients", "revoke", "bearer-client")
        assert rc.returncode != 0 and f"PostgreSQL at 127.0.0.1:{pg.port}" in rc.stderr, rc.stderr
        with b.client() as fresh:  # a new connection: its token is minted in memory
            assert fresh.envelope("math.compute", {"a": 3, "b": 1}).ok
        assert time.monotonic() - t0 < 30
        wait_for(lambda: "serving from memory" in b.log("coordinator.log"), 10, "B to notice the database is away")
        time.sleep(2.5)  # several reconnection attempts: still logged once
        pg.start()
        wait_for(lambda: "listening for changes" in b.log("coordinator.log") and
                 "listening for changes" in a.log("coordinator.log"), 15, "the listeners to reconnect")
        rep = _publish(a, _versioned(tmp_path, "outage", 4))
        wait_for(lambda: any(s.name == "tests.outage" and s.digest == rep.digest for s in cb.status().services),
                 5, "B to see a publish on A after the database came back")
        env = cb.envelope("tests.outage", {"x": 3})
        assert env.ok and env.result["y"] == 12
        assert ca.envelope("math.compute", {"a": 4, "b": 1}).ok
    for c in (a, b):
        log = c.log("coordinator.log")
        assert log.count("serving from memory; changes made on other coordinators") == 1, log[-3000:]
