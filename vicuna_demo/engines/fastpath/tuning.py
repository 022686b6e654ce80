"""Warm-up measurements of the fast path on this GPU: GEMV vs cuBLAS per weight shape, attention splits,
and prefill kernels loaded before the first visitor (a mixin of ``FastModel``)."""

from __future__ import annotations

import logging
import math
from typing import Callable

import torch

from . import matmuls
from .weights import Projection

log = logging.getLogger("vicuna_demo.engines.fastpath")


class TuningMixin:
    """Measured choices of kernel configurations; needs FastModel's attributes."""

    def tune_gemv(self, progress: Callable[[str], None] = lambda m: None) -> dict:
        """For each projection shape and decode batch size, time the ways to compute it on this GPU and keep
        the fastest: cuBLAS against our GEMV for 16-bit weights (up to 8 rows); for int8 and 4-bit weights our
        GEMV (one row), our tiled kernel, a 16-bit copy + cuBLAS, and for 4-bit bitsandbytes' own matmul; each
        timed inside a CUDA graph, the way the decode step runs it (every candidate's time: ``tuning_detail``).
        Runs once, before the KV cache is sized (``measure_activation_peak`` calls it): the kernels it loads
        take GPU memory of their own, and the chosen ones' scratch is part of the measured decode peak."""
        if getattr(self, "gemv_chosen", None) is not None:
            progress(f"tuned matrix products for {len(self.gemv_chosen)} shapes and batch sizes")
            return self.gemv_chosen
        self.tuning_detail: dict[tuple, dict] = {}      # every candidate's time (µs per projection)
        self.rejected_configs: dict[str, float] = {}    # candidates whose result disagreed: relative error
        self.failed_configs: dict[str, str] = {}        # candidates that raised: the error's first line
        self.skipped_configs: dict[str, dict] = {}      # per shape and row count: {candidate: why not timed}
        if not (self.cuda and self.use_kernels):
            return {}
        groups: dict[tuple, list[Projection]] = {}
        for p in self.linears():
            if (p.weight is not None and self.options.tune_dense) or p.quant is not None:
                groups.setdefault(p.shape_key(), []).append(p)
        chosen = {}
        for key, members in groups.items():
            sample_set = members[:8]          # several layers' weights: more than the L2 cache holds
            k_dim = (members[0].quant.shape if members[0].quant is not None else members[0].weight.shape)[1]
            for rows in self.buckets:
                candidates, skipped = matmuls.candidates(members[0], rows)
                self.skipped_configs[str((key, rows))] = skipped
                if len(candidates) < 2:
                    continue
                x = torch.randn(rows, k_dim, device=self.device, dtype=self.dtype)
                reference = _reference(members[0], x)
                timings = []
                for config in candidates:
                    def run():
                        for p in sample_set:
                            p.run(x, config)
                    log.debug("timing %s x %d rows: %s", key, rows, config)
                    try:
                        error = _relative_error(members[0].run(x, config), reference)
                        if error > 2e-2:     # a kernel that computes something else on this GPU is never chosen
                            log.warning("projection config %s disagrees with the de-quantized weight (relative "
                                        "error %.3g): not used", config, error)
                            self.rejected_configs[str((key, rows, config))] = round(error, 4)
                            continue
                        timings.append((_time_ms(run), config))
                        torch.cuda.synchronize(self.device)       # a fault shows here, next to its candidate
                    except Exception as exc:  # noqa: BLE001 - a configuration this GPU cannot run
                        log.debug("projection config %s failed: %s", config, exc)
                        self.failed_configs[str((key, rows, config))] = (str(exc).splitlines() or [""])[0][:200]
                us = {str(c): round(t / len(sample_set) * 1000, 1) for t, c in timings}
                if not timings:
                    continue
                best_ms, best = min(timings, key=lambda t: t[0])
                for p in members:
                    p.config[rows] = best
                baseline = us.get("cublas", us.get("module", us.get("dequant")))   # cuBLAS / bitsandbytes / 16-bit copy
                chosen[(key[0], str(key[1]), rows)] = (best, round(best_ms / len(sample_set) * 1000, 1), baseline)
                self.tuning_detail[(key[0], str(key[1]), rows)] = us
        progress(f"tuned matrix products for {len(groups)} weight shapes")
        self.gemv_chosen = chosen
        return chosen

    def warm_prefill(self) -> None:
        """Run prefill once at typical sizes (and with a cached prefix) so that the kernels it needs are loaded
        now: CUDA loads kernels lazily, and the first 512-token prefill otherwise took ~0.7 s more."""
        shapes = [(1, 16), (1, 200), (1, 512), (2, 512), (4, 512), (8, 512), (1, 1500), (1, 3000)]
        for n, length in shapes:
            if n * length > max(self.options.prefill_tokens, 512) or length + 1 >= self.max_len:
                continue
            self.trial_prefill(n, length, modes=("greedy", "sample", "top_p"))
        length = min(600, self.max_len - 2)
        self.trial_prefill(1, length, start=length - 64)
        torch.cuda.synchronize(self.device)

    def _choose_splits(self, rows: int) -> tuple[int, int, int]:
        sms = torch.cuda.get_device_properties(self.device).multi_processor_count if self.cuda else 1
        splits = max(1, min(16, math.ceil(2 * sms / max(1, rows * self.n_heads))))
        self._splits[rows] = (splits, 4, 3)
        return self._splits[rows]

    def tune_attention(self, context: int = 1024, progress: Callable[[str], None] = lambda m: None) -> dict:
        """Per batch bucket, time the paged-attention kernel over ``context`` cached tokens per row with several
        (splits, warps, stages) and keep the fastest for the graphs. Runs once at warm-up, before capture."""
        from . import kernels as fk
        per_row = math.ceil((context + 1) / self.block)
        rows_max = min(self.max_rows, (self.n_blocks - 1) // per_row)
        if rows_max < 1:
            return {}
        table = torch.zeros(self.max_rows, self.blocks_per_row, dtype=torch.int32, device=self.device)
        blocks = torch.arange(1, 1 + rows_max * per_row, dtype=torch.int32, device=self.device).view(rows_max, per_row)
        table[:rows_max, :per_row] = blocks
        for layer in range(min(4, len(self.k_cache))):    # zeros would compress in memory and time too fast
            self.k_cache[layer][1:1 + rows_max * per_row].normal_()
            self.v_cache[layer][1:1 + rows_max * per_row].normal_()
        lens = torch.zeros(self.max_rows, dtype=torch.int32, device=self.device)
        lens[:rows_max] = context
        chosen = {}
        for rows in self.buckets:
            q = torch.randn(rows, self.n_heads, self.head_dim, device=self.device, dtype=self.dtype)
            best = None
            for splits in (1, 2, 4, 8, 16):
                if rows * self.n_heads * splits > 32768:
                    continue
                for warps, stages in ((4, 2), (4, 3), (8, 3), (4, 4)):
                    def run():
                        for layer in range(min(4, len(self.k_cache))):
                            fk.paged_attention(q, self.k_cache[layer], self.v_cache[layer], table[:rows], lens[:rows],
                                               splits, self.scale, warps, stages)
                    try:
                        ms = _time_ms(run)
                    except Exception as exc:  # noqa: BLE001 - a configuration this GPU cannot run
                        log.debug("attention config %s failed: %s", (splits, warps, stages), exc)
                        continue
                    if best is None or ms < best[0]:
                        best = (ms, (splits, warps, stages))
            if best is not None:
                self._splits[rows] = best[1]
                chosen[rows] = (best[1], round(best[0] / 4 * 1000, 1))
        progress(f"tuned attention for {len(chosen)} batch sizes")
        return chosen


def _time_ms(fn, reps: int = 10) -> float:
    """GPU time of ``fn`` replayed as a CUDA graph: what it costs inside a captured decode step, without the
    host's launch overhead (which on a slow host would otherwise decide the comparison)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    del graph
    return start.elapsed_time(end) / reps


def _reference(p: Projection, x: torch.Tensor) -> torch.Tensor | None:
    """x @ W.T with W as a 16-bit copy (quantized weights) or by cuBLAS (dense): what every candidate must match.
    None where the card has no room left for the copy (a 33B 4-bit model on a 24 GB card: its gate/up weight is
    456 MiB in fp16); the candidates are then timed unchecked, as before this check existed."""
    try:
        return p.run(x, matmuls.DEQUANT if p.quant is not None else matmuls.CUBLAS)
    except torch.OutOfMemoryError:
        log.info("no memory for the reference product of %s: its candidates are not checked", p.shape_key())
        torch.cuda.empty_cache()
        return None


def _relative_error(out: torch.Tensor, reference: torch.Tensor | None) -> float:
    if reference is None:
        return 0.0
    ref = reference.float()
    return float((out.float() - ref).norm() / ref.norm().clamp_min(1e-12))
