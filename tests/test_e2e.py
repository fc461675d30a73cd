"""End to end: real coordinator and agent processes on loopback, through the real client path."""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from microcores import _tls
from microcores._secure import (JoinToken, agent_channel, derive_keys, hello_transcript, join_mac, new_ephemeral,
                                public_bytes, sign, split)
from microcores.client import publish
from microswarm.cluster import LocalCluster, wait_for
from microswarm.protos import microswarm_pb2 as pb
from microswarm.protos import microswarm_pb2_grpc as pbg

DATA = Path(__file__).parent / "data"
CLI = [sys.executable, "-m", "microswarm.cli"]


def cli(c: LocalCluster, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=c.env(), timeout=timeout)


# ---------------------------------------------------------------- calls

def test_two_agents_share_the_calls(cluster):
    with cluster.client() as c:
        seen = set()
        for i in range(60):
            env = c.envelope("math.compute", {"a": i, "b": 0.5, "op": "add"})
            assert env.ok and env.result == {"result": i + 0.5}
            seen.add(env.executed_by)
    assert {"agent1", "agent2"} <= seen


def test_call_cli_prints_the_envelope(cluster):
    r = cli(cluster, "call", "math.compute", '{"a": 2, "b": 3, "op": "mul"}', "--json")
    assert r.returncode == 0, r.stderr
    env = json.loads(r.stdout.strip().splitlines()[-1])
    assert env["status"] == "ok" and env["result"] == {"result": 6.0}
    assert {"executed_by", "attempts", "process_time_ms", "cache_hit"} <= env.keys()
    r = cli(cluster, "call", "math.compute", '{"a": 2}')
    assert r.returncode != 0 and "b is required" in r.stderr


def test_bad_input_and_unknown_service_are_clear_errors(cluster):
    with cluster.client() as c:
        env = c.envelope("math.compute", {"a": "two", "b": 1})
        assert env.error["code"] == "invalid_input" and env.error["field"] == "a"
        assert "a must be a number" in env.error["message"]
        env = c.envelope("math.nothing", {})
        assert env.error["code"] == "unknown_service" and "math.compute" in env.error["message"]
        env = c.envelope("math.compute", {"a": 1, "b": 0, "op": "div"})
        assert env.error["code"] == "invalid_input" and env.error["field"] == "b"


def test_nested_call_goes_through_the_coordinator(cluster):
    with cluster.client() as c:
        env = c.envelope("math.compute_and_classify", {"a": 2, "b": -7, "op": "add"})
        assert env.ok, env.error
        assert env.result == {"result": -5.0, "positive": False}
        assert env.executed_by.startswith("agent")
        calls = c.status(recent_calls=10).calls
        nested = [x for x in calls if x.via_agent.startswith("agent")]  # asked by the agent's job...
        assert {x.service for x in nested} >= {"math.compute", "numbers.is_positive"}
        parent = next(x for x in calls if x.service == "math.compute_and_classify")
        assert {x.client for x in nested} == {parent.client}  # ...run as the caller (tests/test_nested_identity.py)


def test_cyclic_nested_call_is_refused(cluster):
    publish(str(DATA / "cycle_services.py"), coordinator=cluster.addr, state_dir=str(cluster.state))
    with cluster.client() as c:
        env = c.envelope("cycle.ping", {"n": 0}, timeout=30)
    assert env.status == "error"
    assert env.error["code"] == "cycle"
    assert "cycle.ping -> cycle.pong -> cycle.ping" in env.error["message"]


def test_large_payload_round_trips_in_bounded_frames(cluster):
    data = os.urandom(3_000_000)  # several link frames each way
    with cluster.client() as c:
        env = c.envelope("demo.echo_bytes", {"data": data}, timeout=60)
    assert env.ok and env.result["data"] == data and env.executed_by.startswith("agent")


def test_status_json_and_unreachable_coordinator(cluster):
    r = cli(cluster, "status", "--json")
    assert r.returncode == 0
    st = json.loads(r.stdout)
    assert {a["agent_id"] for a in st["agents"]} >= {"agent1", "agent2"}
    assert "math.compute" in {s["name"] for s in st["services"]}
    assert all({"client", "service", "executed_by", "success", "ms"} <= set(x) for x in st["calls"])
    r = subprocess.run([*CLI, "status", "--coordinator", "127.0.0.1:9"], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "cannot reach the coordinator" in r.stderr


# ---------------------------------------------------------------- agents come and go

def test_agent_killed_mid_call_costs_only_time(fresh_cluster):
    c = fresh_cluster
    with c.client() as client, concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(client.envelope, "demo.sleep", {"seconds": 2.0})
        victim = wait_for(lambda: next((a.agent_id for a in client.status().agents if a.running), None),
                          15, "the slow call to reach an agent")
        killed_at = time.monotonic()
        c.kill_agent(victim, signal.SIGKILL)
        env = fut.result(timeout=30)
        assert env.ok, env.error
        assert env.result["slept"] >= 2.0
        assert env.executed_by not in (victim, "coordinator")  # the other volunteer took it over
        assert env.attempts == 2
        wait_for(lambda: victim not in {a.agent_id for a in client.status().agents}, 6.5,
                 f"{victim} to leave the agent table within the liveness window")
        assert time.monotonic() - killed_at < 6.5


def test_agent_that_joins_later_gets_packages_and_jobs(cluster):
    cluster.start_agent("late")
    cluster.wait_agents_ready(["late"])
    with cluster.client() as c:
        def late_ran() -> bool:
            return any(c.envelope("math.compute", {"a": secrets.randbelow(10**9), "b": 1}).executed_by == "late"
                       for _ in range(10))
        wait_for(late_ran, 30, "a call executed by the late agent")
    cluster.kill_agent("late", signal.SIGTERM)
    assert cluster.agents["late"].wait(30) == 0


def test_new_version_is_used_without_restarting_agents(cluster, tmp_path):
    src = (DATA / "versioned.py").read_text()
    v1 = tmp_path / "v1" / "versioned.py"
    v1.parent.mkdir()
    v1.write_text(src)
    publish(str(v1), coordinator=cluster.addr, state_dir=str(cluster.state))
    pids = {k: p.pid for k, p in cluster.agents.items() if p.poll() is None}
    cluster.wait_agents_ready(list(pids))
    with cluster.client() as c:
        env = c.envelope("tests.versioned", {"x": 5})
        assert env.result == {"y": 5, "version": "1"} and env.executed_by.startswith("agent")
        v2 = tmp_path / "v2" / "versioned.py"
        v2.parent.mkdir()
        v2.write_text(src.replace('version = "1"', 'version = "2"').replace("data.x * 1", "data.x * 2"))
        (r,) = publish(str(v2), coordinator=cluster.addr, state_dir=str(cluster.state))
        assert r.version == "2" and r.revision == 2
        env = c.envelope("tests.versioned", {"x": 5})
        assert env.result == {"y": 10, "version": "2"}  # the old result must not come back from any cache
        cluster.wait_agents_ready(list(pids))
        env = c.envelope("tests.versioned", {"x": 6})
        assert env.result == {"y": 12, "version": "2"} and env.executed_by.startswith("agent")
    assert {k: p.pid for k, p in cluster.agents.items() if p.poll() is None} == pids


def test_sigterm_lets_the_running_job_finish(fresh_cluster):
    c = fresh_cluster
    with c.client() as client, concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(client.envelope, "demo.sleep", {"seconds": 1.5})
        busy = wait_for(lambda: next((a.agent_id for a in client.status().agents if a.running), None), 15,
                        "the slow call to reach an agent")
        c.kill_agent(busy, signal.SIGTERM)
        env = fut.result(timeout=30)
        assert env.ok and env.executed_by == busy  # finished where it ran, not taken over
        assert c.agents[busy].wait(30) == 0
        wait_for(lambda: busy not in {a.agent_id for a in client.status().agents}, 5, f"{busy} to leave")


# ---------------------------------------------------------------- refusals

def run_agent(c: LocalCluster, token: str, agent_id: str) -> subprocess.CompletedProcess[str]:
    return cli(c, "agent", "start", "--coordinator", c.addr, "--token", token, "--id", agent_id, "--slots", "1",
               timeout=60)


def test_wrong_coordinator_key_is_refused(cluster):
    real = JoinToken.parse(cluster.token)
    fake = JoinToken(bytes(32), real.secret).encode()
    r = run_agent(cluster, fake, "wrongkey")
    assert r.returncode == 2
    assert "token pins" in r.stdout + r.stderr


def test_bad_join_secret_is_refused(cluster):
    real = JoinToken.parse(cluster.token)
    bad = JoinToken(real.fingerprint, secrets.token_bytes(32)).encode()
    r = run_agent(cluster, bad, "badsecret")
    assert r.returncode == 2
    assert "join secret not accepted" in r.stdout + r.stderr
    assert "join secret not accepted" in cluster.log("coordinator.log")


def test_garbage_token_and_duplicate_id_are_refused(cluster):
    r = run_agent(cluster, "not-a-token", "garbage")
    assert r.returncode == 2 and "join token" in r.stdout + r.stderr
    r = run_agent(cluster, cluster.token, "agent1")
    assert r.returncode == 2 and "already connected" in r.stdout + r.stderr


async def _rogue_session(addr: str, token: str, attack: str) -> pb.Refusal:
    """Join for real, then break the framing the way `attack` says; return what the coordinator answers."""
    tok = JoinToken.parse(token)
    key = Ed25519PrivateKey.generate()
    eph, eph_pub = new_ephemeral()
    nonce = secrets.token_bytes(32)
    trust = await _tls.resolve_async(addr, fingerprint=tok.fingerprint)
    async with trust.aio_channel(addr) as ch:
        call = pbg.AgentLinkStub(ch).Connect()
        await call.write(pb.LinkFrame(agent_hello=pb.AgentHello(protocol=1, agent_id=f"rogue-{attack}",
                                                                agent_key=public_bytes(key), ephemeral=eph_pub,
                                                                nonce=nonce, slots=1)))
        hello = (await call.read()).coordinator_hello
        t = hello_transcript(1, f"rogue-{attack}", public_bytes(key), eph_pub, nonce, 1)
        t.add(hello.coordinator_key, hello.ephemeral, hello.nonce, hello.suite)
        th = t.digest()
        await call.write(pb.LinkFrame(agent_proof=pb.AgentProof(signature=sign(key, th, b"agent"),
                                                                join_mac=join_mac(tok.secret, th))))
        chan = agent_channel(hello.suite, *derive_keys(eph, hello.ephemeral, th))
        beat = pb.ToCoordinator(heartbeat=pb.Heartbeat(slots=1)).SerializeToString()
        (counter, ct, more), = chan.seal(len(beat).to_bytes(4, "big") + beat)  # a batch of one
        if attack == "tampered":
            ct = ct[:-1] + bytes([ct[-1] ^ 0x55])
            await call.write(pb.LinkFrame(sealed=pb.Sealed(counter=counter, ciphertext=ct, more=more)))
        else:
            frame = pb.LinkFrame(sealed=pb.Sealed(counter=counter, ciphertext=ct, more=more))
            await call.write(frame)
            await call.write(frame)
        while True:
            frame = await asyncio.wait_for(call.read(), 10)
            assert isinstance(frame, pb.LinkFrame), "the coordinator closed without saying why"
            assert frame.WhichOneof("kind") == "sealed", "after the handshake a refusal is sealed"
            data = chan.open(frame.sealed.counter, frame.sealed.ciphertext, frame.sealed.more)
            for piece in split(data or b""):
                msg = pb.ToAgent.FromString(piece)
                if msg.WhichOneof("kind") == "refusal":
                    return msg.refusal


@pytest.mark.parametrize("attack,words", [("tampered", "tampered frame"), ("replayed", "replayed frame")])
def test_tampered_and_replayed_frames_end_the_session(cluster, attack, words):
    refusal = asyncio.run(_rogue_session(cluster.addr, cluster.token, attack))
    assert refusal.code == "protocol_error" and words in refusal.message
    with cluster.client() as c:
        wait_for(lambda: f"rogue-{attack}" not in {a.agent_id for a in c.status().agents}, 5, "the rogue to be dropped")
    assert words in cluster.log("coordinator.log")


def test_package_with_parent_path_is_refused(cluster):
    import io
    import zipfile

    from microcores._package import sha256
    from microcores.client import admin_credential

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("../escape.py", "import os")
    archive = buf.getvalue()
    manifest = json.dumps({"format": 1, "name": "evil.escape", "version": "1",
                           "entry": {"module": "escape", "class": "X"}, "files": {"../escape.py": sha256(b"import os")},
                           "archive_sha256": sha256(archive), "service": {}}).encode()
    with _tls.from_state_dir(cluster.state).channel(cluster.addr) as ch:
        with pytest.raises(grpc.RpcError) as e:
            pbg.CoordinatorStub(ch).Publish(pb.PublishRequest(manifest=manifest, archive=archive), timeout=10,
                                            metadata=[("authorization", f"Admin {admin_credential(cluster.state)}")])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unsafe path" in e.value.details() and "../escape.py" in e.value.details()
    assert not (cluster.state / "packages" / "escape.py").exists()


def test_publish_needs_the_admin_credential(cluster, tmp_path):
    with pytest.raises(Exception, match="admin credential"):
        publish(str(DATA / "versioned.py"), coordinator=cluster.addr, state_dir=str(tmp_path))


def test_multiplexed_stream_answers_every_call_exactly_once(cluster):
    from microcores.client import AsyncClient

    async def many() -> list:
        async with AsyncClient(cluster.addr, state_dir=cluster.state) as c:
            return await asyncio.gather(*(c.envelope("math.compute", {"a": i, "b": 1000, "op": "sub"})
                                          for i in range(300)))

    envs = asyncio.run(many())
    assert [e.result["result"] for e in envs] == [i - 1000.0 for i in range(300)]
    assert all(e.ok for e in envs)


def test_coordinator_restart_keeps_identity_and_packages_and_agents_reconnect(fresh_cluster):
    c = fresh_cluster
    publish(str(DATA / "versioned.py"), coordinator=c.addr, state_dir=str(c.state))
    token_before = c.token
    c.coordinator.send_signal(signal.SIGTERM)
    assert c.coordinator.wait(30) == 0
    c.start_coordinator()  # same state directory, same address
    assert c.token == token_before  # same key, same join secret: agents keep their tokens
    c.wait_agents_ready(["agent1", "agent2"], timeout=60)  # they reconnected by themselves
    with c.client() as client:
        env = client.envelope("tests.versioned", {"x": 4})
        assert env.ok and env.result == {"y": 4, "version": "1"}
        assert env.executed_by in ("agent1", "agent2")
    assert all(p.poll() is None for p in c.agents.values())


def test_an_error_raised_by_the_service_says_where_it_ran(cluster):
    with cluster.client() as c:
        env = c.envelope("math.compute", {"a": 1e308, "b": 1e308, "op": "mul"})
    assert env.error["code"] == "invalid_input" and "overflows" in env.error["message"]
    # a service's own error is not retried elsewhere; while the agents are new (--verify adaptive,
    # their first --trust-after results) a second executor confirms it, and that run is counted
    assert env.executed_by.startswith("agent")
    assert env.attempts == 1 or (env.attempts == 2 and env.verified), env
