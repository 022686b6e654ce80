"""Weights as the decode step uses them: dense, fused q/k/v and gate/up, or bitsandbytes int8 through our GEMV."""

from __future__ import annotations

import torch
import torch.nn.functional as F

def _is_int8(module) -> bool:
    return type(module).__name__ == "Linear8bitLt"


def _int8_parts(module):
    """-> (cb int8 [out, in], scale/127 fp32 [out]) of a bitsandbytes Linear8bitLt, or None."""
    weight = module.weight
    cb = getattr(module.state, "CB", None)
    scb = getattr(module.state, "SCB", None)
    if cb is None:
        cb, scb = getattr(weight, "CB", None), getattr(weight, "SCB", None)
    if cb is None and weight.dtype == torch.int8:
        cb = weight.data
    if cb is None or scb is None or cb.dtype != torch.int8:
        return None
    return cb, (scb.float() / 127.0).contiguous()


class _Linear:
    """One projection as the decode step calls it: dense weight (cuBLAS, or our GEMV where it measured
    faster for that shape and row count), int8 weights through our GEMV, or the module itself."""

    def __init__(self, module=None, weight=None, bias=None, int8_kernel=False):
        self.module = module
        self.weight = weight if weight is not None else (getattr(module, "weight", None) if module is not None else None)
        self.bias = bias if bias is not None else (getattr(module, "bias", None) if module is not None else None)
        self.int8 = None
        self.gemv_config: dict[int, tuple[int, int, int]] = {}   # rows -> (block_n, block_k, warps)
        if module is not None and _is_int8(module):
            self.weight = None
            self.int8 = _int8_parts(module) if int8_kernel else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0] if x.dim() == 2 else -1
        if self.weight is not None:
            config = self.gemv_config.get(rows)
            if config is None:
                return F.linear(x, self.weight, self.bias)
            from . import kernels as fastkernels
            out = fastkernels.gemv(x, self.weight, None, *config)
            return out + self.bias if self.bias is not None else out
        if self.int8 is not None and x.dim() == 2:
            from . import kernels as fastkernels
            config = self.gemv_config.get(rows, "dequant" if rows > 2 else (None, None, 4))
            if config == "dequant":
                out = fastkernels.dequant_linear(x, self.int8[0], self.int8[1])
            else:
                out = fastkernels.gemv(x, self.int8[0], self.int8[1], *config)
            return out + self.bias if self.bias is not None else out
        return self.module(x)

    def gated(self, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor | None:
        """down(SiLU(g) * u) in one kernel when our GEMV serves this row count; None otherwise."""
        rows = g.shape[0]
        if rows != 1:
            return None
        from . import kernels as fastkernels
        if self.weight is not None and rows in self.gemv_config:
            out = fastkernels.gemv(g, self.weight, None, *self.gemv_config[rows], up=u)
        elif self.int8 is not None and self.gemv_config.get(rows, (None,)) != "dequant":
            out = fastkernels.gemv(g, self.int8[0], self.int8[1], *self.gemv_config.get(rows, (None, None, 4)), up=u)
        else:
            return None
        return out + self.bias if self.bias is not None else out

    def capturable(self, rows: int) -> bool:
        """Can a CUDA graph hold this projection for ``rows`` rows? (bitsandbytes' outlier path synchronises.)"""
        if self.weight is not None or self.int8 is not None:
            return True
        state = getattr(self.module, "state", None)
        return state is None or float(getattr(state, "threshold", 0.0) or 0.0) == 0.0

    def shape_key(self) -> tuple:
        w = self.weight if self.weight is not None else (self.int8[0] if self.int8 is not None else None)
        return (tuple(w.shape), w.dtype) if w is not None else ()


class _Layer:
    def __init__(self, layer, fuse: bool, int8_kernel: bool):
        attn, mlp = layer.self_attn, layer.mlp
        self.ln1, self.ln2 = layer.input_layernorm, layer.post_attention_layernorm
        self.eps1 = float(getattr(self.ln1, "variance_epsilon", getattr(self.ln1, "eps", 1e-6)))
        self.eps2 = float(getattr(self.ln2, "variance_epsilon", getattr(self.ln2, "eps", 1e-6)))
        self.attn, self.mlp = attn, mlp
        projections = (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj)
        dense = all(type(p) is torch.nn.Linear for p in projections)
        if fuse and dense:
            self.qkv = _Linear(weight=_fuse_weights([attn.q_proj, attn.k_proj, attn.v_proj]),
                               bias=_fuse_biases([attn.q_proj, attn.k_proj, attn.v_proj]))
            self.gate_up = _Linear(weight=_fuse_weights([mlp.gate_proj, mlp.up_proj]),
                                   bias=_fuse_biases([mlp.gate_proj, mlp.up_proj]))
            self.q = self.k = self.v = self.gate = self.up = None
        else:
            self.qkv = self.gate_up = None
            self.q, self.k, self.v = (_Linear(p, int8_kernel=int8_kernel) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
            self.gate, self.up = (_Linear(p, int8_kernel=int8_kernel) for p in (mlp.gate_proj, mlp.up_proj))
        self.o = _Linear(attn.o_proj, int8_kernel=int8_kernel)
        self.down = _Linear(mlp.down_proj, int8_kernel=int8_kernel)


def _fuse_weights(modules) -> torch.Tensor:
    """Concatenate the modules' weights into one tensor and make each module's weight a view of it
    (the model keeps working, no memory is duplicated)."""
    fused = torch.cat([m.weight.data for m in modules], dim=0)
    start = 0
    for m in modules:
        rows = m.weight.shape[0]
        m.weight.data = fused[start:start + rows]
        start += rows
    return fused


def _fuse_biases(modules):
    if all(m.bias is None for m in modules):
        return None
    parts = [m.bias.data if m.bias is not None else torch.zeros(m.weight.shape[0], dtype=m.weight.dtype,
                                                                  device=m.weight.device) for m in modules]
    fused = torch.cat(parts)
    start = 0
    for m in modules:
        rows = m.weight.shape[0]
        if m.bias is not None:
            m.bias.data = fused[start:start + rows]
        start += rows
    return fused
