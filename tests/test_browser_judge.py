"""⚖️ Ask the judge in a real browser (Debian's chromium, driven by Playwright): a side-by-side round
between two scripted models, then the judge (a local OpenAI-compatible server that always says
[[A]]) streams its reasoning for both answer orders, and the panel says that the orders disagreed,
so the verdict is a tie; the verdict is stored as a judge vote."""

from __future__ import annotations

import shutil

import pytest

from tests.engines import RecordingEngine
from tests.judge_server import JudgeServer

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture
def browser_page():
    if not shutil.which(CHROMIUM):
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page()
        page.set_default_timeout(30_000)
        yield page
        browser.close()


def test_the_judge_streams_both_orders_and_a_first_position_judge_gives_a_tie(launch_app, browser_page):
    engines = {"Koala": RecordingEngine("Koala", "Paris is the capital of France.", delay_s=0.02),
               "Alpaca": RecordingEngine("Alpaca", "The capital is Paris.", delay_s=0.02)}
    with JudgeServer(lambda m: "Comparing both answers carefully before deciding. [[A]]", delay_s=0.05) as judge:
        url, runtime = launch_app(["--endpoint", judge.endpoint("Judge"), "--judge", "Judge"], engines=engines)
        page = browser_page
        page.goto(url)
        page.get_by_role("tab", name="👥 Side by side").click()
        page.locator("#compare-model-a input").fill("Koala")
        page.locator("#compare-model-a input").press("Enter")
        page.locator("#compare-model-b input").fill("Alpaca")
        page.locator("#compare-model-b input").press("Enter")
        page.locator("#compare-input textarea").fill("What is the capital of France?")
        page.locator("#compare-input textarea").press("Enter")
        page.wait_for_function("() => !document.querySelector('#compare-vote-model_a').disabled")
        page.locator("#compare-judge").click()
        page.wait_for_function("() => document.querySelector('#compare-judge-output').innerText.includes('▌')")
        page.wait_for_function("() => document.querySelector('#compare-judge-output').innerText.includes('Verdict')")
        panel = page.locator("#compare-judge-output").inner_text()
    assert "Order 1: Model A's answer shown first" in panel and "Order 2: Model B's answer shown first" in panel
    assert panel.count("Comparing both answers carefully") == 2
    assert "Tie: the two answer orders disagree" in panel
    [row] = runtime.service.store.judge_vote_rows()
    assert (row["model_a"], row["model_b"], row["winner"]) == ("Koala", "Alpaca", "tie")
