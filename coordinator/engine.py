"""The engine: admit requests, then step `schedule -> pipeline.run -> update` until done.

Requests wait until every stage worker they may reach has KV room for their whole length
(prompt + max_new_tokens), so a running sequence never runs out of cache. The engine knows
sequences, decoders and the pipeline; it knows nothing of tensors' contents, Ray or gRPC.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass

from stage_workers.config import ModelConfig
from stage_workers.messages import WorkerInfo, WorkerLost

from .modes import make_decoder
from .pipeline import Pipeline
from .requests import Composition, GenerationRequest, ScoreRequest
from .sequence import Sequence


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 256  # sequences running at once
    max_recoveries: int = 2  # times one sequence may be rebuilt after a lost worker before it fails


class Engine:
    def __init__(self, config: ModelConfig, pipeline: Pipeline, worker_infos: list[WorkerInfo],
                 engine_config: EngineConfig = EngineConfig()):
        self.config, self.pipeline, self.engine_config = config, pipeline, engine_config
        self.block_size = [info.kv_block_size for info in worker_infos]
        self.free_blocks = [info.kv_num_blocks for info in worker_infos]  # not yet promised to a sequence
        self.capacity = list(self.free_blocks)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
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
        return [-(-length // bs) if k <= depth else 0 for k, bs in enumerate(self.block_size)]

    def add(self, request: GenerationRequest | ScoreRequest) -> Sequence:
        need = self._blocks(request)
        for k, (n, cap) in enumerate(zip(need, self.capacity)):
            if n > cap:
                raise ValueError(
                    f"request needs {n * self.block_size[k]} KV positions on stage {k}, "
                    f"whose cache holds {cap * self.block_size[k]}"
                )
        tokens = list(request.token_ids if isinstance(request, ScoreRequest) else request.prompt_ids)
        seq = Sequence(next(self._ids), request, tokens, self.config.num_stages)
        seq.decoder = make_decoder(request, self.config.num_stages, self.config.poe_alpha)
        seq.kv_blocks = need
        self.waiting.append(seq)
        return seq

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.engine_config.max_num_seqs:
            need = self.waiting[0].kv_blocks
            if any(n > free for n, free in zip(need, self.free_blocks)):
                break  # first come, first served: later requests wait behind it
            seq = self.waiting.popleft()
            self.free_blocks = [free - n for free, n in zip(self.free_blocks, need)]
            self.running.append(seq)

    # ---- the step --------------------------------------------------------------------------
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self):
        """Invariant: no prefill or decode phase. Per sequence and per stage there are positions
        computed and positions needed; each step every running sequence gets the work its
        decoder plans next (a chunk of prompt, one decode token, a WAND catch-up, a
        speculative draft or verification), and the pipeline catches each stage up."""
        self._admit()
        return [(seq, seq.decoder.plan(seq)) for seq in self.running]

    def step(self) -> list[Sequence]:
        """One pass. If it fails, the sequences in it end with `error` set; others are untouched."""
        work = self.schedule()
        try:
            logits = self.pipeline.run(work)
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
        for seq, _ in work:
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
        failed = []
        for seq in list(self.running):
            seq.recoveries += 1
            if seq.recoveries > self.engine_config.max_recoveries:
                seq.error = exc
                self.abort(seq, f"error: {exc}")
                failed.append(seq)
                continue
            self.pipeline.free(seq)
            seq.restart_from_committed()
            seq.decoder.reset()
        return failed

    def _release(self, seq: Sequence) -> None:
        self.pipeline.free(seq)
        self.running.remove(seq)
        self.free_blocks = [free + n for free, n in zip(self.free_blocks, seq.kv_blocks)]

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
