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

- ``nf4_gemv(x, q, block_n, block_k, warps, up=None)``: one row; de-quantizes in registers (fp32),
  optionally with x = SiLU(x) * up computed on the fly (the down projection).
- ``qmatmul(x, q, block_m, block_n, block_k, warps, stages)``: several rows (decode batches): weight
  tiles de-quantized to fp16 in registers, then tensor-core dots with fp32 accumulation.
- ``dequantize(q, dtype)``: the whole weight in 16 bits (for ``F.linear`` when many rows make a copy pay).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

QBLOCK = 64      # bitsandbytes' default 4-bit block size (the only one our kernels take)


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
def _nf4_tile(w_ptr, a_ptr, a2_ptr, off_ptr, code_ptr, code2_ptr, n, nmask, k0, K,
              BN: tl.constexpr, BK: tl.constexpr, NESTED: tl.constexpr, GROUP: tl.constexpr):
    """Weights [n, k0:k0+BK] de-quantized to fp32, split by parity: (even columns, odd columns), [BN, BK/2] each."""
    HALF: tl.constexpr = BK // 2
    NB: tl.constexpr = BK // 64
    j = tl.arange(0, HALF)
    byte = k0 // 2 + j
    mask = nmask[:, None] & (byte < K // 2)[None, :]
    packed = tl.load(w_ptr + n[:, None].to(tl.int64) * (K // 2) + byte[None, :], mask=mask, other=0).to(tl.int32)
    hi = tl.load(code_ptr + (packed >> 4))
    lo = tl.load(code_ptr + (packed & 15))
    scale = _nf4_scales(a_ptr, a2_ptr, off_ptr, code2_ptr, n, nmask, k0 // 64, K // 64, NB, NESTED, GROUP)
    scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (BN, NB, 32)), (BN, HALF))   # one per 32 bytes
    return hi * scale, lo * scale


@triton.jit
def _nf4_gemv_kernel(x_ptr, u_ptr, w_ptr, a_ptr, a2_ptr, off_ptr, code_ptr, code2_ptr, out_ptr, N, K,
                     NESTED: tl.constexpr, GATED: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    j = tl.arange(0, BLOCK_K // 2)
    acc = tl.zeros([BLOCK_N, BLOCK_K // 2], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        even = k0 + 2 * j
        kmask = even < K
        if GATED:   # x = SiLU(gate) * up, rounded like the separate kernel (the down projection)
            ge = tl.load(x_ptr + even, mask=kmask, other=0.0)
            go = tl.load(x_ptr + even + 1, mask=kmask, other=0.0)
            gef, gof = ge.to(tl.float32), go.to(tl.float32)
            xe = ((gef / (1.0 + tl.exp(-gef))).to(ge.dtype).to(tl.float32)
                  * tl.load(u_ptr + even, mask=kmask, other=0.0).to(tl.float32)).to(ge.dtype).to(tl.float32)
            xo = ((gof / (1.0 + tl.exp(-gof))).to(go.dtype).to(tl.float32)
                  * tl.load(u_ptr + even + 1, mask=kmask, other=0.0).to(tl.float32)).to(go.dtype).to(tl.float32)
        else:
            xe = tl.load(x_ptr + even, mask=kmask, other=0.0).to(tl.float32)
            xo = tl.load(x_ptr + even + 1, mask=kmask, other=0.0).to(tl.float32)
        we, wo = _nf4_tile(w_ptr, a_ptr, a2_ptr, off_ptr, code_ptr, code2_ptr, n, nmask, k0, K,
                           BLOCK_N, BLOCK_K, NESTED, GROUP)
        acc += we * xe[None, :] + wo * xo[None, :]
    tl.store(out_ptr + n, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=nmask)


def _nf4_args(q):
    nested = q.absmax2 is not None
    return (q.data, q.absmax, q.absmax2 if nested else q.absmax, q.offset2 if nested else q.absmax, q.code,
            q.code2 if nested else q.code), nested


def nf4_gemv(x: torch.Tensor, q, block_n: int = 16, block_k: int = 256, num_warps: int = 4,
             up: torch.Tensor | None = None) -> torch.Tensor:
    """x [1, K] @ W.T for a 4-bit weight; fp32 inside, x's dtype out. With ``up``, the input is SiLU(x) * up."""
    n, k = q.shape
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    tensors, nested = _nf4_args(q)
    _nf4_gemv_kernel[(triton.cdiv(n, block_n),)](x, up if up is not None else x, *tensors, out, n, k,
                                                 NESTED=nested, GATED=up is not None, GROUP=q.group,
                                                 BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps)
    return out


@triton.jit
def _qmatmul_kernel(x_ptr, w_ptr, a_ptr, a2_ptr, off_ptr, code_ptr, code2_ptr, out_ptr, M, N, K, stride_xm,
                    stride_om, KIND: tl.constexpr, NESTED: tl.constexpr, GROUP: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """KIND 8: int8 rows with one scale each (scaled after the dot, exact); KIND 4: NF4 (scaled per block)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask, nmask = m < M, n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    x_rows = x_ptr + m[:, None].to(tl.int64) * stride_xm
    if KIND == 8:
        kk = tl.arange(0, BLOCK_K)
        w_rows = w_ptr + n[:, None].to(tl.int64) * K
        for k0 in range(0, K, BLOCK_K):
            k = k0 + kk
            kmask = k < K
            x = tl.load(x_rows + k[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
            w = tl.load(w_rows + k[None, :], mask=nmask[:, None] & kmask[None, :], other=0).to(x.dtype)
            acc += tl.dot(x, tl.trans(w))
        acc = acc * tl.load(a_ptr + n, mask=nmask, other=0.0)[None, :]
    else:
        j = tl.arange(0, BLOCK_K // 2)
        for k0 in range(0, K, BLOCK_K):
            even = k0 + 2 * j
            xmask = mmask[:, None] & (even < K)[None, :]
            xe = tl.load(x_rows + even[None, :], mask=xmask, other=0.0)
            xo = tl.load(x_rows + even[None, :] + 1, mask=xmask, other=0.0)
            we, wo = _nf4_tile(w_ptr, a_ptr, a2_ptr, off_ptr, code_ptr, code2_ptr, n, nmask, k0, K,
                               BLOCK_N, BLOCK_K, NESTED, GROUP)
            acc += tl.dot(xe, tl.trans(we.to(xe.dtype)))     # rounded to 16 bits like a de-quantized copy
            acc += tl.dot(xo, tl.trans(wo.to(xo.dtype)))
    tl.store(out_ptr + m[:, None] * stride_om + n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


def qmatmul(x: torch.Tensor, q, block_m: int = 16, block_n: int = 64, block_k: int = 128, num_warps: int = 4,
            num_stages: int = 3) -> torch.Tensor:
    """x [M, K] @ W.T for an int8 or NF4 weight (any M; meant for decode batches of 2-64 rows)."""
    m, k = x.shape
    n = q.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if q.kind == "int8":
        tensors, nested = (q.data, q.scale, q.scale, q.scale, q.scale, q.scale), False
    else:
        tensors, nested = _nf4_args(q)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    _qmatmul_kernel[grid](x, *tensors, out, m, n, k, x.stride(0), out.stride(0), KIND=8 if q.kind == "int8" else 4,
                          NESTED=nested, GROUP=q.group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                          num_warps=num_warps, num_stages=num_stages)
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
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    nmask = n < N
    even = k0 + 2 * tl.arange(0, BLOCK_K // 2)
    we, wo = _nf4_tile(w_ptr, a_ptr, a2_ptr, off_ptr, code_ptr, code2_ptr, n, nmask, k0, K,
                       BLOCK_N, BLOCK_K, NESTED, GROUP)
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
