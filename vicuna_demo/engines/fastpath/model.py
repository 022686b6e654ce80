"""``FastModel``: the model's math over its own weights with a paged KV cache: prefill, the decode step (eager
ops on a CPU, fused Triton kernels on CUDA), one CUDA graph per (batch bucket, sampling mode) captured at
warm-up and replayed per step, and the host-side rows loaded into the step's fixed device buffers. Warm-up
timing is ``tuning.py``'s."""

from __future__ import annotations

import logging
import math
from typing import Callable

import torch
from torch.nn.attention.bias import causal_lower_right

from .arch import Unsupported, describe
from .forward import EagerOps, KernelOps, attention, decoder, key_mask, rotate
from .jobs import Slot
from .options import FastOptions
from .sampling import mark_seen, row_parameters, sample, seen_mask
from .tuning import TuningMixin
from .weights import Norm, LayerWeights, Projection

log = logging.getLogger("vicuna_demo.engines.fastpath")


def _written_only(keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor):
    """Zero the cache slots a row has not written (``mask`` [rows, 1, 1, S] is True where written).

    On a CPU the pool is ``torch.empty`` (pages are touched only when used), so slots past a row's length
    hold whatever the heap held, NaN included; attention gives them weight 0, but 0 * NaN is NaN."""
    written = mask.transpose(-1, -2)                     # [rows, 1, S, 1]
    return keys.masked_fill(~written, 0), values.masked_fill(~written, 0)


def _pow2_buckets(limit: int) -> list[int]:
    buckets, b = [], 1
    while b < limit:
        buckets.append(b)
        b = b * 2 if b < 16 else b + 16
    buckets.append(limit)
    return sorted(set(buckets))


class FastModel(TuningMixin):
    """The model's math over its own weights, with a paged KV cache. Single-threaded: the scheduler's thread
    is the only caller once warm-up starts."""

    def __init__(self, model, max_context: int, options: FastOptions | None = None):
        try:
            self.spec = spec = describe(model)
        except Unsupported as exc:
            raise ValueError(f"fast path unsupported: {exc}") from None
        self.options = options = options or FastOptions()
        self.model = model
        self.device = model.model.embed_tokens.weight.device
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            # Prefill attention without cuDNN's (process-wide: the flag is global): on an H200 PyTorch 2.11
            # picks cuDNN, which builds a plan per new shape with memory outside PyTorch's allocator, so a card
            # whose KV cache took what the plan gave failed its first request of an unseen length (16 GB card,
            # 7B 8-bit). Flash attention needs no such memory.
            torch.backends.cuda.enable_cudnn_sdp(False)
        self.dtype = model.model.embed_tokens.weight.dtype
        self.n_heads, self.n_kv, self.head_dim, self.scale = spec.n_heads, spec.n_kv, spec.head_dim, spec.scale
        self.max_len = int(max_context) + 2          # + the extra step a pipelined reply may take
        # why a GPU runs eager ops instead of the Triton kernels (None: kernels, or a CPU, whose route is eager)
        self.kernel_problem = _triton_problem() if self.cuda and options.kernels else None
        self.use_kernels = bool(self.cuda and options.kernels and self.kernel_problem is None)
        self.use_graphs = bool(self.cuda and options.cuda_graphs and self.use_kernels)
        self.max_rows = int(options.max_rows or (64 if self.cuda else 8))
        self.block = int(options.block_size or (64 if self.cuda else math.ceil(self.max_len / 16) * 16))
        self.blocks_per_row = math.ceil(self.max_len / self.block)
        fuse = True if options.fuse_projections is None else bool(options.fuse_projections)
        self.pipelined = self.cuda if options.pipeline is None else bool(options.pipeline)
        quant = self.use_kernels and options.quant_kernels
        self.layers = [LayerWeights(layer, fuse=fuse, quant_kernels=quant, spec=spec)
                       for layer in model.model.layers[: spec.n_layers]]
        self.embed = model.model.embed_tokens
        self.n_embeddings = int(self.embed.weight.shape[0])
        self.final_norm = Norm(model.model.norm, spec.arch.gemma_norm)
        self.lm_head = Projection(model.lm_head)
        self.vocab = int(model.lm_head.weight.shape[0]) if getattr(model.lm_head, "weight", None) is not None \
            else int(model.config.get_text_config().vocab_size)
        self.rope: dict[str | None, tuple[torch.Tensor, torch.Tensor]] = {}   # rotary tables [max_len, head_dim]
        with torch.inference_mode():
            positions = torch.arange(self.max_len, device=self.device)[None]
            probe = torch.zeros(1, dtype=self.dtype, device=self.device)
            for key in dict.fromkeys(spec.rope_keys):
                args = (probe, positions) if key is None else (probe, positions, key)
                cos, sin = model.model.rotary_emb(*args)
                self.rope[key] = (cos[0].contiguous(), sin[0].contiguous())
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []
        self.n_blocks = 0
        # decode-step buffers (rows beyond the active ones are idle: length 0, writing to trash block 0)
        rows = self.max_rows
        dev = self.device
        self.tokens = torch.zeros(rows, dtype=torch.long, device=dev)
        self.pos = torch.zeros(rows, dtype=torch.long, device=dev)
        self.active = torch.zeros(rows, dtype=torch.long, device=dev)
        self.table = torch.zeros(rows, self.blocks_per_row, dtype=torch.int32, device=dev)
        self.temperature = torch.ones(rows, dtype=torch.float32, device=dev)
        self.top_p = torch.ones(rows, dtype=torch.float32, device=dev)
        self.greedy = torch.ones(rows, dtype=torch.bool, device=dev)
        self.penalty = torch.ones(rows, dtype=torch.float32, device=dev)        # repetition penalty, 1.0 = off
        self.seen = torch.zeros(rows, self.vocab, dtype=torch.bool, device=dev)  # tokens each row has seen
        self.next_tokens = torch.zeros(rows, dtype=torch.long, device=dev)
        self.buckets = _pow2_buckets(rows)
        # All of this model's GPU work (eager prefill, graph capture and replay) runs on one stream of its own.
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.graphs: dict[tuple[int, str], torch.cuda.CUDAGraph] = {}
        self._graph_pool = None
        self._splits: dict[int, int] = {}

    # -- memory ----------------------------------------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        element = torch.finfo(self.dtype).bits // 8
        return 2 * len(self.layers) * self.n_kv * self.block * self.head_dim * element

    def useful_kv_bytes(self) -> int:
        """The most KV memory this model can use: every row of a full batch at the full context."""
        return (self.max_rows * self.blocks_per_row + 1) * self.kv_bytes_per_block()

    def allocate_cache(self, n_blocks: int | None = None, *, whole_context: bool = True) -> int:
        """Allocate the KV pool: ``n_blocks``, else the options' ``kv_blocks``, else on CUDA what is free after
        the measured activation peak (engines/memory.py; the start-up plan passes its share instead), else
        a small pool on CPU; at least one whole context unless ``whole_context`` is False (the measuring
        pool). Returns the number of blocks."""
        per_block = self.kv_bytes_per_block()
        if n_blocks is None:
            n_blocks = self.options.kv_blocks
        if n_blocks is None:
            if self.cuda:
                from ..memory import kv_total
                reserve = self.measure_activation_peak()
                free, _ = torch.cuda.mem_get_info(self.device)
                n_blocks = min(kv_total(free, [reserve]), self.useful_kv_bytes()) // per_block
            else:
                n_blocks = 2 * self.max_rows + 1
        n_blocks = int(max(n_blocks, self.blocks_per_row + 1 if whole_context else 1))
        shape = (n_blocks, self.n_kv, self.block, self.head_dim)
        alloc = torch.zeros if self.cuda else torch.empty   # CPU: pages are touched only when used
        self.k_cache = [alloc(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.v_cache = [alloc(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.n_blocks = n_blocks
        return n_blocks

    def measure_activation_peak(self) -> int:
        """Bytes to keep free besides the weights and the KV cache, measured on this GPU: the peak of the
        largest prefill (``prefill_tokens`` tokens, the scheduler's padded limit) plus the peak of a decode
        step of a full batch (about what the CUDA-graph pool keeps), plus memory.ENGINE_MARGIN_BYTES.
        Uses a pool of the trash block alone (every block table is zeros: all writes go to block 0), so that a
        large model's measurement needs no context of KV memory (33B: 6.6 GB) beside its weights; frees it.
        The projections are tuned first (``tune_gemv``): the decode step measured is the one the graphs will
        hold, and the kernels tuning loads (GPU memory outside PyTorch's count) are in place before anyone
        reads what is free. 0 on a CPU."""
        if not self.cuda:
            return 0
        from ..memory import ENGINE_MARGIN_BYTES
        self.tune_gemv()
        dev = self.device
        temporary = not self.k_cache
        if temporary:
            self.allocate_cache(1, whole_context=False)
        peaks = []
        with torch.inference_mode(), torch.cuda.device(dev):
            for run in (self._peak_prefill, self._peak_decode):
                torch.cuda.synchronize(dev)
                base = torch.cuda.memory_allocated(dev)
                torch.cuda.reset_peak_memory_stats(dev)
                run()
                torch.cuda.synchronize(dev)
                peaks.append(max(0, torch.cuda.max_memory_allocated(dev) - base))
        if temporary:
            self.release()
            self.n_blocks = 0
        torch.cuda.empty_cache()
        self.measured_peaks = {"prefill": peaks[0], "decode": peaks[1]}
        return max(peaks) + peaks[1] + ENGINE_MARGIN_BYTES

    def _peak_prefill(self) -> None:
        """The largest prefill the scheduler runs: ``prefill_tokens`` tokens, in as many sequences as the
        context needs (a 2,048-token model prefills 8 x 512 at once; one 2,045-token sequence measured half)."""
        length = max(16, min(self.options.prefill_tokens, self.max_len - 3))
        self.trial_prefill(max(1, self.options.prefill_tokens // length), length, modes=("top_p",))

    def _peak_decode(self) -> None:
        self._idle_rows()
        self._step(self.max_rows, "top_p")
        self.pos.zero_()

    def trial_prefill(self, n: int, length: int, start: int = 0, modes: tuple[str, ...] = ()) -> None:
        """Prefill ``n`` prompts of ``length`` tokens (``start`` of them taken as cached) into the trash block 0,
        then sample their logits in each of ``modes``: warm-up's loads and measurements."""
        logits = self.prefill([([1] * length, [0] * math.ceil(length / self.block), start)] * n)
        ones = torch.ones(n, device=self.device)
        for mode in modes:
            sample(logits, ones, ones * 0.9, torch.zeros(n, dtype=torch.bool, device=self.device), mode)

    def _idle_rows(self) -> None:
        """Every row of the step's buffers idle: length 0, writing to the trash block 0."""
        self.active.zero_()
        self.table.zero_()
        self.pos.zero_()

    # -- prefill -----------------------------------------------------------------------------------
    def prefill(self, rows: list[tuple[list[int], list[int], int]]) -> torch.Tensor:
        """rows: (all token ids, KV block list, start) per request; tokens [start:] are computed and their K/V
        stored; tokens before ``start`` must already be in the request's blocks. -> last-token logits [n, vocab] fp32."""
        n = len(rows)
        starts = torch.tensor([start for _, _, start in rows])
        lens = torch.tensor([len(ids) - start for ids, _, start in rows])
        length = int(lens.max())
        dev = self.device
        ids = torch.zeros(n, length, dtype=torch.long)
        block_table = torch.zeros(n, max(len(blocks) for _, blocks, _ in rows), dtype=torch.long)
        for i, (tokens, blocks, start) in enumerate(rows):
            ids[i, :len(tokens) - start] = torch.tensor(tokens[start:])
            block_table[i, :len(blocks)] = torch.tensor(blocks, dtype=torch.long)
        positions = torch.clamp(torch.arange(length)[None, :] + starts[:, None], max=self.max_len - 1)
        w_rows, w_t = (torch.arange(length)[None, :] < lens[:, None]).nonzero(as_tuple=True)   # the new tokens
        written = positions[w_rows, w_t]
        w_phys, w_off = block_table[w_rows, written // self.block], written % self.block
        if self.use_kernels:   # every (row, t) slot, padding included: padding writes go to trash block 0
            tok_phys = torch.zeros(n, length, dtype=torch.long)
            tok_phys[w_rows, w_t] = w_phys
            tok_phys, tok_off = tok_phys.view(-1).to(dev), (positions % self.block).view(-1).to(dev)
        w_rows, w_t, w_phys, w_off = w_rows.to(dev), w_t.to(dev), w_phys.to(dev), w_off.to(dev)
        ids, positions = ids.to(dev), positions.to(dev)
        with_prefix = bool((starts > 0).any())
        totals = starts + lens
        kv_len = int(totals.max()) if with_prefix else length
        spec, hd = self.spec, self.head_dim
        if with_prefix:
            gather = block_table[:, :math.ceil(kv_len / self.block)].to(dev)
        masks: dict = {}

        def mask_for(window):
            """The attention mask of a layer with ``window`` (None: is_causal, or causal_lower_right for one
            row over its cached prefix: the forms that keep flash attention)."""
            window = window if window and window < kv_len else None
            if window not in masks:
                if not with_prefix and window is None:
                    masks[window] = None
                elif with_prefix and n == 1 and window is None:
                    masks[window] = causal_lower_right(length, kv_len)
                else:
                    k_pos = torch.arange(kv_len, device=dev)[None, None, :]
                    q_pos = positions[:, :, None] if with_prefix else torch.arange(length, device=dev)[None, :, None]
                    masks[window] = key_mask(q_pos, k_pos, window=window)[:, None]      # [n or 1, 1, T, S]
            return masks[window]

        tables = {key: (cos[positions][:, None], sin[positions][:, None]) for key, (cos, sin) in self.rope.items()}
        fused = self.use_kernels     # CUDA: fused projections and Triton norm / activation kernels

        def attend(li, q, k, v):
            kc, vc = self.k_cache[li], self.v_cache[li]
            key = spec.rope_keys[li]
            if fused:
                from . import kernels as fk
                cos, sin = self.rope[key]
                q, k = fk.rope_store(q, k, v, cos, sin, positions.view(-1), tok_phys, tok_off, kc, vc,
                                     self.n_heads, self.n_kv, return_k=True)
                q = q.view(n, length, -1, hd).transpose(1, 2)
                k = k.view(n, length, -1, hd).transpose(1, 2)
                v = v.reshape(n, length, -1, hd).transpose(1, 2)
            else:
                cos, sin = tables[key]
                q = rotate(q.reshape(n, length, -1, hd).transpose(1, 2), cos, sin)
                k = rotate(k.reshape(n, length, -1, hd).transpose(1, 2), cos, sin)
                v = v.reshape(n, length, -1, hd).transpose(1, 2)
                kc[w_phys, :, w_off] = k.transpose(1, 2)[w_rows, w_t]
                vc[w_phys, :, w_off] = v.transpose(1, 2)[w_rows, w_t]
            if with_prefix:
                k = kc[gather].permute(0, 2, 1, 3, 4).reshape(n, self.n_kv, -1, hd)[:, :, :kv_len]
                v = vc[gather].permute(0, 2, 1, 3, 4).reshape(n, self.n_kv, -1, hd)[:, :, :kv_len]
                if not self.cuda:
                    written = (torch.arange(kv_len, device=dev)[None, :] < totals.to(dev)[:, None])[:, None, None, :]
                    k, v = _written_only(k, v, written)
            out = attention(q, k, v, scale=self.scale, mask=mask_for(spec.windows[li]), causal=length > 1,
                            softcap=spec.attn_softcap)
            return out.transpose(1, 2).reshape(n * length, -1)

        x = decoder(self, self.embed(ids).view(n * length, -1), attend, self.ops)
        last = x.view(n, length, -1)[torch.arange(n, device=dev), (lens - 1).to(dev)]
        return self.logits(last)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final norm's output [rows, hidden] -> fp32 logits [rows, vocab] (soft-capped where the model is)."""
        out = self.lm_head(hidden)
        cap = self.spec.final_softcap
        if cap:
            out = torch.tanh(out / cap) * cap
        return out.float()

    @property
    def ops(self):
        """The ops of prefill and decode: Triton kernels on CUDA, the HF modules otherwise."""
        return KernelOps() if self.use_kernels else EagerOps()

    # -- decode --------------------------------------------------------------------------------------
    def _decode_torch(self, rows: int) -> torch.Tensor:
        """One decode step with eager ops (CPU, or CUDA without Triton). -> logits [rows, vocab].

        The same ops as the model's own forward, so a CPU reply equals ``generate`` exactly; on a CPU each
        sequence's cache is one block, read through views (an indexing copy per layer cost more than the
        layer's matmuls on a busy 2-core machine)."""
        tokens, pos, table = self.tokens[:rows], self.pos[:rows], self.table[:rows]
        active = self.active[:rows].bool()
        spec, hd = self.spec, self.head_dim
        tables = {key: (cos[pos][:, None, None], sin[pos][:, None, None]) for key, (cos, sin) in self.rope.items()}
        lengths = (pos + 1) * active
        kv_len = max(1, int(lengths.max()))          # eager path: reading it on the host costs nothing here
        n_blk = math.ceil(kv_len / self.block)
        masks: dict = {}

        def mask_for(window):
            window = window if window and window < kv_len else None
            if window not in masks:
                if window is None and rows == 1 and bool(active.all()):
                    masks[window] = None
                else:
                    k_pos = torch.arange(kv_len, device=self.device)[None, :]
                    masks[window] = key_mask(pos[:, None], k_pos, lengths[:, None], window)[:, None, None, :]
            return masks[window]

        if n_blk == 1:   # host-side block ids and offsets: views and plain copies instead of index kernels
            blocks = table[:, 0].tolist()
            offsets = (pos % self.block).tolist()
        else:
            phys = table.gather(1, (pos // self.block)[:, None].to(table.dtype))[:, 0].long()
            off = pos % self.block
            gather = table[:, :n_blk].long()

        def attend(li, q, k, v):
            cos, sin = tables[spec.rope_keys[li]]
            q = rotate(q.reshape(rows, 1, -1, hd).transpose(1, 2), cos, sin)
            k = rotate(k.reshape(rows, 1, -1, hd).transpose(1, 2), cos, sin)
            v = v.reshape(rows, 1, -1, hd).transpose(1, 2)
            kc, vc = self.k_cache[li], self.v_cache[li]
            if n_blk == 1:
                for r in range(rows):
                    kc[blocks[r], :, offsets[r]] = k[r, :, 0]
                    vc[blocks[r], :, offsets[r]] = v[r, :, 0]
                if rows == 1:
                    keys, values = kc[blocks[0], :, :kv_len][None], vc[blocks[0], :, :kv_len][None]
                else:
                    keys = torch.stack([kc[b_, :, :kv_len] for b_ in blocks])
                    values = torch.stack([vc[b_, :, :kv_len] for b_ in blocks])
            else:
                kc[phys, :, off] = k[:, :, 0]
                vc[phys, :, off] = v[:, :, 0]
                keys = kc[gather].permute(0, 2, 1, 3, 4).reshape(rows, self.n_kv, -1, hd)[:, :, :kv_len]
                values = vc[gather].permute(0, 2, 1, 3, 4).reshape(rows, self.n_kv, -1, hd)[:, :, :kv_len]
            mask = mask_for(spec.windows[li])
            if mask is not None and not self.cuda:
                keys, values = _written_only(keys, values, (torch.arange(kv_len) < lengths[:, None])[:, None, None])
            out = attention(q, keys, values, scale=self.scale, mask=mask, softcap=spec.attn_softcap)
            return out.transpose(1, 2).reshape(rows, -1)

        return self.logits(decoder(self, self.embed(tokens), attend, EagerOps()))

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
        self._idle_rows()
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

    def load_rows(self, rows: list[Slot]) -> None:
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


def _triton_problem() -> str | None:
    """None when the Triton kernels import; else why not, in a few words (the engine then runs eager ops)."""
    try:
        from . import kernels as fastkernels  # noqa: F401
        return None
    except Exception as exc:  # noqa: BLE001 - no Triton, or an incompatible one: use eager ops
        log.warning("Triton kernels unavailable (%s); the fast path runs eager ops", exc)
        return f"Triton unavailable ({type(exc).__name__}: {exc})"
