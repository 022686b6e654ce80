"""A hostile visitor races two events in ONE session (one gradio_client.Client) against the running app:
a harmless message, and 0.1 s later a flagged one, on /chat, /compare_send and /arena_send (and
Regenerate during a reply). The models are a recording OpenAI-compatible server reached through the
app's real remote engine, and moderation is a local stand-in for OpenAI's API (through the real openai
SDK) that flags one word and answers in about 0.3 s, a normal round trip.

What must hold (issue 12): the model never receives the flagged text; the second event is refused with
a clear message while the first runs (one generating event per session, enforced in the services);
the first event's logged turn holds only what was moderated and sent; sent alone, the flagged message
is stored as flagged and never enters a later turn's context.
"""

from __future__ import annotations

import json
import time

import pytest
from gradio_client import Client

from tests.chat_client import chat, submit_chat, text_of
from tests.fake_moderation_server import FakeModerationServer
from tests.recording_model_server import RecordingModelServer

WORD = "nitroglow"                       # the one word the moderation stand-in flags
BUSY = "Please wait for the current reply"
BATTLE_BUSY = "Please wait for both replies"
PARAMS = (0.7, 1.0, 64)


class SlowModeration(FakeModerationServer):
    """The moderation stand-in, answering after ``delay_s`` like the real API."""

    delay_s = 0.3

    def _moderate(self, model, texts):
        time.sleep(self.delay_s)
        return super()._moderate(model, texts)


@pytest.fixture
def race_app(launch_app, monkeypatch):
    """-> (client, model server, runtime, moderation server): the app with two recording endpoints."""
    with SlowModeration() as moderation, RecordingModelServer(reply="Llamas are calm and woolly animals.",
                                                            delay_s=0.05) as models:
        moderation.flag(WORD, ["violence"])
        monkeypatch.setenv("OPENAI_API_KEY", "sk-race-0000")
        monkeypatch.setenv("OPENAI_BASE_URL", moderation.base_url)
        url, runtime = launch_app(["--moderation", "openai", "--moderation-retries", "0", "--rate-limit", "0",
                                   "--endpoint", models.endpoint("RecA", "rec-a"),
                                   "--endpoint", models.endpoint("RecB", "rec-b")], engines={})
        yield Client(url, verbose=False), models, runtime, moderation


def assert_never_sent(models: RecordingModelServer, runtime) -> None:
    assert models.requests, "the harmless messages did reach the model"
    assert not any(WORD in text for text in models.texts())
    for turn in runtime.store.turns():
        seen = json.dumps(turn.messages) + turn.reply
        if WORD in seen:
            assert turn.moderation == "flagged" and turn.reply == "" and turn.finish_reason == "moderated"
        else:
            assert turn.moderation == "passed"


def test_racing_a_flagged_chat_message_behind_a_harmless_one_never_reaches_the_model(race_app):
    client, models, runtime, _ = race_app
    for attempt in range(3):
        first = submit_chat(client, f"Tell me about llamas, part {attempt}.", "RecA", max_tokens=64)
        time.sleep(0.1)
        second = submit_chat(client, f"How do I make {WORD} at home?", "RecA", max_tokens=64)
        chatbot, _, notice = second.result(timeout=60)
        assert BUSY in notice                      # refused while the first event runs ...
        first_chatbot, _, first_notice = first.result(timeout=60)
        assert first_notice == ""
        assert WORD not in json.dumps(first_chatbot)  # ... and the first event never answered it
    assert_never_sent(models, runtime)
    assert [t.moderation for t in runtime.store.turns()] == ["passed"] * 3

    # sent alone, the flagged message is refused, stored as flagged, and left out of every later context
    flagged = chat(client, f"How do I make {WORD} at home?", "RecA")
    assert "flagged by the content moderation check" in flagged.reply
    after = chat(client, "And what do llamas eat?", "RecA")
    assert after.notice == "" and "Llamas are calm" in after.reply
    assert_never_sent(models, runtime)
    rows = runtime.store.turns()
    assert [t.moderation for t in rows] == ["passed"] * 3 + ["flagged", "passed"]
    assert not any(WORD in m["content"] for m in rows[-1].messages)


def test_regenerate_raced_against_a_running_reply_is_refused(race_app):
    client, models, runtime, _ = race_app
    chat(client, "Tell me about llamas.", "RecA")
    first = submit_chat(client, "And about alpacas?", "RecA")
    time.sleep(0.1)
    chatbot, notice = client.predict("RecA", "", *PARAMS, api_name="/regenerate")
    assert BUSY in notice
    first.result(timeout=60)
    assert len(models.requests) == 2 and len(runtime.store.turns()) == 2


@pytest.mark.parametrize("endpoint", ["/compare_send", "/arena_send"])
def test_racing_a_flagged_prompt_in_a_battle_reaches_neither_side(race_app, endpoint):
    client, models, runtime, moderation = race_app
    args = ("RecA", "RecB", *PARAMS, *PARAMS) if endpoint == "/compare_send" else PARAMS
    for attempt in range(2):
        first = client.submit(f"Tell me about llamas, part {attempt}.", *args, api_name=endpoint)
        time.sleep(0.1)
        second = client.submit(f"How do I make {WORD}?", *args, api_name=endpoint)
        chat_a, chat_b, _, notice, _ = second.result(timeout=60)
        assert BATTLE_BUSY in notice
        final = first.result(timeout=60)
        assert WORD not in json.dumps(final)
        assert final[3] == ""
    assert_never_sent(models, runtime)
    assert len(models.requests) == 4                      # both sides, both rounds
    assert {turn.side for turn in runtime.store.turns()} == {"a", "b"}

    # alone, the flagged prompt is moderated once for both sides and stays out of the next round
    before = moderation.request_count
    chat_a, chat_b, *_ = client.predict(f"How do I make {WORD}?", *args, api_name=endpoint)
    assert moderation.request_count == before + 1
    assert all("flagged by the content moderation check" in text_of(c[-1]) for c in (chat_a, chat_b))
    client.predict("What do llamas eat?", *args, api_name=endpoint)
    assert_never_sent(models, runtime)
    assert sorted(t.side for t in runtime.store.turns() if t.moderation == "flagged") == ["a", "b"]
    prefix = endpoint.removesuffix("_send")
    *_, notice, _ = client.predict("tie", api_name=f"{prefix}_vote")
    assert "Thanks for voting" in notice
    [vote] = runtime.store.vote_rows()
    assert vote["counted"] is False and vote["not_counted_reason"] == "moderated"


def test_a_vote_raced_against_a_running_round_is_refused(race_app):
    client, _, runtime, _ = race_app
    client.predict("Hello?", *PARAMS, api_name="/arena_send")
    running = client.submit("Tell me more.", *PARAMS, api_name="/arena_send")
    time.sleep(0.1)
    *_, notice, _ = client.predict("a", api_name="/arena_vote")
    assert "Votes open once both replies have finished" in notice
    running.result(timeout=60)
    *_, notice, _ = client.predict("a", api_name="/arena_vote")
    assert "Thanks for voting" in notice and runtime.store.count_votes() == 1
