"""Each engine's sampling defaults: the model's recommended values and a reply length suited to its device.

A request's parameters come in layers, each over the ones below it:

    the request's own values > the user's flags (--temperature ...; services/chat.py) > the engine's
    ``defaults`` (this module) > the built-in ``SamplingParams()`` (protocol.py)

An engine's ``defaults`` are the built-in values with
- ``max_new_tokens`` = ``CPU_MAX_NEW_TOKENS`` for a model that runs on a CPU (a reply in seconds, not
  minutes); 1024 on a GPU and for remote models;
- over that, the model's recommended values: what its generation config sets among temperature, top_p,
  repetition_penalty and max_new_tokens (the keys vLLM's ``--generation-config auto`` reads; do_sample
  and top_k are not read), else its row of ``RECOMMENDED`` below (one table: a model whose files set
  nothing, such as the embedded GGUF). Values outside the ranges a visitor may choose are clamped.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from .protocol import SAMPLING_FIELDS, SamplingParams

# The embedded SmolLM2-135M answers at 12-15 tok/s alone on 2 CPU cores (fast path, measured 2026-12-02 on
# this project's 2-core machine), and about 5-7 tok/s each when 4-6 visitors share the batch: 256 tokens are
# ~20 s alone and under a minute shared, where FastChat's 1024 took 80 s alone (issue 15). A longer reply is
# one slider away; --max-new-tokens sets it for every model.
CPU_MAX_NEW_TOKENS = 256

# (pattern searched in the model id or GGUF file name, values): recommended values of models whose files set
# none. First match wins; the generation config's own values win over a row. Each row says where its
# numbers come from.
RECOMMENDED: tuple[tuple[re.Pattern[str], dict[str, Any]], ...] = (
    # SmolLM2 Instruct (the embedded model): temperature 0.2 and top_p 0.9 are the usage example of the model
    # card (huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct); its generation_config.json sets neither. Alone
    # they loop ("la Femme, la Femme, ..."; 4 of 6 test prompts ran to the limit, one sentence repeated 13
    # times): repetition_penalty 1.1, measured here, ended those loops (docs/performance.md, "Replies").
    (re.compile(r"SmolLM2-[0-9.]+[MB]-Instruct", re.IGNORECASE),
     {"temperature": 0.2, "top_p": 0.9, "repetition_penalty": 1.1}),
)


def from_generation_config(config) -> dict[str, Any]:
    """The values among temperature, top_p, repetition_penalty, max_new_tokens that a transformers
    ``GenerationConfig`` (or a plain dict read from generation_config.json) sets, i.e. differing from
    transformers' defaults."""
    if config is None:
        return {}
    values = config.to_diff_dict() if hasattr(config, "to_diff_dict") else dict(config)
    return {key: values[key] for key in SAMPLING_FIELDS if values.get(key) is not None}


def recommended(model_id: str, generation_config=None) -> dict[str, Any]:
    """The model's recommended values: its row of ``RECOMMENDED`` (if any) under its generation config's."""
    found = from_generation_config(generation_config)
    for pattern, values in RECOMMENDED:
        if pattern.search(model_id or ""):
            return {**values, **found}
    return found


def engine_defaults(values: Mapping[str, Any], *, cpu: bool) -> SamplingParams:
    """An engine's defaults: the built-in values, ``CPU_MAX_NEW_TOKENS`` on a CPU, the model's ``values`` over them."""
    base = SamplingParams(max_new_tokens=CPU_MAX_NEW_TOKENS) if cpu else SamplingParams()
    return SamplingParams.clamped(values.get("temperature"), values.get("top_p"), values.get("max_new_tokens"),
                                  defaults=base, repetition_penalty=values.get("repetition_penalty"))
