"""The single-chat tab with a real model: the app launched in-process over the embedded SmolLM2's engine,
driven through gradio_client the way a browser drives it (/chat, /regenerate, /stop, /clear).

A reply streams in several steps and equals the engine's greedy reply; the statistics line sits under it;
Regenerate replaces the last reply; Clear empties the conversation; Stop, sent from the same visitor
while /chat streams, cancels the engine's request; empty input gets a message, not a crash; long
conversations show the context notice; every turn is logged in the store. Last, ``python app.py`` as a
user starts it: a subprocess serving the embedded model, with its visible note.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from gradio_client import Client

from vicuna_demo.engines.protocol import SamplingParams
from tests.chat_client import stop_app

REPO = Path(__file__).resolve().parent.parent
STATS_LINE = re.compile(r"<sub>⏱ (\d+) tokens? · first token (\d+\.\d+) s · (\d+\.\d+) tok/s(.*?)</sub>$")
LONG_ANSWER = "Write a long story about a dragon who learns to cook. Make it at least ten paragraphs."


def text_of(content) -> str:
    if isinstance(content, str):
        return content
    return "".join(block.get("text", "") for block in content if isinstance(block, dict))


def messages_of(chatbot) -> list[tuple[str, str]]:
    return [(m["role"], text_of(m["content"])) for m in chatbot]


def split_reply(body: str) -> tuple[str, str]:
    """An assistant message -> (reply text, statistics line)."""
    reply, _, stats = body.rpartition("\n\n")
    return reply, stats


@pytest.fixture
def app(launch_app, embedded_engine):
    """-> (client, runtime, model name): the app serving the real embedded engine."""
    url, runtime = launch_app(["--rate-limit", "0"], engines={embedded_engine.name: embedded_engine})
    return Client(url, verbose=False), runtime, embedded_engine.name


def chat_args(model, text, system="", temperature=0.0, max_tokens=64):
    return (text, model, system, temperature, 1.0, max_tokens)


def engine_greedy(engine, messages, max_tokens) -> str:
    """What the engine says greedily with the model's own repetition penalty: what a /chat caller that leaves the
    penalty out gets (the slider's starting value, the model's default; issue 15)."""
    params = SamplingParams(temperature=0, max_new_tokens=max_tokens,
                            repetition_penalty=engine.defaults.repetition_penalty)
    return "".join(engine.stream(engine.prepare(messages, params), params))


def test_reply_streams_in_several_steps_and_ends_with_the_stats_line(app, embedded_engine):
    client, runtime, model = app
    job = client.submit(*chat_args(model, "Write a haiku about the sea.", max_tokens=48), api_name="/chat")
    final_chatbot, box, notice = job.result(timeout=180)
    steps = [messages_of(out[0]) for out in job.outputs()]
    partial_replies = {s[-1][1] for s in steps if len(s) == 2}
    assert len(partial_replies) >= 4, "the reply did not stream"
    assert any(r.endswith("▌") for r in partial_replies)  # the typing cursor while streaming

    final = messages_of(final_chatbot)
    assert final[0] == ("user", "Write a haiku about the sea.")
    reply, stats = split_reply(final[1][1])
    match = STATS_LINE.match(stats)
    assert match, stats
    n_tokens, ttft, tok_s = int(match[1]), float(match[2]), float(match[3])
    assert 1 < n_tokens <= 48 and ttft > 0 and tok_s > 0
    assert "▌" not in final[1][1]
    assert box == "" and notice == ""
    expected = engine_greedy(embedded_engine, [{"role": "system", "content": ""},
                                               {"role": "user", "content": "Write a haiku about the sea."}], 48)
    assert reply == expected

    rows = runtime.store.turns()
    assert len(rows) == 1
    row = rows[0]
    assert (row.model, row.reply, row.n_tokens) == (model, expected, n_tokens)
    assert row.messages[-1] == {"role": "user", "content": "Write a haiku about the sea."}
    assert row.finish_reason in ("stop", "length") and row.tok_s and row.ttft_s
    assert row.params["temperature"] == 0.0 and row.params["max_new_tokens"] == 48


def test_second_turn_sends_the_history_and_is_logged_as_turn_two(app, embedded_engine):
    client, runtime, model = app
    first, _, _ = client.predict(*chat_args(model, "What is the capital of France?", max_tokens=32), api_name="/chat")
    second, _, _ = client.predict(*chat_args(model, "And of Italy?", max_tokens=32), api_name="/chat")
    roles = [r for r, _ in messages_of(second)]
    assert roles == ["user", "assistant", "user", "assistant"]
    rows = runtime.store.turns()
    assert [r.turn_index for r in rows] == [1, 2]
    assert rows[0].conversation_id == rows[1].conversation_id
    first_reply, _ = split_reply(messages_of(first)[1][1])
    assert rows[1].messages[1:] == [{"role": "user", "content": "What is the capital of France?"},
                                    {"role": "assistant", "content": first_reply},
                                    {"role": "user", "content": "And of Italy?"}]


def test_regenerate_replaces_the_last_reply(app, embedded_engine):
    client, runtime, model = app
    chatbot, _, _ = client.predict(*chat_args(model, "List three fruits and their colours.", max_tokens=48),
                                   api_name="/chat")
    long_reply, _ = split_reply(messages_of(chatbot)[1][1])
    chatbot, notice = client.predict(model, "", 0.0, 1.0, 16, api_name="/regenerate")
    final = messages_of(chatbot)
    assert [r for r, _ in final] == ["user", "assistant"]  # replaced, not appended
    short_reply, stats = split_reply(final[1][1])
    assert "16 tokens" in stats and "stopped at the token limit" in stats
    assert short_reply != long_reply and long_reply.startswith(short_reply)  # greedy: the same start, cut at 16
    assert notice == ""
    rows = runtime.store.turns()
    assert len(rows) == 2 and rows[1].reply == short_reply and rows[1].finish_reason == "length"


def test_regenerate_before_any_reply_says_so(app):
    client, _, model = app
    chatbot, notice = client.predict(model, "", 0.7, 1.0, 64, api_name="/regenerate")
    assert chatbot == [] and "no reply to regenerate" in notice


def test_clear_empties_the_conversation_and_starts_a_new_one(app):
    client, runtime, model = app
    client.predict(*chat_args(model, "What is the capital of France?", max_tokens=16), api_name="/chat")
    chatbot, notice = client.predict(api_name="/clear")
    assert chatbot == [] and notice == ""
    chatbot, _, _ = client.predict(*chat_args(model, "Hello!", max_tokens=16), api_name="/chat")
    assert [r for r, _ in messages_of(chatbot)] == ["user", "assistant"]
    rows = runtime.store.turns()
    assert rows[1].messages[1:] == [{"role": "user", "content": "Hello!"}]  # no history after Clear
    assert rows[0].conversation_id != rows[1].conversation_id


def test_stop_from_the_same_visitor_halts_the_generation(app, embedded_engine):
    client, runtime, model = app
    job = client.submit(*chat_args(model, LONG_ANSWER, max_tokens=1024), api_name="/chat")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        outs = job.outputs()
        if outs and len(outs[-1][0]) == 2 and len(text_of(outs[-1][0][1]["content"])) > 20:
            break
        time.sleep(0.05)
    else:
        pytest.fail("no reply started streaming")
    stopped_at = time.monotonic()
    client.predict(api_name="/stop")
    chatbot, _, notice = job.result(timeout=60)
    assert time.monotonic() - stopped_at < 20
    reply, stats = split_reply(messages_of(chatbot)[1][1])
    assert stats.endswith("stopped</sub>"), stats
    n_tokens = int(STATS_LINE.match(stats)[1])
    assert n_tokens < 200 and reply.strip()
    row = runtime.store.turns()[-1]
    assert row.finish_reason == "cancelled" and row.n_tokens == n_tokens
    # the engine stopped working on it, and the visitor can go on
    deadline = time.monotonic() + 5
    while embedded_engine.held_request_ids() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not embedded_engine.held_request_ids()
    chatbot, _, _ = client.predict(*chat_args(model, "What is the capital of France?", max_tokens=32),
                                   api_name="/chat")
    assert "Paris" in messages_of(chatbot)[-1][1]


@pytest.mark.parametrize("text", ["", "   \n\t  "])
def test_empty_message_gets_a_clear_message_and_no_reply(app, text):
    client, runtime, model = app
    chatbot, box, notice = client.predict(*chat_args(model, text), api_name="/chat")
    assert chatbot == []
    assert notice == "Please type a message first."
    assert runtime.store.turns() == []
    chatbot, _, notice = client.predict(*chat_args(model, "Hi", max_tokens=16), api_name="/chat")
    assert notice == "" and len(chatbot) == 2


def test_long_conversation_shows_the_context_notice_and_an_oversized_message_is_refused(
        launch_app, small_window_engine):
    url, runtime = launch_app(["--rate-limit", "0"], engines={small_window_engine.name: small_window_engine})
    client = Client(url, verbose=False)
    model = small_window_engine.name
    system = "You are a helpful assistant."
    background = "Here is some background about cats. " * 12  # about 100 tokens
    chatbot, _, _ = client.predict(*chat_args(model, background + "Summarise it.", system, max_tokens=64),
                                   api_name="/chat")
    assert "left out" not in messages_of(chatbot)[-1][1]
    chatbot, _, _ = client.predict(*chat_args(model, background + "Now name a cat.", system, max_tokens=64),
                                   api_name="/chat")
    last = messages_of(chatbot)[-1][1]
    assert "oldest 1 exchange(s) were left out" in last and "system prompt was kept" in last
    row = runtime.store.turns()[-1]
    assert row.messages[0] == {"role": "system", "content": system}
    assert [m["role"] for m in row.messages] == ["system", "user"]  # what the model really saw

    chatbot, _, _ = client.predict(*chat_args(model, "Read this. " + "The cat sat on the mat. " * 60, system),
                                   api_name="/chat")
    last = messages_of(chatbot)[-1]
    assert last[0] == "assistant" and "too long" in last[1] and "shorten" in last[1]
    assert "tok/s" not in last[1]
    assert runtime.store.turns()[-1].finish_reason == "error" and runtime.store.turns()[-1].reply == ""


# -- python app.py, as a user runs it -------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_python_app_py_serves_the_embedded_model_with_its_note(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VICUNA_DEMO_") and k != "OPENAI_API_KEY"}
    env.update(HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    log = open(tmp_path / "app.log", "w")
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--log-dir", str(tmp_path / "logs")],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "app.log").read_text()
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        else:
            pytest.fail("python app.py did not start serving within 300 s")
        page_config = httpx.get(url + "config", timeout=10).text
        assert "small offline model SmolLM2-135M-Instruct" in page_config
        client = Client(url, verbose=False)
        chatbot, _, notice = client.predict("What is the capital of France?", "SmolLM2-135M (offline)", "", 0.0,
                                            1.0, 32, api_name="/chat")
        assert notice == ""
        assert "Paris" in messages_of(chatbot)[-1][1] and "tok/s" in messages_of(chatbot)[-1][1]
    finally:
        stop_app(proc)
        log.close()
    output = (tmp_path / "app.log").read_text()
    assert "Traceback" not in output, output


def test_each_banner_shows_once_even_with_two_embedded_models(tmp_path):
    """Two embedded models each add the offline-model note; the page shows it once."""
    from moderation import NoModerator
    from tests.engines import RecordingEngine
    from vicuna_demo.config import Settings
    from vicuna_demo.data.storage import open_store
    from vicuna_demo.loading import EMBEDDED_NOTE
    from vicuna_demo.services.chat import ChatService
    from vicuna_demo.ui import build_ui
    engines = {name: RecordingEngine(name) for name in ("SmolLM2 A", "SmolLM2 B")}
    service = ChatService(engines, NoModerator(), open_store(tmp_path / "logs"))
    demo = build_ui(service, Settings(), [EMBEDDED_NOTE, EMBEDDED_NOTE, "Content moderation is OFF"])
    shown = [str(c.get("props", {}).get("value", "")) for c in demo.config["components"]]
    assert sum(EMBEDDED_NOTE in text for text in shown) == 1
    assert sum("Content moderation is OFF" in text for text in shown) == 1


def test_continue_goes_on_with_a_reply_cut_at_the_token_limit_as_the_model_would_have(app, embedded_engine):
    """/chat cut at 24 tokens, then /continue 24 more: the prompt ends inside the cut reply, so greedy decoding goes
    on where it stopped, and the reply reads as the model's uncut 48-token greedy reply does."""
    client, runtime, model = app
    question = "Explain in detail how a bicycle works."
    chatbot, _, _ = client.predict(*chat_args(model, question, max_tokens=24), api_name="/chat")
    first, stats = split_reply(messages_of(chatbot)[-1][1])
    assert "24 tokens" in stats and "stopped at the token limit" in stats
    chatbot, notice = client.predict("", 0.0, 1.0, 24, api_name="/continue")
    assert notice == "" and len(chatbot) == 2                      # the same reply, longer
    whole, stats = split_reply(messages_of(chatbot)[-1][1])
    assert whole.startswith(first) and len(whole) > len(first)
    assert re.match(r"<sub>⏱ (2[5-9]|[3-4]\d) tokens", stats), stats
    uncut = engine_greedy(embedded_engine, [{"role": "system", "content": embedded_engine.default_system},
                                            {"role": "user", "content": question}], 48).strip()
    assert whole.split()[:30] == uncut.split()[:30]
