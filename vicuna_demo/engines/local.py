"""The local engine: one per loaded model, serving every visitor's requests together.

A back end (engines/backends.py) runs the model on ONE background thread per model that does all GPU
(or CPU) work, so concurrent replies share each forward pass instead of queueing behind a lock, and
CUDA graphs always run on the thread that captured them (gradio calls handlers from worker threads):

- ``fast`` (``fastpath/``, the default for the architectures of ``fastpath/arch.py``): a paged KV cache,
  batched prefill, one CUDA graph per batch size with fused Triton kernels on a GPU, a lean loop on a CPU,
  and the previous turn's KV reused for the next turn of a conversation.
- ``cb``: transformers' continuous-batching manager (any model transformers can batch); also the
  fallback when the fast path cannot start. When neither can, the engine says so once in its status
  and every request gets that error (no restart loop).

Each reply (``LocalReply``, the shared loop in replies.py) turns token ids into clean text deltas and
cancels its request when a stop string appears or the user presses Stop, so the model stops working
on it too. Warm-up (cache allocation, CUDA-graph capture, short requests) happens at start-up;
``engine.status`` says where it is, for the log and the page.

    engine = start_engine(loaded_model)               # see loading.py; LocalEngine, or ZeroGPUEngine with spaces
    engine.warmup(progress=print)                     # or warmup(background=True) and show engine.status
    prompt = engine.prepare(messages, params)         # template + context fitting
    for delta in (reply := engine.stream(prompt, params)):
        print(delta, end="")
    print(reply.stats.summary())
"""

from __future__ import annotations

import gc
import itertools
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import torch

from ..loading import LoadedModel
from .backends import Backend, BatchingBackend
from .fastpath import FastModel, FastOptions, FastScheduler, Job, unsupported_reason
from .memory import TYPICAL_CONVERSATION_TOKENS, conversations
from .prompting import PromptingModel
from .protocol import EngineError, Prompt, SamplingParams
from .replies import TokenReply, fail_message

log = logging.getLogger("vicuna_demo.engines.local")

# How long a reply waits for its next token before it checks that the engine is still alive.
_POLL_S = 0.5


@dataclass(frozen=True)
class EngineOptions:
    """Which back end runs the model, and its knobs (see fastpath.FastOptions, ContinuousBatchingConfig)."""

    backend: str = "auto"                     # "auto": fast path where the model allows it, else "cb"; "fast"; "cb"
    max_batch_requests: int | None = None     # None: 64 on a GPU, 8 on a CPU (fast); inferred (cb)
    kv_blocks: int | None = None              # KV-cache blocks (either back end); None: planned or from free memory
    kv_bytes: int | None = None               # KV-cache bytes: this engine's share in the start-up plan (memory.py)
    page_size: int = 256                      # cb: tokens per KV-cache page
    use_cuda_graph: bool | None = None        # None: transformers decides (on for CUDA)
    compile_level: int = 0                    # 0 = eager; up to 3 (longer warm-up, faster steps)
    first_token_timeout_s: float = 600.0      # a request still queued after this is failed
    token_timeout_s: float = 120.0            # a running request silent this long is failed
    triton_kernels: bool = True               # fast path on CUDA: fused Triton kernels (needed for CUDA graphs)
    prefix_cache: bool = True                 # fast path: reuse the previous turn's KV cache
    quant_kernels: bool = True                # fast path, 8-bit and 4-bit: our kernels over bitsandbytes' weights
    tune_dense_gemv: bool = True              # fast path: time our GEMV against cuBLAS for fp16 weights at warm-up
    cpu_threads: int | None = None            # fast path on CPU: intra-op threads of the engine thread

    def fast_options(self) -> FastOptions:
        return FastOptions(max_rows=self.max_batch_requests, cuda_graphs=self.use_cuda_graph is not False,
                           kernels=self.triton_kernels, prefix_cache=self.prefix_cache, kv_blocks=self.kv_blocks,
                           quant_kernels=self.quant_kernels, tune_dense=self.tune_dense_gemv,
                           cpu_threads=self.cpu_threads)


class LocalEngine(PromptingModel):
    """Implements ``protocol.Engine`` for a model loaded in this process.

    ``start=False`` builds the engine without starting its back end (the start-up plan first measures
    ``measure_reserve()`` and hands each engine its KV share through ``start(kv_bytes=...)``); ``warmup``
    and the first request start it otherwise."""

    def __init__(self, loaded: LoadedModel, options: EngineOptions | None = None, *, start: bool = True):
        super().__init__(loaded)
        self.options = options or EngineOptions()
        self._counter = itertools.count()
        self._closed = threading.Event()
        self._start_lock = threading.Lock()
        self._backend: Backend | None = None
        self._failed: str | None = None
        self.status = f"{self.name}: waiting to start"
        self._progress: Callable[[str], None] = lambda message: None
        self._runner: FastModel | None = None
        self.backend = self._choose_backend()
        if self.backend == "fast":
            try:
                with torch.no_grad():
                    self._runner = FastModel(self.model, self.context_window, self.options.fast_options())
            except Exception as exc:  # noqa: BLE001 - any surprise: the general back end serves
                log.warning("%s: fast path unavailable (%s); using continuous batching", self.name, exc)
                self.backend = "cb"
        if self.backend == "cb" and loaded.sampling.get("repetition_penalty", 1.0) != 1.0:
            log.info("%s: the model recommends repetition_penalty %s, which continuous batching cannot apply; "
                     "its replies are generated without it", self.name, loaded.sampling["repetition_penalty"])
        if start:
            self.start()

    def _choose_backend(self) -> str:
        wanted = self.options.backend
        if wanted == "cb":
            return "cb"
        reason = unsupported_reason(self.model)
        if reason:
            if wanted == "fast":
                log.warning("%s: the fast path does not support this model (%s); using continuous batching",
                            self.name, reason)
            return "cb"
        return "fast"

    @property
    def unsupported_params(self) -> frozenset[str]:
        """transformers' continuous batching has no repetition penalty (its per-request processors are temperature,
        top_p and top_k only); the fast path applies every field."""
        return frozenset({"repetition_penalty"}) if self.backend == "cb" else frozenset()

    # -- memory (for the start-up plan, engines/memory.py) ----------------------------------------------
    @property
    def kv_per_token(self) -> int:
        cfg = self.model.config.get_text_config()
        heads = int(cfg.num_attention_heads)
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        element = 2 if self.model.dtype in (torch.float16, torch.bfloat16, torch.int8) else 4
        return 2 * int(cfg.num_hidden_layers) * kv_heads * head_dim * element

    def useful_kv_bytes(self) -> int:
        """The most KV memory this engine can use (a full batch at the full context)."""
        if self._runner is not None:
            return self._runner.useful_kv_bytes()
        return (self.options.max_batch_requests or 64) * (self.context_window + 1) * self.kv_per_token

    def measure_reserve(self) -> int | None:
        """Bytes this engine needs free besides weights and KV cache, measured now (fast path on CUDA), or
        None where it cannot be measured (CPU, continuous batching: the plan's estimate stands)."""
        if self._runner is None or not self._runner.cuda or self._backend is not None:
            return None
        return self._runner.measure_activation_peak()

    @property
    def kv_tokens(self) -> int | None:
        """Tokens of conversation the KV cache holds, once the back end is ready."""
        backend = self._backend
        return backend.kv_tokens if backend is not None and self.ready else None

    @property
    def capacity(self) -> str:
        """The page's capacity line, e.g. ``KV cache 19,840 tokens: ~9 conversations of 2,048 tokens at once``."""
        tokens = self.kv_tokens
        if not tokens:
            return ""
        runner, typical = self._runner, TYPICAL_CONVERSATION_TOKENS
        if runner is not None and runner.n_blocks:    # whole blocks per request, at most a batch of rows
            at_once = min(runner.max_rows, (runner.n_blocks - 1) // -(-typical // runner.block))
        else:
            at_once = conversations(tokens)
        return f"KV cache {tokens:,} tokens: ~{at_once:,} conversations of {typical:,} tokens at once"

    # -- start-up -------------------------------------------------------------------------------------
    def start(self, kv_bytes: int | None = None) -> None:
        """Start the back end (idempotent); ``kv_bytes`` is this engine's KV share in the start-up plan."""
        with self._start_lock:
            if self._backend is not None or self._closed.is_set():
                return
            if kv_bytes is not None:
                self.options = replace(self.options, kv_bytes=kv_bytes)
            if self._runner is not None:
                self._backend = FastScheduler(self._runner, name=self.name, kv_bytes=self.options.kv_bytes)
            else:
                self._backend = self._batching()
            self._set_status(f"{self.name}: starting ({self.backend} back end)")
            self._backend.start(self._set_status)

    def _batching(self) -> BatchingBackend:
        o = self.options
        return BatchingBackend(self.model, self.tokenizer, self._eos_ids, name=self.name,
                               context_window=self.context_window, page_size=o.page_size,
                               max_batch_requests=o.max_batch_requests, kv_blocks=o.kv_blocks, kv_bytes=o.kv_bytes,
                               use_cuda_graph=o.use_cuda_graph, compile_level=o.compile_level)

    def _set_status(self, message: str) -> None:
        self.status = message
        log.info(message)
        try:
            self._progress(message)
        except Exception:  # noqa: BLE001 - a progress display must not break the engine
            log.debug("progress callback failed", exc_info=True)

    @property
    def ready(self) -> bool:
        return self.status.startswith(f"{self.name}: ready")

    def warmup(self, progress=lambda message: None, background: bool = False, timeout_s: float = 1800.0,
               trial_requests: bool = True) -> float:
        """Start the back end, allocate, capture CUDA graphs and run short requests now, not in a user's reply.

        Progress goes to ``progress`` and to ``self.status``. With ``background=True`` this returns at once
        (early requests wait for the warm-up, bounded by ``first_token_timeout_s``). ``trial_requests=False``
        (--no-warmup) only waits for the back end. Returns the seconds spent (0.0 when backgrounded).
        Raises EngineError if the model cannot be served at all."""
        self._progress = progress
        if background:
            threading.Thread(target=self._warmup_quietly, args=(timeout_s, trial_requests),
                             name=f"warmup-{self.name}", daemon=True).start()
            return 0.0
        return self._warmup(timeout_s, trial_requests)

    def _warmup_quietly(self, timeout_s: float, trial_requests: bool) -> None:
        try:
            self._warmup(timeout_s, trial_requests)
        except Exception:  # noqa: BLE001 - the status says it; requests report their own errors
            log.debug("%s: background warm-up failed", self.name, exc_info=True)

    def _warmup(self, timeout_s: float, trial_requests: bool = True) -> float:
        started = time.perf_counter()
        try:
            self.start()
            self._set_status(f"{self.name}: warming up ({self.backend} back end)")
            self._serving_backend(timeout_s)
            for params in (SamplingParams(temperature=0, max_new_tokens=4),
                           SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=4))[:2 if trial_requests else 0]:
                prompt = self.prepare([{"role": "user", "content": "Hello"}], params)
                for _ in self.stream(prompt, params):
                    pass
        except Exception as exc:  # noqa: BLE001 - shown as the status; requests report their own errors
            if not self._failed:
                self._set_status(f"{self.name}: warm-up failed ({exc})")
            raise
        elapsed = time.perf_counter() - started
        # The model, tokenizer and caches are long-lived: move them out of the garbage collector's view, or each
        # full collection walks them all (0.2-0.3 s pauses, every token of every reply waiting meanwhile).
        gc.freeze()
        problem = self._runner.kernel_problem if self._runner is not None else None
        self._set_status(f"{self.name}: ready ({elapsed:.1f} s warm-up, {self.backend} back end"
                         f"{', eager ops: ' + problem if problem else ''})")
        return elapsed

    def _serving_backend(self, timeout_s: float | None = None) -> Backend:
        """The back end to send requests to: the fast path, or continuous batching once the fast path could not
        start (say, a kernel this GPU cannot run); raises EngineError once neither can serve."""
        backend = self._backend
        if timeout_s is not None:
            try:
                backend.wait_ready(timeout_s)
            except Exception:  # noqa: BLE001 - handled below through warm_error
                pass
        if backend.kind == "fast" and backend.warm_error is not None:
            with self._start_lock:
                if self._backend is backend:
                    log.warning("%s: the fast path could not start (%s); using continuous batching",
                                self.name, backend.warm_error)
                    backend.close()
                    self._runner, self.backend = None, "cb"
                    self._backend = self._batching()
                    self._backend.start(self._set_status)
            backend = self._backend
            if timeout_s is not None:
                try:
                    backend.wait_ready(timeout_s)
                except Exception:  # noqa: BLE001
                    pass
        if backend.warm_error is not None:
            if not self._failed:
                what, why = getattr(backend, "failure", None) or ("could not start", _first_line(backend.warm_error))
                self._failed = f"{self.name} {what}: {why}"
                self._set_status(f"{self.name}: {what} ({why})")
            raise EngineError(self._failed)
        return backend

    # -- generation -------------------------------------------------------------------------------------
    def stream(self, prompt: Prompt, params: SamplingParams) -> "LocalReply":
        if self._closed.is_set():
            raise EngineError(f"{self.name} is shutting down.")
        if self._failed:
            raise EngineError(self._failed)
        self.start()
        ids = list(prompt.payload)
        max_new = max(1, min(params.max_new_tokens, self.context_window - len(ids)))
        reply = LocalReply(self, f"{uuid.uuid4().hex[:8]}-{next(self._counter)}", max_new)
        job = Job(request_id=reply.request_id, ids=ids, max_new=max_new,
                  temperature=0.0 if params.greedy else float(params.temperature),
                  top_p=1.0 if params.greedy else float(params.top_p), eos=frozenset(self._eos_ids), emit=reply.push,
                  repetition_penalty=float(params.repetition_penalty))
        backend = self._serving_backend()
        try:
            backend.submit(job)
        except RuntimeError as exc:
            if isinstance(exc, EngineError):
                raise
            raise EngineError(f"{self.name} is shutting down.") from exc
        return reply

    def held_request_ids(self) -> set[str]:
        """Requests the back end still holds (queued, waiting or being decoded): for tests and monitoring."""
        return self._backend.held_request_ids() if self._backend is not None else set()

    @property
    def measured_peaks(self) -> dict:
        """Bytes of the activation peaks measured for the start-up plan ({"prefill", "decode"}), or {}."""
        return dict(getattr(self._runner, "measured_peaks", None) or {})

    @property
    def fast_path(self) -> FastScheduler | None:
        """The fast path's scheduler while it serves this model (benchmarks read its timings), else None."""
        backend = self._backend
        return backend if isinstance(backend, FastScheduler) else None

    def backend_stats(self) -> dict:
        """The back end's counters (fast path: active, waiting, steps, prefills, free blocks), for benchmarks."""
        stats = getattr(self._backend, "stats", None)
        return stats() if callable(stats) else {}

    def cancel(self, request_id: str) -> None:
        if self._backend is not None:
            self._backend.cancel(request_id)

    def alive(self) -> bool:
        return self._backend is not None and self._backend.alive()

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        with self._start_lock:
            backend = self._backend
        if backend is not None:
            backend.close()


class LocalReply(TokenReply):
    """One streaming reply from the engine's back end; the back end calls ``push`` with each step's tokens."""

    def __init__(self, engine: LocalEngine, request_id: str, max_new: int):
        super().__init__(tokenizer=engine.tokenizer, eos_ids=engine._eos_ids, stop_strings=engine._stop_strings,
                         max_new=max_new)
        self.request_id = request_id
        self._engine = engine
        self._inbox: queue.Queue = queue.Queue()

    def push(self, tokens: list[int], finished: bool, error) -> None:
        self._inbox.put((list(tokens), finished, error))

    def _stop_request(self) -> None:
        self._engine.cancel(self.request_id)
        self._inbox.put(None)  # wake the iterator

    def _chunks(self) -> Iterator[list[int]]:
        engine, opts = self._engine, self._engine.options
        last_at = None
        while not self.cancelled:
            try:
                item = self._inbox.get(timeout=_POLL_S)
            except queue.Empty:
                waited = time.perf_counter() - (last_at or self._submitted)
                limit = opts.token_timeout_s if last_at else opts.first_token_timeout_s
                if not engine.alive() or waited > limit:
                    raise EngineError(fail_message(
                        "the engine stopped" if not engine.alive() else f"no token for {waited:.0f} s")) from None
                continue
            if item is None:
                continue
            tokens, finished, error = item
            if error is not None:
                raise error if isinstance(error, EngineError) else EngineError(fail_message(error))
            if tokens:
                last_at = time.perf_counter()
                yield tokens
            if finished:
                return


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def start_engine(loaded: LoadedModel, options: EngineOptions | None = None, spaces=None):
    """The engine for a loaded model: the batching ``LocalEngine`` (its back end starts at once), or on
    ZeroGPU (``spaces`` given, see zerogpu.zerogpu_spaces) a ``ZeroGPUEngine`` whose every reply runs
    inside ``spaces.GPU``."""
    if spaces is not None:
        from .zerogpu import ZeroGPUEngine  # noqa: PLC0415 - only on ZeroGPU Spaces
        return ZeroGPUEngine(loaded, spaces.GPU)
    return LocalEngine(loaded, options)
