"""Seed 000's SoftMaxHeapSize experiment, re-run on microswarm's result cache and heap governor.

The paper (GemFire heap-LRU eviction with ZGC) starts a server with -Xmx32g and an eviction
threshold of 60%, pre-populates 10,000-byte values to ~40% of the heap, then lets 16 threads
replace random values with new ones of the same size as fast as they can for 2 minutes, for
SoftMaxHeapSize from 40% to 70%. Here, scaled to a 2-core machine:

* one fresh Python process per scenario (so malloc arenas never carry over), holding a
  ``ResultCache`` and a ``HeapGovernor`` with ``--max-heap`` (2 GiB) and eviction threshold 60%;
* pre-populated with ``--value-size`` (10,000-byte) values until the live estimate is
  ``--prefill`` (40%) of the max heap;
* ``--threads`` writer threads replacing random entries with new values for ``--duration`` s;
* for every soft target in ``--soft`` (40..70 step 5) and every policy in ``--policies``:
  ``both`` (microswarm's default: RSS triggers, accounted live bytes size the eviction) and
  ``rss`` (GemFire's rule: evict whenever RSS is above the threshold).

Per scenario it records updates/s, evictions, min and max heap usage (RSS), the live set
(RSS after each collection), collections per second and their CPU time, refusals, and a
time series. Outputs: docs/cache_experiment.json, docs/cache_experiment.md and docs/cache_*.png.

    .venv/bin/python bench/cache_experiment.py              # the full run, ~4 minutes
    .venv/bin/python bench/cache_experiment.py --duration 3 --soft 40,55,70 --policies both
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from microswarm.coordinator.cache import ResultCache, cache_key  # noqa: E402
from microswarm.coordinator.governor import GovernorSettings, HeapGovernor, parse_size  # noqa: E402

MiB = 1 << 20


# ====================================================================== one scenario (child process)

def run_one(cfg: dict[str, Any]) -> dict[str, Any]:
    max_heap = int(cfg["max_heap"])
    vsize = int(cfg["value_size"])
    settings = GovernorSettings(max_heap_bytes=max_heap, eviction_threshold_pct=cfg["eviction"],
                                soft_target_pct=cfg["soft"], critical_threshold_pct=cfg["critical"],
                                interval_s=cfg["interval"], govern_on=cfg["policy"],
                                allow_soft_above_eviction=True)
    cache = ResultCache()
    gov = HeapGovernor(cache, settings)
    read = gov._reader

    def emit(**kw: Any) -> None:
        sys.stdout.write(json.dumps(kw) + "\n")
        sys.stdout.flush()

    # --- pre-populate to prefill% of max heap (live estimate: non-cache bytes + accounted) ---
    template = bytes(vsize)
    target = max_heap * cfg["prefill"] / 100.0
    keys: list[bytes] = []
    base = read()
    i = 0
    while base + cache.accounted_bytes < target:
        k = cache_key("sha256:experiment", "bench.value", i.to_bytes(8, "little"))
        cache.put(k, i.to_bytes(8, "little") + template[8:])
        keys.append(k)
        i += 1
    gov.collect()
    prefill_live = gov.heap_after_collection or read()
    gov.reset_extremes()
    emit(phase="prefilled", entries=len(keys), live=prefill_live)

    # --- sustained updates ---
    nkeys = len(keys)
    counts = [0] * cfg["threads"]
    refused = [0] * cfg["threads"]
    stop = threading.Event()

    def writer(j: int) -> None:
        r = random.Random(1000 + j)
        rr = r.randrange
        put = cache.put
        tail = template[8:]
        c = j << 40
        n = 0
        no = 0
        while not stop.is_set():
            for _ in range(256):
                c += 1
                if not put(keys[rr(nkeys)], c.to_bytes(8, "little") + tail):
                    no += 1
            n += 256
            counts[j] = n
            refused[j] = no

    gov.start()
    cpu0 = os.times()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=writer, args=(j,), daemon=True) for j in range(cfg["threads"])]
    for t in threads:
        t.start()
    series: list[list[float]] = []          # t, rss, live_estimate, heap_after_collection, entries, updates
    after_values: list[int] = []
    seen_collections = gov.collections
    period = 1.0 / cfg["sample_hz"]
    next_emit = 0.0
    heap_min = heap_max = read()
    while True:
        now = time.perf_counter() - t0
        if now >= cfg["duration"]:
            break
        rss = read()
        heap_min, heap_max = min(heap_min, rss), max(heap_max, rss)
        if gov.collections != seen_collections and gov.heap_after_collection is not None:
            seen_collections = gov.collections
            after_values.append(gov.heap_after_collection)
        series.append([round(now, 3), rss, gov.live_estimate(), gov.heap_after_collection or 0,
                       cache.entries, sum(counts)])
        if now >= next_emit:
            emit(phase="run", t=now)
            next_emit = now + 0.5
        time.sleep(period)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    gov.stop()
    cpu1 = os.times()
    updates = sum(counts)
    gs = gov.stats()
    cs = cache.stats()
    heap_min, heap_max = min(heap_min, gs["heap_min_bytes"]), max(heap_max, gs["heap_max_bytes"])
    live = sorted(after_values) if after_values else [prefill_live]
    return {
        "soft_target_pct": cfg["soft"],
        "policy": cfg["policy"],
        "duration_s": round(elapsed, 3),
        "prefill_entries": nkeys,
        "prefill_live_bytes": prefill_live,
        "updates": updates,
        "updates_per_s": round(updates / elapsed, 1),
        "evictions": cs["evictions"],
        "evicted_bytes": cs["evicted_bytes"],
        "entries_end": cs["entries"],
        "entries_min": min(int(s[4]) for s in series) if series else cs["entries"],
        "refusals": sum(refused),
        "heap_min_bytes": heap_min,
        "heap_max_bytes": heap_max,
        "heap_min_pct": round(100.0 * heap_min / max_heap, 2),
        "heap_max_pct": round(100.0 * heap_max / max_heap, 2),
        "live_set_bytes": live[len(live) // 2],          # median RSS right after a collection
        "live_set_pct": round(100.0 * live[len(live) // 2] / max_heap, 2),
        "live_set_min_pct": round(100.0 * live[0] / max_heap, 2),
        "collections": gs["collections"],
        "collections_per_s": round(gs["collections"] / elapsed, 3),
        "collection_cpu_s": round(gs["collection_cpu_ms_total"] / 1000.0, 3),
        "collection_cpu_share": round(gs["collection_cpu_ms_total"] / 1000.0 / elapsed, 4),
        "collection_wall_s": round(gs["collection_ms_total"] / 1000.0, 3),
        "mean_collection_ms": round(gs["collection_ms_total"] / gs["collections"], 2) if gs["collections"] else 0.0,
        "collections_deferred": gs["collections_deferred"],
        "collections_skipped": gs["collections_skipped"],
        "collection_returned_bytes": gs["collection_returned_bytes"],
        "process_cpu_s": round((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system), 3),
        "sampling_cpu_ms": gs["sampling_cpu_ms"],
        "series": series,
    }


# ====================================================================== driver (parent process)

def machine() -> dict[str, Any]:
    try:
        mem = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        mem = 0
    return {"cpus": os.cpu_count(), "memory_bytes": mem, "python": platform.python_version(),
            "libc": " ".join(platform.libc_ver()), "platform": platform.platform(),
            "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX")}


def run_scenarios(args: argparse.Namespace) -> list[dict[str, Any]]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    # Soft-target-major order: the policies of one soft target run back to back, so that a change
    # in the machine's background load affects both alike.
    scen = [(p, s) for s in args.soft for p in args.policies]
    results: list[dict[str, Any]] = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as prog:
        total = prog.add_task("scenarios", total=len(scen))
        for policy, soft in scen:
            cfg = {"max_heap": args.max_heap, "eviction": args.eviction, "critical": args.critical,
                   "soft": soft, "policy": policy, "prefill": args.prefill, "value_size": args.value_size,
                   "threads": args.threads, "duration": args.duration, "interval": args.interval,
                   "sample_hz": args.sample_hz}
            one = prog.add_task(f"  {policy:>4} soft {soft:g}%: prefill", total=args.duration)
            load0 = os.getloadavg()[0]
            env = os.environ.copy()
            if args.malloc_arena_max is not None:
                env["MALLOC_ARENA_MAX"] = str(args.malloc_arena_max)
            proc = subprocess.Popen([sys.executable, __file__, "--run-one", json.dumps(cfg)],
                                    stdout=subprocess.PIPE, text=True, env=env)
            result = None
            assert proc.stdout is not None
            for line in proc.stdout:
                msg = json.loads(line)
                if msg.get("phase") == "prefilled":
                    prog.update(one, description=f"  {policy:>4} soft {soft:g}%: updates "
                                f"({msg['entries']} entries, live {msg['live'] / MiB:.0f} MiB)")
                elif msg.get("phase") == "run":
                    prog.update(one, completed=msg["t"])
                elif msg.get("phase") == "done":
                    result = msg["result"]
            if proc.wait() != 0 or result is None:
                raise SystemExit(f"scenario {policy} soft {soft}% failed (exit {proc.returncode})")
            prog.update(one, completed=args.duration,
                        description=f"  {policy:>4} soft {soft:g}%: {result['updates_per_s']:,.0f} upd/s, "
                                    f"{result['evictions']} evicted, {result['collections_per_s']:.2f} coll/s")
            prog.advance(total)
            result["loadavg_1m_before"] = round(load0, 2)
            result["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
            results.append(result)
    return results


def write_outputs(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"max_heap_bytes": args.max_heap, "eviction_threshold_pct": args.eviction,
            "critical_threshold_pct": args.critical, "prefill_pct": args.prefill,
            "value_size": args.value_size, "threads": args.threads, "duration_s": args.duration,
            "interval_s": args.interval, "machine": machine(),
            "malloc_arena_max": args.malloc_arena_max,
            "generated": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    # The JSON keeps every series, downsampled to at most ~200 points per scenario.
    slim = []
    for r in results:
        r2 = dict(r)
        s = r2.pop("series")
        step = max(1, len(s) // 200)
        r2["series_columns"] = ["t_s", "rss_bytes", "live_estimate_bytes", "heap_after_collection_bytes",
                                "entries", "updates"]
        r2["series"] = s[::step]
        slim.append(r2)
    # One scenario per line keeps the file small and still diffable.
    body = ('{"settings": ' + json.dumps(meta) + ',\n "scenarios": [\n'
            + ",\n".join(json.dumps(r, separators=(",", ":")) for r in slim) + "\n]}\n")
    (out / "cache_experiment.json").write_text(body)
    (out / "cache_experiment.md").write_text(markdown(meta, results))
    plots(out, meta, results)


def markdown(meta: dict[str, Any], results: list[dict[str, Any]]) -> str:
    mh = meta["max_heap_bytes"]
    m = meta["machine"]
    lines = [
        "# Seed 000's SoftMaxHeapSize experiment on the microswarm result cache",
        "",
        (f"Generated by `bench/cache_experiment.py` on {meta['generated']}: {m['cpus']} CPUs, "
        f"{m['memory_bytes'] / 2**30:.1f} GiB, Python {m['python']}, {m['libc']}, "
        f"MALLOC_ARENA_MAX={meta['malloc_arena_max'] or m['MALLOC_ARENA_MAX'] or 'unset'}."),
        "",
        (f"Max heap {mh / 2**30:g} GiB, eviction threshold {meta['eviction_threshold_pct']:g}%, critical "
        f"{meta['critical_threshold_pct']:g}%, pre-populated with {meta['value_size']:,}-byte values to "
        f"{meta['prefill_pct']:g}% of max heap, then {meta['threads']} writer threads replacing random entries "
        f"for {meta['duration_s']:g} s per scenario; governor sampling every {meta['interval_s']:g} s. "
        "Heap usage is the process RSS; the live set is the median RSS right after a collection "
        "(gc.collect + malloc_trim). Policy `both` is microswarm's governor (RSS triggers, accounted "
        "live bytes size the eviction); `rss` is GemFire's rule (evict while RSS is above the threshold)."),
        "",
        ("| policy | soft % | updates/s | evictions | evicted MiB | entries min/end | heap min % | heap max % "
         "| live set % | coll/s | coll CPU s/s | mean coll ms | refusals | load 1m |"),
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['policy']} | {r['soft_target_pct']:g} | {r['updates_per_s']:,.0f} | {r['evictions']:,} | "
            f"{r['evicted_bytes'] / MiB:,.0f} | {r['entries_min']:,}/{r['entries_end']:,} of "
            f"{r['prefill_entries']:,} | {r['heap_min_pct']:.1f} | {r['heap_max_pct']:.1f} | "
            f"{r['live_set_pct']:.1f} | {r['collections_per_s']:.2f} | {r['collection_cpu_share']:.3f} | "
            f"{r['mean_collection_ms']:.0f} | {r['refusals']:,} | {r.get('loadavg_1m_before', 0):.1f} |")
    lines += ["", ("Plots: `cache_heap.png` (heap usage band), `cache_evictions.png`, `cache_throughput.png`, "
              "`cache_collections.png`, `cache_timeline.png`."), ""]
    return "\n".join(lines)


def plots(out: Path, meta: dict[str, Any], results: list[dict[str, Any]]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = meta["eviction_threshold_pct"]
    policies = list(dict.fromkeys(r["policy"] for r in results))
    colors = {"both": "tab:blue", "rss": "tab:red", "live": "tab:purple"}
    by = {p: sorted((r for r in results if r["policy"] == p), key=lambda r: r["soft_target_pct"]) for p in policies}

    def zones(ax: Any, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        live = sorted(r["live_set_pct"] for r in rows)[len(rows) // 2]
        lo = min(r["soft_target_pct"] for r in rows) - 2.5
        hi = max(r["soft_target_pct"] for r in rows) + 2.5
        ax.axvspan(lo, live, color="orange", alpha=0.12, lw=0)
        ax.axvspan(live, ev, color="green", alpha=0.10, lw=0)
        ax.axvspan(ev, hi, color="red", alpha=0.10, lw=0)
        ax.set_xlim(lo, hi)

    ref = by.get("both") or next(iter(by.values()))

    # heap usage band
    fig, axes = plt.subplots(1, len(policies), figsize=(6 * len(policies), 4.5), sharey=True, squeeze=False)
    for ax, p in zip(axes[0], policies):
        rows = by[p]
        xs = [r["soft_target_pct"] for r in rows]
        zones(ax, rows)
        ax.fill_between(xs, [r["heap_min_pct"] for r in rows], [r["heap_max_pct"] for r in rows],
                        color=colors.get(p, "grey"), alpha=0.35, label="heap usage min-max")
        ax.plot(xs, [r["heap_max_pct"] for r in rows], color=colors.get(p, "grey"), marker="o", ms=3)
        ax.plot(xs, [r["heap_min_pct"] for r in rows], color=colors.get(p, "grey"), marker="o", ms=3)
        ax.plot(xs, [r["live_set_pct"] for r in rows], color="green", marker="s", ms=3, label="live set")
        ax.plot(xs, xs, color="black", ls="--", lw=1, label="soft target")
        ax.axhline(ev, color="red", ls=":", label=f"eviction threshold {ev:g}%")
        ax.set_title(f"policy {p}")
        ax.set_xlabel("soft target (% of max heap)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("heap usage (% of max heap)")
    axes[0][0].legend(fontsize=8, loc="upper left")
    fig.suptitle("Heap usage during sustained updates (orange: collection headroom <= 0, "
                 "green: both headrooms > 0, red: eviction headroom < 0)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "cache_heap.png", dpi=110)
    plt.close(fig)

    def simple(name: str, key: str, ylabel: str, title: str, scale: float = 1.0, log: bool = False) -> None:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        zones(ax, ref)
        for p in policies:
            rows = by[p]
            ax.plot([r["soft_target_pct"] for r in rows], [r[key] * scale for r in rows], marker="o",
                    color=colors.get(p, "grey"), label=f"policy {p}")
        if log:
            ax.set_yscale("symlog", linthresh=1)
        ax.set_xlabel("soft target (% of max heap)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)

    simple("cache_evictions.png", "evictions", "entries evicted", "Evictions during sustained updates", log=True)
    simple("cache_throughput.png", "updates_per_s", "updates per second", "Throughput")

    # collections per second and their CPU
    fig, ax = plt.subplots(figsize=(7, 4.2))
    zones(ax, ref)
    for p in policies:
        rows = by[p]
        xs = [r["soft_target_pct"] for r in rows]
        ax.plot(xs, [r["collections_per_s"] for r in rows], marker="o", color=colors.get(p, "grey"),
                label=f"collections/s ({p})")
    ax.set_xlabel("soft target (% of max heap)")
    ax.set_ylabel("collections per second")
    ax2 = ax.twinx()
    for p in policies:
        rows = by[p]
        ax2.plot([r["soft_target_pct"] for r in rows], [r["collection_cpu_share"] for r in rows], marker="x",
                 ls="--", color=colors.get(p, "grey"), label=f"collection CPU, cores ({p})")
    ax2.set_ylabel("collection CPU (core-seconds per second)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8)
    ax.set_title("Collections (gc.collect + malloc_trim) and their CPU", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "cache_collections.png", dpi=110)
    plt.close(fig)

    # time series of three representative settings (the paper's Figs 4-6)
    picks = []
    softs = sorted({r["soft_target_pct"] for r in ref})
    for want in (softs[0], softs[len(softs) // 2], softs[-1]):
        picks += [r for r in results if r["soft_target_pct"] == want]
    if picks:
        cols = len(picks) // max(1, len(policies)) or 1
        fig, axes = plt.subplots(len(policies), cols, figsize=(4.6 * cols, 3.4 * len(policies)),
                                 sharey=True, squeeze=False)
        mh = meta["max_heap_bytes"]
        for idx, p in enumerate(policies):
            row = [r for r in picks if r["policy"] == p]
            for jdx, r in enumerate(row):
                ax = axes[idx][jdx]
                s = r["series"]
                t = [x[0] for x in s]
                ax.plot(t, [100 * x[1] / mh for x in s], color=colors.get(p, "grey"), lw=0.8,
                        label="heap usage (RSS)")
                ax.plot(t, [100 * x[3] / mh if x[3] else float("nan") for x in s], color="green", lw=1,
                        label="after last collection")
                ax.plot(t, [100 * x[2] / mh for x in s], color="black", lw=0.8, ls="-.", label="live estimate")
                ax.axhline(ev, color="red", ls=":", lw=1)
                ax.axhline(r["soft_target_pct"], color="black", ls="--", lw=0.8)
                ax.set_title(f"{p}, soft {r['soft_target_pct']:g}%: {r['evictions']:,} evicted", fontsize=9)
                ax.set_xlabel("s")
                ax.grid(alpha=0.3)
            axes[idx][0].set_ylabel("% of max heap")
        axes[0][0].legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(out / "cache_timeline.png", dpi=100)
        plt.close(fig)


def pct_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-heap", default="2GiB", help="max heap, like -Xmx (default 2GiB)")
    ap.add_argument("--eviction", type=float, default=60.0, help="eviction threshold %% (default 60)")
    ap.add_argument("--critical", type=float, default=90.0, help="critical threshold %% (default 90)")
    ap.add_argument("--soft", type=pct_list, default=pct_list("40,45,50,55,60,65,70"),
                    help="soft targets %%, comma-separated (default 40..70 step 5)")
    ap.add_argument("--policies", default="both,rss", help="govern_on policies to run (default both,rss)")
    ap.add_argument("--prefill", type=float, default=40.0, help="pre-populated live %% of max heap")
    ap.add_argument("--value-size", type=int, default=10_000)
    ap.add_argument("--threads", type=int, default=4, help="writer threads (default 4)")
    ap.add_argument("--duration", type=float, default=15.0, help="seconds of sustained updates per scenario")
    ap.add_argument("--interval", type=float, default=0.1, help="governor sampling interval, s")
    ap.add_argument("--sample-hz", type=float, default=20.0, help="time-series sampling rate")
    ap.add_argument("--malloc-arena-max", type=int, default=None,
                    help="set MALLOC_ARENA_MAX in the scenario processes (default: inherit)")
    ap.add_argument("--out", default=str(ROOT / "docs"))
    ap.add_argument("--run-one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.run_one:
        result = run_one(json.loads(args.run_one))
        sys.stdout.write(json.dumps({"phase": "done", "result": result}) + "\n")
        return 0
    args.max_heap = parse_size(args.max_heap)
    args.policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    results = run_scenarios(args)
    write_outputs(args, results)
    from rich.console import Console
    from rich.table import Table
    t = Table(title="SoftMaxHeapSize experiment")
    for c in ("policy", "soft %", "updates/s", "evictions", "heap min-max %", "live %", "coll/s", "coll CPU"):
        t.add_column(c, justify="right")
    for r in results:
        t.add_row(r["policy"], f"{r['soft_target_pct']:g}", f"{r['updates_per_s']:,.0f}", f"{r['evictions']:,}",
                  f"{r['heap_min_pct']:.1f}-{r['heap_max_pct']:.1f}", f"{r['live_set_pct']:.1f}",
                  f"{r['collections_per_s']:.2f}", f"{r['collection_cpu_share']:.3f}")
    Console(stderr=True).print(t)
    print(f"wrote {Path(args.out) / 'cache_experiment.json'}, .md and cache_*.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
