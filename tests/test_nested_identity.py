"""Nested calls keep the caller's identity: a job carries its caller's client and scope; a nested
call from it runs as that caller, inside that scope, only while the job is in flight on that agent,
at most NESTED_AT_ONCE at once (NESTED_PER_JOB in all), and stops when the job ends. The call log
names the caller and the agent that asked (`via_agent`). Real processes: a rogue agent
(tests/data/rogue_agent.py --jobs nested) that makes the nested calls an attacker would, and an
honest agent and the coordinator's own slots running math.compute_and_classify, whose nested calls
go to math.compute and numbers.is_positive.
"""
from __future__ import annotations

import concurrent.futures
import json
import sys
import time
from pathlib import Path
from typing import Any

from microswarm.coordinator.link import NESTED_AT_ONCE
from microswarm.cluster import LocalCluster, wait_for

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_link_limits import Rogue  # noqa: E402

CLI = [sys.executable, "-m", "microswarm.cli"]


def nested_replies(rogue: Rogue, n: int) -> list[dict[str, Any]] | None:
    got = [e for e in rogue.events() if e["event"] == "nested_reply" and e["phase"] == "in_flight"]
    return got if len(got) >= n else None


def recent(c: LocalCluster, n: int = 200) -> list[Any]:
    with c.client() as op:  # the operator sees agents' ids in the call log
        return list(op.status(recent_calls=n).calls)


def test_nested_call_outside_the_callers_scope_is_forbidden_and_logged_as_the_caller(tmp_path):
    """main: the agent read demo.echo_bytes although its caller's scope was math.compute (and ran it as
`agent:<id>`). Now it is refused `forbidden`, and what the scope allows runs as the caller."""
    with LocalCluster(agents=0, workdir=str(tmp_path)) as c:
        rogue = Rogue(c, "rogue", "--jobs", "nested", "--seconds", "60",
                      "--nested", 'demo.echo_bytes={"data": "c2VjcmV0"}',
                      "--nested", 'numbers.is_positive={"n": 3}')
        c.wait_agents_ready(["rogue"], timeout=30)
        cred = c.create_client("narrow", "math.compute", "numbers.is_positive")
        with c.client(client_id=cred["client_id"], client_secret=cred["client_secret"]) as cl:
            env = cl.envelope("math.compute", {"a": 5, "b": 5, "op": "add"}, timeout=60)
        assert env.ok and env.result == {"result": 10.0}, env.error  # the coordinator ran it after the rogue's fault
        replies = wait_for(lambda: nested_replies(rogue, 2), 30, "the replies to the rogue's nested calls")
        calls = recent(c)
    by_service = {e["service"]: e for e in replies}
    print(by_service)
    assert by_service["demo.echo_bytes"]["status"] == "error" and by_service["demo.echo_bytes"]["code"] == "forbidden"
    assert "outside the scope" in by_service["demo.echo_bytes"]["message"]
    assert by_service["numbers.is_positive"]["status"] == "ok"  # within the scope: runs as the caller
    nested = [x for x in calls if x.via_agent == "rogue"]
    assert {(x.service, x.error_code) for x in nested} >= {("demo.echo_bytes", "forbidden"), ("numbers.is_positive", "")}
    assert {x.client for x in nested} == {cred["client_id"]}  # logged as the caller, not as the agent
    lines = [json.loads(x) for x in (c.state / "calls.jsonl").read_text().splitlines()]
    mine = [x for x in lines if x["client"] == cred["client_id"]]
    assert {x["service"] for x in mine if x.get("via_agent") == "rogue"} == {"demo.echo_bytes", "numbers.is_positive"}
    assert {x["service"] for x in mine if "via_agent" not in x} == {"math.compute"}  # direct calls: the old format


def test_nested_calls_are_bounded_per_job_and_end_with_their_job(tmp_path):
    """main: 100 extra nested calls kept the coordinator busy 50 s after the parent job was gone."""
    sleeps = ["--nested", 'demo.sleep={"seconds": 20}'] * 12
    with LocalCluster(agents=0, workdir=str(tmp_path), coordinator_args=["--local-slots", "8"]) as c:
        rogue = Rogue(c, "rogue", "--jobs", "nested", "--seconds", "60", *sleeps, "--end-job-after", "2",
                      "--nested-after-end", "40")
        c.wait_agents_ready(["rogue"], timeout=30)
        with c.client() as cl, concurrent.futures.ThreadPoolExecutor(1) as ex:
            parent = ex.submit(cl.envelope, "math.compute", {"a": 1, "b": 1, "op": "add"}, timeout=60)
            # the nested sleeps the job was allowed run on the coordinator's slots (the rogue fails its own)...
            busy = wait_for(lambda: cl.status().scheduler.local_running, 20, "the nested calls to run")
            rogue.wait_event("parent_ended", 30)
            t_end = time.monotonic()
            wait_for(lambda: cl.status().scheduler.local_running == 0, 10,  # ...and stop with their job
                     "the coordinator's slots to be free once the parent job ended")
            freed_after = time.monotonic() - t_end
            env = parent.result(60)
            assert env.ok, env.error
        wait_for(lambda: nested_replies(rogue, 12), 30, "the replies to the nested calls")
        evs = rogue.wait(90)
        calls = recent(c)
    during = [e for e in evs if e["event"] == "nested_reply" and e["phase"] == "in_flight"]
    after = [e for e in evs if e["event"] == "nested_reply" and e["phase"] == "after_end"]
    codes = sorted(e["code"] for e in during)
    print(f"in flight: {codes}; after the end: {sorted({e['code'] for e in after})}; {busy} coordinator slots "
          f"busy with them, free {freed_after:.1f} s after the parent ended")
    ran = [e for e in during if e["code"] != "rate_limited"]
    assert len(ran) <= NESTED_AT_ONCE and codes.count("rate_limited") >= 12 - NESTED_AT_ONCE, codes
    assert all(e["code"] == "cancelled" for e in ran), ran  # stopped with their job, not run for 20 s
    assert all(e["status"] != "ok" for e in after), after  # refused once the job was over
    assert freed_after < 8.0
    sleeps_logged = [x for x in calls if x.service == "demo.sleep"]
    assert sleeps_logged and all(not x.success and x.via_agent == "rogue" for x in sleeps_logged)


def test_nested_calls_of_honest_jobs_run_as_the_caller_on_agents_and_on_the_coordinator(tmp_path):
    """math.compute_and_classify calls math.compute and numbers.is_positive: a caller allowed only the
    math.* services gets `forbidden` for the second, whether the job ran on the coordinator or an agent."""
    with LocalCluster(agents=0, workdir=str(tmp_path)) as c:
        narrow = c.create_client("mathonly", "math.*")
        wide = c.create_client("all")
        seen: dict[str, Any] = {}
        for i, where in enumerate(("coordinator", "agent")):
            if where == "agent":
                c.start_agent("agent1")
                c.wait_agents_ready(["agent1"], timeout=60)
            # inputs of their own: a cached result (pure service) would make no nested call at all
            with c.client(client_id=narrow["client_id"], client_secret=narrow["client_secret"]) as cl:
                no = cl.envelope("math.compute_and_classify", {"a": 2 + 10 * i, "b": -7, "op": "add"}, timeout=60)
            with c.client(client_id=wide["client_id"], client_secret=wide["client_secret"]) as cl:
                yes = cl.envelope("math.compute_and_classify", {"a": 2 + 10 * i, "b": -70, "op": "add"}, timeout=60)
            seen[where] = (no, yes)
        calls = recent(c)
    for where, (no, yes) in seen.items():
        assert yes.ok and yes.result["positive"] is False, (where, yes.error)
        assert not no.ok and no.error["code"] == "forbidden", (where, no.error)
    nested = [x for x in calls if x.service == "numbers.is_positive"]
    assert {(x.client, x.error_code, x.via_agent) for x in nested} == {
        (narrow["client_id"], "forbidden", "coordinator"), (wide["client_id"], "", "coordinator"),
        (narrow["client_id"], "forbidden", "agent1"), (wide["client_id"], "", "agent1")}
