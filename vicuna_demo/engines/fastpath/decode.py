"""The decode step on CUDA and its CUDA graphs (a mixin of ``FastModel``): one step of the fused Triton kernels,
one graph per (batch bucket, sampling mode) captured at warm-up and replayed per step, and the host-side
rows loaded into the step's fixed device buffers."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

import torch

from .forward import decoder
from .sampling import mark_seen, row_parameters, sample, seen_mask
from .weights import Projection

log = logging.getLogger("vicuna_demo.engines.fastpath")

if TYPE_CHECKING:
    from .jobs import Slot


class DecodeMixin:
    """Decode steps over FastModel's buffers (tokens, pos, active, table, sampling rows) and layers."""

    def _decode_kernels(self, rows: int) -> torch.Tensor:
        """One decode step with the fused Triton kernels; shapes depend only on ``rows`` (graph-safe)."""
        from . import kernels as fk
        tokens, pos, table = self.tokens[:rows], self.pos[:rows], self.table[:rows]
        seq_lens = ((pos + 1) * self.active[:rows]).to(torch.int32)
        phys = table.gather(1, (pos // self.block)[:, None].to(torch.int64).clamp(max=self.blocks_per_row - 1)
                            .to(torch.int64))[:, 0]
        off = pos % self.block
        splits, warps, stages = self._splits.get(rows) or self._choose_splits(rows)
        spec = self.spec

        def attend(li, q, k, v):
            cos, sin = self.rope[spec.rope_keys[li]]
            q = fk.rope_store(q, k, v, cos, sin, pos, phys, off, self.k_cache[li], self.v_cache[li],
                              self.n_heads, self.n_kv)
            return fk.paged_attention(q, self.k_cache[li], self.v_cache[li], table, seq_lens, splits, self.scale,
                                      warps, stages, window=spec.windows[li], softcap=spec.attn_softcap)

        return self.logits(decoder(self, self.embed(tokens), attend, self.ops))

    def linears(self) -> list[Projection]:
        return [p for layer in self.layers for p in layer.projections()] + [self.lm_head]

    def _step(self, rows: int, mode: str) -> torch.Tensor:
        logits = self._decode_kernels(rows) if self.use_kernels else self._decode_torch(rows)
        nxt = sample(logits, self.temperature[:rows], self.top_p[:rows], self.greedy[:rows], mode,
                     self.penalty[:rows], self.seen[:rows])
        mark_seen(self.seen[:rows], nxt)
        self.next_tokens[:rows].copy_(nxt)
        self.tokens[:rows].copy_(nxt)
        self.pos[:rows] += self.active[:rows]
        return self.next_tokens[:rows]

    def bucket(self, n_active: int) -> int:
        """The batch size the step runs for ``n_active`` rows (the last bucket is ``max_rows``)."""
        return next(b for b in self.buckets if b >= n_active)

    def decode(self, n_active: int, mode: str) -> tuple[int, torch.Tensor]:
        """Launch one decode step for rows [0, n_active). -> (rows computed, next-token tensor on the device)."""
        if not self.use_kernels:
            return n_active, self._step(n_active, mode)
        rows = self.bucket(n_active)
        graph = self.graphs.get((rows, mode))
        if graph is None:
            return rows, self._step(rows, mode)
        graph.replay()
        return rows, self.next_tokens[:rows]

    def capture(self, progress: Callable[[str], None] = lambda m: None) -> None:
        """Capture one CUDA graph per (batch bucket, sampling mode). Runs on the scheduler's thread."""
        self.active.zero_()
        self.table.zero_()
        self.pos.zero_()
        modes = ("greedy", "sample", "top_p")
        for rows in self.buckets:          # compile the Triton kernels and warm cuBLAS outside capture
            for mode in modes:
                self._step(rows, mode)
        torch.cuda.synchronize(self.device)
        self._graph_pool = torch.cuda.graph_pool_handle()
        done = 0
        try:
            for rows in reversed(self.buckets):   # largest first: later graphs reuse its pool memory
                if not all(p.capturable(rows) for p in self.linears()):
                    continue                      # decoded eagerly (e.g. bitsandbytes' outlier matmul)
                for mode in modes:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=self._graph_pool, stream=self.stream):
                        self._step(rows, mode)
                    self.graphs[(rows, mode)] = graph
                    done += 1
                progress(f"captured CUDA graphs for up to {rows} requests ({done}/{len(self.buckets) * len(modes)})")
        except Exception as exc:  # noqa: BLE001 - e.g. a layer that synchronises: run the steps eagerly
            log.warning("CUDA-graph capture failed (%s: %s); decoding without graphs",
                        type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
            self.graphs.clear()
            self.use_graphs = False
            progress("CUDA graphs unavailable for this model; decoding without them")
        torch.cuda.synchronize(self.device)
        self.pos.zero_()

    def release(self) -> None:
        """Drop the graphs and the KV cache (the model's weights stay with the caller)."""
        self.graphs.clear()
        self.k_cache, self.v_cache = [], []
        self._graph_pool = None

    def load_rows(self, rows: list["Slot"]) -> None:
        """Write the host-side state of rows [0, len(rows)) to the device buffers; clear the rest."""
        size = self.max_rows
        tokens = torch.zeros(size, dtype=torch.long)
        pos = torch.zeros(size, dtype=torch.long)
        active = torch.zeros(size, dtype=torch.long)
        table = torch.zeros(size, self.blocks_per_row, dtype=torch.int32)
        for i, slot in enumerate(rows):
            tokens[i], pos[i], active[i] = slot.generated[-1], slot.n_written, 1
            table[i, :len(slot.blocks)] = torch.tensor(slot.blocks, dtype=torch.int32)
        jobs = [slot.job for slot in rows]
        for dst, src in zip((self.tokens, self.pos, self.active, self.table, self.temperature, self.top_p, self.greedy,
                             self.penalty), (tokens, pos, active, table, *row_parameters(jobs, size, "cpu"))):
            dst.copy_(src)
        # each penalised row's seen tokens (prompt + reply so far); the step adds every new token itself
        self.seen.zero_()
        if any(job.repetition_penalty != 1.0 for job in jobs):
            self.seen[:len(rows)].copy_(seen_mask([s.job.ids + s.generated for s in rows],
                                                  [job.repetition_penalty for job in jobs], self.vocab, self.device))
