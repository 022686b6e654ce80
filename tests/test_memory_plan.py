"""The start-up memory plan (vicuna_demo/engines/memory.py): weights computed from a config before loading,
the one-line refusal when the planned models do not fit, the rule that divides a GPU's KV memory among its
engines (equal tokens, capped at what an engine can use, kv= shares first), the kv= spec option, and the
GPU gate that keeps graph capture away from other GPU work. Pure functions and threads: no GPU needed."""

from __future__ import annotations

import threading
import time

import pytest
from transformers import LlamaConfig

from vicuna_demo.config import ConfigError, ModelSpec
from vicuna_demo.engines.gpugate import SharedExclusiveGate
from vicuna_demo.engines.memory import (GiB, KvClaim, PlanError, check_fit, divide_kv, kv_bytes_per_token, place,
                                        model_needs, weight_bytes)

VICUNA_7B = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)


def test_weights_of_a_7b_model_follow_the_per_precision_rule():
    fp16 = weight_bytes(VICUNA_7B, "fp16")
    assert fp16 == 2 * 6_738_415_616                       # Llama-2-7B's published parameter count
    eight = weight_bytes(VICUNA_7B, "8-bit")
    four = weight_bytes(VICUNA_7B, "4-bit")
    # 8-bit: 1 B per projection weight + fp32 row scales + fp16 embeddings/head/norms (measured: 6.52 GiB)
    assert 6.3 * GiB < eight < 6.7 * GiB
    assert 3.5 * GiB < four < 4.0 * GiB and four < eight < fp16
    assert kv_bytes_per_token(VICUNA_7B) == 512 * 1024       # 512 KiB per token (facts.md)


def test_models_that_do_not_fit_are_refused_in_one_line_naming_each_need_and_what_to_try():
    needs = [model_needs(name, "cuda:0", VICUNA_7B, precision="fp16") for name in ("Vicuna-A", "Vicuna-B")]
    with pytest.raises(PlanError) as caught:
        check_fit(needs, free={"cuda:0": 23 * GiB}, total={"cuda:0": 24 * GiB})
    message = str(caught.value)
    assert "\n" not in message
    assert "Vicuna-A" in message and "Vicuna-B" in message and "cuda:0" in message
    assert "23.0 GiB free of 24.0 GiB" in message
    assert "12.6 GiB weights" in message and "4,096-token conversation" in message
    for advice in ("8bit", "4bit", "fewer models", "ctx="):
        assert advice in message


def test_models_that_fit_pass_and_each_device_is_checked_on_its_own():
    a = model_needs("A", "cuda:0", VICUNA_7B, precision="fp16")
    b = model_needs("B", "cuda:1", VICUNA_7B, precision="8-bit")
    check_fit([a, b], free={"cuda:0": 16 * GiB, "cuda:1": 10 * GiB})
    with pytest.raises(PlanError, match="cuda:1"):
        check_fit([a, b], free={"cuda:0": 80 * GiB, "cuda:1": 6 * GiB})
    # a shorter context fits where the full one does not
    short = model_needs("A", "cuda:0", VICUNA_7B, precision="fp16", context=1024)
    assert short.minimum < a.minimum


def test_kv_shares_adding_up_to_more_than_one_are_refused():
    a = model_needs("A", "cuda:0", VICUNA_7B, precision="8-bit", kv_share=0.7)
    b = model_needs("B", "cuda:0", VICUNA_7B, precision="8-bit", kv_share=0.5)
    with pytest.raises(PlanError, match="kv= shares"):
        check_fit([a, b], free={"cuda:0": 80 * GiB})


def test_kv_memory_gives_every_engine_the_same_tokens():
    per = kv_bytes_per_token(VICUNA_7B)
    shares = divide_kv(20 * GiB, [KvClaim("fp16", per, 10**12), KvClaim("8bit", per, 10**12)])
    assert shares["fp16"] == shares["8bit"] == 10 * GiB
    half = divide_kv(30 * GiB, [KvClaim("big", 2 * per, 10**12), KvClaim("small", per, 10**12)])
    assert half["big"] // (2 * per) == half["small"] // per     # same tokens, twice the bytes
    assert sum(half.values()) <= 30 * GiB


def test_an_engine_never_gets_more_than_it_can_use_and_the_rest_goes_to_the_others():
    per = 1000
    shares = divide_kv(100_000, [KvClaim("capped", per, 10_000), KvClaim("a", per, 10**9), KvClaim("b", per, 10**9)])
    assert shares == {"capped": 10_000, "a": 45_000, "b": 45_000}


def test_a_kv_share_overrides_the_rule():
    shares = divide_kv(100_000, [KvClaim("a", 10, 10**9, share=0.7), KvClaim("b", 10, 10**9),
                                 KvClaim("c", 10, 10**9)])
    assert shares == {"a": 70_000, "b": 15_000, "c": 15_000}


def test_kv_option_in_a_model_spec_takes_a_fraction_or_a_percentage():
    assert ModelSpec.parse("lmsys/vicuna-7b-v1.5,kv=0.3").kv_share == 0.3
    assert ModelSpec.parse("lmsys/vicuna-7b-v1.5,kv=25%").kv_share == 0.25
    assert ModelSpec.parse("lmsys/vicuna-7b-v1.5").kv_share is None
    for bad in ("kv=0", "kv=1.5", "kv=half"):
        with pytest.raises(ConfigError, match="kv="):
            ModelSpec.parse(f"lmsys/vicuna-7b-v1.5,{bad}")


def test_the_gpu_gate_lets_steps_share_it_and_a_capture_run_alone():
    gate = SharedExclusiveGate()
    events: list[str] = []
    inside = threading.Event()

    def step(name):
        with gate.shared():
            events.append(f"{name} in")
            inside.set()
            time.sleep(0.2)
            events.append(f"{name} out")

    def capture():
        inside.wait(5)
        with gate.exclusive():
            events.append("capture in")
            time.sleep(0.1)
            events.append("capture out")

    threads = [threading.Thread(target=step, args=("a",)), threading.Thread(target=capture)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    late = threading.Thread(target=step, args=("b",))   # arrives while the capture waits: goes after it
    late.start()
    for t in threads + [late]:
        t.join(5)
    assert events.index("capture in") > events.index("a out")
    assert events.index("b in") > events.index("capture out")


# -- several GPUs (issue 32): models without device= are placed; pinned ones stay -----------------------------

def test_three_models_without_a_device_spread_over_two_gpus_largest_first():
    needs = [model_needs("A", "cuda:0", VICUNA_7B, precision="fp16"),
             model_needs("B", "cuda:0", VICUNA_7B, precision="fp16"),
             model_needs("C", "cuda:0", VICUNA_7B, precision="8-bit")]
    placed = place(needs, {"A", "B", "C"}, free={"cuda:0": 40 * GiB, "cuda:1": 40 * GiB})
    where = {n.name: n.device for n in placed}
    assert where["A"] != where["B"]                      # the two fp16 models go to different GPUs
    assert [n.name for n in placed] == ["A", "B", "C"]   # the order given, each with its device
    check_fit(placed, free={"cuda:0": 40 * GiB, "cuda:1": 40 * GiB})


def test_a_pinned_model_keeps_its_gpu_and_the_others_go_where_there_is_room():
    pinned = model_needs("Pinned", "cuda:0", VICUNA_7B, precision="fp16")
    free = model_needs("Free", "cuda:0", VICUNA_7B, precision="fp16")
    placed = place([pinned, free], {"Free"}, free={"cuda:0": 30 * GiB, "cuda:1": 20 * GiB})
    assert {n.name: n.device for n in placed} == {"Pinned": "cuda:0", "Free": "cuda:1"}


def test_models_that_fit_on_no_gpu_are_refused_in_one_line_naming_each_gpu_s_room():
    needs = [model_needs(n, "cuda:0", VICUNA_7B, precision="fp16") for n in ("A", "B", "C")]
    with pytest.raises(PlanError) as caught:
        place(needs, {"A", "B", "C"}, free={"cuda:0": 24 * GiB, "cuda:1": 24 * GiB})
    message = str(caught.value)
    assert "\n" not in message and "no GPU has that much" in message
    assert "cuda:0" in message and "cuda:1" in message and "8bit or 4bit" in message


def test_the_start_up_plan_places_models_on_a_two_gpu_box_and_loads_them_there(monkeypatch):
    import torch
    from vicuna_demo.engines import startup
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (40 * GiB, 80 * GiB))
    monkeypatch.setattr(startup, "read_config", lambda spec: VICUNA_7B)
    specs = [ModelSpec.parse("/m/a,name=A"), ModelSpec.parse("/m/b,name=B"),
             ModelSpec.parse("/m/c,name=C,device=cuda:0")]
    needs = startup.plan_memory(specs)
    where = {n.name: n.device for n in needs}
    assert where["C"] == "cuda:0" and {where["A"], where["B"]} == {"cuda:0", "cuda:1"}
    loaded_on = {s.display_name: s.device for s in startup.placed_specs(specs, needs)}
    assert loaded_on == where                            # each model loads where the plan put it
