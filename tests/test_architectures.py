"""Every architecture the fast path serves gives transformers' own logits (CPU and Triton interpreter).

The architectures are those of vicuna_demo/engines/fastpath/arch.py.

Tiny random models of each architecture are built in the test (no download); the fast path prefills two prompts of
different lengths batched together, decodes teacher-forced tokens for both rows (several KV blocks each, so that
sliding windows cut in), prefills a second turn over the first turn's cached KV, and every logit is compared with
one forward pass of the HF model over the whole sequence. The CPU path runs the eager ops; the Triton decode step
(the one CUDA graphs capture) runs the same checks in Triton's CPU interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vicuna_demo.engines.fastpath import FastModel, FastOptions, describe, unsupported_reason

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)


def tiny_model(name: str):
    """A tiny random model of architecture ``name`` with every feature its family has switched on."""
    import transformers as tf
    torch.manual_seed(0)
    if name == "llama2":
        config = tf.LlamaConfig(**{**TINY, "num_key_value_heads": 4})
    elif name == "llama3":
        config = tf.LlamaConfig(**TINY, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    elif name == "mistral":
        config = tf.MistralConfig(**TINY, sliding_window=None)
    elif name == "mistral_window":
        config = tf.MistralConfig(**TINY, sliding_window=12)
    elif name == "qwen2":
        config = tf.Qwen2Config(**TINY)                      # q/k/v biases
    elif name == "qwen3":
        config = tf.Qwen3Config(**TINY, head_dim=32)         # q/k norms; head_dim * heads != hidden
    elif name == "gemma2":
        config = tf.Gemma2Config(**TINY, head_dim=16, sliding_window=12, query_pre_attn_scalar=24,
                                 attn_logit_softcapping=5.0, final_logit_softcapping=3.0)
    elif name == "gemma3":
        config = tf.Gemma3TextConfig(**TINY, head_dim=16, sliding_window=12, query_pre_attn_scalar=24,
                                     layer_types=["sliding_attention", "full_attention"])
    else:
        raise ValueError(name)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():     # norm weights away from their initial 0 / 1, so Gemma's (1 + w) shows
        for module in model.modules():
            if "RMSNorm" in type(module).__name__:
                module.weight.normal_(0.0 if name.startswith("gemma") else 1.0, 0.3)
    return model


ARCHITECTURES = ["llama2", "llama3", "mistral", "mistral_window", "qwen2", "qwen3", "gemma2", "gemma3"]


def teacher_forced_gap(model, kernels: bool = False, steps: int = 10) -> float:
    """Largest |fast path logit - transformers logit| over batched prefill, ``steps`` batched decode steps and
    a second turn. Row 1 decodes from position 30: from the third step on it writes a third KV block, with
    its first block wholly outside a 12-token window; row 0 (from 21) keeps part of its first block in it."""
    runner = FastModel(model, 100, FastOptions(block_size=16, max_rows=4, kv_blocks=40, pipeline=False,
                                               fuse_projections=True))
    runner.use_kernels = kernels
    runner.allocate_cache(40)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 300, (44,), generator=g).tolist(), torch.randint(0, 300, (40,), generator=g).tolist()]
    prompts = [21, 30]
    tables = [[3, 7, 9, 11, 13], [4, 5, 6, 8, 10]]
    with torch.inference_mode():
        want = [model(torch.tensor([s])).logits[0].float() for s in seqs]
        worst = 0.0

        def note(got, ref):
            nonlocal worst
            worst = max(worst, (got.float() - ref).abs().max().item())

        got = runner.prefill([(s[:p], t, 0) for s, p, t in zip(seqs, prompts, tables)])
        for i, p in enumerate(prompts):
            note(got[i], want[i][p - 1])
        step = runner._decode_kernels if kernels else runner._decode_torch
        rows = 4 if kernels else 2             # the kernel step runs whole batch buckets (idle rows length 0)
        runner.active.zero_()
        runner.active[:2] = 1
        for i, (p, t) in enumerate(zip(prompts, tables)):
            runner.table[i, :len(t)] = torch.tensor(t, dtype=torch.int32)
        for n in range(steps):                 # teacher-forced: the next token is the sequence's, not the argmax
            runner.tokens[:2] = torch.tensor([s[p + n] for s, p in zip(seqs, prompts)])
            runner.pos[:2] = torch.tensor([p + n for p in prompts])
            logits = step(rows)
            for i, p in enumerate(prompts):
                note(logits[i], want[i][p + n])
        # the second turn of row 0: its first 21 + steps tokens are cached, the rest are prefilled over them
        got = runner.prefill([(seqs[0], tables[0], prompts[0] + steps)])
        note(got[0], want[0][len(seqs[0]) - 1])
    return worst


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_fast_path_logits_equal_transformers_forward_teacher_forced(name):
    model = tiny_model(name)
    assert unsupported_reason(model) is None
    assert teacher_forced_gap(model) < 1e-4


def test_the_description_reads_each_architectures_switches_from_its_config():
    gemma2, gemma3, mistral, qwen3 = (describe(tiny_model(n)) for n in ("gemma2", "gemma3", "mistral_window", "qwen3"))
    assert gemma2.arch.gemma_norm and gemma2.arch.sandwich_norms and gemma2.activation == "gelu_tanh"
    assert gemma2.attn_softcap == 5.0 and gemma2.final_softcap == 3.0 and gemma2.scale == 24 ** -0.5
    assert gemma2.windows == (12, None)                      # transformers' default: sliding on even layers
    assert gemma3.arch.qk_norm and gemma3.rope_keys == ("sliding_attention", "full_attention")
    assert mistral.windows == (12, 12) and not mistral.arch.qk_norm
    assert qwen3.arch.qk_norm and qwen3.head_dim == 32 and qwen3.gqa


KERNEL_CHECK = textwrap.dedent("""
    import sys
    from tests.test_architectures import teacher_forced_gap, tiny_model
    for name in sys.argv[1:]:
        # 4 steps reach every case the 10 of the CPU test do (a new block, a block out of the window): in the
        # interpreter each step costs ~1 s
        print(name, "GAP", teacher_forced_gap(tiny_model(name), kernels=True, steps=4), flush=True)
""")


def test_the_triton_decode_step_equals_transformers_for_every_architecture_in_the_interpreter(tmp_path):
    probe = subprocess.run([sys.executable, "-c", "import triton"], capture_output=True, env=os.environ.copy())
    if probe.returncode != 0:
        pytest.skip("Triton is not installed here: pip install -r requirements-dev.txt")
    script = tmp_path / "arch_kernels.py"
    script.write_text(KERNEL_CHECK)
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    names = ["mistral_window", "qwen3", "gemma2", "gemma3"]     # llama: test_fastpath.py
    done = subprocess.run([sys.executable, str(script), *names], capture_output=True, text=True, env=env,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    gaps = {line.split()[0]: float(line.split()[-1]) for line in done.stdout.splitlines() if " GAP " in line}
    assert set(gaps) == set(names) and max(gaps.values()) < 1e-4, gaps
