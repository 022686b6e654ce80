"""The fast path (vicuna_demo/engines/fastpath/) on CPU: its outputs equal plain ``model.generate``, and
sampling parameters apply per request.

Greedy tokens of the scheduler equal ``generate`` on the embedded SmolLM2, also with the GPU's
pipelined bookkeeping (a step launched before the previous one is read), with several prompts of
different lengths batched together (also over a KV pool whose unwritten slots hold NaN), and when a
second turn reuses the first turn's KV cache. A
nucleus of one token equals greedy; temperature sampling varies; greedy and sampled requests share a
batch without affecting each other. Bad requests (token ids outside the vocabulary, prompts over the
context window) end with an error while the scheduler keeps serving. Models the fast path does not
support go to continuous batching. The Triton kernels are checked against the eager ops in Triton's
CPU interpreter (requirements-dev.txt installs Triton; the GPU runs are in benchmarks/).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from vicuna_demo.engines.local import EngineOptions, LocalEngine
from vicuna_demo.engines.fastpath import FastModel, FastOptions, FastScheduler, Job, sample, unsupported_reason
from vicuna_demo.engines.fastpath.kvpool import BlockPool, common_prefix
from vicuna_demo.engines.protocol import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "List three fruits and their colours, one per line, with a short note on each."]


def chat_ids(loaded, text: str) -> list[int]:
    return loaded.tokenizer(loaded.template.render([{"role": "user", "content": text}]))["input_ids"]


def generate_ids(loaded, ids: list[int], n: int, **extra) -> list[int]:
    inputs = torch.tensor([ids])
    with torch.inference_mode():
        out = loaded.model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=n, do_sample=False,
                                    eos_token_id=sorted(loaded.eos_token_ids),
                                    pad_token_id=loaded.tokenizer.pad_token_id, **extra)
    return out[0, len(ids):].tolist()


class Collector:
    """A job's emit callback that keeps the tokens and remembers how the job ended."""

    def __init__(self):
        self.tokens: list[int] = []
        self.error: str | None = None
        self.done = threading.Event()

    def __call__(self, tokens, finished, error):
        self.tokens += tokens
        if finished:
            self.error = error
            self.done.set()


def run_jobs(scheduler: FastScheduler, specs: list[tuple], eos=frozenset()):
    """Submit (ids, max_new, temperature, top_p[, repetition_penalty]) jobs together; -> their collectors once
    all ended."""
    collectors = []
    for i, (ids, max_new, temperature, top_p, *penalty) in enumerate(specs):
        c = Collector()
        scheduler.submit(Job(request_id=f"job-{time.monotonic_ns()}-{i}", ids=ids, max_new=max_new,
                             temperature=temperature, top_p=top_p, eos=eos, emit=c,
                             repetition_penalty=penalty[0] if penalty else 1.0))
        collectors.append(c)
    for c in collectors:
        assert c.done.wait(180), "a job never ended"
    return collectors


def start_scheduler(model, context: int, **options) -> FastScheduler:
    scheduler = FastScheduler(FastModel(model, context, FastOptions(**options)), name="test")
    scheduler.start()
    assert scheduler.wait_ready(60)
    return scheduler


@pytest.fixture(scope="module", params=["eager", "pipelined"])
def embedded_scheduler(request, embedded_loaded):
    """The fast path over the embedded model; "pipelined" keeps a step in flight as on a GPU."""
    scheduler = start_scheduler(embedded_loaded.model, 2048, pipeline=request.param == "pipelined")
    yield scheduler
    scheduler.close()


def test_greedy_tokens_equal_plain_generate(embedded_scheduler, embedded_loaded):
    for question in QUESTIONS[:2]:
        ids = chat_ids(embedded_loaded, question)
        [got] = run_jobs(embedded_scheduler, [(ids, 32, 0.0, 1.0)], eos=embedded_loaded.eos_token_ids)
        assert got.error is None
        assert got.tokens == generate_ids(embedded_loaded, ids, 32)


def test_prompts_of_different_lengths_batched_together_each_equal_generate(embedded_scheduler, embedded_loaded):
    prompts = [chat_ids(embedded_loaded, q) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) == 3
    results = run_jobs(embedded_scheduler, [(p, 20, 0.0, 1.0) for p in prompts], eos=embedded_loaded.eos_token_ids)
    for prompt, got in zip(prompts, results):
        assert got.tokens == generate_ids(embedded_loaded, prompt, 20)


class PoisonedPool(FastModel):
    """A fast path whose fresh KV pool holds NaN, as a reused heap can on a CPU (the pool is torch.empty)."""

    def allocate_cache(self, n_blocks=None):
        blocks = super().allocate_cache(n_blocks)
        for cache in self.k_cache + self.v_cache:
            cache.fill_(float("nan"))
        return blocks


def test_unwritten_cache_slots_never_reach_a_reply(embedded_loaded):
    """Rows of different lengths read each other's span of the cache; what a row has not written (here NaN)
    must not matter: each reply equals generate, also for a second turn that reuses a cached prefix."""
    scheduler = FastScheduler(PoisonedPool(embedded_loaded.model, 2048, FastOptions()), name="poisoned")
    scheduler.start()
    try:
        assert scheduler.wait_ready(60)
        prompts = [chat_ids(embedded_loaded, q) for q in QUESTIONS]
        results = run_jobs(scheduler, [(p, 12, 0.0, 1.0) for p in prompts], eos=embedded_loaded.eos_token_ids)
        for prompt, got in zip(prompts, results):
            assert got.error is None and got.tokens == generate_ids(embedded_loaded, prompt, 12)
        follow = [p + r.tokens + chat_ids(embedded_loaded, "Why?")[1:] for p, r in zip(prompts, results)]
        again = run_jobs(scheduler, [(f, 8, 0.0, 1.0) for f in follow], eos=embedded_loaded.eos_token_ids)
        for ids, got in zip(follow, again):
            assert got.error is None and got.tokens == generate_ids(embedded_loaded, ids, 8)
    finally:
        scheduler.close()


def test_second_turn_reuses_the_first_turns_cache_and_still_equals_generate(embedded_scheduler, embedded_loaded):
    first_ids = chat_ids(embedded_loaded, QUESTIONS[2])
    [first] = run_jobs(embedded_scheduler, [(first_ids, 24, 0.0, 1.0)])
    second_ids = first_ids + first.tokens + chat_ids(embedded_loaded, "And one more fruit?")[1:]
    embedded_scheduler.prefill_log.clear()
    [second] = run_jobs(embedded_scheduler, [(second_ids, 16, 0.0, 1.0)], eos=embedded_loaded.eos_token_ids)
    [entry] = list(embedded_scheduler.prefill_log)
    assert entry["reused"] >= len(first_ids)        # the prompt and the reply were not computed again
    assert second.tokens == generate_ids(embedded_loaded, second_ids, 16)


def test_smallest_nucleus_is_greedy_and_temperature_sampling_varies(embedded_scheduler, embedded_loaded):
    ids = chat_ids(embedded_loaded, "Tell me a story about a cat.")
    greedy = generate_ids(embedded_loaded, ids, 16)
    [nucleus] = run_jobs(embedded_scheduler, [(ids, 16, 1.0, 0.01)], eos=embedded_loaded.eos_token_ids)
    assert nucleus.tokens == greedy
    sampled = run_jobs(embedded_scheduler, [(ids, 16, 1.0, 1.0)] * 4)
    assert len({tuple(s.tokens) for s in sampled}) > 1


def test_greedy_and_sampled_requests_share_a_batch_without_affecting_each_other(embedded_scheduler,
                                                                               embedded_loaded):
    ids = chat_ids(embedded_loaded, QUESTIONS[1])
    results = run_jobs(embedded_scheduler, [(ids, 16, 0.0, 1.0), (ids, 16, 1.0, 0.9), (ids, 16, 0.0, 1.0),
                                            (ids, 16, 1.0, 1.0)], eos=embedded_loaded.eos_token_ids)
    greedy = generate_ids(embedded_loaded, ids, 16)
    assert results[0].tokens == greedy and results[2].tokens == greedy
    assert all(r.error is None and r.tokens for r in results)


def test_repetition_penalty_equals_generate_and_leaves_other_rows_of_the_batch_alone(embedded_scheduler,
                                                                                    embedded_loaded):
    """Greedy with penalty 1.3 (over prompt and reply) gives generate(..., repetition_penalty=1.3)'s tokens, also
    for prompts of different lengths batched with unpenalised rows, which stay exactly greedy."""
    prompts = [chat_ids(embedded_loaded, q) for q in QUESTIONS[:2]]
    results = run_jobs(embedded_scheduler, [(prompts[0], 24, 0.0, 1.0, 1.3), (prompts[1], 24, 0.0, 1.0),
                                            (prompts[1], 24, 0.0, 1.0, 1.3)], eos=embedded_loaded.eos_token_ids)
    assert all(r.error is None for r in results)
    penalised = generate_ids(embedded_loaded, prompts[0], 24, repetition_penalty=1.3)
    assert results[0].tokens == penalised
    assert results[1].tokens == generate_ids(embedded_loaded, prompts[1], 24)
    assert results[2].tokens == generate_ids(embedded_loaded, prompts[1], 24, repetition_penalty=1.3)
    assert results[2].tokens != results[1].tokens     # the penalty changed something (or the test proves nothing)


def test_penalize_divides_positive_and_multiplies_negative_logits_of_seen_tokens_only():
    from vicuna_demo.engines.fastpath.sampling import mark_seen, penalize, seen_mask
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5], [2.0, -2.0, 1.0, 0.5]])
    seen = seen_mask([[0, 1, 1], [0, 1]], [1.5, 1.0], 4, "cpu")
    assert seen.tolist() == [[True, True, False, False], [False, False, False, False]]  # penalty 1.0: no mask
    mark_seen(seen, torch.tensor([3, 2]))
    out = penalize(logits, torch.tensor([2.0, 1.0]), seen)
    assert out[0].tolist() == [1.0, -4.0, 1.0, 0.25]
    assert torch.equal(out[1], logits[1])           # a row with penalty 1.0 is bit-identical


def test_bad_requests_end_with_an_error_and_the_scheduler_keeps_serving(embedded_scheduler, embedded_loaded):
    vocab = embedded_loaded.model.get_input_embeddings().weight.shape[0]
    ids = chat_ids(embedded_loaded, QUESTIONS[0])
    bad_id, too_long, good = run_jobs(embedded_scheduler, [(ids + [vocab + 5], 8, 0.0, 1.0),
                                                           (ids * 200, 8, 0.0, 1.0), (ids, 8, 0.0, 1.0)],
                                      eos=embedded_loaded.eos_token_ids)
    assert "vocabulary" in bad_id.error and not bad_id.tokens
    assert "context window" in too_long.error
    assert good.error is None and good.tokens == generate_ids(embedded_loaded, ids, 8)


def test_cancelled_job_ends_and_frees_its_blocks(embedded_scheduler, embedded_loaded):
    ids = chat_ids(embedded_loaded, "Write a very long essay about rivers.")
    c = Collector()
    embedded_scheduler.submit(Job(request_id="to-cancel", ids=ids, max_new=500, temperature=0.0, top_p=1.0,
                                  eos=frozenset(), emit=c))
    deadline = time.monotonic() + 60
    while len(c.tokens) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    embedded_scheduler.cancel("to-cancel")
    assert c.done.wait(30) and c.error is None and len(c.tokens) < 100
    assert "to-cancel" not in embedded_scheduler.held_request_ids()


# -- pieces ------------------------------------------------------------------------------------------------

def test_sample_keeps_greedy_rows_greedy_and_draws_only_inside_the_nucleus():
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]] * 3))
    temperature = torch.ones(3)
    top_p = torch.tensor([1.0, 0.5, 0.8])
    greedy = torch.tensor([True, False, False])
    draws = torch.stack([sample(logits, temperature, top_p, greedy, "top_p") for _ in range(400)])
    assert (draws[:, 0] == 0).all()                 # greedy row
    assert (draws[:, 1] == 0).all()                 # nucleus 0.5: only the 0.6 token
    assert set(draws[:, 2].tolist()) == {0, 1}      # nucleus 0.8: the 0.6 and 0.3 tokens, both drawn
    assert 0.5 < (draws[:, 2] == 0).float().mean() < 0.8
    free = torch.stack([sample(logits, temperature, torch.ones(3), torch.zeros(3, dtype=torch.bool), "sample")
                        for _ in range(400)])
    assert set(free.flatten().tolist()) == {0, 1, 2, 3}


def test_block_pool_hands_over_a_cached_prefix_and_evicts_the_oldest_when_short():
    pool = BlockPool(n_blocks=9, block=4, keep_cache=True)        # blocks 1..8 usable, 0 never handed out
    first = pool.take(3)
    assert 0 not in first
    pool.remember(list(range(10)), first)                           # 10 tokens cached in 3 blocks
    blocks, start = pool.reuse(list(range(10)) + [99, 98], min_tokens=4)
    assert blocks == first and start == 10
    pool.remember(list(range(6)), blocks)                           # 6 tokens: 2 blocks kept, 1 freed
    other = pool.take(5)                                            # 6 free blocks plus the cached 2
    assert other is not None and len(other) == 5 and pool.cached    # no eviction needed yet
    assert pool.take(2) is not None and not pool.cached             # now the cached prefix went
    assert pool.take(1) is not None and pool.take(1) is None
    assert common_prefix([1, 2, 3, 4], [1, 2, 5]) == 2 and common_prefix([7], [8]) == 0


def test_models_the_fast_path_cannot_run_go_to_continuous_batching():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    assert "gpt2" in unsupported_reason(gpt2)
    assert unsupported_reason(llama) is None


def test_engine_defaults_to_the_fast_path_and_reports_its_status(embedded_loaded):
    engine = LocalEngine(embedded_loaded, EngineOptions())
    try:
        assert engine.backend == "fast"
        assert engine.warmup(background=True) == 0.0               # returns at once; requests wait for it
        params = SamplingParams(temperature=0, max_new_tokens=8)
        reply = engine.stream(engine.prepare([{"role": "user", "content": QUESTIONS[0]}], params), params)
        assert "Paris" in "".join(reply)
        deadline = time.monotonic() + 60
        while not engine.ready and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.ready and "ready" in engine.status and "fast" in engine.status
    finally:
        engine.close()


KERNEL_CHECK = textwrap.dedent("""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from vicuna_demo.engines.fastpath import kernels as fk
    from vicuna_demo.engines.fastpath import FastModel, FastOptions
    from vicuna_demo.engines.fastpath.matmuls import Gemv
    from tests.kernel_checks import compare_decode
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    def make(kernels):
        runner = FastModel(model, 100, FastOptions(block_size=16, max_rows=4, kv_blocks=40, pipeline=False,
                                                   fuse_projections=kernels))
        runner.use_kernels = kernels
        runner.allocate_cache(40)
        return runner
    eager, kernels = make(False), make(True)
    for p in kernels.linears():
        p.config[1] = Gemv(8, 128, 4)       # our GEMV (and the fused SiLU) for one row
    prompts = [torch.randint(0, 300, (21,)).tolist(), torch.randint(0, 300, (37,)).tolist()]
    tables = [[3, 7, 9, 11, 13], [4, 5, 6, 8, 10]]
    worst = 0.0
    def note(got, ref):
        global worst
        worst = max(worst, (got - ref).abs().max().item())
    compare_decode(eager, kernels, prompts, tables, note)
    with torch.inference_mode():
        extended = prompts[0][:20] + [5, 6, 7]
        worst = max(worst, (eager.prefill([(extended, tables[0], 20)]) -
                            kernels.prefill([(extended, tables[0], 20)])).abs().max().item())
        w = torch.randn(37, 600); absmax = w.abs().amax(1); cb = torch.round(w * 127 / absmax[:, None]).to(torch.int8)
        for m in (1,):
            x = torch.randn(m, 600)
            ref = x @ (cb.float() * absmax[:, None] / 127).T
            got = fk.gemv(x, cb, absmax / 127)
            worst = max(worst, ((got - ref).abs().max() / ref.abs().max()).item())
        g, u, wd = torch.randn(1, 600), torch.randn(1, 600), torch.randn(37, 600)    # Gemma's down projection
        ref = (torch.nn.functional.gelu(g, approximate="tanh") * u) @ wd.T
        got = fk.gemv(g, wd, None, up=u, activation="gelu_tanh")
        worst = max(worst, ((got - ref).abs().max() / ref.abs().max()).item())
    print("WORST", worst)
""")


def test_triton_kernels_match_the_eager_ops_in_the_interpreter(tmp_path):
    """The interpreter needs no GPU, only Triton (requirements-dev.txt installs it)."""
    probe = subprocess.run([sys.executable, "-c", "import triton"], capture_output=True, env=os.environ.copy())
    if probe.returncode != 0:
        pytest.skip("Triton is not installed here: pip install -r requirements-dev.txt")
    script = tmp_path / "kernel_check.py"
    script.write_text(KERNEL_CHECK)
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    worst = float(done.stdout.split("WORST")[-1])
    assert worst < 1e-4


def test_the_activation_reserve_is_measured_on_the_largest_prefill_the_scheduler_runs():
    """The reserve's prefill is ``prefill_tokens`` tokens as the scheduler would batch them: a model whose
    context is shorter than that is measured on several sequences (a 2,048-token 33B model measured on one
    sequence ran out of memory in its 8 x 512 prefill warm-up on a 24 GB card). On CPU, prefill runs for real."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from vicuna_demo.engines.fastpath import FastModel, FastOptions
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    shapes = {}
    for context, budget in ((64, 256), (128, 100)):
        runner = FastModel(model, context, FastOptions(block_size=16, max_rows=4, kv_blocks=40, pipeline=False,
                                                       prefill_tokens=budget))
        runner.allocate_cache(1, whole_context=False)       # the measuring pool: the trash block alone
        seen = []
        real = runner.prefill
        runner.prefill = lambda rows: (seen.append([len(ids) for ids, _, _ in rows]), real(rows))[1]
        with torch.inference_mode():
            runner._peak_prefill()
        shapes[context] = (seen[0], runner.max_len - 3)
    longest = shapes[64][1]                # a sequence's room: the context less the tokens decoding needs
    assert shapes[64][0] == [longest] * (256 // longest) and len(shapes[64][0]) == 4   # 256 tokens: 4 sequences
    assert shapes[128][0] == [100]         # a budget shorter than the context: one sequence of it
