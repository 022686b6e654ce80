"""Per-row sampling that is safe inside a CUDA graph (greedy, temperature, top_p in one batch)."""

from __future__ import annotations

import torch


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, greedy: torch.Tensor,
           mode: str) -> torch.Tensor:
    """Per-row sampling, safe inside a CUDA graph. logits [B, V] fp32; temperature/top_p [B] fp32 (1.0 for
    greedy rows); greedy [B] bool. mode: "greedy" (every row greedy), "sample" (no top_p below 1), "top_p"."""
    best = logits.argmax(dim=-1)
    if mode == "greedy":
        return best
    probs = torch.softmax(logits / temperature[:, None], dim=-1)
    if mode == "top_p":
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(before > top_p[:, None], 0.0)
        noise = torch.empty_like(sorted_probs).exponential_()
        choice = (sorted_probs / noise).argmax(dim=-1, keepdim=True)
        drawn = order.gather(-1, choice)[:, 0]
    else:
        noise = torch.empty_like(probs).exponential_()
        drawn = (probs / noise).argmax(dim=-1)
    return torch.where(greedy, best, drawn)


def sampling_mode(rows) -> str:
    if all(r.greedy for r in rows):
        return "greedy"
    return "top_p" if any((not r.greedy) and r.top_p < 1.0 for r in rows) else "sample"
