"""Turning a conversation into prompt token ids for a model loaded in this process: its template, its
tokenizer, and context fitting (the oldest exchanges go first; the system prompt always stays).

``LocalEngine`` (batching on a background thread) and ``ZeroGPUEngine`` (one spaces.GPU call per reply)
both build on ``PromptingModel``, so templates and context fitting live in one place.

No typed text becomes a special token: the template cuts the prompt into segments, where every text
of one of the tokenizer's added tokens that a visitor typed is its own "plain" segment
(``conversation_templates.marking``). ``PromptEncoder`` tokenises those with the tokenizer's
special-token parsing off (``_encode_without_added_tokens``: ``split_special_tokens=True`` on a
python tokenizer; on a fast one, split_special_tokens only skips *special* added tokens, so the
rust model is run without the added vocabulary, as transformers' own
``apply_chat_template(sanitize_control_tokens=True)`` does) and everything else as usual, so a prompt
with nothing typed of that kind gets exactly the ids of ``tokenizer(prompt)``.
"""

from __future__ import annotations

from collections.abc import Sequence

from conversation_templates import Segment, control_pattern, control_tokens
from conversation_templates.neutralise import ZWSP

from ..loading import LoadedModel
from .protocol import Prompt, PromptTooLong, SamplingParams
from .sampling_defaults import engine_defaults


class PromptEncoder:
    """Prompt segments -> token ids for one tokenizer; only template-written token texts become their ids."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        texts = control_tokens(tokenizer)
        self.control = control_pattern(texts)
        self.token_ids = frozenset(tokenizer.convert_tokens_to_ids(list(texts))) | frozenset(
            getattr(tokenizer, "all_special_ids", None) or ())
        self._newline = self._normal("\n")
        with_specials = tokenizer("a", add_special_tokens=True)["input_ids"]
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        at = next((i for i in range(len(with_specials) - len(plain) + 1)
                   if with_specials[i:i + len(plain)] == plain), None)
        # what the tokenizer adds around a text (Llama: BOS), added once around the whole prompt
        self._prefix = with_specials[:at] if at is not None else []
        self._suffix = with_specials[at + len(plain):] if at is not None else []

    def _normal(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _as_text(self, text: str) -> list[int]:
        without = getattr(self.tokenizer, "_encode_without_added_tokens", None)
        if without is not None:
            return list(without(text))
        return self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)

    def _piece(self, text: str, plain: bool, first: bool) -> list[int]:
        encode = self._as_text if plain else self._normal
        if first:
            return encode(text)
        # A piece inside the prompt: encode it after a newline and drop the newline's ids, so a
        # SentencePiece-style tokenizer does not add the word-start "▁" it adds at a text's start.
        ids = encode("\n" + text)
        return ids[len(self._newline):] if ids[:len(self._newline)] == self._newline else encode(text)

    def encode(self, segments: Sequence[Segment]) -> list[int]:
        """The prompt's ids; the tokenizer's own BOS (and the like) is added unless the template wrote it."""
        ids: list[int] = []
        for text, plain in segments:
            if not text:
                continue
            piece = self._piece(text, plain, first=not ids)
            if plain and self.token_ids.intersection(piece):  # the vocabulary spells it even as text
                piece = self._piece(text[0] + ZWSP + text[1:], plain, first=not ids)
            ids += piece
        bos = getattr(self.tokenizer, "bos_token", None)
        template_wrote_bos = bool(bos) and bool(segments) and not segments[0][1] and segments[0][0].startswith(bos)
        return ids if template_wrote_bos else [*self._prefix, *ids, *self._suffix]


class PromptingModel:
    """What every in-process engine shares: the model's facts and turning messages into prompt ids.

    ``LocalEngine`` (batching on a background thread) and ``ZeroGPUEngine`` (one spaces.GPU call
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
        self.prompt_encoder = PromptEncoder(loaded.tokenizer)
        # the model's recommended sampling values, and a shorter reply on a CPU (sampling_defaults.py)
        self._model_defaults = engine_defaults(loaded.sampling, cpu=loaded.device == "cpu")

    unsupported_params: frozenset[str] = frozenset()   # an engine whose back end cannot apply a field says so

    @property
    def defaults(self) -> SamplingParams:
        """The model's defaults (``protocol.Engine.defaults``); a field this engine cannot apply keeps the built-in
        value (a model's recommended repetition penalty is dropped on continuous batching)."""
        return self._model_defaults.without(self.unsupported_params)

    # -- prompt ---------------------------------------------------------------------------
    # messages that end with a partial assistant reply are continued (the Continue button after a reply cut at
    # the token limit): the prompt ends inside that reply, so the model goes on with the same turn
    continues_replies = True

    def encode_messages(self, messages: list[dict]) -> list[int]:
        """The prompt ids of ``messages`` under this model's template (see the module docstring)."""
        continuing = bool(messages) and messages[-1]["role"] == "assistant"
        return self.prompt_encoder.encode(self.template.segments(messages, self.prompt_encoder.control,
                                                                 continue_final=continuing))

    def prepare(self, messages: list[dict], params: SamplingParams) -> Prompt:
        """Render with the template; drop the oldest user/assistant pairs (never the system prompt) to fit.
        A last assistant message (a reply to continue) is kept with the user message it answers."""
        system = [m for m in messages[:1] if m["role"] == "system"]
        turns = list(messages[len(system):])
        last_exchange = 2 if turns and turns[-1]["role"] == "assistant" else 1
        # Leave room for the reply: the requested length, but at least a quarter of the window for
        # the conversation itself.
        reserve = min(params.max_new_tokens, self.context_window // 4 * 3)
        budget = self.context_window - reserve
        dropped = 0
        while True:
            ids = self.encode_messages(system + turns)
            if len(ids) <= budget:
                break
            if len(turns) <= last_exchange:
                raise PromptTooLong(
                    f"This message is too long for {self.name}: it needs {len(ids)} tokens, and the model's "
                    f"context window leaves {budget} for the conversation. Please shorten it.")
            turns = turns[2:]  # the oldest user message and the reply to it
            dropped += 1
        return Prompt(messages=tuple(system + turns), dropped_turns=dropped, payload=ids, n_prompt_tokens=len(ids))
