"""self.progress() inside a service reaches its caller: through an agent's worker and the link, and
from the coordinator's own workers; by handle (Client.submit) and over HTTP (GET /v1/calls/ID)."""
from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from microcores._worker import ProgressLimiter
from microcores.client import publish
from microswarm.cluster import LocalCluster, wait_for

DATA = Path(__file__).parent / "data"


def _published(c: LocalCluster) -> LocalCluster:
    publish(str(DATA / "progress_services.py"), coordinator=c.addr, state_dir=str(c.state))
    return c


@pytest.fixture(scope="module")
def on_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    # no coordinator slots: the job must run on the agent, its progress cross the link
    c = LocalCluster(agents=1, http=True, workdir=str(tmp_path_factory.mktemp("progress")),
                     coordinator_args=["--local-slots", "0"])
    with c:
        _published(c)
        with c.client() as cl:  # the agent holds it and has a worker warm
            wait_for(lambda: cl.envelope("progress.steps", {"pause": 0}, timeout=30).ok, 60, "a first run")
        yield c


def _watch(handle: Any, timeout: float = 30) -> list[tuple[float, str]]:
    seen: list[tuple[float, str]] = []
    end = time.monotonic() + timeout
    while not handle.done():
        assert time.monotonic() < end, "the call did not finish"
        p = handle.progress()
        if not seen or seen[-1] != p:
            seen.append(p)
        time.sleep(0.05)
    return seen


def test_progress_from_an_agent(on_agent):
    with on_agent.client() as c:
        h = c.submit("progress.steps", {"pause": 0.6})
        seen = _watch(h)
        env = h.envelope()
        assert env.ok and env.result == {"done": 3}
        assert env.executed_by == "agent1"
        intermediate = [p for p in seen if 0 < p[0] < 1]
        assert intermediate, seen
        assert all(m == f"step {int(f * 4)} of 3" for f, m in intermediate), intermediate
        assert h.progress()[0] == 1.0


def test_async_handle_progress(on_agent):
    async def go() -> list[tuple[float, str]]:
        async with on_agent.async_client() as c:
            h = await c.submit("progress.steps", {"pause": 0.4})
            seen = []
            while not await h.done():
                seen.append(await h.progress())
                await asyncio.sleep(0.05)
            assert (await h.result()) == {"done": 3}
            return seen
    seen = asyncio.run(go())
    assert any(0 < f < 1 and m.startswith("step ") for f, m in seen), seen


def test_progress_over_http(on_agent):
    with on_agent.client() as c:
        token = c.token()

    def http(method: str, path: str, body: Any = None) -> tuple[int, dict[str, Any]]:
        req = urllib.request.Request(on_agent.http_url + path, method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        with on_agent.urlopen(req) as r:
            return r.status, json.loads(r.read())

    st, sub = http("POST", "/v1/progress/steps?async=1", {"pause": 0.6})
    assert st == 202 and sub["progress"] == 0 and sub["message"] == ""
    pending: list[dict[str, Any]] = []
    end = time.monotonic() + 30
    while time.monotonic() < end:
        st, body = http("GET", f"/v1/calls/{sub['call_id']}")
        if st == 200:
            break
        assert st == 202
        pending.append(body)
        time.sleep(0.1)
    assert st == 200 and body["result"] == {"done": 3}
    assert any(0 < b["progress"] < 1 and b["message"].startswith("step ") for b in pending), pending


def test_progress_from_the_coordinators_own_workers(tmp_path):
    with LocalCluster(agents=0, workdir=str(tmp_path)) as c:
        _published(c)
        with c.client() as cl:
            h = cl.submit("progress.steps", {"pause": 0.5})
            seen = _watch(h)
            assert h.envelope().executed_by == "coordinator"
        assert any(0 < f < 1 and m.startswith("step ") for f, m in seen), seen


def test_rate_limit_keeps_the_last():
    sent: list[tuple[float, str, float]] = []
    lock = threading.Lock()

    def send(f: float, m: str) -> None:
        with lock:
            sent.append((f, m, time.monotonic()))

    lim = ProgressLimiter(send, interval=0.1)
    t0 = time.monotonic()
    n = 0
    while time.monotonic() - t0 < 0.5:  # a tight loop: thousands of updates in half a second
        n += 1
        lim.report(min(1.0, n / 1e6), f"update {n}")
    last = (min(1.0, n / 1e6), f"update {n}")
    time.sleep(0.25)
    assert n > 1000
    assert 3 <= len(sent) <= 8, len(sent)  # ~10/s
    gaps = [b[2] - a[2] for a, b in zip(sent, sent[1:])]
    assert min(gaps) >= 0.09, gaps
    assert sent[-1][:2] == last  # the last one got through...
    assert sent[-1][2] - t0 <= 0.5 + 0.15  # ...at most ~100 ms late
    lim.report(0.9, "after a pause")  # a lone update after a quiet spell goes out at once
    assert sent[-1][:2] == (0.9, "after a pause")
    lim.report(0.95, "held")
    lim.close()  # the job ended: what was held goes out before the result, nothing after
    assert sent[-1][:2] == (0.95, "held")
    lim.report(1.0, "too late")
    time.sleep(0.15)
    assert sent[-1][:2] == (0.95, "held")


def test_progress_is_clamped_and_a_noop_outside_microswarm():
    import sys
    sys.path.insert(0, str(DATA))
    try:
        from progress_services import Steps
    finally:
        sys.path.remove(str(DATA))
    from microcores.core import clean_progress, current_progress
    assert Steps().run({"pause": 0}) == {"done": 3}  # no sink: progress() does nothing
    got: list[tuple[float, str]] = []

    class Sink:
        def report(self, f: float, m: str) -> None:
            got.append((f, m))
    token = current_progress.set(Sink())
    try:
        Steps().progress(7, "x" * 500)
        Steps().progress(float("nan"))
        Steps().progress(-1, "neg")
    finally:
        current_progress.reset(token)
    assert got == [(1.0, "x" * 200), (0.0, ""), (0.0, "neg")]
    assert clean_progress("bad", None) == (0.0, "")


def _cli_on_a_tty(c: LocalCluster, *args: str) -> tuple[Any, int, list[bytes]]:
    """`microswarm call` with stderr on a pseudo-terminal (stdout a pipe): its bar is drawn there."""
    import os
    import pty
    import subprocess
    import sys
    master, slave = pty.openpty()
    env = {**c.env(), "COLUMNS": "120", "TERM": "xterm"}
    proc = subprocess.Popen([sys.executable, "-m", "microswarm.cli", "call", *args], stdout=subprocess.PIPE,
                            stderr=slave, stdin=subprocess.DEVNULL, env=env)
    os.close(slave)
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)
    threading.Thread(target=read, daemon=True).start()
    return proc, master, chunks


def test_cli_call_draws_a_bar_on_a_terminal(on_agent):
    import os
    proc, master, chunks = _cli_on_a_tty(on_agent, "progress.steps", '{"pause": 0.6}')
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        time.sleep(0.2)
        os.close(master)
    import re
    drawn = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode(errors="replace"))
    assert proc.returncode == 0, drawn
    assert json.loads(out.decode().strip().splitlines()[-1]) == {"done": 3}  # stdout exactly as without a bar
    assert "step 1 of 3" in drawn or "step 2 of 3" in drawn, drawn
    assert "progress.steps@1 by agent1" in drawn


def test_cli_ctrl_c_cancels_the_submitted_call(on_agent):
    import os
    import signal
    proc, master, chunks = _cli_on_a_tty(on_agent, "progress.steps", '{"pause": 3}')
    try:
        end = time.monotonic() + 30
        while b"step 1 of 3" not in b"".join(chunks):
            assert time.monotonic() < end and proc.poll() is None, b"".join(chunks)
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    finally:
        time.sleep(0.2)
        os.close(master)
    assert proc.returncode == 130
    assert "cancelled" in b"".join(chunks).decode(errors="replace")
    with on_agent.client() as c:  # its job stopped on the agent (long before its 12 s would end)
        end = time.monotonic() + 5
        while any(a.running for a in c.status().agents):
            assert time.monotonic() < end, "the cancelled call's job still runs"
            time.sleep(0.1)


def test_dashboard_lists_calls_in_flight_with_progress(on_agent):
    import base64
    admin = (on_agent.state / "admin.token").read_text().strip()
    auth = "Basic " + base64.b64encode(f"operator:{admin}".encode()).decode()
    with on_agent.client() as c:
        h = c.submit("progress.steps", {"pause": 0.6})
        rows: list[dict[str, Any]] = []
        end = time.monotonic() + 30
        while not h.done() and time.monotonic() < end:
            req = urllib.request.Request(on_agent.http_url + "/dashboard/data", headers={"Authorization": auth})
            with on_agent.urlopen(req) as r:
                rows += [x for x in json.loads(r.read())["running"] if x["service"] == "progress.steps"]
            time.sleep(0.1)
        assert h.result() == {"done": 3}
    assert rows and all(x["executed_by"] == "agent1" for x in rows), rows
    assert any(0 < x["progress"] < 1 and x["message"].startswith("step ") for x in rows), rows
