"""Log-OP, the PoE combiner (spec section 4), as pure functions on log-probabilities.

`score = sum_k w_k * log p_k / (sum_k w_k) ** (1 - alpha)` is a ranking score; `normalize`
turns it into log-probabilities for sampling, scoring and bits-per-byte. A stage worker adds its
stage's term to a running sum that travels with the hidden state; the coordinator combines
returned stage logits for `forward` and calibration. Nothing here knows about workers,
sequences or where the log-probs came from.
"""

from __future__ import annotations

import torch


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """(..., V) stage logits -> fp32 log-probabilities."""
    return torch.log_softmax(logits.float(), dim=-1)


def combine(logprobs: list[torch.Tensor], weights: list[float] | tuple[float, ...], alpha: float) -> torch.Tensor:
    """logprobs: one (..., V) tensor per selected stage; weights: one per stage. Returns (..., V)."""
    assert len(logprobs) == len(weights) >= 1, "Log-OP needs one weight per stage, and at least one stage"
    total = logprobs[0] * weights[0]
    for lp, w in zip(logprobs[1:], weights[1:]):
        total = total + lp * w
    return total / sum(weights) ** (1.0 - alpha)


def normalize(score: torch.Tensor) -> torch.Tensor:
    """(..., V) ranking score -> normalized log-probabilities."""
    return score - torch.logsumexp(score, dim=-1, keepdim=True)
