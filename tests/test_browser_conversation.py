"""The chat tab's conversation tools in a real browser (Debian's chromium, driven by Playwright), over
scripted engines (tests/engines.py): the chatbot's own 🗑 icon clears the conversation the service holds
too (Regenerate brings nothing back); a reply stopped before its first token leaves the message and no
empty reply bubble.
"""

from __future__ import annotations

import shutil
import time

import pytest

from tests.engines import RecordingEngine

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
MODEL = "Rec"
REPLY = "Llamas are domesticated South American camelids."


@pytest.fixture
def browser():
    if not shutil.which(CHROMIUM):
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    page = browser.new_page()
    page.set_default_timeout(30_000)
    return page


def start(launch_app, engine=None, argv=()):
    engine = engine or RecordingEngine(MODEL, REPLY, delay_s=0.02)
    url, runtime = launch_app(["--rate-limit", "0", "--moderation", "off", *argv], engines={engine.name: engine})
    return url, runtime, engine


def send(page, text: str, wait_for_reply: bool = True) -> None:
    page.locator("#chat-input textarea").fill(text)
    page.locator("#chat-send").click()
    if wait_for_reply:
        page.locator("#chatbot [data-testid='bot']").last.get_by_text("tokens").wait_for()
        page.wait_for_function("() => document.querySelector('#chat-stop').disabled")


def bubbles(page, who: str) -> list[str]:
    return page.locator(f"#chatbot [data-testid='{who}']").all_inner_texts()


def test_the_chatbots_own_clear_icon_clears_the_conversation_the_service_holds(launch_app, page):
    from playwright.sync_api import expect
    url, _, engine = start(launch_app)
    page.goto(url)
    send(page, "Tell me about llamas.")
    page.locator("#chatbot button[aria-label='Clear']").click()
    expect(page.locator("#chatbot [data-testid='user']")).to_have_count(0)
    page.locator("#chat-regenerate").click()
    expect(page.locator("#chat-notice")).to_contain_text("There is no reply to regenerate yet.")
    time.sleep(0.5)
    assert bubbles(page, "user") == [] and bubbles(page, "bot") == []
    assert len(engine.received) == 1                  # the "deleted" exchange was not asked again
    send(page, "And alpacas?")                        # a new conversation: the old message is not in its context
    assert [m["content"] for m in engine.received[-1] if m["role"] == "user"] == ["And alpacas?"]


def test_a_reply_stopped_before_its_first_token_leaves_the_message_and_no_empty_bubble(launch_app, page):
    from playwright.sync_api import expect
    url, runtime, engine = start(launch_app, RecordingEngine(MODEL, REPLY, delay_s=1.5))
    page.goto(url)
    send(page, "Tell me about llamas.", wait_for_reply=False)
    stop = page.locator("#chat-stop")
    expect(stop).to_be_enabled()
    stop.click()
    expect(stop).to_be_disabled()
    time.sleep(0.5)
    assert bubbles(page, "user") == ["Tell me about llamas."]
    assert bubbles(page, "bot") == []                 # no "0 tokens · stopped" bubble
    assert runtime.store.turns()[-1].finish_reason == "cancelled"


def test_an_example_prompt_on_the_empty_chat_sends_it(launch_app, page):
    from playwright.sync_api import expect
    from vicuna_demo.ui.chat_tab import EXAMPLE_PROMPTS
    url, _, engine = start(launch_app)
    page.goto(url)
    example = page.locator("#chatbot").get_by_text(EXAMPLE_PROMPTS[1])
    expect(example).to_be_visible()
    example.click()
    page.locator("#chatbot [data-testid='bot']").last.get_by_text("tokens").wait_for()
    assert bubbles(page, "user") == [EXAMPLE_PROMPTS[1]]
    assert [m["content"] for m in engine.received[-1] if m["role"] == "user"] == [EXAMPLE_PROMPTS[1]]
    expect(page.locator("#chatbot").get_by_text(EXAMPLE_PROMPTS[0])).to_have_count(0)  # gone once chatting


def test_an_edited_message_is_answered_again_and_the_conversation_is_cut_after_it(launch_app, page):
    from playwright.sync_api import expect
    url, _, engine = start(launch_app)
    page.goto(url)
    send(page, "Tell me about llamas.")
    send(page, "How tall are they?")
    send(page, "What do they eat?")
    page.locator("#chatbot [data-testid='user']").nth(1).hover()
    page.locator("#chatbot button[aria-label='Edit']").nth(1).click()
    page.locator("#chatbot textarea").fill("How heavy are they?")
    page.locator("#chatbot button[aria-label='Submit']").click()
    expect(page.locator("#chatbot [data-testid='user']")).to_have_count(2)
    page.locator("#chatbot [data-testid='bot']").nth(1).get_by_text("tokens").wait_for()
    assert bubbles(page, "user") == ["Tell me about llamas.", "How heavy are they?"]
    assert [m["content"] for m in engine.received[-1] if m["role"] != "system"] == [
        "Tell me about llamas.", REPLY, "How heavy are they?"]
    page.locator("#chat-regenerate").click()          # the service holds the edited conversation too
    page.wait_for_function("() => document.querySelector('#chat-stop').disabled")
    time.sleep(0.5)
    assert [m["content"] for m in engine.received[-1] if m["role"] == "user"][-1] == "How heavy are they?"
    assert bubbles(page, "user") == ["Tell me about llamas.", "How heavy are they?"]
