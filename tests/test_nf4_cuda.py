"""The CUDA C++ NF4 GEMV (vicuna_demo/engines/fastpath/nf4_cuda.py) without a GPU: its table decoding of a
packed word, run in NumPy on bitsandbytes' own packing; the shared-memory swizzle of its inputs; and its source
compiled by NVRTC for the GPUs people serve on, every warm-up candidate, without register spills. What it
computes on a GPU is checked at every warm-up against the de-quantized weight (tuning.py, matmuls.py) and in
benchmarks/kernel_probe.py."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from vicuna_demo.engines.fastpath import nf4_cuda, rtc


def _bitsandbytes_words(n: int = 64, k: int = 4096):
    """A random weight quantized by bitsandbytes (NF4, blocks of 64) on the CPU: its packed bytes as uint32
    words [n, k / 8], the indices [n, k] they hold, and the code table."""
    import bitsandbytes.functional as bf
    torch.manual_seed(0)
    weight = torch.randn(n, k) * 0.02
    packed, state = bf.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    code = state.code.float().numpy()
    values = bf.dequantize_4bit(packed, state).numpy()                       # code[index] * absmax
    absmax = np.repeat(state.absmax.float().numpy().reshape(n, k // 64), 64, axis=1)
    index = np.abs(values[..., None] / absmax[..., None] - code[None, None, :]).argmin(-1)
    words = packed.numpy().reshape(-1).view(np.uint32).reshape(n, k // 8)
    return words, index, code


def _pairs_expected(index, code) -> np.ndarray:
    """Element order: word w's pair j holds elements 8w + 2j (low half) and 8w + 2j + 1 (high half)."""
    half = code.astype(np.float16).view(np.uint16).astype(np.uint32)[index]
    return (half[:, 0::2] | half[:, 1::2] << 16).astype(np.uint32)


def test_the_pair_table_gives_bitsandbytes_packed_bytes_their_table_values_in_element_order():
    words, index, code = _bitsandbytes_words()
    expected = _pairs_expected(index, code)                                 # [n, k / 2] fp16 pairs as uint32
    flat = words.reshape(-1)
    table = nf4_cuda.pair_table(code)                                       # one lookup per byte
    by_table = np.stack([table[(flat >> (8 * b)) & 0xFF] for b in range(4)], axis=1)
    assert np.array_equal(by_table.reshape(expected.shape), expected)


def test_the_pair_table_decodes_fp4_too_and_a_word_to_its_dot_product():
    """Any 16-value table (bitsandbytes' FP4 as well); and the sum a lane forms for one word, in fp16 pairs,
    equals the dot product of the word's 8 values with 8 inputs (to fp16 rounding)."""
    import bitsandbytes.functional as bf
    code = bf.get_4bit_type("fp4", device="cpu").float().numpy()
    table = nf4_cuda.pair_table(code)
    b = np.arange(256)
    assert np.array_equal(table & 0xFFFF, code.astype(np.float16).view(np.uint16)[b >> 4])
    assert np.array_equal(table >> 16, code.astype(np.float16).view(np.uint16)[b & 15])
    rng = np.random.default_rng(1)
    index = rng.integers(0, 16, 8)
    x = rng.standard_normal(8).astype(np.float16)
    word = int(sum(((int(index[2 * j]) << 4 | int(index[2 * j + 1])) << (8 * j)) for j in range(4)))
    pairs = [table[(word >> (8 * j)) & 0xFF] for j in range(4)]
    values = np.array([[p & 0xFFFF, p >> 16] for p in pairs], dtype=np.uint16).view(np.float16).reshape(-1)
    assert np.allclose(values.astype(np.float32), code.astype(np.float16)[index].astype(np.float32))
    assert abs(float(np.dot(values.astype(np.float32), x.astype(np.float32)))
               - float(np.dot(code[index], x.astype(np.float32)))) < 2e-2


def test_the_input_swizzle_is_a_permutation_and_each_quarter_warp_reads_every_bank_group_once():
    """The kernel stores input unit (chunk c, part p) at 4c + (p ^ ((c >> 1) & 3)); lane l reads chunk
    c0 + l. A 16-byte shared-memory read is served 8 lanes at a time: those 8 must hit 8 different 16-byte
    bank groups (of 8), else the read takes several passes."""
    chunks = 344                                                  # the down projection's K = 11008
    place = lambda c, p: 4 * c + (p ^ ((c >> 1) & 3))             # noqa: E731 - the kernel's formula
    assert sorted(place(c, p) for c in range(chunks) for p in range(4)) == list(range(4 * chunks))
    for c0, p, quarter in itertools.product(range(0, 320, 32), range(4), range(4)):
        lanes = range(8 * quarter, 8 * quarter + 8)
        assert len({place(c0 + lane, p) % 8 for lane in lanes}) == 8


def _nvrtc_or_skip():
    try:
        rtc.nvrtc_library()
    except (rtc.RtcUnavailable, OSError) as exc:
        pytest.skip(f"NVRTC is not installed here ({exc}): pip install -r requirements-dev.txt")


@pytest.mark.parametrize("arch", ["sm_80", "sm_86", "sm_89", "sm_90"])
def test_every_warm_up_candidate_compiles_for_the_gpus_people_serve_on_without_spilling(arch):
    """A100 / A10G / L4 / H100-H200: each configuration the warm-up may time, with plain and double-quantized
    scales, with and without the down projection's SiLU * up, compiles with NVRTC; none spills registers to
    memory (a spill would put a slow memory round trip inside the loop)."""
    _nvrtc_or_skip()
    from vicuna_demo.engines.fastpath.matmuls import CANDIDATES, Nf4Cuda
    for c, nested, gated in itertools.product([c for c in CANDIDATES if isinstance(c, Nf4Cuda)], (0, 1), (0, 1)):
        defines = nf4_cuda.defines(c.warps, c.rows_per_warp, c.unroll, nested, gated, c.prefetch)
        cubin, log = rtc.compile_source(nf4_cuda.SOURCE, "nf4_gemv", arch, defines, ptxas_verbose=True)
        assert cubin and "nf4_gemv" in log, defines
        assert "0 bytes spill stores" in log and "0 bytes spill loads" in log, (defines, log)


def test_a_source_error_is_reported_as_unavailable_with_nvrtcs_message():
    _nvrtc_or_skip()
    with pytest.raises(rtc.RtcUnavailable, match="nf4_gemv"):
        rtc.compile_source(nf4_cuda.SOURCE.replace("u32 out = 0;", "u32 out = ;"), "nf4_gemv", "sm_90",
                           nf4_cuda.defines(4, 1, 1, True, True))


def test_without_a_gpu_the_kernel_is_not_offered_and_the_other_candidates_remain():
    assert nf4_cuda.available(torch.device("cpu")) is False


def test_warm_up_offers_the_cuda_candidates_at_one_row_only_where_the_kernel_builds(monkeypatch):
    """matmuls.candidates: with NVRTC working, every Nf4Cuda configuration is timed for one row (beside Triton's
    GEMVs and bitsandbytes'), never for batches; without it, none is and the skip names why; Projection sends an
    Nf4Cuda configuration to nf4_cuda.gemv with the down projection's up input."""
    from types import SimpleNamespace

    from vicuna_demo.engines.fastpath import matmuls, weights
    quant = SimpleNamespace(kind="nf4", lut="ptx", data=torch.zeros(4, dtype=torch.uint8))
    p = SimpleNamespace(quant=quant)
    every = [c for c in matmuls.CANDIDATES if isinstance(c, matmuls.Nf4Cuda)]
    monkeypatch.setattr(nf4_cuda, "unavailable_reason", lambda device: "CUDA_ERROR_OUT_OF_MEMORY: cuModuleLoadData")
    for works in (True, False):
        monkeypatch.setattr(nf4_cuda, "available", lambda device, works=works: works)
        one, skipped = matmuls.candidates(p, 1)
        assert [c for c in one if isinstance(c, matmuls.Nf4Cuda)] == (every if works else [])
        assert matmuls.MODULE in one and any(isinstance(c, matmuls.Tiled) for c in one)   # without NVRTC
        assert works or skipped[str(every[0])] == "CUDA_ERROR_OUT_OF_MEMORY: cuModuleLoadData"
        batch, skipped = matmuls.candidates(p, 8)
        assert not any(isinstance(c, matmuls.Nf4Cuda) for c in batch)
        assert skipped[str(every[0])] == "serves 1-1 rows"
    calls = []
    monkeypatch.setattr(nf4_cuda, "gemv", lambda x, q, *config, up=None: calls.append((config, up)) or x)
    linear = weights.Projection(quant=SimpleNamespace(kind="nf4"))
    x, up = torch.ones(1, 8), torch.full((1, 8), 2.0)
    linear.config[1] = every[0]
    assert linear.gated(x, up) is x and calls == [((16, 1, 4, 2, 0), up)]


def test_why_the_kernel_is_not_offered_is_kept_once_with_its_first_line(monkeypatch):
    """A GPU where the build or the module load fails: available() says no once, with the first line of the
    reason (the skip record of warm-up names it: the test above)."""
    builds = []

    def refuse(*args):
        builds.append(args)
        raise rtc.RtcUnavailable("CUDA_ERROR_OUT_OF_MEMORY: cuModuleLoadData\nsecond line")
    monkeypatch.setattr(nf4_cuda, "_unavailable", {})
    monkeypatch.setattr(nf4_cuda, "_kernel", refuse)
    gpu = torch.device("cuda", 0)
    assert nf4_cuda.available(gpu) is False and nf4_cuda.available(gpu) is False and len(builds) == 1
    assert nf4_cuda.unavailable_reason(gpu) == "CUDA_ERROR_OUT_OF_MEMORY: cuModuleLoadData"
    assert nf4_cuda.unavailable_reason(torch.device("cuda", 1)) == ""


class _Driver:
    """The four CUDA driver calls ``rtc.ensure_context`` makes, recorded; ``current`` is this thread's context
    (0: none), ``refuse`` the name of a call that returns an error."""

    def __init__(self, current: int = 0, refuse: str = ""):
        self.current, self.refuse, self.calls = current, refuse, []

    def _call(self, name, result=0):
        self.calls.append(name)
        return 1 if name == self.refuse else result

    def cuCtxGetCurrent(self, out):
        out._obj.value = self.current or None
        return self._call("cuCtxGetCurrent")

    def cuDeviceGet(self, out, index):
        out._obj.value = index
        return self._call("cuDeviceGet")

    def cuDevicePrimaryCtxRetain(self, out, dev):
        out._obj.value = 0x1000 + dev.value
        return self._call("cuDevicePrimaryCtxRetain")

    def cuCtxSetCurrent(self, ctx):
        self.current = ctx.value
        return self._call("cuCtxSetCurrent")


def _ensure_in_a_new_thread(driver, monkeypatch, index=0, times=1):
    """``rtc.ensure_context(index)`` called ``times`` times in a fresh thread over ``driver``: its error or None."""
    import threading
    from torch.cuda import _utils
    monkeypatch.setattr(_utils, "_get_gpu_runtime_library", lambda: driver)
    errors = []

    def work():
        try:
            for _ in range(times):
                rtc.ensure_context(index)
        except rtc.RtcUnavailable as exc:
            errors.append(exc)
    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    return errors[0] if errors else None


def test_a_thread_without_a_context_gets_the_gpus_primary_context_before_any_module_is_loaded(monkeypatch):
    """An engine that sizes its own KV pool does warm-up's tuning first on its serving thread, and the module load there
    failed with "invalid device context" (13B / 33B cards were served without the CUDA kernel): the primary
    context of the weights' GPU is made current first, once per thread; a thread with a context keeps it."""
    driver = _Driver()
    assert _ensure_in_a_new_thread(driver, monkeypatch, index=1, times=3) is None
    assert driver.current == 0x1001
    assert driver.calls == ["cuCtxGetCurrent", "cuDeviceGet", "cuDevicePrimaryCtxRetain", "cuCtxSetCurrent"]
    driver = _Driver(current=0x2000)
    assert _ensure_in_a_new_thread(driver, monkeypatch) is None
    assert driver.current == 0x2000 and driver.calls == ["cuCtxGetCurrent"]
    driver = _Driver(refuse="cuDevicePrimaryCtxRetain")
    assert "could not make GPU 0's context current" in str(_ensure_in_a_new_thread(driver, monkeypatch))
    assert driver.calls[-1] == "cuDevicePrimaryCtxRetain" and driver.current == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU with NVRTC")
def test_on_a_gpu_a_fresh_thread_builds_and_runs_the_kernel(monkeypatch):
    """The real driver: a thread that has made no CUDA call yet builds the kernel (no cached build, no cached
    answer) and its product matches the de-quantized weight."""
    import threading

    import bitsandbytes.functional as bf

    from vicuna_demo.engines.fastpath.weights import QuantWeight
    monkeypatch.setattr(nf4_cuda, "_unavailable", {})
    monkeypatch.setattr(rtc, "_cache", {})
    gpu = torch.device("cuda", 0)
    weight = torch.randn(256, 1024, device=gpu, dtype=torch.float16) * 0.02
    packed, state = bf.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    q = QuantWeight("nf4", (256, 1024), packed.view(-1), absmax=state.absmax.float(),
                    code=state.code.float()).add_word_decoding()
    x = torch.randn(1, 1024, device=gpu, dtype=torch.float16)
    result = {}
    thread = threading.Thread(target=lambda: result.update(ok=nf4_cuda.available(gpu),
                                                          why=nf4_cuda.unavailable_reason(gpu),
                                                          y=nf4_cuda.gemv(x, q)))
    thread.start()
    thread.join()
    assert (result["ok"], result["why"]) == (True, "")
    expected = x.float() @ bf.dequantize_4bit(packed, state).float().T
    assert torch.allclose(result["y"].float(), expected, rtol=2e-2, atol=2e-3)
