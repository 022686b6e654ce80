"""The top of the page in a real browser (Debian's chromium, driven by Playwright), as a visitor on a phone sees it.

With both notices every visitor must see (the small offline model, moderation OFF) and a model still starting,
the box to type in is within the first screen of a 390x844 phone; each model has a short status in one line
(together, the label of a closed accordion), its details (the full start-up status, the KV cache) only when
opened. The light/dark toggle switches the page and the choice survives a reload. Without a judge, no tab shows
⚖️ Ask the judge or an operator's flag (those are in the start-up log). A screenshot of the phone's first
screen is left in the test's tmp folder (``phone.png``) to look at.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tests.engines import RecordingEngine

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
PHONE = {"width": 390, "height": 844}

pytestmark = pytest.mark.browser


class LoadingEngine(RecordingEngine):
    """A model that is still loading its weights until ``done`` is set."""

    def __init__(self, name):
        super().__init__(name=name)
        self.done = threading.Event()

    @property
    def ready(self):
        return self.done.is_set()

    @property
    def status(self):
        return f"{self.name}: ready" if self.ready else f"{self.name}: loading weights (2 of 2 models)"

    @property
    def capacity(self):
        return "KV cache 19,840 tokens: ~9 conversations of 2,048 tokens at once" if self.ready else ""


@pytest.fixture
def page_app(tmp_path):
    """The page as the app builds it (both notices), launched with the app's CSS; -> (url, loading engine)."""
    from moderation import NoModerator
    from vicuna_demo.config import Settings
    from vicuna_demo.data.storage import open_store
    from vicuna_demo.loading import EMBEDDED_NOTE
    from vicuna_demo.services.chat import ChatService
    from vicuna_demo.services.runtime import MODERATION_OFF_NOTE
    from vicuna_demo.ui import CSS, build_ui
    loading = LoadingEngine("Vicuna-7B")
    engines = {"SmolLM2-135M (offline)": RecordingEngine("SmolLM2-135M (offline)"), "Vicuna-7B": loading}
    service = ChatService(engines, NoModerator(), open_store(tmp_path / "logs"))
    demo = build_ui(service, Settings(), [EMBEDDED_NOTE, MODERATION_OFF_NOTE])
    demo.queue()
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True, css=CSS)
    yield url, loading
    demo.close()
    service.store.close()


def test_on_a_phone_the_box_to_type_in_is_on_the_first_screen_under_short_notices_and_statuses(page_app,
                                                                                              tmp_path):
    from playwright.sync_api import expect, sync_playwright
    assert Path(CHROMIUM).exists(), "chromium is missing: apt-get install -y chromium (scripts/test.sh does it)"
    url, loading = page_app
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=PHONE)
            page.goto(url)
            box = page.locator("#chat-input textarea")
            expect(box).to_be_visible(timeout=30_000)
            notices = page.locator("#notices")
            expect(notices).to_contain_text("small offline model")
            expect(notices).to_contain_text("Content moderation is OFF")
            status = page.locator("#model-status")
            expect(status).to_contain_text("SmolLM2-135M (offline) · ✅ ready")
            expect(status).to_contain_text("Vicuna-7B · ⏳ loading weights")
            details = page.locator("#model-details")
            expect(details).to_be_hidden()                       # details on demand: closed at first
            page.screenshot(path=str(tmp_path / "phone.png"))
            where = box.bounding_box()
            assert where is not None and where["y"] + where["height"] <= PHONE["height"], where
            assert page.locator("#notices").bounding_box()["height"] < 100   # two short lines, not banners
            icon, frame = status.locator(".icon").bounding_box(), status.bounding_box()
            assert icon["x"] + icon["width"] <= frame["x"] + frame["width"]    # the cue that details exist shows

            status.locator("button.label-wrap").click()          # the details, for whoever asks
            expect(details).to_contain_text("Vicuna-7B: loading weights (2 of 2 models)")
            loading.done.set()                                   # the timer brings the news while starting
            expect(status).to_contain_text("Vicuna-7B · ✅ ready", timeout=30_000)
            expect(details).to_contain_text("Vicuna-7B: KV cache 19,840 tokens")
            assert "KV cache" not in status.locator("button.label-wrap").inner_text()
        finally:
            browser.close()


def test_the_light_dark_toggle_switches_the_page_and_the_choice_survives_a_reload(page_app):
    from playwright.sync_api import expect, sync_playwright
    url, _ = page_app
    dark = "() => document.body.classList.contains('dark')"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(color_scheme="light")
            page.goto(url)
            toggle = page.locator("#theme-toggle")
            expect(toggle).to_be_visible(timeout=30_000)
            assert page.evaluate(dark) is False
            toggle.click()
            page.wait_for_function(dark)
            page.reload()
            expect(page.locator("#theme-toggle")).to_be_visible(timeout=30_000)
            page.wait_for_function(dark, timeout=10_000)          # remembered (localStorage)
            page.locator("#theme-toggle").click()
            page.wait_for_function(f"() => !({dark})()")
            page.reload()
            expect(page.locator("#chat-input textarea")).to_be_visible(timeout=30_000)
            page.wait_for_timeout(1_000)                          # the page's load events have run
            assert page.evaluate(dark) is False
        finally:
            browser.close()


def test_a_visitor_sees_no_operator_instructions_and_no_judge_button_without_a_judge(page_app):
    from playwright.sync_api import expect, sync_playwright
    url, _ = page_app
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(url)
            expect(page.locator("#chat-input textarea")).to_be_visible(timeout=30_000)
            for tab in ("👥 Side by side", "📋 Evaluate", "🏆 Leaderboard"):
                page.get_by_role("tab", name=tab).click()
                page.wait_for_timeout(500)
                if tab == "👥 Side by side":
                    expect(page.locator("#compare-send")).to_be_visible()
                    expect(page.locator("#compare-judge")).to_be_hidden()      # no judge: nothing to ask
                if tab == "📋 Evaluate":
                    expect(page.locator("#evaluate-unavailable")).to_contain_text(
                        "No judge model is set up on this demo")
                text = page.locator("body").inner_text()
                for operator_words in ("--judge", "--model", "--endpoint", "start the app", "Start the app"):
                    assert operator_words not in text, (tab, operator_words)
        finally:
            browser.close()
