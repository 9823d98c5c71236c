"""WAND calibration (spec section 4), pure math.

After stage j the prefix combination `score_j` may emit its argmax when its top-2 margin
exceeds `safety * bound_j` (that test runs in the stage's worker: stage_workers/decisions.py).
Calibration measures, per position, how far the remaining stages could move the winner
relative to the runner-up (`U_j`) and takes a quantile. Nothing here knows about workers or
sequences.
"""

from __future__ import annotations

import torch


def exit_gaps(prefix_score: torch.Tensor, full_score: torch.Tensor) -> torch.Tensor:
    """(T, V) scores of stages 0..j and of all stages -> (T,) U_j, clamped at 0.

    U_j = max_{b != a} [(full(b) - full(a)) - (score_j(b) - score_j(a))], a = argmax score_j.
    """
    a = prefix_score.argmax(dim=-1, keepdim=True)  # (T, 1)
    gap = (full_score - full_score.gather(-1, a)) - (prefix_score - prefix_score.gather(-1, a))  # (T, V)
    gap = gap.scatter(-1, a, float("-inf"))  # exclude b == a
    return gap.max(dim=-1).values.clamp(min=0)


def bounds_from_gaps(gaps_per_stage: list[torch.Tensor], quantile: float) -> list[float]:
    """Quantile of U_j per stage (linear interpolation, as torch.quantile); the last stage gets 0."""
    bounds = [float(torch.quantile(g.double(), quantile)) for g in gaps_per_stage[:-1]]
    return bounds + [0.0]
