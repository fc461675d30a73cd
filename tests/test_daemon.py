"""Daemon behaviour with real processes: SIGTERM drains, SIGHUP reloads, JSON logs, config files."""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from microswarm.coordinator.state import StateDir
from microswarm.cluster import LocalCluster, wait_for

DATA = Path(__file__).parent / "data"
CLI = [sys.executable, "-m", "microswarm.cli"]


# ---------------------------------------------------------------- SIGTERM

def test_sigterm_answers_every_call_in_flight_and_exits_0(tmp_path):
    c = LocalCluster(agents=1, slots=2, workdir=str(tmp_path), coordinator_args=["--fallback-slots", "4"])
    with c:
        async def scenario() -> tuple[list, object]:
            async with c.async_client() as cl:
                calls = [asyncio.ensure_future(cl.envelope("demo.sleep", {"seconds": 1.5}, timeout=30))
                         for _ in range(6)]  # two on the agent, four on the coordinator's own workers
                loop = asyncio.get_running_loop()
                with c.client() as sync:
                    await loop.run_in_executor(None, lambda: wait_for(
                        lambda: sum(a.running for a in sync.status().agents) == 2, 15, "both agent slots busy"))
                await asyncio.sleep(0.3)
                c.coordinator.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.2)
                late = await cl.envelope("math.compute", {"a": 1, "b": 1})  # arrives while draining
                return await asyncio.gather(*calls), late

        t0 = time.monotonic()
        envs, late = asyncio.run(scenario())
        assert [e.ok for e in envs] == [True] * 6, [e.error for e in envs]
        assert all(e.result["slept"] >= 1.5 for e in envs)
        assert {e.executed_by for e in envs} == {"agent1", "coordinator"}
        assert not late.ok and late.error["code"] == "unavailable" and "shutting down" in late.error["message"]
        assert c.coordinator.wait(30) == 0
        assert time.monotonic() - t0 < 20
        logged = [json.loads(line) for line in (c.state / "calls.jsonl").read_text().splitlines()]
        sleeps = [r for r in logged if r.get("service") == "demo.sleep"]
        assert len(sleeps) == 6 and all(r.get("success") for r in sleeps), sleeps


# ---------------------------------------------------------------- SIGHUP

def _publish_behind_its_back(state: Path, path: Path) -> str:
    """Another process adds a version to the coordinator's state directory (a restore, say)."""
    from microswarm.coordinator.registry import Registry
    from microcores._package import build, import_path, services_in

    reg = Registry(StateDir(state))
    reg.load()
    (cls,) = [c for m in import_path(path) for c in services_in(m)]
    entry, _ = reg.publish(build(cls).manifest, build(cls).archive)
    return entry.name


def test_sighup_reloads_packages_and_join_secrets(tmp_path):
    c = LocalCluster(agents=1, slots=1, workdir=str(tmp_path))
    with c, c.client() as cl:
        assert cl.envelope("tests.versioned", {"x": 3}).error["code"] == "unknown_service"
        name = _publish_behind_its_back(c.state, DATA / "versioned.py")
        c.coordinator.send_signal(signal.SIGHUP)
        wait_for(lambda: cl.envelope(name, {"x": 3}).ok, 15, "the reloaded package to answer")
        c.wait_agents_ready(["agent1"])  # the new version reached the agent
        env = cl.envelope(name, {"x": 4})
        assert env.result == {"y": 4, "version": "1"} and env.executed_by == "agent1"
        assert "reloaded: 1 service(s) changed (tests.versioned)" in c.log("coordinator.log")

        # revoke the join secret the agent used: it is dropped, and cannot come back
        secrets_file = c.state / "join_secrets.json"
        st = StateDir(c.state)
        st.add_join_secret()
        data = json.loads(secrets_file.read_text())
        secrets_file.write_text(json.dumps({"secrets": data["secrets"][1:]}))
        c.coordinator.send_signal(signal.SIGHUP)
        assert c.agents["agent1"].wait(30) == 2
        assert "join secret not accepted" in c.log("agent-agent1.log")
        assert "agent agent1 removed: its join secret was revoked" in c.log("coordinator.log")
        assert cl.envelope("math.compute", {"a": 1, "b": 1}).executed_by == "coordinator"
        assert c.coordinator.poll() is None  # it kept serving throughout


def test_sighup_with_a_damaged_registry_keeps_serving(tmp_path):
    c = LocalCluster(agents=0, workdir=str(tmp_path))
    with c, c.client() as cl:
        (c.state / "registry.json").write_text("{not json")
        c.coordinator.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload failed, keeping the current state" in c.log("coordinator.log"), 10, "the reload")
        assert cl.envelope("math.compute", {"a": 1, "b": 2}).result == {"result": 3.0}


# ---------------------------------------------------------------- JSON logs

def _events(text: str) -> list[dict]:
    lines = [line for line in text.splitlines() if line.strip()]
    events = []
    for line in lines:
        try:
            events.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}")
    return events


def test_json_logs_are_one_event_per_line_with_ids(tmp_path):
    flags = ["--log-format", "json", "--log-level", "debug"]
    c = LocalCluster(agents=1, slots=1, workdir=str(tmp_path), coordinator_args=flags, agent_args=flags)
    with c, c.client() as cl, concurrent.futures.ThreadPoolExecutor(1) as pool:
        assert cl.envelope("math.compute", {"a": 1, "b": 2}).executed_by == "agent1"
        fut = pool.submit(cl.envelope, "demo.sleep", {"seconds": 2.0})
        wait_for(lambda: any(a.running for a in cl.status().agents), 15, "the job to reach the agent")
        c.kill_agent("agent1", signal.SIGUSR1)  # pause: the running job is handed back
        assert fut.result(30).executed_by == "coordinator"
    coordinator = _events(c.log("coordinator.log"))
    agent = _events(c.log("agent-agent1.log"))
    assert all({"ts", "time", "level", "logger", "msg"} <= e.keys() for e in coordinator + agent)
    # the agent's events carry its id; the job it handed back carries the job id and the reason
    assert all(e.get("agent") == "agent1" for e in agent if e["logger"].startswith("microswarm.agent"))
    stop = next(e for e in agent if e.get("limit") == "paused")
    assert stop["job"].startswith("j") and stop["service"] == "demo.sleep"
    # the coordinator's: the fallback names agent and job, each call its client
    took_over = next(e for e in coordinator if "takes over" in e["msg"])
    assert took_over["agent"] == "agent1" and took_over["job"] == stop["job"]
    calls = [e for e in coordinator if e.get("event") == "call"]
    assert {"client", "service", "executed_by", "outcome", "ms"} <= calls[0].keys()
    assert any(e["service"] == "demo.sleep" and e["executed_by"] == "coordinator" for e in calls)
    assert any(e["logger"] == "microswarm.stdout" and "listening" in e["msg"] for e in coordinator)


# ---------------------------------------------------------------- config files

def test_config_file_settings_with_flags_overriding_them(tmp_path):
    cfg = tmp_path / "microswarm.toml"
    cfg.write_text('[coordinator]\ndispatch = "round_robin"\nliveness = 8.5\n\n'
                   '[agent]\nslots = 3\nmax_cpu = 50\nmax-memory = "1GiB"\nidle_only = false\n')
    c = LocalCluster(agents=0, workdir=str(tmp_path / "c"), coordinator_args=["--config", str(cfg)])
    (tmp_path / "c").mkdir()
    with c, c.client() as cl:
        assert cl.status().dispatch == "round_robin"
        c.start_agent("conf", slots=1, extra=["--config", str(cfg)])  # --slots 1 beats the file's 3
        c.wait_agents_ready(["conf"])
        r = subprocess.run([*CLI, "agent", "status", "--state-dir", str(c.agent_state("conf"))],
                           capture_output=True, text=True, timeout=30)
        st = json.loads(r.stdout)
        assert st["slots"] == 1
        assert st["settings"]["max_cpu"] == 50 and st["settings"]["max_memory"] == 2**30


@pytest.mark.parametrize("text,words", [
    ('[agent]\nmax_cpus = 5\n', "has no setting 'max_cpus'"),
    ('[agent]\nslots = "many"\n', "slots = 'many' is not valid for --slots"),
    ('slots = 2\n', "under a [coordinator] or [agent] table"),
    ('[agent\n', "not valid TOML"),
])
def test_bad_config_files_are_clear_errors(tmp_path, text, words):
    cfg = tmp_path / "microswarm.toml"
    cfg.write_text(text)
    r = subprocess.run([*CLI, "agent", "start", "--config", str(cfg), "--token", "x"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 2 and words in " ".join(r.stderr.split()), r.stderr
