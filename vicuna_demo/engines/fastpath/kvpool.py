"""The KV block pool: blocks taken per request, released when it ends, and kept as a prefix cache that the
next turn of the same conversation takes over."""

from __future__ import annotations

import math
from collections import OrderedDict


def common_prefix(a: list[int], b: list[int]) -> int:
    lo, hi = 0, min(len(a), len(b))
    if hi == 0 or a[0] != b[0]:
        return 0
    if a[:hi] == b[:hi]:
        return hi
    while lo < hi:                      # invariant: a[:lo] == b[:lo], a[:hi+1] != b[:hi+1]
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class BlockPool:
    """Free KV blocks plus an LRU cache of finished sequences' blocks (block 0 is never handed out)."""

    def __init__(self, n_blocks: int, block: int, keep_cache: bool):
        self.block = block
        self.free: list[int] = list(range(n_blocks - 1, 0, -1))
        self.cached: OrderedDict[int, tuple[list[int], list[int]]] = OrderedDict()
        self.keep_cache = keep_cache
        self._keys = 0

    def take(self, n: int) -> list[int] | None:
        while len(self.free) < n and self.cached:
            _, (_, blocks) = self.cached.popitem(last=False)
            self.free.extend(blocks)
        if len(self.free) < n:
            return None
        taken, self.free = self.free[-n:] if n else [], self.free[:-n] if n else self.free
        return taken

    def release(self, blocks: list[int]) -> None:
        self.free.extend(blocks)

    def remember(self, tokens: list[int], blocks: list[int]) -> None:
        if not self.keep_cache or not tokens:
            self.release(blocks)
            return
        keep = math.ceil(len(tokens) / self.block)
        self.release(blocks[keep:])
        self._keys += 1
        self.cached[self._keys] = (tokens, blocks[:keep])

    def reuse(self, ids: list[int], min_tokens: int = 16) -> tuple[list[int], int]:
        """Take over the cached blocks sharing the longest prefix with ``ids``. -> (blocks, cached tokens)."""
        best_key, best = None, 0
        for key, (tokens, _) in self.cached.items():
            c = common_prefix(tokens, ids)
            if c > best:
                best_key, best = key, c
        if best_key is None or best < min_tokens:
            return [], 0
        tokens, blocks = self.cached.pop(best_key)
        start = min(best, len(ids) - 1)
        keep = math.ceil(start / self.block) if start else 0
        self.release(blocks[keep:])
        return blocks[:keep], start
