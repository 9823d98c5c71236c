"""The engine: admit requests, then step `schedule -> pipeline.run -> update` until done.

Requests wait until every stage they may reach has KV room for their whole length
(prompt + max_new_tokens) on one of its replicas, so a running sequence never runs out of
cache. Long prompts enter in chunks while other sequences keep decoding. Replicas are added and
removed between steps. The engine knows sequences, decoders and the pipeline; it knows nothing
of tensors' contents, Ray or gRPC.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass

from stage_workers.config import ModelConfig
from stage_workers.messages import WorkerLost

from .modes import make_decoder
from .pipeline import Pipeline, StepPlan
from .requests import Composition, GenerationRequest, ScoreRequest
from .sequence import Sequence


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 256  # sequences running at once
    max_recoveries: int = 2  # times one sequence may be rebuilt after a lost worker before it fails
    max_prefill_chunk: int = 256  # positions of one sequence fed to stage 0 per step (longer prompts: chunks)
    pipeline_micro_batches: int = 1  # a step's sequences move through the stages in this many wavefront groups

    def __post_init__(self):
        assert self.max_prefill_chunk >= 1, f"max_prefill_chunk={self.max_prefill_chunk} must be >= 1"
        assert self.pipeline_micro_batches >= 1, f"pipeline_micro_batches={self.pipeline_micro_batches} must be >= 1"


class Engine:
    def __init__(self, config: ModelConfig, pipeline: Pipeline, engine_config: EngineConfig = EngineConfig()):
        self.config, self.pipeline, self.engine_config = config, pipeline, engine_config
        self.stages = pipeline.stages  # one StageReplicas per stage: KV placement and scaling
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.stages_down: set[int] = set()  # stages whose worker was lost for good (readiness reports them)
        self._ids = itertools.count()

    # ---- admission -------------------------------------------------------------------------
    def _depth(self, request) -> int:
        if isinstance(request, ScoreRequest):
            return max(request.stages)
        if isinstance(request.mode, Composition):
            return max(request.mode.stages)
        return self.config.num_stages - 1

    def _blocks(self, request) -> list[int]:
        """KV blocks the request may need on each stage (0 past its deepest stage)."""
        length = len(request.token_ids) if isinstance(request, ScoreRequest) else (
            len(request.prompt_ids) + request.max_new_tokens
        )
        depth = self._depth(request)
        return [-(-length // stage.block_size) if k <= depth else 0 for k, stage in enumerate(self.stages)]

    @property
    def free_blocks(self) -> list[int]:
        """Per stage: KV blocks not yet promised to a sequence, over all its replicas."""
        return [stage.num_free_blocks for stage in self.stages]

    @property
    def capacity(self) -> list[int]:
        return [stage.num_blocks for stage in self.stages]

    def add(self, request: GenerationRequest | ScoreRequest) -> Sequence:
        need = self._blocks(request)
        for k, (n, stage) in enumerate(zip(need, self.stages)):
            if n > stage.max_blocks:
                what = "input" if isinstance(request, ScoreRequest) else "prompt + max_new_tokens"
                raise ValueError(
                    f"{what}: the request needs {n * stage.block_size} KV positions on stage {k}, "
                    f"whose cache holds {stage.max_blocks * stage.block_size} on one replica; allowed: at most that"
                )
        tokens = list(request.token_ids if isinstance(request, ScoreRequest) else request.prompt_ids)
        seq = Sequence(next(self._ids), request, tokens, self.config.num_stages)
        seq.decoder = make_decoder(request, self.config.num_stages, self.config.poe_alpha)
        seq.kv_blocks = need
        self.waiting.append(seq)
        return seq

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.engine_config.max_num_seqs:
            seq = self.waiting[0]
            need = [(stage, n) for stage, n in zip(self.stages, seq.kv_blocks) if n]
            if not all(stage.fits(n) for stage, n in need):
                break  # first come, first served: later requests wait behind it
            for stage, n in need:
                stage.place(seq.seq_id, n)  # on one replica, where its KV will live
            self.running.append(self.waiting.popleft())

    # ---- the step --------------------------------------------------------------------------
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self):
        """Invariant: no prefill or decode phase. Per sequence and per stage there are positions
        computed and positions needed; each step every running sequence gets the work its
        decoder plans next (one decode token, a WAND catch-up, a speculative draft or
        verification, a prompt), and the pipeline catches each stage up. At most
        max_prefill_chunk positions of a sequence enter stage 0 per step: a longer feed (a
        prompt, or a rebuild) goes in chunks through every stage the sequence may reach, so
        the others keep decoding meanwhile and no later step owes a prompt-sized catch-up."""
        self._admit()
        return [(seq, self._chunk(seq, seq.decoder.plan(seq))) for seq in self.running]

    def _chunk(self, seq: Sequence, plan: StepPlan) -> StepPlan:
        """The plan's first max_prefill_chunk fed positions. Heads are the last n fed positions,
        so only those that fall inside the chunk are kept (a scorer's); no early exit."""
        chunk = self.engine_config.max_prefill_chunk
        rest = plan.num_feed - chunk  # positions left for later steps
        if rest <= 0:
            return plan
        heads = {k: n - rest for k, n in plan.heads.items() if n > rest}
        return StepPlan(chunk, self._depth(seq.request), heads, is_chunk=True)

    def step(self) -> list[Sequence]:
        """One pass. If it fails, the sequences in it end with `error` set; others are untouched."""
        work = self.schedule()
        try:
            logits = self.pipeline.run(work, self.engine_config.pipeline_micro_batches)
            return self.update(work, logits)
        except WorkerLost as exc:
            return self._recover(exc)
        except Exception as exc:
            for seq, _ in work:
                if not seq.finished:
                    seq.error = exc
                    self.abort(seq, f"error: {exc}")
            return [seq for seq, _ in work]

    def update(self, work, logits) -> list[Sequence]:
        for seq, plan in work:
            if plan.is_chunk and not plan.heads:
                continue  # a prompt chunk: the decoder decides nothing until its last one
            rollback_to = seq.decoder.update(seq, logits[seq.seq_id])
            if rollback_to is not None and not seq.finished:
                self.pipeline.rollback(seq, rollback_to)
            if seq.finished:
                self._release(seq)
        return [seq for seq, _ in work]

    def _recover(self, exc: WorkerLost) -> list[Sequence]:
        """A worker lost its KV: rebuild every running sequence from its committed tokens.

        Drafts in flight are dropped and every stage recomputes the committed positions (the
        restarted worker from scratch, the others alongside it), so the tokens that follow are
        the ones the sequence would have had. A sequence rebuilt too often fails with the error.
        """
        if not exc.restarted:
            self.stages_down.add(exc.stage)
        failed = []
        for seq in list(self.running):
            seq.recoveries += 1
            if seq.recoveries > self.engine_config.max_recoveries:
                seq.error = exc
                self.abort(seq, f"error: {exc}")
                failed.append(seq)
        self.rebuild(self.running)
        return failed

    def rebuild(self, seqs: list[Sequence]) -> None:
        """Drop these sequences' KV on every stage; they recompute it from their committed tokens
        (drafts in flight are dropped), so the tokens that follow are unchanged."""
        for seq in seqs:
            self.pipeline.free(seq)
            seq.restart_from_committed()
            seq.decoder.reset()

    # ---- scaling: call between steps (on the engine loop's thread) ----------------------------
    def add_replica(self, stage: int, worker) -> None:
        self.stages[stage].add_replica(worker)

    def remove_replica(self, stage: int, index: int | None = None):
        """Take a replica of `stage` out of service (default: its least loaded); its sequences move
        to the others and are rebuilt there. Returns the removed worker, which nothing calls again."""
        worker, moved = self.stages[stage].remove_replica(index)
        self.rebuild([seq for seq in self.running if seq.seq_id in moved])
        return worker

    def _release(self, seq: Sequence) -> None:
        self.pipeline.free(seq)
        self.running.remove(seq)
        for stage in self.stages:
            stage.release(seq.seq_id)

    def abort(self, seq: Sequence, reason: str = "aborted") -> None:
        """Drop a sequence wherever it is and give its KV back."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.running:
            self._release(seq)
        if not seq.finished:
            seq.finish_reason = reason

    def run_to_completion(self, seqs: list[Sequence]) -> None:
        """Step until these sequences end; re-raises the first error among them."""
        while not all(seq.finished for seq in seqs):
            self.step()
        for seq in seqs:
            if seq.error is not None:
                raise seq.error
