"""What a stage does for each sequence once its rows are computed: decide here, or let them go on.

`Onward` is the answer for one sequence: the next stage computes its rows now (`CONTINUE`),
keeps them with their Log-OP sums for later (`PARK`: a draft, or positions that need no token),
keeps them without sums because a token was decided here (`FINAL`), or they stay in this worker
(`HELD`: the last stage's drafts, until verification). `StageDecider` applies each sequence's
rule (its `SeqSpec`): the plain greedy and WAND choices of a whole batch at once (`batch_greedy`),
the rest one sequence at a time (`decide`), with the math of stage_workers/decisions.py. It
knows the rules and the rows; nothing of channels or the KV cache.
"""

from __future__ import annotations

import math
from enum import Enum

import torch

from . import decisions as rules
from .controls import apply_controls, apply_masks
from .logop import normalize
from .messages import Decision, SeqSpec, SeqStep, require
from .rows import Rows, cat_adjacent
from .sampling import draw, probabilities, sample
from .stage_state import StageState


class Onward(Enum):
    CONTINUE = "continue"  # the next stage computes the rows now
    PARK = "park"  # the next stage keeps the rows, with their sums, until it next runs for the sequence
    FINAL = "final"  # a token was decided here: the next stage keeps the rows, without sums
    HELD = "held"  # the rows stay here (the last stage's drafts, until verification)


class StageDecider:
    def __init__(self, stage: int, num_stages: int, state: StageState):
        self.stage, self.num_stages = stage, num_stages
        self.held = state.held  # drafted positions' sums awaiting verification
        self.history = state.history  # the tokens of sequences whose controls read them
        self.drafted = state.drafted  # sampled drafts' distributions

    def batch_greedy(self, work: list[tuple[SeqStep, SeqSpec]], outs: list[Rows]) -> dict[int, int | None]:
        """The step's plain decisions in one op: a greedy token at the deepest stage, and WAND's
        margin test. seq_id -> the token, or None where WAND goes on to the next stage."""
        k, last = self.stage, self.num_stages - 1
        picked, last_rows, divisors, thresholds = [], [], [], []
        for (s, spec), rows in zip(work, outs):
            if rows.num_acc == 0 or s.action != "decide" or spec.controls or spec.logprobs is not None or s.masks:
                continue
            if spec.rule == "wand" or (spec.rule == "sample" and spec.sampling is None and k == s.depth):
                picked.append(s.seq_id)
                last_rows.append(rows)
                divisors.append(rules.divisor(spec.weights, k, spec.alpha))
                thresholds.append(-math.inf if spec.rule != "wand" or k == last else spec.exit_thresholds[k])
        if not picked:
            return {}
        block = last_rows[0].block
        if all(r.block is block for r in last_rows):  # one gather from the batch's sums
            index = torch.tensor([r.acc0 + r.num_acc - 1 for r in last_rows], device=block.acc.device)
            stacked = block.acc.index_select(0, index)  # (B, V)
        else:
            stacked = cat_adjacent([r.acc[-1:] for r in last_rows])  # (B, V)
        scores = stacked / divisors[0] if len(set(divisors)) == 1 else \
            stacked / torch.tensor(divisors, device=stacked.device)[:, None]
        tokens = scores.argmax(dim=-1).tolist()
        wand = [t > -math.inf for t in thresholds]
        exits = rules.wand_exits(scores, torch.tensor(thresholds, device=scores.device)).tolist() if any(wand) \
            else [True] * len(picked)
        return {seq_id: token if done or not w else None for seq_id, token, done, w in zip(picked, tokens, exits, wand)}

    def decide(self, s: SeqStep, spec: SeqSpec, rows: Rows, own: torch.Tensor | None, decisions: list) -> Onward:
        """Apply the sequence's rule at this stage (WAND and greedy tokens without controls:
        `batch_greedy`). `own`: this stage's own log-probs at the rows that got logits (M, V)."""
        k, last = self.stage, self.num_stages - 1
        if s.action == "none" or spec.rule == "logits":  # nothing to decide; the deepest stage says it is done
            if k < s.depth:
                return Onward.CONTINUE
            decisions.append(Decision(s.seq_id, k))
            return Onward.PARK
        if spec.rule == "wand" and s.action == "decide":  # with controls: the margin of the controlled scores
            raw = rows.acc[-1:] / rules.divisor(spec.weights, k, spec.alpha)  # (1, V)
            scores = self._controlled(s, spec, rows, raw)
            threshold = -math.inf if k == last else spec.exit_thresholds[k]
            if not rules.wand_exits(scores, torch.tensor([threshold], device=scores.device))[0]:
                return Onward.CONTINUE
            decisions.append(self._decision(s, spec, raw, [int(scores[0].argmax())]))
            return Onward.FINAL
        if k < s.depth:
            return Onward.CONTINUE
        if spec.rule == "sample":  # a sampled token, or a greedy one under controls
            raw = rows.acc[-1:] / rules.divisor(spec.weights, k, spec.alpha)  # (1, V)
            score = self._controlled(s, spec, rows, raw, normalized=True)[0]  # (V,)
            token = int(score.argmax()) if spec.sampling is None else sample(score, spec.sampling, s.uniforms[0])
            decisions.append(self._decision(s, spec, raw, [token]))
            return Onward.FINAL
        if spec.rule == "score":
            scores = rows.acc / rules.divisor(spec.weights, k, spec.alpha)  # (n, V)
            logprobs, top = rules.token_logprobs(scores, list(s.targets), spec.top_n)
            decisions.append(Decision(s.seq_id, k, logprobs=tuple(logprobs), top=tuple(map(tuple, top))))
            return Onward.FINAL
        if s.action == "draft":  # speculative: this stage's own distribution drafts the next token
            decisions.append(Decision(s.seq_id, k, self._draft(s, spec, rows, own[-1:])))
            if k == last:
                held = self.held.get(s.seq_id)
                kept = Rows.of(rows.start, rows.token_ids, None, rows.acc)
                self.held[s.seq_id] = kept.kept() if held is None else held.then(kept)
                return Onward.HELD
            return Onward.PARK
        return self._verify(s, spec, rows, decisions)

    def _verify(self, s: SeqStep, spec: SeqSpec, rows: Rows, decisions: list) -> Onward:
        """Speculative verification at the last stage: the full-PoE choice at the last committed
        position and each drafted one; drafts kept up to the first disagreement, plus one token."""
        held = self.held.pop(s.seq_id, None)
        kept = Rows.of(rows.start, rows.token_ids, None, rows.acc)
        rows = kept if held is None else held.then(kept)
        raw = rows.acc / rules.divisor(spec.weights, self.stage, spec.alpha)  # (k+1, V)
        scores = self._controlled(s, spec, rows, raw, normalized=spec.sampling is not None)
        drafts = rows.token_ids[len(rows) - scores.shape[0] + 1 :].tolist()
        if spec.sampling is None:
            targets = scores.argmax(dim=-1).tolist()
            accepted = rules.verify_drafts(targets, drafts)
            token = targets[accepted]
        else:
            p = probabilities(scores, spec.sampling)  # (k+1, V)
            q = self.drafted.pop(s.seq_id, p[:0])  # (k, V); none when the round had no room for a draft
            require(q.shape[0] == len(drafts), f"sequence {s.seq_id}: {q.shape[0]} draft distributions for "
                                                f"{len(drafts)} drafts")
            accepted, token = rules.verify_sampled(p, q.to(p.device), drafts, s.uniforms)
        decisions.append(self._decision(s, spec, raw[: accepted + 1], drafts[:accepted] + [token], accepted))
        return Onward.FINAL

    def _decision(self, s: SeqStep, spec: SeqSpec, raw: torch.Tensor, tokens: list[int], accepted: int = -1
                  ) -> Decision:
        """The decision of `tokens` (the last one its token), chosen from raw: (n, V) scores, one row
        per token; with the chosen tokens' log-probs (before controls and filters) when asked."""
        if spec.logprobs is None:
            return Decision(s.seq_id, self.stage, tokens[-1], accepted)
        logprobs, top = rules.token_logprobs(raw, tokens, spec.logprobs)
        return Decision(s.seq_id, self.stage, tokens[-1], accepted, tuple(logprobs), tuple(map(tuple, top)))

    def _draft(self, s: SeqStep, spec: SeqSpec, rows: Rows, own: torch.Tensor) -> int:
        """own: (1, V) this stage's log-probs at the last position -> the draft: its argmax, or a
        draw whose distribution q waits for the verifier (StageState.drafted)."""
        scores = self._controlled(s, spec, rows, own)
        if spec.sampling is None:
            return int(scores[0].argmax())
        q = probabilities(scores, spec.sampling)  # (1, V)
        held = self.drafted.get(s.seq_id)
        self.drafted[s.seq_id] = q if held is None else torch.cat([held, q])
        return draw(q[0], s.uniforms[0])

    def _controlled(self, s: SeqStep, spec: SeqSpec, rows: Rows, scores: torch.Tensor, normalized: bool = False
                    ) -> torch.Tensor:
        """scores: (n, V) for the token after each of the last n positions of `rows` -> the
        normalized log-probs with the sequence's decoding controls applied, then its grammar's
        masks; without either, the scores as they are (`normalized`: their log-probs, to sample)."""
        if spec.controls is None and not s.masks:
            return normalize(scores) if normalized else scores
        if spec.controls is not None:
            first = rows.start + len(rows) - scores.shape[0]
            positions = list(range(first, rows.start + len(rows)))
            scores = apply_controls(normalize(scores), spec.controls, self.history.get(spec.seq_id, []), positions)
        if s.masks:
            require(len(s.masks) == scores.shape[0], f"sequence {s.seq_id}: {len(s.masks)} grammar masks for "
                                                     f"{scores.shape[0]} positions")
            scores = apply_masks(normalize(scores) if spec.controls is None else scores, s.masks)
        return scores
