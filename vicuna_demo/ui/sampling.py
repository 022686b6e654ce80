"""The sampling sliders of every tab (temperature, top_p, max output tokens, repetition penalty) and how they
follow the models' own defaults. Rendering only: the values come from ``ChatService.defaults_for``.

Rules (README, "Replies"):
- Chat and 👥 Side by side: a model's sliders show that model's defaults (its recommended values, the user's
  flags over them, a shorter reply on a CPU) and go back to them when the model is changed; what the
  visitor sets is sent as it is.
- ⚔️ Arena: the models are unknown until the vote, so the sliders start at the server's values and a slider
  left at its starting value means "each model's own default"; a slider the visitor moves applies to both.
- A setting the selected model cannot apply (a repetition penalty on continuous batching) is greyed out.
"""

from __future__ import annotations

import gradio as gr

from ..services.chat import SAMPLING_FIELDS, ChatService

LABELS = {"temperature": "Temperature", "top_p": "Top P", "max_new_tokens": "Max output tokens",
          "repetition_penalty": "Repetition penalty"}
STEPS = {"temperature": 0.1, "top_p": 0.1, "max_new_tokens": 16, "repetition_penalty": 0.05}
INFO = {"temperature": "0 = greedy (deterministic)", "repetition_penalty": "1 = off; above 1, repeating is penalised"}
NOT_AVAILABLE = "not available for this model"
ARENA_NOTE = ("At its starting value a slider means *each model's own default* (models ship recommended "
              "settings); move it to use the same value for both models.")


def _info(field: str, unsupported: frozenset[str]) -> str | None:
    return NOT_AVAILABLE if field in unsupported else INFO.get(field)


def sampling_controls(service: ChatService, model: str | None) -> tuple[gr.Slider, ...]:
    """One slider per SamplingParams field, FastChat's ranges (the token slider ends at the cap), starting at
    ``model``'s defaults (None: the server's values, for the arena)."""
    ranges = service.ranges()
    defaults = service.defaults_for(model)
    unsupported = service.unsupported(model)
    return tuple(gr.Slider(*ranges[field], value=getattr(defaults, field), step=STEPS[field], label=LABELS[field],
                           info=_info(field, unsupported), interactive=field not in unsupported)
                 for field in SAMPLING_FIELDS)


def follow_model(service: ChatService, model: str) -> list[dict]:
    """Updates that put a model's sliders back to its defaults (and grey out what it cannot apply)."""
    defaults, unsupported = service.defaults_for(model), service.unsupported(model)
    return [gr.update(value=getattr(defaults, field), interactive=field not in unsupported,
                      info=_info(field, unsupported)) for field in SAMPLING_FIELDS]


def unless_at_start(values, start: tuple) -> tuple:
    """The arena's rule: a value still at its slider's starting value is None (each model's own default)."""
    out = []
    for value, first in zip(values, start):
        try:
            out.append(None if abs(float(value) - float(first)) < 1e-6 else value)
        except (TypeError, ValueError):
            out.append(value)      # junk is the service's to clamp or replace
    return tuple(out)
