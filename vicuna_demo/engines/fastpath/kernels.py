"""Triton kernels for the CUDA decode step of ``fastpath.py``: fewer, fused launches per layer.

Imported only where Triton and a CUDA GPU exist. Each function takes and returns torch tensors and
is safe inside CUDA-graph capture (no host synchronisation, shapes fixed by the caller):

- ``add_rmsnorm(x, residual, weight, eps, pre=None)``: residual += x (first normed by ``pre``: Gemma's norms
  after attention and the MLP), then RMSNorm of it (one pass).
- ``rope_store(q, k, v, cos, sin, pos, phys, off, k_cache, v_cache)``: rotary embedding of q and k,
  k and v written into the paged cache at (block ``phys``, offset ``off``); returns rotated q.
- ``paged_attention(q, k_cache, v_cache, table, seq_lens, n_splits)``: one query token per row
  against that row's cached tokens, split over the sequence and combined (flash-decoding).
- ``act_mul(g, u, activation)``: SiLU(g) * u or GELU(g) * u.
- ``rmsnorm(x, weight, eps)``: RMSNorm alone (q/k norms).
- ``gemv(x, w, scale, up=None)``: x @ (w * scale).T for one row (decode; act(x) * up with ``up``), over int8 weights stored
  the way bitsandbytes' LLM.int8 stores them (row-wise absmax / 127) or over 16-bit weights (used where
  it beats cuBLAS for a shape). Batches of int8 rows and 4-bit weights: ``kernels_quant.py``.

Their numerics follow the eager PyTorch ops they replace (fp32 inside, fp16 stored);
``tests/test_fastpath.py`` checks them against those ops in Triton's CPU interpreter when available.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# -- RMSNorm with the residual add fused in ---------------------------------------------------------
@triton.jit
def _normed(xf, w_ptr, cols, mask, n_cols, eps, dt, GEMMA: tl.constexpr):
    """RMSNorm of the fp32 row ``xf`` in dtype ``dt``, rounded as transformers rounds it."""
    var = tl.sum(xf * xf, axis=0) / n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if GEMMA:    # x * (1 + w), all in fp32, rounded once (transformers' Gemma RMSNorm)
        return (xf * (1.0 / tl.sqrt(var + eps)) * (1.0 + w)).to(dt)
    else:        # (x normalised, in the model's dtype) * w (Llama's)
        return ((xf * (1.0 / tl.sqrt(var + eps))).to(dt).to(tl.float32) * w).to(dt)


@triton.jit
def _add_rmsnorm_kernel(x_ptr, res_ptr, w_ptr, pre_ptr, out_ptr, n_cols, eps, pre_eps, stride_x, stride_r, stride_o,
                        HAS_RES: tl.constexpr, PRE: tl.constexpr, GEMMA: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if PRE:      # Gemma's norm of the attention / MLP output, before the residual add
        x = _normed(x.to(tl.float32), pre_ptr, cols, mask, n_cols, pre_eps, x.dtype, GEMMA)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(r.dtype)   # the sum is stored in the model's dtype
        tl.store(res_ptr + row * stride_r + cols, x, mask=mask)
    elif PRE:
        tl.store(res_ptr + row * stride_r + cols, x, mask=mask)
    tl.store(out_ptr + row * stride_o + cols, _normed(x.to(tl.float32), w_ptr, cols, mask, n_cols, eps, x.dtype,
                                                      GEMMA), mask=mask)


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                gemma: bool = False, pre: tuple[torch.Tensor, float] | None = None):
    """-> (normed, residual): residual += x, then RMSNorm of it. Without ``residual``, x itself becomes the
    residual (a copy). ``gemma``: the norm multiplies by (1 + weight). ``pre`` (weight, eps): x is first
    normed by it (Gemma's norms after attention and the MLP), in the same launch."""
    rows, n = x.shape
    out = torch.empty_like(x)
    has_res = residual is not None
    if not has_res:
        residual = torch.empty_like(x) if pre is not None else x.clone()
    pre_w, pre_eps = pre if pre is not None else (weight, eps)
    _add_rmsnorm_kernel[(rows,)](x, residual, weight, pre_w, out, n, eps, pre_eps, x.stride(0), residual.stride(0),
                                 out.stride(0), HAS_RES=has_res, PRE=pre is not None, GEMMA=gemma, BLOCK=_pow2(n),
                                 num_warps=4 if n <= 4096 else 8)
    return out, residual


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool = False) -> torch.Tensor:
    """RMSNorm of each row of x [rows, n] (no residual)."""
    rows, n = x.shape
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    _add_rmsnorm_kernel[(rows,)](x, x, weight, weight, out, n, eps, eps, x.stride(0), x.stride(0), out.stride(0),
                                 HAS_RES=False, PRE=False, GEMMA=gemma, BLOCK=_pow2(n),
                                 num_warps=4 if n <= 4096 else 8)
    return out


# -- rotary embedding + paged-cache write -----------------------------------------------------------
@triton.jit
def _rope(x1, x2, c1, c2, s1, s2, dt):
    """q*cos + rotate_half(q)*sin on the two halves, each product rounded like the eager ops."""
    o1 = (x1.to(tl.float32) * c1).to(dt).to(tl.float32) - (x2.to(tl.float32) * s1).to(dt).to(tl.float32)
    o2 = (x2.to(tl.float32) * c2).to(dt).to(tl.float32) + (x1.to(tl.float32) * s2).to(dt).to(tl.float32)
    return o1.to(dt), o2.to(dt)


@triton.jit
def _rope_store_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, phys_ptr, off_ptr,
                       qo_ptr, kc_ptr, vc_ptr, ko_ptr, stride_q, stride_k, stride_v, stride_qo, stride_ko,
                       stride_cb, stride_ch, stride_ct, HQ: tl.constexpr, HKV: tl.constexpr,
                       HALF: tl.constexpr, K_OUT: tl.constexpr):
    row = tl.program_id(0)
    head = tl.program_id(1)
    dt = qo_ptr.dtype.element_ty
    d = tl.arange(0, HALF)
    pos = tl.load(pos_ptr + row)
    c1 = tl.load(cos_ptr + pos * 2 * HALF + d).to(tl.float32)
    c2 = tl.load(cos_ptr + pos * 2 * HALF + HALF + d).to(tl.float32)
    s1 = tl.load(sin_ptr + pos * 2 * HALF + d).to(tl.float32)
    s2 = tl.load(sin_ptr + pos * 2 * HALF + HALF + d).to(tl.float32)
    if head < HQ:
        base = q_ptr + row * stride_q + head * 2 * HALF
        o1, o2 = _rope(tl.load(base + d), tl.load(base + HALF + d), c1, c2, s1, s2, dt)
        out = qo_ptr + row * stride_qo + head * 2 * HALF
        tl.store(out + d, o1)
        tl.store(out + HALF + d, o2)
    else:
        kh = head - HQ
        base = k_ptr + row * stride_k + kh * 2 * HALF
        o1, o2 = _rope(tl.load(base + d), tl.load(base + HALF + d), c1, c2, s1, s2, dt)
        phys = tl.load(phys_ptr + row).to(tl.int64)
        off = tl.load(off_ptr + row).to(tl.int64)
        dest = phys * stride_cb + kh * stride_ch + off * stride_ct
        tl.store(kc_ptr + dest + d, o1)
        tl.store(kc_ptr + dest + HALF + d, o2)
        if K_OUT:
            kout = ko_ptr + row * stride_ko + kh * 2 * HALF
            tl.store(kout + d, o1)
            tl.store(kout + HALF + d, o2)
        vbase = v_ptr + row * stride_v + kh * 2 * HALF
        tl.store(vc_ptr + dest + d, tl.load(vbase + d))
        tl.store(vc_ptr + dest + HALF + d, tl.load(vbase + HALF + d))


def rope_store(q, k, v, cos, sin, pos, phys, off, k_cache, v_cache, n_heads: int, n_kv_heads: int,
               return_k: bool = False):
    """q [rows, HQ*D], k/v [rows, HKV*D] (row-strided views are fine); cos/sin [positions, D] tables;
    pos/phys/off [rows] int. k_cache/v_cache [blocks, HKV, block, D]. -> rotated q [rows, HQ, D]
    (and, with ``return_k``, rotated k [rows, HKV, D] too: prefill attends to it directly)."""
    rows = q.shape[0]
    head_dim = k_cache.shape[-1]
    q_out = torch.empty((rows, n_heads, head_dim), dtype=q.dtype, device=q.device)
    k_out = torch.empty((rows, n_kv_heads, head_dim), dtype=q.dtype, device=q.device) if return_k else q_out
    _rope_store_kernel[(rows, n_heads + n_kv_heads)](
        q, k, v, cos, sin, pos, phys, off, q_out, k_cache, v_cache, k_out,
        q.stride(0), k.stride(0), v.stride(0), q_out.stride(0), k_out.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        HQ=n_heads, HKV=n_kv_heads, HALF=head_dim // 2, K_OUT=return_k, num_warps=1)
    return (q_out, k_out) if return_k else q_out


# -- paged decode attention (split-K, then combine) -----------------------------------------------------
@triton.jit
def _paged_attn_partial(q_ptr, kc_ptr, vc_ptr, table_ptr, lens_ptr, m_ptr, l_ptr, acc_ptr, out_ptr, scale,
                        stride_qr, stride_qh, stride_cb, stride_ch, stride_ct, stride_tr, SPLITS,
                        WINDOW, HQ: tl.constexpr, GROUP: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr,
                        DIRECT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr):
    rh = tl.program_id(0)
    split = tl.program_id(1)
    row = rh // HQ
    head = rh % HQ
    kvh = head // GROUP
    seq_len = tl.load(lens_ptr + row)
    n_blocks = tl.cdiv(seq_len, BLOCK)
    if HAS_WINDOW:      # the window's first key; without one the loop is the plain kernel's, no extra mask
        first = tl.maximum(seq_len - WINDOW, 0)
    else:
        first = 0
    lo = first // BLOCK
    per = tl.cdiv(n_blocks - lo, SPLITS)
    start = lo + split * per
    end = tl.minimum(start + per, n_blocks)
    d = tl.arange(0, D)
    t = tl.arange(0, BLOCK)
    q = tl.load(q_ptr + row * stride_qr + head * stride_qh + d).to(tl.float32) * scale
    m_i = tl.full([1], float("-inf"), tl.float32)
    l_i = tl.zeros([1], tl.float32)
    acc = tl.zeros([D], tl.float32)
    for blk in range(start, end):
        phys = tl.load(table_ptr + row * stride_tr + blk).to(tl.int64)
        base = phys * stride_cb + kvh * stride_ch + t[:, None] * stride_ct + d[None, :]
        valid = (blk * BLOCK + t) < seq_len
        if HAS_WINDOW:
            valid = valid & ((blk * BLOCK + t) >= first)
        k = tl.load(kc_ptr + base, mask=valid[:, None], other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], axis=1)
        if SOFTCAP > 0:       # cap * tanh(s / cap), tanh written with exp (2 / (1 + e^-2x) - 1)
            s = SOFTCAP * (2.0 / (1.0 + tl.exp(-2.0 * s / SOFTCAP)) - 1.0)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        p = tl.exp(s - m_new)
        alpha = tl.exp(m_i - m_new)
        v = tl.load(vc_ptr + base, mask=valid[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    if DIRECT:   # one split: this program saw the whole sequence, so normalise and write the output
        out = acc / tl.maximum(tl.sum(l_i, axis=0), 1e-20)
        tl.store(out_ptr + rh * D + d, out.to(out_ptr.dtype.element_ty))
    else:
        idx = rh * SPLITS + split
        tl.store(m_ptr + idx + tl.arange(0, 1), m_i)
        tl.store(l_ptr + idx + tl.arange(0, 1), l_i)
        tl.store(acc_ptr + idx * D + d, acc)


@triton.jit
def _paged_attn_combine(m_ptr, l_ptr, acc_ptr, out_ptr, SPLITS, SPLITS_P2: tl.constexpr, D: tl.constexpr):
    rh = tl.program_id(0)
    s = tl.arange(0, SPLITS_P2)
    smask = s < SPLITS
    m = tl.load(m_ptr + rh * SPLITS + s, mask=smask, other=float("-inf"))
    l = tl.load(l_ptr + rh * SPLITS + s, mask=smask, other=0.0)
    d = tl.arange(0, D)
    acc = tl.load(acc_ptr + (rh * SPLITS + s)[:, None] * D + d[None, :], mask=smask[:, None], other=0.0)
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_max))
    total = tl.sum(l * w, axis=0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.maximum(total, 1e-20)
    tl.store(out_ptr + rh * D + d, out.to(out_ptr.dtype.element_ty))


def paged_attention(q, k_cache, v_cache, table, seq_lens, n_splits: int, scale: float, num_warps: int = 4,
                    num_stages: int = 3, window: int | None = None, softcap: float | None = None):
    """q [rows, HQ, D]; caches [blocks, HKV, block, D]; table [rows, max_blocks] int32;
    seq_lens [rows] int32 (0 = empty row: output 0). ``window``: only each row's last ``window`` keys;
    ``softcap``: scores -> cap * tanh(scores / cap). -> [rows, HQ*D]."""
    rows, n_heads, head_dim = q.shape
    group = n_heads // k_cache.shape[1]
    block = k_cache.shape[2]
    out = torch.empty((rows, n_heads * head_dim), dtype=q.dtype, device=q.device)
    direct = n_splits == 1
    parts = 1 if direct else rows * n_heads * n_splits
    m = torch.empty((parts,), dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty((parts, head_dim), dtype=torch.float32, device=q.device)
    _paged_attn_partial[(rows * n_heads, n_splits)](
        q, k_cache, v_cache, table, seq_lens, m, l, acc, out, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), table.stride(0), n_splits,
        int(window or 2**30), HQ=n_heads, GROUP=group, BLOCK=block, D=head_dim, DIRECT=direct,
        SOFTCAP=float(softcap or 0.0), HAS_WINDOW=bool(window), num_warps=num_warps, num_stages=num_stages)
    if not direct:
        _paged_attn_combine[(rows * n_heads,)](m, l, acc, out, n_splits, SPLITS_P2=_pow2(n_splits), D=head_dim,
                                               num_warps=4)
    return out


# -- act(gate) * up --------------------------------------------------------------------------------------
@triton.jit
def _act(g, GELU: tl.constexpr):
    """act(g) for g in the model's dtype, computed in fp32 and rounded back like the eager op."""
    gf = g.to(tl.float32)
    if GELU:     # tanh approximation (gelu_pytorch_tanh), tanh(y) = 2 / (1 + e^-2y) - 1
        y = 0.7978845608028654 * (gf + 0.044715 * gf * gf * gf)
        return (0.5 * gf * (2.0 / (1.0 + tl.exp(-2.0 * y)))).to(g.dtype)
    else:
        return (gf / (1.0 + tl.exp(-gf))).to(g.dtype)


@triton.jit
def _act_mul_kernel(g_ptr, u_ptr, out_ptr, n_cols, stride_g, stride_u, stride_o, GELU: tl.constexpr,
                    BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0)
    u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_o + cols, (_act(g, GELU).to(tl.float32) * u.to(tl.float32)).to(g.dtype),
             mask=mask)


def act_mul(g: torch.Tensor, u: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """act(g) * u for act "silu" or "gelu_tanh", each rounded like the eager ops."""
    rows, n = g.shape
    out = torch.empty((rows, n), dtype=g.dtype, device=g.device)
    block = 1024
    _act_mul_kernel[(rows, triton.cdiv(n, block))](g, u, out, n, g.stride(0), u.stride(0), out.stride(0),
                                                   GELU=activation == "gelu_tanh", BLOCK=block, num_warps=4)
    return out


# -- GEMV for one row: int8 weights (bitsandbytes' LLM.int8 storage) or fp16/bf16 weights ----------------------
@triton.jit
def _gemv_kernel(x_ptr, u_ptr, w_ptr, s_ptr, out_ptr, N, K, stride_wn, HAS_SCALE: tl.constexpr,
                 GATED: tl.constexpr, GELU: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Accumulates elementwise and reduces once at the end (no cross-lane sums in the loop)."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    w_rows = w_ptr + n[:, None].to(tl.int64) * stride_wn
    acc2 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < K
        w = tl.load(w_rows + k[None, :], mask=nmask[:, None] & kmask[None, :], other=0).to(tl.float32)
        if GATED:   # x = act(gate) * up, rounded like the separate kernel (the down projection)
            g = tl.load(x_ptr + k, mask=kmask, other=0.0)
            act = _act(g, GELU).to(tl.float32)
            x = (act * tl.load(u_ptr + k, mask=kmask, other=0.0).to(tl.float32)).to(g.dtype).to(tl.float32)
        else:
            x = tl.load(x_ptr + k, mask=kmask, other=0.0).to(tl.float32)
        acc2 += w * x[None, :]
    acc = tl.sum(acc2, axis=1)
    if HAS_SCALE:
        acc = acc * tl.load(s_ptr + n, mask=nmask, other=0.0)
    tl.store(out_ptr + n, acc.to(out_ptr.dtype.element_ty), mask=nmask)


def gemv(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None, block_n: int = 8,
         block_k: int = 512, num_warps: int = 4, up: torch.Tensor | None = None,
         activation: str = "silu") -> torch.Tensor:
    """x [1, K] @ w[N, K].T (* scale[N]) for int8 or 16-bit weights; fp32 accumulation, x's dtype out.
    With ``up``, the input is act(x) * up ("silu" or "gelu_tanh"), computed on the fly."""
    if x.shape[0] != 1:
        raise ValueError(f"gemv takes one row, not {x.shape[0]} (cuBLAS or the tiled kernel serve more)")
    n, k = w.shape
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, block_n),)](x, up if up is not None else x, w, scale if scale is not None else w,
                                             out, n, k, w.stride(0), HAS_SCALE=scale is not None,
                                             GATED=up is not None, GELU=activation == "gelu_tanh",
                                             BLOCK_N=block_n, BLOCK_K=block_k,
                                             num_warps=num_warps)
    return out
