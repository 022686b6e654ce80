"""The replies a newcomer sees first (issue 15), on the real embedded SmolLM2 on CPU: each engine's sampling
defaults come from the model (its generation_config.json, else the built-in table row) with a CPU reply
length; the user's flags win over them; a first reply ends by itself instead of looping for the whole budget;
with the vicuna_v1.1 template it stops before writing the next turns itself; continuous batching reports
that it cannot apply a repetition penalty and the reply says so; ZeroGPU's generate gets the penalty.
Greedy decoding throughout (with the model's default penalty), so nothing here depends on luck."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from conversation_templates import get_template
from tests.engines import WordModerator
from vicuna_demo.config import ModelSpec
from vicuna_demo.data.storage import open_store
from vicuna_demo.engines import sampling_defaults
from vicuna_demo.engines.local import EngineOptions, LocalEngine, start_engine
from vicuna_demo.engines.protocol import SamplingParams
from vicuna_demo.engines.startup import ModelStartup
from vicuna_demo.engines.zerogpu import ZeroGPUEngine
from vicuna_demo.loading import generation_config_sampling, load_model, recommended_sampling
from vicuna_demo.services.chat import ChatService, ChatSession, Limits
from vicuna_demo.specs import recommended_row


def most_repeated_line(text: str) -> int:
    lines = [line.strip() for line in re.split(r"\n|(?<=[.!?])\s+", text) if len(line.strip()) > 8]
    return max((lines.count(line) for line in lines), default=0)


@pytest.fixture(scope="module")
def vicuna_engine(embedded_loaded):
    """The embedded model served with the vicuna_v1.1 template it was not trained on."""
    engine = start_engine(dataclasses.replace(embedded_loaded, name="Smol-vicuna",
                                              template=get_template("vicuna_v1.1")))
    engine.warmup()
    yield engine
    engine.close()


@pytest.fixture
def service(tmp_path, embedded_engine, vicuna_engine):
    store = open_store(tmp_path / "logs")
    yield ChatService({"Smol": embedded_engine, "Smol-vicuna": vicuna_engine}, WordModerator(), store,
                      limits=Limits(rate_limit_per_min=0))
    store.close()


def reply_to(service, text, model, **params):
    session = ChatSession()
    updates = list(service.turn(session, text, model=model, **params))
    return updates[-1]


# -- where the defaults come from ------------------------------------------------------------------------

def test_the_embedded_model_gets_its_table_row_and_a_cpu_reply_length(embedded_loaded, embedded_engine):
    assert embedded_loaded.sampling == {"temperature": 0.2, "top_p": 0.9, "repetition_penalty": 1.1}
    assert embedded_engine.defaults == SamplingParams(temperature=0.2, top_p=0.9,
                                                      max_new_tokens=sampling_defaults.CPU_MAX_NEW_TOKENS,
                                                      repetition_penalty=1.1)
    assert embedded_engine.unsupported_params == frozenset()          # the fast path applies the penalty


def test_a_models_generation_config_gives_its_defaults_before_and_after_loading(tiny_llama_dir, tmp_path):
    folder = tmp_path / "with-config"
    folder.mkdir()
    for item in tiny_llama_dir.iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    (folder / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.9, "top_p": 0.6, "max_length": 4096, "do_sample": True, "bos_token_id": 1}))
    spec = ModelSpec(str(folder), name="Configured", device="cpu", template="vicuna_v1.1")
    assert recommended_sampling(spec) == {"temperature": 0.9, "top_p": 0.6}          # max_length is not a reply length
    startup = ModelStartup([spec], EngineOptions(), plan=False)
    startup.prepare()                       # before the weights: the page already shows these values
    expected = SamplingParams(temperature=0.9, top_p=0.6, max_new_tokens=sampling_defaults.CPU_MAX_NEW_TOKENS)
    assert startup.engines["Configured"].defaults == expected
    engine = LocalEngine(load_model(spec), start=False)
    try:
        assert engine.defaults == expected
    finally:
        engine.close()
        startup.close()


def test_values_are_clamped_and_unknown_models_have_none():
    assert recommended_row("someone/other-model") == {} and generation_config_sampling(None) == {}
    values = generation_config_sampling({"temperature": 1.5, "top_p": 0.0, "repetition_penalty": 0.8,
                                         "max_new_tokens": 512, "top_k": 5})
    assert "top_k" not in values
    assert sampling_defaults.engine_defaults(values, cpu=False) == SamplingParams(1.0, 0.01, 512, 1.0)
    assert sampling_defaults.engine_defaults({}, cpu=False) == SamplingParams()


# -- the first replies ---------------------------------------------------------------------------------

def test_a_first_reply_ends_by_itself_with_the_defaults_where_no_penalty_loops(service):
    """"What is magic?" (greedy, the vicuna template): without a penalty the model repeats "Magic is a magical
    realm that exists beyond the physical world." to the limit, the loop issue 15 saw; with the model's
    default penalty it answers and stops. A plain question through its own template stops at once."""
    looped = reply_to(service, "What is magic?", "Smol-vicuna", temperature=0, repetition_penalty=1.0)
    assert looped.stats.finish_reason == "length" and most_repeated_line(looped.reply) >= 5   # the control
    done = reply_to(service, "What is magic?", "Smol-vicuna", temperature=0)
    assert done.status == "done" and done.stats.finish_reason == "stop", done.reply
    assert done.stats.n_tokens < sampling_defaults.CPU_MAX_NEW_TOKENS and most_repeated_line(done.reply) < 3
    assert "magic" in done.reply.lower()
    answer = reply_to(service, "What is the capital of France?", "Smol", temperature=0)
    assert answer.stats.finish_reason == "stop" and "Paris" in answer.reply and answer.stats.n_tokens < 40


def test_with_the_vicuna_template_the_reply_stops_before_the_model_writes_the_next_turns(service):
    update = reply_to(service, "What is the capital of France?", "Smol-vicuna", temperature=0)
    assert update.status == "done" and update.stats.finish_reason == "stop", update.reply
    assert update.stats.n_tokens < sampling_defaults.CPU_MAX_NEW_TOKENS
    assert not re.search(r"^\s*(USERS?|ASSISTANT)\s*:", update.reply, re.M), update.reply
    assert update.reply.strip()


# -- back ends -----------------------------------------------------------------------------------------

def test_continuous_batching_cannot_apply_a_penalty_and_the_reply_says_so(embedded_loaded, tmp_path):
    engine = LocalEngine(dataclasses.replace(embedded_loaded, name="Smol-cb"), EngineOptions(backend="cb"))
    store = open_store(tmp_path / "logs")
    try:
        assert engine.unsupported_params == {"repetition_penalty"}
        assert engine.defaults.repetition_penalty == 1.0 and engine.defaults.temperature == 0.2
        service = ChatService({"Smol-cb": engine}, WordModerator(), store, limits=Limits(rate_limit_per_min=0))
        update = reply_to(service, "What is the capital of France?", "Smol-cb", temperature=0,
                          repetition_penalty=1.3, max_new_tokens=16)
        assert update.status == "done" and update.reply
        assert "Smol-cb cannot apply a repetition penalty" in update.notice
    finally:
        engine.close()
        store.close()


def test_zerogpu_passes_the_penalty_to_generate(embedded_loaded):
    def gpu(duration=None):
        return lambda task: task
    engine = ZeroGPUEngine(embedded_loaded, gpu)
    prompt = engine.prepare([{"role": "user", "content": "Give me three tips to sleep better."}], SamplingParams())
    tokens = {}
    for penalty in (1.0, 1.3):
        params = SamplingParams(temperature=0, max_new_tokens=24, repetition_penalty=penalty)
        reply = engine.stream(prompt, params)
        assert reply._sampling.get("repetition_penalty", 1.0) == penalty
        tokens[penalty] = "".join(reply)
    assert tokens[1.0] != tokens[1.3]
    engine.close()
