"""Moving positions through the stage workers, in stage order, for a batch of sequences.

Each sequence comes with a `StepPlan`: how many of its unfed tokens enter stage 0, the deepest
stage to run, and which stage logits to return. A stage computes every position its upstream
has computed and it has not (catch-up), so decode, prefill, WAND's deferred catch-up and
speculative verification are all the same call. Boundary states wait in `Sequence.pending`
until their downstream stage runs. The pipeline knows the worker interface and nothing of
modes, Log-OP or where the workers live.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from stage_workers.messages import ExtendBatch, Segment, TrunkState

from .sequence import Sequence


@dataclass
class StepPlan:
    num_feed: int  # unfed tokens entering stage 0 this step (0: stage 0 has nothing new)
    depth: int  # deepest stage that runs
    heads: dict[int, int] = field(default_factory=dict)  # stage -> logits for its last n new positions
    # early exit (WAND): asked after each stage that returned logits; True stops this sequence there
    stop_after: Callable[[int, torch.Tensor], bool] | None = None


class Pipeline:
    def __init__(self, workers: list):
        self.workers = workers
        self.num_stages = len(workers)

    def run(self, work: list[tuple[Sequence, StepPlan]]) -> dict[int, dict[int, torch.Tensor]]:
        """Returns seq_id -> stage -> (n, V) fp32 logits for the planned heads."""
        logits: dict[int, dict[int, torch.Tensor]] = {seq.seq_id: {} for seq, _ in work}
        active = list(work)
        for k in range(self.num_stages):
            active = [(seq, plan) for seq, plan in active if plan.depth >= k]
            if not active:
                break
            self._run_stage(k, active, logits)
            active = [
                (seq, plan)
                for seq, plan in active
                if not (plan.stop_after and k in logits[seq.seq_id] and plan.stop_after(k, logits[seq.seq_id][k]))
            ]
        return logits

    def _run_stage(self, k: int, active, logits) -> None:
        segments, seqs, tokens, prev, inputs = [], [], [], [], []
        for seq, plan in active:
            start = seq.num_computed[k]
            length = plan.num_feed if k == 0 else seq.num_computed[k - 1] - start
            num_heads = plan.heads.get(k, 0)
            assert num_heads <= length, f"stage {k}: sequence {seq.seq_id} wants {num_heads} logits but computes {length} positions"
            if length == 0:
                continue
            segments.append(Segment(seq.seq_id, start, length, num_heads))
            seqs.append(seq)
            tokens.extend(seq.tokens[start : start + length])
            prev.append(seq.tokens[start - 1] if start else -1)
            inputs.extend(seq.pending[k])
        if not segments:
            return
        batch = ExtendBatch(
            segments=segments,
            token_ids=torch.tensor(tokens, dtype=torch.long),
            prev_token_ids=torch.tensor(prev, dtype=torch.long) if k == 0 else None,
            trunk=TrunkState.cat(inputs) if k else None,
        )
        result = self.workers[k].extend(batch)
        row = head = 0
        for seg, seq in zip(segments, seqs):
            seq.num_computed[k] += seg.length
            seq.pending[k].clear()
            if result.trunk is not None:
                seq.pending[k + 1].append(result.trunk.select(slice(row, row + seg.length)))
            if seg.num_heads:
                logits[seq.seq_id][k] = result.logits[head : head + seg.num_heads]
            row, head = row + seg.length, head + seg.num_heads

    def rollback(self, seq: Sequence, length: int) -> None:
        """Forget positions >= length on every stage (rejected speculative drafts)."""
        for k in range(self.num_stages):
            if seq.num_computed[k] > length:
                self.workers[k].rollback(seq.seq_id, length)
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
            self.workers[k].free(seq.seq_id)  # a no-op on a worker that never saw the sequence
            seq.pending[k].clear()
