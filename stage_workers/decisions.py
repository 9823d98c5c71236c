"""What the stage that decides a token computes from the running Log-OP sum: the mode rules as
pure, batched functions (and speculative sampling's rejection rule).

A Log-OP accumulator row holds `sum_k w_k * log p_k` over the stages a position has passed;
dividing it by `(sum_k w_k) ** (1 - alpha)` gives the spec's ranking score. From scores the
deciding worker picks greedy tokens, tests WAND's margin against its bound, verifies
speculative drafts, or reads the Score log-probs of given tokens, all on its own device; only
token ids and a few numbers leave it. Nothing here knows sequences, workers or messages.
"""

from __future__ import annotations

import math

import torch

from .logop import normalize
from .sampling import draw


def divisor(weights: tuple[float, ...], stage: int, alpha: float) -> float:
    """`(sum of the weights of stages 0..stage) ** (1 - alpha)`: turns an accumulator into a score."""
    return sum(weights[: stage + 1]) ** (1.0 - alpha)


def accumulate(acc: torch.Tensor | None, logprobs: torch.Tensor, weight: float) -> torch.Tensor:
    """acc: (M, V) running sums or None (no stage added yet); logprobs: (M, V); weight: this
    stage's. The first term is `w * log p`, as `logop.combine` computes it."""
    term = logprobs if weight == 1.0 else logprobs * weight  # x * 1.0 is x, bit for bit
    return term if acc is None else acc + term


def wand_exits(scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """scores: (B, V) prefix scores after this stage; thresholds: (B,) safety * bound (+inf: never).
    (B,) bool: the top-1 minus top-2 margin clears the threshold. The last stage always emits,
    which the caller decides."""
    top = torch.topk(scores, 2, dim=-1).values  # (B, 2)
    return (top[:, 0] - top[:, 1]) > thresholds


def wand_threshold(bound: float, safety: float) -> float:
    """safety * bound, with an infinite bound never exiting whatever the safety (0 * inf is NaN)."""
    return math.inf if math.isinf(bound) else safety * bound


def verify_drafts(targets: list[int], drafts: list[int]) -> int:
    """Drafts accepted: the longest prefix where each draft is the full-PoE choice before it.
    targets: k+1 full-PoE argmaxes (at the last committed position and each drafted one)."""
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == targets[accepted]:
        accepted += 1
    return accepted


def verify_sampled(p: torch.Tensor, q: torch.Tensor, drafts: list[int], uniforms: tuple[float, ...]) -> tuple[int, int]:
    """Speculative sampling's rejection rule (Leviathan et al. 2023, Chen et al. 2023), which keeps
    the target distribution exactly. p: (n+1, V) target probabilities at the last committed
    position and each drafted one; q: (n, V) the drafter's, from which the n drafts were drawn;
    uniforms: n + 1 draws. Draft i is accepted with probability min(1, p_i(x_i) / q_i(x_i)); at the
    first rejection the token is drawn from normalize(max(p_i - q_i, 0)) with the last uniform,
    after n acceptances from p_n. Returns (drafts accepted, the token after them)."""
    n = len(drafts)
    for i, x in enumerate(drafts):
        if uniforms[i] * float(q[i, x]) >= float(p[i, x]):  # rejected
            residual = (p[i] - q[i]).clamp(min=0)  # (V,); p != q where it rejects, barring rounding
            return i, draw(residual if bool(residual.sum() > 0) else p[i], uniforms[n])
    return n, draw(p[n], uniforms[n])


def token_logprobs(scores: torch.Tensor, targets: list[int], top_n: int
                   ) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """scores: (n, V) full-PoE scores at n positions; targets: the token after each (-1: none).
    Returns each target's normalized log-prob (NaN where there is none) and, per position, the
    top_n (token, log-prob) alternatives."""
    lp = normalize(scores)  # (n, V)
    index = torch.tensor([max(t, 0) for t in targets], dtype=torch.long, device=lp.device)
    picked = lp.gather(1, index[:, None])[:, 0].double().tolist()  # (n,)
    logprobs = [v if t >= 0 else math.nan for v, t in zip(picked, targets)]
    top: list[list[tuple[int, float]]] = [[] for _ in targets]
    if top_n:
        values, ids = torch.topk(lp, top_n, dim=-1)  # (n, top_n)
        top = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.double().tolist())]
    return logprobs, top
