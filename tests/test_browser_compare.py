"""One anonymous comparison round in a real browser (Debian's chromium, driven by Playwright): type a
prompt, watch both panes stream at the same time (each Stop lit only while its side streams), click a
vote, see the names revealed and the chosen vote highlighted.

The app is the real one, launched in-process with two scripted engines (tests/engines.py)."""

from __future__ import annotations

import shutil
import time

import pytest

from tests.engines import RecordingEngine

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
KOALA, ALPACA = "Koala-13B", "Alpaca-7B"
KOALA_REPLY = "Paris is the capital of France and also its largest city by population."
ALPACA_REPLY = "The capital city of France is Paris, which lies on the river Seine."
PANES_JS = """() => ['#arena-chatbot-a', '#arena-chatbot-b', '#arena-reveal', '#arena-notice']
    .map(sel => (document.querySelector(sel) || {}).innerText || '')"""
STOPS_LIT_JS = "() => ['#arena-stop-a', '#arena-stop-b'].map(sel => !document.querySelector(sel).disabled)"


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


def test_an_arena_round_in_the_browser_streams_both_panes_then_reveals_names_after_the_vote(launch_app,
                                                                                            browser_page):
    engines = {KOALA: RecordingEngine(KOALA, KOALA_REPLY, delay_s=0.12),
               ALPACA: RecordingEngine(ALPACA, ALPACA_REPLY, delay_s=0.12)}
    url, runtime = launch_app([], engines=engines)
    page = browser_page
    page.goto(url)
    page.get_by_role("tab", name="⚔️ Arena (anonymous)").click()
    vote_a = page.locator("#arena-vote-model_a")
    assert vote_a.is_disabled()
    stops = [page.locator("#arena-stop-a"), page.locator("#arena-stop-b")]
    assert all(stop.is_disabled() for stop in stops)
    page.locator("#arena-input textarea").fill("What is the capital of France?")
    page.locator("#arena-input textarea").press("Enter")

    snapshots = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        snapshots.append(page.evaluate(PANES_JS) + [page.evaluate(STOPS_LIT_JS)])
        pane_a, pane_b = snapshots[-1][:2]
        if ("Paris" in pane_a and "tok/s" in pane_a) and ("Paris" in pane_b and "tok/s" in pane_b):
            break
        time.sleep(0.05)
    pane_a, pane_b = snapshots[-1][:2]
    assert {KOALA_REPLY, ALPACA_REPLY} <= {line.strip() for line in (pane_a + "\n" + pane_b).splitlines()}
    both_streaming = [s for s in snapshots if "▌" in s[0] and "▌" in s[1]
                      and any(w in s[0] for w in ("Paris", "The")) and any(w in s[1] for w in ("Paris", "The"))]
    assert both_streaming, "the two panes did not stream at the same time"
    assert any(s[4] == [True, True] for s in both_streaming), "Stop was not lit while both sides streamed"
    for texts in snapshots:  # no model name on the arena's panes before the vote
        assert not any(KOALA in t or ALPACA in t for t in texts)

    vote_a.wait_for(state="visible")
    page.wait_for_function("() => !document.querySelector('#arena-vote-model_a').disabled")
    vote_a.click()
    page.wait_for_function("() => document.querySelector('#arena-reveal').innerText.includes('Model A:')")
    reveal = page.locator("#arena-reveal").inner_text()
    model_a = KOALA if KOALA_REPLY in pane_a else ALPACA
    model_b = ALPACA if model_a == KOALA else KOALA
    assert f"Model A: {model_a} · Model B: {model_b}" in reveal
    assert "Thanks for voting" in page.locator("#arena-notice").inner_text()
    assert vote_a.is_disabled()
    assert all(stop.is_disabled() for stop in stops)
    classes = {w: page.locator(f"#arena-vote-{w}").get_attribute("class").split()
               for w in ("model_a", "model_b", "tie", "tie-bothbad")}
    assert "primary" in classes["model_a"]                        # the chosen vote stays highlighted
    assert all("secondary" in classes[w] for w in ("model_b", "tie", "tie-bothbad"))
    [vote] = runtime.service.store.vote_rows()
    assert (vote["anony"], vote["model_a"], vote["winner"]) == (True, model_a, "model_a")


def test_one_stop_halts_both_replies_in_side_by_side(launch_app, browser_page):
    long = " ".join(f"word{i}" for i in range(400))   # 40 s unless stopped
    engines = {KOALA: RecordingEngine(KOALA, long, delay_s=0.1), ALPACA: RecordingEngine(ALPACA, long, delay_s=0.1)}
    url, runtime = launch_app(["--rate-limit", "0"], engines=engines)
    page = browser_page
    page.goto(url)
    page.get_by_role("tab", name="👥 Side by side").click()
    stop = page.locator("#compare-stop")
    assert stop.is_disabled()
    page.locator("#compare-input textarea").fill("Count for me.")
    page.locator("#compare-send").click()
    page.wait_for_function("() => !document.querySelector('#compare-stop').disabled")
    page.wait_for_function("() => ['#compare-chatbot-a', '#compare-chatbot-b']"
                           ".every(sel => document.querySelector(sel).innerText.includes('word3'))")
    stop.click()
    page.wait_for_function("() => ['#compare-chatbot-a', '#compare-chatbot-b']"
                           ".every(sel => document.querySelector(sel).innerText.includes('stopped'))")
    page.wait_for_function("() => document.querySelector('#compare-stop').disabled")
    assert sorted(row.finish_reason for row in runtime.store.turns()) == ["cancelled", "cancelled"]
    assert all(row.n_tokens < 400 for row in runtime.store.turns())
