"""Moving positions through the stages, in stage order, for a batch of sequences.

Each sequence comes with a `StepPlan`: how many of its unfed tokens enter stage 0, the deepest
stage to run, and which stage logits to return. A stage computes every position its upstream
has computed and it has not (catch-up), so decode, prefill chunks, WAND's deferred catch-up and
speculative verification are all the same call. Boundary states wait in `Sequence.pending`
until their downstream stage runs. Each stage is a `StageReplicas` (one worker or several).

Within a step the sequences are cut into micro-batches that move through the stages as a
wavefront: at wavefront t, micro-batch m runs stage t - m. All extends of a wavefront start
before any is waited on, so workers in other processes (Ray actors) compute side by side
instead of one stage at a time; in-process workers compute as each extend starts. A sequence
meets its stages in order with the same positions however the step is cut, so its results do
not depend on the number of micro-batches.
The pipeline knows the worker interface and nothing of modes, Log-OP or where the workers live.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from stage_workers.messages import ExtendBatch, ExtendResult, Segment, TrunkState

from .replicas import StageReplicas
from .sequence import Sequence


@dataclass
class StepPlan:
    num_feed: int  # unfed tokens entering stage 0 this step (0: stage 0 has nothing new)
    depth: int  # deepest stage that runs
    heads: dict[int, int] = field(default_factory=dict)  # stage -> logits for its last n new positions
    # early exit (WAND): asked after each stage that returned logits; True stops this sequence there
    stop_after: Callable[[int, torch.Tensor], bool] | None = None
    is_chunk: bool = False  # the first part of a longer feed, cut by the engine (see Engine.schedule)


class Pipeline:
    def __init__(self, workers: list):
        """`workers`: per stage, one worker or a list of that stage's replicas."""
        self.stages = [StageReplicas(w if isinstance(w, list) else [w]) for w in workers]
        self.num_stages = len(workers)

    def run(self, work: list[tuple[Sequence, StepPlan]], num_micro_batches: int = 1
            ) -> dict[int, dict[int, torch.Tensor]]:
        """Returns seq_id -> stage -> (n, V) fp32 logits for the planned heads. Wavefront t runs
        stage t - m of micro-batch m, for every micro-batch that still has sequences that deep."""
        logits: dict[int, dict[int, torch.Tensor]] = {seq.seq_id: {} for seq, _ in work}
        batches = _split(work, num_micro_batches)  # each keeps the sequences still going deeper
        for t in range(len(batches) + self.num_stages - 1):
            wave = [(t - m, m) for m in range(len(batches)) if 0 <= t - m < self.num_stages]
            for k, m in wave:
                batches[m] = [(seq, plan) for seq, plan in batches[m] if plan.depth >= k]
            started = [self._start_stage(k, batches[m]) for k, m in wave]  # every extend starts ...
            results = [wait() for _, wait in started]  # ... before any is waited on
            for (k, m), (placed, _), result in zip(wave, started, results):
                self._apply(k, placed, result, logits)
                batches[m] = [(seq, plan) for seq, plan in batches[m] if not _exits(k, seq, plan, logits)]
        return logits

    def _start_stage(self, k: int, active) -> tuple[list[tuple[Segment, Sequence]], Callable]:
        """Start stage k on what it owes these sequences; returns (segment, sequence) pairs and the wait."""
        placed, tokens, prev, inputs = [], [], [], []
        for seq, plan in active:
            start = seq.num_computed[k]
            length = plan.num_feed if k == 0 else seq.num_computed[k - 1] - start
            num_heads = plan.heads.get(k, 0)
            assert num_heads <= length, f"stage {k}: sequence {seq.seq_id} wants {num_heads} logits but computes {length} positions"
            if length == 0:
                continue
            placed.append((Segment(seq.seq_id, start, length, num_heads), seq))
            tokens.extend(seq.tokens[start : start + length])
            prev.append(seq.tokens[start - 1] if start else -1)
            inputs.extend(seq.pending[k])
        if not placed:
            return placed, lambda: None
        batch = ExtendBatch(
            segments=[seg for seg, _ in placed],
            token_ids=torch.tensor(tokens, dtype=torch.long),  # (N,)
            prev_token_ids=torch.tensor(prev, dtype=torch.long) if k == 0 else None,  # (B,)
            trunk=TrunkState.cat(inputs) if k else None,  # (N, C)
        )
        return placed, self.stages[k].submit_extend(batch)

    def _apply(self, k: int, placed: list[tuple[Segment, Sequence]], result: ExtendResult | None, logits) -> None:
        """Record stage k's result: positions computed, boundary states for stage k+1, logits."""
        row = head = 0
        for seg, seq in placed:
            seq.num_computed[k] += seg.length
            seq.pending[k].clear()
            if result.trunk is not None:
                seq.pending[k + 1].append(result.trunk.select(slice(row, row + seg.length)))
            if seg.num_heads:
                logits[seq.seq_id][k] = result.logits[head : head + seg.num_heads]  # (n, V)
            row, head = row + seg.length, head + seg.num_heads

    def rollback(self, seq: Sequence, length: int) -> None:
        """Forget positions >= length on every stage (rejected speculative drafts)."""
        for k in range(self.num_stages):
            if seq.num_computed[k] > length:
                self.stages[k].rollback(seq.seq_id, length)
                seq.num_computed[k] = length
        for k in range(1, self.num_stages):
            keep = seq.num_computed[k - 1] - seq.num_computed[k]
            kept = []
            for part in seq.pending[k]:
                n = min(part.x.shape[0], keep - sum(p.x.shape[0] for p in kept))
                if n > 0:
                    kept.append(part if n == part.x.shape[0] else part.select(slice(0, n)))
            seq.pending[k] = kept

    def free(self, seq: Sequence) -> None:
        for k in range(self.num_stages):
            self.stages[k].free(seq.seq_id)  # a no-op on a stage that never saw the sequence
            seq.pending[k].clear()


def _exits(k: int, seq: Sequence, plan: StepPlan, logits) -> bool:
    """Whether the sequence stops after stage k (a WAND exit), asked once stage k gave its logits."""
    return plan.stop_after is not None and k in logits[seq.seq_id] and plan.stop_after(k, logits[seq.seq_id][k])


def _split(work: list, num_micro_batches: int) -> list[list]:
    """At most `num_micro_batches` micro-batches of about equal work, the positions each sequence
    may compute over the stages it may reach (a prompt chunk weighs more than a decode token):
    heaviest first, each onto the lightest micro-batch; step order within a micro-batch."""
    if num_micro_batches == 1 or len(work) <= 1:
        return [work] if work else []  # the usual case: nothing to weigh in the decode step
    cost = [sum(seq.num_computed[0] + plan.num_feed - seq.num_computed[k] for k in range(plan.depth + 1))
            for seq, plan in work]
    loads, owner = [0] * min(num_micro_batches, len(work)), [0] * len(work)
    for i in sorted(range(len(work)), key=lambda i: -cost[i]):  # a stable sort: ties keep step order
        owner[i] = loads.index(min(loads))
        loads[owner[i]] += cost[i]
    batches = [[w for w, m in zip(work, owner) if m == mb] for mb in range(len(loads))]
    return [batch for batch in batches if batch]
