"""The fast path: Llama-family decoding with a paged KV cache, batched prefill and CUDA graphs.

Why it exists: on the GPU machines measured here one eager decode step of a 7B model took 67 ms
(kernel launches from a slow host), so speed comes from launching a whole decode step as one CUDA
graph, from few fused kernels per layer (``fastkernels.py``), and from batching every running
request into that one step. On a CPU it is a lean loop over the same modules, without
``generate``'s per-step machinery.

    runner = FastModel(hf_model, max_context=4096, options=FastOptions())   # weights are shared
    sched = FastScheduler(runner)            # one thread owns all model work (CUDA graphs need that)
    sched.start(progress); sched.wait_ready()   # allocate + capture graphs now, not in a first request
    sched.submit(Job(...))                   # tokens arrive through job.emit(tokens, finished, error)

Supported: model types whose decoder layer is pre-norm RMSNorm -> q/k/v/o attention with rotary
embedding -> RMSNorm -> gated MLP (llama, mistral without sliding window, qwen2). ``unsupported_reason``
says why another model is not; the engine then falls back to transformers' continuous batching.
Projections may be plain ``nn.Linear`` or bitsandbytes ``Linear8bitLt`` (8-bit).

Memory: KV blocks come from one pool per layer; a request reserves the blocks for its prompt plus
its token budget when it is admitted (no mid-reply eviction); finished requests leave their
blocks as a prefix cache that the next turn of the same conversation takes over.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger("vicuna_demo.fastpath")

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_STATIC_ROPE = ("default", "linear", "llama3", "yarn", "longrope")


@dataclass(frozen=True)
class FastOptions:
    max_rows: int | None = None            # requests decoded together (None: 64 on CUDA, 8 on CPU)
    block_size: int | None = None          # tokens per KV block (None: 64 on CUDA, a whole context on CPU)
    kv_memory_fraction: float = 0.8        # of the GPU memory still free after the reserve
    kv_blocks: int | None = None           # force the pool size (tests, benchmarks)
    prefill_tokens: int = 4096             # most prompt tokens prefilled in one forward pass
    burst_prefill_s: float = 0.3           # prefill waiting requests back to back for up to this long
    cpu_threads: int | None = None         # CPU: intra-op threads of the scheduler thread only (None: torch's)
    cuda_graphs: bool = True               # capture decode steps as CUDA graphs (CUDA only)
    kernels: bool = True                   # Triton kernels for the decode step (CUDA only)
    int8_kernel: bool = True               # weight-only GEMV over bitsandbytes int8 weights when decoding
    prefix_cache: bool = True              # reuse a finished reply's KV for the next turn
    fuse_projections: bool | None = None   # concatenate q/k/v and gate/up weights (dense weights; None: yes)
    tune_dense: bool = True                # also time our GEMV against cuBLAS for 16-bit weights
    pipeline: bool | None = None           # launch step t+1 before reading step t's tokens (None: on CUDA)


def unsupported_reason(model) -> str | None:
    """None if the fast path can run this model, else a short reason."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) and \
            config.sliding_window < getattr(config, "max_position_embeddings", 0):
        return "sliding-window attention"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in _STATIC_ROPE:
        return f"rope type {rope_type!r}"
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not hasattr(inner, "embed_tokens") or not hasattr(model, "lm_head"):
        return "unexpected module layout"
    layer = layers[0]
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    for owner, names in ((attn, ("q_proj", "k_proj", "v_proj", "o_proj")), (mlp, ("gate_proj", "up_proj", "down_proj")),
                         (layer, ("input_layernorm", "post_attention_layernorm"))):
        if owner is None or not all(hasattr(owner, n) for n in names):
            return "unexpected module layout"
    if getattr(attn, "q_norm", None) is not None or getattr(attn, "k_norm", None) is not None:
        return "q/k norms"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    if getattr(model, "hf_device_map", None) and len(set(model.hf_device_map.values())) > 1:
        return "model spread over several devices"
    return None


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
            from . import fastkernels
            out = fastkernels.gemv(x, self.weight, None, *config)
            return out + self.bias if self.bias is not None else out
        if self.int8 is not None and x.dim() == 2:
            from . import fastkernels
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
        from . import fastkernels
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


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _pow2_buckets(limit: int) -> list[int]:
    buckets, b = [], 1
    while b < limit:
        buckets.append(b)
        b = b * 2 if b < 16 else b + 16
    buckets.append(limit)
    return sorted(set(buckets))


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, greedy: torch.Tensor,
           mode: str) -> torch.Tensor:
    """Per-row sampling, safe inside a CUDA graph. logits [B, V] fp32; temperature/top_p [B] fp32 (1.0 for
    greedy rows); greedy [B] bool. mode: "greedy" (every row greedy), "sample" (no top_p below 1), "top_p"."""
    best = logits.argmax(dim=-1)
    if mode == "greedy":
        return best
    probs = torch.softmax(logits / temperature[:, None], dim=-1)
    if mode == "top_p":
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(before > top_p[:, None], 0.0)
        noise = torch.empty_like(sorted_probs).exponential_()
        choice = (sorted_probs / noise).argmax(dim=-1, keepdim=True)
        drawn = order.gather(-1, choice)[:, 0]
    else:
        noise = torch.empty_like(probs).exponential_()
        drawn = (probs / noise).argmax(dim=-1)
    return torch.where(greedy, best, drawn)


def sampling_mode(rows) -> str:
    if all(r.greedy for r in rows):
        return "greedy"
    return "top_p" if any((not r.greedy) and r.top_p < 1.0 for r in rows) else "sample"


class FastModel:
    """The model's math over its own weights, with a paged KV cache. Single-threaded: the scheduler's thread
    is the only caller once warm-up starts."""

    def __init__(self, model, max_context: int, options: FastOptions | None = None):
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(f"fast path unsupported: {reason}")
        self.options = options = options or FastOptions()
        self.model = model
        self.config = model.config.get_text_config()
        self.device = model.model.embed_tokens.weight.device
        self.cuda = self.device.type == "cuda"
        self.dtype = model.model.embed_tokens.weight.dtype
        attn0 = model.model.layers[0].self_attn
        self.n_heads = int(self.config.num_attention_heads)
        self.n_kv = int(getattr(self.config, "num_key_value_heads", None) or self.n_heads)
        self.head_dim = int(getattr(attn0, "head_dim", None) or self.config.hidden_size // self.n_heads)
        self.scale = float(getattr(attn0, "scaling", self.head_dim ** -0.5))
        self.max_len = int(max_context) + 2          # + the extra step a pipelined reply may take
        self.use_kernels = bool(self.cuda and options.kernels and _triton_ok())
        self.use_graphs = bool(self.cuda and options.cuda_graphs and self.use_kernels)
        self.max_rows = int(options.max_rows or (64 if self.cuda else 8))
        self.block = int(options.block_size or (64 if self.cuda else _round_up(self.max_len, 16)))
        self.blocks_per_row = math.ceil(self.max_len / self.block)
        fuse = True if options.fuse_projections is None else bool(options.fuse_projections)
        self.pipelined = self.cuda if options.pipeline is None else bool(options.pipeline)
        self.layers = [_Layer(layer, fuse=fuse, int8_kernel=self.use_kernels and options.int8_kernel)
                       for layer in model.model.layers[: self.config.num_hidden_layers]]
        self.embed = model.model.embed_tokens
        self.n_embeddings = int(self.embed.weight.shape[0])
        self.norm = model.model.norm
        self.norm_eps = float(getattr(self.norm, "variance_epsilon", getattr(self.norm, "eps", 1e-6)))
        self.lm_head = _Linear(model.lm_head)
        self.vocab = int(model.lm_head.weight.shape[0]) if getattr(model.lm_head, "weight", None) is not None \
            else int(self.config.vocab_size)
        with torch.inference_mode():
            positions = torch.arange(self.max_len, device=self.device)[None]
            probe = torch.zeros(1, dtype=self.dtype, device=self.device)
            cos, sin = model.model.rotary_emb(probe, positions)
            self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()   # [max_len, head_dim]
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []
        self.n_blocks = 0
        # decode-step buffers (rows beyond the active ones are idle: length 0, writing to trash block 0)
        rows = self.max_rows
        dev = self.device
        self.tokens = torch.zeros(rows, dtype=torch.long, device=dev)
        self.pos = torch.zeros(rows, dtype=torch.long, device=dev)
        self.active = torch.zeros(rows, dtype=torch.long, device=dev)
        self.table = torch.zeros(rows, self.blocks_per_row, dtype=torch.int32, device=dev)
        self.temperature = torch.ones(rows, dtype=torch.float32, device=dev)
        self.top_p = torch.ones(rows, dtype=torch.float32, device=dev)
        self.greedy = torch.ones(rows, dtype=torch.bool, device=dev)
        self.next_tokens = torch.zeros(rows, dtype=torch.long, device=dev)
        self.buckets = _pow2_buckets(rows)
        # All of this model's GPU work (eager prefill, graph capture and replay) runs on one stream of its own.
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.graphs: dict[tuple[int, str], torch.cuda.CUDAGraph] = {}
        self._graph_pool = None
        self._splits: dict[int, int] = {}

    # -- memory ----------------------------------------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        element = torch.finfo(self.dtype).bits // 8
        return 2 * len(self.layers) * self.n_kv * self.block * self.head_dim * element

    def allocate_cache(self, n_blocks: int | None = None) -> int:
        """Allocate the KV pool; on CUDA sized from free memory unless given. Returns the number of blocks."""
        per_block = self.kv_bytes_per_block()
        if n_blocks is None:
            n_blocks = self.options.kv_blocks
        if n_blocks is None:
            if self.cuda:
                torch.cuda.empty_cache()
                free, _ = torch.cuda.mem_get_info(self.device)
                reserve = 6 * 2**30 + 2 * self._prefill_reserve_bytes()
                budget = max(0, int((free - reserve) * self.options.kv_memory_fraction))
                n_blocks = budget // per_block
                wanted = self.max_rows * self.blocks_per_row + 1      # every row at full context
                n_blocks = min(n_blocks, wanted)
            else:
                n_blocks = 2 * self.max_rows + 1
        n_blocks = int(max(n_blocks, self.blocks_per_row + 1))
        shape = (n_blocks, self.n_kv, self.block, self.head_dim)
        alloc = torch.zeros if self.cuda else torch.empty   # CPU: pages are touched only when used
        self.k_cache = [alloc(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.v_cache = [alloc(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.n_blocks = n_blocks
        return n_blocks

    def _prefill_reserve_bytes(self) -> int:
        hidden = int(self.config.hidden_size)
        inter = int(getattr(self.config, "intermediate_size", 4 * hidden))
        element = torch.finfo(self.dtype).bits // 8
        per_token = (6 * hidden + 3 * inter) * element
        return self.options.prefill_tokens * per_token + 64 * self.max_rows * self.vocab * 4 * 3

    # -- prefill -----------------------------------------------------------------------------------
    def prefill(self, rows: list[tuple[list[int], list[int], int]]) -> torch.Tensor:
        """rows: (all token ids, KV block list, start) per request; tokens [start:] are computed and their K/V
        stored; tokens before ``start`` must already be in the request's blocks. -> last-token logits [n, vocab] fp32."""
        n = len(rows)
        news = [ids[start:] for ids, _, start in rows]
        length = max(len(t) for t in news)
        dev = self.device
        ids = torch.zeros(n, length, dtype=torch.long)
        positions = torch.zeros(n, length, dtype=torch.long)
        lens = torch.tensor([len(t) for t in news])
        starts = torch.tensor([start for _, _, start in rows])
        write_rows, write_t, write_phys, write_off = [], [], [], []
        for i, (new, (_, blocks, start)) in enumerate(zip(news, rows)):
            ids[i, :len(new)] = torch.tensor(new)
            positions[i] = torch.clamp(torch.arange(length) + start, max=self.max_len - 1)
            p = torch.arange(start, start + len(new))
            write_rows.append(torch.full((len(new),), i))
            write_t.append(torch.arange(len(new)))
            block_ids = torch.tensor(blocks, dtype=torch.long)
            write_phys.append(block_ids[p // self.block])
            write_off.append(p % self.block)
        w_rows, w_t = torch.cat(write_rows).to(dev), torch.cat(write_t).to(dev)
        w_phys, w_off = torch.cat(write_phys).to(dev), torch.cat(write_off).to(dev)
        if self.use_kernels:   # every (row, t) slot, padding included: padding writes go to trash block 0
            tok_phys = torch.zeros(n, length, dtype=torch.long)
            tok_phys[torch.cat(write_rows), torch.cat(write_t)] = torch.cat(write_phys)
            tok_off = positions % self.block
            tok_phys, tok_off = tok_phys.view(-1).to(dev), tok_off.view(-1).to(dev)
        ids, positions = ids.to(dev), positions.to(dev)
        with_prefix = bool((starts > 0).any())
        lower_right = None
        if with_prefix and n == 1:
            from torch.nn.attention.bias import causal_lower_right
            kv_len = int(starts[0] + lens[0])
            lower_right = causal_lower_right(length, kv_len)
        if with_prefix:
            totals = starts + lens
            kv_len = int(totals.max())
            n_blk = math.ceil(kv_len / self.block)
            gather = torch.zeros(n, n_blk, dtype=torch.long)
            for i, (_, blocks, _) in enumerate(rows):
                used = blocks[:n_blk]
                gather[i, :len(used)] = torch.tensor(used, dtype=torch.long)
            gather = gather.to(dev)
            mask = None
            if lower_right is None:   # several rows with cached prefixes (the scheduler sends them one by one)
                q_pos = positions[:, :, None]                                   # [n, T, 1]
                k_pos = torch.arange(kv_len, device=dev)[None, None, :]        # [1, 1, S]
                mask = (k_pos <= q_pos)[:, None]                               # [n, 1, T, S]
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]     # [n, 1, T, D]
        hd = self.head_dim
        qd, kd = self.n_heads * hd, self.n_kv * hd
        fused = self.use_kernels     # CUDA: fused projections and Triton norm / activation kernels
        if fused:
            from . import fastkernels as fk
        x = self.embed(ids)
        residual = None
        for li, layer in enumerate(self.layers):
            attn = layer.attn
            if fused:
                flat, residual = fk.add_rmsnorm(x.reshape(n * length, -1), residual, layer.ln1.weight, layer.eps1)
                if layer.qkv is not None:
                    qkv = layer.qkv(flat)
                    q, k, v = qkv[:, :qd], qkv[:, qd:qd + kd], qkv[:, qd + kd:]
                else:
                    q, k, v = attn.q_proj(flat), attn.k_proj(flat), attn.v_proj(flat)
                q, k_rot = fk.rope_store(q, k, v, self.cos, self.sin, positions.view(-1), tok_phys, tok_off,
                                         self.k_cache[li], self.v_cache[li], self.n_heads, self.n_kv,
                                         return_k=True)
                q = q.view(n, length, -1, hd).transpose(1, 2)
                k = k_rot.view(n, length, -1, hd).transpose(1, 2)
                v = v.reshape(n, length, -1, hd).transpose(1, 2)
            else:
                residual = x
                h = layer.ln1(x)
                q = attn.q_proj(h).view(n, length, -1, hd).transpose(1, 2)
                k = attn.k_proj(h).view(n, length, -1, hd).transpose(1, 2)
                v = attn.v_proj(h).view(n, length, -1, hd).transpose(1, 2)
            kc, vc = self.k_cache[li], self.v_cache[li]
            if not fused:
                q = q * cos + _rotate_half(q) * sin
                k = k * cos + _rotate_half(k) * sin
                kc[w_phys, :, w_off] = k.transpose(1, 2)[w_rows, w_t]
                vc[w_phys, :, w_off] = v.transpose(1, 2)[w_rows, w_t]
            if with_prefix:
                keys = kc[gather].permute(0, 2, 1, 3, 4).reshape(n, self.n_kv, -1, hd)[:, :, :kv_len]
                values = vc[gather].permute(0, 2, 1, 3, 4).reshape(n, self.n_kv, -1, hd)[:, :, :kv_len]
                if self.n_kv != self.n_heads:
                    group = self.n_heads // self.n_kv
                    keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
                out = F.scaled_dot_product_attention(q, keys, values, scale=self.scale,
                                                     attn_mask=lower_right if lower_right is not None else mask)
            else:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=length > 1, scale=self.scale,
                                                     enable_gqa=self.n_kv != self.n_heads)
            out = out.transpose(1, 2).reshape(n, length, -1)
            if fused:
                x = attn.o_proj(out.reshape(n * length, -1))
                flat, residual = fk.add_rmsnorm(x, residual, layer.ln2.weight, layer.eps2)
                if layer.gate_up is not None:
                    gu = layer.gate_up(flat)
                    half = gu.shape[1] // 2
                    g, u = gu[:, :half], gu[:, half:]
                else:
                    g, u = layer.mlp.gate_proj(flat), layer.mlp.up_proj(flat)
                x = layer.mlp.down_proj(fk.silu_mul(g, u)).view(n, length, -1)
            else:
                x = residual + attn.o_proj(out)
                residual = x
                x = residual + layer.mlp(layer.ln2(x))
        if fused:
            x = (x.reshape(n * length, -1) + residual).view(n, length, -1)
        last = x[torch.arange(n, device=dev), (lens - 1).to(dev)]
        return self.lm_head(self.norm(last)).float()

    # -- decode --------------------------------------------------------------------------------------
    def _decode_torch(self, rows: int) -> torch.Tensor:
        """One decode step with eager ops (CPU, or CUDA without Triton). -> logits [rows, vocab].

        The same ops as the model's own forward, so a CPU reply equals ``generate`` exactly; on a CPU each
        sequence's cache is one block, read through views (an indexing copy per layer cost more than the
        layer's matmuls on a busy 2-core machine)."""
        tokens, pos, table = self.tokens[:rows], self.pos[:rows], self.table[:rows]
        active = self.active[:rows].bool()
        hd = self.head_dim
        cos, sin = self.cos[pos][:, None, None], self.sin[pos][:, None, None]     # [B, 1, 1, D]
        lengths = (pos + 1) * active
        kv_len = max(1, int(lengths.max()))          # eager path: reading it on the host costs nothing here
        n_blk = math.ceil(kv_len / self.block)
        mask = None
        if rows > 1 or not bool(active.all()):
            mask = (torch.arange(kv_len, device=self.device)[None, :] < lengths[:, None])[:, None, None, :]
        if n_blk == 1:   # host-side block ids and offsets: views and plain copies instead of index kernels
            blocks = table[:, 0].tolist()
            offsets = (pos % self.block).tolist()
        else:
            phys = table.gather(1, (pos // self.block)[:, None].to(table.dtype))[:, 0].long()
            off = pos % self.block
            gather = table[:, :n_blk].long()
        qd, kd = self.n_heads * hd, self.n_kv * hd
        x = self.embed(tokens[:, None])
        for li, layer in enumerate(self.layers):
            residual = x
            h = layer.ln1(x)
            attn = layer.attn
            if layer.qkv is not None:
                qkv = layer.qkv(h)
                q, k, v = qkv[..., :qd], qkv[..., qd:qd + kd], qkv[..., qd + kd:]
            else:
                q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
            q = q.reshape(rows, 1, -1, hd).transpose(1, 2)
            k = k.reshape(rows, 1, -1, hd).transpose(1, 2)
            v = v.reshape(rows, 1, -1, hd).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            kc, vc = self.k_cache[li], self.v_cache[li]
            if n_blk == 1:
                for r in range(rows):
                    kc[blocks[r], :, offsets[r]] = k[r, :, 0]
                    vc[blocks[r], :, offsets[r]] = v[r, :, 0]
                if rows == 1:
                    keys, values = kc[blocks[0], :, :kv_len][None], vc[blocks[0], :, :kv_len][None]
                else:
                    keys = torch.stack([kc[b_, :, :kv_len] for b_ in blocks])
                    values = torch.stack([vc[b_, :, :kv_len] for b_ in blocks])
            else:
                kc[phys, :, off] = k[:, :, 0]
                vc[phys, :, off] = v[:, :, 0]
                keys = kc[gather].permute(0, 2, 1, 3, 4).reshape(rows, self.n_kv, -1, hd)[:, :, :kv_len]
                values = vc[gather].permute(0, 2, 1, 3, 4).reshape(rows, self.n_kv, -1, hd)[:, :, :kv_len]
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale,
                                                 enable_gqa=self.n_kv != self.n_heads)
            x = residual + attn.o_proj(out.transpose(1, 2).reshape(rows, 1, -1))
            residual = x
            h = layer.ln2(x)
            if layer.gate_up is not None:
                gu = layer.gate_up(h)
                half = gu.shape[-1] // 2
                x = residual + layer.mlp.down_proj(layer.mlp.act_fn(gu[..., :half]) * gu[..., half:])
            else:
                x = residual + layer.mlp(h)
        return self.lm_head(self.norm(x[:, 0])).float()

    def _decode_kernels(self, rows: int) -> torch.Tensor:
        """One decode step with the fused Triton kernels; shapes depend only on ``rows`` (graph-safe)."""
        from . import fastkernels as fk
        tokens, pos, table = self.tokens[:rows], self.pos[:rows], self.table[:rows]
        active = self.active[:rows]
        seq_lens = ((pos + 1) * active).to(torch.int32)
        phys = table.gather(1, (pos // self.block)[:, None].to(torch.int64).clamp(max=self.blocks_per_row - 1)
                            .to(torch.int64))[:, 0]
        off = pos % self.block
        splits, warps, stages = self._splits.get(rows) or self._choose_splits(rows)
        qd, kd = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        x = self.embed(tokens)                       # [B, H]
        residual = None
        for li, layer in enumerate(self.layers):
            h, residual = fk.add_rmsnorm(x, residual, layer.ln1.weight, layer.eps1)
            if layer.qkv is not None:
                qkv = layer.qkv(h)
                q, k, v = qkv[:, :qd], qkv[:, qd:qd + kd], qkv[:, qd + kd:]
            else:
                q, k, v = layer.q(h), layer.k(h), layer.v(h)
            q = fk.rope_store(q, k, v, self.cos, self.sin, pos, phys, off, self.k_cache[li], self.v_cache[li],
                              self.n_heads, self.n_kv)
            a = fk.paged_attention(q, self.k_cache[li], self.v_cache[li], table, seq_lens, splits, self.scale,
                                   warps, stages)
            x = layer.o(a)
            h, residual = fk.add_rmsnorm(x, residual, layer.ln2.weight, layer.eps2)
            if layer.gate_up is not None:
                gu = layer.gate_up(h)
                half = gu.shape[1] // 2
                g, u = gu[:, :half], gu[:, half:]
            else:
                g, u = layer.gate(h), layer.up(h)
            x = layer.down.gated(g, u)
            if x is None:
                x = layer.down(fk.silu_mul(g, u))
        h, _ = fk.add_rmsnorm(x, residual, self.norm.weight, self.norm_eps)
        return self.lm_head(h).float()

    def linears(self) -> list[_Linear]:
        out = []
        for layer in self.layers:
            out += [p for p in (layer.qkv, layer.q, layer.k, layer.v, layer.o, layer.gate_up, layer.gate, layer.up,
                                layer.down) if p is not None]
        return out + [self.lm_head]

    def capturable(self, rows: int) -> bool:
        return all(p.capturable(rows) for p in self.linears())

    def tune_gemv(self, progress: Callable[[str], None] = lambda m: None) -> dict:
        """For each projection shape and small row count, time cuBLAS against our GEMV configurations on this
        GPU and keep the fastest (int8 weights: the fastest GEMV configuration). Runs once at warm-up."""
        from . import fastkernels as fk
        if not (self.cuda and self.use_kernels):
            return {}
        groups: dict[tuple, list[_Linear]] = {}
        for p in self.linears():
            # 16-bit weights: cuBLAS against our GEMV (on an H200 ours won at 1 row for 4 of 5 Vicuna shapes,
            # cuBLAS at 8 rows); int8 weights: our GEMV configurations against dequantize + cuBLAS.
            if (p.weight is not None and self.options.tune_dense) or p.int8 is not None:
                groups.setdefault(p.shape_key(), []).append(p)
        small = [b for b in self.buckets if b <= fk.W8_MAX_ROWS]
        chosen = {}
        for key, members in groups.items():
            sample_set = members[:8]          # several layers' weights: more than the L2 cache holds
            k_dim = key[0][1]
            for rows in small:
                x = torch.randn(rows, k_dim, device=self.device, dtype=self.dtype)
                int8 = members[0].weight is None
                configs = [(8, 256, 4), (16, 128, 4), (16, 256, 8), (32, 128, 8), (8, 512, 8), (4, 512, 4)] \
                    if rows == 1 else [(4, 1024, 4), (8, 512, 4), (16, 256, 4), (8, 1024, 8)] if rows == 2 else \
                    [(4, 256, 4), (8, 256, 4), (4, 512, 8), (8, 128, 4)]
                candidates: list = ["dequant"] if int8 else [None]
                if rows <= 2 or not int8:
                    candidates += configs
                timings = []
                for config in candidates:
                    def run():
                        for p in sample_set:
                            if config is None:
                                F.linear(x, p.weight)
                            elif config == "dequant":
                                fk.dequant_linear(x, p.int8[0], p.int8[1])
                            elif int8:
                                fk.gemv(x, p.int8[0], p.int8[1], *config)
                            else:
                                fk.gemv(x, p.weight, None, *config)
                    try:
                        timings.append((_time_ms(run), config))
                    except Exception as exc:  # noqa: BLE001 - a configuration this GPU cannot run
                        log.debug("GEMV config %s failed: %s", config, exc)
                best_ms, best = min(timings, key=lambda t: t[0])
                cublas_ms = next((t for t, c in timings if c is None), None)
                for p in members:
                    if best is None:
                        p.gemv_config.pop(rows, None)
                    else:
                        p.gemv_config[rows] = best
                chosen[(key[0], str(key[1]), rows)] = (best, round(best_ms / len(sample_set) * 1000, 1),
                                                       round(cublas_ms / len(sample_set) * 1000, 1) if cublas_ms else None)
        progress(f"tuned GEMV for {len(groups)} weight shapes")
        return chosen

    def warm_prefill(self) -> None:
        """Run prefill once at typical sizes (and with a cached prefix) so that the kernels it needs are loaded
        now: CUDA loads kernels lazily, and the first 512-token prefill otherwise took ~0.7 s more."""
        if not self.cuda:
            return
        shapes = [(1, 16), (1, 200), (1, 512), (2, 512), (4, 512), (8, 512), (1, 1500), (1, 3000)]
        for n, length in shapes:
            if n * length > max(self.options.prefill_tokens, 512) or length + 1 >= self.max_len:
                continue
            blocks = [0] * math.ceil(length / self.block)      # block 0 is the trash block
            logits = self.prefill([([1] * length, blocks, 0)] * n)
            for mode in ("greedy", "sample", "top_p"):
                ones = torch.ones(n, device=self.device)
                sample(logits, ones, ones * 0.9, torch.zeros(n, dtype=torch.bool, device=self.device), mode)
        length = min(600, self.max_len - 2)
        self.prefill([([1] * length, [0] * math.ceil(length / self.block), length - 64)])
        torch.cuda.synchronize(self.device)

    def _choose_splits(self, rows: int) -> tuple[int, int, int]:
        sms = torch.cuda.get_device_properties(self.device).multi_processor_count if self.cuda else 1
        splits = max(1, min(16, math.ceil(2 * sms / max(1, rows * self.n_heads))))
        self._splits[rows] = (splits, 4, 3)
        return self._splits[rows]

    def tune_attention(self, context: int = 1024, progress: Callable[[str], None] = lambda m: None) -> dict:
        """Per batch bucket, time the paged-attention kernel over ``context`` cached tokens per row with several
        (splits, warps, stages) and keep the fastest for the graphs. Runs once at warm-up, before capture."""
        from . import fastkernels as fk
        if not (self.cuda and self.use_kernels):
            return {}
        per_row = math.ceil((context + 1) / self.block)
        rows_max = min(self.max_rows, (self.n_blocks - 1) // per_row)
        if rows_max < 1:
            return {}
        table = torch.zeros(self.max_rows, self.blocks_per_row, dtype=torch.int32, device=self.device)
        blocks = torch.arange(1, 1 + rows_max * per_row, dtype=torch.int32, device=self.device).view(rows_max, per_row)
        table[:rows_max, :per_row] = blocks
        for layer in range(min(4, len(self.k_cache))):    # zeros would compress in memory and time too fast
            self.k_cache[layer][1:1 + rows_max * per_row].normal_()
            self.v_cache[layer][1:1 + rows_max * per_row].normal_()
        lens = torch.zeros(self.max_rows, dtype=torch.int32, device=self.device)
        lens[:rows_max] = context
        chosen = {}
        for rows in self.buckets:
            q = torch.randn(rows, self.n_heads, self.head_dim, device=self.device, dtype=self.dtype)
            best = None
            for splits in (1, 2, 4, 8, 16):
                if rows * self.n_heads * splits > 32768:
                    continue
                for warps, stages in ((4, 2), (4, 3), (8, 3), (4, 4)):
                    def run():
                        for layer in range(min(4, len(self.k_cache))):
                            fk.paged_attention(q, self.k_cache[layer], self.v_cache[layer], table[:rows], lens[:rows],
                                               splits, self.scale, warps, stages)
                    try:
                        ms = _time_ms(run)
                    except Exception as exc:  # noqa: BLE001 - a configuration this GPU cannot run
                        log.debug("attention config %s failed: %s", (splits, warps, stages), exc)
                        continue
                    if best is None or ms < best[0]:
                        best = (ms, (splits, warps, stages))
            if best is not None:
                self._splits[rows] = best[1]
                chosen[rows] = (best[1], round(best[0] / 4 * 1000, 1))
        progress(f"tuned attention for {len(chosen)} batch sizes")
        return chosen

    def _step(self, rows: int, mode: str) -> torch.Tensor:
        logits = self._decode_kernels(rows) if self.use_kernels else self._decode_torch(rows)
        nxt = sample(logits, self.temperature[:rows], self.top_p[:rows], self.greedy[:rows], mode)
        self.next_tokens[:rows].copy_(nxt)
        self.tokens[:rows].copy_(nxt)
        self.pos[:rows] += self.active[:rows]
        return self.next_tokens[:rows]

    def bucket(self, n_active: int) -> int:
        for b in self.buckets:
            if b >= n_active:
                return b
        return self.buckets[-1]

    def decode(self, n_active: int, mode: str) -> tuple[int, torch.Tensor]:
        """Launch one decode step for rows [0, n_active). -> (rows computed, next-token tensor on the device)."""
        if not self.use_kernels:
            return n_active, self._step(n_active, mode)
        rows = self.bucket(n_active)
        graph = self.graphs.get((rows, mode))
        if graph is None:
            return rows, self._step(rows, mode)
        graph.replay()
        return rows, self.next_tokens[:rows]

    def capture(self, progress: Callable[[str], None] = lambda m: None) -> None:
        """Capture one CUDA graph per (batch bucket, sampling mode). Runs on the scheduler's thread."""
        if not self.use_graphs:
            return
        self.active.zero_()
        self.table.zero_()
        self.pos.zero_()
        modes = ("greedy", "sample", "top_p")
        for rows in self.buckets:          # compile the Triton kernels and warm cuBLAS outside capture
            for mode in modes:
                self._step(rows, mode)
        torch.cuda.synchronize(self.device)
        self._graph_pool = torch.cuda.graph_pool_handle()
        done = 0
        try:
            for rows in reversed(self.buckets):   # largest first: later graphs reuse its pool memory
                if not self.capturable(rows):
                    continue                      # decoded eagerly (e.g. bitsandbytes' outlier matmul)
                for mode in modes:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=self._graph_pool, stream=self.stream):
                        self._step(rows, mode)
                    self.graphs[(rows, mode)] = graph
                    done += 1
                progress(f"captured CUDA graphs for up to {rows} requests ({done}/{len(self.buckets) * len(modes)})")
        except Exception as exc:  # noqa: BLE001 - e.g. a layer that synchronises: run the steps eagerly
            log.warning("CUDA-graph capture failed (%s: %s); decoding without graphs",
                        type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
            self.graphs.clear()
            self.use_graphs = False
            progress("CUDA graphs unavailable for this model; decoding without them")
        torch.cuda.synchronize(self.device)
        self.pos.zero_()

    def release(self) -> None:
        """Drop the graphs and the KV cache (the model's weights stay with the caller)."""
        self.graphs.clear()
        self.k_cache, self.v_cache = [], []
        self._graph_pool = None

    def load_rows(self, rows: list["_Slot"]) -> None:
        """Write the host-side state of rows [0, len(rows)) to the device buffers; clear the rest."""
        n = len(rows)
        size = self.max_rows
        tokens = torch.zeros(size, dtype=torch.long)
        pos = torch.zeros(size, dtype=torch.long)
        active = torch.zeros(size, dtype=torch.long)
        table = torch.zeros(size, self.blocks_per_row, dtype=torch.int32)
        temperature = torch.ones(size)
        top_p = torch.ones(size)
        greedy = torch.ones(size, dtype=torch.bool)
        for i, slot in enumerate(rows):
            tokens[i], pos[i], active[i] = slot.last_token, slot.n_written, 1
            table[i, :len(slot.blocks)] = torch.tensor(slot.blocks, dtype=torch.int32)
            temperature[i] = 1.0 if slot.greedy else max(slot.temperature, 1e-5)
            top_p[i] = slot.top_p
            greedy[i] = slot.greedy
        del n
        for dst, src in ((self.tokens, tokens), (self.pos, pos), (self.active, active), (self.table, table),
                         (self.temperature, temperature), (self.top_p, top_p), (self.greedy, greedy)):
            dst.copy_(src)


def _time_ms(fn, reps: int = 10) -> float:
    """GPU time of ``fn`` replayed as a CUDA graph: what it costs inside a captured decode step, without the
    host's launch overhead (which on a slow host would otherwise decide the comparison)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    del graph
    return start.elapsed_time(end) / reps


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def _triton_ok() -> bool:
    try:
        from . import fastkernels  # noqa: F401
        return True
    except Exception as exc:  # noqa: BLE001 - no Triton, or an incompatible one: use eager ops
        log.warning("Triton kernels unavailable (%s); the fast path runs eager ops", exc)
        return False


# ---------------------------------------------------------------------------------------------------
# Scheduling: one thread runs prefill and decode steps for every request of one model.
# ---------------------------------------------------------------------------------------------------
@dataclass
class Job:
    """One request. ``emit(tokens, finished, error)`` is called on the scheduler thread."""

    request_id: str
    ids: list[int]
    max_new: int
    temperature: float
    top_p: float
    eos: frozenset[int]
    emit: Callable[[list[int], bool, str | None], None]
    submitted: float = field(default_factory=time.perf_counter)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 1e-5


@dataclass
class _Slot:
    job: Job
    blocks: list[int]
    start: int                         # tokens already cached (prefix reuse)
    generated: list[int] = field(default_factory=list)
    n_written: int = 0                 # positions whose K/V are in the cache
    last_token: int = 0
    done: bool = False

    @property
    def greedy(self):
        return self.job.greedy

    @property
    def temperature(self):
        return self.job.temperature

    @property
    def top_p(self):
        return self.job.top_p


def _common_prefix(a: list[int], b: list[int]) -> int:
    lo, hi = 0, min(len(a), len(b))
    if hi == 0 or a[0] != b[0]:
        return 0
    if a[:hi] == b[:hi]:
        return hi
    while lo < hi:                      # invariant: a[:lo] == b[:lo], a[:hi+1] != b[:hi+1]
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class _BlockPool:
    """Free KV blocks plus an LRU cache of finished sequences' blocks (block 0 is never handed out)."""

    def __init__(self, n_blocks: int, block: int, keep_cache: bool):
        self.block = block
        self.free: list[int] = list(range(n_blocks - 1, 0, -1))
        self.cached: OrderedDict[int, tuple[list[int], list[int]]] = OrderedDict()
        self.keep_cache = keep_cache
        self._keys = 0
        self.total = n_blocks - 1

    def available(self) -> int:
        return len(self.free) + sum(len(b) for _, b in self.cached.values())

    def take(self, n: int) -> list[int] | None:
        while len(self.free) < n and self.cached:
            _, (_, blocks) = self.cached.popitem(last=False)
            self.free.extend(blocks)
        if len(self.free) < n:
            return None
        taken, self.free = self.free[-n:] if n else [], self.free[:-n] if n else self.free
        return taken

    def release(self, blocks: list[int]) -> None:
        self.free.extend(blocks)

    def remember(self, tokens: list[int], blocks: list[int]) -> None:
        if not self.keep_cache or not tokens:
            self.release(blocks)
            return
        keep = math.ceil(len(tokens) / self.block)
        self.release(blocks[keep:])
        self._keys += 1
        self.cached[self._keys] = (tokens, blocks[:keep])

    def reuse(self, ids: list[int], min_tokens: int = 16) -> tuple[list[int], int]:
        """Take over the cached blocks sharing the longest prefix with ``ids``. -> (blocks, cached tokens)."""
        best_key, best = None, 0
        for key, (tokens, _) in self.cached.items():
            c = _common_prefix(tokens, ids)
            if c > best:
                best_key, best = key, c
        if best_key is None or best < min_tokens:
            return [], 0
        tokens, blocks = self.cached.pop(best_key)
        start = min(best, len(ids) - 1)
        keep = math.ceil(start / self.block) if start else 0
        self.release(blocks[keep:])
        return blocks[:keep], start


class FastScheduler:
    """Owns a FastModel and a thread that admits, prefills and decodes every request.

    The thread keeps up to two decode steps in flight on CUDA: while the GPU runs step t+1 the
    host hands out the tokens of step t. A request that finishes is noticed one step late; the extra
    token is discarded (its blocks were reserved for it)."""

    def __init__(self, runner: FastModel, name: str = "model"):
        self.runner = runner
        self.name = name
        self._inbox: queue.Queue = queue.Queue()
        self._cancelled: set[str] = set()
        self._cancel_lock = threading.Lock()
        self._waiting: deque[Job] = deque()
        self._slots: list[_Slot] = []
        self._closed = threading.Event()
        self._ready = threading.Event()
        self._fatal: str | None = None
        self._thread: threading.Thread | None = None
        self._pool: _BlockPool | None = None
        self._warm_error: BaseException | None = None
        self.status = "starting"
        self._admit_blocked = False
        self.tuning: dict = {}
        self.attention_tuning: dict = {}
        self.prefill_log: deque = deque(maxlen=256)     # recent prefills: rows, tokens, seconds, waited
        self.launch_times: deque = deque(maxlen=4096)   # when recent decode steps were launched
        self._host: list[torch.Tensor] = []
        self.steps = 0
        self.prefills = 0

    # -- public ---------------------------------------------------------------------------------------
    def start(self, progress: Callable[[str], None] = lambda m: None) -> None:
        """Start the thread; it allocates the cache and captures graphs first (``ready()`` tells when)."""
        self._progress = progress
        self._thread = threading.Thread(target=self._run, name=f"fastpath-{self.name}", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        self._ready.wait(timeout)
        if self._warm_error is not None:
            raise self._warm_error
        return self._ready.is_set()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closed.is_set()

    @property
    def warm_error(self) -> BaseException | None:
        """Why the warm-up failed (the thread has ended), or None."""
        return self._warm_error

    def submit(self, job: Job) -> None:
        if self._closed.is_set():
            raise RuntimeError("scheduler closed")
        self._inbox.put(job)

    def cancel(self, request_id: str) -> None:
        with self._cancel_lock:
            self._cancelled.add(request_id)
        self._inbox.put(None)   # wake the thread

    def close(self, timeout: float = 10.0) -> None:
        self._closed.set()
        self._inbox.put(None)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def request_ids(self) -> set[str]:
        """The requests this scheduler still holds: submitted, waiting, or being decoded."""
        held = {job.request_id for job in list(self._inbox.queue) if job is not None}
        held |= {job.request_id for job in list(self._waiting)}
        held |= {slot.job.request_id for slot in list(self._slots) if not slot.done}
        return held

    def stats(self) -> dict:
        pool = self._pool
        return {"active": len(self._slots), "waiting": len(self._waiting) + self._inbox.qsize(),
                "steps": self.steps, "prefills": self.prefills,
                "free_blocks": len(pool.free) if pool else None,
                "cached_prefixes": len(pool.cached) if pool else None}

    # -- thread ----------------------------------------------------------------------------------------
    def _run(self) -> None:
        runner = self.runner
        if not runner.cuda and runner.options.cpu_threads:
            torch.set_num_threads(runner.options.cpu_threads)   # per thread: the rest of the process keeps its own
        stream = torch.cuda.stream(runner.stream) if runner.cuda else contextlib.nullcontext()
        with stream:
            self._run_on_stream()

    def _run_on_stream(self) -> None:
        runner = self.runner
        try:
            with torch.inference_mode():
                started = time.perf_counter()
                self.status = "allocating the KV cache"
                self._progress(f"{self.name}: allocating the KV cache")
                runner.allocate_cache()
                if runner.use_kernels:
                    self.status = "tuning kernels"
                    self.tuning = runner.tune_gemv(lambda m: self._progress(f"{self.name}: {m}"))
                    self.attention_tuning = runner.tune_attention(progress=lambda m: self._progress(f"{self.name}: {m}"))
                if runner.use_graphs:
                    self.status = "capturing CUDA graphs"
                    runner.capture(lambda m: self._progress(f"{self.name}: {m}"))
                if runner.cuda:
                    self.status = "warming up prefill"
                    self._progress(f"{self.name}: warming up prefill")
                    runner.warm_prefill()
                self._pool = _BlockPool(runner.n_blocks, runner.block, runner.options.prefix_cache)
                if runner.cuda:
                    self._host = [torch.empty(runner.max_rows, dtype=torch.long, pin_memory=True) for _ in range(4)]
                self._progress(f"{self.name}: fast path ready in {time.perf_counter() - started:.1f} s "
                               f"({runner.n_blocks - 1} KV blocks of {runner.block} tokens, "
                               f"{'CUDA graphs' if runner.graphs else 'no CUDA graphs'}, "
                               f"{'Triton kernels' if runner.use_kernels else 'eager ops'})")
                self.status = "ready"
        except BaseException as exc:  # noqa: BLE001 - reported to whoever waits for readiness
            log.exception("fast path warm-up failed")
            runner.release()
            if runner.cuda:
                torch.cuda.empty_cache()   # give the KV pool back: a fallback back end needs the memory
            self._warm_error = exc
            self.status = f"failed: {exc}"
            self._ready.set()
            self._closed.set()
            while True:    # requests that arrived during the warm-up end now instead of timing out
                try:
                    job = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    _safe_emit(job, [], True, f"the fast path could not start ({_describe(exc)})")
            return
        self._ready.set()
        with torch.inference_mode():
            self._loop()

    def _loop(self) -> None:
        runner = self.runner
        inflight: deque = deque()
        reload = True
        while not self._closed.is_set():
            try:
                idle = not self._slots and not inflight and not (self._waiting and not self._admit_blocked)
                if self._take_inbox(block=idle):
                    self._admit_blocked = False
                if self._closed.is_set():
                    break
                if any(s.done for s in self._slots):
                    self._drain(inflight)
                    self._retire_done()
                    reload = True
                if self._waiting and not self._admit_blocked and len(self._slots) < runner.max_rows:
                    self._drain(inflight)
                    self._retire_done()
                    if self._admit():
                        reload = True
                    self._retire_done()           # a reply may end at its first token
                if not self._slots:
                    self._drain(inflight)
                    continue
                if reload:
                    self._drain(inflight)
                    runner.load_rows(self._slots)
                    reload = False
                self._launch(inflight)
                if len(inflight) > (1 if runner.pipelined else 0):
                    self._process(inflight.popleft())
            except Exception as exc:  # noqa: BLE001 - fail the requests in hand, keep serving
                log.exception("%s: a generation step failed", self.name)
                inflight.clear()
                self._fail_all_active(_describe(exc))
                reload = True
        self._shutdown()

    def _take_inbox(self, block: bool) -> bool:
        """Move submitted jobs to the waiting queue; apply cancellations. -> whether anything changed."""
        changed = False
        try:
            item = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
            while True:
                if item is not None:
                    self._waiting.append(item)
                    changed = True
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass
        with self._cancel_lock:
            cancelled, self._cancelled = self._cancelled, set()
        if cancelled:
            for slot in self._slots:
                if slot.job.request_id in cancelled and not slot.done:
                    slot.done = True
                    changed = True
            kept = deque(j for j in self._waiting if j.request_id not in cancelled)
            if len(kept) != len(self._waiting):
                for job in self._waiting:
                    if job.request_id in cancelled:
                        _safe_emit(job, [], True, None)
                self._waiting = kept
                changed = True
        return changed

    def _launch(self, inflight: deque) -> None:
        runner = self.runner
        mode = sampling_mode(self._slots)
        rows, out = runner.decode(len(self._slots), mode)
        snapshot = list(self._slots)
        for slot in snapshot:
            slot.n_written += 1
        if runner.cuda:
            host = self._host[self.steps % len(self._host)][:rows]
            host.copy_(out, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            inflight.append((snapshot, host, event))
        else:
            inflight.append((snapshot, out.clone(), None))
        self.steps += 1
        self.launch_times.append(time.perf_counter())

    def _process(self, step) -> None:
        snapshot, host, event = step
        if event is not None:
            event.synchronize()
        values = host.tolist()
        for i, slot in enumerate(snapshot):
            if slot.done:
                continue
            token = values[i]
            self._accept(slot, token)

    def _accept(self, slot: _Slot, token: int) -> None:
        slot.generated.append(token)
        slot.last_token = token
        finished = token in slot.job.eos or len(slot.generated) >= slot.job.max_new
        if finished:
            slot.done = True
        _safe_emit(slot.job, [token], finished, None)

    def _drain(self, inflight: deque) -> None:
        while inflight:
            self._process(inflight.popleft())

    def _retire_done(self) -> None:
        pool = self._pool
        keep = []
        for slot in self._slots:
            if slot.done:
                if not slot.generated or slot.generated[-1] not in slot.job.eos and \
                        len(slot.generated) < slot.job.max_new:
                    _safe_emit(slot.job, [], True, None)      # cancelled: tell the reader it ended
                tokens = (slot.job.ids + slot.generated)[: slot.n_written]
                pool.remember(tokens, slot.blocks)
            else:
                keep.append(slot)
        if len(keep) != len(self._slots):
            self._admit_blocked = False
        self._slots = keep

    def _admit(self) -> bool:
        """Admit waiting jobs while rows and blocks allow, prefilling them in batches of up to
        ``prefill_tokens`` prompt tokens; the first token of each comes from its prefill. A burst of
        arrivals is prefilled back to back for up to ``burst_prefill_s`` before decoding resumes."""
        deadline = time.perf_counter() + self.runner.options.burst_prefill_s
        admitted = False
        while True:
            batch = self._next_batch()
            if not batch:
                return admitted
            self._prefill(batch)
            admitted = True
            if not self._waiting or time.perf_counter() > deadline:
                return admitted

    def _next_batch(self) -> list["_Slot"]:
        runner, pool = self.runner, self._pool
        budget = runner.options.prefill_tokens
        batch: list[_Slot] = []
        used = 0
        while self._waiting and len(self._slots) + len(batch) < runner.max_rows:
            job = self._waiting[0]
            if len(job.ids) + job.max_new + 1 > runner.max_len:
                self._waiting.popleft()
                _safe_emit(job, [], True, "the prompt and reply do not fit the model's context window")
                continue
            if not job.ids or min(job.ids) < 0 or max(job.ids) >= runner.n_embeddings:
                self._waiting.popleft()   # an out-of-range id would fault the GPU for every request
                _safe_emit(job, [], True, "the prompt has a token id outside the model's vocabulary")
                continue
            reused, start = pool.reuse(job.ids) if pool.keep_cache else ([], 0)
            if batch and (used + len(job.ids) - start > budget or start or batch[0].start):
                pool.remember(job.ids[:start], reused)      # a reused prefix is prefilled on its own
                break
            need = math.ceil((len(job.ids) + job.max_new + 1) / runner.block) - len(reused)
            fresh = pool.take(need)
            if fresh is None:
                pool.remember(job.ids[:start], reused)
                if not self._slots and not batch:
                    self._waiting.popleft()
                    _safe_emit(job, [], True, "not enough KV-cache memory for this request")
                    continue
                self._admit_blocked = True
                break
            self._waiting.popleft()
            batch.append(_Slot(job=job, blocks=reused + fresh, start=start))
            used += len(job.ids) - start
        return batch

    def _prefill(self, batch: list[_Slot]) -> None:
        runner = self.runner
        started = time.perf_counter()
        try:
            logits = runner.prefill([(s.job.ids, s.blocks, s.start) for s in batch])
            dev = runner.device
            temperature = torch.tensor([1.0 if s.greedy else max(s.temperature, 1e-5) for s in batch], device=dev)
            top_p = torch.tensor([s.top_p for s in batch], device=dev, dtype=torch.float32)
            greedy = torch.tensor([s.greedy for s in batch], device=dev)
            first = sample(logits, temperature, top_p, greedy, sampling_mode(batch)).tolist()
        except Exception as exc:  # noqa: BLE001 - these requests fail; the others go on
            log.exception("%s: prefill failed", self.name)
            for slot in batch:
                self._pool.release(slot.blocks)
                _safe_emit(slot.job, [], True, _describe(exc))
            return
        self.prefills += 1
        done = time.perf_counter()
        self.prefill_log.append(dict(rows=len(batch), tokens=sum(len(s.job.ids) - s.start for s in batch),
                                     reused=sum(s.start for s in batch), seconds=round(done - started, 4),
                                     waited=round(max(started - s.job.submitted for s in batch), 4)))
        for slot, token in zip(batch, first):
            slot.n_written = len(slot.job.ids)
            self._accept(slot, token)
            self._slots.append(slot)

    def _fail_all_active(self, message: str) -> None:
        for slot in self._slots:
            if not slot.done:
                slot.done = True
                _safe_emit(slot.job, [], True, message)
            self._pool.release(slot.blocks)
        self._slots = []

    def _shutdown(self) -> None:
        for slot in self._slots:
            if not slot.done:
                _safe_emit(slot.job, [], True, "the engine is shutting down")
        for job in self._waiting:
            _safe_emit(job, [], True, "the engine is shutting down")
        self._slots, self._waiting = [], deque()
        self.runner.release()
        if self.runner.cuda:
            torch.cuda.synchronize(self.runner.device)
            torch.cuda.empty_cache()


def _safe_emit(job: Job, tokens: list[int], finished: bool, error: str | None) -> None:
    try:
        job.emit(tokens, finished, error)
    except Exception:  # noqa: BLE001 - a broken consumer must not stop the scheduler
        log.exception("delivering tokens for %s failed", job.request_id)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text.lower():
        return "out of memory"
    return f"{type(exc).__name__}: {text}"
