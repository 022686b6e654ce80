"""Quantized fast path benchmark: 4-bit (NF4) and 8-bit weights against fp16, with their baselines.

On a GPU, with random weights of the real Vicuna shapes (no download; decoding speed does not depend on
the values), 512-token prompts and 256 new tokens, EOS disabled:

- ``fp16``, ``nf4``, ``int8`` (7B): the fp16 fast path (1 / 8 / 64 streams); the same weights quantized in memory exactly as
  ``--model ...,4bit`` loads them (bitsandbytes NF4, double-quantized scales, fp16 compute, lm_head kept in
  fp16): plain ``generate`` + streamer (the baseline), then the fast path; the same for 8-bit (LLM.int8,
  threshold 6). Weight memory of each. Correctness: tokens the fast path generated for 16 streams are fed
  to a forward of the same model with the de-quantized weights in fp16 (teacher forcing); its argmax must
  agree, and each disagreement must be a near-tie (the logit gap is reported). fp16 is checked the same
  way against its own weights, as the noise floor.
- ``card13`` / ``card33``: Vicuna-13B / 33B shapes in 4-bit on a simulated 16 GB / 24 GB card (everything
  beyond the card's size is held in one allocation before anything else), built layer by layer on the GPU
  and quantized by bitsandbytes (no checkpoint), then 8 / 4 concurrent streams through the engine.

Prints one JSON line per measurement (``--out FILE`` appends them there too); asserts nothing.

    python benchmarks/quant_bench.py --out quant.jsonl                    # all stages (~7 min on an H200)
    python benchmarks/quant_bench.py --stages fp16,nf4 --streams 1,8,64
    python benchmarks/quant_bench.py --tiny --new-tokens 16 --prompt-len 40   # CPU dry run on tiny shapes
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")   # as the app's start-up sets it

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine_bench as eb  # noqa: E402  (its helpers: say, engine_streams, random prompts, the generate baseline)

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from conversation_templates import get_template  # noqa: E402
from vicuna_demo.engines.local import EngineOptions, LocalEngine  # noqa: E402
from vicuna_demo.engines.protocol import SamplingParams  # noqa: E402
from vicuna_demo.loading import LoadedModel  # noqa: E402

SHAPES = {   # hidden, intermediate, layers, heads (LLaMA / Vicuna v1.5 sizes; 33B is LLaMA-1 30B's shape, and
            # like vicuna-33b-v1.3 has a 2,048-token context: one 4,096-token context of its KV cache is 6.5 GiB)
    "7b": (4096, 11008, 32, 32), "13b": (5120, 13824, 40, 40), "33b": (6656, 17920, 60, 52),
    "tiny": (256, 512, 2, 4),
}


def llama_config(size: str) -> LlamaConfig:
    hidden, inter, layers, heads = SHAPES[size]
    return LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, vocab_size=32000,
                       max_position_embeddings=2048 if size in ("tiny", "33b") else 4096, rms_norm_eps=1e-5,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)


def device_dtype() -> tuple[str, torch.dtype]:
    return ("cuda", torch.float16) if torch.cuda.is_available() else ("cpu", torch.float32)


_TOKENIZER = []


def bench_tokenizer():
    """A real (fast) tokenizer over the model's 32,000 ids, made offline: one word per id ("w123")."""
    if not _TOKENIZER:
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast
        vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 32000)}}
        inner = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        _TOKENIZER.append(PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="<unk>", bos_token="<s>",
                                                  eos_token="</s>", pad_token="<unk>"))
    return _TOKENIZER[0]


def loaded_model(model, name: str, dtype: str) -> LoadedModel:
    device, _ = device_dtype()
    return LoadedModel(name=name, source="random", model=model, tokenizer=bench_tokenizer(),
                       template=get_template("vicuna_v1.1"), context_window=model.config.max_position_embeddings,
                       eos_token_ids=frozenset(), device=device, dtype=dtype, load_8bit=dtype == "int8",
                       load_4bit=dtype == "nf4")


def weight_bytes(model) -> int:
    """Bytes of the model's tensors: parameters, buffers and bitsandbytes' scales (not parameters)."""
    seen, total = set(), 0
    tensors = list(model.parameters()) + list(model.buffers())
    for module in model.modules():
        qs = getattr(getattr(module, "weight", None), "quant_state", None)
        if qs is not None:
            tensors += [qs.absmax] + ([qs.state2.absmax, qs.state2.code] if qs.nested else [])
        scb = getattr(getattr(module, "weight", None), "SCB", None)
        if scb is not None:
            tensors.append(scb)
    for t in tensors:
        if t is not None and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def linear4(weight: torch.Tensor):
    """bitsandbytes' Linear4bit as ``BitsAndBytesConfig(load_in_4bit, nf4, double quant, fp16)`` makes it."""
    import bitsandbytes as bnb
    out_f, in_f = weight.shape
    module = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=weight.dtype, compress_statistics=True,
                               quant_type="nf4", device="meta")
    module.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True,
                                      module=module)
    module.weight._quantize(weight.device)
    return module


def quantize_4bit(model) -> None:
    """Every Linear but lm_head becomes NF4, in place (what transformers' bitsandbytes loader leaves)."""
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                if type(child) is torch.nn.Linear and not (name == "" and child_name == "lm_head"):
                    setattr(module, child_name, linear4(child.weight.data))
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def build_4bit_direct(size: str):
    """A random-weight model of ``size`` with NF4 projections, built layer by layer on the device (each
    projection exists in fp16 only while it is quantized), as a 4-bit checkpoint would load."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    device, dtype = device_dtype()
    config = llama_config(size)
    torch.set_default_dtype(dtype)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                if type(child) is torch.nn.Linear and not (name == "" and child_name == "lm_head"):
                    w = torch.randn(child.out_features, child.in_features, device=device, dtype=dtype) * 0.02
                    setattr(module, child_name, linear4(w))
                    del w
        for module in model.modules():
            for pname, p in list(module.named_parameters(recurse=False)):
                if p.is_meta:
                    real = torch.ones(p.shape, dtype=dtype, device=device) if p.dim() == 1 else \
                        torch.randn(p.shape, dtype=dtype, device=device) * 0.02
                    module._parameters[pname] = torch.nn.Parameter(real, requires_grad=False)
        with torch.device(device):
            model.model.rotary_emb = LlamaRotaryEmbedding(config=config)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()      # the fp16 temporaries' blocks go back: a real card has no such cache
    return model


def dequantized_into(reference, quantized) -> None:
    """Set each projection of ``reference`` (an fp16 twin) to the de-quantized weight of ``quantized``."""
    import bitsandbytes.functional as bf
    from vicuna_demo.engines.fastpath.weights import _int8_parts
    ref_modules = dict(reference.named_modules())
    with torch.no_grad():
        for name, module in quantized.named_modules():
            kind = type(module).__name__
            if kind == "Linear4bit":
                w = bf.dequantize_4bit(module.weight.data, module.weight.quant_state)
            elif kind == "Linear8bitLt":
                q = _int8_parts(module)
                w = q.data.float() * q.scale[:, None]
            else:
                continue
            ref_modules[name].weight.data.copy_(w.to(ref_modules[name].weight.dtype))


def fast_of(engine: LocalEngine):
    """The engine's fast-path scheduler (None on another back end)."""
    from vicuna_demo.engines.fastpath import FastScheduler
    backend = getattr(engine, "_backend", None) or getattr(engine, "_fast", None)
    return backend if isinstance(backend, FastScheduler) else None


def teacher_forced(engine: LocalEngine, reference, label: str, streams: int = 16, new: int = 64) -> dict:
    """Greedy tokens of ``streams`` concurrent requests, each checked against ``reference``'s argmax."""
    from vicuna_demo.engines.fastpath import Job
    fast = fast_of(engine)
    vocab = int(reference.config.vocab_size)
    lengths = [40 + (i * 97) % 560 for i in range(streams)]
    prompts = [eb.random_prompt(n, 500 + i, vocab) for i, n in enumerate(lengths)]
    results = [([], threading.Event()) for _ in prompts]
    for i, (ids, (tokens, done)) in enumerate(zip(prompts, results)):
        fast.submit(Job(request_id=f"tf-{label}-{i}", ids=ids, max_new=new, temperature=0.0, top_p=1.0,
                        eos=frozenset(), emit=lambda t, f, e, tokens=tokens, done=done: (tokens.extend(t),
                                                                                       f and done.set())))
    agree = total = 0
    gaps, margins = [], []
    device = next(reference.parameters()).device
    for ids, (tokens, done) in zip(prompts, results):
        done.wait(300)
        seq = torch.tensor([ids + tokens], device=device)
        with torch.inference_mode():
            logits = reference(seq).logits[0, len(ids) - 1:len(ids) - 1 + len(tokens)].float()
        got = torch.tensor(tokens, device=device)
        top2 = logits.topk(2, dim=-1).values
        margins += (top2[:, 0] - top2[:, 1]).tolist()
        best = logits.argmax(-1)
        agree += int((best == got).sum())
        total += len(tokens)
        wrong = (best != got).nonzero().flatten()
        gaps += (logits[wrong, best[wrong]] - logits[wrong, got[wrong]]).tolist()
    margins.sort()
    record = dict(stage=f"{label}_teacher_forced", streams=streams, tokens=total,
                  agreement=round(agree / max(1, total), 4), disagreements=len(gaps),
                  largest_gap=round(max(gaps), 4) if gaps else 0.0, gaps=[round(g, 4) for g in sorted(gaps)[-8:]],
                  median_top1_top2_margin=round(margins[len(margins) // 2], 4) if margins else None)
    eb.say(**record)
    return record


def tuning_summary(engine: LocalEngine) -> dict:
    runner = fast_of(engine).runner if fast_of(engine) is not None else None
    detail = getattr(runner, "tuning_detail", {}) or {}
    return {f"{shape[0]}x{shape[1]} {kind} rows={rows}": us for (shape, kind, rows), us in detail.items()}


def tuning_record(engine: LocalEngine, stage: str) -> None:
    """Every candidate's time per projection shape, and the candidates that disagreed or raised."""
    runner = fast_of(engine).runner if fast_of(engine) is not None else None
    eb.say(stage=stage, us_per_projection=tuning_summary(engine), rejected=getattr(runner, "rejected_configs", {}),
           failed=getattr(runner, "failed_configs", {}))


def streams_stage(engine, label: str, counts, args, vocab: int, repetition_penalty: float = 1.0) -> None:
    params = SamplingParams(temperature=0.0, max_new_tokens=args.new_tokens, repetition_penalty=repetition_penalty)
    for n in counts:
        if eb.out_of_time(args):
            return
        base = next(eb.SEEDS)
        eb.engine_streams(engine, [eb.random_prompt(args.prompt_len, base + i, vocab) for i in range(n)],
                          args.new_tokens, params, label)


def free_gib() -> float | None:
    return round(torch.cuda.mem_get_info()[0] / 2**30, 2) if torch.cuda.is_available() else None


# 7B stages: a KV pool of 76,800 tokens (64 streams x 768 need 49,152), so that the fp16 reference forward of
# the correctness check finds memory beside the engine (a pool of all free memory left none for cuBLAS).
SEVEN_B_OPTIONS = EngineOptions(backend="fast", kv_blocks=1200)
CTX: dict = {}      # what the 7B stages share: the fp16 model (later the de-quantized reference) and its twins


def fp16_model(args):
    """The random fp16 7B model (seeded: every stage's process builds the same weights)."""
    if "model16" not in CTX:
        size = "tiny" if args.tiny else "7b"
        device, dtype = device_dtype()
        torch.manual_seed(0)
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model16 = LlamaForCausalLM(llama_config(size)).eval()
        torch.set_default_dtype(torch.float32)
        CTX.update(model16=model16, size=size, fp16_bytes=weight_bytes(model16))
        eb.say(stage="build", model=f"{size} random {dtype}", weights_gib=round(CTX["fp16_bytes"] / 2**30, 3))
    return CTX["model16"]


def stage_fp16(args) -> None:
    model16 = fp16_model(args)
    engine = eb.start(loaded_model(model16, f"{CTX['size']}-fp16", "float16"), SEVEN_B_OPTIONS, "fp16")
    tuning_record(engine, "fp16_tuning")
    streams_stage(engine, "fp16_fast", [int(c) for c in args.streams.split(",")], args, model16.config.vocab_size)
    # the repetition penalty inside the captured decode step: speed at 1 and 64 streams, tokens against generate
    streams_stage(engine, "fp16_fast_penalty", [int(c) for c in args.streams.split(",")][::2], args,
                  model16.config.vocab_size, repetition_penalty=1.1)
    eb.penalty_agreement(engine, model16, "fp16")
    teacher_forced(engine, model16, "fp16")
    eb.stop(engine)


def stage_nf4(args) -> None:
    model16 = fp16_model(args)
    vocab = int(model16.config.vocab_size)
    started = time.time()
    model4 = copy.deepcopy(model16)
    quantize_4bit(model4)
    loaded4 = loaded_model(model4, f"{CTX['size']}-nf4", "nf4")
    nf4_bytes = weight_bytes(model4)
    eb.say(stage="nf4_quantize", seconds=round(time.time() - started, 1), weights_gib=round(nf4_bytes / 2**30, 3),
           fraction_of_fp16=round(nf4_bytes / CTX["fp16_bytes"], 4))
    eb.hf_generate_streamer(loaded4, eb.random_prompt(args.prompt_len, 1, vocab), args.baseline_tokens,
                            "nf4_generate_baseline")
    engine = eb.start(loaded4, SEVEN_B_OPTIONS, "nf4")
    tuning_record(engine, "nf4_tuning")
    streams_stage(engine, "nf4_fast", [int(c) for c in args.streams.split(",")], args, vocab)
    dequantized_into(model16, model4)
    teacher_forced(engine, model16, "nf4")
    eb.stop(engine)
    del model4, loaded4
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def stage_int8(args) -> None:
    model16 = fp16_model(args)
    if not torch.cuda.is_available():
        return
    started = time.time()
    loaded8 = eb.quantize_8bit(loaded_model(copy.deepcopy(model16), f"{CTX['size']}-int8", "int8"))
    int8_bytes = weight_bytes(loaded8.model)
    eb.say(stage="int8_quantize", seconds=round(time.time() - started, 1), weights_gib=round(int8_bytes / 2**30, 3),
           fraction_of_fp16=round(int8_bytes / CTX["fp16_bytes"], 4))
    engine = eb.start(loaded8, SEVEN_B_OPTIONS, "int8")
    tuning_record(engine, "int8_tuning")
    streams_stage(engine, "int8_fast", [int(c) for c in args.streams.split(",")], args, model16.config.vocab_size)
    dequantized_into(model16, loaded8.model)
    teacher_forced(engine, model16, "int8")
    eb.stop(engine)


def stage_card(args) -> None:
    """One simulated card: hold everything beyond ``--card-gb`` (decimal GB: the card's whole memory,
    the CUDA context included), then build the 4-bit model and serve one stream, then ``--card-streams``."""
    hold = None
    if torch.cuda.is_available():     # the card's memory holds our CUDA context too (measured by the parent)
        free, _ = torch.cuda.mem_get_info()
        hold = torch.empty(max(0, free - (int(args.card_gb * 1e9) - args.context_bytes)), dtype=torch.uint8,
                           device="cuda")
        eb.say(stage=f"card_{args.card_size}", card_gb=args.card_gb, held_gib=round(hold.numel() / 2**30, 2),
               free_gib=free_gib())
    started = time.time()
    torch.manual_seed(0)
    model = build_4bit_direct("tiny" if args.tiny else args.card_size)
    vocab = int(model.config.vocab_size)
    eb.say(stage=f"card_{args.card_size}_build", seconds=round(time.time() - started, 1),
           weights_gib=round(weight_bytes(model) / 2**30, 3), free_gib=free_gib())
    try:
        engine = eb.start(loaded_model(model, f"{args.card_size}-nf4", "nf4"), EngineOptions(backend="fast"),
                          f"card_{args.card_size}")
    except Exception as exc:  # noqa: BLE001 - the engine's one clear error, reported instead of a crash
        eb.say(stage=f"card_{args.card_size}_failed", error=str(exc)[:400], free_gib=free_gib())
        return
    eb.say(stage=f"card_{args.card_size}_ready", free_gib=free_gib(), status=engine.status)
    tuning_record(engine, f"card_{args.card_size}_tuning")
    streams_stage(engine, f"card_{args.card_size}_nf4", [1, args.card_streams], args, vocab)   # 1: the GEMV
    eb.say(stage=f"card_{args.card_size}_end", free_gib=free_gib(),
           peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if hold is not None else None)
    eb.stop(engine)
    del hold


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default="fp16,nf4,card13,card33,int8")
    parser.add_argument("--streams", default="1,8,64")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--baseline-tokens", type=int, default=64, help="tokens of the (slow) generate baseline")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: a dry run of the script on a CPU")
    parser.add_argument("--out")
    parser.add_argument("--budget-s", type=float, default=0)
    parser.add_argument("--card-size", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--card-gb", type=float, default=16.0, help=argparse.SUPPRESS)
    parser.add_argument("--card-streams", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument("--context-bytes", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--only", choices=("fp16", "nf4", "int8"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if os.environ.get("QUANT_BENCH_DEBUG"):      # which matmul candidate warm-up is timing, as it goes
        import logging
        logging.basicConfig(stream=sys.stderr, format="%(asctime)s %(message)s")
        logging.getLogger("vicuna_demo.engines.fastpath").setLevel(logging.DEBUG)
    eb.OUT_FILE = Path(args.out) if args.out else None
    if torch.cuda.is_available():     # before anything else: what this process's CUDA context takes
        free, total = torch.cuda.mem_get_info()
        args.context_bytes = args.context_bytes or total - free
        eb.DEVICE_NAME = torch.cuda.get_device_name(0)
    if args.card_size:
        stage_card(args)
        return 0
    # a 16 GB card shows 15.9-16.0 GiB (RTX 4080, RTX A4000), a 24 GB one 23.6-24.0 GiB (RTX 3090 / 4090);
    # the cloud's A10G / L4 show 22.5 GiB
    cards = {"card13": ("13b", 17.1, 8), "card33": ("33b", 25.6, 4), "card33a10g": ("33b", 24.1, 4)}
    stages = {"fp16": stage_fp16, "nf4": stage_nf4, "int8": stage_int8}
    if args.only:
        stages[args.only](args)
        return 0
    for stage in args.stages.split(","):
        if eb.out_of_time(args):
            eb.say(stage=stage, skipped="out of time")
            continue
        # each stage in a fresh process: a simulated card starts empty, and a fault ends one stage only
        cmd = [sys.executable, __file__, "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
               "--streams", args.streams, "--baseline-tokens", str(args.baseline_tokens),
               "--context-bytes", str(args.context_bytes)]
        cmd += (["--out", args.out] if args.out else []) + (["--tiny"] if args.tiny else [])
        if stage in cards:
            size, gb, n = cards[stage]
            cmd += ["--card-size", size, "--card-gb", str(gb), "--card-streams", str(n)]
        else:
            cmd += ["--only", stage]
        done = subprocess.run(cmd, env=os.environ.copy())
        if done.returncode:
            eb.say(stage=stage, failed=f"exit {done.returncode}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
