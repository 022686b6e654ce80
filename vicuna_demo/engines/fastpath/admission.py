"""Admission in the fast path's scheduler: which waiting requests are prefilled together (rows and KV blocks
allow, the batch's padded size stays within ``prefill_tokens``, a reused prefix goes alone) and the prefill
that gives each its first token (a mixin of ``FastScheduler``, run on its thread)."""

from __future__ import annotations

import logging
import math
import time

from .jobs import Slot, describe, safe_emit
from .sampling import row_parameters, sample, sampling_mode, seen_mask

log = logging.getLogger("vicuna_demo.engines.fastpath")


class AdmissionMixin:
    """Needs FastScheduler's runner, _pool, _waiting, _slots, _admit_blocked, prefill_log, _accept."""

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

