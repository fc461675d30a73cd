import asyncio
import json
import os
import signal
import time

from microswarm.coordinator.calllog import FLUSH_INTERVAL_S, CallEntry, CallLog
from microswarm.cluster import LocalCluster, wait_for


def entry(i: int, ok: bool = True) -> CallEntry:
    return CallEntry(time.time(), f"client{i}", "127.0.0.1:5000", "math.compute", "agent1", ok, 1.5, "" if ok else "x", 1)


def test_ring_counts_and_file_lines(tmp_path):
    log = CallLog(capacity=5, path=tmp_path / "calls.jsonl")
    for i in range(8):
        log.add(entry(i, ok=i % 4 != 0))
    log.close()
    assert log.total == 8 and log.failures == 2
    assert [e.client for e in log.recent(3)] == ["client5", "client6", "client7"]
    assert len(log.entries) == 5
    lines = (tmp_path / "calls.jsonl").read_text().splitlines()
    assert [json.loads(x)["client"] for x in lines] == [f"client{i}" for i in range(8)]


def test_file_rotates_at_its_bound_and_keeps_one_old_file(tmp_path):
    log = CallLog(path=tmp_path / "calls.jsonl", max_file_bytes=2_000)
    for i in range(200):
        log.add(entry(i))
    log.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calls.jsonl", "calls.jsonl.1"]
    assert (tmp_path / "calls.jsonl").stat().st_size <= 2_000 + 200
    # a reopened log counts what the file already holds: one more line crosses the bound and rotates
    size = (tmp_path / "calls.jsonl").stat().st_size
    again = CallLog(path=tmp_path / "calls.jsonl", max_file_bytes=size)
    again.add(entry(999))
    again.close()
    assert (tmp_path / "calls.jsonl").stat().st_size == 0
    assert json.loads((tmp_path / "calls.jsonl.1").read_text().splitlines()[-1])["client"] == "client999"


def _lines(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_on_a_loop_records_reach_the_file_within_the_interval_and_pending_is_bounded(tmp_path):
    async def main() -> None:
        path = tmp_path / "calls.jsonl"
        log = CallLog(path=path)
        for i in range(40):
            log.add(entry(i))
        assert path.stat().st_size == 0  # no write per call: one timer writes them together...
        t0 = time.monotonic()
        while len(_lines(path)) < 40:  # ...within the interval (the bound here is generous: a loaded host)
            assert time.monotonic() - t0 < 2 + FLUSH_INTERVAL_S, "records not written within the interval"
            await asyncio.sleep(0.01)
        assert [r["client"] for r in _lines(path)] == [f"client{i}" for i in range(40)]
        log.add(entry(40))
        log.close()  # what is pending at close is written at once
        assert len(_lines(path)) == 41

        small = CallLog(path=tmp_path / "small.jsonl", flush_bytes=1_000)  # past 1,000 bytes pending: written now
        for i in range(30):
            small.add(entry(i))
            assert small._pending_bytes < 1_000
        assert len(_lines(tmp_path / "small.jsonl")) >= 20  # nothing dropped, all but the last few written
        small.close()
        assert len(_lines(tmp_path / "small.jsonl")) == 30

    asyncio.run(main())


def test_a_timer_left_on_a_closed_loop_is_armed_again_on_the_next(tmp_path):
    path = tmp_path / "calls.jsonl"
    log = CallLog(path=path)

    async def add(i: int) -> None:
        log.add(entry(i))

    asyncio.run(add(0))  # the loop ends before its timer runs: the record waits
    assert path.stat().st_size == 0

    async def add_and_wait() -> None:
        log.add(entry(1))
        t0 = time.monotonic()
        while len(_lines(path)) < 2:
            assert time.monotonic() - t0 < 2 + FLUSH_INTERVAL_S, "the new loop never wrote the log"
            await asyncio.sleep(0.01)

    asyncio.run(add_and_wait())
    log.close()
    assert [r["client"] for r in _lines(path)] == ["client0", "client1"]


def test_sigkilled_coordinator_loses_no_call_older_than_the_interval(tmp_path):
    n = 50
    with LocalCluster(agents=1, workdir=str(tmp_path)) as c:
        async def calls() -> list:
            async with c.async_client() as cl:
                return await asyncio.gather(*[cl.envelope("math.compute", {"a": i, "b": 1}, timeout=30)
                                              for i in range(n)])

        assert all(e.ok for e in asyncio.run(calls()))
        time.sleep(FLUSH_INTERVAL_S + 0.4)
        assert c.coordinator is not None
        os.kill(c.coordinator.pid, signal.SIGKILL)  # no shutdown, no flush: only what was written survives
        wait_for(lambda: c.coordinator.poll() is not None, 10, "the coordinator to die")
        logged = [r for r in _lines(c.state / "calls.jsonl") if r["service"] == "math.compute"]
        assert len(logged) == n, f"{len(logged)} of {n} calls in the log after SIGKILL"
        assert all(r["success"] and r["client"].endswith("cluster") and "via_agent" not in r for r in logged)
