"""Turning a step's per-sequence plans into one `StepPlan`, and its workers' reports back into
each sequence's outcome.

Each sequence comes with a `SeqPlan`: how many of its unfed tokens enter stage 0, the deepest
stage to run, from which position on a distribution is needed, and what to decide. The pipeline
sends every worker the same `StepPlan` (the workers hand boundary states and Log-OP sums to each
other directly; stage_workers/step_runner.py) and gets back only decisions: tokens, exit stages,
acceptance, Score log-probs. It keeps, per sequence and stage, how many positions are computed
(`Sequence.num_computed`), which it learns from the plan and, for WAND, from the exit stage; the
boundary states a skipped stage still owes wait in that stage's worker.

Rollbacks and frees are queued and travel with the next plan (or alone, via `flush`, when the
engine has nothing else to run). The sequences of a step are cut into micro-batches that every
worker runs in the same order, so stage k+1 works on micro-batch m while stage k works on m+1.
The pipeline knows messages and replicas, nothing of modes' math, Ray or where workers run.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from coordinator.core.replicas import StageReplicas
from coordinator.core.sequence import Sequence
from coordinator.core.transport import LocalTransport
from stage_workers.messages import Decision, SeqSpec, SeqStep, StepPlan, StepResult
from stage_workers.step_runner import takes_part


@dataclass
class DecodeRun:
    """A decode run in flight (stage_workers/decode_run.py): its steps the coordinator reads in turn."""

    next: int  # the next step to read
    last: int
    expected: int  # decisions a step's reports hold
    participants: set[int]
    first_workers: set[int]  # the stage-0 workers that start each step (they need its grant)


class StepFailed(RuntimeError):
    """A worker raised while running its part of a step (the step is undone on every worker)."""


@dataclass
class SeqPlan:
    num_feed: int  # unfed tokens entering stage 0 this step (at least one)
    depth: int  # deepest stage that runs
    logits_from: int  # positions >= logits_from get a distribution
    action: str = "decide"  # "decide" | "draft" (speculative) | "none" (a prompt chunk: nothing decided)
    uniforms: tuple[float, ...] = ()  # a sampled choice's draws (SeqStep.uniforms)
    targets: tuple[int, ...] = ()  # Score: the token after each fed position (-1: none)
    masks: tuple[bytes, ...] = ()  # structured output: allowed tokens at each position decided (SeqStep.masks)


@dataclass
class Outcome:
    """What a step gave one sequence."""

    decision: Decision | None = None
    logits: dict[int, torch.Tensor] = field(default_factory=dict)  # rule "logits": stage -> (n, V)


class Pipeline:
    def __init__(self, workers: list, transport=None):
        """`workers`: per stage, one worker or a list of that stage's replicas. In process
        (`transport` None) these are `StageWorker`s (or fakes) run by `StageRunner`s over
        in-memory channels; a Ray transport passes handles whose `info()` reaches the actor."""
        self.num_stages = len(workers)
        self.stages: list[StageReplicas] = []
        self.transport = transport if transport is not None else LocalTransport()
        self._ids = itertools.count()
        self._groups: dict[int, tuple[object, int]] = {}  # id(group) -> (the group, its worker id)
        for k, stage in enumerate(workers):
            replicas = stage if isinstance(stage, list) else [stage]
            self.stages.append(StageReplicas(replicas, [self._new_worker(k, w) for w in replicas]))
        self.step = 0
        self.epoch = 0
        self.transport.connect(self.topology, self.epoch)
        self.specs: dict[int, SeqSpec] = {}  # sequences the workers know
        self._unsure: set[int] = set()  # sequences whose spec went with a plan that may not have reached every worker
        self._frees: list[int] = []
        self._rollbacks: list[tuple[int, int]] = []
        self._aborted: list[int] = []  # steps that failed: every worker undoes them
        self._keeps: list[tuple[int, int, int, int]] = []  # prefix caching: blocks kept (StepPlan.keeps)
        self._evictions: list[tuple[int, int]] = []  # and let go (StepPlan.evictions)
        self._run: DecodeRun | None = None  # the decode run in flight, if any

    def _new_worker(self, stage: int, worker) -> int:
        """A worker's id; a stage group's members (`worker.group`) share their group's."""
        group = getattr(worker, "group", None)
        if group is not None and id(group) in self._groups:
            return self._groups[id(group)][1]
        worker_id = next(self._ids)
        self.transport.add(worker_id, stage, worker, self.num_stages)
        if group is not None:
            self._groups[id(group)] = (group, worker_id)
        return worker_id

    @property
    def topology(self) -> list[list[int]]:
        """Worker ids per stage."""
        return [stage.worker_ids for stage in self.stages]

    # ---- the step --------------------------------------------------------------------------
    def run(self, work: list[tuple[Sequence, SeqPlan]], num_micro_batches: int = 1, run_ahead: int = 0,
            ahead_uniforms: tuple = ()) -> dict[int, Outcome]:
        """Run one step over these sequences; returns seq_id -> its outcome. `run_ahead` > 0 (decode
        steps only): the workers go on with that many more steps on their own, feeding each decided
        token (stage_workers/decode_run.py); `advance` reads them, `halt` ends the run early."""
        self.halt()
        self.step += 1
        new, steps = [], {}
        for seq, plan in work:
            if seq.seq_id not in self.specs:
                self.specs[seq.seq_id] = _with_cache(seq.decoder.spec(seq, self.homes(seq)), seq)
                new.append(self.specs[seq.seq_id])
            elif seq.seq_id in self._unsure:
                new.append(self.specs[seq.seq_id])
            steps[seq.seq_id] = self._seq_step(seq, plan)
        batches = tuple(tuple(steps[seq.seq_id] for seq, _ in batch) for batch in _split(work, num_micro_batches))
        plan = StepPlan(self.step, self.epoch, tuple(self._frees), tuple(self._rollbacks), tuple(new), batches,
                        tuple(self._aborted), tuple(self._keeps), tuple(self._evictions), run_ahead, ahead_uniforms)
        self._frees, self._rollbacks, self._aborted, self._keeps, self._evictions = [], [], [], [], []
        self._unsure.clear()
        expected, participants = self._expected_items(work), self._participants(batches)
        if run_ahead:
            first = {self.specs[s.seq_id].homes[0] for batch in batches for s in batch}
            self._run = DecodeRun(plan.step + 1, plan.step + run_ahead, expected, participants, first)
            self.step = plan.step + run_ahead  # the run's steps are numbered; the next plan comes after them
        try:
            results = self.transport.run(plan, expected, participants)
        except BaseException:
            self._requeue(plan)
            self._abort_from(plan.step)  # every worker undoes the step (and the run) before the next one
            raise
        return self._outcomes(work, results, plan.step)

    def advance(self, work: list[tuple[Sequence, SeqPlan]]) -> dict[int, Outcome]:
        """The next step of the decode run (the same sequences, each one decode step further): its
        outcomes. Before reading it, lets the stage-0 workers start the step after it."""
        run = self._run
        step = run.next
        try:
            if step + 1 <= run.last:
                self.transport.grant(run.first_workers, step + 1)
            results = self.transport.collect(step, run.expected, run.participants)
        except BaseException:
            self._abort_from(step)
            raise
        run.next += 1
        if run.next > run.last:
            self._run = None
        return self._outcomes(work, results, step)

    @property
    def running_ahead(self) -> bool:
        """A decode run has steps the coordinator has not read yet."""
        return self._run is not None

    @property
    def unread_step(self) -> int | None:
        """The decode run's next step to read (the workers may be running it); None: no run."""
        return None if self._run is None else self._run.next

    def halt(self) -> None:
        """End the decode run before its last step: the workers undo the steps the coordinator has
        not read (at most one of them ran) when the next plan arrives."""
        if self._run is not None:
            self._abort_from(self._run.next)

    def _abort_from(self, step: int) -> None:
        """Every worker undoes `step` and, in a decode run, the run's steps after it."""
        last = step if self._run is None else self._run.last
        self._aborted += range(step, last + 1)
        self._run = None

    def _outcomes(self, work, results: list[StepResult], step: int) -> dict[int, Outcome]:
        failed = [r for r in results if r.error]
        if failed:
            self._abort_from(step)
            raise StepFailed(f"stage worker {failed[0].worker_id} failed in step {step}: {failed[0].error}")
        return self._apply(work, results)

    def _seq_step(self, seq: Sequence, plan: SeqPlan) -> SeqStep:
        assert plan.num_feed >= 1, f"sequence {seq.seq_id}: a step feeds at least one token"
        start = seq.num_computed[0]
        return SeqStep(seq.seq_id, start, tuple(seq.tokens[start : start + plan.num_feed]),
                       seq.tokens[start - 1] if start else -1, plan.depth, plan.logits_from, plan.action,
                       plan.uniforms, plan.targets, plan.masks)

    def _participants(self, batches) -> set[int]:
        """Every worker with a part in the step (the ones a stuck step may be waiting for)."""
        ids = set()
        for batch in batches:
            for s in batch:
                spec = self.specs[s.seq_id]
                ids.update(w for k, w in enumerate(spec.homes) if takes_part(spec, s, k, w))
        return ids

    def _expected_items(self, work) -> int:
        """Decisions and stage logits the step's reports will hold: one decision per sequence,
        and for stage logits one entry per weighted stage it runs."""
        items = 0
        for seq, plan in work:
            spec = self.specs[seq.seq_id]
            items += 1 + (sum(w > 0 for w in spec.weights[: plan.depth + 1]) if spec.rule == "logits" else 0)
        return items

    def _apply(self, work, results: list[StepResult]) -> dict[int, Outcome]:
        """Decisions and logits per sequence; positions computed per stage."""
        outcomes = {seq.seq_id: Outcome() for seq, _ in work}
        for result in results:
            for decision in result.decisions:
                outcomes[decision.seq_id].decision = decision
            for seq_id, stage, logits in result.logits:
                outcomes[seq_id].logits[stage] = logits
        for seq, plan in work:
            decision = outcomes[seq.seq_id].decision
            wand_exit = decision.stage if decision is not None and self.specs[seq.seq_id].rule == "wand" else plan.depth
            fed = seq.num_computed[0] + plan.num_feed
            for k in range(min(plan.depth, wand_exit) + 1):  # a stage that runs computes all it owes
                seq.num_computed[k] = fed
        return outcomes

    def homes(self, seq: Sequence) -> tuple[int, ...]:
        """The worker holding the sequence's KV on each stage it may reach."""
        return tuple(stage.home_id(seq.seq_id) for stage in self.stages[: seq.reach + 1])

    # ---- changes that travel with the next plan -----------------------------------------------
    def rollback(self, seq: Sequence, length: int) -> None:
        """Forget positions >= length on every stage (rejected speculative drafts)."""
        self._rollbacks.append((seq.seq_id, length))
        seq.num_computed = [min(n, length) for n in seq.num_computed]

    def free(self, seq: Sequence) -> None:
        """Forget the sequence on every worker (its KV and anything parked for it)."""
        if self.specs.pop(seq.seq_id, None) is not None:
            self._frees.append(seq.seq_id)
            self._unsure.discard(seq.seq_id)

    def flush(self) -> None:
        """Send queued frees and rollbacks now (the engine is idle, so no plan would carry them)."""
        self.halt()
        if self.has_changes:
            self.step += 1
            plan = StepPlan(self.step, self.epoch, tuple(self._frees), tuple(self._rollbacks), (), (),
                            tuple(self._aborted), tuple(self._keeps), tuple(self._evictions))
            self._frees, self._rollbacks, self._aborted, self._keeps, self._evictions = [], [], [], [], []
            try:
                self.transport.run(plan, 0, set())
            except BaseException:
                self._requeue(plan)
                raise

    def _requeue(self, plan: StepPlan) -> None:
        """The changes and new sequences of a plan that may not have reached every worker go with
        the next one too (undoing, freeing, rolling back and learning a spec again change nothing
        on a worker that had them)."""
        self._frees[:0], self._rollbacks[:0], self._aborted[:0] = plan.frees, plan.rollbacks, plan.aborted
        self._keeps[:0], self._evictions[:0] = plan.keeps, plan.evictions
        self._unsure.update(spec.seq_id for spec in plan.new if spec.seq_id in self.specs)

    def keep(self, entries: list[tuple[int, int, int, int]]) -> None:
        """Prefix caching: sequences' full blocks to keep under block ids (StepPlan.keeps)."""
        self._keeps += entries

    def evict(self, block_id: int, first_stage: int) -> None:
        """Prefix caching: a block no longer kept on stages first_stage.. (StepPlan.evictions)."""
        self._evictions.append((block_id, first_stage))

    @property
    def has_changes(self) -> bool:
        """Frees, rollbacks, an undo or cached blocks' changes are waiting for a plan to carry them."""
        return bool(self._keeps or self.needs_plan)

    @property
    def needs_plan(self) -> bool:
        """Changes that a decode run cannot wait for: frees, rollbacks, an undo, evictions."""
        return bool(self._frees or self._rollbacks or self._aborted or self._evictions)

    # ---- topology ----------------------------------------------------------------------------
    def add_replica(self, stage: int, worker) -> None:
        """One more worker for `stage` (a list: a stage group's members, for `stage` and the stages
        after it); only the channels of its neighbours change."""
        self.halt()
        for k, member in enumerate(worker if isinstance(worker, list) else [worker], start=stage):
            self.stages[k].add_replica(member, self._new_worker(k, member))
        self.epoch += 1
        self.transport.connect(self.topology, self.epoch)

    def reconnect(self) -> None:
        """After a worker restarted: start its loop again and rebuild the channels touching it."""
        self.halt()
        self.epoch += 1
        self.transport.connect(self.topology, self.epoch)

    def remove_replica(self, stage: int, index: int | None = None):
        """Take a replica out of service (a stage group's from every stage it serves); returns
        (its worker on `stage`, the seq_ids it held)."""
        self.halt()
        worker, worker_id, moved = self.stages[stage].remove_replica(index)
        for other in self.stages:
            if worker_id in other.worker_ids:
                moved = sorted(set(moved) | set(other.remove_replica(other.worker_ids.index(worker_id))[2]))
        self._groups = {key: value for key, value in self._groups.items() if value[1] != worker_id}
        self.transport.remove(worker_id)
        self.epoch += 1
        self.transport.connect(self.topology, self.epoch)
        return worker, moved


def _with_cache(spec: SeqSpec, seq: Sequence) -> SeqSpec:
    """The spec with what prefix caching adds: the cached blocks it starts with, whether its
    deepest stage keeps output rows, and the cached tokens for controls that read them."""
    if not seq.prefix_lengths and not seq.keeps_rows:
        return spec
    num_cached = seq.prefix_lengths[0] if seq.prefix_lengths else 0
    history = spec.controls is not None and spec.controls.uses_history and num_cached
    return spec._replace(prefix_blocks=seq.prefix_blocks, prefix_lengths=tuple(seq.prefix_lengths),
                         keep_rows=seq.keeps_rows,
                         prefix_tokens=tuple(seq.tokens[: seq.num_computed[0]]) if history else ())


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
