"""The ways to compute a projection as typed configs (kinds, rows served); warm-up's candidates.

Each config is a small dataclass: which weight kinds and row counts it serves, its launch parameters, and how
it runs. ``CANDIDATES`` is the data warm-up picks from (``tuning.py``
times every candidate that serves a projection and keeps the fastest per row count, recording why the others
were skipped); ``default`` is what a row count never timed runs.

Weight kinds (``kind_of``): "dense" (16-bit), "int8" (LLM.int8 rows + scales), "nf4" (4-bit viewable as int32
words: the word-decoding kernels) and "nf4_bytes" (4-bit that is not: the table-lookup kernels).
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
    fuses_gate: ClassVar[bool] = False        # can take SiLU(g) * u as its input at one row (the down projection)

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

    def run(self, p, x, up=None):
        return F.linear(x, p.weight)


@dataclass(frozen=True)
class Gemv(Matmul):
    """kernels.gemv: a few rows against 16-bit or int8 weights (None: the kernel's defaults for the row count)."""
    block_n: int | None = None
    block_k: int | None = None
    warps: int = 4
    ROWS: ClassVar = (1, 8)
    fuses_gate: ClassVar = True

    def run(self, p, x, up=None):
        from . import kernels as fk
        if p.quant is None:
            return fk.gemv(x, p.weight, None, self.block_n, self.block_k, self.warps, up=up)
        return fk.gemv(x, p.quant.data, p.quant.scale, self.block_n, self.block_k, self.warps, up=up)


@dataclass(frozen=True)
class Nf4Gemv(Matmul):
    """kernels_quant.nf4_gemv, one row: "table" lookups, or whole words decoded in registers ("lutc": inputs
    loaded as one run, "lutch": fp16 products within a word), K cut into ``splits`` parts."""
    block_n: int = 16
    block_k: int = 256
    warps: int = 4
    variant: str = "table"
    splits: int = 1
    KINDS: ClassVar = ("nf4",)
    ROWS: ClassVar = (1, 1)
    fuses_gate: ClassVar = True

    def run(self, p, x, up=None):
        from . import kernels_quant as kq
        return kq.nf4_gemv(x, p.quant, self.block_n, self.block_k, self.warps, self.variant, self.splits, up=up)


@dataclass(frozen=True)
class Tiled(Matmul):
    """kernels_quant.qmatmul: decode batches over int8 / NF4 weights ("t*": the weight as the left operand,
    "h" fp16 decoding, "c" inputs as one run; K cut into ``splits`` parts). ``block_m`` None: by rows."""
    block_m: int | None = None
    block_n: int = 64
    block_k: int = 128
    warps: int = 4
    stages: int = 3
    variant: str = "table"
    splits: int = 1
    KINDS: ClassVar = ("int8",)
    ROWS: ClassVar = (2, 64)

    def run(self, p, x, up=None):
        from . import kernels_quant as kq
        rows = x.shape[0]
        bm = self.block_m or (16 if rows <= 16 else 32 if rows <= 32 else 64)
        return kq.qmatmul(x, p.quant, bm, self.block_n, self.block_k, self.warps, self.stages, self.variant,
                          self.splits)


@dataclass(frozen=True)
class Nf4Cuda(Matmul):
    """nf4_cuda.gemv (CUDA C++ built by NVRTC), one row: warps, rows per warp, loads in flight, blocks per
    multiprocessor, decode 1 = the shared-memory pair table, scale parts loaded with the weights."""
    warps: int = 16
    rows_per_warp: int = 1
    unroll: int = 4
    ctas: int = 2
    decode: int = 1
    prefetch: int = 0
    KINDS: ClassVar = ("nf4",)
    ROWS: ClassVar = (1, 1)
    fuses_gate: ClassVar = True

    def skip_reason(self, p, rows):
        from . import nf4_cuda
        reason = super().skip_reason(p, rows)
        if reason is None and not nf4_cuda.available(p.quant.data.device):
            return nf4_cuda.unavailable_reason(p.quant.data.device) or "NVRTC unavailable"
        return reason

    def run(self, p, x, up=None):
        from . import nf4_cuda
        return nf4_cuda.gemv(x, p.quant, self.warps, self.rows_per_warp, self.unroll, self.ctas, self.decode,
                             self.prefetch, up=up)


@dataclass(frozen=True)
class Dequant(Matmul):
    """A 16-bit copy of the quantized weight, then cuBLAS (many rows: prefill)."""
    KINDS: ClassVar = ("int8", "nf4", "nf4_bytes")

    def run(self, p, x, up=None):
        from . import kernels_quant as kq
        return F.linear(x, kq.dequantize(p.quant, x.dtype))


@dataclass(frozen=True)
class Module(Matmul):
    """bitsandbytes' own matmul (the modules themselves)."""
    KINDS: ClassVar = ("nf4", "nf4_bytes")

    def run(self, p, x, up=None):
        return p.modules_forward(x)


def kind_of(p) -> str:
    q = p.quant
    if q is None:
        return "dense"
    return q.kind if q.kind != "nf4" or q.lut is not None else "nf4_bytes"


CUBLAS, DEQUANT, MODULE = Cublas(), Dequant(), Module()

# Candidates: the configurations worth timing. The NF4 entries are the winners of benchmarks/kernel_probe.py
# (H200 2026-12-02c, H100 2026-12-06/06b: results/*kernel_probe*.jsonl, *quant_nf4*.jsonl); bitsandbytes' own
# matmul stays a candidate (it won o and down by ~1 µs at one row).
CANDIDATES: tuple[Matmul, ...] = (
    CUBLAS, DEQUANT, MODULE,
    # 16-bit, a few rows: our GEMV against cuBLAS
    *(Gemv(bn, bk, w, rows=(1, 1)) for bn, bk, w in
      ((8, 256, 4), (16, 128, 4), (16, 256, 8), (32, 128, 8), (8, 512, 8), (4, 512, 4))),
    *(Gemv(bn, bk, w, rows=(2, 2)) for bn, bk, w in ((4, 1024, 4), (8, 512, 4), (16, 256, 4), (8, 1024, 8))),
    *(Gemv(bn, bk, w, rows=(3, 8)) for bn, bk, w in ((4, 256, 4), (8, 256, 4), (4, 512, 8), (8, 128, 4))),
    # int8
    *(Gemv(bn, bk, w, kinds=("int8",), rows=(1, 1)) for bn, bk, w in
      ((8, 256, 4), (16, 128, 4), (16, 256, 8), (8, 512, 8))),
    *(Gemv(bn, bk, w, kinds=("int8",), rows=(2, 2)) for bn, bk, w in ((4, 1024, 4), (8, 512, 4))),
    *(Tiled(None, bn, bk, w, st, kinds=("int8",), rows=(1, 64)) for bn, bk, w, st in
      ((16, 128, 4, 3), (32, 128, 4, 4), (64, 128, 4, 3))),
    Tiled(None, 128, 128, 8, 3, kinds=("int8",), rows=(33, 64)),      # at 64 rows the widest tried won (H200)
    *(Tiled(None, bn, bk, w, st, "t", s, kinds=("int8",), rows=(1, 64)) for bn, bk, w, st, s in
      ((64, 128, 4, 4, 1), (64, 128, 4, 4, 2), (64, 128, 4, 4, 4), (64, 256, 4, 3, 2), (128, 128, 8, 3, 1),
       (128, 128, 8, 3, 2), (128, 256, 8, 3, 4))),
    # NF4 stored without a word view: the table-lookup kernels
    Nf4Gemv(16, 256, 4, kinds=("nf4_bytes",)),
    *(Tiled(bm, 64, 128, 4, 3, kinds=("nf4_bytes",), rows=rows) for bm, rows in ((16, (2, 16)), (32, (17, 64)))),
    # NF4, one row: words decoded in registers (Triton), and the CUDA C++ GEMV where NVRTC works
    *(Nf4Gemv(bn, bk, w, v, s) for bn, bk, w, v, s in
      ((16, 512, 4, "lutc", 1), (16, 512, 4, "lutch", 1), (16, 256, 4, "lutc", 1), (16, 512, 4, "lutch", 4),
       (16, 512, 4, "lutc", 4), (16, 256, 4, "lutc", 8))),
    *(Nf4Cuda(*c) for c in ((16, 1, 4, 2, 1, 0), (16, 1, 2, 2, 1, 0), (8, 2, 2, 4, 1, 0), (16, 2, 2, 1, 1, 0),
                            (16, 1, 4, 2, 1, 1), (16, 1, 2, 2, 1, 1))),
    # NF4 batches: fp16 decoding with inputs loaded as one run ("thc") won 7 of 8 shapes at 8 and 64 rows
    *(Tiled(None, bn, bk, w, st, v, s, kinds=("nf4",), rows=(2, 64)) for v, bn, bk, w, st, s in
      (("thc", 128, 256, 8, 3, 4), ("thc", 128, 256, 8, 3, 2), ("thc", 128, 128, 8, 3, 4), ("thc", 64, 256, 4, 3, 4),
       ("thc", 64, 256, 4, 3, 2), ("th", 64, 256, 4, 3, 4), ("t", 64, 256, 4, 3, 2))),
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
        return Gemv(kinds=("int8",)) if rows <= 2 else Tiled(16, 64, 128) if rows <= 64 else DEQUANT
    return Nf4Gemv(16, 256, 4, kinds=(kind,)) if rows == 1 else \
        Tiled(16, 64, 128, kinds=(kind,)) if rows <= 64 else MODULE
