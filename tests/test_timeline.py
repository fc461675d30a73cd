"""The dashboard's timeline (coordinator/timeline.py): a bounded ring of one-second buckets, the
percentiles of each second, and the gauges sampled once a second."""
from __future__ import annotations

import json
import math

from microswarm.coordinator.calllog import CallEntry
from microswarm.coordinator.timeline import Timeline, percentile


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def call(t: float, ms: float, by: str = "agent1", ok: bool = True, code: str = "") -> CallEntry:
    return CallEntry(t, "c", "ipv4:127.0.0.1:1", "math.compute", by, ok, ms, code)


def test_percentile_is_nearest_rank():
    xs = [float(i) for i in range(1, 101)]  # 1..100
    assert percentile(xs, 50) == 50 and percentile(xs, 95) == 95 and percentile(xs, 99) == 99
    assert percentile(xs, 100) == 100 and percentile(xs, 0) == 1
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))


def test_each_second_has_its_counts_and_percentiles():
    clock = Clock(1000.2)
    tl = Timeline(seconds=60, clock=clock)
    for i in range(1, 101):  # second 1000: 100 calls of 1..100 ms, by three runners
        tl.observe(call(1000.5, float(i), by=("agent1", "coordinator", "cache")[i % 3]))
    tl.observe(call(1000.6, 5.0, by="coordinator", ok=False, code="invalid_input"))
    tl.observe(call(1002.1, 9.0))  # second 1001 stays empty
    clock.t = 1003.0
    s = tl.series()
    assert s["t"] == [1000, 1001, 1002]
    assert s["calls"]["agent1"] == [33, 0, 1] and s["calls"]["coordinator"][0] == 35 and s["calls"]["cache"][0] == 33
    assert s["errors"] == {"invalid_input": [1, 0, 0]}
    assert s["latency_ms"]["p50"][0] == 50 and s["latency_ms"]["p99"][0] == 99
    assert s["latency_ms"]["p50"][1] is None and s["latency_ms"]["p95"][2] == 9.0
    json.dumps(s)


def test_the_ring_is_bounded():
    clock = Clock(0.0)
    tl = Timeline(seconds=30, clock=clock, max_samples=16)
    for second in range(500):
        for k in range(40):  # more calls a second than samples kept: a reservoir, still bounded
            tl.observe(call(second + k / 40, float(k), by=f"agent{second % 50}"))
        assert len(tl.current.samples) <= 16
    clock.t = 10_000.0  # a long quiet spell: still at most `seconds` buckets, no loop over the gap
    tl.sample({"agents": 0, "agent_ids": []})
    s = tl.series()
    assert len(tl.closed) == 30 and len(s["t"]) == 30 and s["t"][-1] == 9_999
    assert all(len(v) == 30 for v in s["calls"].values())
    assert len(s["calls"]) <= 24 + 1  # runners charted are bounded (later ones: "other")


def test_gauges_and_the_hit_ratio_per_interval():
    clock = Clock(100.0)
    tl = Timeline(seconds=10, clock=clock)
    tl.sample({"agents": 2, "agent_ids": ["agent7", "agent8"], "busy_slots": 1, "total_slots": 4,
               "hits": 10, "misses": 10, "heap_bytes": 5 << 20,
               "heap_limits": {"max": 100 << 20, "soft_target": 50 << 20, "eviction": 60 << 20, "critical": 90 << 20}})
    clock.t = 101.0
    tl.sample({"agents": 2, "agent_ids": ["agent7", "agent8"], "busy_slots": 3, "total_slots": 4,
               "hits": 13, "misses": 11, "heap_bytes": 6 << 20,
               "heap_limits": {"max": 100 << 20, "soft_target": 50 << 20, "eviction": 60 << 20, "critical": 90 << 20}})
    clock.t = 102.0
    s = tl.series()
    assert s["busy_slots"] == [1, 3] and s["total_slots"] == [4, 4] and s["agents"] == [2, 2]
    assert s["hit_ratio"] == [None, 0.75]  # 3 hits of 4 lookups in that second
    assert s["heap_bytes"] == [5 << 20, 6 << 20] and s["heap_limits"]["critical"] == 90 << 20
    assert {"agent7", "agent8", "coordinator", "cache"} <= s["calls"].keys()  # connected agents have a series


def test_observe_is_cheap():
    import time
    tl = Timeline()
    entries = [call(time.time(), 1.0) for _ in range(20_000)]
    t0 = time.perf_counter()
    for e in entries:
        tl.observe(e)
    per_call_us = (time.perf_counter() - t0) / len(entries) * 1e6
    assert per_call_us < 20, per_call_us  # ~1 us on a laptop
