"""The leaderboard tab in a real browser (Debian's chromium, driven by Playwright): after an arena vote whose
notice says it counts, tick Style control and see the style-controlled board with its coefficients, then
pick a category.

The app is the real one, launched in-process with two scripted engines (tests/engines.py)."""

from __future__ import annotations

import pytest

from tests.engines import RecordingEngine
from tests.test_browser_compare import browser_page  # noqa: F401 - the shared chromium fixture

pytestmark = pytest.mark.browser


def test_style_control_and_category_on_the_leaderboard_tab(launch_app, browser_page):  # noqa: F811
    engines = {"Koala": RecordingEngine("Koala", "# Paris\n- capital of France\n- **largest** city", 0.01),
               "Alpaca": RecordingEngine("Alpaca", "Paris.", 0.01)}
    url, runtime = launch_app(["--min-battles", "1"], engines=engines)
    page = browser_page
    page.goto(url)
    page.get_by_role("tab", name="⚔️ Arena (anonymous)").click()
    page.locator("#arena-input textarea").fill("What is the capital of France?")
    page.locator("#arena-input textarea").press("Enter")
    page.wait_for_function("() => !document.querySelector('#arena-vote-model_a').disabled")
    page.locator("#arena-vote-model_a").click()
    page.wait_for_function("() => document.querySelector('#arena-notice').innerText.includes('Your vote counts')")

    page.get_by_role("tab", name="🏆 Leaderboard").click()
    page.wait_for_function("() => document.querySelector('#leaderboard-summary').innerText.includes('counted')")
    assert "Style control is on" not in page.locator("#leaderboard-summary").inner_text()
    page.locator("#leaderboard-style-control input").check()
    page.wait_for_function(
        "() => document.querySelector('#leaderboard-summary').innerText.includes('Style control is on')")
    summary = page.locator("#leaderboard-summary").inner_text()
    assert "length" in summary and "headers" in summary
    category = page.locator("#leaderboard-category input")
    category.fill("code")
    category.press("Enter")
    page.wait_for_function(
        "() => document.querySelector('#leaderboard-summary').innerText.includes('Category code')")
    assert runtime.service.store.vote_rows()[0]["categories"] == ["lang:en"]
