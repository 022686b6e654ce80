"""One process-wide gate that keeps CUDA graph capture away from every other GPU call.

While a stream captures a CUDA graph (in PyTorch's default "global" mode), any other thread that
allocates, synchronises or copies makes the capture fail (``operation not permitted when stream is
capturing``) or hangs the process. With several models per process, one engine's warm-up must
therefore not overlap another model's loading or another engine's decode steps.

Start-up order (services/runtime.py, engines/startup.py) already loads every model before any warm-up
and warms the engines one at a time. The gate covers what remains: an engine that is ready serves
visitors while the next one warms up. An engine's warm-up (KV allocation, kernel tuning, graph capture,
prefill warm-up) holds the gate ``exclusive()``; loading a model and every serving step of every fast
path hold it ``shared()``, which costs a few microseconds per step. Writers go first: a warm-up waiting
for the gate stops new steps from starting, and serving resumes when the warm-up is done.
"""

from __future__ import annotations

import contextlib
import threading


class SharedExclusiveGate:
    """A readers-writer lock that prefers writers; not re-entrant."""

    def __init__(self):
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def shared(self):
        with self._cond:
            while self._exclusive or self._writers_waiting:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                if not self._shared:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self):
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._exclusive or self._shared:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


GPU_GATE = SharedExclusiveGate()
