"""``FastScheduler``: the one thread that owns a ``FastModel``: admits jobs, prefills, decodes every active
request in one step, streams tokens through ``Job.emit``, cancels, and fails requests cleanly.

Admission: waiting requests are prefilled together while rows and KV blocks allow and the batch's padded size
stays within ``prefill_tokens``; a request that reuses a cached prefix is prefilled on its own; each one's
first token comes from its prefill."""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import threading
import time
from collections import deque
from typing import Callable

import torch

from ..gpugate import GPU_GATE
from .jobs import Job, Slot, describe, safe_emit
from .kvpool import BlockPool
from .model import FastModel
from .sampling import row_parameters, sample, sampling_mode, seen_mask

log = logging.getLogger("vicuna_demo.engines.fastpath")


class FastScheduler:
    """Owns a FastModel and a thread that admits, prefills and decodes every request (the ``fast`` back end
    of engines/backends.py: start, wait_ready, submit, cancel, alive, close, held_request_ids).

    The thread keeps up to two decode steps in flight on CUDA: while the GPU runs step t+1 the
    host hands out the tokens of step t. A request that finishes is noticed one step late; the extra
    token is discarded (its blocks were reserved for it).

    KV memory: ``kv_bytes`` (the start-up plan's share, engines/memory.py), else ``kv_blocks`` of the
    options, else on CUDA what is free after the measured activation peak. On CUDA the start-up work
    (allocation, tuning, capture) holds the process's GPU gate exclusively and every step holds it shared
    (engines/gpugate.py), so one engine's graph capture never overlaps another's steps."""

    kind = "fast"

    def __init__(self, runner: FastModel, name: str = "model", kv_bytes: int | None = None):
        self.runner = runner
        self.name = name
        self.kv_bytes = kv_bytes
        self._inbox: queue.Queue = queue.Queue()
        self._cancelled: set[str] = set()
        self._cancel_lock = threading.Lock()
        self._waiting: deque[Job] = deque()
        self._slots: list[Slot] = []
        self._closed = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool: BlockPool | None = None
        self.warm_error: BaseException | None = None     # why the warm-up failed (the thread has ended), or None
        self.status = "starting"
        self._admit_blocked = False
        self.tuning: dict = {}
        self.attention_tuning: dict = {}
        self.free_mib: dict[str, int] = {}     # GPU memory free after each warm-up phase (``_note_free``)
        self.prefill_log: deque = deque(maxlen=256)     # recent prefills: rows, tokens, seconds, waited
        self.launch_times: deque = deque(maxlen=4096)   # when recent decode steps were launched
        self._host: list[torch.Tensor] = []
        self.steps = 0

    # -- public ---------------------------------------------------------------------------------------
    def start(self, progress: Callable[[str], None] = lambda m: None) -> None:
        """Start the thread; it allocates the cache and captures graphs first (``ready()`` tells when)."""
        self._progress = progress
        self._thread = threading.Thread(target=self._run, name=f"fastpath-{self.name}", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        self._ready.wait(timeout)
        if self.warm_error is not None:
            raise self.warm_error
        return self._ready.is_set()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closed.is_set()

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

    @property
    def kv_tokens(self) -> int | None:
        """Tokens the KV cache holds (None until it is allocated)."""
        runner = self.runner
        return (runner.n_blocks - 1) * runner.block if runner.n_blocks and self._ready.is_set() else None

    def free_block_ids(self) -> list[int]:
        """KV blocks no request holds (benchmarks time attention over them while the engine is idle)."""
        return list(self._pool.free) if self._pool is not None else []

    def held_request_ids(self) -> set[str]:
        """The requests this scheduler still holds: submitted, waiting, or being decoded."""
        held = {job.request_id for job in list(self._inbox.queue) if job is not None}
        held |= {job.request_id for job in list(self._waiting)}
        held |= {slot.job.request_id for slot in list(self._slots) if not slot.done}
        return held

    # -- thread ----------------------------------------------------------------------------------------
    def _run(self) -> None:
        runner = self.runner
        if not runner.cuda and runner.options.cpu_threads:
            torch.set_num_threads(runner.options.cpu_threads)   # per thread: the rest of the process keeps its own
        with torch.cuda.stream(runner.stream) if runner.cuda else contextlib.nullcontext(), torch.inference_mode():
            try:
                with GPU_GATE.exclusive() if runner.cuda else contextlib.nullcontext():
                    self._prepare()
            except BaseException as exc:  # noqa: BLE001 - reported to whoever waits for readiness
                self._start_failed(exc)
                return
            self._ready.set()
            self._loop()

    def _prepare(self) -> None:
        """Allocate the KV cache, tune kernels, capture graphs, warm prefill (the thread's first work)."""
        runner = self.runner
        started = time.perf_counter()
        progress = lambda message: self._progress(f"{self.name}: {message}")   # noqa: E731
        self.status = "allocating the KV cache"
        progress("allocating the KV cache")
        blocks = None if self.kv_bytes is None else max(1, self.kv_bytes // runner.kv_bytes_per_block())
        runner.allocate_cache(blocks)
        self._note_free("kv cache allocated")
        if runner.use_kernels:
            self.status = "tuning kernels"
            self.tuning = runner.tune_gemv(progress)
            self.attention_tuning = runner.tune_attention(progress=progress)
            self._note_free("kernels tuned")
        if runner.use_graphs:
            self.status = "capturing CUDA graphs"
            runner.capture(progress)
            self._note_free("graphs captured")
        if runner.cuda:
            self.status = "warming up prefill"
            progress("warming up prefill")
            runner.warm_prefill()
            self._note_free("prefill warmed")
            self._host = [torch.empty(runner.max_rows, dtype=torch.long, pin_memory=True) for _ in range(4)]
        self._pool = BlockPool(runner.n_blocks, runner.block, runner.options.prefix_cache)
        progress(f"fast path ready in {time.perf_counter() - started:.1f} s "
                 f"({runner.n_blocks - 1} KV blocks of {runner.block} tokens, "
                 f"{'CUDA graphs' if runner.graphs else 'no CUDA graphs'}, "
                 f"{'Triton kernels' if runner.use_kernels else 'eager ops'}"
                 f"{': ' + runner.kernel_problem if runner.kernel_problem else ''})")
        self.status = "ready"

    def _note_free(self, phase: str) -> None:
        """Record the GPU memory free (MiB) after a warm-up phase: where a card's memory went, in the
        benchmarks' records and in the log of a failed start."""
        if self.runner.cuda:
            self.free_mib[phase] = torch.cuda.mem_get_info(self.runner.device)[0] // 2**20

    def _start_failed(self, exc: BaseException) -> None:
        log.exception("fast path warm-up failed (MiB free after each phase: %s)", self.free_mib)
        runner = self.runner
        runner.release()
        if runner.cuda:
            torch.cuda.empty_cache()   # give the KV pool back: a fallback back end needs the memory
        self.warm_error = exc
        self.status = f"failed: {exc}"
        self._ready.set()
        self._closed.set()
        while True:    # requests that arrived during the warm-up end now instead of timing out
            try:
                job = self._inbox.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                safe_emit(job, [], True, f"the fast path could not start ({describe(exc)})")

    def _loop(self) -> None:
        runner = self.runner
        inflight: deque = deque()
        reload = True
        gate = GPU_GATE.shared if runner.cuda else contextlib.nullcontext
        while not self._closed.is_set():
            idle = not self._slots and not inflight and not (self._waiting and not self._admit_blocked)
            if self._take_inbox(block=idle):
                self._admit_blocked = False
            if self._closed.is_set():
                break
            with gate():
                reload = self._work(inflight, reload)
        self._shutdown()

    def _work(self, inflight: deque, reload: bool) -> bool:
        """Retire, admit and prefill, launch one decode step and process the previous one. -> reload flag."""
        runner = self.runner
        try:
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
                return reload
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
            self._fail_all_active(describe(exc))
            reload = True
        return reload

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
            for job in [j for j in self._waiting if j.request_id in cancelled]:
                self._waiting.remove(job)
                safe_emit(job, [], True, None)
                changed = True
        return changed

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

    def _next_batch(self) -> list["Slot"]:
        runner, pool = self.runner, self._pool
        budget = runner.options.prefill_tokens
        batch: list[Slot] = []
        longest = 0
        while self._waiting and len(self._slots) + len(batch) < runner.max_rows:
            job = self._waiting[0]
            if len(job.ids) + job.max_new + 1 > runner.max_len:
                self._waiting.popleft()
                safe_emit(job, [], True, "the prompt and reply do not fit the model's context window")
                continue
            if not job.ids or min(job.ids) < 0 or max(job.ids) >= runner.n_embeddings:
                self._waiting.popleft()   # an out-of-range id would fault the GPU for every request
                safe_emit(job, [], True, "the prompt has a token id outside the model's vocabulary")
                continue
            reused, start = pool.reuse(job.ids) if pool.keep_cache else ([], 0)
            # the batch is padded to its longest prompt: its padded size stays within the budget (the
            # activation peak measured at warm-up is a prefill of ``prefill_tokens`` tokens)
            padded = (len(batch) + 1) * max(longest, len(job.ids) - start)
            if batch and (padded > budget or start or batch[0].start):
                pool.remember(job.ids[:start], reused)      # a reused prefix is prefilled on its own
                break
            need = math.ceil((len(job.ids) + job.max_new + 1) / runner.block) - len(reused)
            fresh = pool.take(need)
            if fresh is None:
                pool.remember(job.ids[:start], reused)
                if not self._slots and not batch:
                    self._waiting.popleft()
                    safe_emit(job, [], True, "not enough KV-cache memory for this request")
                    continue
                self._admit_blocked = True
                break
            self._waiting.popleft()
            batch.append(Slot(job=job, blocks=reused + fresh, start=start))
            longest = max(longest, len(job.ids) - start)
        return batch

    def _prefill(self, batch: list[Slot]) -> None:
        runner = self.runner
        started = time.perf_counter()
        try:
            logits = runner.prefill([(s.job.ids, s.blocks, s.start) for s in batch])
            jobs = [s.job for s in batch]
            dev = runner.device
            temperature, top_p, greedy, penalty = row_parameters(jobs, len(jobs), dev)
            seen = seen_mask([j.ids for j in jobs], [j.repetition_penalty for j in jobs], logits.shape[-1], dev)
            first = sample(logits, temperature, top_p, greedy, sampling_mode(jobs), penalty, seen).tolist()
        except Exception as exc:  # noqa: BLE001 - these requests fail; the others go on
            log.exception("%s: prefill failed", self.name)
            for slot in batch:
                self._pool.release(slot.blocks)
                safe_emit(slot.job, [], True, describe(exc))
            return
        done = time.perf_counter()
        self.prefill_log.append(dict(rows=len(batch), tokens=sum(len(s.job.ids) - s.start for s in batch),
                                     reused=sum(s.start for s in batch), seconds=round(done - started, 4),
                                     waited=round(max(started - s.job.submitted for s in batch), 4)))
        for slot, token in zip(batch, first):
            slot.n_written = len(slot.job.ids)
            self._accept(slot, token)
            self._slots.append(slot)

    def _launch(self, inflight: deque) -> None:
        runner = self.runner
        mode = sampling_mode([slot.job for slot in self._slots])
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
        for slot, token in zip(snapshot, host.tolist()):
            if not slot.done:
                self._accept(slot, token)

    def _accept(self, slot: Slot, token: int) -> None:
        slot.generated.append(token)
        finished = token in slot.job.eos or len(slot.generated) >= slot.job.max_new
        if finished:
            slot.done = True
        safe_emit(slot.job, [token], finished, None)

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
                    safe_emit(slot.job, [], True, None)      # cancelled: tell the reader it ended
                tokens = (slot.job.ids + slot.generated)[: slot.n_written]
                pool.remember(tokens, slot.blocks)
            else:
                keep.append(slot)
        if len(keep) != len(self._slots):
            self._admit_blocked = False
        self._slots = keep

    def _fail_all_active(self, message: str) -> None:
        for slot in self._slots:
            if not slot.done:
                slot.done = True
                safe_emit(slot.job, [], True, message)
            self._pool.release(slot.blocks)
        self._slots = []

    def _shutdown(self) -> None:
        self._fail_all_active("the engine is shutting down")
        for job in self._waiting:
            safe_emit(job, [], True, "the engine is shutting down")
        self._waiting = deque()
        self.runner.release()
        if self.runner.cuda:
            torch.cuda.synchronize(self.runner.device)
            torch.cuda.empty_cache()
