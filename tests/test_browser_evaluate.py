"""📋 Evaluate in a real browser (Debian's chromium, driven by Playwright; the app served with serving's
middleware): a visitor starts an evaluation of a slow model and closes the page; within a few seconds every
request of the run has ended on the engine and the "one evaluation at a time" slot is free for the next visitor.

gradio notices a lost client only when a generator yields (its queue checks the event after each update),
and a slow model's evaluation may not yield for minutes; closing the page also ends the page's heartbeat
stream, on which gradio runs the app's ``unload`` listeners: the app stops the page's evaluation there."""

from __future__ import annotations

import shutil
import time

import pytest

from tests.engines import RecordingEngine, SlowEngine

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
WITHIN_S = 5.0


@pytest.fixture
def browser():
    if not shutil.which(CHROMIUM):
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


def test_closing_the_page_ends_the_evaluation_on_the_engine_and_frees_the_slot(launch_app, browser):
    slow = SlowEngine("Slow", delay_s=1.0)          # 200 words at 1 s each: no answer would finish for minutes
    url, runtime = launch_app(["--judge", "Judge"],
                              engines={"Slow": slow, "Judge": RecordingEngine("Judge", "Fine. [[5]]")})
    page = browser.new_page()
    page.set_default_timeout(30_000)
    page.goto(url)
    page.get_by_role("tab", name="📋 Evaluate").click()
    page.locator("#evaluate-model-a input").fill("Slow")
    page.locator("#evaluate-model-a input").press("Enter")
    page.get_by_label("single (grade each answer 1-10)").check()
    page.locator("#evaluate-run").click()
    assert slow.started.wait(30)
    page.wait_for_function("() => document.querySelector('#evaluate-status').innerText.includes('Answers')")
    assert runtime.judge.evaluation_running and not any(r.ended.is_set() for r in slow.replies)
    closed_at = time.monotonic()
    page.close()
    while runtime.judge.evaluation_running and time.monotonic() - closed_at < 30:
        time.sleep(0.05)
    freed_s = time.monotonic() - closed_at
    assert freed_s < WITHIN_S, f"the evaluation slot was still held {freed_s:.1f} s after the page closed"
    assert slow.all_ended(0) and all(r.cancelled_at is not None for r in slow.replies)
