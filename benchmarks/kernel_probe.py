"""Probe of the 4-bit projection kernels on a GPU: every configuration given, per Vicuna projection shape,
timed the way warm-up times it (8 layers' weights, replayed in a CUDA graph) and checked against the
de-quantized weight; each row count in its own process, so that a configuration which faults the GPU ends
that process only (its line says so) and the others still report.

For deciding which candidates the warm-up should time (each one it times costs start-up seconds) without a
whole benchmark run; prints one JSON line per (shape, rows): {config: µs} and any errors.

    python benchmarks/kernel_probe.py --rows 1,8,64 --out probe.jsonl
    python benchmarks/kernel_probe.py --rows 1 --size 13b --only cuda      # 13B shapes, the CUDA GEMV only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# per model size: (hidden, intermediate) of Vicuna-7B / 13B / 33B
SIZES = {"7b": (4096, 11008), "13b": (5120, 13824), "33b": (6656, 17920)}


def shapes(size: str) -> dict:
    h, i = SIZES[size]
    return {"qkv": (3 * h, h), "o": (h, h), "gate_up": (2 * i, h), "down": (h, i)}

def configs(rows: int) -> list:
    """Per row count: the matmuls.Matmul configurations to time (a wider search than warm-up's CANDIDATES)."""
    from vicuna_demo.engines.fastpath.matmuls import MODULE, Nf4Cuda, Tiled
    nf4 = ("nf4",)
    if rows == 1:
        return [MODULE, Tiled(16, 64, 256, 4, 3, "thc", 2, kinds=nf4, rows=(1, 64))] \
            + [Nf4Cuda(w, r, u, c, f) for w in (8, 16) for r in (1, 2) for u in (2, 4) for c in (1, 2, 4)
               for f in (0, 1) if w * c <= 32]
    if rows <= 8:
        return [MODULE] + [Tiled(16, bn, bk, w, st, v, s, kinds=nf4) for v in ("t", "th", "tc", "thc")
                           for bn, bk, w, st, s in ((64, 256, 4, 3, 2), (64, 256, 4, 3, 4), (128, 256, 8, 3, 4))]
    return [MODULE] + [Tiled(64, bn, bk, w, st, "thc", s, kinds=nf4) for bn, bk, w, st, s in
                       ((128, 256, 8, 3, 4), (128, 256, 8, 3, 2), (256, 256, 8, 3, 2), (256, 256, 8, 3, 4),
                        (128, 512, 8, 3, 2), (128, 512, 8, 3, 4), (128, 256, 8, 4, 4), (128, 128, 8, 3, 4),
                        (128, 256, 8, 2, 4), (256, 128, 8, 3, 4))]


def probe(rows: int, out, size: str = "7b", only: str = "") -> None:
    import torch
    from quant_bench import linear4
    from vicuna_demo.engines.fastpath.matmuls import DEQUANT
    from vicuna_demo.engines.fastpath.tuning import _relative_error, _time_ms
    from vicuna_demo.engines.fastpath.weights import Projection
    torch.manual_seed(0)
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src))
    print(json.dumps(dict(copy_gb_s=round(2 * 2**30 / ms / 1e6, 1), device=torch.cuda.get_device_name())), flush=True)
    del src, dst
    for name, (n, k) in shapes(size).items():
        linears = [Projection(module=linear4(torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02),
                       quant_kernels=True) for _ in range(8)]
        torch.cuda.empty_cache()
        x = torch.randn(rows, k, device="cuda", dtype=torch.float16)
        up = torch.randn(rows, k, device="cuda", dtype=torch.float16) if name == "down" else None
        reference = linears[0].run(x if up is None else torch.nn.functional.silu(x) * up, DEQUANT)
        us, errors = {}, {}
        for config in [c for c in configs(rows) if only in str(c)]:
            label = str(config)
            try:                  # down: SiLU(gate) * up inside the GEMV, or a separate kernel first
                got = linears[0].run(x, config, up)
                error = _relative_error(got, reference)
                if error > 2e-2:
                    errors[label] = round(error, 4)
                    continue
                def run():
                    for p in linears:
                        p.run(x, config, up)
                us[label] = round(_time_ms(run) / len(linears) * 1000, 1)
                torch.cuda.synchronize()
            except Exception as exc:  # noqa: BLE001 - report and go on
                errors[label] = str(exc).splitlines()[0][:160]
        read = n * k // 2 + n * k // 64          # packed weights and their 8-bit absmax: what one row reads
        best = min(us.values()) if us else None
        line = dict(shape=name, n=n, k=k, rows=rows, device=torch.cuda.get_device_name(),
                    best_tb_s=round(read / best / 1e6, 2) if best else None,
                    best=sorted(us.items(), key=lambda t: t[1])[:4], us=us, errors=errors)
        print(json.dumps(line), flush=True)
        if out:
            with open(out, "a") as f:
                f.write(json.dumps(line) + "\n")
        del linears
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,8,64")
    parser.add_argument("--out", default="")
    parser.add_argument("--size", default="7b", choices=sorted(SIZES), help="the model whose projection shapes to time")
    parser.add_argument("--only", default="", help="only configurations whose text contains this (e.g. cuda)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)     # the child process: one row count
    args = parser.parse_args(argv)
    if args.one:
        probe(args.one, args.out, args.size, args.only)
        return 0
    for rows in [int(r) for r in args.rows.split(",")]:
        started = time.time()
        rc = subprocess.call([sys.executable, __file__, "--one", str(rows), "--out", args.out, "--size", args.size,
                              "--only", args.only])
        print(json.dumps(dict(rows=rows, rc=rc, seconds=round(time.time() - started, 1))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
