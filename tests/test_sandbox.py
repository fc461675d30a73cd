"""The sandbox of shipped code (issue 11), with real processes: a published service tries to read the
agent's token, state directory, control socket and memory, to write into another package and to use
the network; each is refused where the level allows (`bwrap`: namespaces; `rlimits`: the weak level,
where only the scrubbed environment holds). `--require-sandbox` refuses the weak level, and an
installed package altered on disk is refused before a worker loads it."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from microcores._package import build_from_files, extract
from microcores._sandbox import STRONG, detect, verify_installed
from microcores._worker import Worker, WorkerCrashed
from microcores.client import publish
from microcores.errors import PackageError
from microswarm.cluster import LocalCluster, wait_for

DATA = Path(__file__).parent / "data"
CLI = [sys.executable, "-m", "microswarm.cli"]
TMP_MIB = 16  # the agent's job /tmp in these tests (MICROSWARM_JOB_TMP_MIB)


@pytest.fixture(scope="module")
def sandboxed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = LocalCluster(agents=0, workdir=str(tmp_path_factory.mktemp("sandbox")))
    with c:
        # the token also in the agent's environment: the probe looks for it there and in /proc
        c.start_agent("agent1", extra=["--worker-idle", "1"], env={"MICROSWARM_TOKEN": c.token,
                                                                    "MICROSWARM_JOB_TMP_MIB": str(TMP_MIB)})
        c.wait_agents_ready(["agent1"])
        publish(str(DATA / "sandbox_services.py"), coordinator=c.addr, state_dir=str(c.state))
        c.wait_agents_ready(["agent1"])
        yield c


def level_of(c: LocalCluster, agent_id: str) -> str:
    with c.client() as cl:
        return next(a.sandbox for a in cl.status().agents if a.agent_id == agent_id)


def packages_of(c: LocalCluster, agent_id: str) -> dict[str, Path]:
    """service name -> its extracted directory on that agent."""
    import json
    out = {}
    for d in (c.agent_state(agent_id) / "agent-packages").iterdir():
        if (d / ".manifest.json").exists():
            out[json.loads((d / ".manifest.json").read_bytes())["name"]] = d
    return out


def probe(c: LocalCluster, service: str, data: dict[str, Any]) -> dict[str, str]:
    with c.client() as cl:
        env = cl.envelope(service, data, timeout=60)
    assert env.ok, env.error
    assert env.executed_by == "agent1", env  # run by the agent, not by the coordinator's fallback
    return dict(env.result["results"])


def test_agent_states_its_level(sandboxed: LocalCluster) -> None:
    level = level_of(sandboxed, "agent1")
    assert level == detect().level, level
    log = sandboxed.log("agent-agent1.log")
    assert f"job sandbox {level}" in log, log[-2000:]
    print(f"sandbox level here: {level} ({detect().detail})")


def test_shipped_code_is_refused_the_agents_things(sandboxed: LocalCluster) -> None:
    c = sandboxed
    level = level_of(c, "agent1")
    wait_for(lambda: "sandbox.netprobe" in packages_of(c, "agent1"), 30, "the agent to hold sandbox.netprobe")
    pkgs = packages_of(c, "agent1")
    other = pkgs["sandbox.netprobe"] / "sandbox_services.py"
    before = other.read_bytes()
    try:
        r = probe(c, "sandbox.probe", {"agent_pid": c.agents["agent1"].pid,
                                       "state_dir": str(c.agent_state("agent1")), "other_file": str(other),
                                       "port": c.port, "fill_mib": TMP_MIB + 8})
    finally:
        if other.read_bytes() != before:  # the weak level let it write: put the other package back
            other.write_bytes(before)
    print(f"level {level}: {r}")
    # at every level: the environment is scrubbed and HOME/TMPDIR is a private temporary directory
    assert r["env_token"].startswith("refused"), r
    assert r["tmp_write"].startswith("allowed"), r
    if level != STRONG:
        pytest.skip(f"the sandbox level here is {level!r} ({detect().detail}): only the scrubbed environment "
                    "is enforced; the agent's /proc, state directory, other packages and the network are not "
                    "refused at this level")
    assert "No space left" in r["tmp_fill"], r  # /tmp is bounded (tmpfs pages are memory)
    for what in ("proc_environ", "proc_mem", "state_list", "state_read", "control_socket",
                 "write_other_package", "network"):
        assert r[what].startswith("refused"), (what, r)
    assert other.read_bytes() == before


def test_network_when_declared(sandboxed: LocalCluster) -> None:
    r = probe(sandboxed, "sandbox.netprobe", {"port": sandboxed.port})
    assert r["network"] == "allowed: connected", r


def test_altered_package_is_refused_before_loading(sandboxed: LocalCluster) -> None:
    """Another package's code (at the weak level) or anyone on the machine alters an installed file:
    the next worker checks the files against the manifest and refuses to load them."""
    c = sandboxed
    target = packages_of(c, "agent1")["sandbox.netprobe"] / "sandbox_services.py"
    original = target.read_bytes()
    try:
        probe(c, "sandbox.netprobe", {"port": c.port})  # a worker exists, then goes idle
        target.write_bytes(original + b"\nimport os; os.environ['ALTERED'] = '1'\n")
        time.sleep(2.5)  # --worker-idle 1: the idle worker stops; the next job starts a new one
        with c.client() as cl:
            env = cl.envelope("sandbox.netprobe", {"port": c.port}, timeout=60)
        # the agent refuses to load it; the coordinator (whose copy is intact) may run it instead
        assert not (env.ok and env.executed_by == "agent1"), env
        wait_for(lambda: "does not match its sha256" in c.log("agent-agent1.log"), 20, "the refusal in the log")
    finally:
        target.write_bytes(original)


def test_require_sandbox_refuses_the_weak_level(sandboxed: LocalCluster, tmp_path: Path) -> None:
    env = {**sandboxed.env(), "MICROSWARM_SANDBOX": "off"}  # simulates a machine without namespaces
    r = subprocess.run([*CLI, "agent", "start", "--coordinator", sandboxed.addr, "--token", sandboxed.token,
                        "--state-dir", str(tmp_path / "weak"), "--require-sandbox"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "--require-sandbox" in r.stderr and "rlimits" in r.stderr, r.stderr


def _package(files: dict[str, bytes], tmp: Path) -> tuple[Path, str]:
    sys.path.insert(0, str(DATA))
    try:
        from sandbox_services import NetProbe
    finally:
        sys.path.remove(str(DATA))
    pkg = build_from_files(NetProbe, files, {"module": "sandbox_services", "class": "NetProbe"})
    d = tmp / pkg.digest
    extract(pkg, d)
    return d, pkg.digest


def test_verify_installed_unit(tmp_path: Path) -> None:
    src = (DATA / "sandbox_services.py").read_bytes()
    d, digest = _package({"sandbox_services.py": src}, tmp_path)
    verify_installed(d, digest)
    (d / "planted.py").write_text("x = 1\n")
    with pytest.raises(PackageError, match="not in its manifest"):
        verify_installed(d, digest)
    (d / "planted.py").unlink()
    (d / "sandbox_services.py").write_bytes(src + b"\n")
    with pytest.raises(PackageError, match="does not match its sha256"):
        verify_installed(d, digest)
    async def start() -> None:
        w = Worker(d, None, detect(), digest)
        try:
            await w.start()
        finally:
            await w.close()
    with pytest.raises(WorkerCrashed, match="does not match its sha256"):
        asyncio.run(start())


def test_scrubbed_environment_at_every_level() -> None:
    from microcores._sandbox import worker_env
    env = worker_env({"PATH": "/bin", "MICROSWARM_TOKEN": "secret", "AWS_SECRET_ACCESS_KEY": "x",
                      "MICROSWARM_JOB_CPU_S": "5", "LC_ALL": "C"})
    assert env == {"PATH": "/bin", "MICROSWARM_JOB_CPU_S": "5", "LC_ALL": "C"}
    env = worker_env({"PATH": "/bin", "MICROSWARM_TOKEN": "secret", "GPU": "0",
                      "MICROSWARM_WORKER_ENV": "GPU,MICROSWARM_TOKEN"})
    assert env == {"PATH": "/bin", "GPU": "0"}  # the operator's names, never the token
