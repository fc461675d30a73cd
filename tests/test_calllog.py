import json
import time

from coordinator.calllog import CallEntry, CallLog


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
