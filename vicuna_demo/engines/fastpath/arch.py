"""The architectures the fast path serves, each one ``ArchSpec`` read from its HF config and modules.

Every architecture here is the same decoder block with a few switches: RMSNorm (Llama-style, or Gemma's
``(1 + w)`` computed in fp32), optional per-head q/k norms (Qwen3, Gemma 3), optional norms after attention
and after the MLP (Gemma 2/3), a gated MLP with SiLU or tanh-GELU, rotary embedding of any static kind
(tables come from the model's own ``rotary_emb``: llama3 scaling, Gemma 3's local/global bases), a sliding
window per layer, attention-logit and final-logit soft-capping (Gemma 2). ``forward.py`` runs that block;
adding an architecture is one ``Arch`` entry below plus its test (tests/test_architectures.py).

    spec = describe(model)          # raises Unsupported("why") for a model the fast path cannot run
"""

from __future__ import annotations

from dataclasses import dataclass

_STATIC_ROPE = ("default", "linear", "llama3", "yarn", "longrope")


class Unsupported(ValueError):
    """The fast path cannot run this model; the message says why (the engine falls back with it)."""


@dataclass(frozen=True)
class Arch:
    """Facts of one architecture that its config does not state."""
    gemma_norm: bool = False        # RMSNorm as x * (1 + w) in fp32 (Gemma), not (x in dtype) * w (Llama)
    sandwich_norms: bool = False    # extra norms on the attention and MLP outputs (Gemma 2/3)
    qk_norm: bool = False           # RMSNorm over each head of q and k before rotary embedding (Qwen3, Gemma 3)
    rope_per_layer_type: bool = False   # rotary_emb(x, positions, layer_type) (Gemma 3: local/global bases)


ARCHITECTURES: dict[str, Arch] = {
    "llama": Arch(),
    "mistral": Arch(),
    "qwen2": Arch(),
    "qwen3": Arch(qk_norm=True),
    "gemma2": Arch(gemma_norm=True, sandwich_norms=True),
    "gemma3_text": Arch(gemma_norm=True, sandwich_norms=True, qk_norm=True, rope_per_layer_type=True),
}
SUPPORTED_MODEL_TYPES = tuple(ARCHITECTURES)
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


@dataclass(frozen=True)
class ArchSpec:
    """One model as the fast path runs it (shapes and switches; the weights stay in the HF modules)."""
    model_type: str
    arch: Arch
    n_layers: int
    n_heads: int
    n_kv: int
    head_dim: int
    scale: float                            # attention score scale (Gemma: query_pre_attn_scalar ** -0.5)
    activation: str                         # "silu" or "gelu_tanh"
    windows: tuple[int | None, ...]         # per layer: keys within this many positions, or None (all)
    rope_keys: tuple[str | None, ...]       # per layer: which rotary table (None: the model's only one)
    attn_softcap: float | None = None       # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_softcap: float | None = None      # logits -> cap * tanh(logits / cap) (Gemma 2)
    tied_embeddings: bool = False

    @property
    def gqa(self) -> bool:
        return self.n_kv != self.n_heads


def describe(model) -> ArchSpec:
    """The ArchSpec of a loaded HF causal LM; raises Unsupported for one the fast path cannot run."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    model_type = getattr(config, "model_type", None)
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        raise Unsupported(f"model type {model_type!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}")
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not hasattr(inner, "embed_tokens") or not hasattr(model, "lm_head"):
        raise Unsupported("unexpected module layout")
    norms = ["input_layernorm", "post_attention_layernorm"]
    norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"] if arch.sandwich_norms else []
    attn, mlp, layer = getattr(layers[0], "self_attn", None), getattr(layers[0], "mlp", None), layers[0]
    for owner, names in ((attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                         (mlp, ("gate_proj", "up_proj", "down_proj")), (layer, norms)):
        if owner is None or not all(hasattr(owner, n) for n in names):
            raise Unsupported("unexpected module layout")
    if (getattr(attn, "q_norm", None) is not None) != arch.qk_norm:
        raise Unsupported("q/k norms where the architecture has none (or the reverse)")
    act_name = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")
    activation = _ACTIVATIONS.get(act_name)
    if activation is None:
        raise Unsupported(f"activation {act_name!r}")
    if getattr(model, "hf_device_map", None) and len(set(model.hf_device_map.values())) > 1:
        raise Unsupported("model spread over several devices")
    n_layers = int(config.num_hidden_layers)
    layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * n_layers)
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    ropes = list(rope.values()) if arch.rope_per_layer_type else [rope]
    for params in ropes:
        kind = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"
        if kind not in _STATIC_ROPE:
            raise Unsupported(f"rope type {kind!r}")
    n_heads = int(config.num_attention_heads)
    head_dim = int(getattr(attn, "head_dim", None) or config.hidden_size // n_heads)
    windows = tuple(_window(config, layers[i].self_attn, layer_types[i]) for i in range(n_layers))
    return ArchSpec(
        model_type=model_type, arch=arch, n_layers=n_layers, n_heads=n_heads,
        n_kv=int(getattr(config, "num_key_value_heads", None) or n_heads),
        head_dim=head_dim, scale=float(getattr(attn, "scaling", None) or head_dim ** -0.5),
        activation=activation, windows=windows,
        rope_keys=tuple(layer_types[:n_layers]) if arch.rope_per_layer_type else (None,) * n_layers,
        attn_softcap=getattr(config, "attn_logit_softcapping", None) or None,
        final_softcap=getattr(config, "final_logit_softcapping", None) or None,
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)))


def _window(config, attn, layer_type: str) -> int | None:
    """The layer's sliding window as transformers applies it: the attention module's own ``sliding_window``
    (Qwen2, Gemma 2/3: only on "sliding_attention" layers), else the config's on every layer (Mistral)."""
    if hasattr(attn, "sliding_window"):
        window = attn.sliding_window
    elif getattr(config, "model_type", None) == "mistral":
        window = getattr(config, "sliding_window", None)
    else:
        window = None
    return int(window) if window else None


def unsupported_reason(model) -> str | None:
    """None if the fast path can run this model, else a short reason."""
    try:
        describe(model)
    except Unsupported as exc:
        return str(exc)
    return None
