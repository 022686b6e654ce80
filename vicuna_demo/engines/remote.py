"""Remote engines: a model served elsewhere behind the OpenAI chat API (vLLM, SGLang, TGI,
``transformers serve``, or OpenAI itself), used exactly like a local model.

``RemoteEngine`` implements ``generation.Engine`` with the official ``openai`` client, so the chat and
comparison tabs, the arena, moderation and the logs cannot tell it from a ``LocalEngine``:

    engine = RemoteEngine(EndpointSpec.parse("name=Llama-70B,base_url=http://gpu:8000/v1,"
                                             "model=meta-llama/Llama-3.1-70B-Instruct,key_env=VLLM_KEY"))
    prompt = engine.prepare(messages, params)       # messages as they are; old turns dropped only with ctx=
    for delta in (reply := engine.stream(prompt, params)):
        print(delta, end="")
    print(reply.stats.summary())                    # tokens (server usage, else chunks), TTFT, tok/s

How it works. Each engine owns one ``AsyncOpenAI`` client and one event-loop thread. ``stream()``
schedules a coroutine on that loop which sends the request (``stream=True``, ``stream_options``
asking for usage; a server that refuses the option is asked again without it) and turns each
chunk into a delta on a queue; the caller's thread iterates the queue. ``cancel()`` (the Stop
button, or the caller walking away) cancels that coroutine, which closes the HTTP response: the
server sees the connection drop and stops generating.

A real service, treated as one: at most ``concurrency`` requests per endpoint are in flight
(``concurrency=N`` in the spec, else ``--endpoint-concurrency``, default 16); the rest wait in the app.
A 429 lowers that limit to what the server was serving when it refused (``Slots``); it creeps back up.
A request refused with 429 or 5xx, or that timed out or could not connect before any text arrived, is
sent again up to ``retries`` times (``retries=N``, default 4) after the server's Retry-After, or an
exponential backoff with jitter (0.5 s doubling to 8 s). Text already shown is never repeated: a
stream that breaks midway is reported, not retried.

Faults never escape their reply (once the retries are spent): an unreachable endpoint, 401/403, 404, 429, 5xx, a timeout, a
stream that breaks midway, ends without a finish reason or sends a chunk that is not a chat
chunk all become one ``EngineError`` that names the endpoint (display name and URL, never the key).

The key is read once, at start-up, from the environment variable named by ``key_env=``; a missing
variable is reported in the log at start-up and in each reply of that model, and the app still
starts. Without ``key_env=`` the placeholder ``EMPTY`` is sent (what vLLM and SGLang expect when they
run without ``--api-key``); OPENAI_API_KEY is never sent to an endpoint implicitly.

Sampling: temperature, top_p and max_tokens are the API's own. The API has no repetition penalty (OpenAI's
frequency_penalty / presence_penalty are different rules), but vLLM, SGLang, TGI and FastChat's servers
read a ``repetition_penalty`` field with transformers' meaning: it is sent in the request body only when
it is not 1.0 (off), so servers that do not know it never see it; one that refuses it gets a reply that
says so. The engine's ``defaults`` are the built-in ones: the model's recommended values live on the server.

Context: the server applies its own chat template and knows its own window. With ``ctx=N`` in the
spec, the oldest exchanges are dropped (never the system prompt) so that the characters of the
conversation stay under ``(N - reply tokens) * CHARS_PER_TOKEN``, a deliberately cautious estimate
because the client has no tokenizer; without ``ctx=``, a server's "too long" refusal is reported
in the reply.
"""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import logging
import os
import queue
import random
import threading
import time
from concurrent.futures import Future
from typing import Any, Iterator, Mapping, Sequence
from urllib.parse import urlsplit, urlunsplit

import openai

from moderation.redaction import scrub

from ..specs import EndpointSpec
from .protocol import EngineError, Prompt, PromptTooLong, ReplyStats, SamplingParams
from .remote_errors import MalformedChunk, describe, server_message

log = logging.getLogger("vicuna_demo.engines.remote")

DEFAULT_TIMEOUT_S = 120.0     # longest silence while waiting for the answer or its next chunk
CONNECT_TIMEOUT_S = 5.0
HEALTH_TIMEOUT_S = 3.0
CHARS_PER_TOKEN = 3           # English averages ~4 characters per token; 3 leaves room for code and other scripts
NO_KEY = "EMPTY"              # sent when the spec names no key variable
DEFAULT_CONCURRENCY = 16      # requests in flight per endpoint (--endpoint-concurrency, concurrency=N)
DEFAULT_RETRIES = 4           # a 429 / 5xx / time-out is sent again up to this many times (retries=N)
BACKOFF_S = 0.5               # first backoff without Retry-After; doubles per retry, with jitter ...
BACKOFF_MAX_S = 8.0           # ... up to this
MAX_RETRY_AFTER_S = 60.0      # a longer Retry-After is reported to the caller instead of waited for
_FINISH_REASONS = {"stop": "stop", "length": "length", "tool_calls": "stop", "function_call": "stop",
                   "content_filter": "content_filter"}


def display_url(base_url: str) -> str:
    """The endpoint's URL as shown to users and logs: no user:password@, no query string."""
    try:
        parts = urlsplit(base_url)
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))
    except ValueError:
        return "the endpoint"


def _read_key(spec: EndpointSpec, environ: Mapping[str, str]) -> tuple[str, str]:
    """-> (key to send, problem to report or '')."""
    if not spec.key_env:
        return NO_KEY, ""
    key = (environ.get(spec.key_env) or "").strip()
    if not key:
        return "", (f"{spec.name}: the environment variable {spec.key_env} (key_env= of its --endpoint) is not set, "
                    f"so no request is sent to {display_url(spec.base_url)}. Set it and restart the app.")
    return key, ""


class Slots:
    """How many requests of one endpoint may be in flight: at most ``ceiling``, and fewer after the server
    answers 429 (the limit drops to what the server was already serving when it refused), creeping back
    up by one after ``limit`` successes in a row. Used on the engine's event loop only."""

    def __init__(self, ceiling: int):
        self.ceiling = self.limit = max(1, ceiling)
        self.busy = 0
        self._successes = 0
        self._changed = asyncio.Condition()

    async def acquire(self) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.busy < self.limit)
            self.busy += 1

    def release(self, *, ok: bool = False, throttled: bool = False) -> None:
        self.busy -= 1
        if throttled:
            self.limit, self._successes = max(1, min(self.limit, self.busy)), 0
        elif ok and self.limit < self.ceiling:
            self._successes += 1
            if self._successes >= self.limit:
                self.limit, self._successes = self.limit + 1, 0
        asyncio.get_running_loop().create_task(self._wake())

    async def _wake(self) -> None:
        async with self._changed:
            self._changed.notify_all()


def retry_after_s(response) -> float | None:
    """The Retry-After header of an HTTP response in seconds (a number or an HTTP date), or None."""
    value = (response.headers.get("retry-after", "") if response is not None else "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time()) if when is not None else None


class RemoteEngine:
    """Implements ``generation.Engine`` for a model behind an OpenAI-compatible chat endpoint."""

    def __init__(self, spec: EndpointSpec, *, environ: Mapping[str, str] | None = None,
                 timeout_s: float | None = None, connect_timeout_s: float = CONNECT_TIMEOUT_S):
        self.spec = spec
        self.name = spec.name
        self.model = spec.model
        self.url = display_url(spec.base_url)
        self.template_name = f"remote: {spec.note}" if spec.note else "remote"
        self.default_system = ""          # no system message: the server's chat template uses its own default
        self.context_window = spec.ctx
        self.timeout_s = float(timeout_s or spec.timeout or DEFAULT_TIMEOUT_S)
        self._key, self.key_problem = _read_key(spec, os.environ if environ is None else environ)
        self._usage_option = True         # cleared when the server refuses stream_options
        self.concurrency = spec.concurrency or DEFAULT_CONCURRENCY
        self.retries = DEFAULT_RETRIES if spec.retries is None else spec.retries
        self.retried = 0                  # requests sent again after a 429 / 5xx / time-out (for reports)
        self._slots = Slots(self.concurrency)
        self._closed = threading.Event()
        self._active: set[Future] = set()
        self._active_lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"remote-{self.name}", daemon=True)
        self._thread.start()
        self._client = openai.AsyncOpenAI(
            api_key=self._key or NO_KEY, base_url=spec.base_url, max_retries=0,
            timeout=openai.Timeout(self.timeout_s, connect=min(connect_timeout_s, self.timeout_s)))

    def __repr__(self) -> str:
        return f"RemoteEngine(name={self.name!r}, url={self.url!r}, model={self.model!r})"

    # -- start-up (nothing to warm up: the server is up or it is not; replies report problems) -------------
    ready = True
    capacity = ""
    defaults = SamplingParams()                      # the server applies its own model's recommendations
    unsupported_params: frozenset[str] = frozenset()  # repetition_penalty goes in the body; the server decides
    continues_replies = False  # the OpenAI chat API cannot continue an assistant message (Engine.continues_replies)

    @property
    def status(self) -> str:
        return f"{self.name}: remote endpoint at {self.url}"

    def warmup(self, progress=lambda message: None, background: bool = False, timeout_s: float = 0.0) -> float:
        return 0.0

    # -- prompt ----------------------------------------------------------------------------
    def max_tokens(self, params: SamplingParams) -> int:
        """The reply length to ask for: the visitor's choice, capped by the spec's max_tokens=."""
        return max(1, min(params.max_new_tokens, self.spec.max_tokens or params.max_new_tokens))

    def prepare(self, messages: list[dict], params: SamplingParams) -> Prompt:
        """Messages as the server wants them; with ``ctx=``, drop the oldest exchanges to fit a character budget."""
        clean = [{"role": str(m["role"]), "content": str(m.get("content") or "")} for m in messages]
        system = [m for m in clean[:1] if m["role"] == "system"]
        turns = clean[len(system):]
        if system and not system[0]["content"].strip():
            system = []  # an empty system prompt would override the server template's default one
        dropped = 0
        if self.context_window:
            reserve = min(self.max_tokens(params), self.context_window // 4 * 3)
            budget = (self.context_window - reserve) * CHARS_PER_TOKEN
            while sum(len(m["content"]) for m in system + turns) > budget:
                if len(turns) <= 1:
                    size = sum(len(m["content"]) for m in system + turns)
                    raise PromptTooLong(
                        f"This message is too long for {self.name}: it has {size:,} characters, and the model's "
                        f"context window leaves room for about {budget:,}. Please shorten it.")
                turns = turns[2:]
                dropped += 1
        kept = system + turns
        return Prompt(messages=tuple(kept), dropped_turns=dropped, payload=[dict(m) for m in kept])

    # -- generation --------------------------------------------------------------------------
    def stream(self, prompt: Prompt, params: SamplingParams) -> "RemoteReply":
        if self._closed.is_set():
            raise EngineError(f"{self.name} is shutting down.")
        if self.key_problem:
            raise EngineError(self.key_problem)
        request = dict(model=self.model, messages=list(prompt.payload), stream=True,
                       temperature=0.0 if params.greedy else float(params.temperature),
                       top_p=float(params.top_p), max_tokens=self.max_tokens(params))
        if params.repetition_penalty != 1.0:   # not an OpenAI field: only when asked for (module docstring)
            request["extra_body"] = {"repetition_penalty": float(params.repetition_penalty)}
        reply = RemoteReply(self)
        future = asyncio.run_coroutine_threadsafe(self._pump(request, reply._inbox.put, reply), self._loop)
        reply._future = future
        with self._active_lock:
            self._active.add(future)
        future.add_done_callback(self._forget)
        return reply

    def _forget(self, future: Future) -> None:
        with self._active_lock:
            self._active.discard(future)

    async def _open(self, request: dict):
        if self._usage_option:
            try:
                return await self._client.chat.completions.create(
                    **request, stream_options={"include_usage": True})
            except (openai.BadRequestError, openai.UnprocessableEntityError) as exc:
                if "stream_options" not in server_message(exc):
                    raise
                self._usage_option = False
                log.info("%s: the endpoint refuses stream_options; token counts will come from the chunks", self.name)
        return await self._client.chat.completions.create(**request)

    async def _pump(self, request: dict, put, reply: "RemoteReply") -> None:
        """Send the request and put ("delta", text, t) / ("usage", n, t) / ("end", reason, t) / ("error", msg, t).

        At most ``concurrency`` requests of this engine are in flight; the others wait their turn. A
        request refused with 429 or 5xx, or that timed out or could not connect, is sent again after a
        backoff (the server's Retry-After when it gives one), up to ``retries`` times, as long as no text
        has reached the caller (a reply is never repeated)."""
        for attempt in itertools.count():
            progress = {"opened": False, "sent": False}
            reply._waiting = True
            await self._slots.acquire()
            reply._waiting = False
            try:
                await self._stream_once(request, put, progress)
                self._slots.release(ok=True)
                return
            except asyncio.CancelledError:
                self._slots.release()
                raise
            except Exception as exc:  # noqa: BLE001 - every fault becomes this reply's message
                self._slots.release(throttled=isinstance(exc, openai.RateLimitError))
                delay = None if progress["sent"] else self.retry_delay(exc, attempt)
                if delay is None:
                    message = self.describe_error(exc, midway=progress["opened"])
                    log.warning("%s", message)
                    put(("error", message, time.perf_counter()))
                    return
                log.info("%s at %s: %s; retry %d of %d in %.1f s", self.name, self.url, type(exc).__name__,
                         attempt + 1, self.retries, delay)
            reply._waiting = True
            self.retried += 1
            await asyncio.sleep(delay)

    async def _stream_once(self, request: dict, put, progress: dict) -> None:
        stream = None
        finish = None
        try:
            stream = await self._open(request)
            progress["opened"] = True
            async for chunk in stream:
                text, reason, n_tokens = self._read_chunk(chunk)
                now = time.perf_counter()
                if text:
                    progress["sent"] = True
                    put(("delta", text, now))
                if n_tokens is not None:
                    put(("usage", n_tokens, now))
                finish = reason or finish
            if finish is None:
                raise MalformedChunk("the stream ended before the reply was complete (no finish_reason)")
            put(("end", finish, time.perf_counter()))
        finally:
            if stream is not None:
                try:
                    await stream.close()
                except Exception:  # noqa: BLE001 - the connection is gone either way
                    pass

    def retry_delay(self, exc: BaseException, attempt: int) -> float | None:
        """Seconds to wait before sending a failed request again, or None (do not retry): 429, 5xx, time-outs
        and connection errors are retried ``retries`` times, after the server's Retry-After when it gives
        one (up to MAX_RETRY_AFTER_S; a longer wait is reported instead), else after an exponential backoff
        with jitter."""
        if attempt >= self.retries:
            return None
        status = getattr(exc, "status_code", None)
        if not (isinstance(exc, (openai.RateLimitError, openai.APIConnectionError))
                or (isinstance(exc, openai.APIStatusError) and isinstance(status, int) and status >= 500)):
            return None
        after = retry_after_s(getattr(exc, "response", None))
        if after is not None:
            return after if after <= MAX_RETRY_AFTER_S else None
        return min(BACKOFF_MAX_S, BACKOFF_S * 2 ** attempt) * random.uniform(0.5, 1.0)

    @staticmethod
    def _read_chunk(chunk: Any) -> tuple[str, str | None, int | None]:
        """-> (text, finish reason or None, completion tokens if the chunk carries usage)."""
        usage = getattr(chunk, "usage", None)
        n_tokens = getattr(usage, "completion_tokens", None) if usage is not None else None
        if n_tokens is not None and not isinstance(n_tokens, int):
            raise MalformedChunk("usage.completion_tokens is not a number")
        choices = getattr(chunk, "choices", None)
        if not isinstance(choices, list) or (not choices and usage is None):
            raise MalformedChunk("a chunk without choices")
        text, finish = "", None
        for choice in choices[:1]:  # one completion was asked for
            delta = getattr(choice, "delta", None)
            content = getattr(delta, "content", None) if delta is not None else None
            if content is not None and not isinstance(content, str):
                raise MalformedChunk("delta.content is not text")
            text = content or ""
            reason = getattr(choice, "finish_reason", None)
            if reason is not None:
                finish = _FINISH_REASONS.get(str(reason), str(reason))
        return text, finish, n_tokens

    def describe_error(self, exc: BaseException, *, midway: bool = False) -> str:
        """One line for the user: which endpoint, what went wrong, what to do. Never contains the key."""
        return self._redact(describe(exc, who=f"{self.name} at {self.url}", key_env=self.spec.key_env,
                                     model=self.model, timeout_s=self.timeout_s, midway=midway))

    def _redact(self, text: str) -> str:
        return scrub(text, (self._key,) if self._key and self._key != NO_KEY else (), limit=2000)

    # -- health --------------------------------------------------------------------------------
    def check(self, timeout_s: float = HEALTH_TIMEOUT_S) -> tuple[bool, str]:
        """GET {base_url}/models once -> (ok, one line for the log). Never raises."""
        if self.key_problem:
            return False, self.key_problem
        try:
            future = asyncio.run_coroutine_threadsafe(self._list_models(timeout_s), self._loop)
            ids = future.result(timeout=timeout_s + 2)
        except Exception as exc:  # noqa: BLE001
            return False, self.describe_error(exc)
        if ids and self.model not in ids:
            return False, (f"{self.name} at {self.url} is reachable but does not list model {self.model!r} "
                           f"(it lists {', '.join(sorted(ids)[:5])}{'…' if len(ids) > 5 else ''}).")
        return True, f"{self.name} at {self.url} is reachable and serves {self.model!r}."

    async def _list_models(self, timeout_s: float) -> list[str]:
        page = await self._client.with_options(timeout=timeout_s).models.list()
        return [str(getattr(m, "id", "")) for m in (getattr(page, "data", None) or [])]

    # -- life cycle ------------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        with self._active_lock:
            active = list(self._active)
        for future in active:
            future.cancel()
        try:
            asyncio.run_coroutine_threadsafe(self._client.close(), self._loop).result(timeout=5)
        except Exception:  # noqa: BLE001
            log.debug("%s: closing the HTTP client failed", self.name, exc_info=True)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


class RemoteReply:
    """One streaming reply; iterate it once. ``cancel()`` may be called from any thread."""

    def __init__(self, engine: RemoteEngine):
        self.stats = ReplyStats()
        self._engine = engine
        self._inbox: queue.Queue = queue.Queue()
        self._submitted = time.perf_counter()
        self._future: Future | None = None
        self._cancelled = threading.Event()
        self._waiting = False             # queued behind the endpoint's concurrency limit, or backing off

    def cancel(self) -> None:
        """Close the HTTP stream (the server stops generating) and end the iteration."""
        if self._cancelled.is_set():
            return
        self._cancelled.set()
        if self._future is not None:
            self._future.cancel()
        self._inbox.put(("wake", None, 0.0))

    def __iter__(self) -> Iterator[str]:
        engine, stats = self._engine, self.stats
        first_at = None
        usage = None
        # The pump always ends with "end" or "error" (its HTTP timeouts see to it); this is a last resort.
        patience = engine.timeout_s * 2 + 30
        try:
            while True:
                if self._cancelled.is_set():
                    stats.finish_reason = "cancelled"
                    return
                try:
                    kind, value, at = self._inbox.get(timeout=patience)
                except queue.Empty:
                    if self._waiting:      # waiting for its turn or its retry is not silence
                        continue
                    raise EngineError(f"{engine.name} ({engine.url}) stopped answering; the reply was abandoned.") \
                        from None
                if kind == "delta":
                    if first_at is None:
                        first_at = at
                        stats.ttft_s = at - self._submitted
                    stats.n_tokens += 1
                    stats.decode_s = at - first_at
                    yield value
                elif kind == "usage":
                    usage = value
                elif kind == "end":
                    if usage is not None:
                        stats.n_tokens = usage
                    stats.finish_reason = value
                    return
                elif kind == "error":
                    raise EngineError(value)
        except EngineError as exc:
            stats.finish_reason, stats.error = "error", str(exc)
            raise
        finally:
            if stats.finish_reason is None:  # the consumer went away (closed generator)
                stats.finish_reason = "cancelled"
                self.cancel()


def start_remote_engines(specs: Sequence[EndpointSpec], *, environ: Mapping[str, str] | None = None,
                         check: bool = True, timeout_s: float = HEALTH_TIMEOUT_S) -> dict[str, RemoteEngine]:
    """One engine per ``--endpoint``. Missing key variables are logged; the start-up check runs on the
    other endpoints at once and only logs: the app starts whatever it finds."""
    engines = {spec.name: RemoteEngine(spec, environ=environ) for spec in specs}
    results: dict[str, tuple[bool, str]] = {n: (False, e.key_problem) for n, e in engines.items() if e.key_problem}
    if check:
        to_check = [e for n, e in engines.items() if n not in results]
        threads = [threading.Thread(target=lambda e=e: results.__setitem__(e.name, e.check(timeout_s)), daemon=True)
                   for e in to_check]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout_s + 5)
        for engine in to_check:
            late = f"{engine.name} at {engine.url} did not answer GET /models in time."
            results.setdefault(engine.name, (False, late))
    for name, (ok, message) in results.items():
        if ok:
            log.info("start-up check: %s", message)
        else:
            log.warning("start-up check: %s The app starts anyway; replies from this model will report the "
                        "problem.", message)
    return engines
