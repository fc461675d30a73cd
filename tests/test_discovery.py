"""LAN discovery with zeroconf, end to end: a real coordinator advertises, a real agent finds it.

The agent runs in a network namespace of its own, joined to this one by a veth pair (a LAN of
two hosts, 198.18.0.0/15, the benchmarking range): multicast crosses the veth, and nothing goes
out of the machine, since the coordinator advertises only on the address it listens on. Where
network namespaces cannot be made, loopback with multicast is used instead, if the machine
allows it; otherwise the tests are skipped, saying why.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from microswarm.coordinator.state import StateDir
from microcores._discovery import should_advertise
from microswarm.cluster import LocalCluster, wait_for

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Lan:
    host: str                     # the coordinator's address (this namespace)
    prefix: list[str]             # runs a command on the agent's host
    env: dict[str, str] = field(default_factory=dict)
    how: str = ""


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=20)


@pytest.fixture(scope="module")
def lan() -> Iterator[Lan]:
    pid = os.getpid() % 10_000_000
    ns, here, there = f"msw{pid}", f"msw{pid}h", f"msw{pid}a"
    net = f"198.18.{pid % 250 + 1}"
    reasons = []
    if shutil.which("ip") is None:
        reasons.append("no `ip` command (iproute2)")
    else:
        made = _run("ip", "netns", "add", ns)
        if made.returncode == 0:
            try:
                for cmd in (["ip", "link", "add", here, "type", "veth", "peer", "name", there],
                            ["ip", "link", "set", there, "netns", ns],
                            ["ip", "addr", "add", f"{net}.1/24", "dev", here],
                            ["ip", "link", "set", here, "up"],
                            ["ip", "-n", ns, "addr", "add", f"{net}.2/24", "dev", there],
                            ["ip", "-n", ns, "link", "set", there, "up"],
                            ["ip", "-n", ns, "link", "set", "lo", "up"]):
                    r = _run(*cmd)
                    assert r.returncode == 0, f"{' '.join(cmd)}: {r.stderr}"
                yield Lan(f"{net}.1", ["ip", "netns", "exec", ns], how="network namespace and veth")
            finally:
                _run("ip", "link", "del", here)
                _run("ip", "netns", "del", ns)
            return
        reasons.append(f"cannot make a network namespace ({made.stderr.strip() or made.returncode})")
    lo = _run("ip", "link", "show", "lo") if shutil.which("ip") else None
    if lo is not None and "MULTICAST" in lo.stdout:
        yield Lan("127.0.0.1", [], {"MICROSWARM_DISCOVERY_INTERFACES": "127.0.0.1"}, how="loopback multicast")
        return
    reasons.append("loopback has no multicast")
    pytest.skip("LAN discovery needs multicast between two hosts: " + "; ".join(reasons))


def lan_cluster(lan: Lan, workdir: Path, *coordinator_args: str) -> LocalCluster:
    workdir.mkdir(parents=True, exist_ok=True)
    c = LocalCluster(agents=0, workdir=str(workdir), coordinator_args=list(coordinator_args), env=lan.env)
    c.addr = f"{lan.host}:{c.port}"  # not loopback: the coordinator advertises by default
    return c


def start_lan_agent(c: LocalCluster, lan: Lan, agent_id: str, token: str) -> subprocess.Popen[bytes]:
    log = open(c.dir / f"agent-{agent_id}.log", "ab")
    c._logs.append(log)
    env = {**c.env(), **lan.env}
    env.pop("MICROSWARM_COORDINATOR", None)
    p = subprocess.Popen([*lan.prefix, sys.executable, "-m", "microswarm.cli", "agent", "start", "--discover",
                          "--discover-timeout", "20", "--token", token, "--id", agent_id, "--slots", "1",
                          "--state-dir", str(c.agent_state(agent_id))],
                         stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=ROOT)
    c.agents[agent_id] = p
    return p


def test_advertising_is_on_by_default_except_on_loopback():
    assert should_advertise("0.0.0.0:7070", None)
    assert should_advertise("198.18.0.1:7070", None)
    assert not should_advertise("127.0.0.1:7070", None)
    assert not should_advertise("[::1]:7070", None)
    assert should_advertise("127.0.0.1:7070", True)
    assert not should_advertise("0.0.0.0:7070", False)


def test_agent_finds_the_coordinator_on_the_lan(lan, tmp_path):
    c = lan_cluster(lan, tmp_path / "lan")
    with c:
        start_lan_agent(c, lan, "found", c.token)
        c.wait_agents_ready(["found"], timeout=60)
        with c.client() as cl:
            env = cl.envelope("math.compute", {"a": 20, "b": 22})
            assert env.ok and env.result == {"result": 42.0} and env.executed_by == "found"
        log = c.log("agent-found.log")
        assert f"at {c.addr}" in log and "LAN discovery" in log, log
        assert "advertising _microswarm._tcp.local." in c.log("coordinator.log")


def test_spoofed_advertisement_never_stops_the_agent(lan, tmp_path):
    """While the real coordinator is away, someone advertises its fingerprint, pointing at a
    coordinator with another key: the agent skips that address, goes on looking, and joins the
    real one when it is back (it used to exit 2 for good)."""
    real = lan_cluster(lan, tmp_path / "real")
    pinned = StateDir(real.state)  # the coordinator the token is for: its key exists, it is not running yet
    token = pinned.token()
    other = lan_cluster(lan, tmp_path / "impostor", "--no-advertise")
    with other:
        spoof = textwrap.dedent(f"""
            import asyncio
            from microcores._discovery import Advertiser
            async def main():
                ad = Advertiser("{other.addr}", {other.port}, "{pinned.fingerprint.hex()}", "spoof", 1,
                                instance="not-the-coordinator")
                await ad.start()
                await asyncio.sleep(120)
            asyncio.run(main())
        """)
        spoofer = subprocess.Popen([sys.executable, "-c", spoof], cwd=ROOT, env={**other.env(), **lan.env},
                                   start_new_session=True)
        try:
            agent = start_lan_agent(other, lan, "fooled", token)
            log = lambda: other.log("agent-fooled.log")  # noqa: E731
            wait_for(lambda: log().count("looking again") >= 2 or agent.poll() is not None, 60,
                     "the agent to meet the spoofed address twice")
            assert agent.poll() is None, log()
            assert "token pins" in log() and "LAN discovery" in log() and "looking again" in log(), log()
            assert f"presented key {StateDir(other.state).fingerprint.hex()[:16]}" in log()
            with other.client() as cl:
                assert "fooled" not in {a.agent_id for a in cl.status().agents}
            with real:  # the real coordinator is back, advertising; the spoofer still is too
                real.agents["fooled"] = agent  # so that waiting for it notices if it exits
                real.wait_agents_ready(["fooled"], timeout=90)
                with real.client() as cl:
                    assert cl.envelope("math.compute", {"a": 40, "b": 2}).ok
                del real.agents["fooled"]  # stopped with the impostor's cluster
        finally:
            os.killpg(spoofer.pid, signal.SIGKILL)
            spoofer.wait(10)


def test_discover_and_coordinator_together_is_an_error(tmp_path):
    token = StateDir(tmp_path / "s").token()
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "microswarm.cli", "agent", "start", "--discover", "--coordinator",
                        "127.0.0.1:1", "--token", token], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "not both" in r.stderr
    assert time.monotonic() - t0 < 20
