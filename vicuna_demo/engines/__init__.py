"""Engines: one object per model that turns a conversation into a stream of text deltas.

    protocol.py     the Engine interface every engine implements, SamplingParams, ReplyStats, errors
    local.py        a model loaded in this process: fast path or continuous batching on one thread
    fastpath/       the fast back end: paged KV cache, batched prefill, CUDA graphs, Triton kernels
    textstream.py   token ids -> complete UTF-8 text, stop strings cut
    remote.py       an OpenAI-compatible endpoint
    zerogpu.py      ZeroGPU Spaces: one spaces.GPU call per reply
"""
