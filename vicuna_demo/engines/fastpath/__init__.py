"""The fast path: decoding with a paged KV cache, batched prefill and CUDA graphs (Llama, Mistral, Qwen, Gemma).

Why it exists: on the GPU machines measured here one eager decode step of a 7B model took 67 ms
(kernel launches from a slow host), so speed comes from launching a whole decode step as one CUDA
graph, from few fused kernels per layer (``kernels.py``), and from batching every running
request into that one step. On a CPU it is a lean loop over the same modules, without
``generate``'s per-step machinery.

    runner = FastModel(hf_model, max_context=4096, options=FastOptions())   # weights are shared
    sched = FastScheduler(runner)            # one thread owns all model work (CUDA graphs need that)
    sched.start(progress); sched.wait_ready()   # allocate + capture graphs now, not in a first request
    sched.submit(Job(...))                   # tokens arrive through job.emit(tokens, finished, error)

Supported: the architectures of ``arch.py`` (Llama 2/3, Mistral with or without sliding window, Qwen2/2.5,
Qwen3, Gemma 2, Gemma 3 text), all run by the one decoder forward of ``forward.py``. ``unsupported_reason``
says why another model is not; the engine then falls back to transformers' continuous batching.
Projections may be plain ``nn.Linear`` or bitsandbytes ``Linear8bitLt`` (8-bit) / ``Linear4bit`` (NF4).

Memory: KV blocks come from one pool per layer; a request reserves the blocks for its prompt plus
its token budget when it is admitted (no mid-reply eviction); finished requests leave their
blocks as a prefix cache that the next turn of the same conversation takes over.
"""

from .arch import describe, unsupported_reason
from .jobs import Job
from .model import FastModel
from .options import FastOptions
from .sampling import sample
from .scheduler import FastScheduler

__all__ = ["FastModel", "FastOptions", "FastScheduler", "Job", "describe", "sample", "unsupported_reason"]
