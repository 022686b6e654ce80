"""What every engine shares: sampling parameters, reply statistics, errors, and the Engine interface.

An *engine* turns a conversation (OpenAI-style messages) into a stream of text deltas. The local
engine (``local.py``) renders a template and runs the model; a remote engine (``remote.py``) speaks the
OpenAI chat API. Nothing above this interface knows which one it talks to.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Protocol

# FastChat's ranges, which users of such demos know.
TEMPERATURE_RANGE = (0.0, 1.0)
TOP_P_RANGE = (0.0, 1.0)
MAX_NEW_TOKENS_RANGE = (16, 2048)
# 1.0 = off; above 1 a token already in the prompt or the reply is made less likely (HF / CTRL style).
REPETITION_PENALTY_RANGE = (1.0, 2.0)
SAMPLING_FIELDS = ("temperature", "top_p", "max_new_tokens", "repetition_penalty")


class EngineError(RuntimeError):
    """Generation failed; the message is safe to show to the user."""


class PromptTooLong(ValueError):
    """A single message (with the system prompt) does not fit the model's context window."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. ``temperature == 0`` means greedy decoding; ``repetition_penalty`` 1.0 means off
    (above 1, each token already in the prompt or the reply has its logit divided by it when positive and
    multiplied by it when negative, as transformers' ``repetition_penalty`` does).

    These are the built-in values, the bottom layer of a request's parameters: a request's own value wins
    over the user's flag (--temperature ...), which wins over the engine's ``defaults`` (the model's
    recommended values from its generation_config.json, and a reply length suited to its device,
    engines/sampling_defaults.py), which win over these."""

    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 1024
    repetition_penalty: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 1e-5

    def overridden(self, values: Mapping[str, Any]) -> "SamplingParams":
        """These parameters with the non-None entries of ``values`` (field name -> value) put over them."""
        given = {k: v for k, v in values.items() if k in SAMPLING_FIELDS and v is not None}
        return dataclasses.replace(self, **given) if given else self

    def without(self, fields) -> "SamplingParams":
        """These parameters with ``fields`` back at their built-in values (what an engine cannot apply)."""
        built_in = SamplingParams()
        return self.overridden({f: getattr(built_in, f) for f in fields})

    @classmethod
    def clamped(cls, temperature: Any, top_p: Any, max_new_tokens: Any,
                max_tokens_cap: int = MAX_NEW_TOKENS_RANGE[1],
                defaults: "SamplingParams | None" = None, repetition_penalty: Any = None) -> "SamplingParams":
        """Build parameters from untrusted input (UI or API), clamping each into its range.

        Missing or non-numeric values fall back to ``defaults`` (the model's, with the user's flags over
        them), so no input can crash a request."""
        default = defaults or cls()

        def number(value: Any, fallback: float) -> float:
            try:
                value = float(value)
            except (TypeError, ValueError):
                return fallback
            return value if math.isfinite(value) else fallback

        t = min(max(number(temperature, default.temperature), TEMPERATURE_RANGE[0]), TEMPERATURE_RANGE[1])
        p = min(max(number(top_p, default.top_p), TOP_P_RANGE[0]), TOP_P_RANGE[1])
        if p <= 0.0:
            p = 0.01  # top_p 0 would keep nothing; the smallest nucleus is the top token
        n = int(min(max(number(max_new_tokens, default.max_new_tokens), 1), max_tokens_cap))
        r = min(max(number(repetition_penalty, default.repetition_penalty), REPETITION_PENALTY_RANGE[0]),
                REPETITION_PENALTY_RANGE[1])
        return cls(temperature=t, top_p=p, max_new_tokens=n, repetition_penalty=r)

    def as_dict(self) -> dict:
        """What the log stores: FastChat's three keys, and ``repetition_penalty`` only when one was used
        (absent means 1.0, off), so records without one keep FastChat's shape."""
        out = {"temperature": self.temperature, "top_p": self.top_p, "max_new_tokens": self.max_new_tokens}
        if self.repetition_penalty != 1.0:
            out["repetition_penalty"] = self.repetition_penalty
        return out


@dataclass
class ReplyStats:
    """Filled in while a reply streams; final once the stream is exhausted."""

    n_tokens: int = 0
    ttft_s: float | None = None          # submit -> first token
    decode_s: float | None = None        # first token -> last token
    finish_reason: str | None = None     # "stop" | "length" | "cancelled" | "error"
    error: str | None = None

    @property
    def tok_s(self) -> float | None:
        if self.n_tokens < 2 or not self.decode_s:
            return None
        return (self.n_tokens - 1) / self.decode_s

    def followed_by(self, more: "ReplyStats") -> "ReplyStats":
        """A reply and its continuation (Continue) as one: tokens and decode time add up, the first token is the
        first part's, the finish is the continuation's."""
        decode = [s.decode_s for s in (self, more) if s.decode_s]
        return ReplyStats(n_tokens=self.n_tokens + more.n_tokens, ttft_s=self.ttft_s if self.ttft_s is not None
                          else more.ttft_s, decode_s=sum(decode) if decode else None,
                          finish_reason=more.finish_reason, error=more.error)

    def summary(self) -> str:
        """The line shown under a reply, e.g. ``42 tokens · first token 0.18 s · 31.5 tok/s``."""
        parts = [f"{self.n_tokens} token{'s' if self.n_tokens != 1 else ''}"]
        if self.ttft_s is not None:
            parts.append(f"first token {self.ttft_s:.2f} s")
        if self.tok_s is not None:
            parts.append(f"{self.tok_s:.1f} tok/s")
        if self.finish_reason == "length":
            parts.append("stopped at the token limit")
        elif self.finish_reason == "cancelled":
            parts.append("stopped")
        return " · ".join(parts)


@dataclass(frozen=True)
class Prompt:
    """A conversation made ready for one engine: fitted to its context, plus the engine's own payload."""

    messages: tuple[dict, ...]           # what the model sees, after dropping old turns (for logs)
    dropped_turns: int = 0               # user/assistant pairs dropped to fit the context window
    payload: Any = field(default=None, compare=False)   # token ids (local) or messages (remote)
    n_prompt_tokens: int | None = None


class ReplyStream(Protocol):
    """Iterate for text deltas; ``stats`` is final after the iteration ends; ``cancel`` stops the work."""

    stats: ReplyStats

    def __iter__(self) -> Iterator[str]: ...

    def cancel(self) -> None: ...


class Engine(Protocol):
    """One loaded (or remote) model: everything the services and the page use of an engine.

    Implemented by LocalEngine (engines/local.py), ZeroGPUEngine (engines/zerogpu.py), RemoteEngine
    (engines/remote.py) and the start-up placeholder StartingEngine (engines/startup.py);
    tests/test_engine_interface.py checks that each has every member with a compatible signature."""

    name: str                 # display name, unique in the app
    template_name: str        # for logs ("remote" for endpoints)
    default_system: str       # the template's default system prompt
    status: str               # one line for the log and the page: loading, warming up, ready, failed
    capacity: str             # what the engine holds at once (KV cache, conversations), "" if nothing to say
    # The sampling values a request that leaves one out gets from this engine, before the user's flags
    # (services/chat.py puts those over it): the model's recommended values (its generation_config.json, or
    # its row of specs.RECOMMENDED_SAMPLING) and a reply length suited to where it runs (shorter on a CPU;
    # engines/sampling_defaults.py). A remote engine has the built-in SamplingParams().
    defaults: SamplingParams
    # SamplingParams fields this engine cannot honour (e.g. {"repetition_penalty"} on transformers'
    # continuous batching); a request's value for them is ignored and ChatService says so in the reply.
    unsupported_params: frozenset[str]
    # True when ``prepare`` takes messages that end with a partial assistant reply and the model goes on with that
    # same reply (Continue, after a reply cut at the token limit). An endpoint's chat API has no such request.
    continues_replies: bool

    @property
    def ready(self) -> bool:
        """True once requests are served without waiting for start-up."""
        ...

    def warmup(self, progress: Callable[[str], None] = ..., background: bool = False,
               timeout_s: float = ...) -> float:
        """Do the start-up work now (or in the background), report it through ``progress``; -> seconds."""
        ...

    def prepare(self, messages: list[dict], params: SamplingParams) -> Prompt:
        """Fit the conversation to the context window; raise PromptTooLong if the last message cannot fit."""
        ...

    def stream(self, prompt: Prompt, params: SamplingParams) -> ReplyStream: ...

    def close(self) -> None: ...
