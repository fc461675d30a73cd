"""A link no agent can flood: tests with a real adversarial agent (tests/data/rogue_agent.py, a
process with a valid join token that does the real handshake and then misbehaves), and unit tests
of the pieces (buckets, escaping, the pre-auth gate, the partial-frame rule, claims against what
was given). The bounds asserted are the ones docs/design.md states ("Link limits").
"""
from __future__ import annotations

import asyncio
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from microswarm.coordinator.link import LINK_BUDGET, PARTIAL_IDLE, AgentLinkService, LinkLimit
from microswarm.coordinator.preauth import HANDSHAKE_S, Busy, PreAuthGate
from microswarm.coordinator.logsafe import safe
from microswarm.coordinator.ratelimit import Bucket, Limits
from microswarm.cluster import LocalCluster, wait_for
from microswarm.protos import microswarm_pb2 as pb

DATA = Path(__file__).resolve().parent / "data"
ROGUE = DATA / "rogue_agent.py"
sys.path.insert(0, str(DATA))
from rogue_agent import FORGED_LINE, events  # noqa: E402

MiB = 1 << 20


# ---------------------------------------------------------------- helpers

class Rogue:
    """A rogue_agent.py process of a cluster; c.stop() (through c.agents) kills it if a test fails."""

    def __init__(self, c: LocalCluster, agent_id: str, *args: str) -> None:
        self.path = c.dir / f"rogue-{agent_id}.out"
        self.f = open(self.path, "wb")
        c._logs.append(self.f)
        self.p = subprocess.Popen([sys.executable, str(ROGUE), "--coordinator", c.addr, "--token", c.token,
                                   "--id", agent_id, *args], stdout=self.f, stderr=subprocess.STDOUT, env=c.env(),
                                  start_new_session=True)
        c.agents[f"rogue:{agent_id}"] = self.p

    def events(self) -> list[dict[str, Any]]:
        return events(self.path.read_text(errors="replace"))

    def wait(self, timeout: float) -> list[dict[str, Any]]:
        try:
            self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.p.pid, signal.SIGKILL)
            self.p.wait(5)
            raise AssertionError(f"the rogue did not finish in {timeout:.0f} s:\n"
                                 f"{self.path.read_text()[-2000:]}") from None
        return self.events()

    def wait_event(self, kind: str, timeout: float) -> dict[str, Any]:
        return wait_for(lambda: next((e for e in self.events() if e["event"] == kind), None), timeout,
                        f"the rogue's {kind!r} event")


class RssPeak:
    """Samples a process's RSS every 20 ms in a thread: its peak, in bytes."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.02)

    def stop(self) -> int:
        self._stop.set()
        self._t.join(5)
        return self.peak


def p50_ms(client: Any, seconds: float, n: int = 200) -> float:
    times = []
    end = time.monotonic() + seconds
    for i in range(n):
        t = time.perf_counter()
        env = client.envelope("math.compute", {"a": i, "b": 1.0, "op": "add"}, timeout=30)
        times.append((time.perf_counter() - t) * 1000)
        assert env.ok, env.error
        if time.monotonic() > end:
            break
    return statistics.median(times)


def lines_about(c: LocalCluster, who: str) -> list[str]:
    return [line for line in c.log("coordinator.log").splitlines() if who in line]


# ---------------------------------------------------------------- floods

def test_heartbeat_flood_is_cut_off_and_other_callers_stay_fast(tmp_path):
    """One agent sent 2.33 M heartbeats in 8 s and other clients' p50 went from 3 to 80 ms (main).
    Now each session is cut off (sealed `rate_limited`) after its burst, even when it rejoins at once."""
    with LocalCluster(agents=1, slots=2, workdir=str(tmp_path)) as c, c.client() as cl:
        p50_ms(cl, 2.0, 50)  # warm
        before = p50_ms(cl, 2.0)
        rogue = Rogue(c, "flooder", "--flood", "heartbeat", "--reconnect", "--reconnect-delay", "0.1",
                      "--seconds", "8")
        rogue.wait_event("joined", 30)
        during = p50_ms(cl, 4.0)
        evs = rogue.wait(60)
        base = max(before, p50_ms(cl, 2.0))  # before and after: the box's own load moves both
    refusals = [e for e in evs if e["event"] == "refused"]
    sessions = [e for e in evs if e["event"] == "closed"]
    sent = next(e for e in evs if e["event"] == "summary")["sent"].get("heartbeat", 0)
    print(f"p50 {base:.2f} ms alone, {during:.2f} ms during the flood; {len(sessions)} sessions, {sent} heartbeats "
          f"sent, refusals {sorted({e['code'] for e in refusals})}")
    assert refusals, "the flooding agent was never refused"
    assert all(e["code"] == "rate_limited" and e["sealed"] for e in refusals if e["code"] != "busy"), refusals
    # every session but the last (cut by the rogue's own --seconds) was ended by the coordinator
    assert len(sessions) >= 3 and all(e["how"] != "still open" for e in sessions[:-1]), sessions
    assert len(refusals) >= len(sessions) - 1
    assert during <= max(4 * base, base + 25.0), f"other callers slowed down: p50 {base:.2f} -> {during:.2f} ms"


def test_installed_claim_flood_logs_a_bounded_number_of_lines_and_forges_none(tmp_path):
    """20,001 Installed claims made 20,002 log lines with a forged line in them (main)."""
    with LocalCluster(agents=1, slots=2, workdir=str(tmp_path)) as c:
        rogue = Rogue(c, "claimer", "--flood", "installed", "--inject-log", "--seconds", "6")
        evs = rogue.wait(60)
        with c.client() as cl:
            assert cl.call("math.compute", {"a": 1, "b": 2, "op": "add"}) == {"result": 3.0}
        log = c.log("coordinator.log").splitlines()
    sent = next(e for e in evs if e["event"] == "summary")["sent"]["installed"]
    about = [line for line in log if "claimer" in line]
    print(f"{sent} claims sent, {len(about)} log lines about the agent")
    assert any(e["event"] == "refused" and e["code"] == "rate_limited" and e["sealed"] for e in evs), evs
    assert len(about) <= 20, "\n".join(about)  # joined, holds (6), could not install (6), cut off, removed, summary
    assert not any(line.startswith(FORGED_LINE[:20]) for line in log), "a forged log line got in"
    assert all("\\n" + FORGED_LINE[:20] in line for line in log if "FORGED" in line)  # escaped, on the agent's line


def test_bogus_results_are_faults_not_work(tmp_path):
    """Results for jobs an agent was never given count as faults (quarantine), never as work."""
    with LocalCluster(agents=1, slots=2, workdir=str(tmp_path)) as c, c.client() as cl:
        slow = Rogue(c, "bogus", "--flood", "bogus-results", "--count", "4", "--interval", "0.7", "--seconds", "12")

        def bogus_agent() -> Any:
            return next((a for a in cl.status().agents if a.agent_id == "bogus"), None)
        wait_for(lambda: (bogus_agent() is not None and bogus_agent().state == "quarantined"), 20,
                 "the agent sending results for jobs it was not given to be quarantined")
        assert bogus_agent().jobs_done == 0
        slow.p.terminate()
        burst = Rogue(c, "bogus2", "--flood", "bogus-results", "--seconds", "6")
        evs = burst.wait(60)
    assert any(e["event"] == "refused" and e["code"] == "rate_limited" for e in evs), evs


# ---------------------------------------------------------------- memory

def test_partial_frames_are_bounded_and_a_dropped_agents_stream_is_closed(tmp_path):
    """12 sessions each parked 80 MiB of partial frames (RSS 77 -> 1,047 MiB on main), kept after the
    liveness timer dropped them because the stream was never closed. Now a session with no job in
    flight may hold PARTIAL_IDLE, one that owes results up to 80 MiB, all of them LINK_BUDGET; a
    dropped session's stream is closed."""
    n_big, n_small = 10, 3
    with LocalCluster(agents=1, slots=2, workdir=str(tmp_path)) as c, c.client() as cl:
        rss = RssPeak(c.coordinator.pid)
        seconds = "40"
        big = [Rogue(c, f"big{i}", "--park-partial-mib", "80", "--park-after-jobs", "1", "--seconds", seconds)
               for i in range(n_big)]
        small = [Rogue(c, f"small{i}", "--park-partial-mib", "3", "--seconds", seconds) for i in range(n_small)]
        c.wait_agents_ready([f"big{i}" for i in range(n_big)], timeout=60)
        # calls for the rogues' slots: each gets a job it never answers, so it owes a result
        async def burst() -> list[Any]:
            async with c.async_client() as ac:
                return await asyncio.gather(*(ac.envelope("math.compute", {"a": i, "b": 1, "op": "add"}, timeout=60)
                                              for i in range(3 * n_big)))
        envs = asyncio.run(burst())  # (a call can run out of time on two rogues in a row: not asserted)
        outs = {r.path.stem: r.wait(90) for r in big + small}
        for i in range(5):  # honest calls keep working
            assert cl.call("math.compute", {"a": i, "b": 2, "op": "add"}) == {"result": i + 2.0}
        peak = rss.stop()
    grew = (peak - rss.base) / MiB
    closed = {k: next(e for e in v if e["event"] == "closed") for k, v in outs.items()}
    codes = sorted(e["code"] for v in outs.values() for e in v if e["event"] == "refused")
    parked = {k for k, v in outs.items() if any(e["event"] == "job" for e in v)}
    print(f"coordinator RSS {rss.base / MiB:.0f} -> peak {peak / MiB:.0f} MiB (+{grew:.0f}); refusals {codes}; "
          f"{len(parked)} rogues owed results; closed after {sorted(e['after_s'] for e in closed.values())} s; "
          f"{sum(e.ok for e in envs)} of {len(envs)} calls of the burst answered")
    assert all(e["how"] != "still open" for e in closed.values()), closed  # every stream was ended by the coordinator
    for name in (f"rogue-small{i}" for i in range(n_small)):  # silent with 3 MiB parked: dropped, stream closed
        assert closed[name]["after_s"] < c_liveness() + 6, closed[name]
    assert "overloaded" in codes or len(parked) * 80 <= LINK_BUDGET // MiB, codes
    assert grew < LINK_BUDGET / MiB + 160, f"RSS grew by {grew:.0f} MiB"


def c_liveness() -> float:
    return 6.0  # the coordinator's default --liveness


def test_big_unauthenticated_hellos_keep_rss_bounded_and_an_honest_agent_joins(tmp_path):
    """8 unauthenticated 60 MiB hellos peaked at 651 MiB (main). Now at most PREAUTH_TOTAL handshakes
    are read at once (one per host), each frame at most HELLO_MAX."""
    with LocalCluster(agents=1, slots=2, workdir=str(tmp_path)) as c:
        rss = RssPeak(c.coordinator.pid)
        rogue = Rogue(c, "hello", "--big-hello-mib", "60", "--connections", "12", "--seconds", "10")
        time.sleep(2.0)
        t = time.monotonic()
        c.start_agent("late")
        c.wait_agents_ready(["late"], timeout=60)
        joined = time.monotonic() - t
        evs = rogue.wait(90)
        peak = rss.stop()
    answers = next(e for e in evs if e["event"] == "hello")["answers"]
    grew = (peak - rss.base) / MiB
    print(f"coordinator RSS {rss.base / MiB:.0f} -> peak {peak / MiB:.0f} MiB (+{grew:.0f}); answers {answers}; "
          f"the honest agent joined in {joined:.1f} s")
    # Over TLS, a stream the coordinator ends while a 60 MiB hello is still being written surfaces at the
    # rogue as an RPC error (INTERNAL/UNAVAILABLE/CANCELLED) rather than as the refusal frame: both are a
    # refused hello. What must never come back is a CoordinatorHello (an oversized hello read and accepted).
    cut = {k for k in answers if k.split(":")[:2] in (["error", "AioRpcError"],)
           and k.split(":")[2] in ("INTERNAL", "UNAVAILABLE", "CANCELLED")}
    assert set(answers) - cut <= {"refusal:too_large", "refusal:busy"}, answers
    assert answers.get("refusal:too_large", 0) >= 1, answers
    assert grew < 450, f"RSS grew by {grew:.0f} MiB"


# ---------------------------------------------------------------- units

def test_bucket_allows_its_burst_then_its_rate():
    b = Bucket(10.0, 5.0, stamp=100.0)
    assert [b.take(100.0) for _ in range(6)] == [True] * 5 + [False]
    assert b.take(100.15) and not b.take(100.15)  # 0.15 s later: one more (1.5 tokens)
    assert b.take(200.0) and b.tokens == 4.0    # never more than the burst


def test_logsafe_escapes_control_characters_and_truncates():
    assert safe("disk full\n2030 ERROR forged") == "disk full\\n2030 ERROR forged"
    assert safe("a\x1b[31mred\r") == "a\\x1b[31mred\\r"
    assert safe("x" * 300, 10) == "x" * 10 + "...(+290 chars)"
    assert safe("plain") == "plain"


def test_pre_auth_gate_bounds_handshakes_per_host_and_in_all():
    async def main() -> None:
        gate = PreAuthGate(total=2, per_host=1, queue_per_host=2, wait_s=0.2)
        inside: list[str] = []
        release = asyncio.Event()

        async def hold(host: str) -> str:
            try:
                async with gate.slot(host):
                    inside.append(host)
                    await release.wait()
                return "in"
            except Busy:
                return "busy"

        a = [asyncio.create_task(hold("10.0.0.1")) for _ in range(4)]
        b = asyncio.create_task(hold("10.0.0.2"))
        c = asyncio.create_task(hold("10.0.0.3"))
        await asyncio.sleep(0.05)
        assert sorted(inside) == ["10.0.0.1", "10.0.0.2"]  # one per host, two in all
        results = await asyncio.gather(*a[1:], c)  # waiters time out; past the host's queue at once
        assert results.count("busy") == 4 and gate.refused == 4
        release.set()
        assert await a[0] == "in" and await b == "in"
        assert not gate._hosts  # nothing left behind

    asyncio.run(main())


class _Entry:
    def __init__(self, name: str, digest: str) -> None:
        self.name, self.digest, self.label = name, digest, f"{name}@1"
        self.ref = pb.PackageRef(name=name, version="1", digest=digest)


class _FakeCoordinator:
    def __init__(self) -> None:
        e = _Entry("math.compute", "d" * 64)
        self.registry = type("R", (), {"by_digest": {e.digest: e}})()
        self.entry = e
        self.changed = 0

    def holdings_changed(self) -> None:
        self.changed += 1

    def holdings_for(self, s: Any) -> pb.Holdings:
        return pb.Holdings(packages=[self.entry.ref])


def test_claims_for_packages_not_given_are_ignored_and_the_sets_stay_bounded(caplog):
    from microswarm.coordinator.agents import AgentSession

    fake = _FakeCoordinator()
    link = AgentLinkService(fake)  # type: ignore[arg-type]
    s = AgentSession("a1", b"k" * 32, "ipv4:127.0.0.1:1", 2, "h", None, fake)  # type: ignore[arg-type]
    s.planned = {"math.compute"}
    s.limits = Limits({})  # no rate limit: the sets are bounded by what was given, not by the limit
    caplog.set_level("INFO", logger="microswarm.agents")
    forged = "x\n" + FORGED_LINE
    for i in range(20_001):
        ref = pb.PackageRef(name="math.compute" + forged, version=forged, digest=f"{i:064x}")
        link._handle(s, pb.ToCoordinator(installed=pb.Installed(ref=ref, ok=i % 2 == 0, error=forged)), time.monotonic())
    assert s.holdings == set() and s.install_failed == set() and s.claims_ignored == 20_001
    assert not caplog.records  # counted, not logged one by one
    for i in range(1000):  # the real package, flipping: one line per outcome, escaped
        link._handle(s, pb.ToCoordinator(installed=pb.Installed(ref=fake.entry.ref, ok=i % 2 == 0, error=forged)),
                     time.monotonic())
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 2 and all("\n" not in m for m in msgs), msgs
    s.limits = Limits()
    with pytest.raises(LinkLimit, match="install reports"):
        for _ in range(10_000):
            link._handle(s, pb.ToCoordinator(installed=pb.Installed(ref=fake.entry.ref, ok=True)), time.monotonic())


def test_partial_message_pieces_must_be_full_and_bounds_are_stated():
    from microcores._secure import MIN_PIECE, agent_channel, coordinator_channel
    from microcores.errors import ProtocolError

    a, c = agent_channel("AES-256-GCM", b"1" * 32, b"2" * 32), coordinator_channel("AES-256-GCM", b"1" * 32, b"2" * 32)
    ct = a._send.encrypt(a._nonce(0), b"tiny", a._send_label + b"\1")
    with pytest.raises(ProtocolError, match="pieces before the last"):
        c.open(0, ct, True)
    assert PARTIAL_IDLE <= 8 * MiB and MIN_PIECE == 64 * 1024 and HANDSHAKE_S <= 5
