"""Callers that give up: Ctrl-C on `microswarm call`, cancelled asyncio tasks, deadlines with no answer.

A call the caller cancels stops its job on the agent (the slot is free again); a deadline that
passes without an answer is `DeadlineExceeded`, from `AsyncClient` as from `Client`, never a bare
TimeoutError. First against a coordinator that never answers (what the clients send and raise),
then against real coordinator and agent processes.
"""
from __future__ import annotations

import _thread
import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Iterator

import pytest
from grpc import aio

import microcores.client as client_mod
from microswarm.agent.volunteer import control
from microcores._chunks import Assembler
from microcores.client import AsyncClient, Client
from microcores.errors import DeadlineExceeded
from microswarm.cluster import LocalCluster, free_port, wait_for
from microswarm.protos import microswarm_pb2 as pb
from microswarm.protos import microswarm_pb2_grpc as pbg

CLI = [sys.executable, "-m", "microswarm.cli"]


# ---------------------------------------------------------------- a coordinator that never answers

class Silent(pbg.CoordinatorServicer):
    """Takes calls and never answers them; records what the clients send and which calls they cancel."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.stream_ids: list[int] = []
        self.stream_cancels: list[list[int]] = []  # the `cancel` field of each batch that had one
        self.unary_started = threading.Event()
        self.unary_cancelled = threading.Event()

    async def Call(self, request: pb.CallRequest, context: aio.ServicerContext) -> pb.CallReply:
        self.unary_started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.unary_cancelled.set()
            raise
        return pb.CallReply()

    async def CallStream(self, request_iterator: Any, context: aio.ServicerContext) -> None:
        assembler = Assembler()
        while True:
            chunk = await context.read()
            if not isinstance(chunk, pb.StreamChunk):
                return
            data = assembler.feed(chunk)
            if data is None:
                continue
            batch = pb.CallBatch.FromString(data)
            with self.lock:
                self.stream_ids.extend(batch.ids)
                if batch.cancel:
                    self.stream_cancels.append(list(batch.cancel))

    def cancelled_ids(self) -> list[int]:
        with self.lock:
            return [cid for batch in self.stream_cancels for cid in batch]


@pytest.fixture
def silent(tmp_path) -> Iterator[tuple[str, Silent, str]]:
    """A gRPC server on its own thread and loop that never answers a call. It serves TLS as a coordinator
    does by default: a certificate made by coordinator.tls for a fresh identity, written to a state
    directory that the clients pin (address, servicer, that state directory)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from microswarm.coordinator import tls

    servicer = Silent()
    addr = f"127.0.0.1:{free_port()}"
    state = tmp_path / "silent-state"
    state.mkdir()
    creds = tls.prepare(state, Ed25519PrivateKey.generate(), [addr]).grpc_credentials()
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop: asyncio.Event | None = None

    async def serve() -> None:
        nonlocal stop
        stop = asyncio.Event()
        server = aio.server()
        pbg.add_CoordinatorServicer_to_server(servicer, server)
        server.add_secure_port(addr, creds)
        await server.start()
        ready.set()
        await stop.wait()
        await server.stop(0)

    t = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    t.start()
    assert ready.wait(10)
    yield addr, servicer, str(state)
    loop.call_soon_threadsafe(stop.set)  # type: ignore[union-attr]
    t.join(10)


@pytest.mark.parametrize("multiplex", [True, False])
def test_async_client_without_an_answer_raises_deadline_exceeded(silent, monkeypatch, multiplex):
    addr, server, state = silent
    monkeypatch.setattr(client_mod, "DEADLINE_GRACE_S", 0.3)

    async def main() -> None:
        async with AsyncClient(addr, bearer="t", state_dir=state, multiplex=multiplex) as c:
            t0 = time.monotonic()
            with pytest.raises(DeadlineExceeded) as info:
                await c.envelope("demo.sleep", {"seconds": 5}, timeout=0.5)
            assert time.monotonic() - t0 < 5
            assert not isinstance(info.value, TimeoutError)
            assert info.value.code == "deadline_exceeded"
            assert "demo.sleep" in info.value.message and "0.5 s" in info.value.message, info.value.message
            if multiplex:  # the call it gave up on is cancelled on the coordinator
                await asyncio.to_thread(wait_for, lambda: server.cancelled_ids() == server.stream_ids == [1], 5,
                                        "the call's id in CallBatch.cancel")
            else:  # the RPC itself ended: the coordinator's handler was cancelled
                await asyncio.to_thread(server.unary_cancelled.wait, 5)
                assert server.unary_cancelled.is_set()

    asyncio.run(main())


def test_async_client_cancelled_task_sends_its_call_id_in_cancel(silent):
    addr, server, state = silent

    async def main() -> None:
        async with AsyncClient(addr, bearer="t", state_dir=state) as c:
            tasks = [asyncio.ensure_future(c.envelope("demo.sleep", {"seconds": 30}, timeout=60)) for _ in range(3)]
            await asyncio.to_thread(wait_for, lambda: len(server.stream_ids) == 3, 5, "three calls sent")
            tasks[1].cancel()
            with pytest.raises(asyncio.CancelledError):
                await tasks[1]
            await asyncio.to_thread(wait_for, lambda: server.cancelled_ids() == [server.stream_ids[1]], 5,
                                    "the cancelled call's id in CallBatch.cancel")
            assert server.stream_cancels == [[server.stream_ids[1]]]  # a batch of only that cancel
            assert not tasks[0].done() and not tasks[2].done()  # the others still wait for their answers
            for t in (tasks[0], tasks[2]):
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.to_thread(wait_for, lambda: sorted(server.cancelled_ids()) == sorted(server.stream_ids), 5,
                                    "every cancelled call's id in CallBatch.cancel")

    asyncio.run(main())


def test_async_client_unary_cancelled_task_cancels_the_rpc(silent):
    addr, server, state = silent

    async def main() -> None:
        async with AsyncClient(addr, bearer="t", state_dir=state, multiplex=False) as c:
            task = asyncio.ensure_future(c.envelope("demo.sleep", {"seconds": 30}, timeout=60))
            assert await asyncio.to_thread(server.unary_started.wait, 5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await asyncio.to_thread(server.unary_cancelled.wait, 5)

    asyncio.run(main())


def test_client_keyboard_interrupt_cancels_the_rpc(silent):
    addr, server, state = silent

    def interrupt() -> None:
        # Once the client waits for the answer: a KeyboardInterrupt inside gRPC's own start of the call
        # (the server can see it before `future()` returns) may leave it half made, which is why the CLI
        # makes its call on another thread.
        if server.unary_started.wait(10):
            time.sleep(0.2)
            _thread.interrupt_main()

    threading.Thread(target=interrupt, daemon=True).start()
    with Client(addr, bearer="t", state_dir=state) as c:
        with pytest.raises(KeyboardInterrupt):
            c.envelope("demo.sleep", {"seconds": 30}, timeout=60)
    assert server.unary_cancelled.wait(5)


def test_client_without_an_answer_raises_deadline_exceeded(silent, monkeypatch):
    addr, _, state = silent
    monkeypatch.setattr(client_mod, "DEADLINE_GRACE_S", 0.3)
    with Client(addr, bearer="t", state_dir=state) as c:
        with pytest.raises(DeadlineExceeded) as info:
            c.envelope("demo.sleep", {"seconds": 5}, timeout=0.5)
    assert "demo.sleep" in info.value.message and "0.5 s" in info.value.message


# ---------------------------------------------------------------- real processes

def running(c: Any) -> dict[str, int]:
    return {a.agent_id: a.running for a in c.status().agents}


def agents_idle(cluster: LocalCluster, c: Any) -> bool:
    """No job on any agent: as the coordinator counts them, and as each agent itself does."""
    if any(running(c).values()):
        return False
    return all(control(cluster.agent_state(aid), "status").get("running") == 0 for aid in cluster.agents)


def wait_job_on_agent(c: Any, proc: subprocess.Popen[str] | None = None, timeout: float = 30) -> None:
    def busy() -> bool:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the call ended before it was cancelled: {proc.communicate()}")
        return any(running(c).values())
    wait_for(busy, timeout, "the job to run on an agent", 0.05)


def test_ctrl_c_on_call_prints_cancelled_exits_130_and_frees_the_slot(cluster):
    with cluster.client() as c:
        wait_for(lambda: agents_idle(cluster, c), 30, "idle agents before the call")
        p = subprocess.Popen([*CLI, "call", "demo.sleep", '{"seconds": 30}'], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=cluster.env())
        try:
            wait_job_on_agent(c, p)
            p.send_signal(signal.SIGINT)
            out, err = p.communicate(timeout=15)
        finally:
            if p.poll() is None:
                p.kill()
                p.communicate()
        assert p.returncode == 130, (p.returncode, out, err)
        assert "Traceback" not in err, err
        lines = [line for line in err.splitlines() if line.strip()]
        assert lines and lines[-1] == "cancelled", err
        assert out == ""
        # The job stopped on its agent, and the slot is free again (the agent says so, as does the coordinator).
        wait_for(lambda: agents_idle(cluster, c), 10, "the cancelled job to stop on its agent")


@pytest.mark.parametrize("multiplex", [True, False])
def test_cancelled_asyncio_task_frees_the_agent_slot(cluster, multiplex):
    with cluster.client() as c:
        wait_for(lambda: agents_idle(cluster, c), 30, "idle agents before the call")

        async def main() -> None:
            async with cluster.async_client(multiplex=multiplex) as ac:
                task = asyncio.ensure_future(ac.envelope("demo.sleep", {"seconds": 30}, timeout=60))
                await asyncio.to_thread(wait_job_on_agent, c)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                await asyncio.to_thread(wait_for, lambda: agents_idle(cluster, c), 10,
                                        "the cancelled job to stop on its agent")

        asyncio.run(main())


@pytest.mark.parametrize("multiplex", [True, False])
def test_async_client_deadline_is_deadline_exceeded(cluster, multiplex):
    """Last in the module: the sleep may still be stopping on its agent when it ends."""
    async def main() -> None:
        async with cluster.async_client(multiplex=multiplex) as ac:
            t0 = time.monotonic()
            try:
                env = await ac.envelope("demo.sleep", {"seconds": 5}, timeout=1)
            except DeadlineExceeded:
                pass
            else:
                assert env.error is not None and env.error["code"] == "deadline_exceeded", env
            assert time.monotonic() - t0 < 5

    asyncio.run(main())


def test_http_client_that_disconnects_frees_the_agent_slot(tmp_path):
    """An HTTP caller that goes away cancels its call, and so the job on its agent."""
    import socket

    with LocalCluster(agents=1, slots=1, workdir=str(tmp_path), http=True) as c, c.client() as client:
        token = client.token()
        body = json.dumps({"seconds": 30}).encode()
        request = (f"POST /v1/demo/sleep HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
                   f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
        # over TLS, as the gateway serves by default: handshake first, then the request
        with socket.create_connection(("127.0.0.1", c.http_port), timeout=10) as raw, \
                c.ssl_context().wrap_socket(raw, server_hostname="127.0.0.1") as s:
            s.sendall(request)
            wait_job_on_agent(client)
        # the connection is closed: the job stops on its agent and the slot is free again
        try:
            wait_for(lambda: agents_idle(c, client), 20, "the job of the departed HTTP caller to stop")
        except TimeoutError as exc:  # what each side saw, for a failure under load
            raise AssertionError(f"{exc}\nrunning {running(client)}\ncoordinator:\n{c.log('coordinator.log')[-3000:]}"
                                 f"\nagent:\n{c.log('agent-agent1.log')[-2000:]}") from None
        calls = [x for x in client.status(recent_calls=5).calls if x.service == "demo.sleep"]
        assert calls and calls[-1].error_code == "cancelled", calls
