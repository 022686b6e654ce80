"""Remote OpenAI-compatible endpoints as contestants, tested against a real server.

A session fixture saves the embedded SmolLM2 as a plain checkpoint and starts ``transformers serve``
on it (offline, 127.0.0.1, a subprocess). Most tests reach it through ``Gateway``
(tests/remote_servers.py), a small HTTP front that checks the bearer key, forwards the real stream
and injects faults (429, malformed or cut streams, hangs), and records whether the client hung up.

Covered: a streamed chat through the app with only an endpoint (no local model), parameters
passing through, Stop closing the stream (the gateway sees the hang-up and the sequential server
is free again at once), a local and a remote reply streaming side by side then a vote, the
server killed mid-stream (a clean error in that reply while the local reply finishes), a wrong or
missing key (the 401 message; the key in no log, UI text or stored row), 429, 5xx, timeouts,
malformed / cut / error streams, a server refusing stream_options, the start-up health check,
moderation in front of a remote model, and the client-side context budget.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time

import pytest
from gradio_client import Client

from moderation import ModerationResult, NoModerator
from tests.fake_moderation_server import fake_moderation_server  # noqa: F401
from tests.remote_servers import Gateway, TransformersServe, save_embedded_checkpoint
from vicuna_demo.services.chat import ChatService, TurnContext
from vicuna_demo.config import ConfigError, EndpointSpec
from vicuna_demo.engines.protocol import EngineError, PromptTooLong, SamplingParams
from vicuna_demo.engines.remote import RemoteEngine, start_remote_engines
from vicuna_demo.data.storage import open_store

KEY = "sk-remote-8fQ2mVx7Lr3Tn9Wp5Yc1Zb6Kd4Hs0JgA"       # what the gateway accepts
WRONG_KEY = "sk-remote-WRONG3Mn8Bv5Cx2Zl7Kj4Hg1Fd6Sa9Q"   # a plausible but refused key
KEY_VAR = "VICUNA_TEST_REMOTE_KEY"
CURSOR = "▌"
GREEDY = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=12)
EOS_ID = 2   # SmolLM2's <|im_end|>; a logit_bias on it keeps the real server generating
TRANSPORT_LOGGERS = ("openai", "httpx", "httpx2", "httpcore", "httpcore2", "vicuna_demo", "gradio")


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, embedded_loaded):
    """The embedded model saved as a folder ``transformers serve`` can load offline."""
    return save_embedded_checkpoint(embedded_loaded, tmp_path_factory.mktemp("smollm2-checkpoint"))


@pytest.fixture(scope="session")
def serve(checkpoint, tmp_path_factory):
    """One ``transformers serve`` for the session."""
    server = TransformersServe(checkpoint, tmp_path_factory.mktemp("serve") / "serve.log").start()
    yield server
    server.stop()


@pytest.fixture
def gateway(serve):
    gw = Gateway(serve.base_url, key=KEY).start()
    yield gw
    gw.stop()


@pytest.fixture
def spec(gateway, serve, monkeypatch):
    """An endpoint spec for the real server behind the gateway, with its key in the environment."""
    monkeypatch.setenv(KEY_VAR, KEY)
    return EndpointSpec(name="Smol-remote", base_url=gateway.base_url, model=serve.model, key_env=KEY_VAR)


@pytest.fixture
def start_app(launch_app):
    """launch_app, plus closing the remote engines the app started (launch_app leaves engines to their owner)."""
    runtimes = []

    def start(argv, engines=None):
        url, runtime = launch_app(argv, engines=engines)
        runtimes.append(runtime)
        return url, runtime

    yield start
    for runtime in runtimes:
        for engine in runtime.engines.values():
            if isinstance(engine, RemoteEngine):
                engine.close()


@pytest.fixture
def make_engine():
    """make_engine(spec, **kwargs) -> a RemoteEngine closed after the test."""
    made = []

    def make(spec, **kwargs):
        made.append(RemoteEngine(spec, **kwargs))
        return made[-1]

    yield make
    for engine in made:
        engine.close()


def endpoint_arg(spec: EndpointSpec, **extra) -> str:
    fields = {"name": spec.name, "base_url": spec.base_url, "model": spec.model, "key_env": spec.key_env, **extra}
    return ",".join(f"{k}={v}" for k, v in fields.items() if v is not None)


def ask(engine, text, params=GREEDY):
    """-> (text, stats) of one reply, or raise EngineError."""
    reply = engine.stream(engine.prepare([{"role": "user", "content": text}], params), params)
    return "".join(reply), reply.stats


def flatten(chatbot):
    def text(content):
        if isinstance(content, str):
            return content
        return "".join(block.get("text", "") for block in content if isinstance(block, dict))
    return [(m["role"], text(m["content"])) for m in chatbot]


def last_reply(chatbot) -> str:
    return [t for role, t in flatten(chatbot) if role == "assistant"][-1]


def usage_tokens(record) -> int:
    """completion_tokens of the usage the server sent at the end of a forwarded stream."""
    for event in reversed(record.events):
        data = json.loads(event.removeprefix("data: "))
        if data.get("usage"):
            return data["usage"]["completion_tokens"]
    raise AssertionError("the server sent no usage")


def wait_for(predicate, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


# -- through the app ------------------------------------------------------------------------------
def test_app_with_only_an_endpoint_streams_a_chat_reply_with_its_statistics(start_app, spec, gateway):
    url, runtime = start_app(["--endpoint", endpoint_arg(spec, max_tokens=12, note="chatml by the server")])
    assert runtime.service.model_names() == ["Smol-remote"]          # no local model was loaded
    client = Client(url, verbose=False)

    job = client.submit("What is the capital of France?", "Smol-remote", "", 0.0, 1.0, 256, api_name="/chat")
    chatbot, _box, notice = job.result(timeout=180)

    assert notice == ""
    reply = last_reply(chatbot)
    assert "Paris" in reply
    assert "first token" in reply and "tok/s" in reply               # the statistics line under the reply
    partial = {last_reply(out[0]) for out in job.outputs() if any(r == "assistant" for r, _ in flatten(out[0]))}
    assert len(partial) >= 4                                          # it arrived piece by piece
    sent = gateway.chat_requests()[-1].body
    assert sent["model"] == spec.model and sent["stream"] is True
    assert sent["temperature"] == 0.0 and sent["top_p"] == 1.0
    assert sent["max_tokens"] == 12                                   # the visitor's 256, capped by max_tokens=
    assert sent["messages"] == [{"role": "user", "content": "What is the capital of France?"}]
    assert sent["stream_options"] == {"include_usage": True}
    [row] = runtime.store.turns()
    assert (row.model, row.template, row.finish_reason) == ("Smol-remote", "remote: chatml by the server", "stop")
    assert row.n_tokens == usage_tokens(gateway.chat_requests()[-1])  # the server's count, not ours
    assert row.ttft_s > 0 and row.tok_s > 0 and "Paris" in row.reply


def test_stop_closes_the_remote_stream_and_frees_the_server(start_app, spec, gateway, make_engine):
    url, runtime = start_app(["--endpoint", endpoint_arg(spec), "--max-new-tokens-limit", "4096"])
    client = Client(url, verbose=False)
    gateway.add_to_next_body({"logit_bias": {str(EOS_ID): -100.0}})   # no end of sentence: 4096 tokens unless stopped

    job = client.submit("Count from 1 to 5000.", "Smol-remote", "", 0.0, 1.0, 4096, api_name="/chat")
    wait_for(lambda: len(gateway.chat_requests()) == 1 and len(gateway.chat_requests()[0].events) >= 4, 120,
             "the reply to stream")
    client.predict(api_name="/stop")
    chatbot, _box, _notice = job.result(timeout=30)

    record = gateway.chat_requests()[0]
    wait_for(lambda: record.client_closed, 30, "the gateway to see the client hang up")
    assert not record.completed
    [row] = runtime.store.turns()
    assert row.finish_reason == "cancelled" and 0 < row.n_tokens < 200
    assert "stopped" in last_reply(chatbot)
    # transformers serve generates one request at a time: a new reply only starts at once because
    # the stopped one was abandoned (4096 tokens would take minutes on this CPU)
    started = time.monotonic()
    text, stats = ask(make_engine(spec), "Say hi.", SamplingParams(temperature=0.0, max_new_tokens=3))
    assert stats.finish_reason in ("stop", "length") and time.monotonic() - started < 60


def test_a_wrong_key_gives_the_401_message_and_the_key_appears_nowhere(start_app, spec, gateway, monkeypatch,
                                                                       caplog):
    for name in TRANSPORT_LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name)
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("VICUNA_TEST_WRONG_KEY", WRONG_KEY)
    monkeypatch.delenv("VICUNA_TEST_UNSET_KEY", raising=False)
    wrong = endpoint_arg(spec, name="Wrong-key", key_env="VICUNA_TEST_WRONG_KEY")
    missing = endpoint_arg(spec, name="Missing-key", key_env="VICUNA_TEST_UNSET_KEY")
    url, runtime = start_app(["--endpoint", wrong, "--endpoint", missing])
    client = Client(url, verbose=False)

    chatbot, _box, _notice = client.predict("Hello?", "Wrong-key", "", 0.7, 1.0, 32, api_name="/chat")
    wrong_reply = last_reply(chatbot)
    assert f"Wrong-key at {gateway.base_url} refused the API key (401 Unauthorized)" in wrong_reply
    assert "VICUNA_TEST_WRONG_KEY" in wrong_reply
    assert gateway.requests[-1].authorized is False                 # the wrong key really was sent and refused

    chatbot, _box, _notice = client.predict("Hello?", "Missing-key", "", 0.7, 1.0, 32, api_name="/chat")
    missing_reply = last_reply(chatbot)
    assert "VICUNA_TEST_UNSET_KEY" in missing_reply and "is not set" in missing_reply
    assert [(r.path, r.authorized) for r in gateway.chat_requests()] == [("/v1/chat/completions", False)]
    start_up = [r.getMessage() for r in caplog.records if r.name == "vicuna_demo.engines.remote"]
    assert any("VICUNA_TEST_UNSET_KEY" in m and "is not set" in m for m in start_up)

    rows = runtime.store.turns()
    assert [(r.model, r.finish_reason) for r in rows] == [("Wrong-key", "error"), ("Missing-key", "error")]
    assert "401" in rows[0].error
    everything = "\n".join([wrong_reply, missing_reply, caplog.text, *(r.getMessage() for r in caplog.records),
                            *(str(r.error) + r.reply for r in rows)])
    assert any(r.name.startswith("openai") for r in caplog.records)   # the client's own debug log was captured
    assert WRONG_KEY not in everything and KEY not in everything
    assert WRONG_KEY[10:] not in everything                           # not even in part


def test_a_flagged_message_never_reaches_the_remote_model(start_app, spec, gateway, fake_moderation_server,
                                                          monkeypatch):
    moderation_key = "sk-moderation-9Hq3Lw7Tz2Vb5Nc8Xm4Rk1Pd6Fs0GjY"
    monkeypatch.setenv("OPENAI_API_KEY", moderation_key)
    monkeypatch.setenv("OPENAI_BASE_URL", fake_moderation_server.base_url)
    fake_moderation_server.flag("storm the village", ["violence"])
    url, runtime = start_app(["--endpoint", endpoint_arg(spec, max_tokens=4), "--moderation", "openai"])
    client = Client(url, verbose=False)

    chatbot, _box, _notice = client.predict("How do I storm the village?", "Smol-remote", "", 0.0, 1.0, 16,
                                            api_name="/chat")
    assert "violence" in last_reply(chatbot)
    assert gateway.chat_requests() == []
    chatbot, _box, notice = client.predict("Say hello.", "Smol-remote", "", 0.0, 1.0, 16, api_name="/chat")
    assert notice == "" and gateway.chat_requests()[-1].authorized     # the endpoint got its own key, not OpenAI's
    assert [r.moderation for r in runtime.store.turns()] == ["flagged", "passed"]


# -- side by side ---------------------------------------------------------------------------------
def test_local_and_remote_stream_side_by_side_then_votes_are_stored(start_app, spec, gateway, embedded_engine):
    local = embedded_engine.name
    url, runtime = start_app(["--endpoint", endpoint_arg(spec)], engines={local: embedded_engine})
    assert runtime.service.model_names() == [local, "Smol-remote"]
    client = Client(url, verbose=False)

    # named comparison: local on side A, remote on side B, both streaming in the same event
    job = client.submit("Name five colours and say one thing about each.", local, "Smol-remote",
                        0.0, 1.0, 64, 0.0, 1.0, 24, api_name="/compare_send")
    chat_a, chat_b, _reveal, notice, _box = job.result(timeout=240)
    assert notice == ""
    both = [o for o in job.outputs() if last_reply(o[0]).endswith(CURSOR) and last_reply(o[1]).endswith(CURSOR)
            and last_reply(o[0]) != CURSOR and last_reply(o[1]) != CURSOR]
    assert both, "the local and the remote reply did not stream at the same time"
    assert "tok/s" in last_reply(chat_a) and "tok/s" in last_reply(chat_b)
    assert gateway.chat_requests()[-1].body["max_tokens"] == 24     # side B's own parameters reached the server
    client.predict("👉 B is better", api_name="/compare_vote")
    assert runtime.store.battles(anony_only=False) == [(local, "Smol-remote", "model_b")]

    # anonymous arena: with two models the draw must pit the local one against the remote one
    job = client.submit("Say hello.", 0.0, 1.0, 16, api_name="/arena_send")
    chat_a, chat_b, reveal, notice, _box = job.result(timeout=240)
    assert notice == "" and local not in str(job.outputs()) and "Smol-remote" not in str(job.outputs())
    *_, reveal, _notice, _box = client.predict("tie", api_name="/arena_vote")
    votes = runtime.store.vote_rows()
    assert [v["anony"] for v in votes] == [False, True]
    assert {votes[1]["model_a"], votes[1]["model_b"]} == {local, "Smol-remote"}
    assert f"Model A: {votes[1]['model_a']} · Model B: {votes[1]['model_b']}" in reveal
    sides = {(t.model, t.side, t.finish_reason in ("stop", "length")) for t in runtime.store.turns()}
    assert {(local, "a", True), ("Smol-remote", "b", True)} <= sides


def run_turn(service, model, text, params, ctx, updates, done_at):
    for update in service.reply(model, [{"role": "user", "content": text}], params, ModerationResult.off(), ctx):
        updates.append((time.monotonic(), update.reply, update.status, update.notice, update.done))
    done_at[model] = time.monotonic()


def test_server_killed_mid_stream_errors_that_reply_while_the_local_reply_finishes(
        checkpoint, embedded_engine, make_engine, tmp_path):
    server = TransformersServe(checkpoint, tmp_path / "doomed.log").start()
    try:
        remote = make_engine(EndpointSpec(name="Doomed", base_url=server.base_url, model=server.model))
        store = open_store(tmp_path / "logs")
        service = ChatService({embedded_engine.name: embedded_engine, remote.name: remote}, NoModerator(), store)
        updates = {embedded_engine.name: [], remote.name: []}
        done_at: dict = {}
        jobs = [(embedded_engine.name, "Write a short story about a llama.", 96, "a"),
                (remote.name, "Write a short story about a llama.", 512, "b")]
        threads = [threading.Thread(target=run_turn, args=(
            service, name, text, SamplingParams(temperature=0.0, max_new_tokens=n),
            TurnContext(conversation_id=f"c-{side}", turn_index=1, client_hash="tester", battle_id="b1", side=side),
            updates[name], done_at)) for name, text, n, side in jobs]
        for t in threads:
            t.start()
        wait_for(lambda: any(reply for _, reply, *_ in updates[remote.name]), 120, "the remote reply to stream")
        server.kill()
        killed_at = time.monotonic()
        for t in threads:
            t.join(timeout=240)
    finally:
        server.stop()

    _, partial, status, notice, done = updates[remote.name][-1]
    assert done and status == "error"
    assert "The connection to Doomed at" in notice and "broke in the middle of the reply" in notice
    assert partial.strip()                                              # what arrived before the break is kept
    _, local_reply, local_status, _, _ = updates[embedded_engine.name][-1]
    assert local_status == "done" and local_reply.strip()
    assert done_at[embedded_engine.name] > killed_at                     # it was still streaming at the kill
    rows = {r.model: r for r in store.turns()}
    assert rows["Doomed"].finish_reason == "error" and "broke" in rows["Doomed"].error
    assert rows[embedded_engine.name].finish_reason in ("stop", "length")
    store.close()


# -- faults, one reply each -----------------------------------------------------------------------
def test_429_names_the_endpoint_and_the_retry_delay_once_the_retries_are_spent(spec, gateway, make_engine):
    gateway.fail_next(429, retry_after=7)
    with pytest.raises(EngineError) as caught:
        ask(make_engine(dataclasses.replace(spec, retries=0)), "Hi")
    assert str(caught.value) == (f"Smol-remote at {gateway.base_url} is rate limiting requests or is overloaded "
                                 "(429 Too Many Requests). Please retry in 7 s.")


def test_429_and_5xx_are_retried_after_retry_after_and_the_reply_comes(spec, gateway, make_engine):
    gateway.fail_next(429, retry_after=1)
    gateway.fail_next(503, message="Model is loading")
    engine = make_engine(spec)
    started = time.monotonic()
    text, stats = ask(engine, "What is the capital of France?")
    assert "Paris" in text and stats.finish_reason in ("stop", "length")
    assert time.monotonic() - started >= 1.0                             # the server's Retry-After was honoured
    assert [r.status for r in gateway.chat_requests()] == [429, 503, 200] and engine.retried == 2


def test_server_error_and_unreachable_endpoint_give_clear_messages(spec, gateway, make_engine):
    gateway.fail_next(503, message="Model is loading")
    with pytest.raises(EngineError, match=r"Smol-remote at .* failed with an error \(503\): Model is loading"):
        ask(make_engine(dataclasses.replace(spec, retries=0)), "Hi")
    down = make_engine(EndpointSpec(name="Down", base_url="http://127.0.0.1:9/v1", model="m", retries=0))
    with pytest.raises(EngineError, match=r"Cannot reach Down at http://127.0.0.1:9/v1 \(ConnectError\)"):
        ask(down, "Hi")


def test_a_silent_server_times_out_with_a_message(spec, gateway, make_engine):
    gateway.hang_next(4)
    started = time.monotonic()
    with pytest.raises(EngineError, match=r"Smol-remote at .* did not answer within 1 s"):
        ask(make_engine(dataclasses.replace(spec, retries=0), timeout_s=1), "Hi")
    assert time.monotonic() - started < 4


@pytest.mark.parametrize("fault, message", [
    ("{not json", "sent a malformed stream chunk (not valid JSON)"),
    ('{"id": "x", "object": "chat.completion.chunk", "choices": "none"}', "malformed stream: a chunk without choices"),
    ('{"id": "x", "choices": [{"index": 0, "delta": {"content": 42}}]}', "malformed stream: delta.content is not text"),
    ('{"error": "CUDA out of memory"}', "reported an error in the middle of the reply: CUDA out of memory"),
    (None, "ended before the reply was complete (no finish_reason)"),
])
def test_a_broken_stream_stops_the_reply_with_a_clear_message(spec, gateway, make_engine, fault, message):
    if fault is None:
        gateway.cut_next(after_events=3)
    else:
        gateway.malform_next(after_events=3, data=fault)
    engine = make_engine(spec)
    reply = engine.stream(engine.prepare([{"role": "user", "content": "Tell me about llamas."}], GREEDY), GREEDY)
    received = []
    with pytest.raises(EngineError) as caught:
        for delta in reply:
            received.append(delta)
    assert str(caught.value).startswith(f"Smol-remote at {gateway.base_url}")
    assert message in str(caught.value)
    assert received                                                    # the good chunks before it were shown
    assert reply.stats.finish_reason == "error" and reply.stats.error == str(caught.value)


def test_a_server_refusing_stream_options_is_asked_again_without_them(spec, gateway, make_engine):
    gateway.refuse_stream_options()
    engine = make_engine(spec)
    for _ in range(2):
        text, stats = ask(engine, "What is the capital of France?")
        assert "Paris" in text and stats.finish_reason in ("stop", "length")
        assert stats.n_tokens >= 5 and stats.tok_s and stats.ttft_s     # counted from the chunks
    statuses = [(r.status, "stream_options" in r.body) for r in gateway.chat_requests()]
    assert statuses == [(400, True), (200, False), (200, False)]       # refused once, then never sent again


# -- start-up, configuration, context -------------------------------------------------------------
def test_start_up_check_logs_unreachable_endpoints_and_never_refuses(spec, gateway, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="vicuna_demo.engines.remote")
    monkeypatch.delenv("VICUNA_TEST_UNSET_KEY", raising=False)
    specs = [spec,
             EndpointSpec(name="Down", base_url="http://127.0.0.1:9/v1", model="m"),
             EndpointSpec(name="Typo", base_url=gateway.base_url, model="no/such-model", key_env=KEY_VAR),
             EndpointSpec(name="Keyless", base_url=gateway.base_url, model=spec.model, key_env="VICUNA_TEST_UNSET_KEY")]
    engines = start_remote_engines(specs)
    try:
        assert list(engines) == ["Smol-remote", "Down", "Typo", "Keyless"]
        ok = [r.getMessage() for r in caplog.records if r.levelname == "INFO"]
        assert ok == [f"start-up check: Smol-remote at {gateway.base_url} is reachable and serves {spec.model!r}."]
        assert sum(r.levelname == "WARNING" for r in caplog.records) == 3
        text = caplog.text
        assert "Cannot reach Down at http://127.0.0.1:9/v1" in text
        assert "does not list model 'no/such-model'" in text
        assert "VICUNA_TEST_UNSET_KEY (key_env= of its --endpoint) is not set" in text
        assert [r.path for r in gateway.requests] == ["/v1/models", "/v1/models"]   # GET /models, nothing else
    finally:
        for engine in engines.values():
            engine.close()


def test_endpoint_spec_reads_limits_and_refuses_keys_on_the_command_line():
    spec = EndpointSpec.parse("name=Big,base_url=http://gpu:8000/v1,model=org/m,key_env=K,max_tokens=512,"
                              "ctx=4096,timeout=30,note=vicuna template")
    assert (spec.max_tokens, spec.ctx, spec.timeout, spec.note) == (512, 4096, 30.0, "vicuna template")
    with pytest.raises(ConfigError, match="never put a key on the command line"):
        EndpointSpec.parse("name=Big,base_url=http://gpu:8000/v1,model=org/m,api_key=sk-123")
    with pytest.raises(ConfigError, match="cannot read 'ctx=lots'"):
        EndpointSpec.parse("name=Big,base_url=http://gpu:8000/v1,model=org/m,ctx=lots")
    with pytest.raises(ConfigError, match="base_url must start with http:// or https://"):
        EndpointSpec.parse("name=Big,base_url=gpu:8000/v1,model=org/m")


def test_context_budget_drops_oldest_exchanges_but_keeps_the_system_prompt(make_engine):
    engine = make_engine(EndpointSpec(name="Small", base_url="http://127.0.0.1:9/v1", model="m", ctx=200))
    params = SamplingParams(max_new_tokens=100)        # leaves 100 tokens = 300 characters for the conversation
    old = [{"role": "user", "content": "u" * 100}, {"role": "assistant", "content": "a" * 100}]
    messages = [{"role": "system", "content": "Be brief."}, *old, *old, {"role": "user", "content": "last?"}]
    prompt = engine.prepare(messages, params)
    assert prompt.dropped_turns == 1
    assert prompt.messages == (messages[0], *old, messages[-1])
    with pytest.raises(PromptTooLong, match="too long for Small"):
        engine.prepare([{"role": "user", "content": "x" * 301}], params)
    # without ctx= nothing is dropped, and an empty system prompt leaves the server's default in place
    plain = make_engine(EndpointSpec(name="Plain", base_url="http://127.0.0.1:9/v1", model="m", max_tokens=50))
    prompt = plain.prepare([{"role": "system", "content": " "}, *old * 20, {"role": "user", "content": "q"}], params)
    assert prompt.dropped_turns == 0 and prompt.messages[0]["role"] == "user" and len(prompt.messages) == 41
    assert plain.max_tokens(params) == 50


def test_a_repetition_penalty_reaches_the_server_only_when_set_and_a_refusal_is_one_clear_line(spec, gateway,
                                                                                              make_engine):
    """Sent through the real openai client as ``repetition_penalty`` in the body (vLLM, SGLang, TGI read it); never
    at 1.0 (off). ``transformers serve`` refuses unknown fields (422), as OpenAI does (400): one clear line."""
    engine = make_engine(spec)
    text, _ = ask(engine, "What is the capital of France?")
    assert "Paris" in text and "repetition_penalty" not in gateway.chat_requests()[-1].body
    with pytest.raises(EngineError) as caught:
        ask(engine, "What is the capital of France?", dataclasses.replace(GREEDY, repetition_penalty=1.3))
    request = gateway.chat_requests()[-1]
    assert request.body["repetition_penalty"] == 1.3 and request.status in (400, 422)
    assert str(caught.value).startswith(f"Smol-remote at {gateway.base_url} does not accept a repetition penalty")
    assert "set it to 1.0 for this model" in str(caught.value)


# -- an endpoint as a real service: its concurrency limit, 429s and Retry-After ----------------------
def test_an_endpoint_never_gets_more_than_its_concurrency_and_a_429_lowers_the_limit():
    from tests.judge_server import JudgeServer
    with JudgeServer(lambda m: "a slow answer of several words", delay_s=0.05, max_concurrent=3,
                     retry_after=0.1) as server:
        engine = RemoteEngine(EndpointSpec.parse(server.endpoint("Slow", concurrency=2)))
        try:
            replies = [engine.stream(engine.prepare([{"role": "user", "content": f"q{i}"}], GREEDY), GREEDY)
                       for i in range(6)]
            assert ["".join(r) for r in replies] == ["a slow answer of several words"] * 6
            assert server.peak == 2 and server.refused[429] == 0
        finally:
            engine.close()
        engine = RemoteEngine(EndpointSpec.parse(server.endpoint("Eager", concurrency=10)))
        try:
            replies = [engine.stream(engine.prepare([{"role": "user", "content": f"q{i}"}], GREEDY), GREEDY)
                       for i in range(10)]
            assert all("".join(r) == "a slow answer of several words" for r in replies)   # every one, after 429s
            assert server.refused[429] and server.peak == 3 and engine._slots.limit < 10   # lowered, creeping up
        finally:
            engine.close()


def test_retry_after_is_read_as_seconds_or_an_http_date():
    import email.utils
    from types import SimpleNamespace
    from vicuna_demo.engines.remote import retry_after_s
    assert retry_after_s(SimpleNamespace(headers={"retry-after": "7"})) == 7.0
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < retry_after_s(SimpleNamespace(headers={"retry-after": later})) <= 31
    assert retry_after_s(SimpleNamespace(headers={})) is None
    assert retry_after_s(SimpleNamespace(headers={"retry-after": "soon"})) is None
