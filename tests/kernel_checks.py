"""What the Triton-interpreter scripts of test_fastpath.py and test_quantized.py share: the fast path's kernel
decode step against its eager twin. Imported by those scripts (run in a subprocess with TRITON_INTERPRET=1,
which must be set before Triton loads), not by pytest itself."""

from __future__ import annotations

from typing import Callable

import torch


def compare_decode(eager, kernels, prompts: list[list[int]], tables: list[list[int]], note,
                   phases: list[tuple[int, Callable[[], None] | None]] = ((2, None), (1, None))) -> None:
    """Prefill ``prompts`` (block ``tables``) on both runners, then for each ``(rows, before)`` of ``phases``
    call ``before()`` (e.g. to choose the kernels the phase runs) and run 3 decode steps of that many rows fed
    the eager runner's greedy tokens; ``note(got, reference)`` gets every pair of logits.

    Each phase starts again from the prompts (the steps rewrite the same cache positions with the same values),
    so one prefill serves several kernel configurations: the interpreter's prefill costs as much as 3 steps."""
    from vicuna_demo.engines.fastpath import Job
    from vicuna_demo.engines.fastpath.jobs import Slot
    with torch.inference_mode():
        reference = eager.prefill([(p, t, 0) for p, t in zip(prompts, tables)])
        note(kernels.prefill([(p, t, 0) for p, t in zip(prompts, tables)]), reference)
        for rows, before in phases:
            if before is not None:
                before()
            slots = []
            for ids, table, logits in list(zip(prompts, tables, reference))[:rows]:
                slot = Slot(job=Job("x", ids, 8, 0.0, 1.0, frozenset(), lambda *x: None), blocks=table, start=0)
                slot.n_written, slot.generated = len(ids), [int(logits.argmax())]
                slots.append(slot)
            for runner in (eager, kernels):
                runner.load_rows(slots)
            for _ in range(3):
                x, y = eager._decode_torch(rows), kernels._decode_kernels(1 if rows == 1 else 4)[:rows]
                note(y, x)
                for runner in (eager, kernels):
                    runner.tokens[:rows] = x.argmax(-1)
                    runner.pos[:rows] += 1
