"""The two back ends that run a local model, behind one interface (``Backend``).

- ``fast``: ``fastpath.FastScheduler`` (paged KV cache, batched prefill, CUDA graphs, Triton kernels).
- ``cb``: ``BatchingBackend`` here, over transformers' continuous-batching manager (any model it can batch).

Both take ``fastpath.Job`` requests and hand back tokens through ``job.emit(new_tokens, finished, error)``
on their own thread (``error``: None, a description that ``replies.fail_message`` words for visitors, or
an ``EngineError`` shown as it is). ``LocalEngine`` (engines/local.py) talks only to this interface.

A back end that cannot start (no memory, an unsupported model) fails once: ``wait_ready`` raises, every
request gets the error, and it does not restart itself. ``BatchingBackend`` replaces a generation thread
that failed mid-run (say, out of memory on one request) at most ``MAX_RESTARTS`` times in a row without a
request finishing in between; after that it stays failed with one clear status.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Protocol

import torch
from transformers import ContinuousBatchingConfig, GenerationConfig

from .fastpath import Job
from .protocol import EngineError
from .replies import fail_message

log = logging.getLogger("vicuna_demo.engines.local")

MAX_RESTARTS = 3
# KV-cache budget and prefill chunk of continuous batching on CPU (see BatchingBackend._make_manager).
_CPU_CACHE_BYTES = 512 << 20
_CPU_MAX_BATCH_TOKENS = 1024


class Backend(Protocol):
    kind: str                  # "fast" | "cb"
    status: str

    def start(self, progress: Callable[[str], None]) -> None: ...

    def wait_ready(self, timeout: float | None = None) -> bool:
        """True once serving; raises the start-up error if the back end could not start."""
        ...

    @property
    def warm_error(self) -> BaseException | None: ...

    @property
    def kv_tokens(self) -> int | None: ...

    def submit(self, job: Job) -> None: ...

    def cancel(self, request_id: str) -> None: ...

    def alive(self) -> bool: ...

    def close(self) -> None: ...

    def held_request_ids(self) -> set[str]: ...


class BatchingBackend:
    """transformers' continuous batching: one manager thread plus a dispatcher routing its outputs to jobs."""

    kind = "cb"

    def __init__(self, model, tokenizer, eos_ids, *, name: str, context_window: int, page_size: int = 256,
                 max_batch_requests: int | None = None, kv_blocks: int | None = None, kv_bytes: int | None = None,
                 use_cuda_graph: bool | None = None, compile_level: int = 0):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self._eos = sorted(eos_ids)
        self.context_window = context_window
        self.page_size, self.max_batch_requests = page_size, max_batch_requests
        self.kv_blocks, self.kv_bytes = kv_blocks, kv_bytes
        self.use_cuda_graph, self.compile_level = use_cuda_graph, compile_level
        self.status = "starting"
        self._manager = None
        self._jobs: dict[str, list] = {}          # request id -> [job, tokens already handed over]
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._ready = threading.Event()
        self._failed: str | None = None
        self.failure: tuple[str, str] | None = None   # ("could not start" | "stopped serving", why)
        self._warm_error: BaseException | None = None
        self._deaths = 0                           # generation threads lost since a request last finished
        self._dispatcher: threading.Thread | None = None

    # -- set-up -------------------------------------------------------------------------------------
    def _blocks(self) -> int | None:
        if self.kv_blocks:
            return self.kv_blocks
        cfg = self.model.config.get_text_config()
        heads = int(cfg.num_attention_heads)
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        per_token = 2 * int(cfg.num_hidden_layers) * kv_heads * head_dim * getattr(self.model.dtype, "itemsize", 4)
        if self.kv_bytes is not None:
            return max(1, self.kv_bytes // (per_token * self.page_size))
        if self.model.device.type == "cpu":
            # On CPU transformers sizes the KV cache from the machine's *total* RAM: 13 GB resident for a
            # 135M model. Bound it, and never below one full context window.
            tokens = max(self.context_window, _CPU_CACHE_BYTES // per_token)
            return -(-tokens // self.page_size)
        return None                                # transformers sizes it from free memory

    def _make_manager(self):
        vocab = int(getattr(self.model.config.get_text_config(), "vocab_size", 0) or len(self.tokenizer))
        # Processors exist only for non-default values; per-request values then override these.
        base = GenerationConfig(
            do_sample=True, temperature=0.7, top_p=0.999, top_k=vocab, max_new_tokens=1024,
            eos_token_id=self._eos or -1,
            pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0)
        kwargs: dict = dict(per_request_processors=True, page_size=self.page_size)
        if self.max_batch_requests:
            kwargs["max_requests_per_batch"] = self.max_batch_requests
        blocks = self._blocks()
        if blocks:
            kwargs["num_blocks"] = blocks
        if self.model.device.type == "cpu" and not self.kv_blocks:
            kwargs["max_batch_tokens"] = _CPU_MAX_BATCH_TOKENS
        if self.use_cuda_graph is not None:
            kwargs["use_cuda_graph"] = self.use_cuda_graph
        if self.compile_level:
            kwargs["default_compile_level"] = self.compile_level
        with torch.inference_mode():  # the manager's thread takes the caller's inference mode
            manager = self.model.init_continuous_batching(
                generation_config=base, continuous_batching_config=ContinuousBatchingConfig(**kwargs))
            manager.start()
        return manager

    def start(self, progress: Callable[[str], None] = lambda m: None) -> None:
        try:
            self._manager = self._make_manager()
        except Exception as exc:  # noqa: BLE001 - no restart: report once, fail every request
            self._fail_for_good(exc)
            return
        self._dispatcher = threading.Thread(target=self._dispatch, name=f"dispatch-{self.name}", daemon=True)
        self._dispatcher.start()
        self.status = "ready"
        self._ready.set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        self._ready.wait(timeout)
        if self._warm_error is not None:
            raise self._warm_error
        return self._ready.is_set()

    @property
    def warm_error(self) -> BaseException | None:
        return self._warm_error

    @property
    def kv_tokens(self) -> int | None:
        return self._blocks() * self.page_size if self._blocks() else None

    def _fail_for_good(self, exc: BaseException, what: str = "could not start") -> None:
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        log.error("%s: continuous batching %s (%s); requests to this model will fail", self.name, what, text)
        self._failed = f"{self.name} {what}: {text}"
        self.failure = (what, text)
        self._warm_error = exc if isinstance(exc, Exception) else RuntimeError(text)
        self.status = f"failed: {text}"
        self._ready.set()
        self._fail_all(EngineError(self._failed))

    # -- requests -----------------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue ``job``; its repetition_penalty is not applied (transformers' continuous batching has none:
        LocalEngine.unsupported_params says so and ChatService tells the visitor)."""
        if self._closed.is_set():
            raise EngineError(f"{self.name} is shutting down.")
        if self._failed:
            raise EngineError(self._failed)
        sampling = (dict(temperature=1.0, top_p=1.0, top_k=1) if job.greedy else
                    dict(temperature=float(job.temperature), top_p=float(job.top_p),
                         top_k=int(self.model.config.get_text_config().vocab_size)))
        with self._lock:
            self._jobs[job.request_id] = [job, 0]
        try:
            manager = self._manager
            accepted = manager.add_request(job.ids, request_id=job.request_id, max_new_tokens=job.max_new,
                                           streaming=True, eos_token_id=self._eos or -1, **sampling)
            if accepted is None and self._wait_for_restart(manager):
                accepted = self._manager.add_request(
                    job.ids, request_id=job.request_id, max_new_tokens=job.max_new, streaming=True,
                    eos_token_id=self._eos or -1, **sampling)
        except Exception as exc:  # e.g. the input queue stayed full
            self._forget(job.request_id)
            raise EngineError(f"{self.name} is too busy right now, please retry ({type(exc).__name__}).") from exc
        if accepted is None:
            self._forget(job.request_id)
            raise EngineError(self._failed or f"{self.name} is not accepting requests right now; please retry "
                                              "in a moment.")

    def _wait_for_restart(self, failed, timeout_s: float = 30.0) -> bool:
        """After ``failed`` refused a request: wait for the dispatcher to replace it; True once a new one runs."""
        deadline = time.monotonic() + timeout_s
        while not self._closed.is_set() and not self._failed and time.monotonic() < deadline:
            if self._manager is not failed and self._manager.is_running():
                return True
            if failed.is_running() and failed.background_thread_status.can_accept_new_requests() is None:
                return False  # refused for another reason
            time.sleep(0.05)
        return False

    def cancel(self, request_id: str) -> None:
        if self._manager is not None:
            try:
                self._manager.cancel_request(request_id)
            except Exception:  # noqa: BLE001 - a finished request may be gone already
                log.debug("cancelling %s", request_id, exc_info=True)
        self._forget(request_id)

    def _forget(self, request_id: str) -> None:
        with self._lock:
            self._jobs.pop(request_id, None)

    def held_request_ids(self) -> set[str]:
        manager = self._manager
        if manager is None:
            return set()
        held = {state.request_id for state in list(manager.input_queue.queue)}
        processor = getattr(manager, "batch_processor", None)
        if processor is not None:
            held |= set(processor.scheduler.active_requests) | set(processor.scheduler.waiting_requests)
        return held

    def alive(self) -> bool:
        return self._manager is not None and self._manager.is_running() and not self._failed

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._fail_all(EngineError(f"{self.name} is shutting down."))
        try:
            if self._manager is not None:
                self._manager.stop(block=True, timeout=10)
        except Exception:  # noqa: BLE001
            log.exception("stopping the batching manager failed")

    # -- the dispatcher thread ----------------------------------------------------------------------
    def _dispatch(self) -> None:
        """Route the manager's outputs to the jobs; fail them all if the manager dies."""
        while not self._closed.is_set() and not self._failed:
            try:
                result = self._manager.get_result(timeout=0.1)
            except Exception:  # noqa: BLE001 - keep routing whatever happens
                log.exception("dispatcher: reading results failed")
                result = None
            if result is not None:
                self._route(result)
            elif not self._manager.is_running() and not self._closed.is_set():
                error = getattr(self._manager.background_thread_status, "fatal_error", None)
                self._fail_all(str(error) if error else "the generation thread stopped")
                self._restart(error)

    def _route(self, result) -> None:
        with self._lock:
            entry = self._jobs.get(result.request_id)
        if entry is None:
            return
        job, seen = entry
        tokens = list(result.generated_tokens)
        entry[1] = len(tokens)
        finished = result.is_finished() or bool(result.error)
        if finished:
            self._forget(job.request_id)
            if not result.error:
                self._deaths = 0
        try:
            job.emit(tokens[seen:], finished, result.error or None)
        except Exception:  # noqa: BLE001 - a broken consumer must not stop the dispatcher
            log.exception("delivering tokens for %s failed", job.request_id)

    def _fail_all(self, message: str | EngineError) -> None:
        """End every job: a str is wrapped by replies.fail_message, an EngineError is shown as it is."""
        with self._lock:
            jobs, self._jobs = [entry[0] for entry in self._jobs.values()], {}
        for job in jobs:
            try:
                job.emit([], True, message)
            except Exception:  # noqa: BLE001
                log.exception("failing %s", job.request_id)

    def _restart(self, error) -> None:
        """A failed step (say, out of memory) ends transformers' generation thread and every request it held;
        a fresh one serves on, unless MAX_RESTARTS threads in a row died without a request finishing."""
        old = self._manager
        try:
            old.stop(block=True, timeout=5)  # frees its KV cache
        except Exception:  # noqa: BLE001
            log.debug("stopping the failed batching manager", exc_info=True)
        self._deaths += 1
        if self._deaths > MAX_RESTARTS:
            self._fail_for_good(RuntimeError(f"its generation thread failed {self._deaths} times in a row "
                                             f"({type(error).__name__ if error else 'stopped'})"), "stopped serving")
            return
        try:
            self._manager = self._make_manager()
        except Exception as exc:  # noqa: BLE001 - no loop: the back end stays failed
            self._fail_for_good(exc)
            return
        log.warning("%s: the generation thread failed (%s); the requests it held were ended with an error and "
                    "a new thread serves from now on", self.name, type(error).__name__ if error else "stopped")
