"""Turning a conversation into prompt token ids for a model loaded in this process: its template, its
tokenizer, and context fitting (the oldest exchanges go first; the system prompt always stays).

``LocalEngine`` (batching on a background thread) and ``ZeroGPUEngine`` (one spaces.GPU call per reply)
both build on ``PromptingModel``, so templates and context fitting live in one place.
"""

from __future__ import annotations

from ..loading import LoadedModel
from .protocol import Prompt, PromptTooLong, SamplingParams


class PromptingModel:
    """What every in-process engine shares: the model's facts and turning messages into prompt ids.

    ``LocalEngine`` (batching on a background thread) and ``deploy.ZeroGPUEngine`` (one spaces.GPU call
    per reply) both build on it, so templates and context fitting live in one place."""

    def __init__(self, loaded: LoadedModel):
        self.name = loaded.name
        self.template = loaded.template
        self.template_name = loaded.template.name
        self.default_system = loaded.template.system_message
        self.context_window = loaded.context_window
        self.tokenizer = loaded.tokenizer
        self.model = loaded.model
        self._eos_ids = loaded.eos_token_ids
        self._stop_strings = tuple(loaded.template.stop_strings)

    # -- prompt ---------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        add_special = not (self.tokenizer.bos_token and text.startswith(self.tokenizer.bos_token))
        return self.tokenizer(text, add_special_tokens=add_special)["input_ids"]

    def prepare(self, messages: list[dict], params: SamplingParams) -> Prompt:
        """Render with the template; drop the oldest user/assistant pairs (never the system prompt) to fit."""
        system = [m for m in messages[:1] if m["role"] == "system"]
        turns = list(messages[len(system):])
        # Leave room for the reply: the requested length, but at least a quarter of the window for
        # the conversation itself.
        reserve = min(params.max_new_tokens, self.context_window // 4 * 3)
        budget = self.context_window - reserve
        dropped = 0
        while True:
            ids = self.encode(self.template.render(system + turns))
            if len(ids) <= budget:
                break
            if len(turns) <= 1:
                raise PromptTooLong(
                    f"This message is too long for {self.name}: it needs {len(ids)} tokens, and the model's "
                    f"context window leaves {budget} for the conversation. Please shorten it.")
            turns = turns[2:]  # the oldest user message and the reply to it
            dropped += 1
        return Prompt(messages=tuple(system + turns), dropped_turns=dropped, payload=ids, n_prompt_tokens=len(ids))
