"""The comparison tabs and the leaderboard in the running app, driven through gradio_client.

The real app is launched in-process (``launch_app``) with scripted engines that record what they
receive (fast, exact), and once with the real embedded SmolLM2 as two model entries (its own ChatML
template against vicuna_v1.1). Covers: a full anonymous round (two replies streaming at the same
time, names absent from the API output until the vote, names revealed, vote stored with anony
True), a named round, votes gated on finished replies, per-side Stop, Regenerate, Clear / New round,
moderation of both sides through the real openai SDK against a local fake service, battles that do
not count (identity leak, error, moderation), the live leaderboard, and the one-model arena message.
"""

from __future__ import annotations

import json
import time
import urllib.request

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from tests.engines import RecordingEngine
from tests.fake_moderation_server import fake_moderation_server  # noqa: F401 - a fixture
from vicuna_demo.services.arena import battle_counts, identity_words_for
from vicuna_demo.config import ConfigError, Settings
from vicuna_demo.engines.protocol import EngineError

KOALA, ALPACA = "Koala-13B", "Alpaca-7B"
KOALA_REPLY = "Paris is the capital of France and its largest city by far."
ALPACA_REPLY = "The capital city of France is Paris, on the Seine river."
CURSOR = "▌"
ANON = (0.7, 1.0, 64)                       # temperature, top_p, max tokens (one set for both sides)
NAMED = (0.2, 1.0, 64, 0.9, 0.5, 48)        # side A's set, then side B's


def text_of(content) -> str:
    if isinstance(content, str):
        return content
    return "".join(block.get("text", "") for block in content if isinstance(block, dict))


def replies(chatbot) -> list[str]:
    return [text_of(m["content"]) for m in chatbot if m["role"] == "assistant"]


def last_reply(chatbot) -> str:
    found = replies(chatbot)
    return found[-1] if found else ""


def reply_body(chatbot) -> str:
    """The last reply without its statistics line and cursor."""
    return last_reply(chatbot).split("\n\n<sub>")[0].removesuffix(CURSOR)


def engines(delay_s=0.03, koala=KOALA_REPLY, alpaca=ALPACA_REPLY, **extra):
    built = {KOALA: RecordingEngine(KOALA, koala, delay_s), ALPACA: RecordingEngine(ALPACA, alpaca, delay_s)}
    built.update(extra)
    return built


@pytest.fixture
def app(launch_app):
    """app(engines=None, argv=()) -> (client, engines, store)."""

    def start(engines_=None, argv=()):
        engines_ = engines_ if engines_ is not None else engines()
        url, runtime = launch_app(list(argv), engines=engines_)
        return Client(url, verbose=False), engines_, runtime.service.store

    return start


def arena_round(client, text="What is the capital of France?"):
    """-> (all streamed outputs, final output) of one /arena_send."""
    job = client.submit(text, *ANON, api_name="/arena_send")
    final = job.result(timeout=60)
    return job.outputs(), final


def compare_round(client, text="What is the capital of France?", model_a=KOALA, model_b=ALPACA, params=NAMED):
    job = client.submit(text, model_a, model_b, *params, api_name="/compare_send")
    final = job.result(timeout=60)
    return job.outputs(), final


# -- the anonymous arena ---------------------------------------------------------------------------

def test_anonymous_round_streams_both_sides_hides_names_until_the_vote_then_reveals_and_stores_it(app):
    client, engs, store = app(engines(delay_s=0.05))
    outputs, final = arena_round(client)
    chat_a, chat_b, reveal, notice, box = final

    # both replies streamed at the same time: some update shows both sides part-way through
    both_streaming = [o for o in outputs
                      if last_reply(o[0]).endswith(CURSOR) and last_reply(o[1]).endswith(CURSOR)
                      and reply_body(o[0]) and reply_body(o[1])]
    assert both_streaming, "the two replies did not stream concurrently"
    assert len(outputs) > 5
    # each side got the full reply of one of the two engines, and they differ
    final_replies = {reply_body(chat_a), reply_body(chat_b)}
    assert final_replies == {KOALA_REPLY, ALPACA_REPLY}
    assert "tok/s" in last_reply(chat_a) and "tok/s" in last_reply(chat_b)
    # nothing the API returned before the vote names a model
    before = json.dumps(outputs, ensure_ascii=False)
    assert KOALA not in before and ALPACA not in before
    assert "anonymous until you vote" in reveal and box == ""
    # each engine received the prompt exactly once
    for engine in engs.values():
        assert [m["content"] for m in engine.received[0] if m["role"] == "user"] == \
               ["What is the capital of France?"]
        assert len(engine.received) == 1
    assert store.count_votes() == 0

    *_, reveal, notice, _ = client.predict("👈 A is better", api_name="/arena_vote")
    model_a = KOALA if reply_body(chat_a) == KOALA_REPLY else ALPACA
    model_b = ALPACA if model_a == KOALA else KOALA
    assert f"Model A: {model_a} · Model B: {model_b}" in reveal
    assert "Thanks for voting" in notice
    [vote] = store.vote_rows()
    assert vote["anony"] is True and vote["counted"] is True and vote["not_counted_reason"] is None
    assert (vote["model_a"], vote["model_b"], vote["winner"]) == (model_a, model_b, "model_a")
    turns = {t.side: t for t in store.turns()}
    assert turns["a"].conversation_id == vote["conversation_a_id"] and turns["a"].model == model_a
    assert turns["b"].conversation_id == vote["conversation_b_id"] and turns["b"].model == model_b
    assert turns["a"].battle_id == turns["b"].battle_id == vote["battle_id"]


def test_votes_open_only_after_a_finished_round_and_count_once_per_battle(app):
    client, _, store = app()
    *_, notice, _ = client.predict("tie", api_name="/arena_vote")
    assert "Votes open once both replies have finished" in notice
    assert store.count_votes() == 0

    arena_round(client)
    client.predict("tie", api_name="/arena_vote")
    *_, notice, _ = client.predict("a", api_name="/arena_vote")
    assert "already voted" in notice
    _, (_, _, _, notice, _) = arena_round(client, "Another question?")
    assert "already voted" in notice and "New round" in notice
    assert store.count_votes() == 1

    chat_a, chat_b, reveal, *_ = client.predict(api_name="/arena_new_round")
    assert chat_a == [] and chat_b == [] and "anonymous until you vote" in reveal
    arena_round(client, "Another question?")
    client.predict("bothbad", api_name="/arena_vote")
    votes = store.vote_rows()
    assert [v["winner"] for v in votes] == ["tie", "tie (bothbad)"]
    assert votes[0]["battle_id"] != votes[1]["battle_id"]


def test_a_battle_continues_over_several_turns_on_each_side(app):
    client, engs, store = app()
    arena_round(client, "First question?")
    _, (chat_a, chat_b, *_) = arena_round(client, "Second question?")
    assert len(replies(chat_a)) == len(replies(chat_b)) == 2
    for engine in engs.values():
        second = engine.received[1]
        assert [m["content"] for m in second if m["role"] == "user"] == ["First question?", "Second question?"]
        assert second[2] == {"role": "assistant", "content": engine.reply}  # its own earlier reply
    client.predict("b", api_name="/arena_vote")
    [vote] = store.vote_rows()
    assert sorted(t.turn_index for t in store.turns(vote["conversation_a_id"])) == [1, 2]


def test_a_reply_naming_its_model_marks_the_anonymous_battle_not_counted(app):
    client, _, store = app(engines(koala="Hello! I am Koala, a chatbot trained by Berkeley."))
    arena_round(client)
    *_, reveal, notice, _ = client.predict("a", api_name="/arena_vote")
    [vote] = store.vote_rows()
    assert vote["counted"] is False and vote["not_counted_reason"] == "identity_leak"
    assert "not counted" in reveal and "name away" in reveal
    assert store.battles() == []  # the leaderboard's input leaves it out


def test_an_error_on_one_side_is_shown_there_without_the_model_name_and_the_battle_is_not_counted(app):
    class BusyEngine(RecordingEngine):
        def stream(self, prompt, params):
            raise EngineError(f"Cannot reach {self.name} at http://10.9.8.7:8000/v1 (connection refused)")

    client, _, store = app({KOALA: BusyEngine(KOALA), ALPACA: RecordingEngine(ALPACA, ALPACA_REPLY)})
    outputs, (chat_a, chat_b, *_) = arena_round(client)
    busy_side, fine_side = (chat_a, chat_b) if "could not answer" in last_reply(chat_a) else (chat_b, chat_a)
    assert "Model A could not answer" in last_reply(busy_side) or "Model B could not answer" in last_reply(busy_side)
    assert reply_body(fine_side) == ALPACA_REPLY
    shown = json.dumps(outputs)
    assert KOALA not in shown and ALPACA not in shown
    assert "10.9.8.7" not in shown and "Cannot reach" not in shown  # neither the model nor its address
    client.predict("a", api_name="/arena_vote")
    [vote] = store.vote_rows()
    assert vote["counted"] is False and vote["not_counted_reason"] == "error"


def test_the_arena_tab_says_so_when_only_one_model_is_loaded(app):
    client, _, _ = app({KOALA: RecordingEngine(KOALA, KOALA_REPLY)})
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert "/arena_send" not in endpoints and "/compare_send" in endpoints
    with urllib.request.urlopen(client.src.rstrip("/") + "/config", timeout=10) as response:
        config = response.read().decode()
    assert "needs at least two models" in config and "only Koala-13B is loaded" in config
    # the side-by-side tab still compares the one model with itself
    _, (chat_a, chat_b, *_) = compare_round(client, model_a=KOALA, model_b=KOALA)
    assert reply_body(chat_a) == reply_body(chat_b) == KOALA_REPLY


def test_arena_weights_flag_keeps_a_zero_weight_model_out_and_a_bad_name_stops_the_start(app, launch_app):
    extra = RecordingEngine("Vicuna-7B", "I would rather not say.", 0.01)
    client, engs, store = app(engines(delay_s=0.01, **{"Vicuna-7B": extra}), ["--arena-weights", "vicuna-7b=0"])
    for _ in range(4):
        client.predict(api_name="/arena_new_round")
        arena_round(client)
        client.predict("tie", api_name="/arena_vote")
    assert extra.received == [] and len(engs[KOALA].received) == len(engs[ALPACA].received) == 4
    assert {frozenset((v["model_a"], v["model_b"])) for v in store.vote_rows()} == {frozenset((KOALA, ALPACA))}
    with pytest.raises(ConfigError, match="--arena-weights: no loaded model is called 'Nope'; the models are: "):
        launch_app(["--arena-weights", "Nope=2"], engines=engines())


# -- named comparison ------------------------------------------------------------------------------

def test_named_round_uses_each_sides_model_and_parameters_and_stores_a_named_vote(app):
    client, engs, store = app()
    outputs, (chat_a, chat_b, reveal, notice, box) = compare_round(client)
    assert (reply_body(chat_a), reply_body(chat_b)) == (KOALA_REPLY, ALPACA_REPLY)
    assert any(last_reply(o[0]).endswith(CURSOR) and last_reply(o[1]).endswith(CURSOR) for o in outputs)
    client.predict("👉 B is better", api_name="/compare_vote")
    [vote] = store.vote_rows()
    assert vote["anony"] is False and vote["counted"] is True
    assert (vote["model_a"], vote["model_b"], vote["winner"]) == (KOALA, ALPACA, "model_b")
    params = {t.side: t.params for t in store.turns()}
    assert params["a"] == {"temperature": 0.2, "top_p": 1.0, "max_new_tokens": 64}
    assert params["b"] == {"temperature": 0.9, "top_p": 0.5, "max_new_tokens": 48}
    assert store.battles() == [] and store.battles(anony_only=False) == [(KOALA, ALPACA, "model_b")]


def test_the_same_model_on_both_sides_gets_two_requests(app):
    client, engs, store = app()
    _, (chat_a, chat_b, *_) = compare_round(client, model_a=ALPACA, model_b=ALPACA)
    assert reply_body(chat_a) == reply_body(chat_b) == ALPACA_REPLY
    assert len(engs[ALPACA].received) == 2 and engs[KOALA].received == []
    client.predict("tie", api_name="/compare_vote")
    assert store.vote_rows()[0]["model_a"] == store.vote_rows()[0]["model_b"] == ALPACA


def test_regenerate_asks_both_sides_again_and_clear_starts_a_new_comparison(app):
    client, engs, store = app()
    compare_round(client, "Name a colour.")
    job = client.submit(*NAMED, api_name="/compare_regenerate")
    chat_a, chat_b, *_ = job.result(timeout=60)
    assert len(replies(chat_a)) == len(replies(chat_b)) == 1
    for engine in engs.values():
        assert len(engine.received) == 2 and engine.received[1] == engine.received[0]
    assert {t.turn_index for t in store.turns()} == {1}   # a regeneration is the same turn again
    chat_a, chat_b, *_ = client.predict(api_name="/compare_clear")
    assert chat_a == [] and chat_b == []
    compare_round(client, "Another one.")
    assert [m["content"] for m in engs[KOALA].received[-1] if m["role"] == "user"] == ["Another one."]


def test_changing_a_model_mid_conversation_starts_a_new_comparison(app):
    client, engs, _ = app()
    compare_round(client, "First.")
    _, (chat_a, chat_b, _, notice, _) = compare_round(client, "Second.", model_a=ALPACA, model_b=KOALA)
    assert "new comparison" in notice
    assert len(replies(chat_a)) == 1
    assert reply_body(chat_a) == ALPACA_REPLY and reply_body(chat_b) == KOALA_REPLY


def test_stop_on_one_side_stops_only_that_side(app):
    long_reply = " ".join(f"word{i}" for i in range(60))
    client, _, _ = app(engines(delay_s=0.05, koala=long_reply, alpaca="short answer here"))
    job = client.submit("Go", KOALA, ALPACA, *NAMED, api_name="/compare_send")
    deadline = time.monotonic() + 30
    while not any(reply_body(o[0]) for o in job.outputs()) and time.monotonic() < deadline:
        time.sleep(0.05)
    client.predict(api_name="/compare_stop_a")
    chat_a, chat_b, *_ = job.result(timeout=30)
    assert "stopped" in last_reply(chat_a)
    assert 0 < len(reply_body(chat_a)) < len(long_reply)
    assert reply_body(chat_b) == "short answer here"


def test_bad_input_gets_a_clear_message_and_reaches_no_engine(app):
    client, engs, _ = app()
    _, (chat_a, chat_b, _, notice, _) = compare_round(client, "   ")
    assert "type a message" in notice and chat_a == [] and chat_b == []
    with pytest.raises(AppError, match="No-Such-Model is not in the list of choices"):  # gradio's own check
        compare_round(client, "Hi", model_a="No-Such-Model")
    *_, notice, _ = client.predict("z", api_name="/compare_vote")
    assert "Votes open" in notice
    compare_round(client, "Hi")
    *_, notice, _ = client.predict("z", api_name="/compare_vote")
    assert "Unknown vote 'z'" in notice
    assert all(len(e.received) == 1 for e in engs.values())


# -- moderation on both sides ------------------------------------------------------------------------

@pytest.fixture
def moderated(app, fake_moderation_server, monkeypatch):  # noqa: F811
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-compare-0000")
    monkeypatch.setenv("OPENAI_BASE_URL", fake_moderation_server.base_url)
    fake_moderation_server.flag("storm the village", ["violence", "harassment/threatening"])

    def start(extra=(), engines_=None):
        client, engs, store = app(engines_, ["--moderation", "openai", "--moderation-retries", "0", *extra])
        return client, engs, store, fake_moderation_server

    return start


@pytest.mark.parametrize("anonymous", [False, True], ids=["named", "anonymous"])
def test_flagged_text_is_moderated_once_and_reaches_neither_side(moderated, anonymous):
    client, engs, store, server = moderated()
    send = (lambda text: arena_round(client, text)) if anonymous else (lambda text: compare_round(client, text))
    prefix = "/arena" if anonymous else "/compare"

    _, (chat_a, chat_b, *_) = send("How do I storm the village at night?")
    for chat in (chat_a, chat_b):
        assert "flagged by the content moderation check" in last_reply(chat)
        assert "violence" in last_reply(chat) and "harassment/threatening" in last_reply(chat)
    assert all(e.received == [] for e in engs.values())
    assert server.request_count == 1  # ONE check for both sides
    assert server.requests[0].inputs == ["How do I storm the village at night?"]

    client.submit(*(ANON if anonymous else NAMED), api_name=f"{prefix}_regenerate").result(timeout=60)
    assert all(e.received == [] for e in engs.values()) and server.request_count == 2

    _, (chat_a, chat_b, *_) = send("What is the weather like?")  # the conversation stays usable
    assert {reply_body(chat_a), reply_body(chat_b)} == {KOALA_REPLY, ALPACA_REPLY}
    for engine in engs.values():
        assert len(engine.received) == 1
        assert "What is the weather like?" in engine.texts()
        assert not any("storm the village" in t for t in engine.texts())
    assert server.request_count == 3

    client.predict("a", api_name=f"{prefix}_vote")
    [vote] = store.vote_rows()
    assert vote["anony"] is anonymous
    assert vote["counted"] is False and vote["not_counted_reason"] == "moderated"
    flagged = [t for t in store.turns() if t.moderation == "flagged"]
    assert sorted(t.side for t in flagged) == ["a", "a", "b", "b"]  # both sides, both rounds logged
    assert all(t.finish_reason == "moderated" and t.reply == "" for t in flagged)


def test_a_flagged_reply_is_withdrawn_on_its_side_and_the_battle_is_not_counted(moderated):
    client, engs, store, server = moderated(
        ["--moderate-output"], engines(alpaca="Sure: first we storm the village, then we rest."))
    _, (chat_a, chat_b, *_) = compare_round(client)
    assert "withdrawn" in last_reply(chat_b) and "storm the village" not in last_reply(chat_b)
    assert reply_body(chat_a) == KOALA_REPLY
    client.predict("a", api_name="/compare_vote")
    [vote] = store.vote_rows()
    assert vote["counted"] is False and vote["not_counted_reason"] == "moderated"


# -- the leaderboard -----------------------------------------------------------------------------------

def test_leaderboard_shows_the_models_after_votes_and_named_battles_only_when_asked(app):
    client, _, _ = app()
    summary, table, plot = client.predict(False, api_name="/leaderboard_refresh")
    assert "No votes yet" in summary and table["data"] == [] and plot is None

    compare_round(client)
    client.predict("a", api_name="/compare_vote")     # named: Koala beats Alpaca
    summary, table, _ = client.predict(False, api_name="/leaderboard_refresh")
    assert "No votes yet" in summary
    summary, table, plot = client.predict(True, api_name="/leaderboard_refresh")
    assert "1** counted anonymous and named battle" in summary
    assert table["headers"] == ["Rank", "Model", "Rating", "95% CI", "Battles"]
    assert [row[1] for row in table["data"]] == [KOALA, ALPACA]
    assert [row[4] for row in table["data"]] == [1, 1]
    assert plot is not None

    for _ in range(2):
        client.predict(api_name="/arena_new_round")
        arena_round(client)
        client.predict("tie", api_name="/arena_vote")
    summary, table, _ = client.predict(False, api_name="/leaderboard_refresh")
    assert "2** counted anonymous battles between **2** models" in summary
    rows = table["data"]
    assert sorted(row[1] for row in rows) == [ALPACA, KOALA] and all(row[4] == 2 for row in rows)
    assert rows[0][2] == rows[1][2] == 1000  # two ties: equal ratings


# -- the real embedded model, as two entries ------------------------------------------------------------

@pytest.fixture(scope="module")
def embedded_pair(embedded_loaded):
    """The embedded SmolLM2 twice: with its own template, and with vicuna_v1.1 under another name.

    Two LocalEngines over ONE model object: each has its own continuous-batching manager (the
    managers keep their state outside the model), so both serve at once without loading twice."""
    import dataclasses

    from conversation_templates import get_template
    from vicuna_demo.engines.local import start_engine
    vicuna = dataclasses.replace(embedded_loaded, name="SmolLM2 (vicuna_v1.1)", template=get_template("vicuna_v1.1"))
    pair = {e.name: e for e in (start_engine(embedded_loaded), start_engine(vicuna))}
    yield pair
    for engine in pair.values():
        engine.close()


def test_a_full_arena_round_with_the_embedded_model_as_two_entries(app, embedded_pair):
    client, engs, store = app(dict(embedded_pair))
    names = list(embedded_pair)
    job = client.submit("What is the capital of France?", 0.0, 1.0, 24, api_name="/arena_send")
    chat_a, chat_b, reveal, notice, _ = job.result(timeout=240)
    outputs = job.outputs()
    assert reply_body(chat_a).strip() and reply_body(chat_b).strip(), (chat_a, chat_b, notice)
    assert any(reply_body(o[0]) and reply_body(o[1]) and CURSOR in last_reply(o[0]) + last_reply(o[1])
               for o in outputs)  # replies streamed
    assert not any(name in json.dumps(outputs, ensure_ascii=False) for name in names)

    *_, reveal, _, _ = client.predict("tie", api_name="/arena_vote")
    [vote] = store.vote_rows()
    assert vote["anony"] is True and {vote["model_a"], vote["model_b"]} == set(names)
    assert f"Model A: {vote['model_a']} · Model B: {vote['model_b']}" in reveal
    turns = {t.side: t for t in store.turns()}
    templates = {turns[s].model: turns[s].template for s in "ab"}
    own = next(name for name in names if name != "SmolLM2 (vicuna_v1.1)")
    assert templates["SmolLM2 (vicuna_v1.1)"] == "vicuna_v1.1" and templates[own] != "vicuna_v1.1"
    words = identity_words_for(names, Settings().identity_words)
    expected = battle_counts(anony=True, replies=[t.reply for t in turns.values()], errored=False, moderated=False,
                             leak_words=words)
    assert (vote["counted"], vote["not_counted_reason"]) == expected

    # and a named round with the same entry on both sides: two requests in one engine's batch
    job = client.submit("Say hello.", names[0], names[0], 0.0, 1.0, 16, 0.0, 1.0, 16, api_name="/compare_send")
    chat_a, chat_b, *_ = job.result(timeout=240)
    assert reply_body(chat_a).strip() and reply_body(chat_a) == reply_body(chat_b)  # greedy: identical
    client.predict("tie", api_name="/compare_vote")
    assert [v["anony"] for v in store.vote_rows()] == [True, False]
