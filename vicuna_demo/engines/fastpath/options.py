"""The fast path's knobs (``FastOptions``); which models it runs is ``arch.py``'s."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FastOptions:
    max_rows: int | None = None            # requests decoded together (None: 64 on CUDA, 8 on CPU)
    block_size: int | None = None          # tokens per KV block (None: 64 on CUDA, a whole context on CPU)
    kv_blocks: int | None = None           # force the pool size (else: the start-up plan's share, or what is free)
    prefill_tokens: int = 4096             # most prompt tokens prefilled in one forward pass
    burst_prefill_s: float = 0.3           # prefill waiting requests back to back for up to this long
    cpu_threads: int | None = None         # CPU: intra-op threads of the scheduler thread only (None: torch's)
    cuda_graphs: bool = True               # capture decode steps as CUDA graphs (CUDA only)
    kernels: bool = True                   # Triton kernels for the decode step (CUDA only)
    quant_kernels: bool = True             # our weight-only kernels over bitsandbytes' quantized weights when
                                           # decoding: int8 (8-bit) and NF4 (4-bit) alike
    prefix_cache: bool = True              # reuse a finished reply's KV for the next turn
    fuse_projections: bool | None = None   # concatenate q/k/v and gate/up weights (dense weights; None: yes)
    tune_dense: bool = True                # also time our GEMV against cuBLAS for 16-bit weights
    pipeline: bool | None = None           # launch step t+1 before reading step t's tokens (None: on CUDA)
