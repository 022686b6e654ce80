"""Each engine's sampling defaults: the model's recommended values and a reply length suited to its device.

A request's parameters come in layers, each over the ones below it:

    the request's own values > the user's flags (--temperature ...; services/chat.py) > the engine's
    ``defaults`` (this module) > the built-in ``SamplingParams()`` (protocol.py)

An engine's ``defaults`` are the built-in values with
- ``max_new_tokens`` = ``CPU_MAX_NEW_TOKENS`` for a model that runs on a CPU (a reply in seconds, not
  minutes); 1024 on a GPU and for remote models;
- over that, the model's recommended values (``LoadedModel.sampling``, loading.recommended_sampling): what its
  generation config sets among temperature, top_p, repetition_penalty and max_new_tokens, else its row of
  ``specs.RECOMMENDED_SAMPLING`` (a model whose files set nothing, such as the embedded GGUF). Values outside
  the ranges a visitor may choose are clamped.
"""

from __future__ import annotations

from typing import Any, Mapping

from .protocol import SamplingParams

# The embedded SmolLM2-135M answers at 12-15 tok/s alone on 2 CPU cores (fast path, measured 2026-12-02 on
# this project's 2-core machine), and about 5-7 tok/s each when 4-6 visitors share the batch: 256 tokens are
# ~20 s alone and under a minute shared, where FastChat's 1024 took 80 s alone (issue 15). A longer reply is
# one slider away; --max-new-tokens sets it for every model.
CPU_MAX_NEW_TOKENS = 256


def engine_defaults(values: Mapping[str, Any], *, cpu: bool) -> SamplingParams:
    """An engine's defaults: the built-in values, ``CPU_MAX_NEW_TOKENS`` on a CPU, the model's ``values`` over them."""
    base = SamplingParams(max_new_tokens=CPU_MAX_NEW_TOKENS) if cpu else SamplingParams()
    return SamplingParams.clamped(values.get("temperature"), values.get("top_p"), values.get("max_new_tokens"),
                                  defaults=base, repetition_penalty=values.get("repetition_penalty"))
