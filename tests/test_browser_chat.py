"""A visitor in a real browser: Debian's chromium, driven by Playwright, chats with the embedded SmolLM2.

The message is typed and sent; the box empties at once; the reply is seen growing in several steps
(streaming reaches the page, not only the API), then the statistics line with tokens/s appears under
it. Stop is lit only while a reply streams. A second, long reply is halted with the Stop button and
marked as stopped. The chatbot carries no floating label that could cover its text when scrolled. The app runs in-process over the real
engine. scripts/test.sh installs chromium (apt-get install -y chromium) when it is missing.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
STATS = re.compile(r"\d+ tokens · first token \d+\.\d+ s · \d+\.\d+ tok/s")

pytestmark = pytest.mark.browser


def test_typed_message_streams_a_reply_with_the_tokens_per_second_line(launch_app, embedded_engine, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    assert Path(CHROMIUM).exists(), "chromium is missing: apt-get install -y chromium (scripts/test.sh does it)"
    url, runtime = launch_app(["--rate-limit", "0", "--max-new-tokens", "256"],
                              engines={embedded_engine.name: embedded_engine})

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(url)
            chatbot = page.locator("#chatbot")
            box = page.locator("#chat-input textarea")
            stop = page.locator("#chat-stop")
            assert stop.is_disabled()  # nothing generates yet
            assert chatbot.get_by_text("Conversation", exact=True).count() == 0  # no label over the text
            box.fill("Write a haiku about the sea.")
            page.locator("#chat-send").click()

            seen: list[str] = []  # the chat's text, sampled while the reply streams
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                text = chatbot.inner_text()
                if not seen or text != seen[-1]:
                    seen.append(text)
                if STATS.search(text):
                    break
                time.sleep(0.05)
            final = chatbot.inner_text()
            page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
            page.wait_for_function("() => document.querySelector('#chat-stop').disabled", timeout=10_000)
            assert STATS.search(final), final
            growing = [t for t in seen if "Write a haiku about the sea." in t and not STATS.search(t)]
            assert len({len(t) for t in growing}) >= 3, f"the reply did not stream in the page: {seen}"
            assert final.index("Write a haiku about the sea.") < STATS.search(final).start()
            expect(box).to_have_value("")

            reply = runtime.store.turns()[-1].reply
            assert reply.strip() and reply.splitlines()[0].strip() in final

            # a long reply, halted with Stop
            box.fill("Write a long story about a dragon who learns to cook, in ten paragraphs.")
            page.locator("#chat-send").click()
            expect(chatbot).to_contain_text("▌", timeout=60_000)  # streaming has begun
            page.wait_for_function(  # the first words are there (stopped before them, no reply bubble is left)
                """() => { const bots = document.querySelectorAll('#chatbot [data-testid="bot"]');
                           return bots.length == 2 && bots[1].innerText.replace('▌', '').trim().length > 0; }""",
                timeout=60_000)
            expect(stop).to_be_enabled(timeout=10_000)
            stop.click()
            expect(chatbot).to_contain_text("stopped", timeout=30_000)
            expect(chatbot).not_to_contain_text("▌")
            expect(stop).to_be_disabled()
        finally:
            browser.close()

    row = runtime.store.turns()[-1]
    assert row.finish_reason == "cancelled" and row.n_tokens < 256
