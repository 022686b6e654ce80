"""A request as the fast path's scheduler holds it (``Job``), its decoding state (``Slot``), and how tokens
and failures are handed back (``safe_emit``, ``describe``)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

log = logging.getLogger("vicuna_demo.engines.fastpath")


@dataclass
class Job:
    """One request. ``emit(tokens, finished, error)`` is called on the back end's thread."""

    request_id: str
    ids: list[int]
    max_new: int
    temperature: float
    top_p: float
    eos: frozenset[int]
    emit: Callable[[list[int], bool, str | None], None]
    submitted: float = field(default_factory=time.perf_counter)
    repetition_penalty: float = 1.0    # 1.0 = off; over the prompt and the reply (sampling.penalize)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 1e-5


@dataclass
class Slot:
    job: Job
    blocks: list[int]
    start: int                         # tokens already cached (prefix reuse)
    generated: list[int] = field(default_factory=list)
    n_written: int = 0                 # positions whose K/V are in the cache
    done: bool = False


def safe_emit(job: Job, tokens: list[int], finished: bool, error: str | None) -> None:
    try:
        job.emit(tokens, finished, error)
    except Exception:  # noqa: BLE001 - a broken consumer must not stop the scheduler
        log.exception("delivering tokens for %s failed", job.request_id)


def describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text.lower():
        return "out of memory"
    return f"{type(exc).__name__}: {text}"
