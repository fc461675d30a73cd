"""The heap governor: settings, decisions under a scripted memory model, the background thread, and
an integration run with real allocations in a fresh process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from microswarm.coordinator.cache import ENTRY_OVERHEAD, ResultCache
from microswarm.coordinator.governor import (
    GovernorSettings,
    HeapGovernor,
    StatmReader,
    combined_stats,
    machine_memory_bytes,
    parse_size,
)

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parent.parent

M = 1_000_000            # max heap of the scripted tests: thresholds read as thousands
ENTRY = 1_000            # accounted size of one scripted entry
VALUE = b"v" * (ENTRY - 8 - ENTRY_OVERHEAD)


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class Memory:
    """A model of a glibc process: RSS = non-cache + cache bytes + garbage. Memory the cache frees
    stays resident as garbage (new cache data reuses it first) until a collection returns
    ``trim`` of it; ``cost_s`` is how long a collection takes on the scripted clock."""

    def __init__(self, cache: ResultCache, clock: Clock, non_cache: int = 100_000, garbage: int = 0,
                 trim: float = 1.0, cost_s: float = 0.01) -> None:
        self.cache, self.clock = cache, clock
        self.non_cache, self.garbage, self.trim, self.cost_s = non_cache, garbage, trim, cost_s
        self.last = cache.accounted_bytes
        self.collections = 0

    def rss(self) -> int:
        acc = self.cache.accounted_bytes
        if acc < self.last:
            self.garbage += self.last - acc
        else:
            self.garbage -= min(self.garbage, acc - self.last)
        self.last = acc
        return self.non_cache + acc + self.garbage

    def collect(self) -> None:
        self.rss()
        self.garbage = int(self.garbage * (1.0 - self.trim))
        self.clock.t += self.cost_s
        self.collections += 1


def fill(cache: ResultCache, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        assert cache.put(i.to_bytes(8, "big"), VALUE)


def make(entries: int = 300, *, non_cache: int = 100_000, garbage: int = 0, trim: float = 1.0,
         cost_s: float = 0.01, **kw: object) -> tuple[ResultCache, Memory, Clock, HeapGovernor]:
    clock = Clock()
    cache = ResultCache(clock=clock)
    fill(cache, entries)
    mem = Memory(cache, clock, non_cache=non_cache, garbage=garbage, trim=trim, cost_s=cost_s)
    kw.setdefault("soft_target_pct", 50.0)             # round numbers: soft 50%, eviction 60%, critical 90%
    settings = GovernorSettings(max_heap_bytes=M, **kw)  # type: ignore[arg-type]
    gov = HeapGovernor(cache, settings, mem.rss, collector=mem.collect, clock=clock)
    return cache, mem, clock, gov


# ====================================================================== settings

def test_parse_size() -> None:
    assert parse_size("2GiB") == 2 << 30
    assert parse_size("512MiB") == 512 << 20
    assert parse_size("1G") == parse_size("1g") == 1 << 30
    assert parse_size("1.5GiB") == 3 << 29
    assert parse_size("64k") == 65536
    assert parse_size("500MB") == 500_000_000
    assert parse_size(" 1073741824 ") == parse_size(1073741824) == 1 << 30
    for bad in ("", "abc", "-1G", "2XB", "1e9", "G", "inf"):
        with pytest.raises(ValueError, match="invalid size"):
            parse_size(bad)


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"max_heap_bytes": 0}, "max_heap_bytes"),
    ({"eviction_threshold_pct": 0}, "eviction_threshold_pct"),
    ({"eviction_threshold_pct": 95, "soft_target_pct": 50}, "critical_threshold_pct"),
    ({"critical_threshold_pct": 101}, "critical_threshold_pct"),
    ({"critical_threshold_pct": 60}, "critical_threshold_pct"),
    ({"soft_target_pct": 0}, "soft_target_pct"),
    ({"soft_target_pct": 65}, "soft_target_pct"),
    ({"soft_target_pct": float("nan")}, "soft_target_pct"),
    ({"interval_s": 0}, "interval_s"),
    ({"govern_on": "vibes"}, "govern_on"),
])
def test_settings_validation_names_the_setting(kwargs: dict, named: str) -> None:
    args = {"max_heap_bytes": M, **kwargs}
    with pytest.raises(ValueError, match=named):
        GovernorSettings(**args)


def test_settings_defaults_and_from_options() -> None:
    s = GovernorSettings(max_heap_bytes=M)
    assert (s.eviction_threshold_pct, s.soft_target_pct, s.critical_threshold_pct) == (60.0, 55.0, 90.0)
    assert (s.soft_bytes, s.eviction_bytes, s.critical_bytes) == (550_000, 600_000, 900_000)
    # The default soft target follows the eviction threshold, 5 points below it.
    assert GovernorSettings(max_heap_bytes=M, eviction_threshold_pct=80).soft_target_pct == 75
    assert GovernorSettings(max_heap_bytes=M, eviction_threshold_pct=6).soft_target_pct == 3
    # The red zone stays reachable for the experiment only.
    assert GovernorSettings(max_heap_bytes=M, soft_target_pct=70, allow_soft_above_eviction=True).soft_bytes == 700_000

    o = GovernorSettings.from_options("2GiB", 70, 55, 95)
    assert (o.max_heap_bytes, o.eviction_threshold_pct, o.soft_target_pct, o.critical_threshold_pct) == \
        (2 << 30, 70.0, 55.0, 95.0)
    d = GovernorSettings.from_options(None, None, None, None)
    assert d.max_heap_bytes == int(machine_memory_bytes() * 0.25)
    with pytest.raises(ValueError, match="max_heap"):
        GovernorSettings.from_options("lots", None, None, None)
    with pytest.raises(ValueError, match="soft_target_pct"):
        GovernorSettings.from_options("1G", 60, 61, None)


def test_statm_reader_reads_this_process() -> None:
    import psutil
    r = StatmReader()
    try:
        rss = r()
        ps = psutil.Process().memory_info().rss
        assert abs(rss - ps) < 0.1 * ps
        t0 = time.perf_counter()
        for _ in range(1000):
            r()
        assert (time.perf_counter() - t0) / 1000 < 200e-6      # ~2 µs here; generous bound
    finally:
        r.close()


# ====================================================================== decisions (scripted)

def test_below_the_soft_target_nothing_happens() -> None:
    cache, _mem, clock, gov = make(300)                 # 100k + 300k = 40%
    for _ in range(5):
        assert gov.tick() == "ok"
        clock.t += 0.1
    assert gov.collections == 0 and gov.evictions == 0 and cache.entries == 300


def test_above_the_soft_target_it_collects_rate_limited() -> None:
    cache, mem, clock, gov = make(300, garbage=150_000, cost_s=0.2)   # RSS 55% > soft 50%
    assert gov.tick() == "collect"
    st = gov.stats()
    assert st["collections"] == 1 and st["heap_after_collection"] == 400_000
    assert st["collection_returned_bytes"] == 150_000
    assert st["collection_headroom"] == 500_000 - 400_000
    assert st["eviction_headroom"] == 600_000 - 500_000
    mem.garbage = 150_000                              # garbage again at once
    # The collection took 0.2 s: at most 25% of the time collecting means 0.6 s before the next.
    clock.t += 0.55
    assert gov.tick() == "ok" and gov.stats()["collections_deferred"] == 1
    clock.t += 0.1
    assert gov.tick() == "collect" and gov.collections == 2
    assert cache.entries == 300 and gov.evictions == 0


def test_a_live_set_above_the_soft_target_does_not_make_it_collect_in_vain() -> None:
    """Negative collection headroom (the paper's orange zone): collections cannot get RSS under the
    soft target, so after the first one the governor waits until there is at least 1% of max heap
    of garbage to return instead of collecting on every tick."""
    _, mem, clock, gov = make(450)                 # live 55% > soft 50%
    assert gov.tick() == "collect"                      # first measurement
    for _ in range(10):
        mem.garbage += 500                             # a trickle: 5k in all, under 1% (10k)
        clock.t += 0.5
        assert gov.tick() == "ok"
    assert gov.collections == 1 and gov.stats()["collections_skipped"] == 10
    mem.garbage += 6_000
    clock.t += 0.5
    assert gov.tick() == "collect" and gov.stats()["collection_returned_bytes"] == 11_000


def test_garbage_above_the_eviction_threshold_is_collected_never_evicted() -> None:
    """Real (live) usage under the threshold, RSS far above it: no eviction, ever, even while the
    slow collection is rate-limited and garbage keeps piling up between collections."""
    cache, mem, clock, gov = make(300, garbage=300_000, cost_s=0.3)    # RSS 70%, live 40%
    decisions = []
    for _ in range(60):
        decisions.append(gov.tick())
        mem.garbage += 40_000                            # churn: garbage grows every tick
        clock.t += 0.1
    assert "collect" in decisions and "evict" not in decisions
    assert gov.stats()["collections_deferred"] > 0      # RSS sat above the threshold meanwhile
    assert gov.heap_max > gov.settings.eviction_bytes
    assert cache.entries == 300 and cache.stats()["evictions"] == 0


def test_gemfire_rule_on_rss_alone_empties_the_cache_in_the_same_situation() -> None:
    """The failure the default policy avoids: evicting whenever RSS is above the threshold (GemFire's
    rule, govern_on="rss") frees memory that stays resident, so it evicts again and again."""
    cache, mem, clock, gov = make(300, garbage=190_000, govern_on="rss", soft_target_pct=70,
                                  allow_soft_above_eviction=True)            # RSS 59%, live 40%
    mem.garbage += 20_000                                                     # 61%: over 60%
    for _ in range(40):
        gov.tick()
        clock.t += 0.1
    assert cache.entries < 30                          # 300 live entries, and the live set was 40%


@pytest.mark.parametrize("policy", ["both", "live"])
def test_live_data_above_the_threshold_is_evicted_in_bursts_down_to_the_hysteresis(policy: str) -> None:
    cache, _mem, clock, gov = make(600, govern_on=policy)   # live 70%: genuinely over 60%
    first = gov.tick()
    assert first == "evict"
    assert gov.evicted_bytes <= gov.settings.burst_bytes + ENTRY       # one burst: 2% of max
    for _ in range(20):
        gov.tick()
        clock.t += 0.1
    target = gov.settings.eviction_bytes - gov.settings.hysteresis_bytes   # 58%
    assert target - ENTRY < gov.live_estimate() <= target
    assert cache.entries == 480 and gov.evictions == 120 and gov.eviction_bursts >= 6
    # Under the threshold again, a little growth is left alone (hysteresis) ...
    fill(cache, 15, start=10_000)                      # 595k
    for _ in range(5):
        assert gov.tick() in ("ok", "collect")
        clock.t += 0.1
    assert cache.entries == 495
    # ... and crossing it again evicts back down to 58%, no further.
    fill(cache, 15, start=20_000)                      # 610k
    for _ in range(5):
        gov.tick()
        clock.t += 0.1
    assert target - ENTRY < gov.live_estimate() <= target and cache.entries == 480


def test_without_malloc_trim_eviction_does_not_cascade() -> None:
    """An allocator that returns nothing: RSS never drops. The governor evicts what the live estimate
    asks once, credits the evicted bytes it kept, and stops: the cache is not emptied."""
    cache, _mem, clock, gov = make(300, garbage=300_000, trim=0.0)     # RSS 70%, stuck there
    for _ in range(80):
        gov.tick()
        clock.t += 0.1
    assert 150 <= cache.entries <= 200                 # ~120 evicted to reach 58%, then no more
    evicted = gov.evictions
    for _ in range(40):
        gov.tick()
        clock.t += 0.1
    assert gov.evictions == evicted
    assert gov.stats()["allocator_kept_bytes"] > 0


def test_critical_refuses_new_entries_still_answers_reads_and_readmits_with_hysteresis() -> None:
    clock = Clock()
    cache = ResultCache(clock=clock)
    fill(cache, 300)
    rss = [950_000]
    settings = GovernorSettings(max_heap_bytes=M)
    gov = HeapGovernor(cache, settings, lambda: rss[0], collector=lambda: None, clock=clock)
    assert gov.tick() == "critical"                    # 95%: collects (to no avail), evicts a burst, refuses
    assert cache.admitting is False and 0 < cache.entries < 300
    assert cache.put(b"new", b"x") is False
    assert cache.get((299).to_bytes(8, "big")) == VALUE       # reads are still answered
    rss[0] = 890_000
    clock.t += 0.1
    assert gov.tick() == "critical"                    # 89%: under 90% but not under 88%
    assert cache.admitting is False
    rss[0] = 870_000
    clock.t += 0.1
    assert gov.tick() != "critical"                    # 87%: admits again
    assert cache.admitting is True and cache.put(b"new", b"x") is True
    assert combined_stats(cache, gov)["refusals"] == 1


def test_at_critical_the_collection_gap_shrinks_to_one_interval() -> None:
    _cache, _mem, clock, gov = make(300, garbage=560_000, cost_s=1.0, trim=0.0)   # 96%, slow, useless
    gov.tick()
    assert gov.collections == 1                        # next regular collection only 3 s later
    clock.t += 0.1
    gov.tick()
    assert gov.collections == 2                        # but at critical one interval is enough


def test_expired_entries_are_purged_before_live_ones_are_evicted() -> None:
    cache, _mem, clock, gov = make(600)                 # 70% live
    for i in range(150):
        cache.put(b"ttl%d" % i, VALUE[:-10], ttl_s=1.0)
    clock.t += 2.0                                     # all 150 expired, still resident
    for _ in range(10):
        gov.tick()
        clock.t += 0.1
    st = cache.stats()
    assert st["expired"] == 150
    assert cache.entries == 480                        # 750 - 150 expired - 120 evicted


def test_background_thread_samples_and_stops() -> None:
    cache = ResultCache()
    reads = []

    def reader() -> int:
        reads.append(1)
        return 1000

    gov = HeapGovernor(cache, GovernorSettings(max_heap_bytes=M, interval_s=0.01), reader,
                       collector=lambda: None)
    gov.start()
    try:
        deadline = time.monotonic() + 10
        while gov.ticks < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert gov.ticks >= 3 and gov.running
    finally:
        gov.stop()
    assert not gov.running
    assert any(t.name == "heap-governor" for t in threading.enumerate()) is False


def test_stats_and_combined_stats_are_flat_and_json() -> None:
    cache, _mem, _clock, gov = make(300, garbage=150_000)
    cache.get((0).to_bytes(8, "big"))
    cache.get(b"missing")
    gov.tick()
    out = combined_stats(cache, gov)
    json.dumps(out)
    for key in ("hits", "misses", "hit_ratio", "entries", "accounted_bytes", "heap_bytes",
                "heap_after_collection", "collection_headroom", "eviction_headroom", "collections",
                "collection_ms_total", "evictions", "evicted_bytes", "refusals", "max_heap_bytes",
                "soft_target_pct", "eviction_threshold_pct", "critical_threshold_pct"):
        assert key in out, key
    assert all(not isinstance(v, (dict, list)) for v in out.values())
    assert (out["hits"], out["misses"], out["entries"]) == (1, 1, 300)
    assert out["heap_bytes"] == 400_000 and out["collections"] == 1
    bare = combined_stats(cache, None)
    json.dumps(bare)
    assert bare["heap_bytes"] is None and bare["entries"] == 300


# ====================================================================== integration (real memory)

INTEGRATION = r"""
import json, random, sys, threading, time
sys.path.insert(0, sys.argv[2])
from microswarm.coordinator.cache import ResultCache, cache_key
from microswarm.coordinator.governor import GovernorSettings, HeapGovernor, StatmReader

managed = sys.argv[1] == "managed"
MiB = 1 << 20
M = 384 * MiB
read = StatmReader()
cache = ResultCache()
settings = GovernorSettings(max_heap_bytes=M)          # soft 50%, eviction 60%, critical 90%
base = read()
tail = bytes(10_000 - 8)
keys = []
while base + cache.accounted_bytes < 0.40 * M:         # live set: 40% of the budget
    k = cache_key("sha256:it", "svc", len(keys).to_bytes(8, "little"))
    cache.put(k, len(keys).to_bytes(8, "little") + tail)
    keys.append(k)
gov = HeapGovernor(cache, settings) if managed else None
if gov:
    gov.start()
n = len(keys)
todo = 4 * n                                           # every entry replaced ~4 times over
done = [0, 0, 0]
deadline = time.monotonic() + 20

def writer(j):
    r = random.Random(j)
    c = j << 40
    while done[j] < todo // 3 and time.monotonic() < deadline:
        for _ in range(64):
            c += 1
            cache.put(keys[r.randrange(n)], c.to_bytes(8, "little") + tail)
        done[j] += 64

threads = [threading.Thread(target=writer, args=(j,)) for j in range(3)]
for t in threads:
    t.start()
peak = read()
while any(t.is_alive() for t in threads):
    peak = max(peak, read())
    threads[0].join(0.002)
for t in threads:
    t.join()
if gov:
    gov.stop()
st = cache.stats()
print(json.dumps({"entries0": n, "entries": st["entries"], "evictions": st["evictions"],
                  "peak": peak, "max_heap": M, "eviction": settings.eviction_bytes,
                  "critical": settings.critical_bytes, "updates": sum(done),
                  "collections": gov.collections if gov else 0,
                  "live_after": gov.heap_after_collection if gov else None}))
"""


def run_integration(mode: str) -> dict:
    # Many arenas, as glibc's default on a big machine: the governor's collections must do the
    # work here, not the two-arena limit it applies when nothing is set (limit_malloc_arenas).
    env = {**os.environ, "MALLOC_ARENA_MAX": "16"}
    out = subprocess.run([sys.executable, "-c", INTEGRATION, mode, str(ROOT)], capture_output=True,
                         text=True, timeout=40, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc (Linux)")
def test_real_churn_stays_under_the_budget_and_keeps_every_entry() -> None:
    """Fresh processes, 10,000-byte values filling 40% of a 384 MiB budget, three threads replacing
    them 4x over. Unmanaged, the churn leaves freed memory resident and RSS climbs past the eviction
    threshold. Managed by the governor (default settings), collections hand it back: RSS stays under
    the budget and not one entry is evicted, since the live data never exceeded the threshold."""
    free = run_integration("unmanaged")
    assert free["peak"] > free["eviction"], free         # the churn really produces garbage
    gov = run_integration("managed")
    assert gov["updates"] >= 3 * gov["entries0"], gov
    assert gov["peak"] < gov["max_heap"], gov
    assert gov["peak"] < free["peak"], (gov, free)
    assert gov["collections"] >= 1, gov
    assert gov["evictions"] == 0 and gov["entries"] == gov["entries0"], gov
    assert gov["live_after"] < gov["eviction"], gov
