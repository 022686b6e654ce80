"""The ways to compute a projection as typed configs (kinds, rows served); warm-up's candidates.

Each config is a small dataclass: which weight kinds and row counts it serves, its launch parameters, and how
it runs. ``CANDIDATES`` is the data warm-up picks from (``tuning.py``
times every candidate that serves a projection and keeps the fastest per row count, recording why the others
were skipped); ``default`` is what a row count never timed runs.

Weight kinds (``kind_of``): "dense" (16-bit), "int8" (LLM.int8 rows + scales), "nf4" (4-bit viewable as int32
words: the word-decoding kernels) and "nf4_bytes" (4-bit that is not, which no loaded model has produced:
bitsandbytes' own matmul or a 16-bit copy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

ANY = (1, 1 << 30)


@dataclass(frozen=True, kw_only=True)
class Matmul:
    kinds: tuple[str, ...] = ()               # the weight kinds served (empty: the class's KINDS)
    rows: tuple[int, int] = ()                # the row counts served, inclusive (empty: the class's ROWS)
    KINDS: ClassVar[tuple[str, ...]] = ("dense",)
    ROWS: ClassVar[tuple[int, int]] = ANY
    fuses_gate: ClassVar[tuple[str, ...]] = ()   # activations whose act(g) * u it takes as input at one row (down)

    def skip_reason(self, p, rows: int) -> str | None:
        """None if this config serves projection ``p`` at ``rows`` rows, else why not."""
        kind, kinds, (low, high) = kind_of(p), self.kinds or self.KINDS, self.rows or self.ROWS
        if kind not in kinds:
            return f"serves {'/'.join(kinds)} weights, not {kind}"
        if not low <= rows <= high:
            return f"serves {low}-{high} rows"
        return None

    def run(self, p, x: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def __str__(self) -> str:
        params = [str(v) for k, v in vars(self).items() if k not in ("kinds", "rows")]
        return "/".join([type(self).__name__.lower(), *params])


@dataclass(frozen=True)
class Cublas(Matmul):
    """F.linear over the 16-bit weight: the eager route (CPU, or a GPU without Triton) imports no Triton."""

    def run(self, p, x, up=None, activation="silu"):
        return F.linear(x, p.weight)


@dataclass(frozen=True)
class Gemv(Matmul):
    """kernels.gemv: one row against 16-bit or int8 weights (at 2-8 rows cuBLAS and the tiled kernel won every
    shape timed, results/2026-12-07e_h200_quant.jsonl, so the kernel serves one row)."""
    block_n: int = 8
    block_k: int = 512
    warps: int = 4
    ROWS: ClassVar = (1, 1)
    fuses_gate: ClassVar = ("silu", "gelu_tanh")

    def run(self, p, x, up=None, activation="silu"):
        from . import kernels as fk
        w, scale = (p.weight, None) if p.quant is None else (p.quant.data, p.quant.scale)
        return fk.gemv(x, w, scale, self.block_n, self.block_k, self.warps, up=up, activation=activation)


@dataclass(frozen=True)
class Tiled(Matmul):
    """kernels_quant.qmatmul: decode batches over int8 / NF4 weights ("t*": the weight as the left operand,
    "h" fp16 decoding, "c" inputs as one run; K cut into ``splits`` parts; "": int8 with x as the left
    operand). ``block_m`` None: by rows."""
    block_m: int | None = None
    block_n: int = 64
    block_k: int = 128
    warps: int = 4
    stages: int = 3
    variant: str = ""
    splits: int = 1
    KINDS: ClassVar = ("int8",)
    ROWS: ClassVar = (2, 64)

    def run(self, p, x, up=None, activation="silu"):
        from . import kernels_quant as kq
        rows = x.shape[0]
        bm = self.block_m or (16 if rows <= 16 else 32 if rows <= 32 else 64)
        return kq.qmatmul(x, p.quant, bm, self.block_n, self.block_k, self.warps, self.stages, self.variant,
                          self.splits)


@dataclass(frozen=True)
class Nf4Cuda(Matmul):
    """nf4_cuda.gemv (CUDA C++ built by NVRTC), one row: warps, rows per warp, loads in flight, blocks per
    multiprocessor, scale parts loaded with the weights."""
    warps: int = 16
    rows_per_warp: int = 1
    unroll: int = 4
    ctas: int = 2
    prefetch: int = 0
    KINDS: ClassVar = ("nf4",)
    ROWS: ClassVar = (1, 1)
    fuses_gate: ClassVar = ("silu",)

    def skip_reason(self, p, rows):
        from . import nf4_cuda
        reason = super().skip_reason(p, rows)
        if reason is None and not nf4_cuda.available(p.quant.data.device):
            return nf4_cuda.unavailable_reason(p.quant.data.device) or "NVRTC unavailable"
        return reason

    def run(self, p, x, up=None, activation="silu"):
        from . import nf4_cuda
        return nf4_cuda.gemv(x, p.quant, self.warps, self.rows_per_warp, self.unroll, self.ctas, self.prefetch,
                             up=up)


@dataclass(frozen=True)
class Dequant(Matmul):
    """A 16-bit copy of the quantized weight, then cuBLAS (many rows: prefill)."""
    KINDS: ClassVar = ("int8", "nf4", "nf4_bytes")

    def run(self, p, x, up=None, activation="silu"):
        from . import kernels_quant as kq
        return F.linear(x, kq.dequantize(p.quant, x.dtype))


@dataclass(frozen=True)
class Module(Matmul):
    """bitsandbytes' own matmul (the modules themselves)."""
    KINDS: ClassVar = ("nf4", "nf4_bytes")

    def run(self, p, x, up=None, activation="silu"):
        return p.modules_forward(x)


def kind_of(p) -> str:
    q = p.quant
    if q is None:
        return "dense"
    return q.kind if q.kind != "nf4" or q.lut is not None else "nf4_bytes"


CUBLAS, DEQUANT, MODULE = Cublas(), Dequant(), Module()

# Candidates: the configurations worth timing, each a winner of at least one shape and row count in the tuning
# records (every candidate's time at every batch size: results/2026-12-07e_h200_quant.jsonl; H100:
# results/2026-12-06*_h100_quant*.jsonl, 2026-12-07_h100_quant_cards.jsonl). Variants that never won there were
# deleted (fp16 and int8 GEMVs at 2-8 rows, the Triton one-row NF4 GEMVs, the NF4 table-lookup kernels).
CANDIDATES: tuple[Matmul, ...] = (
    CUBLAS, DEQUANT, MODULE,
    # 16-bit, one row: our GEMV against cuBLAS (it wins by 1-15%; cuBLAS wins from 2 rows on)
    *(Gemv(bn, bk, w) for bn, bk, w in ((4, 512, 4), (8, 512, 8), (16, 128, 4), (32, 128, 8))),
    # int8: our GEMV at one row, the tiled kernels beyond
    *(Gemv(bn, bk, w, kinds=("int8",)) for bn, bk, w in ((8, 512, 8), (16, 256, 8))),
    Tiled(None, 64, 128, 4, 3, kinds=("int8",)),
    *(Tiled(None, 64, 128, 4, 4, "t", s, kinds=("int8",)) for s in (1, 2, 4)),
    # NF4, one row: the CUDA C++ GEMV where NVRTC works
    *(Nf4Cuda(*c) for c in ((16, 1, 4, 2, 0), (16, 1, 2, 2, 1), (16, 1, 4, 2, 1), (8, 2, 2, 4, 0))),
    # NF4 batches (and one row without NVRTC): fp16 decoding, inputs loaded as one run
    *(Tiled(None, bn, bk, w, st, v, s, kinds=("nf4",), rows=(1, 64)) for v, bn, bk, w, st, s in
      (("thc", 128, 256, 8, 3, 4), ("thc", 128, 256, 8, 3, 2), ("thc", 128, 128, 8, 3, 4), ("thc", 64, 256, 4, 3, 4),
       ("thc", 64, 256, 4, 3, 2), ("th", 64, 256, 4, 3, 4))),
)


def candidates(p, rows: int) -> tuple[list[Matmul], dict[str, str]]:
    """-> (the configs serving projection ``p`` at ``rows`` rows, {config: why skipped} for the others)."""
    chosen, skipped = [], {}
    for config in CANDIDATES:
        reason = config.skip_reason(p, rows)
        if reason is None:
            chosen.append(config)
        else:
            skipped[str(config)] = reason
    return chosen, skipped


def default(p, rows: int) -> Matmul:
    """What a row count never timed runs (prefill, or before warm-up): our kernels for decode-sized batches of
    quantized weights, a 16-bit copy or bitsandbytes beyond; cuBLAS for 16-bit weights."""
    kind = kind_of(p)
    if kind == "dense":
        return CUBLAS
    if kind == "int8":
        return Gemv(kinds=("int8",)) if rows == 1 else Tiled(16, 64, 128) if rows <= 64 else DEQUANT
    if kind == "nf4" and rows == 1 and Nf4Cuda().skip_reason(p, rows) is None:
        return Nf4Cuda()
    return Tiled(16, 64, 256, 4, 3, "thc", kinds=(kind,)) if kind == "nf4" and rows <= 64 else MODULE
