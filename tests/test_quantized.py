"""4-bit (and 8-bit) weights: the ``4bit`` spec word, a ``FOLDER,4bit`` spec loaded by the app and served by
both back ends (fast path, continuous batching) as ``generate`` would, batched fast-path replies on NF4
weights, and our Triton kernels for quantized weights checked against bitsandbytes in Triton's CPU
interpreter.

The model is a small Llama built in the test, saved, and loaded back through transformers with the
``BitsAndBytesConfig`` that ``loading.py`` builds for a ``4bit`` spec (bitsandbytes 0.50 runs NF4 on CPU),
so the greedy tokens of the fast path can be compared with plain ``generate`` on the same 4-bit model.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from vicuna_demo.config import ConfigError, ModelSpec, load_settings
from vicuna_demo.engines.fastpath import FastModel, FastOptions, FastScheduler, Job, nf4_lut
from vicuna_demo.loading import _quantization

ROOT = Path(__file__).resolve().parents[1]


def test_4bit_spec_word_and_flag_choose_nf4_and_exclude_8bit():
    assert ModelSpec.parse("lmsys/vicuna-13b-v1.5,4bit").load_4bit
    spec = ModelSpec.parse("lmsys/vicuna-13b-v1.5,4bit", default_8bit=True)     # the spec's word wins
    assert spec.load_4bit and not spec.load_8bit
    with pytest.raises(ConfigError, match="8bit or 4bit"):
        ModelSpec.parse("lmsys/vicuna-13b-v1.5,8bit,4bit")
    settings = load_settings(["--load-4bit", "--model", "a", "--model", "b,8bit", "--model", "c,fp16"], environ={})
    assert [(m.load_4bit, m.load_8bit) for m in settings.models] == [(True, False), (False, True), (False, False)]
    with pytest.raises(ConfigError, match="choose one"):
        load_settings(["--load-4bit", "--load-8bit"], environ={})
    config = _quantization(ModelSpec("a", load_4bit=True), torch.float16)["quantization_config"]
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_compute_dtype == torch.float16 and config.bnb_4bit_use_double_quant


@pytest.fixture(scope="module")
def nf4_model(tmp_path_factory):
    """A 2-layer Llama with NF4 weights as `--model FOLDER,4bit` would load it on a CPU."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.15)
    folder = tmp_path_factory.mktemp("nf4")
    LlamaForCausalLM(config).save_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="cpu",
                                                 **_quantization(ModelSpec(str(folder), load_4bit=True), torch.float32))
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    return model.eval()


class Reply:
    """A job's emit callback: the tokens, and an event set when the job ends (with its error, if any)."""

    def __init__(self):
        self.tokens: list[int] = []
        self.error: str | None = None
        self.done = threading.Event()

    def __call__(self, tokens, finished, error):
        self.tokens += tokens
        if finished:
            self.error = error
            self.done.set()


def test_fast_path_greedy_tokens_equal_generate_on_a_4bit_model(nf4_model):
    scheduler = FastScheduler(FastModel(nf4_model, 200, FastOptions()), name="nf4")
    scheduler.start()
    try:
        assert scheduler.wait_ready(60)
        torch.manual_seed(1)
        prompts = [torch.randint(3, 320, (n,)).tolist() for n in (9, 23, 14)]
        replies = [Reply() for _ in prompts]
        for i, (ids, reply) in enumerate(zip(prompts, replies)):      # submitted together: batched
            scheduler.submit(Job(request_id=f"q{i}", ids=ids, max_new=24, temperature=0.0, top_p=1.0,
                                 eos=frozenset(), emit=reply))
        for ids, reply in zip(prompts, replies):
            assert reply.done.wait(120) and reply.error is None
            inputs = torch.tensor([ids])
            with torch.inference_mode():
                want = nf4_model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=24,
                                          do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(ids):]
            assert reply.tokens == want.tolist()
        assert len({tuple(r.tokens) for r in replies}) == 3        # the prompts lead to different replies
    finally:
        scheduler.close()


@pytest.mark.parametrize("backend", ["fast", "cb"])
def test_4bit_spec_loads_nf4_and_every_back_end_streams_what_generate_says(tiny_llama_dir, backend):
    """The app's own loading of a `FOLDER,4bit` spec, then a reply through LocalEngine on each back end."""
    import bitsandbytes as bnb
    from vicuna_demo.engines.local import EngineOptions, LocalEngine
    from vicuna_demo.engines.protocol import SamplingParams
    from vicuna_demo.loading import load_model

    loaded = load_model(ModelSpec(str(tiny_llama_dir), load_4bit=True, template="vicuna_v1.1"))
    assert loaded.load_4bit and not loaded.load_8bit and loaded.dtype == "nf4"
    assert isinstance(loaded.model.model.layers[1].mlp.down_proj, bnb.nn.Linear4bit)
    engine = LocalEngine(loaded, EngineOptions(backend=backend))
    try:
        assert engine.backend == backend
        params = SamplingParams(temperature=0, max_new_tokens=8)
        prepared = engine.prepare([{"role": "user", "content": "Hello there"}], params)
        reply = engine.stream(prepared, params)
        text = "".join(reply)
        ids = torch.tensor([list(prepared.payload)])
        with torch.inference_mode():
            out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                        eos_token_id=sorted(loaded.eos_token_ids),
                                        pad_token_id=loaded.tokenizer.pad_token_id)
        assert reply.stats.n_tokens >= 1
        assert text == loaded.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    finally:
        engine.close()


KERNEL_CHECK = textwrap.dedent("""
    import torch
    import bitsandbytes as bnb
    import bitsandbytes.functional as bf
    from vicuna_demo.engines.fastpath import kernels_quant as kq
    from vicuna_demo.engines.fastpath.weights import _nf4_parts, _fuse_nf4, QuantWeight
    torch.manual_seed(0)

    def linear4(n, k, nested):
        m = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.float32, compress_statistics=nested,
                              quant_type="nf4")
        m.weight = bnb.nn.Params4bit(torch.randn(n, k) * 0.05, requires_grad=False, quant_type="nf4",
                                     compress_statistics=nested, module=m)
        m.weight._quantize("cpu")
        return m

    def reference(m):   # bitsandbytes' own de-quantization
        return bf.dequantize_4bit(m.weight.data, m.weight.quant_state).float()

    worst = {}
    def note(name, got, ref):
        worst[name] = max(worst.get(name, 0.0), ((got.float() - ref).abs().max() / ref.abs().max()).item())

    for nested in (False, True):
        m = linear4(96, 320, nested)       # 480 blocks of 64: the second group of 256 scales is partial
        q, w = _nf4_parts(m), reference(m)
        assert (q.absmax2 is not None) == nested
        note("dequantize", kq.dequantize(q, torch.float32), w)
        # the word view the tiled kernels decode (table loads in the interpreter, PTX on a GPU)
        assert q.words is not None and q.lut is not None and q.words.numel() * 8 == 96 * 320
        for rows in (1, 3, 17):    # one row: what serves it where NVRTC (the CUDA GEMV) is missing
            x = torch.randn(rows, 320).half()
            # the weight as the left operand: whole, and K in 2 / 3 parts (the last one shorter)
            note("tiled", kq.qmatmul(x, q, 16, 32, 128, 4, 3, "t", 1), x.float() @ w.half().float().T)
            note("tiled", kq.qmatmul(x, q, 32, 64, 128, 4, 3, "t", 2), x.float() @ w.half().float().T)
            note("tiled", kq.qmatmul(x, q, 16, 16, 128, 4, 3, "t", 3), x.float() @ w.half().float().T)
            # decoded in fp16, inputs loaded as one run, both; K in 2 parts with a partial last tile
            for variant in ("th", "tc", "thc"):
                note("tiled", kq.qmatmul(x, q, 16, 32, 128, 4, 3, variant, 1), x.float() @ w.half().float().T)
                note("tiled", kq.qmatmul(x, q, 32, 16, 256, 4, 3, variant, 2), x.float() @ w.half().float().T)
        # q/k/v fused into one weight: the modules become views of it and still compute what they did
        parts = [linear4(n, 256, nested) for n in (128, 64, 64)]
        before = [reference(p) for p in parts]
        fused = _fuse_nf4(parts)
        assert fused is not None and fused.shape == (256, 256)
        note("fused", kq.dequantize(fused, torch.float32), torch.cat(before))
        note("fused", torch.cat([reference(p) for p in parts]), torch.cat(before))
        assert parts[1].weight.data.data_ptr() == fused.data.data_ptr() + 128 * 128

    cb = torch.randint(-127, 128, (40, 192), dtype=torch.int8)
    scale = torch.rand(40) / 127
    q8, w8 = QuantWeight("int8", (40, 192), cb, scale=scale), cb.float() * scale[:, None]
    for rows in (2, 9, 33):
        x = torch.randn(rows, 192).half()
        note("int8 tiled", kq.qmatmul(x, q8, 16, 16, 64, 4, 3), x.float() @ w8.T)
        note("int8 tiled", kq.qmatmul(x, q8, 16, 16, 64, 4, 3, "t", 1), x.float() @ w8.T)
        note("int8 tiled", kq.qmatmul(x, q8, 16, 32, 64, 4, 3, "t", 2), x.float() @ w8.T)      # 64 + 128
        note("int8 tiled", kq.qmatmul(x, q8, 32, 16, 32, 4, 3, "t", 4), x.float() @ w8.T)      # 4 x 48
    note("int8 dequantize", kq.dequantize(q8, torch.float32), w8)

    # The whole kernel decode step over a 4-bit model (fused q/k/v and gate/up whose 128-block parts do not
    # fill a group of 256 scales) against the same model with bitsandbytes' de-quantized weights in fp32.
    import tempfile
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM
    from vicuna_demo.engines.fastpath import FastModel, FastOptions
    from vicuna_demo.engines.fastpath.matmuls import DEQUANT, Gemv, Tiled
    from vicuna_demo.engines.fastpath.weights import LayerWeights
    from tests.kernel_checks import compare_decode
    config = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.1)
    folder = tempfile.mkdtemp()
    LlamaForCausalLM(config).save_pretrained(folder)
    nf4 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="cpu",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.float32, bnb_4bit_use_double_quant=True))
    dense = LlamaForCausalLM(config).eval()
    state = {k: v for k, v in nf4.state_dict().items() if k in dense.state_dict() and v.dtype == torch.float32}
    for name, module in nf4.named_modules():
        if type(module).__name__ == "Linear4bit":
            state[name + ".weight"] = reference(module)
    assert not dense.load_state_dict(state, strict=False).missing_keys

    def runner(model):
        r = FastModel(model, 100, FastOptions(block_size=16, max_rows=4, kv_blocks=40, pipeline=False))
        r.allocate_cache(40)
        return r

    def check_decode(quantized, dense, phases):
        # the kernel decode step (fused q/k/v and gate/up) on quantized against dense (its de-quantized
        # twin, eager): one prefill (our de-quantize serves it: 2 x 37 tokens), then for each (rows, label,
        # configs) phase 3 steps of that many rows, the kernels chosen by configs, noted under label
        kernels, eager = runner(quantized), runner(dense)
        kernels.use_kernels = True
        kernels.layers = [LayerWeights(layer, fuse=True, quant_kernels=True) for layer in quantized.model.layers]
        assert all(layer.qkv is not None and layer.qkv.quant is not None for layer in kernels.layers)
        label = [phases[0][1]]

        def choose(configs, name):
            def before():
                label[0] = name
                for p in kernels.linears():
                    if p.quant is not None:
                        p.config.update(configs)
            return before
        choose({74: DEQUANT}, label[0])()
        prompts = [torch.randint(0, 300, (21,)).tolist(), torch.randint(0, 300, (37,)).tolist()]
        compare_decode(eager, kernels, prompts, [[3, 7, 9, 11, 13], [4, 5, 6, 8, 10]],
                       lambda got, ref: note(label[0], got, ref),
                       [(rows, choose(configs, name)) for rows, name, configs in phases])
        return kernels

    kernels = check_decode(nf4, dense, [
        # batches: the tiled kernel, whole K; inputs in one run with K in parts; fp16 values
        (2, "model", {4: Tiled(16, 16, 128, 4, 3, "t", 1)}),
        (2, "model", {4: Tiled(16, 16, 128, 4, 3, "tc", 2)}),
        (2, "model16", {4: Tiled(16, 32, 128, 4, 3, "thc", 1)}),
        # one row without NVRTC: the tiled kernel too, in the same variants, and with K in 2 parts
        (1, "model", {1: Tiled(16, 16, 128, 4, 3, "t", 1)}),
        (1, "model", {1: Tiled(16, 16, 128, 4, 3, "tc", 2)}),
        (1, "model16", {1: Tiled(16, 32, 128, 4, 3, "thc", 1)}),
        (1, "model", {1: Tiled(16, 16, 128, 4, 3, "t", 2)})])
    assert all(layer.qkv.quant.absmax2 is not None for layer in kernels.layers)

    # 8-bit (LLM.int8 on CPU): q/k/v and gate/up joined into one int8 weight each, the modules made views of
    # it and still computing what they did; the kernel decode step against the de-quantized fp32 twin
    int8 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="cpu",
                                                quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    from vicuna_demo.engines.fastpath.weights import _int8_parts
    dense8 = LlamaForCausalLM(config).eval()
    state = {k: v for k, v in int8.state_dict().items() if k in dense8.state_dict() and v.dtype == torch.float32}
    for name, module in int8.named_modules():
        if type(module).__name__ == "Linear8bitLt":
            q = _int8_parts(module)
            state[name + ".weight"] = q.data.float() * q.scale[:, None]
    assert not dense8.load_state_dict(state, strict=False).missing_keys
    probe = torch.randn(3, 128)
    attn = int8.model.layers[0].self_attn
    with torch.inference_mode():
        before = [m(probe) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
    kernels = check_decode(int8, dense8, [
        (2, "int8 model", {4: Tiled(16, 16, 64, 4, 3, "t", 2)}),
        (2, "int8 model", {4: Tiled(16, 16, 64, 4, 3)}),
        (1, "int8 model", {1: Gemv(8, 512, 4)})])
    fused = kernels.layers[0].qkv.quant
    assert fused.kind == "int8" and fused.shape == (256, 128)
    assert attn.k_proj.weight.data.data_ptr() == fused.data.data_ptr() + 128 * 128
    with torch.inference_mode():
        after = [m(probe) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
    note("int8 views", torch.cat(after, -1), torch.cat(before, -1))
    print("WORST", worst)
""")


# -- NumPy emulation of the PTX instructions nf4_lut.program uses (checks the selectors without a GPU) --
def _prmt(a: np.ndarray, b: np.ndarray, c) -> np.ndarray:
    """PTX ``prmt.b32`` (default mode): output byte j = byte (c >> 4j) & 7 of {b, a}; bit 3 replicates its sign."""
    src = (b.astype(np.uint64) << np.uint64(32)) | a.astype(np.uint64)
    c = np.broadcast_to(np.asarray(c, dtype=np.uint64), src.shape)
    out = np.zeros(src.shape, dtype=np.uint64)
    for j in range(4):
        sel = (c >> np.uint64(4 * j)) & np.uint64(15)
        byte = (src >> ((sel & np.uint64(7)) * np.uint64(8))) & np.uint64(0xFF)
        byte = np.where(sel & np.uint64(8), np.where(byte & np.uint64(0x80), np.uint64(0xFF), np.uint64(0)), byte)
        out |= byte << np.uint64(8 * j)
    return out.astype(np.uint32)


def _emulate(code, words) -> np.ndarray:
    """Run ``nf4_lut.program(code)`` on uint32 ``words`` [n] in NumPy: -> float32 [n, 8] (elements 0-7 of each word)."""
    regs = {"$8": np.asarray(words, dtype=np.uint32)}
    val = lambda a: regs[a] if isinstance(a, str) else np.uint32(a)   # noqa: E731
    for op, dst, *src in nf4_lut.program(code):
        if op == "mov":
            regs[dst] = np.full(regs["$8"].shape, src[0], dtype=np.uint32)
        elif op == "shr":
            regs[dst] = val(src[0]) >> np.uint32(src[1])
        elif op == "and":
            regs[dst] = val(src[0]) & val(src[1])
        elif op == "or":
            regs[dst] = val(src[0]) | val(src[1])
        elif op == "prmt":
            regs[dst] = _prmt(val(src[0]), val(src[1]), val(src[2]))
        elif op == "f16x2_to_f32":
            pair = val(src[1])
            regs[dst] = (pair & np.uint32(0xFFFF)).astype(np.uint16).view(np.float16).astype(np.float32)
            regs[src[0]] = (pair >> np.uint32(16)).astype(np.uint16).view(np.float16).astype(np.float32)
    return np.stack([regs[f"${i}"] for i in range(8)], axis=1)


def test_word_decoding_program_gives_every_index_in_every_nibble_its_table_value():
    """The byte-permute program our NF4 GEMV runs on a GPU (nf4_lut.py), executed instruction by instruction
    in NumPy: every index 0-15 at each of a word's 8 positions decodes to bitsandbytes' NF4 (and FP4) value,
    as the fp16 copy of the table holds it, and the PTX holds every instruction of the program."""
    import bitsandbytes.functional as bf
    rng = np.random.default_rng(0)
    q = np.concatenate([np.tile(np.arange(16)[:, None], (1, 8)), rng.integers(0, 16, size=(2000, 8))])
    q[16:32] = np.roll(np.arange(16)[:, None] + np.arange(8)[None, :], 3, axis=0) % 16   # mixed indices per word
    packed = (q[:, 0::2] << 4) | q[:, 1::2]               # bitsandbytes: element 2i in the high nibble of byte i
    words = (packed[:, 0] | packed[:, 1] << 8 | packed[:, 2] << 16 | packed[:, 3] << 24).astype(np.uint32)
    for kind in ("nf4", "fp4"):
        code = bf.get_4bit_type(kind, device="cpu").float().numpy()
        expected = code.astype(np.float16).astype(np.float32)[q]
        assert np.array_equal(_emulate(code, words), expected), kind
        text = nf4_lut.ptx(code)
        assert text.count("prmt.b32") == 16 and text.count("cvt.f32.f16") == 8
        assert all(f"${i}" in text for i in range(9))
        half = nf4_lut.ptx(code, half=True)       # fp16 outputs: the same permutes, pairs split instead of converted
        assert half.count("prmt.b32") == 16 and "cvt" not in half
        assert [line for line in half.splitlines() if line.startswith("mov.b32 {$")] == \
            ["mov.b32 {$1, $0}, %nf4_p01;", "mov.b32 {$3, $2}, %nf4_p23;", "mov.b32 {$5, $4}, %nf4_p01;",
             "mov.b32 {$7, $6}, %nf4_p23;"]
    assert nf4_lut.ptx(code) != nf4_lut.ptx(bf.get_4bit_type("nf4", device="cpu").float().numpy())


@pytest.mark.slow
def test_quantized_kernels_match_bitsandbytes_in_the_triton_interpreter(tmp_path):
    """Our NF4 GEMV, tiled kernel and de-quantization against bitsandbytes' dequantize_4bit + matmul, with
    plain and nested (double-quantized) scales; fused q/k/v; int8 tiles; and the fast path's whole kernel
    decode step on a 4-bit model (table and word-decoding GEMVs) and on an 8-bit model (q/k/v and gate/up
    joined) against their de-quantized fp32 twins. No GPU: Triton's interpreter (~25 s)."""
    probe = subprocess.run([sys.executable, "-c", "import triton"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("Triton is not installed here: pip install -r requirements-dev.txt")
    script = tmp_path / "quant_check.py"
    script.write_text(KERNEL_CHECK)
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    worst = eval(done.stdout.split("WORST")[-1])      # noqa: S307 - our own script's dict literal
    assert worst["dequantize"] == 0.0 and worst["fused"] == 0.0 and worst["int8 dequantize"] < 1e-6
    assert worst["tiled"] < 2e-3 and worst["int8 tiled"] < 2e-3    # fp16 output rounding
    assert worst["model"] < 1e-4 and 0 < worst["model16"] < 5e-3
    assert worst["int8 model"] < 1e-4 and worst["int8 views"] == 0.0
