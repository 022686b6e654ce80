"""A visitor in a real browser (Debian's chromium through Playwright) sends a message the moderation
service flags: the chat shows the notice naming the category, and the model never receives the text.
The app runs in-process with OpenAI moderation pointed at the local fake service."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.engines import RecordingEngine
from tests.fake_moderation_server import fake_moderation_server  # noqa: F401

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="apt-get install -y chromium")]


def test_a_flagged_message_in_the_browser_shows_the_notice(launch_app, fake_moderation_server, monkeypatch,  # noqa: F811
                                                           tmp_path):
    from playwright.sync_api import expect, sync_playwright

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-browser-moderation-key")
    monkeypatch.setenv("OPENAI_BASE_URL", fake_moderation_server.base_url)
    fake_moderation_server.flag("burn it all down", ["violence"])
    engine = RecordingEngine("Rec")
    url, _ = launch_app(["--moderation", "openai"], engines={"Rec": engine})

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(url)
            box = page.locator("#chat-input textarea")
            box.fill("Let's burn it all down tonight")
            page.locator("#chat-send").click()
            chatbot = page.locator("#chatbot")
            expect(chatbot).to_contain_text("flagged by the content moderation check", timeout=30_000)
            expect(chatbot).to_contain_text("(violence)")
            expect(box).to_have_value("")  # the box is ready for the next message
            page.screenshot(path=str(tmp_path / "flagged.png"), full_page=True)

            box.fill("Tell me about llamas")  # the conversation stays usable
            page.locator("#chat-send").click()
            expect(chatbot).to_contain_text("Hello from the recording engine.", timeout=30_000)
        finally:
            browser.close()

    assert len(engine.received) == 1
    assert not any("burn it all down" in text for text in engine.texts())
