"""Triton kernels for quantized weights as bitsandbytes stores them: int8 (LLM.int8) and 4-bit NF4.

Imported only where Triton exists (CUDA, or Triton's CPU interpreter in the tests). Every function takes a
``QuantWeight`` (``weights.py``: the tensors below, read from bitsandbytes' modules without copying) and
is safe inside CUDA-graph capture.

How bitsandbytes 0.50 stores a 4-bit weight W [N, K] (read from its source, ``backends/default/ops.py``
and ``functional.quantize_4bit``): W is flattened row-major and cut into blocks of 64 values; each block
keeps its absmax, and each value the index (0-15) of the nearest entry of the 16-value NF4 code divided by
that absmax. Two indices share a byte, the first one in the high nibble: byte i = (q[2i] << 4) | q[2i+1].
With double quantization ("nested"), the absmax values are themselves quantized: mean-subtracted, then
blockwise 8-bit over groups of 256 (an 8-bit code table, one fp32 absmax per group), so
absmax[b] = code2[a8[b]] * absmax2[b // 256] + offset. We keep the offset per group (a fused weight
concatenates modules with different offsets), and need K % 64 == 0 so that a block never spans two rows.

- One row of a 4-bit weight is the CUDA C++ GEMV's (``nf4_cuda.py``): it beat every Triton one-row variant
  on every shape timed on an H100 and an H200 (results/*quant*.jsonl, nf4_tuning), so those were deleted;
  where NVRTC is missing, warm-up picks between the tiled kernel below and bitsandbytes' own matmul.
- ``qmatmul(x, q, block_m, block_n, block_k, warps, stages)``: int8 decode batches, x as the dot's left
  operand, int8 tiles converted to fp16 in registers, fp32 accumulation.
- ``qmatmul(..., variant="t", splits=s)`` (int8 and NF4 words): the weight tile as the dot's left operand
  (its rows on the tensor cores' wide side), K cut into ``s`` parts summed in fp32, for batches whose
  output is too narrow to give every multiprocessor a tile; NF4 one tile per position within a word (8 dots
  per step), variants "th" (decoded and scaled in fp16), "tc" (inputs loaded as one run), "thc" (both).
- ``dequantize(q, dtype)``: the whole weight in 16 bits (for ``F.linear`` when many rows make a copy pay).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _nf4_scales(a_ptr, a2_ptr, off_ptr, code2_ptr, n, nmask, kb0, KB, NB: tl.constexpr, NESTED: tl.constexpr,
                GROUP: tl.constexpr):
    """absmax of blocks kb0..kb0+NB of rows n -> fp32 [BN, NB]."""
    b = kb0 + tl.arange(0, NB)
    mask = nmask[:, None] & (b < KB)[None, :]
    idx = n[:, None].to(tl.int64) * KB + b[None, :]
    if NESTED:
        a8 = tl.load(a_ptr + idx, mask=mask, other=0).to(tl.int32)
        group = idx // GROUP
        scale = tl.load(code2_ptr + a8) * tl.load(a2_ptr + group, mask=mask, other=0.0) \
            + tl.load(off_ptr + group, mask=mask, other=0.0)
    else:
        scale = tl.load(a_ptr + idx, mask=mask, other=0.0)
    return scale.to(tl.float32)


@triton.jit
def _nf4_word_values(words, code_ptr, LUT: tl.constexpr, USE_ASM: tl.constexpr, HALF: tl.constexpr = False):
    """The 8 values (fp32, or fp16 with HALF and the fp16 program as LUT; without their block's absmax) of each
    int32 word of packed indices, elements 0-7. On a GPU: the byte-permute program of ``nf4_lut.py`` (the table
    in registers); in Triton's interpreter, which runs no PTX: table loads, the same values."""
    if USE_ASM:
        if HALF:
            e0, e1, e2, e3, e4, e5, e6, e7 = tl.inline_asm_elementwise(
                LUT, "=h,=h,=h,=h,=h,=h,=h,=h,r", [words],
                dtype=(tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16,
                       tl.float16), is_pure=True, pack=1)
        else:
            e0, e1, e2, e3, e4, e5, e6, e7 = tl.inline_asm_elementwise(
                LUT, "=r,=r,=r,=r,=r,=r,=r,=r,r", [words],
                dtype=(tl.float32, tl.float32, tl.float32, tl.float32, tl.float32, tl.float32, tl.float32,
                       tl.float32), is_pure=True, pack=1)
    else:     # a byte holds elements (2i, 2i+1) as (high, low) nibble; words are little-endian
        e0 = tl.load(code_ptr + ((words >> 4) & 15))
        e1 = tl.load(code_ptr + (words & 15))
        e2 = tl.load(code_ptr + ((words >> 12) & 15))
        e3 = tl.load(code_ptr + ((words >> 8) & 15))
        e4 = tl.load(code_ptr + ((words >> 20) & 15))
        e5 = tl.load(code_ptr + ((words >> 16) & 15))
        e6 = tl.load(code_ptr + ((words >> 28) & 15))
        e7 = tl.load(code_ptr + ((words >> 24) & 15))
        if HALF:
            e0, e1, e2, e3 = e0.to(tl.float16), e1.to(tl.float16), e2.to(tl.float16), e3.to(tl.float16)
            e4, e5, e6, e7 = e4.to(tl.float16), e5.to(tl.float16), e6.to(tl.float16), e7.to(tl.float16)
    return e0, e1, e2, e3, e4, e5, e6, e7


@triton.jit
def _by_position(xv):
    """[A, B, 2, 2, 2] -> the 8 tensors [A, B] of position j = 4a + 2b + c (the last three dimensions)."""
    c0, c1 = tl.split(xv)
    b0c0, b1c0 = tl.split(c0)
    b0c1, b1c1 = tl.split(c1)
    x0, x4 = tl.split(b0c0)
    x2, x6 = tl.split(b1c0)
    x1, x5 = tl.split(b0c1)
    x3, x7 = tl.split(b1c1)
    return x0, x1, x2, x3, x4, x5, x6, x7


def _word_args(q, half: bool = False) -> tuple[tuple, dict]:
    """The word-decoding kernels' tensors (words, scales, tables) and constants for weight ``q`` (``half``:
    the program with fp16 outputs)."""
    tensors, nested = _nf4_args(q)
    # Triton's interpreter runs no PTX: there the same values come from table loads
    return (q.words, *tensors[1:]), dict(LUT=q.lut16 if half else q.lut, HALF=half, NESTED=nested, GROUP=q.group,
                                         USE_ASM=os.environ.get("TRITON_INTERPRET") != "1")


@triton.jit
def _mm_t_kernel(x_ptr, w_ptr, a_ptr, a2_ptr, off_ptr, code_ptr, code2_ptr, out_ptr, M, N, K, KW, stride_xm,
                 K_SPLIT, KIND: tl.constexpr, LUT: tl.constexpr, USE_ASM: tl.constexpr, NESTED: tl.constexpr,
                 GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 HALF: tl.constexpr, X_CONTIGUOUS: tl.constexpr):
    """The weight as the left operand: out.T [BLOCK_N, BLOCK_M] = W tile @ x.T tile, so that the weight rows fill
    the tensor cores' wide side (Hopper's warpgroup MMA takes a left operand converted in registers) and a few
    visitors' rows the narrow one. Program (n, m, s) covers columns s*K_SPLIT .. +K_SPLIT; with several
    splits, ``out`` is [splits, M, N] fp32 partial sums. KIND 8: int8 rows, scaled after the dot (exact);
    KIND 4: NF4 words decoded in registers (BLOCK_K values = BLOCK_K / 8 words; one fp16 tile per position
    within a word, scaled per block and rounded to 16 bits like a de-quantized copy; HALF: decoded and scaled
    in fp16, one rounding more; X_CONTIGUOUS: the inputs loaded as one run and split by position in
    registers, instead of 8 strided loads)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask, nmask = m < M, n < N
    k_lo = pid_s * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    x_cols = x_ptr + m[None, :].to(tl.int64) * stride_xm
    if KIND == 8:
        kk = tl.arange(0, BLOCK_K)
        w_rows = w_ptr + n[:, None].to(tl.int64) * K
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k = k0 + kk
            kmask = k < k_hi
            xt = tl.load(x_cols + k[:, None], mask=kmask[:, None] & mmask[None, :], other=0.0)
            w = tl.load(w_rows + k[None, :], mask=nmask[:, None] & kmask[None, :], other=0).to(xt.dtype)
            acc += tl.dot(w, xt)
        acc = acc * tl.load(a_ptr + n, mask=nmask, other=0.0)[:, None]
    else:
        W: tl.constexpr = BLOCK_K // 8
        NB: tl.constexpr = BLOCK_K // 64
        wi = tl.arange(0, W)
        KB = K // 64
        w_rows = w_ptr + n[:, None].to(tl.int64) * KW
        for k0 in range(k_lo, k_hi, BLOCK_K):
            word = k0 // 8 + wi                                     # [W]: word of the row
            inside = word < k_hi // 8
            words = tl.load(w_rows + word[None, :], mask=nmask[:, None] & inside[None, :], other=0)
            scale = _nf4_scales(a_ptr, a2_ptr, off_ptr, code2_ptr, n, nmask, k0 // 64, KB, NB, NESTED, GROUP)
            scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (BLOCK_N, NB, 8)), (BLOCK_N, W))   # per word
            e0, e1, e2, e3, e4, e5, e6, e7 = _nf4_word_values(words, code_ptr, LUT, USE_ASM, HALF)
            if HALF:
                scale = scale.to(tl.float16)
            if X_CONTIGUOUS:       # x [BLOCK_M, BLOCK_K] in one run -> [BLOCK_M, W, 2, 2, 2]: j = 4a + 2b + c
                k = k0 + tl.arange(0, BLOCK_K)
                xr = tl.load(x_ptr + m[:, None].to(tl.int64) * stride_xm + k[None, :],
                             mask=mmask[:, None] & (k < k_hi)[None, :], other=0.0)
                x0, x1, x2, x3, x4, x5, x6, x7 = _by_position(tl.reshape(xr, [BLOCK_M, W, 2, 2, 2]))
                x0, x1, x2, x3 = tl.trans(x0), tl.trans(x1), tl.trans(x2), tl.trans(x3)
                x4, x5, x6, x7 = tl.trans(x4), tl.trans(x5), tl.trans(x6), tl.trans(x7)
            else:
                xs = x_cols + word[:, None] * 8                     # the first column of each word
                xmask = inside[:, None] & mmask[None, :]
                x0 = tl.load(xs, mask=xmask, other=0.0)
                x1 = tl.load(xs + 1, mask=xmask, other=0.0)
                x2 = tl.load(xs + 2, mask=xmask, other=0.0)
                x3 = tl.load(xs + 3, mask=xmask, other=0.0)
                x4 = tl.load(xs + 4, mask=xmask, other=0.0)
                x5 = tl.load(xs + 5, mask=xmask, other=0.0)
                x6 = tl.load(xs + 6, mask=xmask, other=0.0)
                x7 = tl.load(xs + 7, mask=xmask, other=0.0)
            acc += tl.dot((e0 * scale).to(x0.dtype), x0)
            acc += tl.dot((e1 * scale).to(x0.dtype), x1)
            acc += tl.dot((e2 * scale).to(x0.dtype), x2)
            acc += tl.dot((e3 * scale).to(x0.dtype), x3)
            acc += tl.dot((e4 * scale).to(x0.dtype), x4)
            acc += tl.dot((e5 * scale).to(x0.dtype), x5)
            acc += tl.dot((e6 * scale).to(x0.dtype), x6)
            acc += tl.dot((e7 * scale).to(x0.dtype), x7)
    dest = out_ptr + pid_s.to(tl.int64) * M * N + m[None, :] * N + n[:, None]
    tl.store(dest, acc.to(out_ptr.dtype.element_ty), mask=nmask[:, None] & mmask[None, :])


def _mm_t(x: torch.Tensor, q, block_m: int, block_n: int, block_k: int, num_warps: int, num_stages: int,
          splits: int, half: bool = False, x_contiguous: bool = False) -> torch.Tensor:
    """x @ W.T through ``_mm_t_kernel``, the columns cut into ``splits`` parts summed in fp32 afterwards (more
    programs than the weight's rows alone give, for the shapes whose output is narrow)."""
    m, k = x.shape
    n = q.shape[0]
    if q.kind == "int8":
        tensors, constants = (q.data, q.scale, q.scale, q.scale, q.scale, q.scale), \
            dict(KIND=8, LUT="", USE_ASM=False, NESTED=False, GROUP=1, HALF=False)
    else:
        tensors, constants = _word_args(q, half)
        constants["KIND"] = 4
        block_k = max(128, block_k)
    per_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    splits = triton.cdiv(k, per_split)
    out = torch.empty((splits, m, n) if splits > 1 else (m, n), dtype=torch.float32 if splits > 1 else x.dtype,
                      device=x.device)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), splits)
    _mm_t_kernel[grid](x, *tensors, out, m, n, k, k // 8, x.stride(0), per_split, BLOCK_M=block_m, BLOCK_N=block_n,
                       BLOCK_K=block_k, X_CONTIGUOUS=x_contiguous, num_warps=num_warps, num_stages=num_stages,
                       **constants)
    return out.sum(0).to(x.dtype) if splits > 1 else out


def _nf4_args(q):
    nested = q.absmax2 is not None
    return (q.data, q.absmax, q.absmax2 if nested else q.absmax, q.offset2 if nested else q.absmax, q.code,
            q.code2 if nested else q.code), nested


@triton.jit
def _qmatmul_kernel(x_ptr, w_ptr, s_ptr, out_ptr, M, N, K, stride_xm, stride_om,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """int8 rows with one scale each, scaled after the dot (exact)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask, nmask = m < M, n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    x_rows = x_ptr + m[:, None].to(tl.int64) * stride_xm
    kk = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + n[:, None].to(tl.int64) * K
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kk
        kmask = k < K
        x = tl.load(x_rows + k[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_rows + k[None, :], mask=nmask[:, None] & kmask[None, :], other=0).to(x.dtype)
        acc += tl.dot(x, tl.trans(w))
    acc = acc * tl.load(s_ptr + n, mask=nmask, other=0.0)[None, :]
    tl.store(out_ptr + m[:, None] * stride_om + n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


def qmatmul(x: torch.Tensor, q, block_m: int = 16, block_n: int = 64, block_k: int = 128, num_warps: int = 4,
            num_stages: int = 3, variant: str = "", splits: int = 1) -> torch.Tensor:
    """x [M, K] @ W.T for decode batches. ``variant`` "t" (int8 and NF4 words): the weight as the dot's left
    operand, K cut into ``splits`` parts (``_mm_t_kernel``); for NF4 also "th" (decoded in fp16), "tc" (inputs
    loaded as one run), "thc" (both). "" (int8 only): x as the left operand (``_qmatmul_kernel``)."""
    if variant.startswith("t"):
        return _mm_t(x, q, block_m, block_n, block_k, num_warps, num_stages, splits, "h" in variant[1:],
                     "c" in variant[1:])
    if q.kind != "int8":
        raise ValueError(f"qmatmul variant {variant!r} takes int8 weights; 4-bit weights take the 't' variants")
    m, k = x.shape
    n = q.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    _qmatmul_kernel[grid](x, q.data, q.scale, out, m, n, k, x.stride(0), out.stride(0), BLOCK_M=block_m,
                          BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)
    return out


@triton.jit
def _int8_dequant_kernel(w_ptr, s_ptr, out_ptr, K, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    k = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = k < K
    w = tl.load(w_ptr + row.to(tl.int64) * K + k, mask=mask, other=0).to(tl.float32)
    tl.store(out_ptr + row.to(tl.int64) * K + k, (w * tl.load(s_ptr + row)).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _nf4_dequant_kernel(w_ptr, a_ptr, a2_ptr, off_ptr, code_ptr, code2_ptr, out_ptr, N, K,
                        NESTED: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Weights [n, k0:k0+BLOCK_K] de-quantized, written as even and odd columns (a byte's high and low nibble)."""
    HALF: tl.constexpr = BLOCK_K // 2
    NB: tl.constexpr = BLOCK_K // 64
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    nmask = n < N
    byte = k0 // 2 + tl.arange(0, HALF)
    packed = tl.load(w_ptr + n[:, None].to(tl.int64) * (K // 2) + byte[None, :],
                     mask=nmask[:, None] & (byte < K // 2)[None, :], other=0).to(tl.int32)
    scale = _nf4_scales(a_ptr, a2_ptr, off_ptr, code2_ptr, n, nmask, k0 // 64, K // 64, NB, NESTED, GROUP)
    scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (BLOCK_N, NB, 32)), (BLOCK_N, HALF))   # one per 32 bytes
    we = tl.load(code_ptr + (packed >> 4)) * scale
    wo = tl.load(code_ptr + (packed & 15)) * scale
    even = k0 + 2 * tl.arange(0, HALF)
    dest = out_ptr + n[:, None].to(tl.int64) * K + even[None, :]
    mask = nmask[:, None] & (even < K)[None, :]
    tl.store(dest, we.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(dest + 1, wo.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize(q, dtype: torch.dtype) -> torch.Tensor:
    """The weight [N, K] in ``dtype`` (int8: cb * scale; NF4: code * absmax, rounded once, as bitsandbytes does)."""
    n, k = q.shape
    out = torch.empty((n, k), dtype=dtype, device=q.data.device)
    if q.kind == "int8":
        _int8_dequant_kernel[(n, triton.cdiv(k, 1024))](q.data, q.scale, out, k, BLOCK=1024, num_warps=4)
        return out
    tensors, nested = _nf4_args(q)
    _nf4_dequant_kernel[(triton.cdiv(n, 16), triton.cdiv(k, 256))](*tensors, out, n, k, NESTED=nested, GROUP=q.group,
                                                                    BLOCK_N=16, BLOCK_K=256, num_warps=4)
    return out
