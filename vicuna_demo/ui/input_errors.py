"""Input values gradio cannot use (a crafted API call: a file path never uploaded, text for a number, a
value outside a dropdown's choices) become one log line instead of a traceback.

gradio's queue prints a full traceback with ``traceback.print_exc()`` for every event whose inputs fail
its own checks, although nothing is wrong with the app: the caller gets gradio's error message either
way. ``quiet_bad_inputs()`` replaces the ``traceback`` module seen by ``gradio.queueing`` with a stand-in
that logs such errors in one WARNING line (the traceback at DEBUG) and prints every other error (a bug
in a handler) in full, as before.
"""

from __future__ import annotations

import logging
import sys
import traceback

log = logging.getLogger("vicuna_demo.requests")

# what gradio raises on input values (its checks and pydantic's), by name: one line each
_INPUT_ERRORS = {"InvalidPathError", "ComponentProcessingError", "ValidationError", "Error"}


def is_input_error(error: BaseException | None) -> bool:
    """An error gradio raised on a request's values, before any handler of this app ran."""
    while error is not None:
        module = type(error).__module__.split(".")[0]
        if module in ("gradio", "pydantic_core", "pydantic") and type(error).__name__ in _INPUT_ERRORS:
            return True
        error = error.__cause__
    return False


class _QuietTraceback:
    """The ``traceback`` module, except that ``print_exc`` keeps input errors to one line."""

    def __getattr__(self, name):
        return getattr(traceback, name)

    def print_exc(self, *args, **kwargs):
        error = sys.exc_info()[1]
        if not is_input_error(error):
            return traceback.print_exc(*args, **kwargs)
        text = " ".join(str(error).split())[:300]
        log.warning("A request's input values were refused: %s: %s", type(error).__name__, text)
        log.debug("the refused request", exc_info=True)


def quiet_bad_inputs() -> None:
    """Install the stand-in in gradio's queue (once per process)."""
    from gradio import queueing
    if not isinstance(queueing.traceback, _QuietTraceback):
        queueing.traceback = _QuietTraceback()
