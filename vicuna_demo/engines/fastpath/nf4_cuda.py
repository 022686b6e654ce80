"""One-row 4-bit (NF4) matrix-vector product in CUDA C++ (built at warm-up by ``rtc.py``), over bitsandbytes'
packed weights read in place.

Why not Triton: a one-row product must stream the weights at memory speed while spending only a few
instructions a value on decoding them. Our Triton word GEMV reached ~1.1 TB/s of an H200's ~4.2 (Triton
chooses the register layouts, and the inputs each thread needs were re-loaded and re-arranged per row); it
never beat this kernel on a shape timed since, so it was deleted. Here each step is spelled out:

- Persistent blocks of ``WARPS`` warps; a warp computes ``ROWS`` rows at once (their inputs read once).
- The input row (for the down projection SiLU(gate) * up, rounded as the separate SiLU kernel rounds it) is
  staged once per block in shared memory, 16-byte units swizzled so that a warp's 16-byte reads hit every bank
  once.
- Each lane reads 16 bytes (32 values) of a row per load, a warp 512 contiguous bytes; ``UNROLL`` loads per row
  (with ``PREFETCH``, the parts of their blocks' scales too) are in flight before any is used.
- Decoding a 32-bit word (8 indices; bitsandbytes puts the first of two in a byte's high nibble) into four
  fp16 pairs: one shared-memory load per byte from a 256-entry table of fp16 pairs, one copy per lane so a
  warp's 32 loads never share a bank. (Byte permutes over the table held in registers, as the Triton kernels
  decode, lost every 7B and 13B shape on an H100 to this table: results/2026-12-0[67]_h100_kernel_probe*.)
- A word's 8 products are summed in fp16 (as the Triton "luth" variants do), each 32 values in fp32, times the
  block's absmax (double-quantized: ``code2[a8] * absmax2 + offset``); lanes are summed with shuffles.

``gemv(x, q, warps, rows, unroll, ctas, prefetch, up=None)`` is the entry point (the
``matmuls.Nf4Cuda`` config); ``available(device)`` says whether
NVRTC works here. Every configuration is checked at warm-up against the de-quantized weight before it can be
chosen (``tuning.py``).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from .rtc import compile_kernel, ensure_context

log = logging.getLogger("vicuna_demo.engines.fastpath")

SOURCE = r"""
typedef unsigned int u32;
typedef unsigned short u16;
struct alignas(16) U4 { u32 x, y, z, w; };

__device__ __forceinline__ u32 hmul2(u32 a, u32 b) {
    u32 d; asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b)); return d;
}
__device__ __forceinline__ u32 hfma2(u32 a, u32 b, u32 c) {
    u32 d; asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c)); return d;
}
__device__ __forceinline__ float h2f(u16 h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ u16 f2h(float f) { u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
__device__ __forceinline__ float shfl_xor(float v, int off) {
    float r; asm volatile("shfl.sync.bfly.b32 %0, %1, %2, 0x1f, 0xffffffff;" : "=f"(r) : "f"(v), "r"(off)); return r;
}
__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ float pair_sum(u32 p) { return h2f((u16)(p & 0xffff)) + h2f((u16)(p >> 16)); }
__device__ __forceinline__ U4 ld_stream(const U4* p) {
    U4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

#if GATED
// SiLU(g) * u for two fp16 pairs, rounded to fp16 after the SiLU and after the product
__device__ __forceinline__ u32 silu_mul(u32 g, u32 u) {
    u32 out = 0;
    #pragma unroll
    for (int h = 0; h < 2; h++) {
        float v = h2f((u16)(g >> (16 * h))), e;
        asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(-v * 1.4426950408889634f));
        float s = h2f(f2h(v / (1.0f + e)));
        out |= (u32)f2h(s * h2f((u16)(u >> (16 * h)))) << (16 * h);
    }
    return out;
}
#endif

// 8 indices -> 4 fp16 pairs (elements 0,1 | 2,3 | 4,5 | 6,7), one shared-memory load per byte: tab is this
// lane's column of the 256-entry pair table (stride 32 words)
__device__ __forceinline__ void decode(u32 w, u32 (&d)[4], const u32* tab) {
    #pragma unroll
    for (int b = 0; b < 4; b++) d[b] = tab[((w >> (8 * b)) & 0xffu) << 5];
}

extern "C" __global__ void __launch_bounds__(WARPS * 32)
nf4_gemv(const U4* __restrict__ wq, const unsigned char* __restrict__ a8, const float* __restrict__ absmax,
         const float* __restrict__ absmax2, const float* __restrict__ offset2, const float* __restrict__ code2,
         const u32* __restrict__ pairs, const U4* __restrict__ x, const U4* __restrict__ up,
         u16* __restrict__ out, int N, int K, int group_shift)
{
    extern __shared__ U4 smem[];
    U4* xs = smem;                                          // K / 8 units of 8 inputs
    float* c2 = (float*)(smem + (K >> 3));                  // 256: the absmax code (NESTED)
    u32* tab = (u32*)(c2 + 256);                            // 256 x 32: pair table, a column per lane
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int units = K >> 3, chunks = K >> 5, blocks = K >> 6;
    for (int u = tid; u < units; u += WARPS * 32) {
        U4 v = x[u];
#if GATED
        U4 g = up[u];
        v.x = silu_mul(v.x, g.x); v.y = silu_mul(v.y, g.y); v.z = silu_mul(v.z, g.z); v.w = silu_mul(v.w, g.w);
#endif
        int c = u >> 2, p = u & 3;
        xs[(c << 2) | (p ^ ((c >> 1) & 3))] = v;            // swizzle: lanes 0-7 read 8 different bank groups
    }
#if NESTED
    for (int i = tid; i < 256; i += WARPS * 32) c2[i] = code2[i];
#endif
    for (int i = tid; i < 256 * 32; i += WARPS * 32) tab[i] = pairs[i >> 5];
    __syncthreads();
    const u32* mytab = tab + lane;
    const int groups = (N + ROWS - 1) / ROWS;
    for (int g = blockIdx.x * WARPS + warp; g < groups; g += gridDim.x * WARPS) {
        const int row0 = g * ROWS;
        float acc[ROWS];
        #pragma unroll
        for (int r = 0; r < ROWS; r++) acc[r] = 0.0f;
        for (int c0 = 0; c0 < chunks; c0 += 32 * UNROLL) {
            // every load of this step first (weights and their scales' parts), then the arithmetic
            U4 wv[UNROLL][ROWS];
#if PREFETCH && NESTED
            u32 q8[UNROLL][ROWS];
            float s2[UNROLL][ROWS], so[UNROLL][ROWS];
#elif PREFETCH
            float s2[UNROLL][ROWS];
#endif
            #pragma unroll
            for (int i = 0; i < UNROLL; i++) {
                const int c = c0 + 32 * i + lane;
                #pragma unroll
                for (int r = 0; r < ROWS; r++) {
                    const int row = imin(row0 + r, N - 1);
                    if (c < chunks) wv[i][r] = ld_stream(wq + (size_t)row * chunks + c);
                    else wv[i][r] = U4{0u, 0u, 0u, 0u};
#if PREFETCH
                    const size_t b = (size_t)row * blocks + (imin(c, chunks - 1) >> 1);
#if NESTED
                    q8[i][r] = a8[b];
                    s2[i][r] = absmax2[b >> group_shift];
                    so[i][r] = offset2[b >> group_shift];
#else
                    s2[i][r] = absmax[b];
#endif
#endif
                }
            }
            #pragma unroll
            for (int i = 0; i < UNROLL; i++) {
                const int c = c0 + 32 * i + lane;
                if (c >= chunks) continue;
                const int sw = (c >> 1) & 3;
                U4 xv[4];
                #pragma unroll
                for (int p = 0; p < 4; p++) xv[p] = xs[(c << 2) | (p ^ sw)];
                #pragma unroll
                for (int r = 0; r < ROWS; r++) {
#if PREFETCH && NESTED
                    const float scale = c2[q8[i][r]] * s2[i][r] + so[i][r];
#elif PREFETCH
                    const float scale = s2[i][r];
#else
                    const size_t b = (size_t)imin(row0 + r, N - 1) * blocks + (c >> 1);
#if NESTED
                    const float scale = c2[a8[b]] * absmax2[b >> group_shift] + offset2[b >> group_shift];
#else
                    const float scale = absmax[b];
#endif
#endif
                    const u32 words[4] = {wv[i][r].x, wv[i][r].y, wv[i][r].z, wv[i][r].w};
                    float part = 0.0f;
                    #pragma unroll
                    for (int p = 0; p < 4; p++) {
                        u32 d[4];
                        decode(words[p], d, mytab);
                        u32 h = hmul2(d[0], xv[p].x);
                        h = hfma2(d[1], xv[p].y, h);
                        h = hfma2(d[2], xv[p].z, h);
                        h = hfma2(d[3], xv[p].w, h);
                        part += pair_sum(h);
                    }
                    acc[r] += part * scale;
                }
            }
        }
        #pragma unroll
        for (int r = 0; r < ROWS; r++) {
            float v = acc[r];
            #pragma unroll
            for (int off = 16; off > 0; off >>= 1) v += shfl_xor(v, off);
            if (lane == 0 && row0 + r < N) out[row0 + r] = f2h(v);
        }
    }
}
"""


def pair_table(code) -> np.ndarray:
    """The kernel's 256 fp16 pairs as uint32: entry b = (code[b >> 4] low, code[b & 15] high), i.e. the
    values of the two elements that a packed byte b holds, in element order."""
    half = np.asarray(code, dtype=np.float32).astype(np.float16).view(np.uint16).astype(np.uint32)
    b = np.arange(256)
    return (half[b >> 4] | (half[b & 15] << 16)).astype(np.uint32)


def _smem_bytes(k: int) -> int:
    return k * 2 + 256 * 4 + 256 * 32 * 4


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous and 16-byte aligned (the kernel reads 8 inputs at once): a copy only where it is not."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


_unavailable: dict[int, str] = {}     # per GPU index: "" where the kernel builds and loads, else why not


def available(device: torch.device) -> bool:
    """Can this machine build and load the kernel (NVRTC present, a GPU it knows)? Asked once per device;
    ``unavailable_reason`` says why not."""
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _unavailable:
        try:
            _kernel(torch.device("cuda", index), 16, 1, 4, True, False, 4096, 0)   # a candidate's build
            _unavailable[index] = ""
        except Exception as exc:  # noqa: BLE001 - RtcUnavailable, or the driver refusing the module
            log.info("the CUDA NF4 GEMV is not available here (%s): Triton's and bitsandbytes' kernels serve", exc)
            _unavailable[index] = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return not _unavailable[index]


def unavailable_reason(device: torch.device) -> str:
    """Why ``available(device)`` said no ("" where it said yes or was not asked)."""
    index = device.index if device.index is not None else torch.cuda.current_device() if device.type == "cuda" else -1
    return _unavailable.get(index, "")


def defines(warps, rows, unroll, nested, gated, prefetch=1) -> dict[str, int]:
    """The kernel's compile-time macros for one configuration."""
    return dict(WARPS=warps, ROWS=rows, UNROLL=unroll, NESTED=int(nested), GATED=int(gated),
                PREFETCH=int(bool(prefetch)))


def _kernel(device, warps, rows, unroll, nested, gated, k, prefetch=1):
    kernel = compile_kernel(SOURCE, "nf4_gemv", device, defines(warps, rows, unroll, nested, gated, prefetch))
    smem = _smem_bytes(k)
    if smem > kernel._max_shared_mem_bytes:
        kernel.set_shared_memory_config(smem)
    return kernel


def gemv(x: torch.Tensor, q, warps: int = 16, rows: int = 1, unroll: int = 4, ctas: int = 2, prefetch: int = 1,
         up: torch.Tensor | None = None) -> torch.Tensor:
    """x [1, K] (fp16) @ W.T for an NF4 ``QuantWeight`` -> [1, N] fp16; with ``up``, of SiLU(x) * up.
    ``ctas`` blocks per multiprocessor (persistent: each loops over row groups); ``prefetch``: each chunk's
    scale parts are loaded with its weights (else when used)."""
    n, k = q.shape
    if x.dtype != torch.float16 or k % 64 or x.shape[0] != 1:
        raise ValueError("the CUDA NF4 GEMV takes one fp16 row and K a multiple of 64")
    nested = q.absmax2 is not None
    if nested and q.group & (q.group - 1):
        raise ValueError("the CUDA NF4 GEMV needs a power-of-two scale group")
    if q.data.data_ptr() % 16:
        raise ValueError("the CUDA NF4 GEMV needs 16-byte aligned packed weights")
    x = _aligned(x)
    up = _aligned(up) if up is not None else x
    out = torch.empty((1, n), dtype=torch.float16, device=x.device)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    groups = -(-n // rows)
    grid = max(1, min(-(-groups // warps), sms * ctas))
    absmax = q.absmax
    with torch.cuda.device(x.device):        # the launch goes to the current context: the weights' GPU's
        ensure_context(out.device.index)
        kernel = _kernel(x.device, warps, rows, unroll, nested, up is not x, k, prefetch)
        kernel(grid=(grid, 1, 1), block=(warps * 32, 1, 1), shared_mem=_smem_bytes(k),
               stream=torch.cuda.current_stream(x.device),
               args=[q.data, absmax, absmax, q.absmax2 if nested else absmax, q.offset2 if nested else absmax,
                     q.code2 if nested else absmax, q.pairs, x, up, out, n, k,
                     (q.group.bit_length() - 1) if nested else 0])
    return out
