"""Cache and governor speed: ResultCache vs a bare OrderedDict LRU, and the governor's sampling cost.

* gets/s and puts/s of ``coordinator.cache.ResultCache`` (lock, byte accounting, TTL check, hit/miss
  counters: everything on) against ``BareLRU``, the textbook OrderedDict LRU with the same method
  interface. Target: the cache within 2x of the bare structure. Rounds alternate between the two
  and the median ratio is reported; times are the thread's CPU time, so that other processes on a
  shared machine slow both sides alike instead of skewing the ratio.
* the governor's sampling cost as a share of one core, at its default 0.1 s interval, measured two
  ways: the CPU of one ``tick()`` that finds nothing to do (read /proc/self/statm, decide), times
  ten a second; and the CPU its background thread really used over a few seconds. Target < 2%.

Prints a rich table, then one JSON object as the last line.

    .venv/bin/python bench/cache_bench.py [--entries 50000] [--ops 300000] [--rounds 7]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from collections import OrderedDict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from microswarm.coordinator.cache import ResultCache, cache_key  # noqa: E402
from microswarm.coordinator.governor import GovernorSettings, HeapGovernor  # noqa: E402


class BareLRU:
    """The baseline: an OrderedDict LRU bounded by entry count, no lock, no accounting."""

    def __init__(self, capacity: int) -> None:
        self.d: OrderedDict[bytes, bytes] = OrderedDict()
        self.capacity = capacity

    def get(self, key: bytes) -> bytes | None:
        v = self.d.get(key)
        if v is not None:
            self.d.move_to_end(key)
        return v

    def put(self, key: bytes, value: bytes) -> bool:
        d = self.d
        d[key] = value
        d.move_to_end(key)
        if len(d) > self.capacity:
            d.popitem(last=False)
        return True


def one_round(make: type, keys: list[bytes], gets: list[bytes], puts: list[bytes],
              values: list[bytes]) -> tuple[float, float]:
    c = make()
    put = c.put
    for k in keys:
        put(k, values[0])
    get = c.get
    t0 = time.thread_time()
    for k in gets:
        get(k)
    tg = time.thread_time() - t0
    nv = len(values) - 1
    t0 = time.thread_time()
    for i, k in enumerate(puts):
        put(k, values[i & nv])
    tp = time.thread_time() - t0
    return len(gets) / tg, len(puts) / tp


def bench_cache(entries: int, ops: int, rounds: int, value_size: int) -> dict:
    r = random.Random(42)
    keys = [cache_key("sha256:bench", "svc", i.to_bytes(8, "little")) for i in range(entries)]
    # Gets: 90% present (hits), 10% absent (misses). Puts: 80% replace, 20% new keys.
    absent = [cache_key("sha256:bench", "svc", (entries + i).to_bytes(8, "little")) for i in range(entries)]
    gets = [keys[r.randrange(entries)] if r.random() < 0.9 else absent[r.randrange(entries)] for _ in range(ops)]
    puts = [keys[r.randrange(entries)] if r.random() < 0.8 else absent[r.randrange(entries)] for _ in range(ops)]
    values = [os.urandom(value_size) for _ in range(64)]
    rows: dict[str, list[tuple[float, float]]] = {"bare": [], "cache": []}
    makers = {"bare": lambda: BareLRU(10 * entries), "cache": ResultCache}
    for i in range(rounds):
        for name in (("bare", "cache") if i % 2 == 0 else ("cache", "bare")):
            rows[name].append(one_round(makers[name], keys, gets, puts, values))
    get_ratio = statistics.median(b[0] / c[0] for b, c in zip(rows["bare"], rows["cache"]))
    put_ratio = statistics.median(b[1] / c[1] for b, c in zip(rows["bare"], rows["cache"]))
    med = {n: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for n, v in rows.items()}
    return {
        "entries": entries, "ops": ops, "rounds": rounds, "value_size": value_size,
        "bare_gets_per_s": round(med["bare"][0]), "bare_puts_per_s": round(med["bare"][1]),
        "cache_gets_per_s": round(med["cache"][0]), "cache_puts_per_s": round(med["cache"][1]),
        "get_slowdown": round(get_ratio, 3), "put_slowdown": round(put_ratio, 3),
    }


def bench_governor(seconds: float) -> dict:
    cache = ResultCache()
    for i in range(10_000):
        cache.put(i.to_bytes(8, "little"), bytes(100))
    settings = GovernorSettings(max_heap_bytes=64 << 30)       # far above usage: every tick is "ok"
    gov = HeapGovernor(cache, settings)
    n = 20_000
    t0 = time.thread_time()
    for _ in range(n):
        gov.tick()
    tick_us = (time.thread_time() - t0) / n * 1e6
    share_from_tick = tick_us * 1e-6 / settings.interval_s

    # The real background thread: its whole CPU (wake-ups included) from the kernel's per-thread
    # schedstat (nanoseconds), falling back to the CPU measured inside tick().
    gov2 = HeapGovernor(cache, settings)
    gov2.start()
    assert gov2._thread is not None
    tid = gov2._thread.native_id
    sched = Path(f"/proc/self/task/{tid}/schedstat")

    def thread_cpu_s() -> float | None:
        try:
            return int(sched.read_text().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            return None

    start = time.perf_counter()
    cpu0 = thread_cpu_s()
    deadline = start + seconds
    while time.perf_counter() < deadline:        # the measurement window itself
        time.sleep(0.05)
    cpu1 = thread_cpu_s()
    elapsed = time.perf_counter() - start
    gov2.stop()
    whole = (cpu1 - cpu0) if cpu0 is not None and cpu1 is not None else gov2.sampling_cpu_s
    return {"interval_s": settings.interval_s, "tick_us": round(tick_us, 2),
            "sampling_share_from_tick": round(share_from_tick, 6),
            "thread_ticks": gov2.ticks, "thread_seconds": round(elapsed, 2),
            "thread_cpu_ms": round(whole * 1000, 3),
            "thread_cpu_source": "schedstat" if cpu0 is not None else "tick thread_time",
            "sampling_share_thread": round(whole / elapsed, 6),
            "decisions": dict(gov.decisions)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="ResultCache vs bare OrderedDict LRU; governor sampling cost")
    ap.add_argument("--entries", type=int, default=50_000)
    ap.add_argument("--ops", type=int, default=300_000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--value-size", type=int, default=200)
    ap.add_argument("--governor-seconds", type=float, default=3.0)
    args = ap.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    console = Console()
    with console.status("cache vs bare OrderedDict LRU ..."):
        c = bench_cache(args.entries, args.ops, args.rounds, args.value_size)
    with console.status("governor sampling cost ..."):
        g = bench_governor(args.governor_seconds)

    t = Table(title=f"ResultCache vs bare OrderedDict LRU ({c['entries']:,} entries, {c['value_size']} B values, "
                    f"median of {c['rounds']} rounds, per CPU-second)")
    for col in ("operation", "bare OrderedDict", "ResultCache", "slowdown", "target", "ok"):
        t.add_column(col, justify="right")
    for op in ("get", "put"):
        ratio = c[f"{op}_slowdown"]
        t.add_row(f"{op}s/s", f"{c[f'bare_{op}s_per_s']:,}", f"{c[f'cache_{op}s_per_s']:,}", f"{ratio:.2f}x",
                  "<= 2x", "yes" if ratio <= 2.0 else "NO")
    console.print(t)
    t2 = Table(title=f"Governor sampling cost at a {g['interval_s']} s interval")
    for col in ("measure", "value", "share of one core", "target", "ok"):
        t2.add_column(col, justify="right")
    t2.add_row("one idle tick", f"{g['tick_us']:.1f} µs", f"{100 * g['sampling_share_from_tick']:.4f}%", "< 2%",
               "yes" if g["sampling_share_from_tick"] < 0.02 else "NO")
    t2.add_row(f"thread, {g['thread_seconds']} s", f"{g['thread_ticks']} ticks, {g['thread_cpu_ms']} ms CPU",
               f"{100 * g['sampling_share_thread']:.4f}%", "< 2%", "yes" if g["sampling_share_thread"] < 0.02 else "NO")
    console.print(t2)
    result = {"cache": c, "governor": g,
              "targets_met": c["get_slowdown"] <= 2.0 and c["put_slowdown"] <= 2.0
              and g["sampling_share_from_tick"] < 0.02 and g["sampling_share_thread"] < 0.02}
    console.file.flush()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
