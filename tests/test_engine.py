"""The local engine (vicuna_demo/engines/local.py) on the real embedded SmolLM2, on CPU, with each back end: the
default one (``backend="auto"``, the fast path for Llama-family models) and transformers' continuous
batching (``backend="cb"``, the fallback for every other model).

Greedy replies equal plain ``model.generate`` and are deterministic; the token limit, EOS and stop
strings end a reply with the right ``finish_reason`` (a stop string is never shown, not even in part);
``cancel`` (from the consumer, another thread, or by dropping the iterator) removes the request from
the batching manager; concurrent requests are decoded together, each getting its own greedy text; a
failure inside the model's forward pass reaches the caller as ``EngineError`` within seconds and the
engine serves again afterwards; long conversations drop their oldest turns and keep the system prompt.
The 8-bit path (bitsandbytes on CPU) is checked with a tiny random Llama.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import torch

from vicuna_demo.services.chat import ChatService, Limits, TurnContext
from vicuna_demo.config import ModelSpec
from vicuna_demo.engines.local import EngineOptions, LocalEngine, start_engine
from vicuna_demo.engines.protocol import EngineError, PromptTooLong, SamplingParams
from vicuna_demo.loading import load_model
from vicuna_demo.data.storage import NullStore
from moderation import ModerationResult, NoModerator

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three fruits and their colours.",
    "Explain in one paragraph why the sky is blue.",
]
LONG_ANSWER = "Write a long story about a dragon who learns to cook. Make it at least ten paragraphs."


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_new_tokens=n)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def ask(engine, text: str, params: SamplingParams):
    """-> (text, deltas, stats) of one streamed reply."""
    reply = engine.stream(engine.prepare(user(text), params), params)
    deltas = list(reply)
    return "".join(deltas), deltas, reply.stats


def plain_generate(loaded, prompt_ids: list[int], n: int) -> str:
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                    eos_token_id=sorted(loaded.eos_token_ids),
                                    pad_token_id=loaded.tokenizer.pad_token_id)
    return loaded.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def wait_until(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


BACKENDS = ["auto", "cb"]


@pytest.fixture(scope="module")
def cb_engine(embedded_loaded):
    """The embedded model served by transformers' continuous batching."""
    engine = LocalEngine(embedded_loaded, EngineOptions(backend="cb"))
    engine.warmup()
    yield engine
    engine.close()


@pytest.fixture(params=BACKENDS)
def engine(request, embedded_engine):
    """The shared default engine, then the continuous-batching one."""
    return embedded_engine if request.param == "auto" else request.getfixturevalue("cb_engine")


@pytest.fixture(scope="module")
def engine_with_template(embedded_loaded):
    """make(backend, **template_changes) -> another LocalEngine over the same model with a modified template."""
    made = []

    def make(backend="auto", **changes):
        template = dataclasses.replace(embedded_loaded.template, **changes)
        engine = LocalEngine(dataclasses.replace(embedded_loaded, template=template), EngineOptions(backend=backend))
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.close()


# -- correctness --------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_greedy_reply_equals_plain_generate(engine, embedded_loaded, prompt):
    params = greedy(48)
    prepared = engine.prepare(user(prompt), params)
    reply = engine.stream(prepared, params)
    text = "".join(reply)
    assert text.strip()
    assert text == plain_generate(embedded_loaded, list(prepared.payload), 48)


def test_greedy_reply_is_deterministic(embedded_engine):
    first, _, stats1 = ask(embedded_engine, PROMPTS[2], greedy(32))
    second, _, stats2 = ask(embedded_engine, PROMPTS[2], greedy(32))
    assert first == second
    assert stats1.n_tokens == stats2.n_tokens


def test_reply_streams_as_several_deltas_with_stats(engine):
    text, deltas, stats = ask(engine, PROMPTS[3], greedy(24))
    assert len([d for d in deltas if d]) >= 5
    assert stats.n_tokens >= 5
    assert stats.ttft_s is not None and 0 < stats.ttft_s < 60
    assert stats.tok_s is not None and stats.tok_s > 0
    assert "tok/s" in stats.summary() and f"{stats.n_tokens} tokens" in stats.summary()


def test_max_new_tokens_is_respected(engine):
    text, deltas, stats = ask(engine, LONG_ANSWER, greedy(12))
    assert stats.n_tokens == 12
    assert stats.finish_reason == "length"
    assert "stopped at the token limit" in stats.summary()
    assert len(deltas) <= 12 and text.strip()


def test_reply_that_ends_on_eos_reports_stop(engine):
    text, _, stats = ask(engine, PROMPTS[0], greedy(64))
    assert "Paris" in text
    assert stats.finish_reason == "stop"
    assert stats.n_tokens < 64
    assert "<|im_end|>" not in text


def test_sampling_with_temperature_gives_a_reply(engine):
    params = SamplingParams(temperature=0.9, top_p=0.9, max_new_tokens=16)
    text, _, stats = ask(engine, PROMPTS[2], params)
    assert stats.n_tokens >= 1 and stats.finish_reason in ("stop", "length")


# -- stop strings ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_stop_string_ends_the_reply_before_it(embedded_engine, engine_with_template, backend):
    full, _, full_stats = ask(embedded_engine, PROMPTS[1], greedy(48))
    words = [w for w in full.split() if len(w) >= 4 and w.isalpha()]
    stop_word = words[len(words) // 2]  # a word the model will produce, mid-reply
    engine = engine_with_template(backend, stop_strings=(stop_word,))

    text, deltas, stats = ask(engine, PROMPTS[1], greedy(48))

    assert text == full[:full.index(stop_word)]
    assert stop_word not in text and not any(stop_word in d for d in deltas)
    assert stats.finish_reason == "stop"
    assert stats.n_tokens < full_stats.n_tokens
    assert wait_until(lambda: not engine.held_request_ids(), 5)  # the back end stopped working on it too


def test_stop_string_spanning_tokens_never_shows_its_beginning(embedded_engine, engine_with_template):
    full, _, _ = ask(embedded_engine, PROMPTS[1], greedy(48))
    words = full.split(" ")
    assert len(words) >= 6
    stop = " ".join(words[3:5])  # two words: several tokens, so its start arrives first
    near_miss = words[3] + " zzzz"  # starts like text the model writes, then diverges
    engine = engine_with_template(stop_strings=(stop, near_miss))

    text, deltas, stats = ask(engine, PROMPTS[1], greedy(48))

    cut = full.index(stop)
    assert text == full[:cut]
    shown = ""
    for delta in deltas:
        shown += delta
        assert full[:cut].startswith(shown)
    assert stats.finish_reason == "stop"


def test_near_miss_stop_string_changes_nothing(embedded_engine, engine_with_template):
    full, _, full_stats = ask(embedded_engine, PROMPTS[0], greedy(48))
    engine = engine_with_template(stop_strings=(full.split()[1] + " qqqq", full[-3:] + "!!"))
    text, _, stats = ask(engine, PROMPTS[0], greedy(48))
    assert text == full
    assert stats.finish_reason == full_stats.finish_reason == "stop"


# -- cancel ---------------------------------------------------------------------------------------------

def test_cancel_ends_the_reply_early_and_frees_the_request(engine):
    params = greedy(300)
    reply = engine.stream(engine.prepare(user(LONG_ANSWER), params), params)
    deltas = []
    started = time.monotonic()
    for delta in reply:
        deltas.append(delta)
        if len(deltas) == 3:
            reply.cancel()
    assert len(deltas) <= 4
    assert reply.stats.finish_reason == "cancelled"
    assert reply.stats.n_tokens < 30
    assert time.monotonic() - started < 60
    assert wait_until(lambda: reply.request_id not in engine.held_request_ids(), 5)
    # and the engine serves the next request
    text, _, stats = ask(engine, PROMPTS[0], greedy(48))
    assert "Paris" in text and stats.finish_reason == "stop"


def test_cancel_from_another_thread_stops_a_reply_being_read(engine):
    params = greedy(300)
    reply = engine.stream(engine.prepare(user(LONG_ANSWER), params), params)
    first = threading.Event()
    threading.Thread(target=lambda: first.wait(60) and reply.cancel(), daemon=True).start()
    started = time.monotonic()
    for _ in reply:
        first.set()
    assert reply.stats.finish_reason == "cancelled"
    assert reply.stats.n_tokens < 40 and time.monotonic() - started < 60
    assert wait_until(lambda: reply.request_id not in engine.held_request_ids(), 5)


def test_dropping_the_iterator_cancels_the_request(engine):
    params = greedy(300)
    reply = engine.stream(engine.prepare(user(LONG_ANSWER), params), params)
    stream = iter(reply)
    next(stream)
    stream.close()  # the consumer went away (a closed browser tab)
    assert reply.stats.finish_reason == "cancelled"
    assert wait_until(lambda: reply.request_id not in engine.held_request_ids(), 5)


# -- concurrency ----------------------------------------------------------------------------------------

def test_concurrent_requests_are_batched_and_each_gets_its_own_text(engine):
    params = greedy(24)
    sequential = [ask(engine, p, params)[0] for p in PROMPTS]
    assert len(set(sequential)) == len(PROMPTS)

    results: dict[int, tuple] = {}
    barrier = threading.Barrier(len(PROMPTS))

    def one(i: int) -> None:
        prepared = engine.prepare(user(PROMPTS[i]), params)
        barrier.wait()
        reply = engine.stream(prepared, params)
        first_at = None
        chunks = []
        for delta in reply:
            first_at = first_at or time.monotonic()
            chunks.append(delta)
        results[i] = ("".join(chunks), first_at, time.monotonic(), reply.stats)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert sorted(results) == list(range(len(PROMPTS)))
    assert [results[i][0] for i in range(len(PROMPTS))] == sequential
    # served together, not one after another: every reply had started before any had finished
    assert max(r[1] for r in results.values()) < min(r[2] for r in results.values())


# -- failures ---------------------------------------------------------------------------------------------

class FailingEmbedding:
    """Makes calls number ``fail_on`` ... ``fail_on + times - 1`` of the model's token embedding raise: every
    back end runs it once per forward pass, so this is a failure inside a generation step."""

    def __init__(self, model, fail_on: int, times: int = 1):
        self.module = model.get_input_embeddings()
        self.original = self.module.forward
        self.fail_on, self.times, self.calls = fail_on, times, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.fail_on <= self.calls < self.fail_on + self.times:
            raise RuntimeError("injected fault in a forward pass")
        return self.original(*args, **kwargs)

    def __enter__(self):
        self.module.forward = self
        return self

    def __exit__(self, *exc):
        del self.module.forward  # back to the class's method


@pytest.mark.parametrize("fail_on", [1, 4])
def test_failure_inside_generation_reaches_the_caller_promptly_and_the_engine_recovers(
        engine, embedded_loaded, fail_on):
    params = greedy(64)
    prepared = engine.prepare(user(LONG_ANSWER), params)
    started = time.monotonic()
    with FailingEmbedding(embedded_loaded.model, fail_on=fail_on) as fault:
        reply = engine.stream(prepared, params)
        with pytest.raises(EngineError, match="injected fault"):
            for _ in reply:
                pass
    assert fault.calls >= fail_on
    assert time.monotonic() - started < 30
    assert reply.stats.finish_reason == "error" and "injected fault" in reply.stats.error
    # the engine serves again (with a fresh generation thread if the old one died)
    assert wait_until(engine.alive, 30)
    text, _, stats = ask(engine, PROMPTS[0], greedy(48))
    assert "Paris" in text and stats.finish_reason == "stop"


def test_failure_ends_every_request_in_flight(engine, embedded_loaded):
    params = greedy(200)
    prepared = [engine.prepare(user(p), params) for p in (LONG_ANSWER, PROMPTS[3])]
    outcomes: dict[int, BaseException | None] = {}

    def read(reply, i):
        try:
            for _ in reply:
                pass
            outcomes[i] = None
        except BaseException as exc:  # noqa: BLE001
            outcomes[i] = exc

    with FailingEmbedding(embedded_loaded.model, fail_on=6, times=10**6):
        replies = [engine.stream(p, params) for p in prepared]
        threads = [threading.Thread(target=read, args=(r, i)) for i, r in enumerate(replies)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert not any(t.is_alive() for t in threads), "a reply hung after the failure"
    assert all(isinstance(outcomes[i], EngineError) for i in range(2)), outcomes
    assert wait_until(engine.alive, 30)
    text, _, _ = ask(engine, PROMPTS[0], greedy(48))
    assert "Paris" in text


def test_engine_refuses_new_requests_once_closed(embedded_loaded):
    engine = LocalEngine(embedded_loaded, EngineOptions(backend="cb"))
    engine.close()
    with pytest.raises(EngineError, match="shutting down"):
        engine.stream(engine.prepare(user("hi"), greedy(4)), greedy(4))


# -- context window -------------------------------------------------------------------------------------

def long_conversation(n_exchanges: int, system: str = "You are a terse assistant.") -> list[dict]:
    messages = [{"role": "system", "content": system}]
    for i in range(n_exchanges):
        messages += [{"role": "user", "content": f"Question {i}: tell me something about the number {i}."},
                     {"role": "assistant", "content": f"Answer {i}: the number {i} is an integer. " * 3}]
    messages.append({"role": "user", "content": "Last question: what is 2 + 2?"})
    return messages


def test_long_conversation_drops_oldest_turns_and_keeps_the_system_prompt(small_window_engine):
    params = greedy(32)
    messages = long_conversation(12)
    prompt = small_window_engine.prepare(messages, params)
    assert prompt.dropped_turns > 0
    assert prompt.messages[0] == messages[0]
    assert prompt.messages[-1] == messages[-1]
    assert list(prompt.messages[1:]) == messages[1 + 2 * prompt.dropped_turns:]  # the oldest went first
    assert prompt.n_prompt_tokens + params.max_new_tokens <= 256
    reply = small_window_engine.stream(prompt, params)
    assert "".join(reply).strip() and reply.stats.n_tokens >= 1


def test_conversation_that_fits_is_sent_whole(small_window_engine):
    messages = long_conversation(1)
    prompt = small_window_engine.prepare(messages, greedy(32))
    assert prompt.dropped_turns == 0 and list(prompt.messages) == messages


def test_single_message_too_long_is_refused_with_a_clear_message(small_window_engine):
    text = "Please summarise this. " + "The cat sat on the mat. " * 80
    with pytest.raises(PromptTooLong, match="too long"):
        small_window_engine.prepare([{"role": "system", "content": "Be brief."}, *user(text)], greedy(32))


def test_chat_service_reports_dropped_turns_and_refuses_an_oversized_message(small_window_engine):
    service = ChatService({small_window_engine.name: small_window_engine}, NoModerator(), NullStore(),
                          limits=Limits(rate_limit_per_min=0))
    ok = ModerationResult.passed()
    ctx = TurnContext(conversation_id="c1", turn_index=1, client_hash="h")

    updates = list(service.reply(small_window_engine.name, long_conversation(12), greedy(16), ok, ctx))
    last = updates[-1]
    assert last.done and last.status == "done" and last.reply.strip()
    assert "left out" in last.notice and "system prompt was kept" in last.notice

    too_long = user("Read this: " + "word " * 600)
    last = list(service.reply(small_window_engine.name, too_long, greedy(16), ok, ctx))[-1]
    assert last.status == "rejected" and last.reply == ""
    assert "too long" in last.notice and "shorten" in last.notice


# -- 8-bit ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_8bit(tiny_llama_dir):
    return load_model(ModelSpec(str(tiny_llama_dir), load_8bit=True, template="vicuna_v1.1"))


def test_8bit_model_loads_through_bitsandbytes(tiny_8bit):
    import bitsandbytes as bnb

    assert tiny_8bit.load_8bit and tiny_8bit.dtype == "int8" and tiny_8bit.template.name == "vicuna_v1.1"
    linears = {name: type(m) for name, m in tiny_8bit.model.named_modules()
               if isinstance(m, torch.nn.Linear) and name != "lm_head"}
    assert len(linears) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    assert all(issubclass(t, bnb.nn.Linear8bitLt) for t in linears.values()), linears


@pytest.mark.parametrize("backend", BACKENDS)
def test_8bit_model_streams_the_same_greedy_reply_as_generate_on_cpu(tiny_8bit, backend):
    engine = start_engine(tiny_8bit, EngineOptions(backend=backend))
    try:
        params = greedy(8)
        prepared = engine.prepare(user("Hello there"), params)
        assert engine.tokenizer.decode(prepared.payload).endswith("USER: Hello there ASSISTANT:")
        reply = engine.stream(prepared, params)
        deltas = list(reply)
        assert reply.stats.n_tokens >= 1 and reply.stats.finish_reason in ("length", "stop")
        assert "".join(deltas) == plain_generate(tiny_8bit, list(prepared.payload), 8)
    finally:
        engine.close()
