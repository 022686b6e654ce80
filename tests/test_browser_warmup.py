"""Start-up: the UI is up while an engine still warms up, shows its status, and says "ready" once it is."""
import threading

import pytest

from tests.engines import RecordingEngine

pytestmark = pytest.mark.browser


class WarmingEngine(RecordingEngine):
    def __init__(self):
        super().__init__(name="Warming")
        self.done = threading.Event()

    @property
    def ready(self):
        return self.done.is_set()

    @property
    def status(self):
        return "Warming: ready" if self.ready else "Warming: capturing CUDA graphs"


def test_the_page_shows_warm_up_progress_until_the_model_is_ready(launch_app):
    from playwright.sync_api import sync_playwright, expect
    engine = WarmingEngine()
    url, _ = launch_app(["--rate-limit", "0"], engines={"Warming": engine})
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page()
        page.goto(url)
        status = page.locator("#model-status")
        expect(status).to_contain_text("Warming · ⏳ capturing CUDA graphs", timeout=30000)
        engine.done.set()
        expect(status).to_contain_text("Warming · ✅ ready", timeout=30000)
        expect(status).not_to_contain_text("capturing")
        browser.close()
