"""Large payloads in pieces (issue 13): an input past STREAM_MIN goes up CallStream as pieces of its
call, the coordinator spools it and sends it ahead to the agent likely to run the job (staging.py),
and a large result comes down as pieces ahead of its reply. Unit tests of the parts, then real
clusters: sizes around the threshold, invalid large inputs, a client that breaks off or lies
about the size, an agent killed while its input is sent ahead, and the coordinator's memory."""
from __future__ import annotations

import asyncio
import os
from typing import Any

import grpc
import pytest

from microcores import _codec
from microcores._chunks import ResultPieces, call_pieces, pieces
from microcores.client import STREAM_MIN
from microcores.errors import InvalidInput, Unavailable
from microswarm.agent.staged import StagedInputs
from microswarm.bench_memory import rss_during
from microswarm.cluster import LocalCluster, wait_for
from microswarm.coordinator.spool import Spool
from microswarm.protos import microswarm_pb2 as pb
from microswarm.protos import microswarm_pb2_grpc as pbg

MIB = 1 << 20


# ---------------------------------------------------------------- the parts

def test_spool_passes_pieces_on_as_they_arrive_and_reads_whole() -> None:
    async def main() -> None:
        sp = Spool(5 * MIB + 3, "the input of t")
        data = os.urandom(sp.size)
        got: list[bytes] = []

        async def follow() -> None:
            async for p in sp.pieces(MIB):
                got.append(p)
        t = asyncio.create_task(follow())
        for off in range(0, len(data), 700_000):
            sp.feed(data[off:off + 700_000])
            await asyncio.sleep(0)
        sp.end()
        await asyncio.wait_for(t, 5)
        assert b"".join(got) == data and max(len(p) for p in got) <= MIB
        assert await sp.read() == data and sp.complete
        sp.close()
    asyncio.run(main())


def test_spool_refuses_more_or_less_than_announced() -> None:
    async def main() -> None:
        longer = Spool(10, "the input of t")
        longer.feed(b"x" * 11)
        with pytest.raises(InvalidInput, match="longer than the 10 bytes announced"):
            await longer.read()
        shorter = Spool(10, "the input of t")
        shorter.feed(b"x" * 4)
        shorter.end()
        with pytest.raises(InvalidInput, match="ended after 4 of the 10 bytes"):
            await shorter.read()
        gone = Spool(10, "the input of t")
        gone.fail(Unavailable("the client's stream ended"))
        with pytest.raises(Unavailable):
            async for _ in gone.pieces():
                pass
        for s in (longer, shorter, gone):
            s.close()
    asyncio.run(main())


def test_staged_inputs_are_bounded_and_dropped_on_request() -> None:
    st = StagedInputs(max_bytes=3 * MIB, max_stages=2)
    st.take(pb.StagedInput(stage_id="a", data=b"1" * MIB))
    st.take(pb.StagedInput(stage_id="a", data=b"2" * MIB, last=True))
    assert st.pop("a") == b"1" * MIB + b"2" * MIB and st.bytes == 0
    st.take(pb.StagedInput(stage_id="b", data=b"x" * MIB))
    with pytest.raises(KeyError, match="incomplete"):
        st.pop("b")  # the job came before its last piece: handed back, and the stage forgotten
    assert st.bytes == 0 and len(st) == 0
    st.take(pb.StagedInput(stage_id="c", data=b"x" * (2 * MIB)))
    st.take(pb.StagedInput(stage_id="c", data=b"x" * (2 * MIB), last=True))  # past max_bytes: dropped
    with pytest.raises(KeyError, match="not here"):
        st.pop("c")
    st.take(pb.StagedInput(stage_id="d", data=b"x"))
    st.take(pb.StagedInput(stage_id="d", drop=True))
    assert len(st) == 0 and st.bytes == 0
    st.take(pb.StagedInput(stage_id="e", data=b"x"))
    st.take(pb.StagedInput(stage_id="f", data=b"x"))
    st.take(pb.StagedInput(stage_id="g", data=b"x"))  # a third stage while two are held: not kept
    assert len(st) == 2


def test_result_pieces_restart_and_incomplete() -> None:
    rp = ResultPieces()
    payload = os.urandom(3 * MIB + 5)
    for ch in call_pieces(7, b"stale" * 1000):
        rp.take(ch)
    for ch in call_pieces(7, payload, restart=True):  # the job moved: its first output is dropped
        rp.take(ch)
    reply = pb.CallReply(status="ok", result_size=len(payload))
    rp.complete(7, reply)
    assert reply.result == payload
    for ch in list(call_pieces(8, payload))[:-1]:
        rp.take(ch)
    short = pb.CallReply(status="ok", service="s", result_size=len(payload))
    rp.complete(8, short)
    assert short.status == "error" and short.error.code == "unavailable" and "incomplete" in short.error.message


# ---------------------------------------------------------------- real clusters

@pytest.fixture(scope="module")
def one_agent(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One agent and no coordinator slots: every job runs on the agent, so its input was sent ahead."""
    c = LocalCluster(agents=1, slots=2, workdir=str(tmp_path_factory.mktemp("stream")),
                     coordinator_args=["--local-slots", "0", "--verify", "off", "--insecure"])
    with c:
        yield c


def _jobs_done(c: Any) -> int:
    return sum(a.jobs_done + a.jobs_failed for a in c.status().agents)


@pytest.mark.parametrize("size", [STREAM_MIN - 64, STREAM_MIN - 8, STREAM_MIN, STREAM_MIN + 1, 7 * MIB + 11])
def test_echo_sizes_around_the_threshold(one_agent: LocalCluster, size: int) -> None:
    """The packed input crosses STREAM_MIN within these sizes (msgpack adds a few bytes): below it
    goes inline, above it in pieces; both come back whole, from the agent."""
    data = os.urandom(size)
    with one_agent.client() as sync:
        staged = sync.status().scheduler.staged_total

    async def main() -> None:
        async with one_agent.async_client() as c:
            env = await c.envelope("demo.echo_bytes", {"data": data}, timeout=60)
            assert env.ok, env.error
            assert env.result["data"] == data and env.result["size"] == size
            assert env.executed_by == "agent1"
    asyncio.run(main())
    with one_agent.client() as sync:  # sent ahead to the agent exactly when it went up in pieces
        assert sync.status().scheduler.staged_total - staged == (len(_codec.pack({"data": data})) > STREAM_MIN)


def test_many_large_calls_in_flight_on_one_stream(one_agent: LocalCluster) -> None:
    blobs = [os.urandom(2 * MIB + i) for i in range(12)]

    async def main() -> None:
        async with one_agent.async_client() as c:
            envs = await asyncio.gather(*(c.envelope("demo.echo_bytes", {"data": b}, timeout=120) for b in blobs))
            for b, env in zip(blobs, envs):
                assert env.ok, env.error
                assert env.result["data"] == b
    asyncio.run(main())


def test_invalid_large_input_is_refused_and_never_runs(one_agent: LocalCluster) -> None:
    """Validated once whole, before any job starts: the agent had the pieces, never a job."""
    with one_agent.client() as sync:
        before = _jobs_done(sync)
    bad = {"data": list(range(400_000))}  # a list where bytes go: > 1 MiB packed
    assert len(_codec.pack(bad)) > STREAM_MIN

    async def main() -> None:
        async with one_agent.async_client() as c:
            env = await c.envelope("demo.echo_bytes", bad, timeout=30)
            assert not env.ok and env.error["code"] == "invalid_input" and env.error.get("field") == "data"
    asyncio.run(main())
    with one_agent.client() as sync:
        assert _jobs_done(sync) == before


def test_sync_client_and_http_keep_working_with_large_payloads(tmp_path: Any) -> None:
    import base64
    import json
    import urllib.request
    c = LocalCluster(agents=1, slots=2, workdir=str(tmp_path), http=True,
                     coordinator_args=["--local-slots", "0", "--verify", "off"])
    with c:
        data = os.urandom(3 * MIB)
        with c.client() as sync:
            assert sync.call("demo.echo_bytes", {"data": data}, timeout=60)["data"] == data
            tok = sync.token()
        body = json.dumps({"data": base64.b64encode(data[:2 * MIB]).decode()}).encode()
        req = urllib.request.Request(f"{c.http_url}/v1/demo/echo_bytes", data=body, method="POST",
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {tok}"})
        with c.urlopen(req, timeout=60) as r:
            env = json.loads(r.read())
        assert env["status"] == "ok", env
        assert base64.urlsafe_b64decode(env["result"]["data"]) == data[:2 * MIB]  # (pydantic: url-safe)


async def _raw_stream(cluster: LocalCluster) -> tuple[Any, Any]:
    """A CallStream opened by hand (a misbehaving client), with a real token."""
    from microcores.client import AsyncClient
    async with AsyncClient(cluster.addr, client_name="raw", state_dir=str(cluster.state), insecure=True) as ac:
        tok = await ac.token()
    ch = grpc.aio.insecure_channel(cluster.addr)
    stub = pbg.CoordinatorStub(ch)
    call = stub.CallStream(metadata=[("authorization", f"Bearer {tok}"), ("x-client", "raw")])
    return ch, call


async def _announce(call: Any, cid: int, size: int) -> None:
    batch = pb.CallBatch(ids=[cid], calls=[pb.CallRequest(service="demo.echo_bytes", input_size=size,
                                                          encoding=pb.MSGPACK, deadline_s=60)])
    for ch in pieces(batch.SerializeToString()):
        await call.write(ch)


async def _replies(call: Any, n: int, timeout: float = 60) -> dict[int, pb.CallReply]:
    out: dict[int, pb.CallReply] = {}
    rp = ResultPieces()
    async with asyncio.timeout(timeout):
        while len(out) < n:
            chunk = await call.read()
            assert isinstance(chunk, pb.StreamChunk), "the coordinator ended the stream"
            if chunk.call:
                rp.take(chunk)
                continue
            batch = pb.ReplyBatch.FromString(chunk.data)
            for cid, reply in zip(batch.ids, batch.replies):
                rp.complete(cid, reply)
                out[cid] = reply
    return out


def test_client_that_lies_about_the_size_gets_a_clear_error(one_agent: LocalCluster) -> None:
    payload = _codec.pack({"data": os.urandom(2 * MIB)})
    with one_agent.client() as sync:
        before = _jobs_done(sync)

    async def main() -> None:
        ch, call = await _raw_stream(one_agent)
        try:
            await _announce(call, 1, len(payload) + 100)       # says more than it sends
            for p in call_pieces(1, payload):
                await call.write(p)
            await _announce(call, 2, len(payload) - 100)       # sends more than it says
            for p in call_pieces(2, payload):
                await call.write(p)
            replies = await _replies(call, 2)
            assert replies[1].status == "error" and replies[1].error.code == "invalid_input"
            assert f"ended after {len(payload)} of the {len(payload) + 100} bytes" in replies[1].error.message
            assert replies[2].status == "error" and "longer than the" in replies[2].error.message
        finally:
            await ch.close()
    asyncio.run(main())
    with one_agent.client() as sync:  # nothing ran, and the coordinator still serves
        assert _jobs_done(sync) == before
        assert sync.call("math.compute", {"a": 2, "b": 3, "op": "add"}, timeout=30) == {"result": 5.0}


def test_client_that_vanishes_mid_input_leaves_nothing_behind(one_agent: LocalCluster) -> None:
    payload = _codec.pack({"data": os.urandom(6 * MIB)})
    with one_agent.client() as sync:
        before = _jobs_done(sync)

    async def main() -> None:
        ch, call = await _raw_stream(one_agent)
        await _announce(call, 1, len(payload))
        for p in list(call_pieces(1, payload))[:3]:
            await call.write(p)
        await asyncio.sleep(0.3)
        await ch.close()  # gone, half-way through its input
    asyncio.run(main())

    def logged() -> bool:  # the call ended (its one log row), as the stream did
        with one_agent.client() as sync:
            return any(r.service == "demo.echo_bytes" and "raw" in r.client and not r.success
                       for r in sync.status(recent_calls=20).calls)
    wait_for(logged, 20, "the broken-off call to end")
    with one_agent.client() as sync:
        assert _jobs_done(sync) == before
        data = os.urandom(2 * MIB)
        assert sync.call("demo.echo_bytes", {"data": data}, timeout=60)["data"] == data


def test_agent_killed_while_its_input_is_sent_ahead(tmp_path: Any) -> None:
    """The stage goes to the only agent; a second one joins; the first is SIGKILLed while the
    client is half-way: the job runs on the second, with its input sent whole, and answers right."""
    c = LocalCluster(agents=1, slots=2, workdir=str(tmp_path),
                     coordinator_args=["--local-slots", "0", "--verify", "off", "--insecure"])
    with c:
        data = os.urandom(8 * MIB)
        payload = _codec.pack({"data": data})

        async def main() -> None:
            ch, call = await _raw_stream(c)
            try:
                await _announce(call, 1, len(payload))
                parts = list(call_pieces(1, payload))
                for p in parts[:4]:
                    await call.write(p)
                await asyncio.to_thread(c.start_agent, "agent2")
                await asyncio.to_thread(c.wait_agents_ready, ["agent2"])
                c.kill_agent("agent1")
                for p in parts[4:]:
                    await call.write(p)
                reply = (await _replies(call, 1))[1]
                assert reply.status == "ok", reply.error
                assert reply.executed_by == "agent2"
                with c.client() as sync:  # its input went to agent2 whole, with the job
                    assert sync.status().scheduler.staged_total == 0
                assert _codec.unpack(reply.result)["data"] == data
            finally:
                await ch.close()
        asyncio.run(main())


def test_coordinator_memory_per_large_call_is_bounded(one_agent: LocalCluster) -> None:
    """A 40 MB echo: the coordinator's resident memory grows by less than 3 copies of the payload at
    most: it never holds the payload whole for long (store-and-forward with a copy at every step
    grew it by ~10x; the target is under 3x)."""
    async def _echo(data: bytes) -> None:
        async with one_agent.async_client() as c:
            env = await c.envelope("demo.echo_bytes", {"data": data}, timeout=120)
            assert env.ok and env.result["data"] == data, env.error
    data = os.urandom(40_000_000)
    pid = one_agent.coordinator.pid  # type: ignore[union-attr]
    asyncio.run(_echo(os.urandom(2 * MIB)))  # warm
    before, peak = rss_during(pid, lambda: asyncio.run(_echo(data)))
    grew = (peak - before) * MIB / len(data)
    assert grew < 3.0, f"the coordinator grew by {grew:.1f}x the payload ({before:.0f} -> {peak:.0f} MiB)"


def _start_liar(c: LocalCluster, agent_id: str, *liar_args: str) -> None:
    import subprocess
    import sys
    from pathlib import Path
    liar = Path(__file__).parent / "data" / "lying_agent.py"
    f = open(c.dir / f"agent-{agent_id}.log", "ab")
    p = subprocess.Popen([sys.executable, str(liar), *liar_args, "--", "--coordinator", c.addr, "--token", c.token,
                          "--id", agent_id, "--slots", "2", "--state-dir", str(c.agent_state(agent_id))],
                         stdout=f, stderr=subprocess.STDOUT, env=c.env(), start_new_session=True)
    f.close()
    c.agents[agent_id] = p
    c.wait_agents_ready([agent_id], timeout=60)


def test_output_that_does_not_add_up_runs_again_elsewhere(tmp_path: Any) -> None:
    """An agent sends a large output ahead in pieces but keeps back the last one (and says the output
    is whole): the pieces already passed on to the client are dropped, the job runs on the honest
    agent, and the client gets that answer, whole and right, once."""
    c = LocalCluster(agents=0, slots=2, workdir=str(tmp_path),
                     coordinator_args=["--local-slots", "0", "--verify", "off", "--no-hedge"])
    with c:
        _start_liar(c, "liar", "--short-output")
        c.start_agent("honest")
        c.wait_agents_ready(["honest"])
        data = os.urandom(6 * MIB)

        async def main() -> list[Any]:
            async with c.async_client() as ac:
                return [await ac.envelope("demo.echo_bytes", {"data": data}, timeout=60) for _ in range(4)]
        envs = asyncio.run(main())
        for env in envs:
            assert env.ok, env.error
            assert env.result["data"] == data and env.executed_by == "honest"
        with c.client() as sync:
            st = sync.status()
            assert st.scheduler.retries_total >= 1  # the liar had some of them first
            liar = next(a for a in st.agents if a.agent_id == "liar")
            assert liar.jobs_done == 0


def test_large_results_come_back_on_many_calls_at_once(one_agent: LocalCluster) -> None:
    """Results past 1 MiB from several jobs at once, their pieces interleaved on one stream."""
    blobs = [os.urandom(3 * MIB + 17 * i) for i in range(6)]

    async def main() -> None:
        async with one_agent.async_client() as c:
            small = [c.envelope("math.compute", {"a": i, "b": 1, "op": "add"}, timeout=60) for i in range(20)]
            big = [c.envelope("demo.echo_bytes", {"data": b}, timeout=120) for b in blobs]
            envs = await asyncio.gather(*big, *small)
            for b, env in zip(blobs, envs[:len(blobs)]):
                assert env.ok and env.result["data"] == b, env.error
            for i, env in enumerate(envs[len(blobs):]):
                assert env.ok and env.result == {"result": float(i + 1)}
    asyncio.run(main())


def test_a_large_output_is_passed_on_as_it_arrives(one_agent: LocalCluster) -> None:
    """Raw stream: the result's pieces come ahead of the reply, from the agent's output as it
    arrives (a piece passed on from a job's spool is not marked `restart`; a result the
    coordinator holds whole and sends itself is), and the reply points at them (result_size)."""
    data = os.urandom(5 * MIB)
    payload = _codec.pack({"data": data})

    async def main() -> None:
        ch, call = await _raw_stream(one_agent)
        try:
            await _announce(call, 1, len(payload))
            for p in call_pieces(1, payload):
                await call.write(p)
            chunks: list[pb.StreamChunk] = []
            async with asyncio.timeout(60):
                while True:
                    chunk = await call.read()
                    if chunk.call:
                        chunks.append(chunk)
                        continue
                    reply = pb.ReplyBatch.FromString(chunk.data).replies[0]
                    break
            assert reply.status == "ok" and reply.result == b""
            assert reply.result_size == sum(len(c.data) for c in chunks) == len(_codec.pack({"data": data, "size": len(data)}))
            assert not any(c.restart for c in chunks)
            assert _codec.unpack(b"".join(c.data for c in chunks)) == {"data": data, "size": len(data)}
        finally:
            await ch.close()
    asyncio.run(main())
