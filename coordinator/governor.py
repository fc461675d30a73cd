"""The heap governor: keeps the coordinator's memory under a budget by collecting and evicting.

The knobs copy the paper of seed 000 (GemFire heap-LRU eviction tuned with ZGC):

* ``max_heap_bytes`` is the memory budget of the coordinator process, like ``-Xmx``;
* ``soft_target_pct`` is like ``-XX:SoftMaxHeapSize``: above it the governor *collects*, the
  Python analogue of a GC cycle (``gc.collect()`` then glibc ``malloc_trim(0)``, which hands freed
  pages back to the OS);
* ``eviction_threshold_pct`` is GemFire's eviction-heap-percentage: above it least-recently-used
  entries are evicted, in small bursts, down to the threshold minus a little hysteresis;
* ``critical_threshold_pct`` is GemFire's critical-heap-percentage: above it the cache admits
  nothing new (``put`` refuses) while reads keep being answered.

What is "heap usage"? The process's resident set (RSS, read from ``/proc/self/statm`` through a
descriptor kept open: ~2 µs). What does the governor *govern on*? Measured on this machine
(docs/cache.md): RSS alone is not a usable eviction signal in CPython, because freed memory stays
resident until a collection trims it, and with several threads churning RSS reaches about twice
the live bytes. A governor that evicts whenever RSS is above the threshold (GemFire's rule,
``govern_on="rss"``, kept for the experiment) keeps evicting without RSS moving: in the experiment
it evicted 4.6 times the whole cache in 15 s. So the default, ``govern_on="both"``, uses RSS to
*trigger* and the accounted live bytes to *size*:

    live estimate = non-cache bytes (RSS after the last collection - cache bytes then)
                    + cache accounted bytes now
    collect when  RSS > min(soft target, eviction threshold)  and  RSS - live >= min_reclaim_pct
    evict when    min(RSS, live) > eviction threshold,  then burst by burst (burst_pct at most)
                  until min(RSS, live) <= eviction threshold - hysteresis

When RSS is above the eviction threshold but the live estimate is not, the excess is garbage:
the governor collects instead of evicting. Eviction therefore never drops live entries while the
real (live) usage is under the threshold. The garbage floor keeps a live set above the soft target
(the paper's orange zone, or a cache filled up to the threshold) from being collected on every
tick for nothing. Evicted bytes that a collection could not return (no ``malloc_trim``,
fragmentation) are credited, not counted as non-cache memory, so eviction cannot cascade.
``govern_on="live"`` triggers and sizes on the live estimate only.

Collections are expensive (tens to hundreds of ms of ``malloc_trim``, during which allocating
threads of the same arena wait), so they are rate-limited: after a collection that took ``d``
seconds the next may start ``max(interval_s, d * (1/collection_share_max - 1))`` later, i.e. the
governor spends at most ``collection_share_max`` (25%, ZGC's default share of the CPUs) of its
wall time collecting. At critical usage only ``interval_s`` is required.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import math
import os
import platform
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .cache import ResultCache

log = logging.getLogger("microswarm.governor")

#: Default soft target: the eviction threshold minus this many points of max heap (55% with the
#: default threshold of 60%). Chosen from docs/cache_experiment.md, see docs/cache.md.
DEFAULT_EVICTION_HEADROOM_PCT = 5.0
#: Default max heap: this fraction of the machine's (or the container's) memory, as the JVM's
#: default MaxRAMPercentage of 25%.
DEFAULT_MAX_HEAP_FRACTION = 0.25
GOVERN_ON = ("both", "rss", "live")

_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kib": 1 << 10, "kb": 10**3,
    "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
    "g": 1 << 30, "gib": 1 << 30, "gb": 10**9,
    "t": 1 << 40, "tib": 1 << 40, "tb": 10**12,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | float) -> int:
    """A memory size in bytes: ``"2GiB"``, ``"512MiB"``, ``"1G"`` (JVM style: 1024-based), ``"1.5g"``,
    ``"500MB"`` (SI: 1000-based), or plain bytes ``"1073741824"``. Case-insensitive."""
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise TypeError(f"size must be a string such as '2GiB', not {text!r}")
    if isinstance(text, (int, float)):
        if not math.isfinite(text) or text < 0:
            raise ValueError(f"size must be a non-negative number of bytes, not {text}")
        return int(text)
    m = _SIZE_RE.match(text)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"invalid size {text!r}: expected a number with an optional unit "
                         "(B, K/KiB, M/MiB, G/GiB, T/TiB are 1024-based; kB, MB, GB, TB 1000-based), "
                         "e.g. '2GiB' or '512MiB'")
    n = float(m.group(1)) * _UNITS[unit]
    if not math.isfinite(n):
        raise ValueError(f"invalid size {text!r}")
    return int(n)


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """glibc: at most `arenas` malloc arenas for threads created from now on.

    With several threads churning, RSS grew to 2-2.5x the live bytes unless MALLOC_ARENA_MAX was
    small; with 2 arenas the experiment collected half as often (docs/cache.md). An explicit
    MALLOC_ARENA_MAX in the environment wins. Returns whether the limit was applied."""
    if os.environ.get("MALLOC_ARENA_MAX") or platform.system() != "Linux":
        return False
    try:
        return bool(ctypes.CDLL(None).mallopt(-8, int(arenas)))  # M_ARENA_MAX
    except (OSError, AttributeError):
        return False


def machine_memory_bytes() -> int:
    """Physical memory, or the cgroup (container) limit when that is lower."""
    total = 0
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        try:
            import psutil
            total = int(psutil.virtual_memory().total)
        except (ImportError, OSError, AttributeError):  # pragma: no cover - no way to know
            total = 4 << 30
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                raw = f.read().strip()
        except OSError:
            continue
        if raw.isdigit() and 0 < int(raw) < total:
            total = int(raw)
        break
    return total


def default_soft_target(eviction_threshold_pct: float) -> float:
    """The default soft target for an eviction threshold: DEFAULT_EVICTION_HEADROOM_PCT below it
    (half the threshold if that is higher, for tiny thresholds)."""
    return max(eviction_threshold_pct - DEFAULT_EVICTION_HEADROOM_PCT, eviction_threshold_pct / 2)


@dataclass
class GovernorSettings:
    """The governor's knobs. Percentages are of ``max_heap_bytes``.

    Validated on construction: ``0 < soft <= eviction < critical <= 100`` (a soft target above the
    eviction threshold is refused unless ``allow_soft_above_eviction``: the paper's red zone, kept
    reachable for the experiment only), with a ValueError naming the offending setting.
    """

    max_heap_bytes: int
    eviction_threshold_pct: float = 60.0
    soft_target_pct: float | None = None        # None: eviction - DEFAULT_EVICTION_HEADROOM_PCT
    critical_threshold_pct: float = 90.0
    interval_s: float = 0.1
    govern_on: str = "both"
    hysteresis_pct: float = 2.0                 # evict down to eviction - this; re-admit below critical - this
    burst_pct: float = 2.0                      # at most this much of max heap evicted per tick
    collection_share_max: float = 0.25          # at most this share of wall time spent collecting
    min_reclaim_pct: float = 1.0                # collect only if RSS - live estimate is at least this
    allow_soft_above_eviction: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.max_heap_bytes, bool) or not isinstance(self.max_heap_bytes, int) \
                or self.max_heap_bytes <= 0:
            raise ValueError(f"max_heap_bytes must be a positive number of bytes, not {self.max_heap_bytes!r}")
        for name in ("eviction_threshold_pct", "critical_threshold_pct", "interval_s", "hysteresis_pct",
                     "burst_pct", "collection_share_max", "min_reclaim_pct"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a number, not {v!r}")
        if self.soft_target_pct is None:
            self.soft_target_pct = default_soft_target(float(self.eviction_threshold_pct))
        soft, ev, crit = self.soft_target_pct, self.eviction_threshold_pct, self.critical_threshold_pct
        if isinstance(soft, bool) or not isinstance(soft, (int, float)) or not math.isfinite(soft):
            raise ValueError(f"soft_target_pct must be a number, not {soft!r}")
        if not 0 < ev < 100:
            raise ValueError(f"eviction_threshold_pct must be between 0 and 100 (exclusive), not {ev}")
        if not ev < crit <= 100:
            raise ValueError(f"critical_threshold_pct must be above eviction_threshold_pct ({ev}) "
                             f"and at most 100, not {crit}")
        if not 0 < soft < crit:
            raise ValueError(f"soft_target_pct must be above 0 and below critical_threshold_pct ({crit}), "
                             f"not {soft}")
        if soft > ev and not self.allow_soft_above_eviction:
            raise ValueError(f"soft_target_pct ({soft}) must be at most eviction_threshold_pct ({ev}): "
                             "a soft target above the eviction threshold leaves no eviction headroom "
                             "(see docs/cache.md)")
        if self.interval_s <= 0:
            raise ValueError(f"interval_s must be positive, not {self.interval_s}")
        if self.govern_on not in GOVERN_ON:
            raise ValueError(f"govern_on must be one of {', '.join(GOVERN_ON)}, not {self.govern_on!r}")
        if not 0 <= self.hysteresis_pct < ev:
            raise ValueError(f"hysteresis_pct must be between 0 and eviction_threshold_pct, not {self.hysteresis_pct}")
        if not 0 < self.burst_pct <= 100:
            raise ValueError(f"burst_pct must be in (0, 100], not {self.burst_pct}")
        if not 0 <= self.min_reclaim_pct < 100:
            raise ValueError(f"min_reclaim_pct must be in [0, 100), not {self.min_reclaim_pct}")
        if not 0 < self.collection_share_max <= 1:
            raise ValueError(f"collection_share_max must be in (0, 1], not {self.collection_share_max}")

    # bytes -----------------------------------------------------------------
    def _pct(self, p: float) -> int:
        return int(self.max_heap_bytes * p / 100.0)

    @property
    def soft_bytes(self) -> int:
        return self._pct(float(self.soft_target_pct or 0))

    @property
    def eviction_bytes(self) -> int:
        return self._pct(self.eviction_threshold_pct)

    @property
    def critical_bytes(self) -> int:
        return self._pct(self.critical_threshold_pct)

    @property
    def hysteresis_bytes(self) -> int:
        return self._pct(self.hysteresis_pct)

    @property
    def min_reclaim_bytes(self) -> int:
        return self._pct(self.min_reclaim_pct)

    @property
    def burst_bytes(self) -> int:
        return max(1, self._pct(self.burst_pct))

    @classmethod
    def from_options(cls, max_heap: str | int | None, eviction_threshold: float | None,
                     soft_target: float | None, critical_threshold: float | None,
                     **extra: Any) -> GovernorSettings:
        """Settings from command-line / config values; None means the default. ``max_heap`` accepts
        sizes such as ``"2GiB"``, ``"512MiB"``, ``"1G"`` or bytes; its default is 25% of the
        machine's (or container's) memory."""
        if max_heap is None or max_heap == "":
            heap = int(machine_memory_bytes() * DEFAULT_MAX_HEAP_FRACTION)
        else:
            try:
                heap = parse_size(max_heap)  # type: ignore[arg-type]
            except ValueError as e:
                raise ValueError(f"max_heap: {e}") from None
            if heap <= 0:
                raise ValueError(f"max_heap must be positive, not {max_heap!r}")
        kw: dict[str, Any] = dict(extra)
        if eviction_threshold is not None:
            kw["eviction_threshold_pct"] = float(eviction_threshold)
        if soft_target is not None:
            kw["soft_target_pct"] = float(soft_target)
        if critical_threshold is not None:
            kw["critical_threshold_pct"] = float(critical_threshold)
        return cls(max_heap_bytes=heap, **kw)


class StatmReader:
    """This process's resident set size in bytes, from /proc/self/statm through a kept-open fd
    (about 2 µs a read). Falls back to psutil where /proc is missing."""

    def __init__(self) -> None:
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._fd: int | None = None
        try:
            self._fd = os.open("/proc/self/statm", os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            import psutil
            self._proc = psutil.Process()

    def __call__(self) -> int:
        if self._fd is not None:
            return int(os.pread(self._fd, 128, 0).split()[1]) * self._page
        return int(self._proc.memory_info().rss)

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __del__(self) -> None:
        with contextlib.suppress(OSError):
            self.close()


def _malloc_trim() -> Callable[[], Any] | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        fn = ctypes.CDLL(None).malloc_trim        # ctypes releases the GIL during the call
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return lambda: fn(0)


def default_collector() -> Callable[[], None]:
    """The collection step: cyclic GC, then returning freed heap pages to the OS (glibc)."""
    trim = _malloc_trim()

    def collect() -> None:
        gc.collect()
        if trim is not None:
            trim()
    return collect


class HeapGovernor:
    """Samples memory every ``interval_s`` on a daemon thread and collects, evicts or refuses.

    ``reader`` returns the current heap usage in bytes (default: this process's RSS);
    ``collector`` runs one collection (default: ``gc.collect()`` + ``malloc_trim(0)``); ``clock`` is
    a monotonic clock. Unit tests drive :meth:`tick` with scripted ones.
    """

    def __init__(self, cache: ResultCache, settings: GovernorSettings,
                 reader: Callable[[], int] | None = None, *,
                 collector: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cache = cache
        self.settings = settings
        self._reader = reader if reader is not None else StatmReader()
        self._collector = collector if collector is not None else default_collector()
        self._clock = clock
        self._lock = threading.Lock()           # tick() is not re-entrant
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        heap = int(self._reader())
        self.heap_bytes = heap
        self.heap_min = heap
        self.heap_max = heap
        self.heap_after_collection: int | None = None
        # Memory that is not the cache: measured at each collection, first guessed now.
        self.non_cache_bytes = max(0, heap - cache.accounted_bytes)
        self.collections = 0
        self.collection_s_total = 0.0
        self.collection_cpu_s_total = 0.0
        self.last_collection_ms = 0.0
        self.collections_deferred = 0
        self.collections_skipped = 0            # above the soft target, but too little garbage
        self.returned_bytes = 0                 # RSS given back by collections, summed
        self.kept_bytes = 0                     # evicted bytes the allocator kept (see collect)
        self._freed_since_collection = 0
        self._evicting = False
        self._next_collection_at = -math.inf
        self._last_collection_end = -math.inf
        self.evictions = 0
        self.evicted_bytes = 0
        self.eviction_bursts = 0
        self.expired_purged = 0
        self.ticks = 0
        self.sampling_cpu_s = 0.0               # CPU of the sampling thread, collections excluded
        self.decisions: dict[str, int] = {"ok": 0, "collect": 0, "evict": 0, "critical": 0}
        self.last_decision = "ok"

    # ------------------------------------------------------------------ decisions

    def live_estimate(self) -> int:
        """Live bytes: the non-cache memory at the last collection plus the cache's bytes now."""
        return self.non_cache_bytes + self.cache.accounted_bytes

    def _may_collect(self, now: float, urgent: bool) -> bool:
        if now >= self._next_collection_at:
            return True
        return urgent and now >= self._last_collection_end + self.settings.interval_s

    def collect(self) -> int:
        """Run one collection now and re-measure; returns heap usage after it."""
        before = int(self._reader())
        t0 = self._clock()
        c0 = time.thread_time()
        self._collector()
        cpu = time.thread_time() - c0
        end = self._clock()
        wall = end - t0
        after = int(self._reader())
        accounted = self.cache.accounted_bytes
        self.collections += 1
        self.collection_s_total += wall
        self.collection_cpu_s_total += cpu
        self.last_collection_ms = wall * 1000.0
        self.returned_bytes += max(0, before - after)
        self.heap_after_collection = after
        # Everything that is not the cache, garbage the allocator kept included. Memory the cache
        # freed by evicting that the collection could not return (an allocator without
        # malloc_trim, fragmentation) is not counted as non-cache: it is reusable, and counting it
        # would make the next eviction free the same bytes again, and again, until the cache is
        # empty. At most the bytes evicted (so far unreturned) are credited this way.
        raw = max(0, after - accounted)
        pending = self._freed_since_collection + self.kept_bytes
        kept = min(pending, max(0, raw - self.non_cache_bytes))
        self.kept_bytes = kept
        self._freed_since_collection = 0
        self.non_cache_bytes = raw - kept
        self._observe(after)
        self._last_collection_end = end
        share = self.settings.collection_share_max
        self._next_collection_at = end + max(self.settings.interval_s, wall * (1.0 / share - 1.0))
        return after

    def eviction_need(self, heap: int) -> int:
        """Bytes to evict now (0: none). Eviction starts when the governed level is above the
        eviction threshold and goes on, burst by burst, until it is at or under the threshold minus
        the hysteresis. The level is RSS (``rss``), the live estimate (``live``), or the smaller of
        the two (``both``: both must be over)."""
        s = self.settings
        if s.govern_on == "rss":
            level = heap
        elif s.govern_on == "live":
            level = self.live_estimate()
        else:
            level = min(heap, self.live_estimate())
        if level > s.eviction_bytes:
            self._evicting = True
        if not self._evicting:
            return 0
        need = level - (s.eviction_bytes - s.hysteresis_bytes)
        if need <= 0:
            self._evicting = False
            return 0
        return need

    def tick(self) -> str:
        """One sampling step. Returns the decision: "ok", "collect", "evict" or "critical"."""
        with self._lock:
            c0 = time.thread_time()
            collected_cpu = self.collection_cpu_s_total
            try:
                decision = self._tick()
            finally:
                self.sampling_cpu_s += (time.thread_time() - c0) - (self.collection_cpu_s_total - collected_cpu)
            self.ticks += 1
            self.decisions[decision] += 1
            self.last_decision = decision
            return decision

    def _tick(self) -> str:
        s = self.settings
        cache = self.cache
        heap = int(self._reader())
        self._observe(heap)
        now = self._clock()
        decision = "ok"

        # Collect above the soft target. Unless we emulate GemFire+ZGC ("rss"): also above the
        # eviction threshold (when the excess is garbage, collecting is the only way down), and
        # only when the garbage it could return (RSS - live estimate) is at least min_reclaim_pct:
        # with a live set above the soft target, collecting again and again would return nothing.
        urgent = heap >= s.critical_bytes
        if s.govern_on == "rss":
            trigger, worth = s.soft_bytes, True
        else:
            trigger = min(s.soft_bytes, s.eviction_bytes)
            worth = (urgent or self.heap_after_collection is None      # nothing measured yet
                     or heap - self.live_estimate() >= s.min_reclaim_bytes)
        if heap > trigger:
            if not worth:
                self.collections_skipped += 1
            elif self._may_collect(now, urgent=urgent):
                heap = self.collect()
                decision = "collect"
            else:
                self.collections_deferred += 1

        # Evict: in bursts of at most burst_pct, down to the threshold minus the hysteresis.
        need = self.eviction_need(heap)
        if need > 0:
            n, b = cache.purge_expired()
            self.expired_purged += n
            self._freed_since_collection += b
            need -= b
            if need > 0:
                n, b = cache.evict_lru(min(need, s.burst_bytes))
                if n:
                    self._freed_since_collection += b
                    self.evictions += n
                    self.evicted_bytes += b
                    self.eviction_bursts += 1
                    decision = "evict"

        # Critical: stop admitting; re-admit below critical minus the hysteresis.
        if heap >= s.critical_bytes:
            if cache.admitting:
                log.warning("heap usage %d MiB above critical %d MiB: cache stops admitting",
                            heap >> 20, s.critical_bytes >> 20)
            cache.admitting = False
            decision = "critical"
        elif not cache.admitting and heap < s.critical_bytes - s.hysteresis_bytes:
            cache.admitting = True
            log.info("heap usage %d MiB back under critical: cache admits again", heap >> 20)
        elif not cache.admitting:
            decision = "critical"
        return decision

    def _observe(self, heap: int) -> None:
        self.heap_bytes = heap
        self.heap_min = min(self.heap_min, heap)
        self.heap_max = max(self.heap_max, heap)

    def reset_extremes(self) -> None:
        """Restart the min/max heap window (the experiment calls this after pre-population)."""
        heap = int(self._reader())
        self.heap_bytes = self.heap_min = self.heap_max = heap

    # ------------------------------------------------------------------ thread

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        limit_malloc_arenas()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="heap-governor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)
        self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        interval = self.settings.interval_s
        while not self._stop.wait(interval):
            try:
                self.tick()
            except Exception:  # never let the sampler die silently
                log.exception("heap governor tick failed")

    # ------------------------------------------------------------------ figures

    def stats(self) -> dict[str, Any]:
        s = self.settings
        live = self.heap_after_collection if self.heap_after_collection is not None else self.live_estimate()
        return {
            "heap_bytes": self.heap_bytes,
            "heap_min_bytes": self.heap_min,
            "heap_max_bytes": self.heap_max,
            "heap_after_collection": self.heap_after_collection,
            "live_estimate_bytes": self.live_estimate(),
            "non_cache_bytes": self.non_cache_bytes,
            "collection_headroom": s.soft_bytes - live,
            "eviction_headroom": s.eviction_bytes - s.soft_bytes,
            "collections": self.collections,
            "collection_ms_total": round(self.collection_s_total * 1000.0, 3),
            "collection_cpu_ms_total": round(self.collection_cpu_s_total * 1000.0, 3),
            "last_collection_ms": round(self.last_collection_ms, 3),
            "collections_deferred": self.collections_deferred,
            "collections_skipped": self.collections_skipped,
            "collection_returned_bytes": self.returned_bytes,
            "allocator_kept_bytes": self.kept_bytes,
            "evictions": self.evictions,
            "evicted_bytes": self.evicted_bytes,
            "eviction_bursts": self.eviction_bursts,
            "refusals": self.cache.stats()["refusals"],
            "admitting": bool(self.cache.admitting),
            "ticks": self.ticks,
            "sampling_cpu_ms": round(self.sampling_cpu_s * 1000.0, 3),
            "last_decision": self.last_decision,
            "max_heap_bytes": s.max_heap_bytes,
            "soft_target_bytes": s.soft_bytes,
            "eviction_threshold_bytes": s.eviction_bytes,
            "critical_threshold_bytes": s.critical_bytes,
            "eviction_threshold_pct": s.eviction_threshold_pct,
            "soft_target_pct": s.soft_target_pct,
            "critical_threshold_pct": s.critical_threshold_pct,
            "interval_s": s.interval_s,
            "govern_on": s.govern_on,
        }


def combined_stats(cache: ResultCache, governor: HeapGovernor | None) -> dict[str, Any]:
    """One flat, JSON-able dict of the cache's and the governor's figures (the CLI's ``cache stats``).

    ``evictions`` / ``evicted_bytes`` are the cache's own totals (every ``evict_lru`` caller);
    heap fields are None when there is no governor.
    """
    out: dict[str, Any] = dict(cache.stats())
    if governor is None:
        for k in ("heap_bytes", "heap_after_collection", "collection_headroom", "eviction_headroom",
                  "collections", "collection_ms_total", "max_heap_bytes"):
            out[k] = None
        return out
    g = governor.stats()
    for k, v in g.items():
        if k in ("evictions", "evicted_bytes", "refusals", "admitting"):
            continue
        out[k] = v
    return out


__all__ = ["DEFAULT_EVICTION_HEADROOM_PCT", "GovernorSettings", "HeapGovernor", "ResultCache", "StatmReader",
           "combined_stats", "default_collector", "default_soft_target", "machine_memory_bytes", "parse_size"]
