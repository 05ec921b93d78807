"""The live SLO page, loaded by a real headless browser (Debian's chromium, driven by
Playwright) against a real server: it must render live numbers per SLO class."""

from __future__ import annotations

import os
import shutil

import httpx
import pytest

MODEL = "SmolLM2-135M-Instruct"


def test_live_page_shows_each_slo_class_in_a_browser(server, client, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed (.ci/run installs it from Debian)")
    sync_api = pytest.importorskip("playwright.sync_api")
    for slo in ({"realtime": True, "ttft_ms": 60_000, "tpot_ms": 60_000}, {"ttft_ms": 60_000}):
        client.chat.completions.create(
            model=MODEL, max_tokens=4, temperature=0, extra_body={"slo": slo},
            messages=[{"role": "user", "content": "Name a colour."}])
    data = httpx.get(f"{server.url}/dashboard/data").json()
    assert {"realtime", "default"} <= set(data["classes"])
    assert httpx.get(f"{server.url}/", follow_redirects=False).headers["location"] == "/dashboard"

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{server.url}/dashboard")
            page.wait_for_function("document.getElementById('status').textContent === 'live'",
                                   timeout=15_000)
            assert page.inner_text("#policy") == (data["policy"] or "(default)")
            realtime = page.locator('#classes tr[data-class="realtime"] td.attainment')
            expected = data["classes"]["realtime"]["attainment"]
            assert realtime.inner_text() == f"{100 * expected:.1f}%"
            assert page.locator('#classes tr[data-class="default"]').count() == 1
            assert page.locator("canvas").count() == 3  # the three uPlot charts drew
            shot = os.environ.get("DASHBOARD_SCREENSHOT") or str(tmp_path / "dashboard.png")
            page.screenshot(path=shot, full_page=True)
            assert os.path.getsize(shot) > 10_000
        finally:
            browser.close()
