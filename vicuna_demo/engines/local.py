"""The local engine: one per loaded model, serving every visitor's requests together.

Two back ends run the model, both on ONE background thread per model that does all GPU (or CPU)
work, so concurrent replies share each forward pass instead of queueing behind a lock, and CUDA
graphs always run on the thread that captured them (gradio calls handlers from worker threads):

- ``fast`` (``fastpath.py``, the default for Llama-family models): a paged KV cache, batched
  prefill, one CUDA graph per batch size with fused Triton kernels on a GPU, a lean loop on a CPU,
  and the previous turn's KV reused for the next turn of a conversation.
- ``cb``: transformers' continuous-batching manager (any model transformers can batch).

The caller's iterator turns token ids into clean text deltas (complete UTF-8, stop strings cut) and
cancels the request when a stop string appears or the user presses Stop, so the model stops
working on it too. Warm-up (cache allocation, CUDA-graph capture, one short request) happens at
start-up; ``engine.status`` says where it is, for the log and the UI.

    engine = LocalEngine.start(loaded_model)          # see loading.py
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
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from transformers import ContinuousBatchingConfig, GenerationConfig

from ..loading import LoadedModel
from .fastpath import FastModel, FastOptions, FastScheduler, Job, unsupported_reason
from .prompting import PromptingModel
from .protocol import EngineError, Prompt, ReplyStats, SamplingParams
from .textstream import IncrementalDecoder, StopFilter

log = logging.getLogger("vicuna_demo.engines.local")

# How long a reply waits for its next token before it checks that the engine is still alive.
_POLL_S = 0.5
# KV-cache budget and prefill chunk on CPU (see _make_manager).
_CPU_CACHE_BYTES = 512 << 20
_CPU_MAX_BATCH_TOKENS = 1024


@dataclass(frozen=True)
class EngineOptions:
    """Which back end runs the model, and its knobs (see fastpath.FastOptions, ContinuousBatchingConfig)."""

    backend: str = "auto"                     # "auto": fast path where the model allows it, else "cb"; "fast"; "cb"
    max_batch_requests: int | None = None     # None: 64 on a GPU, 8 on a CPU (fast); inferred (cb)
    num_blocks: int | None = None             # KV-cache blocks; None: from free memory
    page_size: int = 256                      # tokens per KV-cache page
    use_cuda_graph: bool | None = None        # None: transformers decides (on for CUDA)
    compile_level: int = 0                    # 0 = eager; up to 3 (longer warm-up, faster steps)
    first_token_timeout_s: float = 600.0      # a request still queued after this is failed
    token_timeout_s: float = 120.0            # a running request silent this long is failed
    triton_kernels: bool = True               # fast path on CUDA: fused Triton kernels (needed for CUDA graphs)
    prefix_cache: bool = True                 # fast path: reuse the previous turn's KV cache
    kv_blocks: int | None = None              # fast path: KV-cache blocks; None: from free memory
    int8_kernel: bool = True                  # fast path, 8-bit models: our int8 GEMV over bitsandbytes' weights
    tune_dense_gemv: bool = True              # fast path: time our GEMV against cuBLAS for fp16 weights at warm-up
    cpu_threads: int | None = None            # fast path on CPU: intra-op threads of the engine thread

    def fast_options(self) -> FastOptions:
        return FastOptions(max_rows=self.max_batch_requests, cuda_graphs=self.use_cuda_graph is not False,
                           kernels=self.triton_kernels, prefix_cache=self.prefix_cache, kv_blocks=self.kv_blocks,
                           int8_kernel=self.int8_kernel, tune_dense=self.tune_dense_gemv,
                           cpu_threads=self.cpu_threads)


class _FastOutput:
    """What the fast path hands a reply: the same shape as a continuous-batching output."""

    __slots__ = ("request_id", "_tokens", "_n", "_finished", "error")

    def __init__(self, request_id: str, tokens: list[int], n: int, finished: bool, error: str | None):
        self.request_id, self._tokens, self._n, self._finished, self.error = request_id, tokens, n, finished, error

    @property
    def generated_tokens(self) -> list[int]:
        return self._tokens[:self._n]   # the scheduler only appends, so this prefix is stable

    def is_finished(self) -> bool:
        return self._finished


def _fail_message(error: str | None) -> str:
    text = (error or "unknown error").strip()
    if "out of memory" in text.lower() or "OutOfMemoryError" in text:
        return "The model ran out of GPU memory on this request. Please retry, or shorten the conversation."
    return f"Generation failed: {text.splitlines()[0][:300]}"


class LocalEngine(PromptingModel):
    """Implements ``generation.Engine`` for a model loaded in this process."""

    def __init__(self, loaded: LoadedModel, options: EngineOptions | None = None):
        super().__init__(loaded)
        self.options = options or EngineOptions()
        self._routes: dict[str, queue.Queue] = {}
        self._routes_lock = threading.Lock()
        self._closed = threading.Event()
        self._counter = itertools.count()
        self.status = "starting"
        self._progress: Callable[[str], None] = lambda message: None
        self._warmup_thread: threading.Thread | None = None
        self._fast: FastScheduler | None = None
        self._manager = None
        self.backend = self._choose_backend()
        if self.backend == "fast":
            try:
                with torch.no_grad():
                    runner = FastModel(self.model, self.context_window, self.options.fast_options())
            except Exception as exc:  # noqa: BLE001 - any surprise: the general back end serves
                log.warning("%s: fast path unavailable (%s); using continuous batching", self.name, exc)
                self.backend = "cb"
            else:
                self._fast = FastScheduler(runner, name=self.name)
                self._fast.start(progress=self._set_status)
        if self.backend == "cb":
            self._start_cb()

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

    def _start_cb(self) -> None:
        with torch.inference_mode():  # the manager's thread takes the caller's inference mode
            self._manager = self._make_manager()
            self._manager.start()
        self._dispatcher = threading.Thread(target=self._dispatch, name=f"dispatch-{self.name}", daemon=True)
        self._dispatcher.start()

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

    # -- set-up ---------------------------------------------------------------------------
    def _make_manager(self):
        vocab = int(getattr(self.model.config.get_text_config(), "vocab_size", 0) or len(self.tokenizer))
        # Processors exist only for non-default values; per-request values then override these.
        base = GenerationConfig(
            do_sample=True, temperature=0.7, top_p=0.999, top_k=vocab,
            max_new_tokens=1024, eos_token_id=list(self._eos_ids) or -1,
            pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0,
        )
        opts = self.options
        cb_kwargs: dict = dict(per_request_processors=True, page_size=opts.page_size)
        if opts.max_batch_requests:
            cb_kwargs["max_requests_per_batch"] = opts.max_batch_requests
        if opts.num_blocks:
            cb_kwargs["num_blocks"] = opts.num_blocks
        elif self.model.device.type == "cpu":
            # On CPU transformers sizes the KV cache from the machine's *total* RAM: 13 GB resident for a
            # 135M model. Bound it, and the prefill chunk whose attention mask scales with the cache.
            cb_kwargs["num_blocks"] = self._cpu_cache_blocks(opts.page_size)
            cb_kwargs["max_batch_tokens"] = _CPU_MAX_BATCH_TOKENS
        if opts.use_cuda_graph is not None:
            cb_kwargs["use_cuda_graph"] = opts.use_cuda_graph
        if opts.compile_level:
            cb_kwargs["default_compile_level"] = opts.compile_level
        return self.model.init_continuous_batching(
            generation_config=base, continuous_batching_config=ContinuousBatchingConfig(**cb_kwargs))

    def _cpu_cache_blocks(self, page_size: int) -> int:
        """KV-cache blocks for about _CPU_CACHE_BYTES, and never less than one full context window."""
        cfg = self.model.config.get_text_config()
        heads = int(cfg.num_attention_heads)
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        itemsize = getattr(self.model.dtype, "itemsize", 4)
        per_token = 2 * int(cfg.num_hidden_layers) * kv_heads * head_dim * itemsize
        tokens = max(self.context_window, _CPU_CACHE_BYTES // per_token)
        return -(-tokens // page_size)

    def warmup(self, progress=lambda message: None, background: bool = False, timeout_s: float = 1800.0) -> float:
        """Allocate, capture CUDA graphs and run short requests now, not in a user's first reply.

        Progress goes to ``progress`` and to ``self.status``. With ``background=True`` this returns at once
        (the UI can start and show ``engine.status``; early requests wait for the warm-up, bounded by
        ``first_token_timeout_s``). Returns the seconds spent (0.0 when backgrounded)."""
        self._progress = progress
        if background:
            self._warmup_thread = threading.Thread(target=self._warmup, args=(timeout_s,),
                                                   name=f"warmup-{self.name}", daemon=True)
            self._warmup_thread.start()
            return 0.0
        return self._warmup(timeout_s)

    def _warmup(self, timeout_s: float) -> float:
        started = time.perf_counter()
        try:
            self._set_status(f"{self.name}: warming up ({self.backend} back end)")
            if self._fast is not None:
                try:
                    self._fast.wait_ready(timeout_s)
                except Exception as exc:  # noqa: BLE001 - fall back to the general back end
                    self._fall_back(exc)
            for params in (SamplingParams(temperature=0, max_new_tokens=4),
                           SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=4)):
                prompt = self.prepare([{"role": "user", "content": "Hello"}], params)
                for _ in self.stream(prompt, params):
                    pass
        except Exception as exc:  # noqa: BLE001 - shown as the status; requests report their own errors
            self._set_status(f"{self.name}: warm-up failed ({exc})")
            raise
        elapsed = time.perf_counter() - started
        # The model, tokenizer and caches are long-lived: move them out of the garbage collector's view, or each
        # full collection walks them all (0.2-0.3 s pauses, every token of every reply waiting meanwhile).
        gc.freeze()
        self._set_status(f"{self.name}: ready ({elapsed:.1f} s warm-up, {self.backend} back end)")
        return elapsed

    def _fall_back(self, exc: BaseException) -> None:
        """The fast path could not start (say, a kernel this GPU cannot run): continuous batching serves."""
        with self._routes_lock:
            if self._fast is None:
                return
            log.warning("%s: fast-path warm-up failed (%s); using continuous batching", self.name, exc)
            self._fast.close()
            self._fast, self.backend = None, "cb"
            self._start_cb()

    # -- generation -------------------------------------------------------------------------
    def stream(self, prompt: Prompt, params: SamplingParams) -> "LocalReply":
        if self._closed.is_set():
            raise EngineError(f"{self.name} is shutting down.")
        ids = list(prompt.payload)
        max_new = max(1, min(params.max_new_tokens, self.context_window - len(ids)))
        request_id = f"{uuid.uuid4().hex[:8]}-{next(self._counter)}"
        fast = self._fast
        if fast is not None and fast.warm_error is not None:   # e.g. started with --no-warmup
            self._fall_back(fast.warm_error)
        if self._fast is not None:
            return self._stream_fast(request_id, ids, max_new, params)
        inbox: queue.Queue = queue.Queue()
        with self._routes_lock:
            self._routes[request_id] = inbox
        sampling = (dict(temperature=1.0, top_p=1.0, top_k=1) if params.greedy else
                    dict(temperature=float(params.temperature), top_p=float(params.top_p),
                         top_k=int(self.model.config.get_text_config().vocab_size)))
        submitted = time.perf_counter()
        try:
            manager = self._manager
            accepted = manager.add_request(
                ids, request_id=request_id, max_new_tokens=max_new, streaming=True,
                eos_token_id=list(self._eos_ids) or -1, **sampling)
            if accepted is None and self._wait_for_restart(manager):
                inbox = queue.Queue()  # a fresh one: the old one may hold the failed manager's error
                with self._routes_lock:
                    self._routes[request_id] = inbox
                accepted = self._manager.add_request(
                    ids, request_id=request_id, max_new_tokens=max_new, streaming=True,
                    eos_token_id=list(self._eos_ids) or -1, **sampling)
        except Exception as exc:  # e.g. the input queue stayed full
            self._unroute(request_id)
            raise EngineError(f"{self.name} is too busy right now, please retry ({type(exc).__name__}).") from exc
        if accepted is None:
            self._unroute(request_id)
            raise EngineError(f"{self.name} is not accepting requests right now; please retry in a moment.")
        return LocalReply(self, request_id, inbox, submitted, max_new)

    def _stream_fast(self, request_id: str, ids: list[int], max_new: int, params: SamplingParams) -> "LocalReply":
        inbox: queue.Queue = queue.Queue()
        tokens: list[int] = []

        def emit(new: list[int], finished: bool, error: str | None) -> None:
            tokens.extend(new)
            inbox.put(_FastOutput(request_id, tokens, len(tokens), finished, error))

        job = Job(request_id=request_id, ids=ids, max_new=max_new,
                  temperature=0.0 if params.greedy else float(params.temperature),
                  top_p=1.0 if params.greedy else float(params.top_p), eos=frozenset(self._eos_ids), emit=emit)
        submitted = time.perf_counter()
        try:
            self._fast.submit(job)
        except RuntimeError as exc:
            raise EngineError(f"{self.name} is shutting down.") from exc
        return LocalReply(self, request_id, inbox, submitted, max_new)

    def held_request_ids(self) -> set[str]:
        """Requests the back end still holds (queued, waiting or being decoded): for tests and monitoring."""
        if self._fast is not None:
            return self._fast.request_ids()
        manager = self._manager
        held = {state.request_id for state in list(manager.input_queue.queue)}
        processor = getattr(manager, "batch_processor", None)
        if processor is not None:
            held |= set(processor.scheduler.active_requests) | set(processor.scheduler.waiting_requests)
        return held

    def _wait_for_restart(self, failed, timeout_s: float = 30.0) -> bool:
        """After ``failed`` refused a request: wait for the dispatcher to replace it; True once a new one runs."""
        deadline = time.monotonic() + timeout_s
        while not self._closed.is_set() and time.monotonic() < deadline:
            if self._manager is not failed and self._manager.is_running():
                return True
            if failed.is_running() and failed.background_thread_status.can_accept_new_requests() is None:
                return False  # refused for another reason
            time.sleep(0.05)
        return False

    def cancel(self, request_id: str) -> None:
        if self._fast is not None:
            self._fast.cancel(request_id)
        else:
            self._manager.cancel_request(request_id)
        self._unroute(request_id)

    def _unroute(self, request_id: str) -> None:
        with self._routes_lock:
            self._routes.pop(request_id, None)

    def _dispatch(self) -> None:
        """Route the manager's outputs to the waiting replies; fail them all if the manager dies."""
        while not self._closed.is_set():
            try:
                result = self._manager.get_result(timeout=0.1)
            except Exception:  # noqa: BLE001 - keep routing whatever happens
                log.exception("dispatcher: reading results failed")
                result = None
            if result is not None:
                with self._routes_lock:
                    inbox = self._routes.get(result.request_id)
                if inbox is not None:
                    inbox.put(result)
            elif not self._manager.is_running() and not self._closed.is_set():
                error = getattr(self._manager.background_thread_status, "fatal_error", None)
                self._fail_all(EngineError(_fail_message(str(error) if error else "the generation thread stopped")))
                self._restart_manager(error)

    def _restart_manager(self, error) -> None:
        """A failed step (say, out of memory) ends transformers' generation thread and fails every request it
        held; start a fresh manager so that the engine goes on serving new requests."""
        if self._closed.is_set():
            return
        old = self._manager
        try:
            old.stop(block=True, timeout=5)  # frees its KV cache
        except Exception:  # noqa: BLE001
            log.debug("stopping the failed batching manager", exc_info=True)
        try:
            with torch.inference_mode():  # the manager's thread takes the caller's inference mode
                manager = self._make_manager()
                manager.start()
        except Exception:  # noqa: BLE001 - try again on the next round of the dispatcher
            log.exception("%s: restarting the generation thread failed", self.name)
            time.sleep(5.0)
            return
        self._manager = manager
        log.warning("%s: the generation thread failed (%s); the requests it held were ended with an error and "
                    "a new thread serves from now on", self.name, type(error).__name__ if error else "stopped")

    def _fail_all(self, error: EngineError) -> None:
        with self._routes_lock:
            inboxes = list(self._routes.values())
        for inbox in inboxes:
            inbox.put(error)

    def alive(self) -> bool:
        if self._fast is not None:
            return self._fast.alive()
        return self._manager is not None and self._manager.is_running()

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._fail_all(EngineError(f"{self.name} is shutting down."))
        if self._fast is not None:
            self._fast.close()
            return
        try:
            if self._manager is not None:
                self._manager.stop(block=True, timeout=10)
        except Exception:  # noqa: BLE001
            log.exception("stopping the batching manager failed")


class LocalReply:
    """One streaming reply; iterate it once. ``cancel()`` may be called from any thread."""

    def __init__(self, engine: LocalEngine, request_id: str, inbox: queue.Queue, submitted: float, max_new: int):
        self.stats = ReplyStats()
        self.request_id = request_id
        self._engine = engine
        self._inbox = inbox
        self._submitted = submitted
        self._max_new = max_new
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        if not self._cancelled.is_set():
            self._cancelled.set()
            self._engine.cancel(self.request_id)
            self._inbox.put(None)  # wake the iterator

    def __iter__(self) -> Iterator[str]:
        engine, stats = self._engine, self.stats
        decoder = IncrementalDecoder(engine.tokenizer)
        stops = StopFilter(engine._stop_strings)
        seen = 0
        first_at = last_at = None
        opts = engine.options
        try:
            while True:
                if self._cancelled.is_set():
                    stats.finish_reason = "cancelled"
                    return
                try:
                    item = self._inbox.get(timeout=_POLL_S)
                except queue.Empty:
                    waited = time.perf_counter() - (last_at or self._submitted)
                    limit = opts.token_timeout_s if last_at else opts.first_token_timeout_s
                    if not engine.alive() or waited > limit:
                        raise EngineError(_fail_message(
                            "the engine stopped" if not engine.alive() else f"no token for {waited:.0f} s"))
                    continue
                if item is None:
                    continue
                if isinstance(item, Exception):
                    raise item
                if item.error:
                    raise EngineError(_fail_message(item.error))
                new = item.generated_tokens[seen:]
                seen = len(item.generated_tokens)
                if new:
                    now = time.perf_counter()
                    if first_at is None:
                        first_at = now
                        stats.ttft_s = now - self._submitted
                    last_at = now
                    new = [t for t in new if t not in engine._eos_ids]
                    stats.n_tokens = seen
                    stats.decode_s = last_at - first_at
                    text = stops.push(decoder.push(new))
                    if text:
                        yield text
                    if stops.stopped:
                        stats.finish_reason = "stop"
                        engine.cancel(self.request_id)  # free the slot now, not at max tokens
                        return
                if item.is_finished():
                    tail = stops.push(decoder.flush()) + stops.flush()
                    if tail:
                        yield tail
                    ended_on_eos = bool(item.generated_tokens) and item.generated_tokens[-1] in engine._eos_ids
                    stats.finish_reason = "stop" if ended_on_eos or seen < self._max_new else "length"
                    return
        except EngineError as exc:
            stats.finish_reason, stats.error = "error", str(exc)
            raise
        finally:
            if stats.finish_reason is None:  # the consumer went away (closed generator)
                stats.finish_reason = "cancelled"
                engine.cancel(self.request_id)
            engine._unroute(self.request_id)


def start_engine(loaded: LoadedModel, options: EngineOptions | None = None) -> LocalEngine:
    """Create the engine for a loaded model (its generation thread starts at once)."""
    return LocalEngine(loaded, options)
