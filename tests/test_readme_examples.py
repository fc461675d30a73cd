"""The README's client examples, run as written against a real cluster; and a CLI that explains itself
(help with defaults everywhere, `status` that shows the cache in a few figures and fits the terminal).

The commands come from README.md's ```sh blocks (so when the README changes, this follows): the
"Publishing a service" block (its square_sum.py is the README's ```python block), the submit /
result / cancel / map block, and the block "Away from the operator's machine". Each line runs through
bash, as a reader would paste it; `NAME=$(CMD)` lines set NAME for the lines after. A `# ...` line
right after a command is its expected output (`...` in it: the rest not checked).
"""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from microswarm.cluster import LocalCluster

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
CLI = [sys.executable, "-m", "microswarm.cli"]


def sh_blocks() -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```", README, re.S | re.M)


def block_with(text: str) -> list[str]:
    found = [b for b in sh_blocks() if text in b]
    assert len(found) == 1, f"README.md: expected one ```sh block with {text!r}, found {len(found)}"
    return found[0].splitlines()


def python_block_with(text: str) -> str:
    found = [b for b in re.findall(r"^```python\n(.*?)^```", README, re.S | re.M) if text in b]
    assert found, f"README.md: no ```python block with {text!r}"
    return found[0]


def commands(lines: list[str]) -> list[tuple[str, str | None]]:
    """(command, expected output or None) for each `microswarm` line (and `NAME=$(microswarm ...)`)."""
    out: list[tuple[str, str | None]] = []
    for i, line in enumerate(lines):
        if not re.match(r"^(\w+=\$\()?microswarm ", line):
            continue
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        out.append((line, nxt[1:].strip() if nxt.startswith("# ") else None))
    return out


def subset(expected: Any, got: Any) -> bool:
    if isinstance(expected, dict):
        return isinstance(got, dict) and all(k in got and subset(v, got[k]) for k, v in expected.items())
    return bool(expected == got)


def check_output(expected: str, stdout: str) -> None:
    """The README's `# {...}` line: the JSON printed, or (with `, ...}`) part of it."""
    partial = ", ...}" in expected
    want = json.loads(expected.replace(", ...}", "}"))
    got = json.loads(stdout.strip().splitlines()[-1])
    assert (subset(want, got) if partial else got == want), f"README says {expected}, got {stdout.strip()}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = LocalCluster(agents=1, slots=2, workdir=str(tmp_path_factory.mktemp("readme")))
    with c:
        yield c


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `microswarm` on PATH that is this interpreter's, installed or not."""
    d = tmp_path_factory.mktemp("bin")
    (d / "microswarm").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m microswarm "$@"\n')
    (d / "microswarm").chmod(0o755)
    return d


class Shell:
    """Runs README lines one at a time through bash, keeping `NAME=$(...)` assignments."""

    def __init__(self, env: dict[str, str], cwd: Path, shim: Path) -> None:
        self.env = {**env, "PATH": f"{shim}{os.pathsep}{env.get('PATH', '')}"}
        self.env.pop("COLUMNS", None)
        self.cwd = cwd

    def run(self, line: str) -> subprocess.CompletedProcess[str]:
        m = re.match(r"^(\w+)=\$\((.*)\)\s*(#.*)?$", line)
        r = subprocess.run(["bash", "-c", m.group(2) if m else line], capture_output=True, text=True,
                           env=self.env, cwd=self.cwd, timeout=120)
        if m and r.returncode == 0:
            self.env[m.group(1)] = r.stdout.strip()
        return r


def expected_rc(line: str, expected: str | None) -> int:
    m = re.search(r"# exit (\d+) while it runs", line)  # `microswarm result "$id"  # exit 3 while it runs`
    if m:
        return int(m.group(1))
    if expected and '"status": "error"' in expected:
        return 1  # an error envelope
    return 0


def test_readme_publish_and_call(cluster, shim, tmp_path):
    (tmp_path / "square_sum.py").write_text(python_block_with("class SquareSum"))
    sh = Shell(cluster.env(), tmp_path, shim)
    cmds = commands(block_with("microswarm publish square_sum.py"))
    assert [c for c, _ in cmds if "publish" in c] and [c for c, e in cmds if e]
    for line, expected in cmds:
        r = sh.run(line)
        assert r.returncode == expected_rc(line, expected), f"{line}\n{r.stdout}{r.stderr}"
        if expected:
            check_output(expected, r.stdout)


def test_readme_submit_result_cancel_map(cluster, shim, tmp_path):
    # inputs.jsonl, which the README's `map` line reads
    (tmp_path / "inputs.jsonl").write_text("".join(json.dumps({"a": i, "b": 2, "op": "mul"}) + "\n"
                                                   for i in range(20)))
    sh = Shell(cluster.env(), tmp_path, shim)
    cmds = commands(block_with("microswarm submit"))
    assert {"submit", "result", "cancel", "map"} <= {c.split("microswarm ")[1].split()[0] for c, _ in cmds}
    for line, expected in cmds:
        r = sh.run(line)
        assert r.returncode == expected_rc(line, expected), f"{line}\n{r.stdout}{r.stderr}"
        if line.startswith("id="):
            assert sh.env["id"].startswith("c"), r.stdout
    # what the README says of them: the cancelled call's envelope says `cancelled`; map wrote one
    # envelope per input, in order
    r = sh.run('microswarm result "$id" --json')
    assert json.loads(r.stdout)["error"]["code"] == "cancelled", r.stdout + r.stderr
    envs = [json.loads(x) for x in (tmp_path / "envelopes.jsonl").read_text().splitlines()]
    assert [e["result"]["result"] for e in envs] == [i * 2.0 for i in range(20)]


def test_readme_call_from_a_second_machine(cluster, shim, tmp_path):
    lines = block_with("MICROSWARM_FINGERPRINT")
    # the README's exports name these variables (their values there are placeholders: ours instead)
    exported = {v.split("=")[0] for ln in lines if ln.startswith("export ") for v in ln.split("#")[0].split()[1:]}
    assert exported == {"MICROSWARM_COORDINATOR", "MICROSWARM_FINGERPRINT", "MICROSWARM_CLIENT_ID",
                        "MICROSWARM_CLIENT_SECRET"}
    cred = cluster.create_client("readme", "*")
    elsewhere = tmp_path / "empty-state"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MICROSWARM_")}
    env.update(MICROSWARM_STATE_DIR=str(elsewhere), MICROSWARM_COORDINATOR=cluster.addr,
               MICROSWARM_FINGERPRINT=cluster.fingerprint(), MICROSWARM_CLIENT_ID=cred["client_id"],
               MICROSWARM_CLIENT_SECRET=cred["client_secret"])
    if not cluster.tls:
        env["MICROSWARM_INSECURE"] = "1"
    cmds = commands(lines)
    assert cmds == [("microswarm call math.compute '{\"a\": 6, \"b\": 7, \"op\": \"mul\"}'", None)]
    r = Shell(env, tmp_path, shim).run(cmds[0][0])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"result": 42.0}
    assert list(elsewhere.iterdir()) == []  # nothing of the operator's was needed, nor made


# ---------------------------------------------------------------- a CLI that explains itself

def test_bare_microswarm_prints_help():
    r = subprocess.run(CLI, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("usage: microswarm") and "coordinator" in r.stdout
    assert "--help" in r.stdout  # and says where to look next


def test_help_shows_defaults():
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("MICROSWARM_LISTEN", None)
    r = subprocess.run([*CLI, "coordinator", "start", "--help"], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 0
    lines = {ln.split()[0]: ln for ln in r.stdout.splitlines() if ln.strip().startswith("--")}
    assert "(default: 2.0)" in lines["--queue-wait"]
    assert "(default: 10000)" in lines["--queue-limit"]
    assert "env MICROSWARM_LISTEN; default: 127.0.0.1:7070" in lines["--listen"]  # from the environment
    r = subprocess.run([*CLI, "agent", "start", "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert "(default: 60.0)" in r.stdout and "env MICROSWARM_TOKEN" in r.stdout
    r = subprocess.run([*CLI, "call", "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert "(default: {})" in r.stdout and "env MICROSWARM_COORDINATOR" in r.stdout


def test_every_argument_has_help():
    import argparse

    from microswarm.cli import build_parser
    from microswarm.render import HelpFormatter, walk

    missing = []
    for prog, p in walk(build_parser()):
        assert p.formatter_class is HelpFormatter, prog
        for a in p._actions:
            if a.help is None and not isinstance(a, argparse._SubParsersAction):
                missing.append(f"{prog} {'/'.join(a.option_strings) or a.dest}")
    assert not missing, missing


def _reply(calls: int) -> Any:
    from microswarm.protos import microswarm_pb2 as pb
    r = pb.StatusReply(coordinator_id="c", listen="127.0.0.1:7070", placement="all", dispatch="random",
                       calls_total=calls)
    for i in range(calls):
        r.calls.append(pb.CallRecord(time=1.7e9 + i, client=f"client{i}", service="math.compute",
                                     executed_by="agent1", success=True, ms=1.0))
    r.cache_json = json.dumps({"hits": 3, "misses": 1, "entries": 2, "accounted_bytes": 3 * 2**20,
                               "evictions": 0, "evicted_bytes": 0, "admitting": True, "heap_bytes": 2**28,
                               "max_heap_bytes": 2**30, "last_decision": "ok"}).encode()
    return r


def test_status_watch_fits_the_terminal():
    from rich.console import Console

    from microswarm.cli import status_tables
    from microswarm.render import fit_height

    reply = _reply(200)
    for height in (60, 40, 25, 10):
        con = Console(file=io.StringIO(), width=120, height=height)
        frame = fit_height(lambda n: status_tables(reply, n), con, 200)
        con.print(frame)
        text = con.file.getvalue()  # type: ignore[attr-defined]
        assert len(text.splitlines()) <= height - 1, height
        if height >= 40:  # the most recent calls, as many as fit
            assert "client199" in text and "client0 " not in text
    con = Console(file=io.StringIO(), width=120, height=500)
    con.print(fit_height(lambda n: status_tables(reply, n), con, 200))
    assert "client0 " in con.file.getvalue()  # type: ignore[attr-defined]  # room for all


def test_status_shows_the_cache_in_a_few_figures_and_cache_stats_all(cluster):
    with cluster.client() as c:
        for _ in range(3):
            c.call("math.compute", {"a": 1, "b": 2, "op": "add"})
    env = {**cluster.env()}
    env.pop("COLUMNS", None)
    r = subprocess.run([*CLI, "status"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "hit ratio" in r.stdout and "governor" in r.stdout and " %" in r.stdout
    assert "MiB" in r.stdout or "KiB" in r.stdout or " B cached" in r.stdout
    assert "accounted_bytes" not in r.stdout and "collection_cpu_ms_total" not in r.stdout
    # not a terminal: the whole width, no 80-column cut (the agents table alone is wider)
    assert max(len(ln) for ln in r.stdout.splitlines()) > 80
    assert "…" not in r.stdout
    r = subprocess.run([*CLI, "cache", "stats"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0 and "accounted_bytes" in r.stdout and "collection_cpu_ms_total" in r.stdout
