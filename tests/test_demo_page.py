"""The demo page in a real headless browser (Debian's chromium driven by Playwright).

Skipped when chromium is absent; `.ci/run` installs it.
"""

from __future__ import annotations

import shutil

import httpx
import polars as pl
import pytest

from fedrec.serving.settings import ServeSettings
from tests.live_server import live_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def site(served_root, tmp_path_factory):
    root = shutil.copytree(served_root, tmp_path_factory.mktemp("demo") / "artifacts")
    with live_server(ServeSettings(export=str(root / "exports"), merchant="big", watch_interval=0)) as base:
        yield base, root


@pytest.fixture(scope="module")
def page():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser.new_page()
        browser.close()


def test_pick_a_customer_and_see_their_recommendations(site, page):
    base, root = site
    page.goto(base + "/")
    page.wait_for_selector("#customer option", state="attached")
    customers = page.eval_on_selector_all("#customer option", "els => els.map(e => e.value)")
    customer = customers[2]
    page.select_option("#customer", customer)
    page.fill("#k", "7")
    page.click("#recommend-customer")
    page.wait_for_selector("tr.result")
    shown = page.eval_on_selector_all("tr.result", "rows => rows.map(r => r.dataset.id)")
    api = httpx.get(f"{base}/v1/merchants/big/customers/{customer}/recommendations", params={"k": 7}).json()
    assert shown == [it["id"] for it in api["items"]]
    first_title = page.inner_text("tr.result td:nth-child(2)")
    assert first_title == api["items"][0]["title"]
    assert "v0002" in page.inner_text("#results-title")
    assert "serving merchant big" in page.inner_text("#model")


def test_type_products_into_a_basket_and_get_recommendations(site, page):
    base, root = site
    title = pl.read_parquet(root / "exports" / "v0002" / "items.parquet")["title"][3]
    page.goto(base + "/")
    page.wait_for_selector("#customer option", state="attached")
    page.fill("#search", title)
    page.wait_for_selector("li.match")
    page.click("li.match")
    assert title in page.inner_text("#basket")
    page.fill("#k", "5")
    page.click("#recommend-basket")
    page.wait_for_selector("tr.result")
    assert page.eval_on_selector_all("tr.result", "rows => rows.length") == 5
    assert "basket of 1" in page.inner_text("#results-title")


def test_an_empty_basket_shows_the_api_message(site, page):
    base, _ = site
    page.goto(base + "/")
    page.wait_for_selector("#customer option", state="attached")
    page.click("#recommend-basket")
    page.wait_for_function("document.getElementById('error').textContent.length > 0")
    assert "items" in page.inner_text("#error")


def test_api_docs_load_with_every_non_loopback_request_blocked(site, page):
    """/docs must work on a serving host without internet: Swagger UI comes from the package."""
    from urllib.parse import urlparse

    base, _ = site
    blocked: list[str] = []

    def only_loopback(route):
        host = urlparse(route.request.url).hostname
        if host in ("127.0.0.1", "localhost", "::1"):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    page.route("**/*", only_loopback)
    try:
        page.goto(base + "/docs")
        page.wait_for_selector(".opblock", timeout=15_000)
        listed = page.eval_on_selector_all(".opblock-summary-path", "els => els.map(e => e.dataset.path)")
    finally:
        page.unroute("**/*")
    assert "/v1/recommendations" in listed
    assert "/v1/merchants/{merchant}/customers/{customer}/recommendations" in listed
    assert "/v1/items/{item_id}/similar" in listed
    assert blocked == []  # nothing was even asked of a CDN
