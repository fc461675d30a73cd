"""The dashboard's charts: the last few minutes of the coordinator, one bucket per second, in a ring.

`observe` is a dispatcher observer (one call: a few dict and list operations, O(1)); it counts the call
under the second it ended in, by who ran it (an agent id, `coordinator`, `cache`), its error code, and
keeps its latency as a sample (at most MAX_SAMPLES a second, a uniform reservoir past that). When a
second is over its samples become p50/p95/p99 and are dropped. `sample` (once a second, from `run`)
adds the gauges: agents connected, busy and total slots, calls in flight, the cache's hit ratio over
that second and the governor's heap. At most `seconds` buckets are kept (a deque with maxlen).
"""
from __future__ import annotations

import asyncio
import collections
import logging
import math
import random
import time
from typing import Any, Callable

log = logging.getLogger("microswarm.timeline")

SECONDS = 300        # kept: 5 minutes at 1 s
MAX_SAMPLES = 512    # latencies kept per second for its percentiles (a reservoir past that)
MAX_RUNNERS = 24     # distinct runners (agents) charted; later ones count as "other"
MAX_CODES = 12       # distinct error codes charted; later ones count as "other"
PERCENTILES = (50, 95, 99)


def percentile(ordered: list[float], p: float) -> float:
    """The nearest-rank percentile of an ascending list (p in 0..100): the smallest value with at
    least p% of the values at or below it. An empty list has none (nan)."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(p / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


class Bucket:
    __slots__ = ("t", "calls", "errors", "samples", "seen", "pct", "gauges")

    def __init__(self, t: int, gauges: dict[str, Any] | None = None) -> None:
        self.t = t
        self.calls: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.samples: list[float] = []
        self.seen = 0                       # calls whose latency were offered to the reservoir
        self.pct: tuple[float, ...] = ()    # (p50, p95, p99) once the second is over
        self.gauges: dict[str, Any] = dict(gauges) if gauges else {}  # carried on until the next sample

    def close(self) -> None:
        if self.samples:
            ordered = sorted(self.samples)
            self.pct = tuple(percentile(ordered, p) for p in PERCENTILES)
        self.samples = []


class Timeline:
    def __init__(self, seconds: int = SECONDS, clock: Callable[[], float] = time.time,
                 max_samples: int = MAX_SAMPLES) -> None:
        self.seconds = seconds
        self.clock = clock
        self.max_samples = max_samples
        self.closed: collections.deque[Bucket] = collections.deque(maxlen=seconds)
        self.current = Bucket(int(clock()))
        self.runners: set[str] = {"coordinator", "cache"}
        self.codes: set[str] = set()
        self._hits: tuple[int, int] | None = None  # the cache's hits and misses at the last sample
        self._samples = 0
        self._series: dict[str, Any] | None = None  # series() of the seconds closed so far (until the next roll)

    # ------------------------------------------------------------ feeding

    def _roll(self, second: int) -> None:
        """Close the current second and every empty one up to `second` (at most `seconds` of them)."""
        cur = self.current
        if second <= cur.t:
            return
        cur.close()
        self._series = None
        self.closed.append(cur)
        for t in range(max(cur.t + 1, second - self.seconds), second):
            self.closed.append(Bucket(t, cur.gauges))
        self.current = Bucket(second, cur.gauges)

    def observe(self, entry: Any, reply: Any = None) -> None:
        """A dispatcher observer: one CallEntry (its `time`, `executed_by`, `success`, `error_code`, `ms`)."""
        second = int(entry.time)
        b = self.current
        if second != b.t:
            if second < b.t:  # the wall clock stepped back: count it in the current second
                second = b.t
            else:
                self._roll(second)
                b = self.current
        who = entry.executed_by
        if who not in self.runners:
            if len(self.runners) < MAX_RUNNERS:
                self.runners.add(who)
            else:
                who = "other"
        b.calls[who] = b.calls.get(who, 0) + 1
        if not entry.success:
            code = entry.error_code or "error"
            if code not in self.codes:
                if len(self.codes) < MAX_CODES:
                    self.codes.add(code)
                else:
                    code = "other"
            b.errors[code] = b.errors.get(code, 0) + 1
        b.seen += 1
        if len(b.samples) < self.max_samples:
            b.samples.append(entry.ms)
        else:  # reservoir sampling: each call of the second equally likely to be kept
            i = random.randrange(b.seen)
            if i < self.max_samples:
                b.samples[i] = entry.ms

    def sample(self, gauges: dict[str, Any], now: float | None = None) -> None:
        """Once a second: close the seconds that are over, and set this second's gauges. `hits` and
        `misses` (the cache's running totals) become `hit_ratio`, the ratio over the last interval."""
        self._roll(int(self.clock() if now is None else now))
        g = dict(gauges)
        agent_ids = g.pop("agent_ids", ())
        self._samples += 1
        if self._samples % 30 == 0 or len(self.runners) >= MAX_RUNNERS or len(self.codes) >= MAX_CODES:
            self._prune(agent_ids)
        else:
            self.runners.update(agent_ids)
        hits, misses = g.pop("hits", None), g.pop("misses", None)
        if hits is not None and misses is not None:
            if self._hits is not None:
                dh, dm = hits - self._hits[0], misses - self._hits[1]
                g["hit_ratio"] = dh / (dh + dm) if dh + dm > 0 and dh >= 0 and dm >= 0 else None
            self._hits = (hits, misses)
        self.current.gauges = g

    def _prune(self, agent_ids: Any) -> None:
        """Forget the runners and codes gone from the window (agent ids are per process); keep the connected."""
        self.runners = {"coordinator", "cache", *agent_ids}.union(*(b.calls for b in self.closed), self.current.calls)
        self.codes = set().union(*(b.errors for b in self.closed), self.current.errors)
        self.runners.discard("other")
        self.codes.discard("other")

    async def run(self, gauges: Callable[[], dict[str, Any]], interval_s: float = 1.0) -> None:
        """Sample `gauges()` every `interval_s` until cancelled (a coordinator task)."""
        while True:
            try:
                self.sample(gauges())
            except Exception:  # a chart must never take the coordinator down
                log.exception("timeline sample failed")
            await asyncio.sleep(interval_s - (self.clock() % interval_s) + 0.05)  # just past each second

    # ------------------------------------------------------------ reading

    def series(self, now: float | None = None) -> dict[str, Any]:
        """The seconds that are over, oldest first, as columns (JSON-able; missing values are null)."""
        self._roll(int(self.clock() if now is None else now))
        if self._series is not None:
            return self._series
        buckets = list(self.closed)
        named = self.runners.union(*(b.calls for b in buckets)) - {"coordinator", "cache", "other"}
        runners = sorted(named) + ["coordinator", "cache"]
        runners += [r for r in ("other",) if any(r in b.calls for b in buckets)]
        codes = sorted({c for b in buckets for c in b.errors})

        def gauge(name: str) -> list[Any]:
            return [b.gauges.get(name) for b in buckets]

        def pct(i: int) -> list[float | None]:
            return [round(b.pct[i], 3) if b.pct else None for b in buckets]

        latest = buckets[-1].gauges if buckets else {}
        self._series = {
            "seconds": self.seconds,
            "t": [b.t for b in buckets],
            "calls": {r: [b.calls.get(r, 0) for b in buckets] for r in runners},
            "errors": {c: [b.errors.get(c, 0) for b in buckets] for c in codes},
            "latency_ms": {f"p{p}": pct(i) for i, p in enumerate(PERCENTILES)},
            "agents": gauge("agents"),
            "busy_slots": gauge("busy_slots"),
            "total_slots": gauge("total_slots"),
            "in_flight": gauge("in_flight"),
            "hit_ratio": [None if v is None else round(v, 4) for v in gauge("hit_ratio")],
            "heap_bytes": gauge("heap_bytes"),
            "heap_limits": latest.get("heap_limits"),
        }
        return self._series
