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
