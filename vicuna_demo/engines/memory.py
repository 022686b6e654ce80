"""GPU memory for the whole process, planned before any model loads: what each model needs, whether they all
fit, and how each device's KV-cache memory is divided among its engines.

The rule (docs/performance.md, "Memory"):

1. Before loading, each model's weights are computed from its config: fp16 2 bytes per parameter; 8-bit
   (bitsandbytes LLM.int8) 1 byte per parameter of the quantized projections plus one fp32 scale per
   output row, with the embeddings, norms and output head kept in fp16; 4-bit NF4 half a byte per
   parameter plus one fp32 absmax per 64 weights, same fp16 parts. A model needs its weights, an
   activation reserve (estimated here, measured at warm-up) and KV cache for at least one conversation
   at its full context window. When a device's models need more than its free memory, start-up stops
   with one line (``PlanError``) before anything loads.
2. After every model of a device has loaded, each engine measures its activation peak (the largest
   prefill and the largest decode batch it will run). What is free then, less those peaks and a small
   margin per engine, is the device's KV memory.
3. A model with ``kv=F`` in its spec gets the fraction F of that memory. The rest is shared so that the
   other engines hold the same number of tokens (a fp16 and an 8-bit 7B model get the same bytes), but
   no engine more than it can use (its batch size times its context window); what one cannot use goes to
   the others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

GiB = 2**30
MiB = 2**20
# Kept free per engine besides its measured peak: the serving thread's cuBLAS workspace, kernels loaded
# later, CUDA-graph objects, the allocator's rounding. 512 MiB (an H200 run with 256 MiB ran out of memory
# in the prefill warm-up of a 24 GB card).
ENGINE_MARGIN_BYTES = 512 * MiB
# PyTorch's allocator setting for planned start-up: without expandable segments, the weights freed when the
# fast path fuses q/k/v and gate/up stay reserved in half-used segments (3 GiB of a 7B model on an H200
# run), invisible to the plan and too fragmented for the KV cache or a prefill.
ALLOC_CONF = "expandable_segments:True"
# Prompt tokens prefilled in one forward pass (fastpath.FastOptions.prefill_tokens): the largest prefill.
PREFILL_TOKENS = 4096
# A "typical" conversation for the page's capacity line: the fast path reserves a request's prompt plus its
# reply budget when it is admitted; ~1,000 tokens of prompt and ~1,000 of reply.
TYPICAL_CONVERSATION_TOKENS = 2048


class PlanError(RuntimeError):
    """The planned models do not fit; the message is one line for the user."""


@dataclass(frozen=True)
class ModelNeeds:
    """What one model needs on its device, from its config alone."""

    name: str
    device: str
    precision: str            # "fp16" | "8-bit" | "4-bit" (fp16 stands for any 16-bit dtype)
    weights: int              # bytes
    kv_per_token: int         # bytes of KV cache per token
    context: int              # context window in tokens
    reserve: int              # estimated activation peak + margin (measured at warm-up)
    kv_share: float | None = None

    @property
    def minimum(self) -> int:
        """Weights, activations and KV cache for one conversation at the full context window."""
        return self.weights + self.reserve + self.context * self.kv_per_token


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def parameter_counts(config) -> tuple[int, int]:
    """-> (parameters of the decoder layers' projections, other parameters: embeddings, head, norms)."""
    cfg = _text_config(config)
    hidden = int(cfg.hidden_size)
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // heads)
    inter = int(getattr(cfg, "intermediate_size", None) or 4 * hidden)
    layers = int(cfg.num_hidden_layers)
    vocab = int(cfg.vocab_size)
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2     # q, o + k, v
    mlp = 3 * hidden * inter                                                          # gate, up, down
    projections = layers * (attention + mlp)
    tied = bool(getattr(config, "tie_word_embeddings", getattr(cfg, "tie_word_embeddings", False)))
    other = vocab * hidden * (1 if tied else 2) + (2 * layers + 1) * hidden
    return projections, other


def weight_bytes(config, precision: str = "fp16", dtype_bytes: int = 2) -> int:
    """Bytes of the weights once loaded (see the module docstring for the per-precision rule)."""
    projections, other = parameter_counts(config)
    cfg = _text_config(config)
    layers, hidden = int(cfg.num_hidden_layers), int(cfg.hidden_size)
    inter = int(getattr(cfg, "intermediate_size", None) or 4 * hidden)
    if precision == "8-bit":
        out_rows = layers * (4 * hidden + 3 * inter)                 # one fp32 scale per output row
        return projections + 4 * out_rows + other * 2
    if precision == "4-bit":
        return projections // 2 + 4 * math.ceil(projections / 64) + other * 2
    return (projections + other) * dtype_bytes


def kv_bytes_per_token(config, dtype_bytes: int = 2) -> int:
    cfg = _text_config(config)
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or int(cfg.hidden_size) // heads)
    return 2 * int(cfg.num_hidden_layers) * kv_heads * head_dim * dtype_bytes


def estimated_reserve(config, dtype_bytes: int = 2, prefill_tokens: int = PREFILL_TOKENS) -> int:
    """Activation peak of a prefill of ``prefill_tokens`` tokens, before it can be measured: per token the
    hidden state, q/k/v, attention output and residual (6 x hidden) and the MLP's gate, up and product
    (3 x intermediate), plus the margin. Warm-up replaces it with the measured peak."""
    cfg = _text_config(config)
    hidden = int(cfg.hidden_size)
    inter = int(getattr(cfg, "intermediate_size", None) or 4 * hidden)
    return prefill_tokens * (6 * hidden + 3 * inter) * dtype_bytes + ENGINE_MARGIN_BYTES


def model_needs(name: str, device: str, config, *, precision: str, context: int | None = None,
                kv_share: float | None = None, dtype_bytes: int = 2) -> ModelNeeds:
    cfg = _text_config(config)
    window = int(context or getattr(cfg, "max_position_embeddings", 0) or 2048)
    return ModelNeeds(name=name, device=device, precision=precision,
                      weights=weight_bytes(config, precision, dtype_bytes),
                      kv_per_token=kv_bytes_per_token(config, dtype_bytes), context=window,
                      reserve=estimated_reserve(config, dtype_bytes, min(PREFILL_TOKENS, window)),
                      kv_share=kv_share)


def gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def check_fit(needs: Sequence[ModelNeeds], free: dict[str, int], total: dict[str, int] | None = None) -> None:
    """Raise PlanError (one line) when the models planned for a device need more than its free memory, or
    when its kv= shares add up to more than the whole."""
    for device in sorted({n.device for n in needs}):
        group = [n for n in needs if n.device == device]
        shares = sum(n.kv_share or 0.0 for n in group)
        if shares > 1.0 + 1e-9:
            raise PlanError(f"The kv= shares of the models on {device} add up to {shares:.2f}; they must add up "
                            f"to 1 or less ({', '.join(f'{n.name} kv={n.kv_share}' for n in group if n.kv_share)}).")
        needed = sum(n.minimum for n in group)
        if needed <= free.get(device, 0):
            continue
        card = gib(free.get(device, 0)) + " free" + (f" of {gib(total[device])}" if total and device in total else "")
        each = ", ".join(f"{n.name} ({n.precision}) needs {gib(n.minimum)} = {gib(n.weights)} weights + "
                         f"{gib(n.reserve)} activations + {gib(n.context * n.kv_per_token)} KV cache for one "
                         f"{n.context:,}-token conversation" for n in group)
        raise PlanError(f"The models planned for {device} do not fit ({card}): {each}. Try: 8bit or 4bit in a "
                        f"model's spec (--model SOURCE,8bit), fewer models, another GPU (device=cuda:N), or a "
                        f"shorter context (ctx=2048).")


def place(needs: Sequence[ModelNeeds], movable: set[str] | frozenset[str], free: dict[str, int]) -> list[ModelNeeds]:
    """Put each movable model (its spec gave no device=, so any GPU will do) on a GPU of ``free``: largest
    first, each on the GPU with the most memory left once the models already there are counted (pinned ones
    first), so several models spread over several GPUs. Pinned models keep their device. -> the needs with
    their devices, in the order given. Raises PlanError (one line) when a movable model fits on no GPU."""
    left = dict(free)
    for n in needs:
        if n.name not in movable:
            left[n.device] = left.get(n.device, 0) - n.minimum
    placed: dict[str, str] = {}
    for n in sorted((n for n in needs if n.name in movable), key=lambda n: -n.minimum):
        device = max(sorted(left), key=lambda d: left[d])
        if n.minimum > left[device]:
            room = ", ".join(f"{d} {gib(max(0, left[d]))} left" for d in sorted(left))
            raise PlanError(f"{n.name} ({n.precision}) needs {gib(n.minimum)} = {gib(n.weights)} weights + "
                            f"{gib(n.reserve)} activations + {gib(n.context * n.kv_per_token)} KV cache for one "
                            f"{n.context:,}-token conversation, and no GPU has that much after the models placed "
                            f"before it ({room}). Try: 8bit or 4bit in a model's spec, fewer models, or a shorter "
                            f"context (ctx=2048).")
        placed[n.name] = device
        left[device] -= n.minimum
    return [replace(n, device=placed.get(n.name, n.device)) for n in needs]


@dataclass(frozen=True)
class KvClaim:
    """One engine's part in dividing a device's KV memory."""

    name: str
    per_token: int                 # bytes per cached token
    limit: int                     # the most bytes it can use (batch size x context window)
    share: float | None = None     # kv= fraction of the device's KV memory


def divide_kv(total: int, claims: Sequence[KvClaim]) -> dict[str, int]:
    """Divide ``total`` bytes of KV memory by the rule in the module docstring. -> bytes per engine."""
    total = max(0, int(total))
    out: dict[str, int] = {}
    left = total
    for c in claims:
        if c.share is not None:
            out[c.name] = min(int(total * c.share), c.limit)
            left -= out[c.name]
    rest = [c for c in claims if c.share is None]
    # Water-filling on tokens: every remaining engine holds the same tokens, except those capped lower.
    rest.sort(key=lambda c: c.limit / max(1, c.per_token))
    while rest:
        tokens = left / sum(c.per_token for c in rest)
        first = rest[0]
        if tokens * first.per_token >= first.limit:
            out[first.name] = first.limit
            left -= first.limit
            rest.pop(0)
            continue
        for c in rest:
            out[c.name] = int(tokens * c.per_token)
        break
    return out


def kv_total(free: int, reserves: Sequence[int]) -> int:
    """The KV memory of a device whose engines have measured their activation peaks (``reserves``, each
    including ENGINE_MARGIN_BYTES), with ``free`` bytes free now."""
    return max(0, free - sum(reserves))


def conversations(kv_tokens: int, typical: int = TYPICAL_CONVERSATION_TOKENS) -> int:
    """Roughly how many conversations of typical length fit in a KV cache at once."""
    return max(0, kv_tokens // typical)
