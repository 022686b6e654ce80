"""Architecture benchmark (GPU): each architecture the fast path serves, real shape, vs transformers.

Development script; its shapes are 7-12B.

For each architecture (one at a time, so that one copy of its weights is on the GPU at a time) it builds a
model with random fp16 weights of the real shape (configs written here, no download), saves it as a
checkpoint (safetensors, with a small BPE tokenizer trained on the spot, ``gpu_acceptance.make_tokenizer``)
in a folder under ``--models-dir``, and measures, with baselines from the same run:
- ``fast``: the app's own start-up on that folder (``load_settings(["--model", "PATH,name=ARCH,
  template=vicuna_v1.1,ctx=4096"])`` -> ``build_runtime`` -> background load, memory plan, warm-up; as
  ``gpu_acceptance.py`` starts Vicuna), its time (``startup_s``), back end and KV pool, then 1 and 64
  concurrent streams of random token ids through the engine it started. The app sizes the KV pool from the
  free memory (a share of it with ``kv=F``; it has no flag for a byte count), so ``kv_tokens_same_memory``
  is what the started engine's own block rule (``kv_bytes // bytes per block`` blocks, one whole context at
  least) gives for ``--kv-gib`` bytes: how many conversations each architecture holds in the same memory;
- then, the app stopped and its memory freed, on the model loaded back from the checkpoint:
  ``agreement``: teacher-forced argmax agreement of the fast path's kernel prefill and decode step with
  transformers' own forward on the same weights (4 sequences, 32 decoded positions each), and the largest
  logit gap where they disagree (random weights give small margins: fp16 rounding flips a few);
  ``cb``: transformers' continuous batching (CUDA graphs) through ``LocalEngine``, 1 and 64 streams;
  then the checkpoint folder is deleted;
- ``bandwidth`` (once): a device copy, which gives each model's one-stream floor (bytes read per token).
A summary line per architecture says one stream / floor (``one_stream_of_floor``: the reply's wall clock, its
prompt's prefill included; ``one_stream_decode_of_floor``: the decode rate alone, which is what the floor
bounds), 64 streams / continuous batching, KV tokens relative to Vicuna-7B and the start-up time. Every
stage has a time limit and the whole run a budget, so it always ends and writes what it measured (JSON
lines, printed and appended to ``--out``). Needs torch and transformers, not gradio.

    # each architecture in its own process (an H100: ~1-1.5 min each, saving 13-24 GB included)
    for a in vicuna-7b llama3-8b qwen3-8b mistral-7b-v0.1 qwen2.5-7b gemma2-9b gemma3-12b; do
        rm -rf /tmp/arch-ckpt; timeout 190 python3 benchmarks/arch_bench.py --archs $a --budget-s 140 \
            --stage-s 90 --models-dir /tmp/arch-ckpt --out benchmarks/results/DATE_h100_arch_bench.jsonl; done
    python3 benchmarks/arch_bench.py --tiny        # every architecture's 2-layer twin on CPU: checks the script
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
from vicuna_demo.engines.memory import ALLOC_CONF, kv_bytes_per_token  # noqa: E402

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", ALLOC_CONF)    # before CUDA starts, as the app's start-up sets it

import torch  # noqa: E402
import engine_bench as eb  # noqa: E402
import transformers as tf  # noqa: E402

from conversation_templates import get_template  # noqa: E402
from gpu_acceptance import make_tokenizer  # noqa: E402
from vicuna_demo.config import load_settings  # noqa: E402
from vicuna_demo.engines.fastpath import FastModel, FastOptions, unsupported_reason  # noqa: E402
from vicuna_demo.engines.local import EngineOptions, LocalEngine  # noqa: E402
from vicuna_demo.engines.protocol import SamplingParams  # noqa: E402
from vicuna_demo.loading import LoadedModel  # noqa: E402
from vicuna_demo.services.runtime import build_runtime  # noqa: E402

say = eb.say


def _llama3_rope():
    return {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


# The real shapes (from each model's published config.json), most important first.
ARCHS = {
    "vicuna-7b": lambda: tf.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                        num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                        max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama3-8b": lambda: tf.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                        max_position_embeddings=131072, rms_norm_eps=1e-5,
                                        rope_parameters=_llama3_rope()),
    "qwen3-8b": lambda: tf.Qwen3Config(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                                       num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                       vocab_size=151936, max_position_embeddings=40960, rms_norm_eps=1e-6,
                                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "gemma2-9b": lambda: tf.Gemma2Config(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                                         num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                                         vocab_size=256000, max_position_embeddings=8192, sliding_window=4096,
                                         query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                                         final_logit_softcapping=30.0),
    "gemma3-12b": lambda: tf.Gemma3TextConfig(hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
                                              num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                                              vocab_size=262208, max_position_embeddings=131072,
                                              sliding_window=1024, query_pre_attn_scalar=256),
    "mistral-7b-v0.1": lambda: tf.MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                                num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                                                max_position_embeddings=32768, sliding_window=4096),
    "qwen2.5-7b": lambda: tf.Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                         num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                         max_position_embeddings=32768, rms_norm_eps=1e-6,
                                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
}


class StageTimeout(Exception):
    pass


class Stage:
    """Run a block with a time limit (SIGALRM in the main thread); a failure or timeout is recorded, not raised."""

    def __init__(self, name: str, arch: str, limit_s: float):
        self.name, self.arch, self.limit = name, arch, max(1, int(limit_s))

    def __enter__(self):
        def fire(*_):
            raise StageTimeout(f"{self.name} ran past {self.limit} s")
        signal.signal(signal.SIGALRM, fire)
        signal.alarm(self.limit)
        self.started = time.perf_counter()
        return self

    def __exit__(self, kind, exc, tb):
        signal.alarm(0)
        if exc is not None:
            say(stage=f"{self.name}_failed", arch=self.arch, error=f"{kind.__name__}: {exc}"[:400],
                seconds=round(time.perf_counter() - self.started, 1))
            return not issubclass(kind, KeyboardInterrupt)
        return False


DEVICE = "cuda"
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=320)


class _Skip:
    def __enter__(self):
        raise _SkipBlock

    def __exit__(self, *exc):
        return True


class _SkipBlock(Exception):
    pass


def context() -> int:
    """The context window every architecture is served with (``ctx=`` in its spec), as before on a bare engine."""
    return 4096 if DEVICE == "cuda" else 512


def dtype() -> torch.dtype:
    return torch.float16 if DEVICE == "cuda" else torch.float32


def config_of(arch: str):
    """The architecture's config: its real shape on the GPU; ``--tiny``: a 2-layer twin."""
    config = ARCHS[arch]()
    if DEVICE != "cuda":
        for key, value in TINY.items():
            setattr(config, key, value)
        if getattr(config, "head_dim", None):
            config.head_dim = 16
        if getattr(config, "sliding_window", None):
            config.sliding_window = 48
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:2]
    return config


def build(arch: str):
    """The architecture's model with random weights (fp16 on the GPU; ``--tiny``: a 2-layer fp32 twin on CPU)."""
    torch.manual_seed(0)
    config = config_of(arch)
    with torch.device(DEVICE):
        return tf.AutoModelForCausalLM.from_config(config, dtype=dtype()).eval()


def save_checkpoint(model, folder: Path) -> None:
    """The model as the app reads a local folder: save_pretrained (safetensors) and a small BPE tokenizer
    (``gpu_acceptance.make_tokenizer``) whose special tokens the config names."""
    tokenizer = make_tokenizer(int(model.config.get_text_config().vocab_size))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.config, key, getattr(tokenizer, key))
    if model.generation_config is not None:
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(model.generation_config, key, getattr(tokenizer, key))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)            # safetensors (transformers 5 writes nothing else)
    tokenizer.save_pretrained(folder)


def load_back(arch: str, folder: Path) -> LoadedModel:
    """The checkpoint loaded again, in process, for the baselines (``agreement``, ``cb``)."""
    model = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype(), device_map=DEVICE).eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(folder)
    return LoadedModel(name=arch, source=str(folder), model=model, tokenizer=tokenizer,
                       template=get_template("vicuna_v1.1"), context_window=context(),
                       eos_token_ids=frozenset(), device=DEVICE, dtype=str(dtype()).removeprefix("torch."),
                       load_8bit=False)


def free_gpu() -> float | None:
    """Collect garbage and return the allocator's cache; GiB still allocated on the GPU (None on CPU). A warm
    engine froze everything alive then (``gc.freeze`` in ``LocalEngine.warmup``), so a stopped engine's
    reference cycles, and the weights they hold, are collectable only after ``gc.unfreeze``."""
    gc.unfreeze()
    gc.collect()
    if DEVICE != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return round(torch.cuda.memory_allocated() / 2**30, 2)


def read_bytes(model) -> int:
    """Bytes one decode step reads: every weight but an untied input embedding (one row of it is read)."""
    embed = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight.data_ptr() == embed.data_ptr()
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total if tied else total - embed.numel() * embed.element_size()


def agreement(loaded: LoadedModel, arch: str, n_seqs: int = 4, steps: int = 32) -> dict:
    """Teacher-forced: prefill each prompt, then ``steps`` decode steps fed the sequence's own next tokens, on
    the fast path's kernels (the step CUDA graphs capture); argmax compared with transformers' forward."""
    model = loaded.model
    vocab = int(model.config.get_text_config().vocab_size)
    g = torch.Generator().manual_seed(5)
    prompts = [100, 128, 64, 150][:n_seqs]
    seqs = [torch.randint(3, min(vocab, 32000), (p + steps,), generator=g).tolist() for p in prompts]
    runner = FastModel(model, 512, FastOptions(max_rows=n_seqs, pipeline=False))
    runner.allocate_cache(n_seqs * runner.blocks_per_row + 1)
    tables = [list(range(1 + i * runner.blocks_per_row, 1 + (i + 1) * runner.blocks_per_row)) for i in range(n_seqs)]
    same = total = 0
    worst_gap = 0.0
    with torch.inference_mode():
        want = [model(torch.tensor([s], device=DEVICE)).logits[0].float() for s in seqs]

        def compare(got, ref):
            nonlocal same, total, worst_gap
            a, b = int(got.argmax()), int(ref.argmax())
            total += 1
            same += a == b
            worst_gap = max(worst_gap, float(ref[b] - ref[a]))

        first = runner.prefill([(s[:p], t, 0) for s, p, t in zip(seqs, prompts, tables)])
        for i, p in enumerate(prompts):
            compare(first[i], want[i][p - 1])
        runner.active.zero_()
        runner.active[:n_seqs] = 1
        for i, t in enumerate(tables):
            runner.table[i, :len(t)] = torch.tensor(t, dtype=torch.int32)
        step = runner._decode_kernels if runner.use_kernels else runner._decode_torch
        for n in range(steps - 1):
            runner.tokens[:n_seqs] = torch.tensor([s[p + n] for s, p in zip(seqs, prompts)])
            runner.pos[:n_seqs] = torch.tensor([p + n for p in prompts])
            logits = step(n_seqs)
            for i, p in enumerate(prompts):
                compare(logits[i], want[i][p + n])
    kernels = runner.use_kernels
    runner.release()
    del runner
    record = dict(stage="agreement", arch=arch, kernels=kernels, positions=total, argmax_agree=round(same / total, 4),
                  max_gap_where_different=round(worst_gap, 4))
    say(**record)
    return record


def streams(engine: LocalEngine, label: str, arch: str, counts, prompt_len: int, new_tokens: int, vocab: int):
    out = {}
    for n in counts:
        base = next(eb.SEEDS)
        prompts = [eb.random_prompt(prompt_len, base + i, min(vocab, 32000)) for i in range(n)]
        params = SamplingParams(temperature=0, max_new_tokens=new_tokens)
        result = eb.engine_streams(engine, prompts, new_tokens, params, label, arch=arch)
        out[n] = result.get("aggregate_tok_s")
        out[f"{n}_decode"] = result.get("per_stream_decode_tok_s_median")
    return out


def start(loaded: LoadedModel, options: EngineOptions, label: str, arch: str) -> LocalEngine:
    started = time.perf_counter()
    engine = LocalEngine(loaded, options)
    engine.warmup(progress=lambda m: None)
    fast = engine.fast_path
    say(stage=f"{label}_warmup", arch=arch, seconds=round(time.perf_counter() - started, 1), backend=engine.backend,
        status=engine.status, kv_tokens=fast.kv_tokens if fast is not None else None,
        graphs=len(fast.runner.graphs) if fast is not None else None)
    return engine


def tokens_in(engine, kv_bytes: int, kv_per_token: int | None = None) -> int | None:
    """Tokens the started engine's fast-path KV pool holds when given ``kv_bytes``: the scheduler's rule
    (``kv_bytes // bytes per block`` blocks, at least one whole context, block 0 the trash block); with
    ``kv_per_token``, what the same pool would hold for a model of that many KV bytes per token."""
    fast = engine.fast_path
    if fast is None:
        return None
    runner = fast.runner
    per_block = runner.kv_bytes_per_block() if kv_per_token is None else kv_per_token * runner.block
    blocks = max(max(1, kv_bytes // per_block), runner.blocks_per_row + 1)
    return (blocks - 1) * runner.block


def start_app(folder: Path, arch: str, summary: dict, wait_s: float):
    """The app's start-up on the checkpoint, as a user starts it (``--model PATH,name=...``): returns the
    runtime and its engine once ready (raises with the model's status when it did not start)."""
    spec = f"{folder},name={arch},template=vicuna_v1.1,ctx={context()}" + ("" if DEVICE == "cuda" else ",device=cpu")
    argv = ["--model", spec, "--moderation", "off", "--rate-limit", "0", "--log-dir", ""]
    settings = load_settings(argv, environ={})
    started = time.perf_counter()
    runtime = build_runtime(settings)
    try:
        ready = runtime.wait_ready(wait_s)
        seconds = round(time.perf_counter() - started, 1)
        proxy = runtime.service.engines[arch]
        engine = proxy.engine
        if not ready or engine is None:
            raise RuntimeError(f"not ready after {seconds} s: {proxy.status}")
        fast = engine.fast_path
        plan = runtime.startup.kv_plan.get(arch, {}) if runtime.startup is not None else {}
        record = dict(stage="fast_startup", arch=arch, seconds=seconds, argv=argv, backend=engine.backend,
                      status=engine.status, kv_tokens=engine.kv_tokens, kv_bytes=plan.get("kv_bytes"),
                      graphs=len(fast.runner.graphs) if fast is not None else None)
        if plan.get("kv_bytes") and fast is not None:    # the rule reproduces the app's own pool
            record["kv_rule_checked"] = tokens_in(engine, plan["kv_bytes"]) == engine.kv_tokens
        say(**record)
        summary["startup_s"], summary["backend"] = seconds, engine.backend
        return runtime, engine
    except BaseException:
        runtime.close()
        raise


def copy_bandwidth() -> float:
    """GB/s of a device-to-device copy (engine_bench.copy_gb_s), recorded as the run's bandwidth stage."""
    bw = eb.copy_gb_s()
    say(stage="bandwidth", copy_gb_s=round(bw, 1))
    torch.cuda.empty_cache()
    return bw


def bench_arch(arch: str, args, deadline: float, bw_gbs: float | None) -> None:
    left = lambda: deadline - time.monotonic()  # noqa: E731
    summary: dict = {"stage": "summary", "arch": arch}
    counts = [int(c) for c in args.streams.split(",")]
    folder = Path(tempfile.mkdtemp(prefix=f"{arch}-", dir=args.models_dir))
    SAVED[:] = [folder]
    vocab = None
    try:
        with Stage("build", arch, min(120, left())):          # build and save
            started = time.perf_counter()
            model = build(arch)
            summary["unsupported_reason"] = unsupported_reason(model)
            summary["params_b"] = round(model.num_parameters() / 1e9, 2)
            if bw_gbs:
                summary["floor_tok_s"] = round(bw_gbs * 1e9 / read_bytes(model), 1)
            built = time.perf_counter()
            save_checkpoint(model, folder)
            vocab = int(model.config.get_text_config().vocab_size)
            say(stage="build", arch=arch, seconds=round(built - started, 1), params_b=summary["params_b"],
                read_gb=round(read_bytes(model) / 1e9, 2), fast_path=summary["unsupported_reason"] or "supported",
                saved_s=round(time.perf_counter() - built, 1), folder=str(folder),
                saved_gb=round(sum(f.stat().st_size for f in folder.iterdir()) / 1e9, 2))
        model = None
        free_gpu()
        if vocab is None:
            return
        prompt_vocab = min(vocab, len(tf.AutoTokenizer.from_pretrained(folder)))   # ids the tokenizer knows
        served = lambda: None  # noqa: E731 - the app's model, once started (weakly held)
        if "fast" in args.stages and left() > 30:
            with Stage("fast", arch, min(args.stage_s, left())):
                runtime, engine = start_app(folder, arch, summary, min(args.stage_s, left()))
                served = weakref.ref(engine.model)
                try:
                    summary["kv_tokens_app"] = engine.kv_tokens
                    kv_bytes = int(args.kv_gib * 2**30)
                    summary["kv_tokens_same_memory"] = tokens_in(engine, kv_bytes)
                    vicuna = tokens_in(engine, kv_bytes, kv_bytes_per_token(config_of("vicuna-7b"),
                                                                            dtype().itemsize))
                    if summary["kv_tokens_same_memory"] and vicuna:    # Vicuna-7B by the same rule: any process
                        summary["kv_vs_vicuna_7b"] = round(summary["kv_tokens_same_memory"] / vicuna, 2)
                    summary["fast_tok_s"] = streams(engine, "fast", arch, counts, args.prompt_len, args.new_tokens,
                                                    prompt_vocab)
                finally:
                    runtime.close()
                    runtime = engine = None
            say(stage="fast_stopped", arch=arch, gpu_allocated_gib=free_gpu(), model_freed=served() is None)
        loaded = None
        if {"agreement", "cb"} & args.stages and left() > 30:
            with Stage("load_back", arch, min(args.stage_s, left())):
                started = time.perf_counter()
                loaded = load_back(arch, folder)
                say(stage="load_back", arch=arch, seconds=round(time.perf_counter() - started, 1))
        if "agreement" in args.stages and loaded is not None and summary.get("unsupported_reason") is None \
                and left() > 30:
            with Stage("agreement", arch, min(args.stage_s, left())):
                summary["argmax_agree"] = agreement(loaded, arch)["argmax_agree"]
        free_gpu()
        if "cb" in args.stages and loaded is not None and left() > 30:
            with Stage("cb", arch, min(args.stage_s, left())):
                engine = start(loaded, EngineOptions(backend="cb", use_cuda_graph=DEVICE == "cuda" or None), "cb", arch)
                try:
                    summary["cb_tok_s"] = streams(engine, "cb", arch, counts, args.prompt_len, args.cb_new_tokens,
                                                  prompt_vocab)
                finally:
                    eb.stop(engine)
                    engine = None
        loaded = None
        free_gpu()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    fast, cb = summary.get("fast_tok_s") or {}, summary.get("cb_tok_s") or {}
    one, many = counts[0], counts[-1]
    if fast.get(one) and summary.get("floor_tok_s"):       # wall clock (prefill included), and decode alone
        summary["one_stream_of_floor"] = round(fast[one] / summary["floor_tok_s"], 3)
        if fast.get(f"{one}_decode"):
            summary["one_stream_decode_of_floor"] = round(fast[f"{one}_decode"] / summary["floor_tok_s"], 3)
    if fast.get(many) and cb.get(many):
        summary[f"x_cb_at_{many}"] = round(fast[many] / cb[many], 2)
    say(**summary)


SAVED: list[Path] = []     # the checkpoint folder of the architecture being measured


def abort() -> None:
    """The last resort when something hangs: delete the checkpoint (the disk holds few) and end the process."""
    say(stage="abort", reason="budget exceeded")
    for folder in SAVED:
        shutil.rmtree(folder, ignore_errors=True)
    os._exit(3)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="append the JSON lines here too")
    parser.add_argument("--archs", default=",".join(ARCHS), help="comma-separated, from: " + ", ".join(ARCHS))
    parser.add_argument("--budget-s", type=float, default=460, help="the whole run ends by then (default 460)")
    parser.add_argument("--stage-s", type=float, default=120, help="time limit of one stage (default 120)")
    parser.add_argument("--streams", default="1,64")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--cb-new-tokens", type=int, default=48)
    parser.add_argument("--kv-gib", type=float, default=16.0,
                        help="the KV memory in which architectures' tokens are compared (16: 32,704 Vicuna-7B tokens)")
    parser.add_argument("--models-dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="each architecture's checkpoint is saved in a folder here, then deleted (a 12B: 24 GB)")
    parser.add_argument("--tiny", action="store_true", help="a smoke run of this script on CPU with 2-layer twins")
    parser.add_argument("--stages", default="fast,agreement,cb", help="which of fast, agreement, cb to run "
                        "(default all; the build, the checkpoint and the summary always)")
    args = parser.parse_args(argv)
    args.stages = set(args.stages.split(","))
    args.models_dir.mkdir(parents=True, exist_ok=True)
    global DEVICE
    if args.tiny:
        DEVICE, args.streams, args.new_tokens, args.cb_new_tokens, args.kv_gib = "cpu", "1,4", 8, 8, 0.01
    elif not torch.cuda.is_available():
        print("arch_bench needs a CUDA GPU (or --tiny; tests/test_architectures.py checks the architectures on CPU)")
        return 2
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        eb.OUT_FILE = args.out
    eb.DEVICE_NAME = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu"
    deadline = time.monotonic() + args.budget_s
    # the last resort: whatever hangs, the process ends soon after its budget
    threading.Timer(args.budget_s + 45, abort).start()
    say(stage="start", torch=torch.__version__, transformers=tf.__version__, archs=args.archs,
        budget_s=args.budget_s, command=" ".join(sys.argv))
    bw = None
    if DEVICE == "cuda":
        with Stage("bandwidth", "-", 60):
            bw = copy_bandwidth()
    for arch in args.archs.split(","):
        if deadline - time.monotonic() < 45:
            say(stage="skipped", arch=arch, reason="out of budget")
            continue
        bench_arch(arch, args, deadline, bw)
    say(stage="done", seconds=round(time.time() - eb.STARTED, 1))
    os._exit(0)        # the timer thread and any stuck engine thread end with the process


if __name__ == "__main__":
    sys.exit(main())
