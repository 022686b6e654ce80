"""Engine benchmark: tokens/s and time to first token of the app's engine, beside plain ``generate``.

On a GPU it builds a model of the real Vicuna-7B shape with random fp16 weights (no download; same
speed as the real weights) and, for 8-bit, quantizes it in memory with bitsandbytes (LLM.int8
modules, threshold 6.0, lm_head kept in fp16: what ``--load-8bit`` loads). On a CPU it uses the
embedded SmolLM2-135M. Every run also measures the usual way of serving a model, ``generate`` +
``TextIteratorStreamer`` at batch 1, so each number has its baseline from the same run. EOS is
disabled, so every reply runs to its token budget.

Prints one JSON line per measurement (a run cut short still reports what it finished) and, with
``--out FILE``, appends them there too. Nothing here asserts a time.

    python benchmarks/engine_bench.py                                 # cuda if present, else cpu
    python benchmarks/engine_bench.py --stages baseline,fast,int8,cb --streams 1,8,32,64
    python benchmarks/engine_bench.py --device cpu --rounds 3          # embedded model, alternating runs

Stages: ``baseline`` (generate + streamer, batch 1), ``fast`` (the engine's fast path: 1..N
concurrent streams, greedy, plus sampled runs), ``steps`` (raw decode-step times of the captured
graphs and the memory-bandwidth floor), ``int8`` (8-bit: generate baseline, then the fast path with
our int8 kernel and with bitsandbytes' own matmul), ``cb`` (transformers' continuous batching, CUDA
graphs), ``cbcompile`` (continuous batching with ``default_compile_level`` 1..3).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from transformers import LlamaConfig, LlamaForCausalLM, TextIteratorStreamer  # noqa: E402

from conversation_templates import get_template  # noqa: E402
from vicuna_demo.engines.local import EngineOptions, LocalEngine  # noqa: E402
from vicuna_demo.engines.protocol import Prompt, SamplingParams  # noqa: E402
from vicuna_demo.loading import LoadedModel  # noqa: E402

OUT_FILE: Path | None = None
GC_PAUSES: list[float] = []
_GC_START: list[float] = []


def _gc_watch(phase, info):
    if phase == "start":
        _GC_START[:] = [time.perf_counter()]
    elif _GC_START:
        GC_PAUSES.append(time.perf_counter() - _GC_START[0])


gc.callbacks.append(_gc_watch)
DEVICE_NAME = "cpu"
STARTED = time.time()


def say(**record) -> None:
    record = {"device": DEVICE_NAME, **record, "t": round(time.time() - STARTED, 1)}
    line = json.dumps(record)
    print(line, flush=True)
    if OUT_FILE is not None:
        with OUT_FILE.open("a") as fh:
            fh.write(line + "\n")


class CountingTokenizer:
    """Stands in for a tokenizer where none is available offline: one character per token."""

    pad_token_id = 0
    bos_token = None
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=True, **kwargs):
        return {"input_ids": [1] * bool(add_special_tokens) + [3 + ord(c) % 997 for c in text]}

    def encode(self, text, add_special_tokens=True, **kwargs):
        return self(text, add_special_tokens)["input_ids"]

    def convert_tokens_to_ids(self, tokens):
        return [0 for _ in tokens]

    def decode(self, ids, **kwargs):
        return "x" * len(ids)

    def __len__(self):
        return 32000


class VocabClampedTokenizer:
    """A real tokenizer (for realistic detokenizing cost) whose encoded ids are folded into the model's vocabulary."""

    def __init__(self, inner, vocab: int):
        self._inner, self._vocab = inner, vocab
        self.pad_token_id, self.bos_token, self.eos_token_id = 0, None, 2

    def __call__(self, text, **kwargs):
        return {"input_ids": [i % self._vocab for i in self._inner(text, **kwargs)["input_ids"]]}

    def decode(self, ids, **kwargs):
        return self._inner.decode(ids, **kwargs)

    def __len__(self):
        return self._vocab


def vicuna7b_config() -> LlamaConfig:
    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)


def build_gpu_model(tokenizer_dir: str | None) -> LoadedModel:
    torch.manual_seed(0)
    started = time.time()
    with torch.device("cuda"):
        torch.set_default_dtype(torch.float16)
        model = LlamaForCausalLM(vicuna7b_config()).eval()
        torch.set_default_dtype(torch.float32)
    tokenizer = CountingTokenizer()
    if tokenizer_dir and Path(tokenizer_dir).is_dir():
        from transformers import AutoTokenizer
        tokenizer = VocabClampedTokenizer(AutoTokenizer.from_pretrained(tokenizer_dir), 32000)
    say(stage="build", model="vicuna-7b-shape random fp16", seconds=round(time.time() - started, 1),
        params_b=round(model.num_parameters() / 1e9, 2),
        weights_gib=round(model.get_memory_footprint() / 2**30, 2), tokenizer=type(tokenizer).__name__)
    return LoadedModel(name="vicuna-7b-shape", source="random", model=model, tokenizer=tokenizer,
                       template=get_template("vicuna_v1.1"), context_window=4096, eos_token_ids=frozenset(),
                       device="cuda:0", dtype="float16", load_8bit=False)


def build_cpu_model(dtype: str | None = None) -> LoadedModel:
    from vicuna_demo.config import ModelSpec
    from vicuna_demo.loading import load_model
    started = time.time()
    loaded = load_model(ModelSpec("embedded", dtype=dtype))
    say(stage="build", model=f"embedded SmolLM2-135M {loaded.dtype}", seconds=round(time.time() - started, 1),
        weights_gib=round(loaded.model.get_memory_footprint() / 2**30, 3), threads=torch.get_num_threads())
    return dataclasses.replace(loaded, eos_token_ids=frozenset())


def random_prompt(n: int, seed: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(3, vocab, (n - 1,), generator=g).tolist()


def text_prompt(loaded: LoadedModel, text: str) -> list[int]:
    return loaded.tokenizer(loaded.template.render([{"role": "user", "content": text}]))["input_ids"]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# -- baseline: generate + TextIteratorStreamer ---------------------------------------------------------
def hf_generate_streamer(loaded: LoadedModel, ids: list[int], new_tokens: int, label: str, **extra) -> dict:
    model = loaded.model
    device = next(model.parameters()).device
    inputs = torch.tensor([ids], device=device)
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
               attention_mask=torch.ones_like(inputs))
    with torch.inference_mode():
        model.generate(inputs, **{**gen, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
    sync()
    tokenizer = loaded.tokenizer
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=600)
    counted = {"n": 0}

    def run():
        with torch.inference_mode():
            out = model.generate(inputs, streamer=streamer, **gen)
        counted["n"] = out.shape[1] - inputs.shape[1]

    started = time.perf_counter()
    thread = threading.Thread(target=run)
    thread.start()
    first = None
    for piece in streamer:
        if piece and first is None:
            first = time.perf_counter() - started
    thread.join()
    total = time.perf_counter() - started
    n = counted["n"]
    record = dict(stage=label, streams=1, prompt_tokens=len(ids), new_tokens=n, ttft_s=round(first or 0, 3),
                  decode_tok_s=round((n - 1) / (total - (first or 0)), 1), overall_tok_s=round(n / total, 1),
                  wall_s=round(total, 2), **extra)
    say(**record)
    return record


# -- the engine: N concurrent streams ------------------------------------------------------------------
def engine_streams(engine: LocalEngine, prompts: list[list[int]], new_tokens: int, params: SamplingParams,
                   label: str, **extra) -> dict:
    n = len(prompts)
    barrier = threading.Barrier(n + 1)
    results: dict[int, dict] = {}
    errors: list[str] = []

    def one(i: int) -> None:
        prompt = Prompt(messages=(), payload=prompts[i], n_prompt_tokens=len(prompts[i]))
        barrier.wait()
        try:
            reply = engine.stream(prompt, params)
            for _ in reply:
                pass
            results[i] = dict(end=time.perf_counter(), stats=reply.stats)
        except Exception as exc:  # noqa: BLE001 - reported in the record
            errors.append(f"{type(exc).__name__}: {exc}"[:300])

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join(max(0.0, 150 - (time.perf_counter() - started)))
    wall = max((r["end"] for r in results.values()), default=time.perf_counter()) - started
    tokens = sum(r["stats"].n_tokens for r in results.values())
    ttfts = sorted(r["stats"].ttft_s for r in results.values() if r["stats"].ttft_s is not None)
    rates = sorted(r["stats"].tok_s for r in results.values() if r["stats"].tok_s)
    record = dict(stage=label, streams=n, prompt_tokens=len(prompts[0]), new_tokens_each=new_tokens,
                  temperature=params.temperature, top_p=params.top_p, completed=len(results),
                  new_tokens_total=tokens, wall_s=round(wall, 2), aggregate_tok_s=round(tokens / wall, 1) if wall else None,
                  per_stream_decode_tok_s_median=round(statistics.median(rates), 1) if rates else None,
                  ttft_median_s=round(statistics.median(ttfts), 3) if ttfts else None,
                  ttft_p95_s=round(ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))], 3) if ttfts else None,
                  ttft_max_s=round(ttfts[-1], 3) if ttfts else None, **extra)
    if errors:
        record["errors"] = errors[:3]
    fast = engine.fast_path
    if fast is not None:
        launches = [t for t in fast.launch_times if t >= started]
        fast.launch_times.clear()
        gaps = sorted(b - a for a, b in zip(launches, launches[1:]))
        if gaps:
            record["decode_step_ms_median"] = round(1000 * gaps[len(gaps) // 2], 2)
        log = list(fast.prefill_log)
        fast.prefill_log.clear()
        if log:
            record["prefills"] = dict(count=len(log), max_seconds=max(e["seconds"] for e in log),
                                      sum_seconds=round(sum(e["seconds"] for e in log), 3),
                                      max_waited=max(e["waited"] for e in log), rows=[e["rows"] for e in log][:12],
                                      reused_tokens=sum(e["reused"] for e in log))
    if torch.cuda.is_available():
        record["alloc_retries"] = torch.cuda.memory_stats().get("num_alloc_retries", 0)
    if GC_PAUSES:
        record["gc_pauses_s"] = [round(p, 3) for p in GC_PAUSES if p > 0.01][:8]
        GC_PAUSES.clear()
    say(**record)
    return record


def greedy_agreement(engine: LocalEngine, loaded: LoadedModel, label: str, n: int = 32) -> None:
    """How many leading greedy tokens the fast path shares with ``generate``. Random weights give small
    logit margins, so fp16 rounding may flip a late token; an early mismatch would mean a bug.
    (Exact equality is tested on CPU in tests/test_fastpath.py.)"""
    from vicuna_demo.engines.fastpath import Job
    fast = engine.fast_path
    if fast is None:
        return
    vocab = int(loaded.model.config.vocab_size)
    for length in (64, 700):
        ids = random_prompt(length, 7, vocab)
        got: list[int] = []
        done = threading.Event()

        def emit(tokens, finished, error):
            got.extend(tokens)
            if finished:
                done.set()

        fast.submit(Job(request_id=f"check-{length}", ids=ids, max_new=n, temperature=0.0, top_p=1.0,
                        eos=frozenset(), emit=emit))
        done.wait(300)
        inputs = torch.tensor([ids], device=next(loaded.model.parameters()).device)
        with torch.inference_mode():
            ref = loaded.model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=n,
                                        min_new_tokens=n, do_sample=False, pad_token_id=0)[0, length:].tolist()
        match = next((i for i, (x, y) in enumerate(zip(got, ref)) if x != y), min(len(got), len(ref)))
        say(stage=f"{label}_greedy_vs_generate", prompt_tokens=length, tokens=n, matching_prefix=match,
            engine_first=got[:6], generate_first=ref[:6])


def penalty_agreement(engine: LocalEngine, model, label: str, penalty: float = 1.3, n: int = 48) -> list[dict]:
    """The repetition penalty on the GPU (its seen-token mask and penalty buffer updated inside the captured
    decode step): greedy tokens of penalised requests, batched beside unpenalised ones, against ``generate``
    with ``repetition_penalty`` on the same weights. Random weights give small logit margins, so fp16 may flip
    a late token; a penalty that was not applied shows at once (the unpenalised reply differs early)."""
    from vicuna_demo.engines.fastpath import Job
    fast = engine.fast_path
    if fast is None:
        return []
    vocab = int(model.config.vocab_size)
    device = next(model.parameters()).device
    cases = [(random_prompt(length, 70 + i, vocab), p) for i, (length, p) in
             enumerate([(64, penalty), (300, penalty), (64, 1.0)])]
    got = [([], threading.Event()) for _ in cases]
    for i, ((ids, p), (tokens, done)) in enumerate(zip(cases, got)):
        fast.submit(Job(request_id=f"penalty-{label}-{i}", ids=ids, max_new=n, temperature=0.0, top_p=1.0,
                        eos=frozenset(), repetition_penalty=p,
                        emit=lambda t, f, e, tokens=tokens, done=done: (tokens.extend(t), f and done.set())))
    records = []
    for (ids, p), (tokens, done) in zip(cases, got):
        done.wait(300)
        length = len(ids)
        inputs = torch.tensor([ids], device=device)
        with torch.inference_mode():
            ref = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0, repetition_penalty=p)[0, length:].tolist()
            plain = ref if p == 1.0 else model.generate(
                inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                pad_token_id=0)[0, length:].tolist()
        first_diff = lambda a, b: next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))  # noqa: E731
        record = dict(stage=f"{label}_penalty_vs_generate", prompt_tokens=length, penalty=p, tokens=len(tokens),
                      matching_prefix=first_diff(tokens, ref), generate_with_vs_without_penalty=first_diff(ref, plain),
                      repeated_tokens=len(tokens) - len(set(tokens)))
        say(**record)
        records.append(record)
    return records


def start(loaded: LoadedModel, options: EngineOptions, label: str) -> LocalEngine:
    started = time.perf_counter()
    engine = LocalEngine(loaded, options)
    engine.warmup(progress=lambda m: None)
    say(stage=f"{label}_warmup", seconds=round(time.perf_counter() - started, 1), backend=engine.backend,
        status=engine.status, **fast_info(engine))
    return engine


def fast_info(engine: LocalEngine) -> dict:
    fast = engine.fast_path
    if fast is None:
        return {}
    runner = fast.runner
    tuning = {f"{shape[0]}x{shape[1]} {dtype.removeprefix('torch.')} rows={rows}":
              dict(pick=str(best), us=us, cublas_us=cublas)
              for (shape, dtype, rows), (best, us, cublas) in fast.tuning.items() if rows in (1, 8)}
    return dict(graphs=len(runner.graphs), kernels=runner.use_kernels, kv_blocks=runner.n_blocks - 1,
                block=runner.block, max_rows=runner.max_rows, gemv_tuning=tuning,
                attention_tuning={rows: v for rows, v in fast.attention_tuning.items()}, free_mib=fast.free_mib)


def stop(engine: LocalEngine) -> None:
    engine.close()
    engine.model = None   # let the weights go now (close() released the KV cache and graphs)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


SEEDS = iter(range(1000, 10**9, 1000))


def run_streams(engine, loaded, args, label, vocab, counts, params_list):
    """Fresh prompts for every measurement (a repeated prompt would hit the prefix cache)."""
    for params in params_list:
        for n in counts:
            if out_of_time(args):
                return
            base = next(SEEDS)
            prompts = [random_prompt(args.prompt_len, base + seed, vocab) for seed in range(n)]
            engine_streams(engine, prompts, params.max_new_tokens, params, label)


def step_times(engine: LocalEngine, label: str, kv_len: int = 0) -> None:
    """Replay the captured decode graphs alone (idle engine) and time them with CUDA events; with ``kv_len``
    every row attends to that many cached tokens (in free blocks: their contents do not matter)."""
    fast = engine.fast_path
    if fast is None or not fast.runner.graphs:
        return
    runner = fast.runner
    runner.active.zero_()
    runner.table.zero_()
    runner.pos.zero_()
    if kv_len:
        per_row = -(-(kv_len + 1) // runner.block)
        free = fast.free_block_ids()
        rows_max = min(runner.max_rows, len(free) // per_row)
        runner.active[:rows_max] = 1
        runner.pos[:rows_max] = kv_len
        for r in range(rows_max):
            runner.table[r, :per_row] = torch.tensor(free[r * per_row:(r + 1) * per_row], dtype=torch.int32)
    for rows in (1, 8, 32, 64):
        graph = runner.graphs.get((runner.bucket(rows), "greedy"))
        if graph is None:
            continue
        with torch.cuda.stream(runner.stream):
            for _ in range(3):
                graph.replay()
            torch.cuda.synchronize()
            start_ev, end_ev = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start_ev.record()
            reps = 20
            for _ in range(reps):
                graph.replay()
            end_ev.record()
            torch.cuda.synchronize()
        ms = start_ev.elapsed_time(end_ev) / reps
        say(stage=f"{label}_step", rows=runner.bucket(rows), kv_len=kv_len, ms_per_step=round(ms, 3),
            tok_s_if_all_rows=round(runner.bucket(rows) * 1000 / ms, 1))
        if kv_len:
            runner.pos[:runner.max_rows] = kv_len * runner.active[:runner.max_rows]
    runner.active.zero_()
    runner.table.zero_()
    runner.pos.zero_()


def profile_step(engine: LocalEngine, label: str, rows: int = 1) -> None:
    """GPU time per kernel of one captured decode step (CUPTI traces the kernels inside the graph)."""
    from torch.profiler import ProfilerActivity, profile
    fast = engine.fast_path
    if fast is None or not fast.runner.graphs:
        return
    runner = fast.runner
    graph = runner.graphs.get((runner.bucket(rows), "greedy"))
    runner.active.zero_()
    runner.table.zero_()
    runner.pos.zero_()
    reps = 5
    with torch.cuda.stream(runner.stream):
        graph.replay()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                graph.replay()
            torch.cuda.synchronize()
    rows_out = []
    total = 0.0
    for event in prof.key_averages():
        us = getattr(event, "self_device_time_total", 0) or getattr(event, "self_cuda_time_total", 0)
        if us <= 0:
            continue
        total += us
        rows_out.append((us / reps, event.count // reps, event.key[:60]))
    rows_out.sort(reverse=True)
    say(stage=f"{label}_profile", rows=runner.bucket(rows), kernel_ms_per_step=round(total / reps / 1000, 3),
        top=[dict(us=round(us, 1), n=n, name=name) for us, n, name in rows_out[:14]])
    runner.pos.zero_()


def copy_gb_s() -> float:
    """GB/s of a 2 GiB device-to-device copy, bytes read plus written: the rate a decode step reads weights at."""
    x = torch.empty(2**30, dtype=torch.float16, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    gbs = 2 * x.numel() * 2 * 10 / (time.perf_counter() - t) / 1e9
    del x, y
    return gbs


def bandwidth(loaded: LoadedModel) -> None:
    gbs = copy_gb_s()
    weights = loaded.model.get_memory_footprint()
    say(stage="bandwidth", copy_gb_s=round(gbs, 1), weights_gb=round(weights / 1e9, 2),
        floor_tok_s_bs1=round(gbs * 1e9 / weights, 1))
    torch.cuda.empty_cache()


def quantize_8bit(loaded: LoadedModel) -> LoadedModel:
    """Replace every Linear but lm_head with bitsandbytes' Linear8bitLt (threshold 6.0), quantized on the GPU."""
    import bitsandbytes as bnb
    from bitsandbytes.nn import Int8Params, Linear8bitLt
    model = loaded.model
    started = time.time()
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                if type(child) is torch.nn.Linear and not (name == "" and child_name == "lm_head"):
                    q = Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                     has_fp16_weights=False, threshold=6.0, device="meta")
                    cb, scb, _ = bnb.functional.int8_vectorwise_quant(child.weight.data.contiguous())
                    q.weight = Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
                    if child.bias is not None:
                        q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                    setattr(module, child_name, q)
                    del child
    gc.collect()
    torch.cuda.empty_cache()
    say(stage="int8_quantize", seconds=round(time.time() - started, 1),
        weights_gib=round(model.get_memory_footprint() / 2**30, 2))
    return dataclasses.replace(loaded, load_8bit=True, dtype="int8")


def set_int8_threshold(model, threshold: float | None) -> None:
    """bitsandbytes' outlier threshold (6.0 is what --load-8bit loads; 0 turns the outlier matmul off)."""
    if threshold is None:
        return
    for module in model.modules():
        if type(module).__name__ == "Linear8bitLt":
            module.state.threshold = threshold


def out_of_time(args) -> bool:
    return bool(args.budget_s) and time.time() - STARTED > args.budget_s


def main(argv=None) -> int:
    global OUT_FILE, DEVICE_NAME
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--stages", default=None, help="comma-separated (default: all for the device)")
    parser.add_argument("--streams", default=None, help="concurrency levels (default 1,8,32,64 on GPU, 1,4 on CPU)")
    parser.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 512 on GPU)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per reply (default 256 GPU, 128 CPU)")
    parser.add_argument("--rounds", type=int, default=1, help="CPU: alternate baseline and engine this many times")
    parser.add_argument("--tokenizer", default=str(ROOT / ".cache" / "bench_tokenizer"),
                        help="GPU: a tokenizer folder for realistic detokenizing (else one char per token)")
    parser.add_argument("--budget-s", type=float, default=0, help="skip remaining stages after this many seconds")
    parser.add_argument("--dtype", default=None, help="CPU: load the embedded model in this dtype (default fp32)")
    parser.add_argument("--no-tune-dense", action="store_true", help="GPU: always use cuBLAS for fp16 weights")
    parser.add_argument("--int8-variants", default="fast_int8_ourkernel,fast_int8_bnb_matmul_t0_graphs,"
                        "fast_int8_bnb_matmul_t6_eager", help="GPU: which 8-bit variants to run")
    parser.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = parser.parse_args(argv)
    import logging
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    OUT_FILE = Path(args.out) if args.out else None
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    DEVICE_NAME = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or 'x86_64'}, " \
        f"{os.cpu_count()} cores)"
    import transformers
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    say(stage="env", torch=torch.__version__, transformers=transformers.__version__, triton=triton_version,
        python=platform.python_version(), argv=sys.argv[1:])
    if device == "cuda":
        return gpu_main(args)
    return cpu_main(args)


def gpu_main(args) -> int:
    stages = (args.stages or "baseline,steps,fast,int8,cb,cbcompile").split(",")
    counts = [int(c) for c in (args.streams or "1,8,32,64").split(",")]
    args.prompt_len = args.prompt_len or 512
    args.new_tokens = args.new_tokens or 256
    loaded = build_gpu_model(args.tokenizer)
    vocab = 32000
    greedy = SamplingParams(temperature=0, max_new_tokens=args.new_tokens)
    sampled = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=args.new_tokens)
    if "steps" in stages:
        bandwidth(loaded)
    if "fast" in stages and not out_of_time(args):
        engine = start(loaded, EngineOptions(backend="fast", tune_dense_gemv=not args.no_tune_dense), "fast_fp16")
        try:
            greedy_agreement(engine, loaded, "fast_fp16")
            if "steps" in stages:
                step_times(engine, "fast_fp16")
                step_times(engine, "fast_fp16", kv_len=640)
                profile_step(engine, "fast_fp16", 1)
            run_streams(engine, loaded, args, "fast_fp16", vocab, counts, [greedy])
            run_streams(engine, loaded, args, "fast_fp16_sampled", vocab, [1, max(counts)], [sampled])
            # the next turn of a conversation: the prompt extends the previous request's prompt and reply
            base = random_prompt(args.prompt_len, 99, vocab)
            engine_streams(engine, [base], 32, SamplingParams(temperature=0, max_new_tokens=32), "fast_fp16_turn1")
            engine_streams(engine, [base + random_prompt(64, 98, vocab)[1:]], 32,
                           SamplingParams(temperature=0, max_new_tokens=32), "fast_fp16_turn2_prefix_reuse",
                           stats=engine.backend_stats())
        finally:
            stop(engine)
    if "baseline" in stages:   # after the fast path: it shows the engine also starts after other GPU work
        hf_generate_streamer(loaded, random_prompt(args.prompt_len, 0, vocab), args.new_tokens,
                             "baseline_hf_generate_streamer_fp16")
    if "cb" in stages and not out_of_time(args):
        engine = start(loaded, EngineOptions(backend="cb", use_cuda_graph=True), "cb_graphs_fp16")
        try:
            run_streams(engine, loaded, args, "cb_graphs_fp16", vocab, counts, [greedy])
        finally:
            stop(engine)
    if "cbcompile" in stages and loaded is not None:
        for level in (1, 2, 3):
            if out_of_time(args):
                break
            try:
                engine = start(loaded, EngineOptions(backend="cb", use_cuda_graph=True, compile_level=level),
                               f"cb_compile{level}_fp16")
            except Exception as exc:  # noqa: BLE001
                say(stage=f"cb_compile{level}_fp16", error=f"{type(exc).__name__}: {exc}"[:300])
                continue
            try:
                run_streams(engine, loaded, args, f"cb_compile{level}_fp16", vocab, [1, max(counts)], [greedy])
            finally:
                stop(engine)
    if "int8" in stages and not out_of_time(args):
        fp16_bytes = loaded.model.get_memory_footprint()
        loaded8 = quantize_8bit(loaded)
        say(stage="int8_memory", weights_ratio_vs_fp16=round(loaded8.model.get_memory_footprint() / fp16_bytes, 3))
        short = min(args.new_tokens, 64)
        hf_generate_streamer(loaded8, random_prompt(args.prompt_len, 0, vocab), short,
                             "baseline_hf_generate_streamer_int8")
        variants = [("fast_int8_ourkernel", True, None), ("fast_int8_bnb_matmul_t0_graphs", False, 0.0),
                    ("fast_int8_bnb_matmul_t6_eager", False, 6.0)]
        variants = [v for v in variants if v[0] in args.int8_variants.split(",")]
        for label, kernel, threshold in variants:
            if out_of_time(args):
                break
            set_int8_threshold(loaded8.model, threshold)
            engine = start(loaded8, EngineOptions(backend="fast", quant_kernels=kernel), label)
            try:
                greedy_agreement(engine, loaded8, label, n=16)
                if "steps" in stages:
                    step_times(engine, label)
                    profile_step(engine, label, 1)
                run_streams(engine, loaded8, args, label, vocab, ([1, 8, 64] if kernel else [1, 8]) if threshold != 6.0 else [1],
                            [SamplingParams(temperature=0, max_new_tokens=args.new_tokens if threshold != 6.0 else short)])
            finally:
                stop(engine)
        set_int8_threshold(loaded8.model, 6.0)
        loaded = None
    say(stage="done", seconds=round(time.time() - STARTED, 1))
    return 0


def cpu_main(args) -> int:
    stages = (args.stages or "baseline,fast,cb").split(",")
    counts = [int(c) for c in (args.streams or "1,4").split(",")]
    new_tokens = args.new_tokens or 128
    loaded = build_cpu_model(args.dtype)
    ids = text_prompt(loaded, "Write a long story about a dragon who learns to cook.")
    if args.prompt_len:
        ids = random_prompt(args.prompt_len, 0, int(loaded.model.config.vocab_size))
    engines = {}
    if "fast" in stages:
        engines["fast"] = start(loaded, EngineOptions(backend="fast"), "fast_cpu")
    if "fast1t" in stages:
        engines["fast1t"] = start(loaded, EngineOptions(backend="fast", cpu_threads=1), "fast1t_cpu")
    if "cb" in stages:
        engines["cb"] = start(loaded, EngineOptions(backend="cb"), "cb_cpu")
    params = SamplingParams(temperature=0, max_new_tokens=new_tokens)
    try:
        for round_no in range(args.rounds):
            prompt = ids[:-1] + [ids[-1]] if round_no == 0 else \
                text_prompt(loaded, f"Write a long story about a dragon who learns to cook, part {round_no + 1}.")
            if "baseline" in stages:
                hf_generate_streamer(loaded, prompt, new_tokens, "baseline_hf_generate_streamer_cpu", round=round_no)
            for name, engine in engines.items():
                engine_streams(engine, [prompt], new_tokens, params, f"{name}_cpu", round=round_no)
        for name, engine in engines.items():
            for n in counts:
                if n > 1:
                    engine_streams(engine, [ids] * n, new_tokens, params, f"{name}_cpu")
    finally:
        for engine in engines.values():
            stop(engine)
    say(stage="done", seconds=round(time.time() - STARTED, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
