"""Every mode, written once: the table of modes (`MODES`), and the decode rule of each as a small
per-sequence decoder.

`MODES` maps a mode's name to its `ModeInfo`: its arguments (one name everywhere: the Python
keyword, the CLI flag, the HTTP field, the proto field), how they are validated into a mode
(coordinator/core/requests.py), whether it samples, what it reports besides tokens, and its
decoder. The CLI, the gRPC and HTTP wires, the HTTP schema, the client, the demo and the bench
read it; nothing else lists modes.

A decoder answers three questions for the engine: `spec(seq, homes)`, what every worker keeps
about the sequence (its stage weights and what its deciding stage does; sent once);
`plan(seq)`, what the next step must compute for it; and `update(seq, outcome)`, what that
step's decision means (tokens to commit, and for speculation the length to roll back to). The
math itself (Log-OP sums, argmax, sampling, WAND's margin test, verification) runs in the
worker that decides (stage_workers/decisions.py); decoders see tokens and a few numbers.
Full, prefix, single-stage and composition share `CompositionDecoder`; WAND and speculation
have their own; `ScoreDecoder` scores a fixed sequence. Decoders never see workers.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from coordinator.core import requests as rq
from coordinator.core.pipeline import Outcome, SeqPlan
from coordinator.core.requests import LogitsRequest, ScoreRequest
from coordinator.core.sequence import Sequence
from stage_workers.controls import Controls
from stage_workers.decisions import wand_threshold
from stage_workers.messages import SeqSpec
from stage_workers.sampling import draw_uniform, make_generator


def _controls(seq: Sequence) -> Controls | None:
    """The request's decoding controls as its deciding worker applies them: with the prompt's
    length and the stop ids that `min_tokens` holds back."""
    controls = seq.request.controls
    if controls is None:
        return None
    return controls._replace(stop_ids=tuple(sorted(seq.request.stop_token_ids)), prompt_len=seq.num_prompt)


def _grammar(request: rq.GenerationRequest):
    """A structured request's grammar state (coordinator/structured_output.py), else None."""
    return None if request.structured is None else request.structured.state()


def _mask(grammar) -> tuple[bytes, ...]:
    return () if grammar is None else (grammar.mask(),)


def _accept(grammar, tokens: list[int]) -> None:
    if grammar is not None:
        grammar.accept(tokens)


def _weights(stages: tuple[int, ...], weights: tuple[float, ...], num_stages: int) -> tuple[float, ...]:
    """Per stage: its weight in the combination, 0 for stages left out."""
    out = [0.0] * num_stages
    for stage, weight in zip(stages, weights):
        out[stage] = weight
    return tuple(out)


class CompositionDecoder:
    """One token per step from the Log-OP of a weighted stage set; greedy or sampled."""

    def __init__(self, request: rq.GenerationRequest, num_stages: int, alpha: float):
        self.mode, self.num_stages, self.alpha, self.sampling = request.mode, num_stages, alpha, request.sampling
        self.generator = make_generator(self.sampling.seed) if self.sampling else None
        self.draws: deque[float] = deque()  # draws of the next tokens, in order, each kept until its token commits
        self.grammar = _grammar(request)

    def spec(self, seq: Sequence, homes: tuple[int, ...]) -> SeqSpec:
        weights = _weights(self.mode.stages, self.mode.weights, self.num_stages)
        return SeqSpec(seq.seq_id, "sample", homes, weights, self.alpha, self.sampling, controls=_controls(seq),
                       logprobs=seq.request.logprobs)

    def plan(self, seq: Sequence) -> SeqPlan:
        return SeqPlan(seq.num_unfed, max(self.mode.stages), len(seq.tokens) - 1, uniforms=self._draws(0, 1),
                       masks=_mask(self.grammar))

    def ahead(self, n: int) -> tuple[float, ...]:
        """The draws of the n tokens after the planned one (a decode run's); none when greedy."""
        return self._draws(1, n)

    def _draws(self, first: int, n: int) -> tuple[float, ...]:
        if self.sampling is None:
            return ()
        while len(self.draws) < first + n:
            self.draws.append(draw_uniform(self.generator))
        return tuple(itertools.islice(self.draws, first, first + n))

    def reset(self) -> None:
        """After a rebuild: nothing to forget (each draw stays with the token it is for)."""

    def update(self, seq: Sequence, outcome: Outcome) -> None:
        _accept(self.grammar, seq.commit([outcome.decision.token], outcome.decision))
        if self.draws:
            self.draws.popleft()


class WandDecoder:
    """Stages in order; the worker of the first stage whose margin clears its bound emits the token."""

    def __init__(self, request: rq.GenerationRequest, num_stages: int, alpha: float):
        self.mode, self.num_stages, self.alpha = request.mode, num_stages, alpha
        self.grammar = _grammar(request)

    def spec(self, seq: Sequence, homes: tuple[int, ...]) -> SeqSpec:
        thresholds = tuple(wand_threshold(bound, self.mode.safety) for bound in self.mode.bounds)
        return SeqSpec(seq.seq_id, "wand", homes, (1.0,) * self.num_stages, self.alpha, exit_thresholds=thresholds,
                       controls=_controls(seq), logprobs=seq.request.logprobs)

    def plan(self, seq: Sequence) -> SeqPlan:
        return SeqPlan(seq.num_unfed, self.num_stages - 1, len(seq.tokens) - 1, masks=_mask(self.grammar))

    def ahead(self, n: int) -> tuple[float, ...]:
        """A decode run's later steps need nothing from here (WAND is greedy)."""
        return ()

    def reset(self) -> None:
        """After a rebuild: nothing pending."""

    def update(self, seq: Sequence, outcome: Outcome) -> None:
        _accept(self.grammar, seq.commit([outcome.decision.token], outcome.decision))
        seq.stages_used.append(outcome.decision.stage)


class SpeculativeDecoder:
    """Rounds of k drafts from one stage, then one full-PoE step over all drafted positions.

    Draft steps run stages 0..d; stage d drafts with its own distribution, and the drafted
    positions' boundary states and Log-OP sums wait in stage d+1's worker (stage d's own if it
    is the last), so nothing is recomputed. The verify step catches stages d+1.. up over every
    drafted position at once, and the last stage returns how many drafts the full PoE accepts.
    Sampled, a round takes k + (k + 1) draws from the request's generator, in order: one per
    draft, then one per draft's acceptance test and one for the token after; a round redone
    after a rebuild reuses them, so it gives the same tokens.
    """

    def __init__(self, request: rq.GenerationRequest, num_stages: int, alpha: float):
        mode = request.mode
        self.d, self.k, self.num_stages, self.alpha = mode.draft_stage, mode.k_draft, num_stages, alpha
        self.sampling = request.sampling
        self.generator = make_generator(self.sampling.seed) if self.sampling else None
        self.grammar = _grammar(request)  # through the drafts proposed so far
        self._new_round()

    def spec(self, seq: Sequence, homes: tuple[int, ...]) -> SeqSpec:
        return SeqSpec(seq.seq_id, "speculative", homes, (1.0,) * self.num_stages, self.alpha, self.sampling,
                       draft_stage=self.d, controls=_controls(seq), logprobs=seq.request.logprobs)

    def reset(self) -> None:
        """After a rebuild: the round starts again, with the draws it had."""
        if self.grammar is not None:
            self.grammar.rollback(len(self.drafts))
        self.k_round, self.drafts = None, []

    def _new_round(self) -> None:
        self.k_round: int | None = None  # drafts this round: k, or fewer near max_new_tokens
        self.drafts: list[int] = []
        self.draws: list[float] = []  # the round's uniforms, drawn as first needed

    def _uniforms(self, n: int) -> tuple[float, ...]:
        """The next step's n draws (none when greedy): the round's, after those its drafts used."""
        if self.sampling is None:
            return ()
        first = len(self.drafts)
        while len(self.draws) < first + n:
            self.draws.append(draw_uniform(self.generator))
        return tuple(self.draws[first : first + n])

    def plan(self, seq: Sequence) -> SeqPlan:
        if self.k_round is None:
            remaining = seq.request.max_new_tokens - (seq.num_committed - seq.num_prompt)
            self.k_round = min(self.k, remaining - 1)
        if len(self.drafts) < self.k_round:
            return SeqPlan(seq.num_unfed, self.d, len(seq.tokens) - 1, action="draft", uniforms=self._uniforms(1),
                           masks=_mask(self.grammar))
        return SeqPlan(seq.num_unfed, self.num_stages - 1, seq.num_committed - 1,  # the last committed + drafts
                       uniforms=self._uniforms(self.k_round + 1), masks=self._verify_masks())

    def _verify_masks(self) -> tuple[bytes, ...]:
        """The grammar's masks at the last committed position and after each draft."""
        if self.grammar is None:
            return ()
        self.grammar.rollback(len(self.drafts))
        masks = []
        for draft in [*self.drafts, None]:
            masks.append(self.grammar.mask())
            if draft is not None:
                self.grammar.accept([draft])
        return tuple(masks)

    def update(self, seq: Sequence, outcome: Outcome) -> int | None:
        """Returns the length to roll every stage back to after a verification, else None."""
        decision = outcome.decision
        if len(self.drafts) < self.k_round:
            self.drafts.append(decision.token)
            seq.tokens.append(decision.token)
            _accept(self.grammar, [decision.token])
            return None
        accepted = decision.accepted
        seq.num_proposed += self.k_round
        seq.num_accepted += accepted
        keep = seq.num_committed + accepted  # positions 0..keep-1 hold committed tokens
        if self.grammar is not None:
            self.grammar.rollback(len(self.drafts) - accepted)
        _accept(self.grammar, seq.commit(self.drafts[:accepted] + [decision.token], decision)[accepted:])
        self._new_round()
        return keep


class ScoreDecoder:
    """A fixed sequence, scored in one or more steps (one per prefill chunk). A `ScoreRequest`
    gets the full-PoE log-prob of each token after the first (and top_n alternatives per
    position), computed by the deepest stage's worker; a `LogitsRequest` gets the chosen
    stages' logits at every position (forward, forward_stage, calibration)."""

    def __init__(self, request: ScoreRequest | LogitsRequest, num_stages: int, alpha: float):
        self.request, self.num_stages, self.alpha = request, num_stages, alpha
        self.reset()

    def spec(self, seq: Sequence, homes: tuple[int, ...]) -> SeqSpec:
        given = getattr(self.request, "weights", None) or (1.0,) * len(self.request.stages)
        weights = _weights(self.request.stages, given, self.num_stages)
        if isinstance(self.request, LogitsRequest):
            return SeqSpec(seq.seq_id, "logits", homes, weights, self.alpha)
        return SeqSpec(seq.seq_id, "score", homes, weights, self.alpha, top_n=self.request.top_n)

    def reset(self) -> None:
        self.logits: dict[int, list[torch.Tensor]] = {k: [] for k in self.request.stages}
        self.logprobs: list[float] = []  # log p of the token after each position (NaN after the last)
        self.top: list[tuple[tuple[int, float], ...]] = []  # top_n (token, log p) at each position

    def plan(self, seq: Sequence) -> SeqPlan:
        start, tokens = seq.num_computed[0], seq.tokens
        targets = tuple(tokens[p + 1] if p + 1 < len(tokens) else -1 for p in range(start, len(tokens)))
        return SeqPlan(seq.num_unfed, max(self.request.stages), start, targets=targets)

    def update(self, seq: Sequence, outcome: Outcome) -> None:
        if isinstance(self.request, LogitsRequest):
            for k in self.request.stages:
                self.logits[k].append(outcome.logits[k].cpu())  # the caller's tensors live on the host
        else:
            self.logprobs.extend(outcome.decision.logprobs)
            self.top.extend(outcome.decision.top)
        if seq.num_unfed == 0:
            seq.finish_reason = "scored"

    def stage_logits(self, stage: int) -> torch.Tensor:
        return torch.cat(self.logits[stage])  # (T, V)


# ---- the table of modes ----------------------------------------------------------------------
@dataclass(frozen=True)
class ModeArg:
    name: str  # the same everywhere: keyword, CLI flag (--max-stages), HTTP field, proto field
    kind: type  # int or float; `many`: a list of them (comma-separated on the CLI)
    help: str
    default: object = None  # taken when unset; None: the argument has no default
    many: bool = False
    required: bool = False  # unset is an error (no default makes sense)


@dataclass(frozen=True)
class ModeInfo:
    name: str
    help: str
    args: tuple[ModeArg, ...]
    build: Callable  # build(config, **args) -> the mode, or a ValueError naming the argument
    decoder: type  # plans each step and reads its decision (above)
    samples: bool = False  # takes sampling parameters; the others are greedy by definition
    statistic: str | None = None  # what it reports besides tokens: "stages_used" or "acceptance"
    example: Callable[[int], dict] = lambda num_stages: {}  # arguments the demo and bench show, for K stages

    def check_names(self, values: dict) -> None:
        """Refuse a value given for an argument of another mode (None counts as not given)."""
        own = [a.name for a in self.args]
        stray = sorted(k for k, v in values.items() if v is not None and k not in own)
        if stray:
            raise ValueError(f"{stray[0]} is not an argument of mode {self.name}; allowed: "
                             f"{', '.join(own) or 'no mode arguments'}")

    def mode(self, config, values: dict):
        """The validated mode from `values` (argument name -> value; None or absent: the default;
        a value for another mode's argument is an error)."""
        self.check_names(values)
        missing = [a for a in self.args if a.required and values.get(a.name) is None]
        if missing:
            raise ValueError(f"{missing[0].name}: required by mode {self.name}; allowed: {missing[0].help}")
        args = {a.name: a.default if values.get(a.name) is None else values[a.name] for a in self.args}
        return self.build(config, **args)


MODES: dict[str, ModeInfo] = {m.name: m for m in (
    ModeInfo("full", "every stage, Log-OP with equal weights", (), rq.full_mode, CompositionDecoder, samples=True),
    ModeInfo("prefix", "stages 0..max_stages-1 (a pruned model)",
             (ModeArg("max_stages", int, "stages used, from the first: an integer 1..K", required=True),),
             rq.prefix_mode, CompositionDecoder, samples=True, example=lambda K: {"max_stages": max(K - 1, 1)}),
    ModeInfo("stage", "one stage's own head (a drafter)",
             (ModeArg("stage", int, "the stage index: an integer 0..K-1", required=True),),
             rq.stage_mode, CompositionDecoder, samples=True, example=lambda K: {"stage": 0}),
    ModeInfo("composition", "a weighted Log-OP of chosen stages",
             (ModeArg("stages", int, "stage indices 0..K-1", many=True, required=True),
              ModeArg("stage_weights", float, "weights > 0, one per stage (default: all 1)", many=True)),
             rq.composition_mode, CompositionDecoder, samples=True,
             example=lambda K: {"stages": [0, K - 1], "stage_weights": [0.5, 1.0]}),
    ModeInfo("wand", "adaptive depth: exit at the first stage whose margin clears its bound",
             (ModeArg("safety", float, "bound multiplier >= 0", 1.0),
              ModeArg("p99_bounds", float, "bounds >= 0, one per stage (default: the checkpoint's calibration)",
                      many=True)),
             rq.wand_mode, WandDecoder, statistic="stages_used", example=lambda K: {"safety": 1.0}),
    ModeInfo("speculative", "self-speculative: one stage drafts, the full PoE verifies",
             (ModeArg("draft_stage", int, "the drafting stage", 0),
              ModeArg("k_draft", int, f"drafts per round, 1..{rq.MAX_K_DRAFT}", 3)),
             rq.speculative_mode, SpeculativeDecoder, samples=True, statistic="acceptance",
             example=lambda K: {"draft_stage": 0, "k_draft": 3}),
)}


ARG_NAMES = tuple(a.name for m in MODES.values() for a in m.args)  # every mode's arguments


def make_decoder(request, num_stages: int, alpha: float):
    if isinstance(request, (ScoreRequest, LogitsRequest)):
        return ScoreDecoder(request, num_stages, alpha)
    return MODES[request.mode.name].decoder(request, num_stages, alpha)
