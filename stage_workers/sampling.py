"""Choosing the next token from normalized log-probabilities: greedy, or seeded sampling.

Sampling applies temperature, then min-p, then top-k, then top-p (vLLM's order), and draws by
inverse CDF over token ids in ascending order with one float64 uniform per token. The uniform comes from the request's own
generator, drawn by the coordinator and sent with the step, so a request's tokens do not depend
on what else is in the batch nor on which worker samples. Pure functions; nothing here knows
about stages or workers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None  # None: a fresh random seed per request
    min_p: float | None = None  # drop tokens below min_p times the top token's probability


def filtered_logits(logprobs: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(V,) normalized log-probs (or scores after decoding controls) -> (V,) logits with
    filtered-out tokens at -inf."""
    logits = logprobs.float() / params.temperature
    if params.min_p is not None and params.min_p > 0.0:  # p < min_p * p_max  <=>  logit < max + log(min_p)
        logits = logits.masked_fill(logits < logits.max() + math.log(params.min_p), float("-inf"))
    if params.top_k is not None and params.top_k < logits.numel():
        threshold = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        probs = torch.softmax(logits, dim=-1)
        sorted_probs, order = torch.sort(probs, descending=True, stable=True)
        drop_sorted = (sorted_probs.cumsum(0) - sorted_probs) >= params.top_p  # the top token always stays
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def probabilities(logprobs: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(..., V) normalized log-probs -> (..., V) fp32 probabilities after the filters."""
    if logprobs.dim() > 1:
        return torch.stack([probabilities(row, params) for row in logprobs])
    return torch.softmax(filtered_logits(logprobs, params), dim=-1)


def draw(probs: torch.Tensor, uniform: float) -> int:
    """(V,) probabilities (any non-negative weights) -> the token id at `uniform` (in [0, 1)) of
    their CDF over ids in ascending order."""
    cdf = probs.double().cpu().cumsum(0)
    u = torch.tensor([uniform], dtype=torch.float64)
    index = torch.searchsorted(cdf, u * cdf[-1], right=True)
    return int(index.clamp(max=cdf.numel() - 1))


def sample(logprobs: torch.Tensor, params: SamplingParams, uniform: float) -> int:
    """(V,) normalized log-probs -> one token id, at `uniform` (in [0, 1)) of the filtered CDF."""
    return draw(probabilities(logprobs, params), uniform)


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def draw_uniform(generator: torch.Generator) -> float:
    """The next float64 uniform of a request's stream (one per sampled token)."""
    return float(torch.rand(1, generator=generator, dtype=torch.float64))
