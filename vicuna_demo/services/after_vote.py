"""Work done after a vote is stored, on one background thread, never on the visitor's path: the judge
model's category labels of an anonymous battle's first prompt, and the outlier-voter check every N votes.

    worker = BackgroundWorker("after-vote", max_queue=256)
    labeller = JudgeLabeller(engines["Judge"], "Judge", store, worker)   # --judge NAME
    labeller.submit(battle_id, first_prompt)         # returns at once; False when the queue is full
    outliers = OutlierCheck(store, worker, every=100)  # --outlier-check-every (0 = off)
    outliers.vote_stored()                           # the 100th, 200th ... vote queues a check

- ``BackgroundWorker``: a bounded queue and one daemon thread. A job that fails is logged and the next
  one runs; a job offered to a full queue is dropped and logged (the vote itself is stored already, so
  nothing but that job is lost).
- ``JudgeLabeller``: one short classification request to the judge's engine (``_ask``: through the one path
  to an engine, engines/dispatch.py, as the judge's verdicts), the answer read strictly
  (categories.parse_judge_answer: one JSON object of booleans, anything else gives no label and a log
  line), the labels appended to the store's ``battle_labels`` with labeller "judge:<name>". The rules'
  labels stored with the vote stay whatever the judge does.
- ``OutlierCheck``: data/outliers.check with ``apply``: the votes of a visitor whose votes the ratings find
  far less likely than chance allows are flagged as not counted (``vote_flags``, append-only, reason
  ``outlier_voter``), and the leaderboard leaves them out at its next refresh. Replicas sharing a store run
  one check at a time (a shared slot).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from ..data.categories import judge_labels, judge_messages, parse_judge_answer
from ..data.outliers import MIN_VOTES, Z, check
from ..data.records import LabelRecord
from ..data.shared import SharedSlot
from ..engines.dispatch import Dispatcher
from ..engines.protocol import SamplingParams

log = logging.getLogger("vicuna_demo.services.after_vote")

MAX_QUEUE = 256
LABEL_PARAMS = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=200)  # ten booleans fit in 200 tokens
LABEL_TIMEOUT_S = 120.0


class BackgroundWorker:
    """One daemon thread running queued jobs in order; the queue holds at most ``max_queue`` jobs."""

    def __init__(self, name: str = "after-vote", max_queue: int = MAX_QUEUE):
        self.name = name
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, max_queue))
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._closed = False

    def submit(self, what: str, job: Callable[[], object]) -> bool:
        """Queue ``job`` (``what`` names it in the log) -> False when it was dropped (queue full or closed)."""
        if self._closed:
            return False
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
        try:
            self._queue.put_nowait((what, job))
        except queue.Full:
            log.warning("%s: %d jobs are waiting, so %s was dropped", self.name, self._queue.maxsize, what)
            return False
        return True

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                what, job = item
                try:
                    job()
                except Exception:  # noqa: BLE001 - one job's failure must not stop the others
                    log.exception("%s: %s failed", self.name, what)
            finally:
                self._queue.task_done()

    def wait_idle(self, timeout_s: float = 10.0) -> bool:
        """True once every queued job has run (for tests and shutdown), False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self) -> None:
        """Run what is queued, then stop the thread (jobs offered later are dropped)."""
        self._closed = True
        if self._thread is not None:
            try:
                self._queue.put(None, timeout=1.0)
            except queue.Full:
                pass


class JudgeLabeller:
    """Category labels of a battle's first prompt from the judge model (see the module docstring)."""

    def __init__(self, engine, judge: str, store, worker: BackgroundWorker, *, params: SamplingParams = LABEL_PARAMS,
                 timeout_s: float = LABEL_TIMEOUT_S, dispatcher: Dispatcher | None = None):
        self.engine, self.judge, self.store, self.worker = engine, judge, store, worker
        self.params, self.timeout_s = params, timeout_s
        self.dispatcher = dispatcher or Dispatcher({judge: engine})    # the app's (ChatService.dispatcher) when given

    @property
    def labeller(self) -> str:
        return f"judge:{self.judge}"

    def submit(self, battle_id: str, prompt: str) -> bool:
        """Queue the labelling of ``battle_id``'s first prompt; returns at once."""
        return self.worker.submit(f"the category labels of battle {battle_id}", lambda: self.label(battle_id, prompt))

    def label(self, battle_id: str, prompt: str) -> list[str] | None:
        """Ask the judge, store its labels -> the labels, or None (no label: the reason is logged)."""
        try:
            text = self._ask(judge_messages(prompt))
        except Exception as exc:  # noqa: BLE001 - an engine error or a bug: no label, logged, never raised
            log.warning("the judge %s could not label battle %s: %s", self.judge, battle_id, exc)
            return None
        answer = parse_judge_answer(text)
        if answer is None:
            log.warning("the judge %s gave no JSON labels for battle %s; its answer began %r", self.judge, battle_id,
                        text[:120])
            return None
        labels = judge_labels(answer)
        self.store.log_labels(LabelRecord(battle_id=battle_id, tstamp=time.time(), labeller=self.labeller,
                                          labels=labels, answer=answer))
        return labels

    def _ask(self, messages: list[dict]) -> str:
        """The one request to the judge's engine -> its whole answer, through the one path to an engine
        (engines/dispatch.py; an EngineError when it has not ended after ``timeout_s``). The prompt is a visitor's
        text that moderation has seen already."""
        return self.dispatcher.send(self.judge, messages, self.params, timeout_s=self.timeout_s).text()


class OutlierCheck:
    """The outlier-voter check, queued on the worker after every ``every`` stored votes (0 = never)."""

    def __init__(self, store, worker: BackgroundWorker, *, every: int, min_votes: int = MIN_VOTES, z: float = Z):
        self.store, self.worker, self.every, self.min_votes, self.z = store, worker, max(0, every), min_votes, z
        self._votes = 0
        self._lock = threading.Lock()
        self._slot = SharedSlot(store, "outlier-check") if getattr(store, "shared", False) else threading.Lock()

    def vote_stored(self) -> bool:
        """Count a stored vote -> True when it made a check due and the check was queued."""
        if not self.every:
            return False
        with self._lock:
            self._votes += 1
            due = self._votes % self.every == 0
        return due and self.worker.submit("the outlier-voter check", self.run)

    def run(self) -> dict[str, tuple[int, float]]:
        """Check now and flag the outliers' votes -> client_hash -> (votes flagged, z); {} when another
        replica is checking."""
        if not self._slot.acquire(blocking=False):
            return {}
        try:
            found = check(self.store, min_votes=self.min_votes, z=self.z, apply=True)
        finally:
            self._slot.release()
        for client, (n, score) in found.items():
            log.warning("outlier-voter check: visitor %s... voted against the ratings (z = %.1f): %d votes flagged "
                        "as not counted", client[:12], score, n)
        return found
