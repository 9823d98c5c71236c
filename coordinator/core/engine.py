"""The engine: admit requests, then step `schedule -> pipeline.run -> update` until done.

Requests wait until every stage they may reach has KV room for their whole length
(prompt + max_new_tokens) on one of its replicas, so a running sequence never runs out of
cache. Long prompts enter in chunks while other sequences keep decoding, within a per-step
token budget. Replicas are added and removed between steps. A lost worker costs only the
sequences it held: they are rebuilt from their committed tokens, the others go on. The engine
knows sequences, decoders and the pipeline; it knows nothing of tensors' contents, Ray or gRPC.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, fields, replace

from coordinator.core.modes import make_decoder
from coordinator.core.pipeline import Outcome, Pipeline, SeqPlan
from coordinator.core.prefix_cache import PrefixCache
from coordinator.core.requests import GenerationRequest, LogitsRequest, ScoreRequest
from coordinator.core.sequence import Sequence
from stage_workers.config import ModelConfig
from stage_workers.messages import WorkerLost


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 64  # sequences running at once
    max_recoveries: int = 2  # times one sequence may be rebuilt after a lost worker before it fails
    max_prefill_chunk: int = 256  # positions of one sequence fed to stage 0 per step (longer prompts: chunks)
    max_num_batched_tokens: int = 2048  # positions fed to stage 0 per step over all sequences (vLLM's name)
    pipeline_micro_batches: int = 1  # a step's sequences move through the stages in this many groups
    enable_prefix_caching: bool = True  # keep full KV blocks across requests (coordinator/core/prefix_cache.py)
    max_run_ahead: int = 1024  # steady decode: steps workers may run after a plan without another (0: none)

    def __post_init__(self):
        for f in fields(self):
            if f.type == "bool" or isinstance(f.default, bool):
                if not isinstance(getattr(self, f.name), bool):
                    raise ValueError(f"{f.name}={getattr(self, f.name)!r} is invalid; allowed: true or false")
                continue
            value, low = getattr(self, f.name), 0 if f.name in ("max_recoveries", "max_run_ahead") else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{f.name}={value!r} is invalid; allowed: an integer >= {low}")


class Engine:
    def __init__(self, config: ModelConfig, pipeline: Pipeline, engine_config: EngineConfig = EngineConfig()):
        self.config, self.pipeline, self.engine_config = config, pipeline, engine_config
        self.stages = pipeline.stages  # one StageReplicas per stage: KV placement and scaling
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.stages_down: set[int] = set()  # stages whose worker was lost for good (readiness reports them)
        self._ids = itertools.count()
        block_sizes = {stage.block_size for stage in self.stages}
        # one block id means the same positions on every stage: the cache needs one block size
        self.caching = engine_config.enable_prefix_caching and len(block_sizes) == 1
        self.cache = PrefixCache(self.stages, min(block_sizes), pipeline.evict)

    # ---- admission -------------------------------------------------------------------------
    def _depth(self, request) -> int:
        if isinstance(request, (ScoreRequest, LogitsRequest)):
            return max(request.stages)
        return request.mode.deepest_stage(self.config.num_stages)

    def _blocks(self, request) -> list[int]:
        """KV blocks the request may need on each stage (0 past its deepest stage)."""
        length = len(request.token_ids) if isinstance(request, (ScoreRequest, LogitsRequest)) else (
            len(request.prompt_ids) + request.max_new_tokens
        )
        depth = self._depth(request)
        return [-(-length // stage.block_size) if k <= depth else 0 for k, stage in enumerate(self.stages)]

    @property
    def capacity(self) -> list[int]:
        return [stage.num_blocks for stage in self.stages]

    def add(self, request: GenerationRequest | ScoreRequest | LogitsRequest) -> Sequence:
        need = self._blocks(request)
        down = sorted(k for k in self.stages_down if need[k])
        if down:
            raise WorkerLost(down[0], "the stage has no live worker (restarts exhausted)", restarted=False)
        for k, (n, stage) in enumerate(zip(need, self.stages)):
            if n > stage.max_blocks:
                what = "input" if isinstance(request, (ScoreRequest, LogitsRequest)) else "prompt + max_new_tokens"
                raise ValueError(
                    f"{what}: the request needs {n * stage.block_size} KV positions on stage {k}, "
                    f"whose cache holds {stage.max_blocks * stage.block_size} on one replica; allowed: at most that"
                )
        tokens = list(request.token_ids if isinstance(request, (ScoreRequest, LogitsRequest)) else request.prompt_ids)
        seq = Sequence(next(self._ids), request, tokens, self.config.num_stages, self._depth(request))
        seq.decoder = make_decoder(request, self.config.num_stages, self.config.poe_alpha)
        seq.kv_blocks = need
        # a score needs every position's distribution on every stage it scores: the cache keeps KV only
        seq.uses_cache = self.caching and isinstance(request, GenerationRequest)
        seq.keeps_rows = seq.uses_cache and seq.reach < self.config.num_stages - 1
        self.waiting.append(seq)
        return seq

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.engine_config.max_num_seqs:
            seq = self.waiting[0]
            if seq.uses_cache and self.cache.computing(seq) or not self._place(seq):
                break  # first come, first served: later requests wait behind it (for room, or for its
                # prompt's blocks that a running sequence is computing to be kept)
            self.running.append(self.waiting.popleft())

    def _place(self, seq: Sequence) -> bool:
        """Choose the replica of each stage it reaches (where its prompt is cached, if that one has
        room; else the one with the most room) and the cached blocks it starts with; promise it
        the KV blocks it may still need, evicting unused cached blocks for room. False: no room yet."""
        cache, stages = self.cache, self.stages[: seq.reach + 1]
        tries = [cache.homes(seq), [None] * len(stages)] if seq.uses_cache else [[None] * len(stages)]
        for prefer in tries:
            replicas, homes = [], []
            for k, (stage, worker) in enumerate(zip(stages, prefer)):
                if homes and homes[-1] in stage.worker_ids:
                    worker = homes[-1]  # a stage group: its stages run on one worker
                replicas.append(self._replica(k, worker))
                homes.append(stage.worker_ids[replicas[-1]])
            blocks, lengths = cache.match(seq, homes) if seq.uses_cache else ([], [0] * len(stages))
            need = [seq.kv_blocks[k] - n for k, n in enumerate(lengths)]
            if all(cache.room(k, r, blocks) >= n for k, (r, n) in enumerate(zip(replicas, need))):
                break
        else:
            return False
        cache.use(seq, blocks)
        for k, (stage, r, n) in enumerate(zip(stages, replicas, need)):
            stage.place(seq.seq_id, n, r, seq.kv_blocks[k])  # on one replica, where its KV will live
            cache.make_room(k)
        if seq.uses_cache:
            seq.start_cached(tuple(b.block_id for b in blocks), lengths, cache.block_size)
            cache.start(seq)
            cache.stats.queries += seq.num_prompt
            cache.stats.hits += seq.num_cached_tokens
        return True

    def _replica(self, stage: int, worker_id: int | None) -> int:
        """The replica `worker_id` of the stage if it serves it, else the one with the most room."""
        ids = self.stages[stage].worker_ids
        if worker_id in ids:
            return ids.index(worker_id)
        room = [self.cache.room(stage, r) for r in range(len(ids))]
        return room.index(max(room))

    # ---- the step --------------------------------------------------------------------------
    def has_work(self) -> bool:
        """Sequences to run, or changes (frees, rollbacks, an undo) for the workers to hear."""
        return bool(self.waiting or self.running or self.pipeline.has_changes)

    def schedule(self) -> list[tuple[Sequence, SeqPlan]]:
        """Invariant: no prefill or decode phase. Per sequence and per stage there are positions
        computed and positions needed; each step every running sequence gets the work its
        decoder plans next (one decode token, a speculative draft or verification, a prompt),
        and each stage catches up what it owes (WAND's deferred positions included). At most
        max_prefill_chunk positions of a sequence, and max_num_batched_tokens in all, enter
        stage 0 per step: the smallest feeds are served first, so decoding sequences get their
        token every step while a long feed (a prompt, or a rebuild) goes in chunks through
        every stage the sequence may reach; a sequence the budget does not reach waits a step."""
        self._admit()
        plans = [(seq, seq.decoder.plan(seq)) for seq in self.running]
        budget, work = self.engine_config.max_num_batched_tokens, []
        for seq, plan in sorted(plans, key=lambda item: item[1].num_feed):  # stable: ties keep running order
            size = min(plan.num_feed, self.engine_config.max_prefill_chunk, budget)
            if size:
                work.append((seq, self._chunk(seq, plan, size)))
                budget -= size
        order = {seq.seq_id: i for i, seq in enumerate(self.running)}
        return sorted(work, key=lambda item: order[item[0].seq_id])

    def _chunk(self, seq: Sequence, plan: SeqPlan, size: int) -> SeqPlan:
        """The plan's first `size` fed positions. Distributions are asked from `logits_from` on, so
        only a scorer's fall inside a chunk; a chunk runs every stage the sequence may reach and
        decides nothing else (no WAND exit, no draft)."""
        if size >= plan.num_feed:
            return plan
        decides = plan.logits_from < seq.num_computed[0] + size
        return replace(plan, num_feed=size, depth=seq.reach, action="decide" if decides else "none",
                       targets=plan.targets[:size])

    def step(self) -> list[Sequence]:
        """One pass. If it fails, the sequences in it end with `error` set; others are untouched. A
        lost worker, found here or while its changes are sent, is recovered: never raised.

        Steady decode leaves the plans out: when every running sequence decodes one token a step
        and nothing waits to be admitted, the step's plan lets the workers run on their own
        (a decode run, stage_workers/decode_run.py) and later passes only read its steps' decisions,
        one step behind. Anything that changes the batch (a sequence ends, a request arrives, a
        change only a plan carries) halts the run, and the step that follows goes through a plan."""
        steady = self.pipeline.running_ahead and self._steady()
        if steady:
            work, ahead, uniforms = [(seq, seq.decoder.plan(seq)) for seq in self.running], 0, ()
        else:
            self.pipeline.halt()
            work = self.schedule()
            ahead = self._run_ahead(work) if work else 0
            uniforms = tuple((seq.seq_id, u) for seq, _ in work if ahead and (u := seq.decoder.ahead(ahead)))
        done = []
        try:
            if work:
                outcomes = (self.pipeline.advance(work) if steady else
                            self.pipeline.run(work, self.engine_config.pipeline_micro_batches, ahead, uniforms))
                done = self.update(work, outcomes)
            if not self.running:
                self.pipeline.flush()  # no plan would carry the frees and rollbacks now
            return done
        except WorkerLost as exc:
            return done + self._recover(exc)
        except Exception as exc:
            for seq, _ in work:
                if not seq.finished:
                    seq.error = exc
                    self.abort(seq, f"error: {exc}")
            return [seq for seq, _ in work]

    def _run_ahead(self, work: list[tuple[Sequence, SeqPlan]]) -> int:
        """Steps the workers may run on their own after this one (0: none): while every running
        sequence decodes (one token a step, nothing a plan must carry) and none reaches its
        max_new_tokens, when the transport runs workers apart from the coordinator."""
        if not self.pipeline.transport.runs_ahead or len(work) != len(self.running) or self._may_admit():
            return 0
        if not all(plan.num_feed == 1 and plan.action == "decide" and not plan.masks and not plan.targets
                   and hasattr(seq.decoder, "ahead") for seq, plan in work):
            return 0
        left = min(seq.request.max_new_tokens - (seq.num_committed - seq.num_prompt) for seq, _ in work)
        return max(0, min(left - 1, self.engine_config.max_run_ahead))

    def _steady(self) -> bool:
        """The decode run in flight may go on: the batch is unchanged and nothing needs a plan."""
        return not self._may_admit() and not self.pipeline.needs_plan  # a sequence that ends is freed: a plan

    def _may_admit(self) -> bool:
        return bool(self.waiting) and len(self.running) < self.engine_config.max_num_seqs

    def update(self, work: list[tuple[Sequence, SeqPlan]], outcomes: dict[int, Outcome]) -> list[Sequence]:
        for seq, plan in work:
            if plan.action != "none":  # a prompt chunk: the decoder decides nothing until its last one
                rollback_to = seq.decoder.update(seq, outcomes[seq.seq_id])
                if rollback_to is not None and not seq.finished:
                    self.pipeline.rollback(seq, rollback_to)
            if seq.uses_cache:
                self.pipeline.keep(self.cache.keep(seq))
            if seq.finished:
                self._release(seq)
        return [seq for seq, _ in work]

    def _recover(self, exc: WorkerLost) -> list[Sequence]:
        """Recover from a lost worker, and from any other found lost meanwhile; returns the
        sequences that failed."""
        failed, lost = [], [exc]
        while lost:
            exc = lost.pop()
            failed += self._forget_lost(exc)
            try:
                self._rewire(exc)
                self.pipeline.flush()  # the others undo the failed step now, not at the next step
            except WorkerLost as again:
                lost.append(again)
        return failed

    def _forget_lost(self, exc: WorkerLost) -> list[Sequence]:
        """A worker lost its KV: rebuild the sequences it held from their committed tokens.

        The failed step was undone on every other worker, so sequences elsewhere go on as if it
        never ran. The lost worker's sequences drop their drafts in flight and recompute their
        committed positions on every stage, so the tokens that follow are the ones they would
        have had. A sequence rebuilt too often fails with the error; when the worker is gone for
        good (no restarts left) and its stage has no other replica, the stage is down and every
        sequence that needs it fails at once.
        """
        stage = self.stages[exc.stage]
        self.cache.drop(exc.stage, exc.worker_id)  # its cached blocks, there and deeper, everywhere
        held = [seq for seq in self.running
                if seq.reach >= exc.stage and (exc.worker_id is None or stage.home_id(seq.seq_id) == exc.worker_id)]
        for seq in held:
            self._uncache(seq)  # what it will need again, before the restarted worker's room is read
        failed = []
        if exc.restarted:
            if exc.worker_id is not None:  # every stage it serves (a stage group serves several)
                too_big = {s for other in self.stages if exc.worker_id in other.worker_ids
                           for s in other.refresh_capacity(exc.worker_id)}
                failed = [seq for seq in held if seq.seq_id in too_big]
                positions = stage.capacity[stage.worker_ids.index(exc.worker_id)] * stage.block_size
                for seq in failed:
                    seq.error = WorkerLost(exc.stage, f"restarted with a KV cache of {positions} positions, too few "
                                           f"for this sequence beside the others placed there; retry")
        elif len(stage.workers) > 1 and exc.worker_id in stage.worker_ids:
            failed = held  # the stage goes on with its other replicas
        else:  # the stage is down, and every other stage its worker served (a stage group)
            self.stages_down.update(k for k, other in enumerate(self.stages)
                                    if k == exc.stage or exc.worker_id in other.worker_ids)
            failed = held + [seq for seq in self.waiting if seq.reach >= exc.stage]  # they could never run
        for seq in held:
            seq.recoveries += 1
            if seq.recoveries > self.engine_config.max_recoveries and seq not in failed:
                failed.append(seq)
        for seq in failed:
            seq.error = seq.error or exc
            self.abort(seq, f"error: {seq.error}")
        self.rebuild([seq for seq in held if not seq.finished])
        return failed

    def _rewire(self, exc: WorkerLost) -> None:
        """The channels after a loss: to the restarted worker, or without the replica gone for good."""
        stage = self.stages[exc.stage]
        if exc.restarted:
            self.pipeline.reconnect()
        elif exc.stage not in self.stages_down:
            self.pipeline.remove_replica(exc.stage, stage.worker_ids.index(exc.worker_id))  # nothing left on it

    def rebuild(self, seqs: list[Sequence]) -> None:
        """Drop these sequences' KV on every stage; they recompute it from their committed tokens
        (drafts in flight are dropped), so the tokens that follow are unchanged."""
        for seq in seqs:
            self.pipeline.free(seq)
            self._uncache(seq)
            seq.restart_from_committed()
            seq.decoder.reset()

    def _uncache(self, seq: Sequence) -> None:
        """A sequence about to be rebuilt computes all its positions again, without cached blocks:
        it lets its blocks go and is promised its whole KV again."""
        self.cache.release(seq)
        for k, stage in enumerate(self.stages[: seq.reach + 1]):
            stage.promise(seq.seq_id, seq.kv_blocks[k])
            self.cache.make_room(k)

    # ---- scaling: call between steps (on the engine loop's thread) ----------------------------
    def add_replica(self, stage: int, worker) -> None:
        self.pipeline.add_replica(stage, worker)

    def remove_replica(self, stage: int, index: int | None = None):
        """Take a replica of `stage` out of service (default: its least loaded); its sequences move
        to the others and are rebuilt there. Returns the removed worker, which nothing calls again."""
        worker, moved = self.pipeline.remove_replica(stage, index)
        self.cache.drop_missing(stage)
        self.rebuild([seq for seq in self.running if seq.seq_id in moved])
        return worker

    def _release(self, seq: Sequence) -> None:
        self.pipeline.free(seq)
        self.running.remove(seq)
        self.cache.release(seq)
        for stage in self.stages:
            stage.release(seq.seq_id)

    def abort(self, seq: Sequence, reason: str = "aborted") -> None:
        """Drop a sequence wherever it is and give its KV back."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.running:
            self._release(seq)  # the workers hear of it with the next plan, or the next step's flush
        if not seq.finished:
            seq.finish_reason = reason

    def run_to_completion(self, seqs: list[Sequence]) -> None:
        """Step until these sequences end; re-raises the first error among them."""
        while not all(seq.finished for seq in seqs):
            self.step()
        for seq in seqs:
            if seq.error is not None:
                raise seq.error
