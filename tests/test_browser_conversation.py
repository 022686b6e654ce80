"""The chat tab's conversation tools in a real browser (Debian's chromium, driven by Playwright), over
scripted engines (tests/engines.py): the chatbot's own 🗑 icon clears the conversation the service holds
too (Regenerate brings nothing back); a reply stopped before its first token leaves the message and no
empty reply bubble; example prompts on the empty chat are sent when clicked; an edited message is answered
again with the conversation cut after it; the conversation survives a reload and downloads as JSON and
Markdown; ⏩ Continue goes on with a reply cut at the token limit.
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
    """Type ``text``, press Send and (by default) wait until its reply has finished."""
    replies = page.locator("#chatbot [data-testid='bot']").count()
    page.locator("#chat-input textarea").fill(text)
    page.locator("#chat-send").click()
    if wait_for_reply:
        page.locator("#chatbot [data-testid='bot']").nth(replies).get_by_text("tokens").wait_for()
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


def test_the_conversation_survives_a_reload_and_downloads_as_json_and_markdown(launch_app, page):
    import json
    from playwright.sync_api import expect
    url, _, engine = start(launch_app)
    page.goto(url)
    expect(page.locator("#chat-download-json")).to_be_disabled()   # nothing to download yet
    send(page, "Tell me about llamas.")
    send(page, "How tall are they?")
    page.reload()
    expect(page.locator("#chatbot [data-testid='user']")).to_have_count(2)
    assert bubbles(page, "user") == ["Tell me about llamas.", "How tall are they?"]
    assert all(REPLY in text for text in bubbles(page, "bot"))
    send(page, "What do they eat?")                    # the service holds the restored conversation
    assert [m["content"] for m in engine.received[-1] if m["role"] == "user"] == [
        "Tell me about llamas.", "How tall are they?", "What do they eat?"]

    expect(page.locator("#chat-download-json")).to_be_enabled()
    with page.expect_download() as download:
        page.locator("#chat-download-json").click()
    data = json.loads(open(download.value.path(), encoding="utf-8").read())
    assert [m["content"] for m in data["messages"]] == [
        "Tell me about llamas.", REPLY, "How tall are they?", REPLY, "What do they eat?", REPLY]
    with page.expect_download() as download:
        page.locator("#chat-download-md").click()
    markdown = open(download.value.path(), encoding="utf-8").read()
    assert markdown.count("## You") == 3 and "What do they eat?" in markdown

    page.locator("#chat-clear").click()                # a cleared conversation does not come back
    expect(page.locator("#chatbot [data-testid='user']")).to_have_count(0)
    time.sleep(0.5)
    page.reload()
    page.locator("#chat-input textarea").wait_for()
    time.sleep(1.0)
    assert bubbles(page, "user") == []
    expect(page.locator("#chat-download-json")).to_be_disabled()


def test_continue_goes_on_with_a_reply_cut_at_the_token_limit(launch_app, page):
    from playwright.sync_api import expect
    from tests.engines import TokenLimitEngine
    story = " ".join(f"w{i}" for i in range(40))
    url, _, engine = start(launch_app, TokenLimitEngine(MODEL, story, delay_s=0.1), ["--max-new-tokens", "16"])
    page.goto(url)
    go_on = page.locator("#chat-continue")
    expect(go_on).to_be_hidden()
    send(page, "Tell me a story.")
    reply = page.locator("#chatbot [data-testid='bot']")
    expect(reply).to_contain_text("16 tokens")
    expect(reply).to_contain_text("stopped at the token limit")
    expect(go_on).to_be_visible()
    go_on.click()
    expect(reply).to_contain_text("32 tokens")
    assert "w0 w1" in reply.inner_text() and "w31" in reply.inner_text() and "w32" not in reply.inner_text()
    expect(reply).to_have_count(1)                    # the same reply grew; no new bubble
    go_on.click()
    expect(reply).to_contain_text("40 tokens")
    expect(go_on).to_be_hidden()                      # finished on its own: nothing more to continue
    assert "w39" in reply.inner_text() and "token limit" not in reply.inner_text()
    assert engine.received[-1][-1] == {"role": "assistant", "content": " ".join(f"w{i}" for i in range(32)) + " "}
    send(page, "Another story.", wait_for_reply=False)   # cut again, but the button waits for the reply to end
    expect(go_on).to_be_hidden()
    expect(page.locator("#chatbot [data-testid='bot']").nth(1)).to_contain_text("16 tokens")
    expect(go_on).to_be_visible()
