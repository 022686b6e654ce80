"""Per-row sampling that is safe inside a CUDA graph (greedy, temperature, top_p, repetition penalty in one
batch): fixed shapes, no host synchronisation, no allocation that depends on the data."""

from __future__ import annotations

import torch


def penalize(logits: torch.Tensor, penalty: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """The repetition penalty of transformers' ``RepetitionPenaltyLogitsProcessor`` (CTRL's), per row: the
    logit of each token already in the row's sequence (``seen`` [B, V] bool) is divided by the row's
    ``penalty`` [B] when positive and multiplied by it when negative. A row with penalty 1.0 comes out
    bit-identical (x / 1.0 and x * 1.0 are exact)."""
    p = penalty[:, None]
    return torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)


def mark_seen(seen: torch.Tensor, tokens: torch.Tensor) -> None:
    """Add each row's new token ([B] long) to its seen set (in place, graph-safe)."""
    seen.scatter_(1, tokens[:, None], True)


def seen_mask(sequences: list[list[int]], penalties: list[float], vocab: int, device) -> torch.Tensor:
    """[len(sequences), vocab] bool: the tokens of each sequence whose penalty is not 1.0 (others all False).
    Built outside any graph (admission, reloading rows)."""
    mask = torch.zeros(len(sequences), vocab, dtype=torch.bool, device=device)
    for row, (ids, penalty) in enumerate(zip(sequences, penalties)):
        if penalty != 1.0 and ids:
            index = torch.tensor([t for t in ids if 0 <= t < vocab], dtype=torch.long)
            mask[row, index.to(device)] = True
    return mask


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, greedy: torch.Tensor,
           mode: str, penalty: torch.Tensor | None = None, seen: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row sampling, safe inside a CUDA graph. logits [B, V] fp32; temperature/top_p [B] fp32 (1.0 for
    greedy rows); greedy [B] bool; penalty [B] fp32 and seen [B, V] bool (the repetition penalty, applied
    first as in transformers; None: none). mode: "greedy" (every row greedy), "sample" (no top_p below 1),
    "top_p"."""
    if penalty is not None:
        logits = penalize(logits, penalty, seen)
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


def row_parameters(jobs, rows: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(temperature, top_p, greedy, penalty) [rows] of ``jobs`` (``Job``), the rows beyond them greedy without a
    penalty; a greedy row's temperature is 1.0 (``sample`` divides every row by its own)."""
    temperature, top_p, penalty = torch.ones(rows), torch.ones(rows), torch.ones(rows)
    greedy = torch.ones(rows, dtype=torch.bool)
    for i, job in enumerate(jobs):
        temperature[i] = 1.0 if job.greedy else max(job.temperature, 1e-5)
        top_p[i], greedy[i], penalty[i] = job.top_p, job.greedy, job.repetition_penalty
    return temperature.to(device), top_p.to(device), greedy.to(device), penalty.to(device)


def sampling_mode(jobs) -> str:
    if all(j.greedy for j in jobs):
        return "greedy"
    return "top_p" if any((not j.greedy) and j.top_p < 1.0 for j in jobs) else "sample"
