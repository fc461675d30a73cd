"use strict";
// Polls /dashboard/data once a second and redraws the tables. No framework, no network but ours.
(function () {
  const $ = (sel) => document.querySelector(sel);
  const fmtBytes = (n) => {
    if (n === null || n === undefined) return "–";
    const u = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0; n = Number(n);
    const sign = n < 0 ? "−" : ""; n = Math.abs(n);
    while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return sign + (i ? n.toFixed(1) : n) + " " + u[i];
  };
  const CACHE_KEYS = ["hits", "misses", "hit_ratio", "entries", "accounted_bytes", "heap_bytes", "heap_after_collection",
    "collection_headroom", "eviction_headroom", "collections", "collection_ms_total", "evictions", "evicted_bytes",
    "refusals", "max_heap_bytes", "soft_target_pct", "eviction_threshold_pct", "critical_threshold_pct", "last_decision"];
  const fmtFigure = (k, v) => {
    if (v === null || v === undefined) return "–";
    if (/bytes$|headroom$|after_collection$/.test(k)) return fmtBytes(v);
    if (/pct$/.test(k)) return `${v}%`;
    if (k === "hit_ratio") return `${(100 * v).toFixed(1)}%`;
    if (typeof v === "number" && !Number.isInteger(v)) return v.toFixed(1);
    return String(v);
  };
  const cell = (text, cls) => { const td = document.createElement("td"); td.textContent = text; if (cls) td.className = cls; return td; };
  const fill = (id, rows) => {
    const body = $(id + " tbody"); const frag = document.createDocumentFragment();
    for (const cells of rows) { const tr = document.createElement("tr"); cells.forEach((c) => tr.appendChild(c)); frag.appendChild(tr); }
    body.replaceChildren(frag);
  };
  const date = (t) => { const d = new Date(t * 1000); return d.toISOString().replace("T", " ").slice(0, 23); };


  // ---------------------------------------------------------------- charts (hand-drawn SVG, no library)
  const NS = "http://www.w3.org/2000/svg";
  const W = 360, H = 130, PL = 38, PR = 8, PT = 8, PB = 16;
  const svgEl = (name, attrs, text) => {
    const e = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    if (text !== undefined) e.textContent = text;
    return e;
  };
  const AGENT_COLORS = ["#2563eb", "#7c3aed", "#0891b2", "#db2777", "#4f46e5", "#0d9488", "#9333ea", "#0284c7"];
  const FIXED_COLORS = { coordinator: "#f59e0b", cache: "#16a34a", other: "#9ca3af" };
  const ERROR_COLORS = ["#b91c1c", "#ea580c", "#be185d", "#a16207", "#7f1d1d", "#c2410c"];
  const niceMax = (v) => {
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v))); const m = v / p;
    return (m <= 1 ? 1 : m <= 2 ? 2 : m <= 5 ? 5 : 10) * p;
  };
  const fmtNum = (v) => (v >= 100 || Number.isInteger(v) ? String(Math.round(v)) : v >= 10 ? v.toFixed(1) : v.toFixed(2));

  // series: [{name, values, color}]; opts: {stacked, yfmt, ymax, limits: [{name, value, color}], empty}
  function chart(id, t, span, series, opts) {
    const fig = $(id);
    const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, class: "plot", role: "img", "aria-label": fig.querySelector("figcaption").textContent });
    const legend = document.createElement("div"); legend.className = "legend";
    const yfmt = opts.yfmt || fmtNum;
    const end = t.length ? t[t.length - 1] : 0, start = end - span + 1;
    const x = (ti) => PL + (W - PL - PR) * (ti - start) / Math.max(1, span - 1);
    let top = 0; const stack = t.map(() => 0); const drawn = [];
    for (const s of series) {
      const vals = s.values.map((v, i) => (v === null || v === undefined ? null : opts.stacked ? (stack[i] += v) : v));
      drawn.push(vals);
      for (const v of vals) if (v !== null && v > top) top = v;
    }
    for (const l of opts.limits || []) if (l.value > top) top = l.value;
    const ymax = opts.ymax || niceMax(top);
    const y = (v) => PT + (H - PT - PB) * (1 - Math.min(v, ymax) / ymax);
    for (const f of [0, 0.5, 1]) {
      svg.appendChild(svgEl("line", { x1: PL, x2: W - PR, y1: y(f * ymax), y2: y(f * ymax), class: "grid" }));
      svg.appendChild(svgEl("text", { x: PL - 4, y: y(f * ymax) + 3, "text-anchor": "end", class: "axis" }, yfmt(f * ymax)));
    }
    svg.appendChild(svgEl("text", { x: PL, y: H - 3, class: "axis" }, span >= 120 ? `${Math.round(span / 60)} min ago` : `${span} s ago`));
    svg.appendChild(svgEl("text", { x: W - PR, y: H - 3, "text-anchor": "end", class: "axis" }, "now"));
    let points = 0;
    series.forEach((s, k) => {
      const vals = drawn[k];
      let d = "", pen = false;
      vals.forEach((v, i) => {
        if (v === null) { pen = false; return; }
        d += `${pen ? "L" : "M"}${x(t[i]).toFixed(1)} ${y(v).toFixed(1)}`; pen = true; points++;
      });
      if (!d) return;
      if (opts.stacked) {  // an area down to the series below it
        const below = k ? drawn[k - 1] : vals.map(() => 0);
        let back = "";
        for (let i = vals.length - 1; i >= 0; i--) if (vals[i] !== null) back += `L${x(t[i]).toFixed(1)} ${y(below[i] || 0).toFixed(1)}`;
        svg.appendChild(svgEl("path", { d: d + back + "Z", class: "area series", fill: s.color, stroke: s.color, "data-name": s.name }));
      } else {
        svg.appendChild(svgEl("path", { d, class: "line series", stroke: s.color, "data-name": s.name }));
      }
    });
    (opts.limits || []).forEach((l, i) => {  // labels side by side: close thresholds must not overprint
      svg.appendChild(svgEl("line", { x1: PL, x2: W - PR, y1: y(l.value), y2: y(l.value), class: "limit", stroke: l.color }));
      svg.appendChild(svgEl("text", { x: PL + 3 + i * 75, y: y(l.value) - 2, class: "limit-label", fill: l.color }, l.name));
    });
    if (opts.empty) svg.appendChild(svgEl("text", { x: (W + PL) / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, opts.empty));
    svg.dataset.points = String(points);
    for (const s of [...series, ...(opts.limits || [])]) {
      const key = document.createElement("span"); key.className = "key";
      const sw = svgEl("svg", { width: 10, height: 10, "aria-hidden": "true" });
      sw.appendChild(svgEl("rect", { width: 10, height: 10, rx: 2, fill: s.color }));
      key.appendChild(sw); key.appendChild(document.createTextNode(s.name));
      // a rate's key shows its total over the window, a level's its latest value
      const last = !s.values ? s.value : opts.stacked ? s.values.reduce((a, v) => a + (v || 0), 0)
        : [...s.values].reverse().find((v) => v !== null && v !== undefined);
      if (last !== undefined) {
        const b = document.createElement("b"); b.textContent = opts.stacked ? String(last) : yfmt(last);
        b.title = opts.stacked ? "in the window" : "latest"; key.appendChild(b);
      }
      legend.appendChild(key);
    }
    fig.replaceChildren(fig.querySelector("figcaption"), svg, legend);
  }

  function renderCharts(tl) {
    if (!tl) return;
    // the window: 5 minutes once there are; until then the seconds so far (at least one minute)
    const t = tl.t, span = Math.min(tl.seconds, Math.max(60, t.length));
    $("#timeline-span").textContent = t.length ? `(${t.length} s so far, 1 s resolution)` : "(gathering)";
    let agentIx = 0;
    chart("#chart-calls", t, span, Object.entries(tl.calls).map(([name, values]) => ({
      name, values, color: FIXED_COLORS[name] || AGENT_COLORS[agentIx++ % AGENT_COLORS.length] })), { stacked: true });
    const L = tl.latency_ms;
    chart("#chart-latency", t, span, [{ name: "p50", values: L.p50, color: "#2563eb" },
      { name: "p95", values: L.p95, color: "#f59e0b" }, { name: "p99", values: L.p99, color: "#b91c1c" }], {});
    const codes = Object.entries(tl.errors);
    chart("#chart-errors", t, span, codes.map(([name, values], i) => ({ name, values, color: ERROR_COLORS[i % ERROR_COLORS.length] })),
      { stacked: true, empty: codes.length ? "" : "no errors" });
    chart("#chart-agents", t, span, [{ name: "busy slots", values: tl.busy_slots, color: "#2563eb" },
      { name: "total slots", values: tl.total_slots, color: "#9ca3af" }, { name: "agents", values: tl.agents, color: "#16a34a" }], {});
    const noCache = !tl.hit_ratio.some((v) => v !== null);
    chart("#chart-hits", t, span, [{ name: "hit ratio", values: tl.hit_ratio, color: "#16a34a" }],
      { ymax: 1, yfmt: (v) => `${Math.round(100 * v)}%`, empty: noCache ? (tl.heap_limits ? "no cacheable calls yet" : "the result cache is off") : "" });
    const lim = tl.heap_limits;
    chart("#chart-heap", t, span, lim ? [{ name: "heap used", values: tl.heap_bytes, color: "#2563eb" }] : [],
      { yfmt: fmtBytes, ymax: lim ? lim.max : 0, empty: lim ? "" : "no heap governor (the result cache is off)",
        limits: lim ? [{ name: "soft target", value: lim.soft_target, color: "#16a34a" },
          { name: "eviction", value: lim.eviction, color: "#f59e0b" }, { name: "critical", value: lim.critical, color: "#b91c1c" }] : [] });
  }

  function render(d) {
    $("#summary").textContent = `coordinator ${d.coordinator} · up ${Math.round(d.uptime_s)} s · ` +
      `${d.calls_total} calls (${d.fallbacks_total} run by the coordinator) · ${d.in_flight} in flight · ` +
      `${d.queue_depth} waiting for a slot · placement ${d.placement} · dispatch ${d.dispatch}`;
    $("#agent-count").textContent = `(${d.agents.length})`;
    $("#service-count").textContent = `(${d.services.length})`;
    fill("#agents", d.agents.map((a) => [cell(a.id), cell(a.address), cell(a.state),
      cell(`${a.trust} (${a.agreements}/${a.disagreements})`, a.trust === "quarantined" ? "bad" : a.trust === "trusted" ? "ok" : ""),
      cell(`${a.running}/${a.slots}`, "num"),
      cell(`${a.last_heartbeat_s.toFixed(1)} s ago`, "num"), cell(a.packages.join(", ") || "–"), cell(a.done, "num"),
      cell(a.failed, "num"), cell(`${a.cpu_percent}%`, "num"), cell(fmtBytes(a.rss_bytes), "num")]));
    fill("#services", d.services.map((s) => [cell(s.name), cell(s.version), cell(s.revision, "num"),
      cell(s.pure ? "yes" : ""), cell(s.agents, "num"), cell(s.digest)]));
    const running = d.running || [];
    $("#running-count").textContent = `(${running.length}${d.in_flight > running.length ? ` of ${d.in_flight}` : ""})`;
    fill("#running", running.length ? running.map((c) => {
      const bar = document.createElement("progress"); bar.max = 1; bar.value = c.progress;
      const td = cell(` ${Math.round(100 * c.progress)}%`, "num"); td.prepend(bar);
      return [cell(c.call, "muted"), cell(c.service), cell(c.executed_by || "waiting"), td, cell(c.message || ""),
        cell(`${c.age_s.toFixed(1)} s`, "num")];
    }) : [[cell("none")]]);
    fill("#calls", d.calls.map((c) => [cell(c.client), cell(date(c.time)), cell(c.address || "–"),
      cell(c.via || "", "muted"), cell(c.service), cell(c.executed_by),
      cell(c.success ? "yes" : `no ${c.error}`, c.success ? "ok" : "bad"), cell(c.ms.toFixed(1), "num")]));
    const cache = d.cache || {};
    const shown = CACHE_KEYS.filter((k) => k in cache);
    fill("#cache", shown.length ? shown.map((k) => [cell(k.replace(/_/g, " ")), cell(fmtFigure(k, cache[k]), "num")])
      : [[cell("the result cache is off")]]);
    renderCharts(d.timeline);
    document.body.dataset.calls = String(d.calls_total);
  }

  async function tick() {
    try {
      const r = await fetch("/dashboard/data", { cache: "no-store", credentials: "same-origin" });
      if (!r.ok) throw new Error(`HTTP ${r.status}`);
      render(await r.json());
      $("#live").className = "";
      $("#live").title = "live";
    } catch (e) {
      $("#live").className = "stale";
      $("#live").title = `not updating: ${e.message}`;
    } finally {
      setTimeout(tick, 1000);
    }
  }
  tick();
})();
