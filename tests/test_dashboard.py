"""The operator's dashboard: auth, its live data, and the page in a real headless browser
(Debian's chromium driven by Playwright), which shows a call made during the test within seconds.
The browser test saves docs/dashboard.png for the README."""
from __future__ import annotations

import base64
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import pytest

from microswarm.cluster import LocalCluster

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = next((p for p in (os.environ.get("MICROSWARM_CHROMIUM"), "/usr/bin/chromium",
                             shutil.which("chromium"), shutil.which("chromium-browser")) if p and os.path.exists(p)),
                None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]


def trust_flags(c: LocalCluster) -> list[str]:
    """Chromium trusts the coordinator's self-signed certificate by its SPKI pin (this one key only; other
    certificate errors still fail), instead of ignoring HTTPS errors altogether."""
    assert c.http_url.startswith("https://"), c.http_url
    return [f"--ignore-certificate-errors-spki-list={c.spki_pin()}"]


@pytest.fixture(scope="module")
def dash(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = LocalCluster(agents=2, slots=2, http=True, workdir=str(tmp_path_factory.mktemp("dashboard")))
    with c:
        yield c


def basic(c: LocalCluster) -> str:
    admin = (c.state / "admin.token").read_text().strip()
    return "Basic " + base64.b64encode(f"operator:{admin}".encode()).decode()


def get(c: LocalCluster, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """GET a path of the cluster's gateway over HTTPS, trusting exactly its certificate."""
    try:
        with c.urlopen(urllib.request.Request(c.http_url + path, headers=headers or {}), timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_dashboard_is_the_operators_only(dash):
    st, hdr, body = get(dash, "/dashboard")
    assert st == 401 and hdr["WWW-Authenticate"].startswith("Basic") and b"admin.token" in body
    st, _, _ = get(dash, "/dashboard/data", {"Authorization": "Basic " + base64.b64encode(b"x:wrong").decode()})
    assert st == 401
    with dash.client() as c:  # the CLI's own operator token works too
        token = c.token()
    st, _, _ = get(dash, "/dashboard/data", {"Authorization": f"Bearer {token}"})
    assert st == 200
    st, hdr, body = get(dash, "/dashboard", {"Authorization": basic(dash)})
    assert st == 200 and b"Call log" in body and "script-src 'self'" in hdr["Content-Security-Policy"]


def test_data_has_the_papers_call_log_columns(dash):
    with dash.client() as c:
        env = c.envelope("numbers.is_positive", {"n": 4})
    st, _, body = get(dash, "/dashboard/data", {"Authorization": basic(dash)})
    d = json.loads(body)
    assert {a["id"] for a in d["agents"]} == {"agent1", "agent2"}
    assert all({"running", "slots", "last_heartbeat_s"} <= a.keys() for a in d["agents"])
    assert all(a["trust"] in ("new", "trusted", "quarantined") for a in d["agents"])
    assert "numbers.is_positive" in {s["name"] for s in d["services"]}
    row = next(x for x in d["calls"] if x["service"] == "numbers.is_positive")
    assert row["executed_by"] == env.executed_by and row["success"] is True
    assert row["client"] and row["time"] > 0 and ":" in row["address"]  # client, date, IP and port
    assert row["address"].startswith("127.0.0.1:") and row["via"] == "grpc"
    assert get(dash, "/dashboard/data?calls=lots", {"Authorization": basic(dash)})[0] == 400
    assert "hits" in d["cache"]


def test_data_has_the_charts_series(dash):
    with dash.client() as c:
        for i in range(3):
            c.envelope("math.compute", {"a": 7, "b": i, "op": "add"})
        c.envelope("math.compute", {"a": 7, "b": 0, "op": "add"})  # again: the cache answers
        c.envelope("math.compute", {"a": "x", "b": 2})  # refused: an error by code
    deadline = time.monotonic() + 5
    while True:  # a call is charted once its second is over
        st, _, body = get(dash, "/dashboard/data", {"Authorization": basic(dash)})
        tl = json.loads(body)["timeline"]
        if sum(sum(v) for v in tl["calls"].values()) >= 5 and tl["errors"] or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert st == 200
    assert {"seconds", "t", "calls", "errors", "latency_ms", "agents", "busy_slots", "total_slots", "in_flight",
            "hit_ratio", "heap_bytes", "heap_limits"} <= tl.keys()
    n = len(tl["t"])
    assert 0 < n <= tl["seconds"] == 300
    assert {"agent1", "agent2", "coordinator", "cache"} <= tl["calls"].keys()
    assert sum(tl["calls"]["cache"]) >= 1 and sum(tl["errors"]["invalid_input"]) >= 1
    assert set(tl["latency_ms"]) == {"p50", "p95", "p99"}
    assert all(len(v) == n for v in [*tl["calls"].values(), *tl["errors"].values(), *tl["latency_ms"].values(),
                                     tl["agents"], tl["busy_slots"], tl["hit_ratio"], tl["heap_bytes"]])
    assert any(v is not None for v in tl["latency_ms"]["p99"])
    assert tl["total_slots"][-1] == 4 and tl["agents"][-1] == 2
    lim = tl["heap_limits"]
    assert lim["soft_target"] <= lim["eviction"] < lim["critical"] <= lim["max"]
    assert get(dash, "/dashboard/data")[0] == 401  # the series are the operator's too


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed: `apt-get install -y chromium`")
def test_dashboard_in_a_browser_shows_a_new_call_within_seconds(dash):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -e '.[dev]'")
    admin = (dash.state / "admin.token").read_text().strip()
    origin = urlparse(dash.http_url)[:2]  # scheme and host:port: https://127.0.0.1:PORT only
    with sync_api.sync_playwright() as p:
        # HTTPS: chromium trusts exactly this coordinator's certificate, by its public key's pin
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[*FLAGS, *trust_flags(dash)])
        try:
            ctx = browser.new_context(http_credentials={"username": "operator", "password": admin},
                                      viewport={"width": 1280, "height": 900})
            page = ctx.new_page()
            problems: list[str] = []
            foreign: list[str] = []
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("request", lambda r: foreign.append(r.url) if urlparse(r.url)[:2] != origin else None)
            page.goto(dash.http_url + "/dashboard")
            expect = sync_api.expect
            expect(page.locator("#agents tbody tr")).to_have_count(2, timeout=15_000)
            expect(page.locator("#live")).not_to_have_class("stale", timeout=5_000)
            with dash.client() as c:
                for i in range(4):
                    c.envelope("math.compute", {"a": 31337 + i, "b": 2, "op": "mul"})
                c.envelope("math.compute", {"a": "not a number", "b": 2})  # a failure, shown as such
            t0 = time.monotonic()
            expect(page.locator("#calls tbody tr", has_text="math.compute").first).to_be_visible(timeout=5_000)
            seen_after = time.monotonic() - t0
            expect(page.locator("#calls tbody td.bad").first).to_contain_text("invalid_input", timeout=5_000)
            expect(page.locator("#cache tbody")).to_contain_text("hits")
            # the charts: SVG drawn from the series, with a legend naming who ran the calls
            expect(page.locator("#chart-latency path.series").first).to_be_attached(timeout=5_000)
            expect(page.locator("#chart-errors path.series").first).to_be_attached(timeout=5_000)
            legend = page.locator("#chart-calls .legend")
            for who in ("coordinator", "cache", "agent1", "agent2"):
                expect(legend).to_contain_text(who)
            assert page.locator("figure.chart svg.plot").count() == 6
            assert int(page.locator("#chart-calls svg.plot").get_attribute("data-points") or 0) > 0
            assert page.locator("#chart-calls path.series").count() >= 3
            assert page.locator("#chart-heap line.limit").count() == 3  # soft target, eviction, critical
            with dash.client() as c:  # a few seconds of traffic, so that the screenshot has something to show
                for i in range(12):
                    for k in range(3 + i % 4):
                        c.envelope("math.compute", {"a": 1000 * i + k, "b": 3, "op": "mul"})
                    c.envelope("math.compute", {"a": 31337, "b": 2, "op": "mul"})  # the cache answers
                    if i % 5 == 4:
                        c.envelope("math.compute", {"a": "nan", "b": 2})
                    time.sleep(0.25)
            time.sleep(2.2)  # the last second closes and the page polls it
            page.screenshot(path=str(ROOT / "docs" / "dashboard.png"), full_page=True)
        finally:
            browser.close()
    assert seen_after < 5
    assert not problems, problems
    assert not foreign, f"the dashboard fetched from elsewhere: {foreign[:3]}"
