"""``FastScheduler``: the one thread that owns a ``FastModel``: admits jobs, prefills, decodes every active
request in one step, streams tokens through ``Job.emit``, cancels, and fails requests cleanly."""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from .kvpool import _BlockPool
from .model import FastModel
from .sampling import sample, sampling_mode

log = logging.getLogger("vicuna_demo.engines.fastpath")


@dataclass
class Job:
    """One request. ``emit(tokens, finished, error)`` is called on the scheduler thread."""

    request_id: str
    ids: list[int]
    max_new: int
    temperature: float
    top_p: float
    eos: frozenset[int]
    emit: Callable[[list[int], bool, str | None], None]
    submitted: float = field(default_factory=time.perf_counter)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 1e-5


@dataclass
class _Slot:
    job: Job
    blocks: list[int]
    start: int                         # tokens already cached (prefix reuse)
    generated: list[int] = field(default_factory=list)
    n_written: int = 0                 # positions whose K/V are in the cache
    last_token: int = 0
    done: bool = False

    @property
    def greedy(self):
        return self.job.greedy

    @property
    def temperature(self):
        return self.job.temperature

    @property
    def top_p(self):
        return self.job.top_p


class FastScheduler:
    """Owns a FastModel and a thread that admits, prefills and decodes every request.

    The thread keeps up to two decode steps in flight on CUDA: while the GPU runs step t+1 the
    host hands out the tokens of step t. A request that finishes is noticed one step late; the extra
    token is discarded (its blocks were reserved for it)."""

    def __init__(self, runner: FastModel, name: str = "model"):
        self.runner = runner
        self.name = name
        self._inbox: queue.Queue = queue.Queue()
        self._cancelled: set[str] = set()
        self._cancel_lock = threading.Lock()
        self._waiting: deque[Job] = deque()
        self._slots: list[_Slot] = []
        self._closed = threading.Event()
        self._ready = threading.Event()
        self._fatal: str | None = None
        self._thread: threading.Thread | None = None
        self._pool: _BlockPool | None = None
        self._warm_error: BaseException | None = None
        self.status = "starting"
        self._admit_blocked = False
        self.tuning: dict = {}
        self.attention_tuning: dict = {}
        self.prefill_log: deque = deque(maxlen=256)     # recent prefills: rows, tokens, seconds, waited
        self.launch_times: deque = deque(maxlen=4096)   # when recent decode steps were launched
        self._host: list[torch.Tensor] = []
        self.steps = 0
        self.prefills = 0

    # -- public ---------------------------------------------------------------------------------------
    def start(self, progress: Callable[[str], None] = lambda m: None) -> None:
        """Start the thread; it allocates the cache and captures graphs first (``ready()`` tells when)."""
        self._progress = progress
        self._thread = threading.Thread(target=self._run, name=f"fastpath-{self.name}", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        self._ready.wait(timeout)
        if self._warm_error is not None:
            raise self._warm_error
        return self._ready.is_set()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closed.is_set()

    @property
    def warm_error(self) -> BaseException | None:
        """Why the warm-up failed (the thread has ended), or None."""
        return self._warm_error

    def submit(self, job: Job) -> None:
        if self._closed.is_set():
            raise RuntimeError("scheduler closed")
        self._inbox.put(job)

    def cancel(self, request_id: str) -> None:
        with self._cancel_lock:
            self._cancelled.add(request_id)
        self._inbox.put(None)   # wake the thread

    def close(self, timeout: float = 10.0) -> None:
        self._closed.set()
        self._inbox.put(None)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def request_ids(self) -> set[str]:
        """The requests this scheduler still holds: submitted, waiting, or being decoded."""
        held = {job.request_id for job in list(self._inbox.queue) if job is not None}
        held |= {job.request_id for job in list(self._waiting)}
        held |= {slot.job.request_id for slot in list(self._slots) if not slot.done}
        return held

    def stats(self) -> dict:
        pool = self._pool
        return {"active": len(self._slots), "waiting": len(self._waiting) + self._inbox.qsize(),
                "steps": self.steps, "prefills": self.prefills,
                "free_blocks": len(pool.free) if pool else None,
                "cached_prefixes": len(pool.cached) if pool else None}

    # -- thread ----------------------------------------------------------------------------------------
    def _run(self) -> None:
        runner = self.runner
        if not runner.cuda and runner.options.cpu_threads:
            torch.set_num_threads(runner.options.cpu_threads)   # per thread: the rest of the process keeps its own
        stream = torch.cuda.stream(runner.stream) if runner.cuda else contextlib.nullcontext()
        with stream:
            self._run_on_stream()

    def _run_on_stream(self) -> None:
        runner = self.runner
        try:
            with torch.inference_mode():
                started = time.perf_counter()
                self.status = "allocating the KV cache"
                self._progress(f"{self.name}: allocating the KV cache")
                runner.allocate_cache()
                if runner.use_kernels:
                    self.status = "tuning kernels"
                    self.tuning = runner.tune_gemv(lambda m: self._progress(f"{self.name}: {m}"))
                    self.attention_tuning = runner.tune_attention(progress=lambda m: self._progress(f"{self.name}: {m}"))
                if runner.use_graphs:
                    self.status = "capturing CUDA graphs"
                    runner.capture(lambda m: self._progress(f"{self.name}: {m}"))
                if runner.cuda:
                    self.status = "warming up prefill"
                    self._progress(f"{self.name}: warming up prefill")
                    runner.warm_prefill()
                self._pool = _BlockPool(runner.n_blocks, runner.block, runner.options.prefix_cache)
                if runner.cuda:
                    self._host = [torch.empty(runner.max_rows, dtype=torch.long, pin_memory=True) for _ in range(4)]
                self._progress(f"{self.name}: fast path ready in {time.perf_counter() - started:.1f} s "
                               f"({runner.n_blocks - 1} KV blocks of {runner.block} tokens, "
                               f"{'CUDA graphs' if runner.graphs else 'no CUDA graphs'}, "
                               f"{'Triton kernels' if runner.use_kernels else 'eager ops'})")
                self.status = "ready"
        except BaseException as exc:  # noqa: BLE001 - reported to whoever waits for readiness
            log.exception("fast path warm-up failed")
            runner.release()
            if runner.cuda:
                torch.cuda.empty_cache()   # give the KV pool back: a fallback back end needs the memory
            self._warm_error = exc
            self.status = f"failed: {exc}"
            self._ready.set()
            self._closed.set()
            while True:    # requests that arrived during the warm-up end now instead of timing out
                try:
                    job = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    _safe_emit(job, [], True, f"the fast path could not start ({_describe(exc)})")
            return
        self._ready.set()
        with torch.inference_mode():
            self._loop()

    def _loop(self) -> None:
        runner = self.runner
        inflight: deque = deque()
        reload = True
        while not self._closed.is_set():
            try:
                idle = not self._slots and not inflight and not (self._waiting and not self._admit_blocked)
                if self._take_inbox(block=idle):
                    self._admit_blocked = False
                if self._closed.is_set():
                    break
                if any(s.done for s in self._slots):
                    self._drain(inflight)
                    self._retire_done()
                    reload = True
                if self._waiting and not self._admit_blocked and len(self._slots) < runner.max_rows:
                    self._drain(inflight)
                    self._retire_done()
                    if self._admit():
                        reload = True
                    self._retire_done()           # a reply may end at its first token
                if not self._slots:
                    self._drain(inflight)
                    continue
                if reload:
                    self._drain(inflight)
                    runner.load_rows(self._slots)
                    reload = False
                self._launch(inflight)
                if len(inflight) > (1 if runner.pipelined else 0):
                    self._process(inflight.popleft())
            except Exception as exc:  # noqa: BLE001 - fail the requests in hand, keep serving
                log.exception("%s: a generation step failed", self.name)
                inflight.clear()
                self._fail_all_active(_describe(exc))
                reload = True
        self._shutdown()

    def _take_inbox(self, block: bool) -> bool:
        """Move submitted jobs to the waiting queue; apply cancellations. -> whether anything changed."""
        changed = False
        try:
            item = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
            while True:
                if item is not None:
                    self._waiting.append(item)
                    changed = True
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass
        with self._cancel_lock:
            cancelled, self._cancelled = self._cancelled, set()
        if cancelled:
            for slot in self._slots:
                if slot.job.request_id in cancelled and not slot.done:
                    slot.done = True
                    changed = True
            kept = deque(j for j in self._waiting if j.request_id not in cancelled)
            if len(kept) != len(self._waiting):
                for job in self._waiting:
                    if job.request_id in cancelled:
                        _safe_emit(job, [], True, None)
                self._waiting = kept
                changed = True
        return changed

    def _launch(self, inflight: deque) -> None:
        runner = self.runner
        mode = sampling_mode(self._slots)
        rows, out = runner.decode(len(self._slots), mode)
        snapshot = list(self._slots)
        for slot in snapshot:
            slot.n_written += 1
        if runner.cuda:
            host = self._host[self.steps % len(self._host)][:rows]
            host.copy_(out, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            inflight.append((snapshot, host, event))
        else:
            inflight.append((snapshot, out.clone(), None))
        self.steps += 1
        self.launch_times.append(time.perf_counter())

    def _process(self, step) -> None:
        snapshot, host, event = step
        if event is not None:
            event.synchronize()
        values = host.tolist()
        for i, slot in enumerate(snapshot):
            if slot.done:
                continue
            token = values[i]
            self._accept(slot, token)

    def _accept(self, slot: _Slot, token: int) -> None:
        slot.generated.append(token)
        slot.last_token = token
        finished = token in slot.job.eos or len(slot.generated) >= slot.job.max_new
        if finished:
            slot.done = True
        _safe_emit(slot.job, [token], finished, None)

    def _drain(self, inflight: deque) -> None:
        while inflight:
            self._process(inflight.popleft())

    def _retire_done(self) -> None:
        pool = self._pool
        keep = []
        for slot in self._slots:
            if slot.done:
                if not slot.generated or slot.generated[-1] not in slot.job.eos and \
                        len(slot.generated) < slot.job.max_new:
                    _safe_emit(slot.job, [], True, None)      # cancelled: tell the reader it ended
                tokens = (slot.job.ids + slot.generated)[: slot.n_written]
                pool.remember(tokens, slot.blocks)
            else:
                keep.append(slot)
        if len(keep) != len(self._slots):
            self._admit_blocked = False
        self._slots = keep

    def _admit(self) -> bool:
        """Admit waiting jobs while rows and blocks allow, prefilling them in batches of up to
        ``prefill_tokens`` prompt tokens; the first token of each comes from its prefill. A burst of
        arrivals is prefilled back to back for up to ``burst_prefill_s`` before decoding resumes."""
        deadline = time.perf_counter() + self.runner.options.burst_prefill_s
        admitted = False
        while True:
            batch = self._next_batch()
            if not batch:
                return admitted
            self._prefill(batch)
            admitted = True
            if not self._waiting or time.perf_counter() > deadline:
                return admitted

    def _next_batch(self) -> list["_Slot"]:
        runner, pool = self.runner, self._pool
        budget = runner.options.prefill_tokens
        batch: list[_Slot] = []
        used = 0
        while self._waiting and len(self._slots) + len(batch) < runner.max_rows:
            job = self._waiting[0]
            if len(job.ids) + job.max_new + 1 > runner.max_len:
                self._waiting.popleft()
                _safe_emit(job, [], True, "the prompt and reply do not fit the model's context window")
                continue
            if not job.ids or min(job.ids) < 0 or max(job.ids) >= runner.n_embeddings:
                self._waiting.popleft()   # an out-of-range id would fault the GPU for every request
                _safe_emit(job, [], True, "the prompt has a token id outside the model's vocabulary")
                continue
            reused, start = pool.reuse(job.ids) if pool.keep_cache else ([], 0)
            if batch and (used + len(job.ids) - start > budget or start or batch[0].start):
                pool.remember(job.ids[:start], reused)      # a reused prefix is prefilled on its own
                break
            need = math.ceil((len(job.ids) + job.max_new + 1) / runner.block) - len(reused)
            fresh = pool.take(need)
            if fresh is None:
                pool.remember(job.ids[:start], reused)
                if not self._slots and not batch:
                    self._waiting.popleft()
                    _safe_emit(job, [], True, "not enough KV-cache memory for this request")
                    continue
                self._admit_blocked = True
                break
            self._waiting.popleft()
            batch.append(_Slot(job=job, blocks=reused + fresh, start=start))
            used += len(job.ids) - start
        return batch

    def _prefill(self, batch: list[_Slot]) -> None:
        runner = self.runner
        started = time.perf_counter()
        try:
            logits = runner.prefill([(s.job.ids, s.blocks, s.start) for s in batch])
            dev = runner.device
            temperature = torch.tensor([1.0 if s.greedy else max(s.temperature, 1e-5) for s in batch], device=dev)
            top_p = torch.tensor([s.top_p for s in batch], device=dev, dtype=torch.float32)
            greedy = torch.tensor([s.greedy for s in batch], device=dev)
            first = sample(logits, temperature, top_p, greedy, sampling_mode(batch)).tolist()
        except Exception as exc:  # noqa: BLE001 - these requests fail; the others go on
            log.exception("%s: prefill failed", self.name)
            for slot in batch:
                self._pool.release(slot.blocks)
                _safe_emit(slot.job, [], True, _describe(exc))
            return
        self.prefills += 1
        done = time.perf_counter()
        self.prefill_log.append(dict(rows=len(batch), tokens=sum(len(s.job.ids) - s.start for s in batch),
                                     reused=sum(s.start for s in batch), seconds=round(done - started, 4),
                                     waited=round(max(started - s.job.submitted for s in batch), 4)))
        for slot, token in zip(batch, first):
            slot.n_written = len(slot.job.ids)
            self._accept(slot, token)
            self._slots.append(slot)

    def _fail_all_active(self, message: str) -> None:
        for slot in self._slots:
            if not slot.done:
                slot.done = True
                _safe_emit(slot.job, [], True, message)
            self._pool.release(slot.blocks)
        self._slots = []

    def _shutdown(self) -> None:
        for slot in self._slots:
            if not slot.done:
                _safe_emit(slot.job, [], True, "the engine is shutting down")
        for job in self._waiting:
            _safe_emit(job, [], True, "the engine is shutting down")
        self._slots, self._waiting = [], deque()
        self.runner.release()
        if self.runner.cuda:
            torch.cuda.synchronize(self.runner.device)
            torch.cuda.empty_cache()


def _safe_emit(job: Job, tokens: list[int], finished: bool, error: str | None) -> None:
    try:
        job.emit(tokens, finished, error)
    except Exception:  # noqa: BLE001 - a broken consumer must not stop the scheduler
        log.exception("delivering tokens for %s failed", job.request_id)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text.lower():
        return "out of memory"
    return f"{type(exc).__name__}: {text}"
