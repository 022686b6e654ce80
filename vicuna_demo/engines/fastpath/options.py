"""Which models the fast path runs (``unsupported_reason``) and its knobs (``FastOptions``)."""

from __future__ import annotations

from dataclasses import dataclass

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_STATIC_ROPE = ("default", "linear", "llama3", "yarn", "longrope")


@dataclass(frozen=True)
class FastOptions:
    max_rows: int | None = None            # requests decoded together (None: 64 on CUDA, 8 on CPU)
    block_size: int | None = None          # tokens per KV block (None: 64 on CUDA, a whole context on CPU)
    kv_blocks: int | None = None           # force the pool size (else: the start-up plan's share, or what is free)
    prefill_tokens: int = 4096             # most prompt tokens prefilled in one forward pass
    burst_prefill_s: float = 0.3           # prefill waiting requests back to back for up to this long
    cpu_threads: int | None = None         # CPU: intra-op threads of the scheduler thread only (None: torch's)
    cuda_graphs: bool = True               # capture decode steps as CUDA graphs (CUDA only)
    kernels: bool = True                   # Triton kernels for the decode step (CUDA only)
    int8_kernel: bool = True               # our weight-only kernels over bitsandbytes' quantized weights when
                                           # decoding: int8 (8-bit) and NF4 (4-bit) alike (name kept from 8-bit)
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
