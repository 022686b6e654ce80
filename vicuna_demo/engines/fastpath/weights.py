"""Weights as the decode step uses them: dense, fused q/k/v and gate/up, or bitsandbytes' int8 / 4-bit
weights read in place by our Triton kernels (``kernels.py``, ``kernels_quant.py``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from . import matmuls
from .matmuls import Matmul


@dataclass
class QuantWeight:
    """A quantized weight [N, K] as bitsandbytes stores it (views of its tensors, nothing copied).
    int8: ``data`` [N, K] int8, ``scale`` [N] fp32 (row absmax / 127). nf4: ``data`` the packed bytes (two
    4-bit indices each, row-major), ``absmax`` per 64 weights (fp32, or uint8 when nested, then with
    ``absmax2`` / ``offset2`` per group of ``group`` blocks and ``code2``), ``code`` the 16-value table."""
    kind: str
    shape: tuple[int, int]
    data: torch.Tensor
    scale: torch.Tensor | None = None
    absmax: torch.Tensor | None = None
    absmax2: torch.Tensor | None = None
    offset2: torch.Tensor | None = None
    code: torch.Tensor | None = None
    code2: torch.Tensor | None = None
    group: int = 1
    words: torch.Tensor | None = None      # nf4: ``data`` viewed as int32 words (8 indices each)
    lut: str | None = None                 # nf4: the PTX that decodes a word with ``code`` in registers
    lut16: str | None = None               # nf4: the same with fp16 outputs
    pairs: torch.Tensor | None = None      # nf4: 256 fp16 pairs, one per packed byte (nf4_cuda.pair_table)

    def add_word_decoding(self) -> "QuantWeight":
        """Fill ``words``, ``lut`` and the CUDA GEMV's tables (nf4), for our word-decoding GEMVs; left None
        where ``data`` cannot be viewed as aligned int32 words. At set-up only: it reads the code table back
        to the host (never inside a CUDA-graph capture)."""
        from .nf4_cuda import pair_table
        from .nf4_lut import ptx
        if self.kind == "nf4" and self.data.numel() % 4 == 0 and self.data.storage_offset() % 4 == 0:
            self.words = self.data.view(torch.int32)
            code = self.code.detach().float().cpu().numpy()
            self.lut, self.lut16 = ptx(code), ptx(code, half=True)
            self.pairs = torch.from_numpy(pair_table(code).view(np.int32)).to(self.data.device)
        return self


def _kind(module) -> str | None:
    name = type(module).__name__
    return "int8" if name == "Linear8bitLt" else "nf4" if name in ("Linear4bit", "LinearNF4", "LinearFP4") else None


def _int8_parts(module) -> QuantWeight | None:
    """bitsandbytes' Linear8bitLt -> QuantWeight (cb int8 [out, in], scale = SCB / 127), or None."""
    weight = module.weight
    cb = getattr(module.state, "CB", None)
    scb = getattr(module.state, "SCB", None)
    if cb is None:
        cb, scb = getattr(weight, "CB", None), getattr(weight, "SCB", None)
    if cb is None and weight.dtype == torch.int8:
        cb = weight.data
    if cb is None or scb is None or cb.dtype != torch.int8:
        return None
    return QuantWeight("int8", tuple(cb.shape), cb, scale=(scb.float() / 127.0).contiguous())


def _nf4_parts(module) -> QuantWeight | None:
    """bitsandbytes' Linear4bit (NF4 or FP4, blocks of 64, plain or nested absmax) -> QuantWeight, or None when
    stored some other way (another block size, CPU packing, a storage dtype other than uint8)."""
    weight = module.weight
    qs = getattr(weight, "quant_state", None)
    if qs is None or getattr(qs, "packing_format_for_cpu", False) or weight.dtype != torch.uint8:
        return None
    if len(qs.shape) != 2 or qs.blocksize != 64 or qs.shape[1] % 64 or qs.code is None or qs.code.numel() != 16:
        return None
    n, k = int(qs.shape[0]), int(qs.shape[1])
    part = QuantWeight("nf4", (n, k), weight.data.view(-1), absmax=qs.absmax,
                       code=qs.code.to(weight.device, torch.float32).contiguous())
    if qs.nested:
        group = int(qs.state2.blocksize)
        groups = qs.state2.absmax.numel()
        part.absmax2 = qs.state2.absmax.float()
        part.offset2 = torch.full((groups,), float(qs.offset), dtype=torch.float32, device=weight.device)
        part.code2 = qs.state2.code.to(weight.device, torch.float32).contiguous()
        part.group = group
    elif qs.absmax.dtype != torch.float32:
        return None
    return part.add_word_decoding()


def _fuse_nf4(modules) -> QuantWeight | None:
    """One QuantWeight for several NF4 modules of the same input (q/k/v, gate/up): their bytes and scales
    concatenated, and each module's tensors made views of the concatenation (no memory is duplicated).
    None when the parts cannot be joined (different block layouts or nesting)."""
    parts = [_nf4_parts(m) for m in modules]
    if any(p is None for p in parts) or len({(p.shape[1], p.group, p.absmax2 is None) for p in parts}) != 1:
        return None
    group = math.gcd(parts[0].group, *(p.absmax.numel() for p in parts))   # every part starts on a group
    data = torch.cat([p.data for p in parts])
    absmax = torch.cat([p.absmax for p in parts])
    start_d = start_a = 0
    for m, p in zip(modules, parts):
        m.weight.data = data[start_d:start_d + p.data.numel()].view(-1, 1)
        m.weight.quant_state.absmax = absmax[start_a:start_a + p.absmax.numel()]
        start_d += p.data.numel()
        start_a += p.absmax.numel()
    first = parts[0]
    fused = QuantWeight("nf4", (sum(p.shape[0] for p in parts), first.shape[1]), data, absmax=absmax,
                        code=first.code, code2=first.code2, group=group).add_word_decoding()
    if first.absmax2 is not None:     # groups of ``group`` blocks: each scale repeated where groups got smaller
        def finer(t, p):
            return t.repeat_interleave(p.group // group)[:math.ceil(p.absmax.numel() / group)]
        fused.absmax2 = torch.cat([finer(p.absmax2, p) for p in parts])
        fused.offset2 = torch.cat([finer(p.offset2, p) for p in parts])
    return fused


def _fuse_int8(modules) -> QuantWeight | None:
    """One int8 QuantWeight for several Linear8bitLt modules of the same input (q/k/v, gate/up): their int8
    rows concatenated, each module's int8 tensor (``weight.data``, ``state.CB``, ``weight.CB``: what its own
    forward reads) made a view of the concatenation, so no memory is duplicated and the modules keep working.
    None when a part is not stored as int8 rows with scales."""
    parts = [_int8_parts(m) for m in modules]
    if any(p is None for p in parts) or len({p.shape[1] for p in parts}) != 1:
        return None
    data = torch.cat([p.data for p in parts])
    start = 0
    for m, p in zip(modules, parts):
        view = data[start:start + p.shape[0]]
        m.weight.data = view
        if getattr(m.state, "CB", None) is not None:
            m.state.CB = view
        if getattr(m.weight, "CB", None) is not None:
            m.weight.CB = view
        start += p.shape[0]
    return QuantWeight("int8", (start, parts[0].shape[1]), data, scale=torch.cat([p.scale for p in parts]))


class Projection:
    """One projection as the decode step calls it: a dense weight, quantized weights read by our kernels, or the
    module(s) themselves. ``config[rows]`` is the ``matmuls.Matmul`` warm-up timing chose for that row count
    (``tuning.py``); row counts never timed (prefill) run ``matmuls.default``."""

    def __init__(self, module=None, weight=None, bias=None, quant_kernels=False, modules=None, quant=None):
        self.modules = modules or ([module] if module is not None else [])
        self.weight = weight if weight is not None else getattr(module, "weight", None)
        self.bias = bias if bias is not None else getattr(module, "bias", None)
        self.quant = quant
        self.config: dict[int, Matmul] = {}
        kind = _kind(module) if module is not None else None
        if kind is not None:
            self.weight = None
            if quant_kernels:
                self.quant = _int8_parts(module) if kind == "int8" else _nf4_parts(module)
        if self.quant is not None:
            self.weight = None

    def chosen(self, rows: int) -> Matmul:
        return self.config.get(rows) or matmuls.default(self, rows)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None and (self.quant is None or x.dim() != 2):
            return self.modules_forward(x)
        rows = x.shape[0] if x.dim() == 2 else -1
        return self.run(x, self.chosen(rows))

    def modules_forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(x) for m in self.modules], dim=-1) if len(self.modules) > 1 else self.modules[0](x)

    def run(self, x: torch.Tensor, config: Matmul, up: torch.Tensor | None = None,
            activation: str = "silu") -> torch.Tensor:
        """x @ W.T + bias the way ``config`` says; with ``up``, of act(x) * up (fused where the config can)."""
        if up is not None and not (activation in config.fuses_gate and x.shape[0] == 1):
            from . import kernels as fk
            x, up = fk.act_mul(x, up, activation), None
        out = config.run(self, x, up, activation)
        return out + self.bias if self.bias is not None and not isinstance(config, matmuls.Module) else out

    def gated(self, g: torch.Tensor, u: torch.Tensor, activation: str = "silu") -> torch.Tensor | None:
        """down(act(g) * u) in one kernel when a GEMV fusing that activation serves this row count; else None."""
        config = self.chosen(g.shape[0])
        return self.run(g, config, u, activation) if g.shape[0] == 1 and activation in config.fuses_gate else None

    def capturable(self, rows: int) -> bool:
        """Can a CUDA graph hold this projection for ``rows`` rows? (bitsandbytes' outlier path synchronises.)"""
        if (self.weight is not None or self.quant is not None) and not isinstance(self.config.get(rows),
                                                                                  matmuls.Module):
            return True
        return all(float(getattr(getattr(m, "state", None), "threshold", 0.0) or 0.0) == 0.0 for m in self.modules)

    def shape_key(self) -> tuple:
        if self.quant is not None:
            return (self.quant.shape, self.quant.kind, self.quant.absmax2 is not None)
        return (tuple(self.weight.shape), self.weight.dtype) if self.weight is not None else ()


class Norm:
    """One RMSNorm: its HF module (eager ops) and what the Triton kernel reads (weight, eps, Gemma's style)."""

    def __init__(self, module, gemma: bool = False):
        self.module = module
        self.weight = module.weight
        self.eps = float(getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6)))
        self.gemma = gemma


class LayerWeights:
    """One decoder layer's weights as ``forward.decoder`` reads them (norms absent where the architecture has
    none); q/k/v and gate/up fused into one product each where the weights allow."""

    def __init__(self, layer, fuse: bool, quant_kernels: bool, spec=None):
        attn, mlp = layer.self_attn, layer.mlp
        arch = spec.arch if spec is not None else None
        gemma = bool(arch and arch.gemma_norm)
        self.attn_norm = Norm(layer.input_layernorm, gemma)
        sandwich = bool(arch and arch.sandwich_norms)
        self.attn_out_norm = Norm(layer.post_attention_layernorm, gemma) if sandwich else None
        self.mlp_norm = Norm(layer.pre_feedforward_layernorm if sandwich else layer.post_attention_layernorm, gemma)
        self.mlp_out_norm = Norm(layer.post_feedforward_layernorm, gemma) if sandwich else None
        has_qk = getattr(attn, "q_norm", None) is not None
        self.q_norm = Norm(attn.q_norm, gemma) if has_qk else None
        self.k_norm = Norm(attn.k_norm, gemma) if has_qk else None
        self.act_fn = mlp.act_fn
        self.activation = spec.activation if spec is not None else "silu"
        qkv, gate_up = [attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj]
        self.qkv = self.gate_up = None
        if fuse and all(type(p) is torch.nn.Linear for p in qkv + gate_up):
            self.qkv = Projection(weight=_fuse_weights(qkv), bias=_fuse_biases(qkv))
            self.gate_up = Projection(weight=_fuse_weights(gate_up), bias=_fuse_biases(gate_up))
        elif fuse and quant_kernels and len({_kind(p) for p in qkv + gate_up}) == 1 and \
                _kind(qkv[0]) in ("nf4", "int8") and all(p.bias is None for p in qkv + gate_up):
            join = _fuse_nf4 if _kind(qkv[0]) == "nf4" else _fuse_int8
            fused_qkv, fused_gu = join(qkv), join(gate_up)
            if fused_qkv is not None and fused_gu is not None:
                self.qkv = Projection(modules=qkv, quant=fused_qkv)
                self.gate_up = Projection(modules=gate_up, quant=fused_gu)
        if self.qkv is None:
            self.q, self.k, self.v = (Projection(p, quant_kernels=quant_kernels) for p in qkv)
            self.gate, self.up = (Projection(p, quant_kernels=quant_kernels) for p in gate_up)
        else:
            self.q = self.k = self.v = self.gate = self.up = None
        self.q_rows = attn.q_proj.out_features if hasattr(attn.q_proj, "out_features") else None
        self.kv_rows = attn.k_proj.out_features if hasattr(attn.k_proj, "out_features") else None
        self.o = Projection(attn.o_proj, quant_kernels=quant_kernels)
        self.down = Projection(mlp.down_proj, quant_kernels=quant_kernels)

    def project_qkv(self, h: torch.Tensor):
        if self.qkv is None:
            return self.q(h), self.k(h), self.v(h)
        qkv = self.qkv(h)
        qd, kd = self.q_rows, self.kv_rows
        return qkv[..., :qd], qkv[..., qd:qd + kd], qkv[..., qd + kd:]

    def project_gate_up(self, h: torch.Tensor):
        if self.gate_up is None:
            return self.gate(h), self.up(h)
        gu = self.gate_up(h)
        half = gu.shape[-1] // 2
        return gu[..., :half], gu[..., half:]

    def projections(self) -> list:
        return [p for p in (self.qkv, self.q, self.k, self.v, self.o, self.gate_up, self.gate, self.up, self.down)
                if p is not None]


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
