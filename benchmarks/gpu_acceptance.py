"""The GPU box as users run it: random Vicuna-7B-shaped checkpoints started through the app's own start-up
(``load_settings([... --model specs ...])`` -> ``build_runtime`` -> background load, plan, warm-up), on cards
of several sizes simulated by holding the rest of the GPU's memory in one tensor. Each scenario runs in its
own process and reports start-up success and time, KV tokens per engine and the share of the memory left
after weights and measured activation peaks that went to KV cache, 1-stream tok/s, 8- and 16-stream
aggregate tok/s with p95 time to first token, a side-by-side round (both models streaming at once), and
the memory left free.

    python benchmarks/gpu_acceptance.py --out results/            # every scenario (an H200: ~10 minutes)
    python benchmarks/gpu_acceptance.py --only card24_fp16,refusal
    python benchmarks/gpu_acceptance.py --only eval_two_7b         # issue 14: 160 answers from two 7B engines
    python benchmarks/gpu_acceptance.py --only no_triton           # issue 27: no Triton: eager ops, still answers
    python benchmarks/gpu_acceptance.py --tiny --out /tmp/acc     # a tiny Llama on CPU: checks the script

The checkpoint (13 GB of random fp16 weights, saved once with save_pretrained) goes to --models-dir and
is reused by every scenario; "the same source twice" is a symbolic link to it. The tokenizer is a small
BPE trained on the spot (no network); prompts are random token ids of fixed lengths.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")   # as the app's start-up sets it
GiB = 2**30
CARD_OVERHEAD_GIB = 0.6      # CUDA context and driver on a real card: what a process cannot use

# name: (card GiB or None for the whole GPU, [(folder, spec options)], workload)
SCENARIOS = {
    "refusal": (24, [("a", "name=A"), ("b", "name=B")], "refuse"),
    "card16_8bit": (16, [("a", "name=V-8bit,8bit")], "single"),
    "card16_4bit": (16, [("a", "name=V-4bit,4bit")], "single"),     # issue 16: NF4 loaded by transformers
    "card24_fp16": (24, [("a", "name=V-fp16")], "single"),
    # issue 27: a GPU box whose Python cannot import Triton still answers (eager ops) and says why in its status
    "no_triton": (24, [("a", "name=V-no-triton")], "single"),
    "card48_two_fp16": (48, [("a", "name=A,template=vicuna_v1.1"), ("b", "name=B,template=OTHER")], "pair"),
    "card48_fp16_8bit": (48, [("a", "name=A"), ("a", "name=B-8bit,8bit")], "pair"),
    "card80_three": (80, [("a", "name=A"), ("b", "name=B"), ("a", "name=C-8bit,8bit")], "pair"),
    "h200_full": (None, [("a", "name=V-fp16")], "long"),
    # issue 14: 80 questions x 512 new tokens from two local 7B models through the app's start-up and the
    # evaluation runner, against FastChat's sequential generate measured in the same process
    "eval_two_7b": (None, [("a", "name=model-a"), ("b", "name=model-b")], "eval"),
}


# -- checkpoints -----------------------------------------------------------------------------------------

def make_tokenizer(vocab_limit: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    words = ("a chat between a curious user and an artificial intelligence assistant the assistant gives "
             "helpful detailed and polite answers to the user's questions USER: ASSISTANT: hello world "
             "what is the capital of france paris one two three four five six seven eight nine ten").split()
    trainer = trainers.BpeTrainer(vocab_size=min(2000, vocab_limit), special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(words)] * 50, trainer)
    from tokenizers import decoders
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def make_checkpoint(folder: Path, tiny: bool) -> None:
    """Random Vicuna-7B-shaped weights (or a tiny Llama) saved with save_pretrained, once."""
    if (folder / "config.json").is_file():
        return
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    tokenizer = make_tokenizer(32000)
    shape = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4) if tiny else
             dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32))
    config = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, num_key_value_heads=shape["num_attention_heads"],
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=0,
                         torch_dtype="float16", **shape)
    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.float16 if device == "cuda" else torch.float32)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    print(json.dumps({"stage": "checkpoint", "folder": str(folder), "seconds": round(time.perf_counter() - started, 1)}),
          flush=True)


# -- one scenario (in its own process) -------------------------------------------------------------------

def run_streams(engine, n: int, prompt_len: int, new: int, seed: int) -> dict:
    """n concurrent replies of ``new`` tokens to random prompts of ``prompt_len`` tokens (EOS unlikely)."""
    import random
    from vicuna_demo.engines.protocol import Prompt, SamplingParams
    rng = random.Random(seed)
    params = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=new)
    prompts = [Prompt(messages=(), payload=[rng.randrange(10, 31000) for _ in range(prompt_len)]) for _ in range(n)]
    results: list = [None] * n
    barrier = threading.Barrier(n)

    def one(i):
        barrier.wait()
        reply = engine.stream(prompts[i], params)
        for _ in reply:
            pass
        results[i] = reply.stats

    started = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
    wall = time.perf_counter() - started
    done = [r for r in results if r is not None and r.finish_reason in ("stop", "length")]
    ttft = sorted(r.ttft_s for r in done if r.ttft_s is not None)
    tokens = sum(r.n_tokens for r in done)
    out = dict(streams=n, prompt=prompt_len, new=new, completed=len(done), tokens=tokens,
               aggregate_tok_s=round(tokens / wall, 1), wall_s=round(wall, 2))
    if ttft:
        out.update(ttft_p50_s=round(statistics.median(ttft), 3),
                   ttft_p95_s=round(ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))], 3))
    if n == 1 and done:
        out["tok_s"] = round(done[0].tok_s or 0.0, 1)
    return out


def evaluation(runtime, engine, n_questions: int, new_tokens: int, tiny: bool) -> dict:
    """Issue 14's benchmark: every model answers ``n_questions`` distinct single-turn questions (the built-in
    set's first turns, cycled, numbered) with ``new_tokens`` greedy tokens each, all submitted at once
    through ``EvaluationRunner.answer`` on the app's engines; then FastChat's way (``gen_model_answer``:
    plain ``generate``, greedy, batch 1, one question after another) on 2 of them with 96 tokens, scaled to
    the same work."""
    import eval_bench      # its distinct questions and FastChat's loop (the engine has a LoadedModel's fields)
    from vicuna_demo.engines.protocol import SamplingParams
    from vicuna_demo.evaluation.runner import EvaluationRunner
    questions = eval_bench.eighty_questions(n_questions)
    engines = runtime.service.engines
    runner = EvaluationRunner(engines, judge=next(iter(engines)),
                              answer_params=SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=new_tokens))
    started = time.perf_counter()
    answers = runner.answer(questions, list(engines))
    seconds = time.perf_counter() - started
    done = [a for per in answers.values() for a in per.values()]
    tokens = sum(a.n_tokens for a in done)
    out = dict(models=list(engines), questions=n_questions, answers=sum(a.complete for a in done), of=len(done),
               new_tokens_each=new_tokens, tokens=tokens, seconds=round(seconds, 1), tok_s=round(tokens / seconds, 1),
               errors=sorted({a.error for a in done if a.error})[:3],
               finish_reasons=sorted({r for a in done for r in a.finish_reasons}))
    base = eval_bench.baseline(engine, questions[:2], 16 if tiny else 96)     # the engine's own model
    sequential = tokens / base["tok_s"]
    out.update(baseline=base, sequential_estimate_s=round(sequential, 1), speedup=round(sequential / seconds, 1))
    return out


def scenario(name: str, models_dir: Path, tiny: bool) -> dict:
    if name == "no_triton":
        sys.modules["triton"] = None      # an import of it fails as if it were not installed
    import torch
    card, models, workload = SCENARIOS[name]
    report: dict = {"scenario": name, "card_gib": card}
    hold = None
    if card is not None and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        keep = int((card - CARD_OVERHEAD_GIB) * GiB)
        hold = torch.empty(max(0, free - keep), dtype=torch.uint8, device="cuda")
        report["simulated_free_gib"] = round(torch.cuda.mem_get_info()[0] / GiB, 2)
    from conversation_templates import list_templates
    from vicuna_demo.config import load_settings
    from vicuna_demo.engines.memory import ENGINE_MARGIN_BYTES, PlanError
    from vicuna_demo.services.runtime import build_runtime
    other = next(t for t in list_templates() if t not in ("vicuna_v1.1",) and "chat_template" not in t
                 and "hf" not in t)
    argv = []
    for folder, options in models:
        argv += ["--model", f"{models_dir / folder},{options.replace('OTHER', other)}"
                 + ("" if "template=" in options else ",template=vicuna_v1.1")
                 + (",device=cpu" if tiny else "")]
    report["argv"] = argv
    logs = tempfile.mkdtemp()
    settings = load_settings([*argv, "--moderation", "off", "--rate-limit", "0", "--log-dir", logs], environ={})
    started = time.perf_counter()
    try:
        runtime = build_runtime(settings)
    except PlanError as exc:
        report.update(started=False, refused=str(exc), seconds=round(time.perf_counter() - started, 2))
        return report
    report["page_ready_s"] = round(time.perf_counter() - started, 2)   # build_runtime returns: the page could serve
    ok = runtime.wait_ready(1200)
    report.update(started=ok, startup_s=round(time.perf_counter() - started, 1))
    engines = {name: proxy.engine for name, proxy in runtime.service.engines.items()}
    plan = runtime.startup.kv_plan if runtime.startup else {}
    report["engines"] = {}
    for ename, proxy in runtime.service.engines.items():
        engine = proxy.engine
        row = dict(status=proxy.status, ready=proxy.ready, capacity=proxy.capacity,
                   kv_tokens=getattr(engine, "kv_tokens", None))
        peaks = getattr(engine, "measured_peaks", {})
        if peaks:
            row["measured_peaks_mib"] = {k: round(v / 2**20) for k, v in peaks.items()}
        if ename in plan:
            row.update({k: (round(v / GiB, 2) if isinstance(v, int) else v) for k, v in plan[ename].items()})
        report["engines"][ename] = row
    if plan:   # the share of what is left after weights and the measured peaks that went to KV cache
        by_device: dict = {}
        for ename, p in plan.items():
            by_device.setdefault(p["device"], []).append(p)
        report["kv_share_of_left"] = {
            dev: round(sum(p["kv_bytes"] for p in ps) /
                       max(1, ps[0]["free_after_weights"] - sum(p["reserve"] - ENGINE_MARGIN_BYTES for p in ps)), 3)
            for dev, ps in by_device.items()}
    if not ok:
        runtime.close()
        return report
    first = next(iter(engines.values()))
    lengths = (64, 16) if tiny else (512, 256)
    report["one_stream"] = run_streams(first, 1, *lengths, seed=1)
    if workload in ("single", "long"):
        report["streams_8"] = run_streams(first, 8, 32 if tiny else 1500, lengths[1], seed=8)
        report["streams_16"] = run_streams(first, 16, 32 if tiny else 1500, lengths[1], seed=16)
    if workload == "pair":
        report["streams_8"] = run_streams(first, 8, 32 if tiny else 1500, lengths[1], seed=8)
        for ename, engine in list(engines.items())[1:]:
            report[f"one_stream_{ename}"] = run_streams(engine, 1, *lengths, seed=2)
        side: dict = {}
        threads = [threading.Thread(target=lambda n=n, e=e: side.__setitem__(n, run_streams(e, 1, *lengths, seed=3)))
                   for n, e in list(engines.items())[:2]]
        both_started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        report["side_by_side"] = dict(sides=side, wall_s=round(time.perf_counter() - both_started, 2))
    if workload == "long":
        report["streams_64_long"] = run_streams(first, 64, 100 if tiny else 3500, 40 if tiny else 400, seed=64)
    if workload == "eval":
        report["evaluation"] = evaluation(runtime, first, 8 if tiny else 80, 16 if tiny else 512, tiny)
    if torch.cuda.is_available():
        report["free_left_gib"] = round(torch.cuda.mem_get_info()[0] / GiB, 2)
    runtime.close()
    del hold
    return report


# -- driver ----------------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_acceptance")
    parser.add_argument("--models-dir", default=os.path.join(tempfile.gettempdir(), "vicuna-acceptance-models"))
    parser.add_argument("--only", default="", help="comma-separated scenario names")
    parser.add_argument("--tiny", action="store_true", help="a tiny Llama on CPU (checks the script)")
    parser.add_argument("--scenario", help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=420.0, help="seconds per scenario")
    parser.add_argument("--budget", type=float, default=0.0, help="start no scenario after this many seconds")
    args = parser.parse_args()
    models_dir = Path(args.models_dir) / ("tiny" if args.tiny else "7b")
    if args.scenario:
        import logging
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        print("RESULT " + json.dumps(scenario(args.scenario, models_dir, args.tiny)), flush=True)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    make_checkpoint(models_dir / "a", args.tiny)
    if not (models_dir / "b").exists():
        (models_dir / "b").symlink_to(models_dir / "a")      # the same source twice
    names = [n for n in (args.only.split(",") if args.only else SCENARIOS) if n]
    results = []
    begun = time.perf_counter()
    for name in names:
        if args.budget and time.perf_counter() - begun > args.budget:
            results.append({"scenario": name, "started": False, "error": "skipped: out of time in this run"})
            continue
        started = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, __file__, "--scenario", name, "--models-dir", args.models_dir,
                                   *(["--tiny"] if args.tiny else [])], capture_output=True, text=True,
                                  timeout=args.timeout, cwd=ROOT)
            (out / f"{name}.log").write_text(done.stdout + done.stderr)
            lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
            result = json.loads(lines[-1][7:]) if lines else {"scenario": name, "started": False,
                                                              "error": done.stderr.strip().splitlines()[-3:]}
        except subprocess.TimeoutExpired as exc:
            (out / f"{name}.log").write_text(str(exc.stdout or "") + str(exc.stderr or ""))
            result = {"scenario": name, "started": False, "error": f"timed out after {args.timeout:.0f} s"}
        result["process_s"] = round(time.perf_counter() - started, 1)
        results.append(result)
        print(json.dumps(result), flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
