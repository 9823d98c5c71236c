"""The decode rule of each mode, as a small per-sequence decoder.

A decoder answers two questions for the engine: `plan(seq)`, what the next pipeline pass
must compute for this sequence, and `update(seq, logits)`, what that pass means (tokens to
commit, and for speculation the length to roll back to). Full, prefix, single-stage and
composition share `CompositionDecoder`; WAND and speculation have their own; `ScoreDecoder`
returns logits at every position. Decoders know Log-OP and sampling, never workers.
"""

from __future__ import annotations

import torch

from .logop import combine, log_probs, normalize
from .pipeline import StepPlan
from .requests import Composition, Speculative, Wand
from .sampling import SamplingParams, make_generator, sample
from .sequence import Sequence
from .wand import should_exit


class CompositionDecoder:
    """One token per pass from the Log-OP of a weighted stage set; greedy or sampled."""

    def __init__(self, mode: Composition, alpha: float, sampling: SamplingParams | None):
        self.mode, self.alpha, self.sampling = mode, alpha, sampling
        self.generator = make_generator(sampling.seed) if sampling else None

    def plan(self, seq: Sequence) -> StepPlan:
        return StepPlan(seq.num_unfed, max(self.mode.stages), {k: 1 for k in self.mode.stages})

    def reset(self) -> None:
        """After a rebuild: nothing pending (the sampler's state lives with committed tokens)."""

    def update(self, seq: Sequence, logits: dict[int, torch.Tensor]) -> None:
        score = combine([log_probs(logits[k][-1]) for k in self.mode.stages], self.mode.weights, self.alpha)
        if self.sampling is None:
            token = int(score.argmax())
        else:
            token = sample(normalize(score), self.sampling, self.generator)
        seq.commit([token])


class WandDecoder:
    """Stages in order; the pipeline stops at the first stage whose margin clears its bound."""

    def __init__(self, mode: Wand, num_stages: int, alpha: float):
        self.mode, self.num_stages, self.alpha = mode, num_stages, alpha
        self.logprobs: list[torch.Tensor] = []  # (V,) per stage evaluated for the current token
        self.choice: tuple[int, int] | None = None  # (token, exit stage)

    def reset(self) -> None:
        self.logprobs, self.choice = [], None

    def plan(self, seq: Sequence) -> StepPlan:
        self.reset()
        heads = {k: 1 for k in range(self.num_stages)}
        return StepPlan(seq.num_unfed, self.num_stages - 1, heads, stop_after=self._stop_after)

    def _stop_after(self, stage: int, logits: torch.Tensor) -> bool:
        assert stage == len(self.logprobs), "WAND must see stages in order"
        self.logprobs.append(log_probs(logits[-1]))
        score = combine(self.logprobs, [1.0] * len(self.logprobs), self.alpha)
        if should_exit(score, stage, self.num_stages, self.mode.bounds[stage], self.mode.safety):
            self.choice = (int(score.argmax()), stage)
            return True
        return False

    def update(self, seq: Sequence, logits: dict[int, torch.Tensor]) -> None:
        token, stage = self.choice
        seq.commit([token])
        seq.stages_used.append(stage)


class SpeculativeDecoder:
    """Rounds of k drafts from one stage, then one full-PoE pass over all drafted positions.

    Draft passes run stages 0..d and keep their log-probs (the verifier needs them, and the
    drafted positions' trunk states wait in `pending`, so nothing is recomputed). The verify
    pass catches stages d+1.. up over every drafted position at once.
    """

    def __init__(self, mode: Speculative, num_stages: int, alpha: float):
        self.d, self.k, self.num_stages, self.alpha = mode.draft_stage, mode.k_draft, num_stages, alpha
        self._new_round()

    def reset(self) -> None:
        self._new_round()

    def _new_round(self) -> None:
        self.k_round: int | None = None  # drafts this round: k, or fewer near max_new_tokens
        self.drafts: list[int] = []
        self.draft_logprobs: list[list[torch.Tensor]] = []  # per drafted position: (V,) for stages 0..d

    def plan(self, seq: Sequence) -> StepPlan:
        if self.k_round is None:
            remaining = seq.request.max_new_tokens - (seq.num_committed - seq.num_prompt)
            self.k_round = min(self.k, remaining - 1)
        if len(self.drafts) < self.k_round:
            return StepPlan(seq.num_unfed, self.d, {s: 1 for s in range(self.d + 1)})
        heads = {s: 1 if s <= self.d else self.k_round + 1 for s in range(self.num_stages)}
        return StepPlan(seq.num_unfed, self.num_stages - 1, heads)

    def update(self, seq: Sequence, logits: dict[int, torch.Tensor]) -> int | None:
        """Returns the length to roll every stage back to after a verification, else None."""
        if len(self.drafts) < self.k_round:
            stage_lps = [log_probs(logits[s][-1]) for s in range(self.d + 1)]
            self.draft_logprobs.append(stage_lps)
            self.drafts.append(int(stage_lps[self.d].argmax()))
            seq.tokens.append(self.drafts[-1])
            return None
        k = self.k_round
        drafted = [torch.stack(lps) for lps in zip(*self.draft_logprobs)] if k else []  # per stage <= d: (k, V)
        rows = []
        for s in range(self.num_stages):
            if s <= self.d:
                last = log_probs(logits[s][-1:])  # (1, V) at the last drafted position
                rows.append(torch.cat([drafted[s], last]) if k else last)
            else:
                rows.append(log_probs(logits[s]))  # (k+1, V)
        targets = combine(rows, [1.0] * self.num_stages, self.alpha).argmax(dim=-1).tolist()  # (k+1,)
        accepted = 0
        while accepted < k and self.drafts[accepted] == targets[accepted]:
            accepted += 1
        seq.num_proposed += k
        seq.num_accepted += accepted
        keep = seq.num_committed + accepted  # positions 0..keep-1 hold committed tokens
        seq.commit(self.drafts[:accepted] + [targets[accepted]])
        self._new_round()
        return keep


class ScoreDecoder:
    """Logits of the chosen stages at every position of a fixed sequence, then done (a long
    sequence's logits arrive over several passes, one per prefill chunk)."""

    def __init__(self, stages: tuple[int, ...]):
        self.stages = stages
        self.reset()

    def reset(self) -> None:
        self.logits: dict[int, list[torch.Tensor]] = {k: [] for k in self.stages}

    def plan(self, seq: Sequence) -> StepPlan:
        return StepPlan(seq.num_unfed, max(self.stages), {k: seq.num_unfed for k in self.stages})

    def update(self, seq: Sequence, logits: dict[int, torch.Tensor]) -> None:
        for k in self.stages:
            self.logits[k].append(logits[k])
        if seq.num_unfed == 0:
            seq.finish_reason = "scored"

    def stage_logits(self, stage: int) -> torch.Tensor:
        return torch.cat(self.logits[stage])  # (T, V)


def make_decoder(request, num_stages: int, alpha: float):
    mode = getattr(request, "mode", None)
    if isinstance(mode, Composition):
        return CompositionDecoder(mode, alpha, request.sampling)
    if isinstance(mode, Wand):
        return WandDecoder(mode, num_stages, alpha)
    if isinstance(mode, Speculative):
        return SpeculativeDecoder(mode, num_stages, alpha)
    return ScoreDecoder(request.stages)
