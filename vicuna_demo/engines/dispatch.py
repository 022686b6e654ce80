"""The one path from text to an engine: chat, the judge button and evaluation all send work through ``Dispatcher.send``.

    dispatcher = Dispatcher(engines, moderate=moderator.check, flags={"temperature": 0.5}, timeout_s=600)
    reply = dispatcher.send("Vicuna-7B", messages, params, new_text=[message], cancel=token)
    for delta in reply:             # clean text deltas; Stop, a closed page or the timeout end the request
        ...
    reply.stats                     # tokens, time to first token, finish reason ("stop", "length", "cancelled")
    reply.notices                   # what the visitor should know: dropped turns, a parameter the engine ignored

The rules, the same whatever sends the work (services/chat.py for the chat and side-by-side tabs,
services/judge.py for "Ask the judge", evaluation/runner.py for the page's Evaluate tab and the CLI):

- the engine is found by name (``UnknownModel`` otherwise);
- moderation: the text that is new to the model is checked with the one ``moderate`` rule the dispatcher
  holds (or a verdict the caller already has is given in); a disallowed verdict raises ``Blocked`` before
  the engine sees anything;
- sampling: ``defaults_for(model)`` is the engine's own ``defaults`` (the model's recommended values) under
  the user's flags, the reply length capped; at send time the fields the engine cannot apply are put back to
  their built-in values and reported (``reply.ignored``, a sentence in ``reply.notices``);
- the prompt is fitted to the model's context (``PromptTooLong`` when the last message cannot fit; dropped
  old exchanges are reported);
- one ``CancelToken`` per request: the caller's Stop (its token), a closed page (the consumer stops iterating)
  and the timeout all trip it, and tripping it cancels the engine's request at once; a timed-out request
  raises ``EngineError`` (what it streamed before stays with the caller);
- the reply's first text loses the leading whitespace a template leaves ("ASSISTANT:" then " Hello"),
  unless the model continues a reply of its own;
- no retries here: an endpoint's engine retries 429 / 5xx itself (engines/remote.py), so a request is never
  retried twice.

It lives among the engines so that the services and the evaluation (which sits below the services) can both
reach it; it knows nothing of them: the moderation rule is a callable handed in (text -> a verdict with
``allowed``), and the services keep their own logging, gates and output moderation.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any, Callable, Iterator, Mapping, Sequence

from .protocol import Engine, EngineError, Prompt, ReplyStats, SamplingParams

log = logging.getLogger("vicuna_demo.engines.dispatch")

DEFAULT_TIMEOUT_S = 600.0
UNSUPPORTED_NOTICE = ("{model} cannot apply a {what} (its back end has none); this reply was generated "
                      "without it.")
DROPPED_NOTICE = ("The conversation was longer than {model}'s context window: the oldest {n} exchange(s) were "
                  "left out (the system prompt was kept).")
FIELD_WORDS = {"repetition_penalty": "repetition penalty", "temperature": "temperature", "top_p": "top_p",
               "max_new_tokens": "reply length"}


class CancelToken:
    """Stops work from another thread: Stop (another event of the same visitor), a closed page, a timeout.

    ``bind(callback)`` runs ``callback`` when the token is cancelled (at once if it already is) and returns a
    function that unbinds it (a finished request no longer needs stopping); ``arm()`` makes it usable again."""

    def __init__(self):
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []
        self._cancelled = False

    def __deepcopy__(self, memo):  # gradio deep-copies a session's initial state: give it its own token
        return CancelToken()

    def arm(self) -> None:
        with self._lock:
            self._cancelled, self._callbacks = False, []

    def bind(self, callback: Callable[[], None]) -> Callable[[], None]:
        with self._lock:
            if not self._cancelled:
                self._callbacks.append(callback)
                return lambda: self._unbind(callback)
        callback()
        return lambda: None

    def _unbind(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

    def cancel(self) -> None:
        with self._lock:
            self._cancelled, callbacks, self._callbacks = True, self._callbacks, []
        for callback in callbacks:
            callback()

    @property
    def cancelled(self) -> bool:
        return self._cancelled


class UnknownModel(EngineError):
    """No engine has that name; the message lists the ones there are."""


class Blocked(Exception):
    """Moderation disallowed the text new to the model; nothing was sent. ``verdict`` says why."""

    def __init__(self, verdict):
        super().__init__(getattr(verdict, "notice", "") or "blocked by content moderation")
        self.verdict = verdict


class Reply:
    """One request on its way to an engine (``Dispatcher.send``): iterate it once for the text deltas."""

    def __init__(self, engine: Engine, prompt: Prompt, params: SamplingParams, ignored: list[str],
                 notices: list[str], *, continuing: bool, timeout_s: float | None, cancel: CancelToken | None):
        self.engine, self.prompt, self.params = engine, prompt, params
        self.ignored, self.notices = ignored, notices
        self.timeout_s = timeout_s
        self.timed_out = False
        self._continuing = continuing
        self._token = CancelToken()                     # this request's own: Stop, the timeout, a closed page
        self._stream = engine.stream(prompt, params)
        self._token.bind(self._stream.cancel)
        self._unbind = cancel.bind(self._token.cancel) if cancel is not None else (lambda: None)
        self._timer = None
        self._deltas: Iterator[str] | None = None
        if timeout_s:
            self._timer = threading.Timer(timeout_s, self._expire)
            self._timer.daemon = True
            self._timer.start()

    @property
    def stats(self) -> ReplyStats:
        return self._stream.stats

    @property
    def cancelled(self) -> bool:
        return self._token.cancelled

    def cancel(self) -> None:
        """End the request on its engine now (from any thread)."""
        self._token.cancel()

    def _expire(self) -> None:
        self.timed_out = True
        self._token.cancel()

    def __iter__(self) -> Iterator[str]:
        if self._deltas is None:
            self._deltas = self._iterate()
        return self._deltas

    def close(self) -> None:
        """The consumer is done (e.g. it was closed itself): end the request if it still runs."""
        if self._deltas is not None:
            self._deltas.close()
        self._finish(None)

    def _finish(self, stream) -> None:
        """However the request ends (once is enough; again is harmless): no timer, no Stop bound to it, and a
        request its consumer left is cancelled on the engine."""
        if self._timer is not None:
            self._timer.cancel()
        self._unbind()
        if self.stats.finish_reason is None:            # the consumer went away (a closed page): end it there too
            self._token.cancel()
            close = getattr(stream, "close", None)
            if close is not None:
                close()
            if self.stats.finish_reason is None:
                self.stats.finish_reason = "cancelled"

    def _iterate(self) -> Iterator[str]:
        first = not self._continuing
        stream = iter(self._stream)
        try:
            for delta in stream:
                if first:
                    delta = delta.lstrip()   # "ASSISTANT:" leaves the model's first space in the reply
                    if not delta:
                        continue
                    first = False
                yield delta
        finally:
            self._finish(stream)
        if self.timed_out and self.stats.finish_reason == "cancelled":
            message = f"no complete reply within {self.timeout_s:g} s (timed out)"
            self.stats.finish_reason, self.stats.error = "error", message
            raise EngineError(message)

    def text(self) -> str:
        """The whole reply (iterates the stream)."""
        return "".join(self)


class Dispatcher:
    """See the module docstring. Shared by every visitor and route (thread-safe; holds no visitor data).

    ``engines`` is held as given (not copied): a model added to the mapping later is found. ``moderate`` is the
    app's rule (text -> verdict with ``allowed``), None when every text is trusted (an operator's command line).
    ``fallback`` is what a model whose engine reports no defaults starts from; ``flags`` are the user's sampling
    flags (field -> value), over every model's defaults."""

    def __init__(self, engines: Mapping[str, Engine], *, moderate: Callable[[str], Any] | None = None,
                 flags: Mapping[str, float | int] | None = None, fallback: SamplingParams | None = None,
                 max_new_tokens_cap: int | None = None, timeout_s: float | None = DEFAULT_TIMEOUT_S):
        self.engines = engines
        self.moderate = moderate
        self.flags = {k: v for k, v in (flags or {}).items() if v is not None}
        self.fallback = fallback or SamplingParams()
        self.max_new_tokens_cap = max_new_tokens_cap
        self.timeout_s = timeout_s

    # -- the rules ----------------------------------------------------------------------------------------
    def engine(self, model: str) -> Engine:
        engine = self.engines.get(model) if isinstance(model, str) else None
        if engine is None:
            raise UnknownModel(f"Unknown model {model!r}; choose one of: {', '.join(self.engines)}.")
        return engine

    def check(self, texts: Sequence[str]):
        """The moderation verdict on ``texts`` (checked as one input); None when there is no rule or no text."""
        joined = "\n\n".join(t for t in texts if t and t.strip())
        if self.moderate is None or not joined:
            return None
        return self.moderate(joined)

    def unsupported(self, model: str | None) -> frozenset[str]:
        """SamplingParams fields ``model``'s engine cannot apply."""
        engine = self.engines.get(model) if isinstance(model, str) else None
        return engine.unsupported_params if engine is not None else frozenset()

    def defaults_for(self, model: str | None) -> SamplingParams:
        """What ``model`` uses for a value a request leaves out: its engine's defaults (the model's recommended
        values, a reply length suited to its device) with the user's flags over them, the reply length capped.
        A field the engine cannot apply keeps the built-in value. An unknown model (or None): ``fallback``."""
        engine = self.engines.get(model) if isinstance(model, str) else None
        params = (engine.defaults if engine is not None else self.fallback).overridden(self.flags)
        params = params.without(self.unsupported(model))     # a flag the engine cannot apply is dropped too
        if self.max_new_tokens_cap is not None:
            params = dataclasses.replace(params, max_new_tokens=min(params.max_new_tokens, self.max_new_tokens_cap))
        return params

    @staticmethod
    def applicable(engine: Engine, params: SamplingParams) -> tuple[SamplingParams, list[str]]:
        """``params`` without what ``engine`` cannot apply (built-in values instead), and the fields a request
        asked for in vain (e.g. a repetition penalty on continuous batching)."""
        unsupported = sorted(engine.unsupported_params)
        applicable = params.without(unsupported)
        ignored = [f for f in unsupported if getattr(params, f) != getattr(applicable, f)]
        if ignored:
            log.info("%s cannot apply %s; ignored for this request", engine.name,
                     ", ".join(f"{f}={getattr(params, f)}" for f in ignored))
        return applicable, ignored

    # -- the one path -------------------------------------------------------------------------------------
    def send(self, model: str, messages: Sequence[dict], params: SamplingParams, *, new_text: Sequence[str] = (),
             verdict=None, cancel: CancelToken | None = None, timeout_s: float | None = ...) -> Reply:
        """Send ``messages`` to ``model`` and return the ``Reply`` to iterate (see the module docstring).

        ``new_text``: what in ``messages`` no moderation has seen yet (checked here); ``verdict``: a verdict the
        caller already has on it. ``cancel``: the caller's token (Stop); ``timeout_s``: this request's limit
        (``...`` = the dispatcher's, None = none). Raises Blocked, UnknownModel, PromptTooLong, EngineError."""
        if verdict is None:
            verdict = self.check(new_text)
        if verdict is not None and not getattr(verdict, "allowed", True):
            raise Blocked(verdict)
        engine = self.engine(model)
        messages = list(messages)
        prompt = engine.prepare(messages, params)       # a model still loading is there after this
        params, ignored = self.applicable(engine, params)
        notices = [DROPPED_NOTICE.format(model=model, n=prompt.dropped_turns)] if prompt.dropped_turns else []
        notices += [UNSUPPORTED_NOTICE.format(model=model, what=FIELD_WORDS.get(f, f)) for f in ignored]
        continuing = bool(messages) and messages[-1].get("role") == "assistant"
        return Reply(engine, prompt, params, ignored, notices, continuing=continuing,
                     timeout_s=self.timeout_s if timeout_s is ... else timeout_s, cancel=cancel)
