"""Evaluation benchmark: two local 7B models answer 80 questions each (512 new tokens per answer)
through the app's evaluation runner, against FastChat's way, plain ``generate`` one question after
another, measured in the same run.

On a GPU it builds two models of the real Vicuna-7B shape with random fp16 weights (no download;
the same speed as real weights), with SmolLM2's real tokenizer (``--tokenizer``, saved from the
embedded model; its 49,152-token vocabulary makes lm_head 1.5% of the weights larger than
Vicuna's 32,000, so these numbers are, if anything, slightly slow), starts the app's engine for each
(``LocalEngine``, default options: the fast path with CUDA graphs) and warms both up. EOS is
disabled, so every answer runs to its 512 tokens: the worst case. The 80 questions are the first
turns of the built-in set, cycled, each made distinct (no prefix-cache hits between questions).
The baseline is FastChat's ``gen_model_answer`` loop: ``model.generate`` greedy, batch 1, one
question after another, on ``--baseline-questions`` questions with ``--baseline-tokens`` new tokens
each; its per-answer time is scaled to 512 tokens (decode at batch 1 costs the same per token over
this range) and to 160 answers. Prints one JSON line per measurement; no gradio is imported.

    python benchmarks/eval_bench.py                       # GPU: engines built by hand
    python benchmarks/eval_bench.py --device cpu --questions 4 --new-tokens 16   # a smoke run (embedded model)

The figure in RESULTS.md comes from the same measurement through the app's own start-up instead (two
saved checkpoints, ``build_runtime``, memory plan and ordered warm-up): scenario ``eval_two_7b`` of
``benchmarks/gpu_acceptance.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

import engine_bench  # noqa: E402  (shares the model builders)
from conversation_templates import get_template  # noqa: E402
from vicuna_demo.engines.local import EngineOptions, LocalEngine  # noqa: E402
from vicuna_demo.engines.protocol import SamplingParams  # noqa: E402
from vicuna_demo.evaluation.questions import Question, builtin_questions  # noqa: E402
from vicuna_demo.evaluation.runner import EvaluationRunner  # noqa: E402
from vicuna_demo.loading import LoadedModel  # noqa: E402

STARTED = time.time()


def say(**record) -> None:
    print(json.dumps({**record, "t": round(time.time() - STARTED, 1)}), flush=True)


def eighty_questions(n: int) -> list[Question]:
    """``n`` single-turn questions from the built-in set's first turns, each made distinct."""
    base = builtin_questions()
    return [Question(question_id=i + 1, category=base[i % len(base)].category,
                     turns=(f"{base[i % len(base)].turns[0]} (Question {i + 1}.)",)) for i in range(n)]


def build_gpu_model(name: str, tokenizer_dir: str) -> LoadedModel:
    """A Vicuna-7B-shaped LlamaForCausalLM with random fp16 weights, built on the GPU; EOS disabled."""
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(Path(tokenizer_dir) / "tokenizer.json"),
                                        bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>")
    config = engine_bench.vicuna7b_config()
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    started = time.time()
    with torch.device("cuda"):
        torch.set_default_dtype(torch.float16)
        model = LlamaForCausalLM(config).eval()
        torch.set_default_dtype(torch.float32)
    say(stage="build", model=f"{name}: vicuna-7b shape, random fp16, vocab {config.vocab_size}",
        seconds=round(time.time() - started, 1), params_b=round(model.num_parameters() / 1e9, 2))
    return LoadedModel(name=name, source="random", model=model, tokenizer=tokenizer,
                       template=get_template("vicuna_v1.1"), context_window=4096, eos_token_ids=frozenset(),
                       device="cuda:0", dtype="float16", load_8bit=False)


def baseline(loaded, questions: list[Question], new_tokens: int) -> dict:
    """FastChat's way: render, encode, ``generate`` greedy at batch 1, one question after another
    (after one short untimed call, so CUDA start-up is not counted against it)."""
    model, tokenizer = loaded.model, loaded.tokenizer
    model.generate(torch.tensor([[1, 2, 3]], device=model.device), max_new_tokens=4, do_sample=False,
                   pad_token_id=0)
    times = []
    for question in questions:
        ids = tokenizer(loaded.template.render([{"role": "user", "content": question.turns[0]}]))["input_ids"]
        inputs = torch.tensor([ids], device=model.device)
        engine_bench.sync()
        started = time.perf_counter()
        out = model.generate(inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0)
        engine_bench.sync()
        times.append(time.perf_counter() - started)
        assert out.shape[1] - inputs.shape[1] == new_tokens
    per_token = sum(times) / (len(times) * new_tokens)
    return {"answers": len(times), "new_tokens": new_tokens, "seconds": [round(t, 2) for t in times],
            "tok_s": round(1 / per_token, 2), "per_answer_s_at_512": round(per_token * 512, 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--questions", type=int, default=80)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--baseline-questions", type=int, default=3)
    parser.add_argument("--baseline-tokens", type=int, default=128)
    parser.add_argument("--tokenizer", default=str(ROOT / ".cache" / "bench_tokenizer"))
    args = parser.parse_args(argv)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    say(stage="env", device=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__,
        argv=sys.argv[1:])
    if device == "cuda":
        models = [build_gpu_model(name, args.tokenizer) for name in ("model-a", "model-b")]
    else:
        loaded = engine_bench.build_cpu_model()
        models = [dataclasses.replace(loaded, name=name) for name in ("model-a", "model-b")]
    questions = eighty_questions(args.questions)
    base = baseline(models[0], questions[:args.baseline_questions], args.baseline_tokens)
    say(stage="baseline_generate_sequential", **base)

    started = time.perf_counter()
    engines = {}
    for m in models:  # one after the other: two CUDA-graph captures at once fail (see RESULTS.md)
        engines[m.name] = LocalEngine(m, EngineOptions())
        engines[m.name].warmup()
    say(stage="engines_ready", seconds=round(time.perf_counter() - started, 1),
        backends=[e.backend for e in engines.values()], status=[str(e.status) for e in engines.values()])

    params = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=args.new_tokens)
    runner = EvaluationRunner(engines, judge="model-a", answer_params=params)
    started = time.perf_counter()
    answers = runner.answer(questions, list(engines))
    elapsed = time.perf_counter() - started
    done = [a for per in answers.values() for a in per.values()]
    errors = sorted({a.error for a in done if a.error})
    n_answers = sum(1 for a in done if a.complete)
    tokens = n_answers * args.new_tokens
    sequential_s = base["per_answer_s_at_512"] * args.new_tokens / 512 * len(done)
    say(stage="evaluation_answers", answers=n_answers, of=len(done), new_tokens_each=args.new_tokens,
        seconds=round(elapsed, 1), tok_s=round(tokens / elapsed, 1), errors=errors[:3],
        sequential_estimate_s=round(sequential_s, 1), speedup=round(sequential_s / elapsed, 1))
    for engine in engines.values():
        engine.close()
    return 0 if n_answers == len(done) else 1


if __name__ == "__main__":
    sys.exit(main())
