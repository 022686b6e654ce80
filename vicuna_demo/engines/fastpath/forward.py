"""The one decoder forward of prefill, CPU decode, kernel decode and CUDA-graph decode.

The CUDA graphs capture the kernel decode. ``decoder`` is the block of ``arch.py`` written once; the paths
differ only in their ``Ops`` (the model's own modules, or the Triton kernels of ``kernels.py``) and in the
``attend`` they hand it (padded prompts, or one new token per row over the paged KV cache: ``attention``
below and ``model.py``)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias


class EagerOps:
    """The HF modules themselves: on a CPU a reply equals ``generate`` token for token."""

    def add_norm(self, x, residual, norm, pre=None):
        """-> (norm(residual + x), residual + x); without ``residual``, x is the residual; ``pre`` norms x first
        (Gemma's norms after attention and the MLP)."""
        x = x if pre is None else pre.module(x)
        residual = x if residual is None else residual + x
        return norm.module(residual), residual

    def head_norm(self, x, norm, heads: int):
        return norm.module(x.reshape(x.shape[0], heads, -1)).reshape(x.shape[0], -1)

    def mlp_down(self, layer, g, u):
        return layer.down(layer.act_fn(g) * u)


class KernelOps:
    """Triton kernels: norms with the residual add (and Gemma's output norm) fused in, the activation fused into
    the down GEMV."""

    def __init__(self):
        from . import kernels
        self.fk = kernels

    def add_norm(self, x, residual, norm, pre=None):
        return self.fk.add_rmsnorm(x, residual, norm.weight, norm.eps, gemma=norm.gemma,
                                   pre=None if pre is None else (pre.weight, pre.eps))

    def head_norm(self, x, norm, heads: int):
        rows = x.shape[0]
        return self.fk.rmsnorm(x.reshape(rows * heads, -1), norm.weight, norm.eps, gemma=norm.gemma).view(rows, -1)

    def mlp_down(self, layer, g, u):
        out = layer.down.gated(g, u, layer.activation)
        return out if out is not None else layer.down(self.fk.act_mul(g, u, layer.activation))


Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def decoder(runner, x: torch.Tensor, attend: Attend, ops) -> torch.Tensor:
    """x [tokens, hidden] (embedded) -> the final norm's output [tokens, hidden]. ``attend(layer, q, k, v)`` takes
    q [tokens, Hq*D] and k, v [tokens, Hkv*D] before rotary embedding and returns [tokens, Hq*D]."""
    spec = runner.spec
    residual = after = None                  # ``after``: the previous block's output norm, fused into the next add
    for li, layer in enumerate(runner.layers):
        h, residual = ops.add_norm(x, residual, layer.attn_norm, after)
        q, k, v = layer.project_qkv(h)
        if layer.q_norm is not None:
            q, k = ops.head_norm(q, layer.q_norm, spec.n_heads), ops.head_norm(k, layer.k_norm, spec.n_kv)
        x = layer.o(attend(li, q, k, v))
        h, residual = ops.add_norm(x, residual, layer.mlp_norm, layer.attn_out_norm)
        g, u = layer.project_gate_up(h)
        x = ops.mlp_down(layer, g, u)
        after = layer.mlp_out_norm
    h, _ = ops.add_norm(x, residual, runner.final_norm, after)
    return h


def rotate(x, cos, sin):
    """Rotary embedding as transformers computes it (``apply_rotary_pos_emb``)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def attention(q, keys, values, *, scale: float, mask=None, causal: bool = False, softcap: float | None = None):
    """q [n, Hq, T, D] over keys/values [n, Hkv, S, D]; ``mask`` True where a key counts. Scaled dot-product
    attention, or with ``softcap`` the eager scores of transformers' Gemma 2 (SDPA has no soft-capping)."""
    gqa = keys.shape[1] != q.shape[1]
    lower_right = isinstance(mask, CausalBias)
    if gqa and lower_right:                       # causal_lower_right takes no GQA
        group = q.shape[1] // keys.shape[1]
        keys, values, gqa = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1), False
    if softcap is None:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal and mask is None,
                                              scale=scale, enable_gqa=gqa)
    if gqa:
        group = q.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, keys.transpose(2, 3)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if lower_right or (mask is None and causal):     # causal (lower right: the last query sees every key)
        t, s = scores.shape[-2:]
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, values)


def key_mask(q_pos, k_pos, lengths=None, window: int | None = None):
    """True where a query at ``q_pos`` sees the key at ``k_pos``: causal, within ``lengths`` (keys written),
    and with ``window`` only the last ``window`` positions (transformers: ``k > q - window``)."""
    mask = k_pos <= q_pos
    if lengths is not None:
        mask = mask & (k_pos < lengths)
    if window:
        mask = mask & (k_pos > q_pos - window)
    return mask
