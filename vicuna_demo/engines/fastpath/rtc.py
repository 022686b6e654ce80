"""CUDA C++ compiled at run time with NVRTC, for the few kernels Triton cannot lay out the way they need.

PyTorch's CUDA builds ship NVRTC (it compiles their jiterator kernels), so this needs no CUDA toolkit on the
visitor's machine: source -> NVRTC -> machine code for the GPU in hand -> a kernel launched on PyTorch's
current stream (so CUDA graphs capture it like any other). PyTorch's own helper for this
(``torch.cuda._compile_kernel``) insists on a toolkit's include folder; here we compile header-free source
ourselves and load it with PyTorch's module loader (``torch.cuda._utils``, private: every failure here is
reported as ``RtcUnavailable`` and the caller keeps its other kernels).

The module loader and the launch are CUDA driver calls, which need a context current on the calling thread;
a thread that has made no CUDA runtime call yet has none (the engine's serving thread, whose first GPU work is
warm-up's tuning when the engine sizes its own KV pool: there the load failed with "invalid device context",
and the 13B / 33B card benchmarks ran without this kernel). ``ensure_context`` makes the device's primary
context (the one PyTorch's runtime uses) current first, as PyTorch does before the driver calls of its own
NVRTC kernels.
"""

from __future__ import annotations

import ctypes
import threading

import torch


class RtcUnavailable(RuntimeError):
    """NVRTC, the driver's module loader or this GPU cannot run the kernel: use another kernel."""


_lock = threading.Lock()
_cache: dict[tuple, object] = {}
_thread = threading.local()     # per thread: the GPU indices whose context was found or made current


def ensure_context(index: int) -> None:
    """Make GPU ``index``'s primary context current on this thread where no context is (once per thread and
    GPU; a thread with a context keeps it). Raises ``RtcUnavailable`` if the driver refuses."""
    seen = _thread.__dict__.setdefault("indices", set())
    if index in seen:
        return
    from torch.cuda import _utils
    lib = _utils._get_gpu_runtime_library()
    ctx, dev = ctypes.c_void_p(), ctypes.c_int()
    if lib.cuCtxGetCurrent(ctypes.byref(ctx)):
        raise RtcUnavailable("cuCtxGetCurrent failed")
    if not ctx.value:
        # retained, never released: PyTorch keeps the primary context for the process's life anyway
        if lib.cuDeviceGet(ctypes.byref(dev), index) or lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev) \
                or lib.cuCtxSetCurrent(ctx):
            raise RtcUnavailable(f"could not make GPU {index}'s context current on this thread")
    seen.add(index)


def compile_kernel(source: str, name: str, device: torch.device, defines: dict[str, int] | None = None):
    """The kernel ``name`` (declared ``extern "C"``) of ``source`` built for ``device``'s GPU with ``-D`` macros
    ``defines``: a ``torch.cuda._utils._CudaKernel`` (``kernel(grid=, block=, args=, shared_mem=, stream=)``).
    Built once per (source, macros, device) and cached; raises ``RtcUnavailable`` with the reason."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (hash(source), name, index, tuple(sorted((defines or {}).items())))
    with _lock:
        if key in _cache:
            return _cache[key]
        try:
            from torch.cuda import _utils
            props = torch.cuda.get_device_properties(index)
            cubin, _ = compile_source(source, name, f"sm_{props.major}{props.minor}", defines)
            with torch.cuda.device(index):
                ensure_context(index)
                kernel = _utils._cuda_load_module(cubin, [name])[name]
        except RtcUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - no NVRTC, an old driver, a private API that moved
            raise RtcUnavailable(f"{type(exc).__name__}: {exc}") from exc
        _cache[key] = kernel
        return kernel


def nvrtc_library() -> ctypes.CDLL:
    """NVRTC as PyTorch finds it (loaded beside its CUDA libraries), else from the ``nvidia-cuda-nvrtc`` wheel's
    folder (a CPU-only machine compiles too: the tests check the kernels' source that way)."""
    try:
        from torch.cuda import _utils
        return _utils._get_nvrtc_library()
    except Exception:  # noqa: BLE001 - a CPU build of torch, or NVRTC not yet loaded
        pass
    import glob
    import importlib.util
    spec = importlib.util.find_spec("nvidia")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        for path in sorted(glob.glob(f"{folder}/*/lib/libnvrtc.so*"), reverse=True):
            if "builtins" not in path:
                return ctypes.CDLL(path)
    raise RtcUnavailable("NVRTC is not installed (it comes with PyTorch's CUDA builds, or pip install "
                         "nvidia-cuda-nvrtc)")


def compile_source(source: str, name: str, arch: str, defines: dict[str, int] | None = None,
                   ptxas_verbose: bool = False) -> tuple[bytes, str]:
    """``source`` compiled for ``arch`` (e.g. "sm_90") with ``-D`` macros: (cubin, NVRTC's log). No GPU needed."""
    options = [f"--gpu-architecture={arch}", "--std=c++17", "-default-device"]
    options += [f"-D{k}={int(v)}" for k, v in (defines or {}).items()]
    options += ["--ptxas-options=-v"] if ptxas_verbose else []
    return _nvrtc(nvrtc_library(), source, name, options)


def _nvrtc(lib, source: str, name: str, options: list[str]) -> tuple[bytes, str]:
    """NVRTC's C API through ctypes: compile ``source`` to a cubin (raises RtcUnavailable with NVRTC's log)."""
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), f"{name}.cu".encode(), 0, None, None):
        raise RtcUnavailable("nvrtcCreateProgram failed")
    try:
        opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
        failed = lib.nvrtcCompileProgram(prog, len(options), opts)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value or 1)
        lib.nvrtcGetProgramLog(prog, log)
        if failed:
            raise RtcUnavailable(f"NVRTC could not compile {name}: {log.value.decode(errors='replace')[:2000]}")
        if lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)) or not size.value:
            raise RtcUnavailable("NVRTC gave no machine code")
        binary = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetCUBIN(prog, binary)
        return binary.raw, log.value.decode(errors="replace")
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
