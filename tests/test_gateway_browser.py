"""The documentation page in a real headless browser (Debian's chromium, driven by Playwright):
it loads with no internet, lists the services, authorizes with client credentials, and a call
made with "Try it out" comes back as the envelope.

Needs chromium (`apt-get install -y chromium`); skipped, saying so, only where it is not installed.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest

from microcores.client import publish
from microswarm.cluster import LocalCluster

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = next((p for p in (os.environ.get("MICROSWARM_CHROMIUM"), "/usr/bin/chromium",
                             shutil.which("chromium"), shutil.which("chromium-browser")) if p and os.path.exists(p)),
                None)
if CHROMIUM is None:
    pytest.skip("chromium is not installed: `apt-get install -y chromium` (the browser test drives Debian's "
                "chromium; set MICROSWARM_CHROMIUM to use another binary)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -e '.[dev]'")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]


def trust_flags(c: LocalCluster) -> list[str]:
    """Chromium trusts the coordinator's self-signed certificate by its SPKI pin (this one key only; other
    certificate errors still fail), instead of ignoring HTTPS errors altogether."""
    assert c.http_url.startswith("https://"), c.http_url
    return [f"--ignore-certificate-errors-spki-list={c.spki_pin()}"]


@pytest.fixture(scope="module")
def docs_cluster(tmp_path_factory: pytest.TempPathFactory):
    c = LocalCluster(agents=0, http=True, workdir=str(tmp_path_factory.mktemp("browser")))
    with c:
        publish(str(ROOT / "microswarm" / "examples" / "square_sum.py"), coordinator=c.addr, state_dir=str(c.state))
        r = subprocess.run([sys.executable, "-m", "microswarm.cli", "clients", "create", "browser", "--json"],
                           capture_output=True, text=True, env=c.env(), timeout=60)
        assert r.returncode == 0, r.stderr
        yield c, json.loads(r.stdout.strip().splitlines()[-1])


def test_docs_page_lists_authorizes_and_tries_it_out(docs_cluster, tmp_path):
    c, cred = docs_cluster
    origin = urlparse(c.http_url)[:2]  # scheme and host:port: https://127.0.0.1:PORT only
    expect = sync_api.expect
    with sync_api.sync_playwright() as p:
        # HTTPS: chromium trusts exactly this coordinator's certificate, by its public key's pin
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[*FLAGS, *trust_flags(c)])
        try:
            page = browser.new_page()
            problems: list[str] = []
            foreign: list[str] = []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("request", lambda r: foreign.append(r.url) if urlparse(r.url)[:2] != origin else None)

            page.goto(c.http_url + "/docs")
            op = page.locator("#op-examples_square_sum_post")
            expect(op).to_be_visible(timeout=15_000)  # the catalogue came from /openapi.json
            for service_op in ("#op-math_compute_post", "#op-math_compute_get", "#op-demo_echo_bytes_post"):
                expect(page.locator(service_op)).to_have_count(1)
            assert page.locator("body").get_attribute("data-services") == "7"

            # before authorizing: the call is refused with a 401 envelope
            op.locator("button.head").click()
            op.locator("button.try").click()
            op.locator("textarea.request-body").fill('{"n": 10}')
            op.locator("button.execute").click()
            expect(op.locator(".response-status")).to_contain_text("401")
            assert json.loads(op.locator(".response-body").text_content())["error"]["code"] == "unauthenticated"

            page.fill("#client-id", cred["client_id"])
            page.fill("#client-secret", cred["client_secret"])
            page.click("#authorize")
            expect(page.locator("#auth-state")).to_contain_text("Authorized as " + cred["client_id"])

            op.locator("button.execute").click()
            expect(op.locator(".response-status")).to_contain_text("200")
            env = json.loads(op.locator(".response-body").text_content())
            assert env["status"] == "ok" and env["result"] == {"total": 285}
            assert {"executed_by", "attempts", "process_time_ms", "cache_hit", "service", "version"} <= env.keys()
            assert "Authorization: Bearer $TOKEN" in op.locator(".curl").text_content()

            get = page.locator("#op-math_compute_get")  # a GET with query parameters from the form
            get.locator("button.head").click()
            get.locator("button.try").click()
            get.locator("input[data-param=a]").fill("6")
            get.locator("input[data-param=b]").fill("7")
            get.locator("input[data-param=op]").fill("mul")
            get.locator("button.execute").click()
            expect(get.locator(".response-status")).to_contain_text("200")
            assert json.loads(get.locator(".response-body").text_content())["result"] == {"result": 42.0}

            page.screenshot(path=str(tmp_path / "docs.png"), full_page=True)
            page.click("#logout")
            expect(page.locator("#auth-state")).to_contain_text("revoked")
            problems = [m for m in problems if "status of 401" not in m]  # the refusal we asked for
            assert not problems, problems  # no script error, no CSP violation, nothing missing
            assert not foreign, foreign  # nothing fetched from anywhere but the coordinator
        finally:
            browser.close()
