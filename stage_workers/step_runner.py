"""`StageRunner`: one stage worker's part of every step, with its neighbours on channels.

The coordinator broadcasts one `StepPlan` per step; every runner reads the same plan and does
its own part, micro-batch by micro-batch:

1. receive what each upstream worker hands over (`Boundary`: boundary states, token ids, and
   the running Log-OP sums of positions that need a distribution);
2. compute every position the stage owes a sequence (rows parked here earlier, then the new
   ones), in one call into the slice (`StageWorker.extend`);
3. add this stage's `w_k * log p_k` to the sums, and where this stage decides (the step's
   deepest stage, a WAND exit, a draft, a verification) decide on the spot;
4. hand the computed rows to each downstream worker: to compute now, or to park until that
   stage next runs for the sequence (a WAND exit, a speculative draft).

Only `Decision`s go back to the coordinator. Which channels carry a message in a micro-batch
follows from the plan alone, so every runner knows what to wait for: edge k -> k+1 of a
sequence carries one when k <= depth and k + 1 <= reach (possibly with no rows).

The runner's parts each have a module: what a stage keeps between steps and how a step is undone
(stage_state.py), its channels and the coordinator's interruptions (neighbours.py), the rows
between stages (rows.py) and each sequence's rule (stage_decisions.py). The runner itself
computes and accumulates; it does not know where its neighbours run (in-process runners use
in-memory channels, Ray actors shared memory).
"""

from __future__ import annotations

import time
import traceback

import torch

from . import decisions as rules
from .decode_run import DecodeRun
from .framing import Interrupted
from .logop import log_probs
from .messages import (
    Decision,
    ExtendBatch,
    Grant,
    PeerLost,
    Rewire,
    Segment,
    SeqSpec,
    SeqStep,
    StepPlan,
    StepResult,
    require,
)
from .neighbours import Neighbours
from .rows import Block, Rows, boundary_of, concat_rows, drafted_by_sequence, rows_by_sequence
from .stage_decisions import Onward, StageDecider
from .stage_state import StageState


class StageRunner:
    def __init__(self, worker, worker_id: int, num_stages: int):
        self.worker, self.worker_id, self.num_stages = worker, worker_id, num_stages
        self.stage: int = worker.stage
        self.state = StageState(worker)
        self.neighbours = Neighbours(self.stage)
        self.decider = StageDecider(self.stage, num_stages, self.state)

    # ---- what the step loop (serve_forever) calls -------------------------------------------------
    def attach(self, control) -> None:
        """The coordinator's channel, which interrupts any wait on a neighbour."""
        self.neighbours.control = control

    def rewire(self, inbound: dict, outbound: dict) -> None:
        self.neighbours.rewire(inbound, outbound)

    def undo(self, step: int) -> None:
        self.state.undo(step)

    def restart(self) -> None:
        """Forget everything, as a restarted process would."""
        self.state.restart()

    def spec(self, seq_id: int) -> SeqSpec | None:
        return self.state.specs.get(seq_id)

    def takes_part(self, s: SeqStep) -> bool:
        spec = self.state.specs.get(s.seq_id)
        return spec is not None and takes_part(spec, s, self.stage, self.worker_id)

    # ---- the step ------------------------------------------------------------------------------
    def run_step(self, plan: StepPlan) -> StepResult | None:
        """Do this worker's part of the step; a `StepResult` if it took part, else None."""
        self.apply_changes(plan)
        decisions, logits = [], []
        for index, micro_batch in enumerate(plan.micro_batches):
            mine = [s for s in micro_batch if self.takes_part(s)]
            if mine:
                self._micro_batch(plan, index, mine, decisions, logits)
        if not decisions and not logits:
            return None
        return StepResult(plan.step, plan.epoch, self.worker_id, tuple(decisions), tuple(logits))

    def apply_changes(self, plan: StepPlan) -> None:
        """What the plan changes before its micro-batches: undo an aborted step, keep cached blocks,
        forget sequences, evict blocks, roll back sequences, learn new ones."""
        state = self.state
        for step in plan.aborted:
            state.undo(step)
        for keep in plan.keeps:
            state.keep(*keep)
        for seq_id in plan.frees:
            state.forget(seq_id)
        for block_id, first_stage in plan.evictions:
            state.evict(block_id, first_stage)
        for seq_id, length in plan.rollbacks:
            state.roll_back(seq_id, length)
        for spec in plan.new:
            if self.stage <= spec.reach and spec.homes[self.stage] == self.worker_id:
                state.learn(spec)
        state.begin(plan.step)

    def _micro_batch(self, plan: StepPlan, index: int, steps: list[SeqStep], decisions: list, logits: list) -> None:
        k, state = self.stage, self.state
        for s in steps:
            state.remember(s.seq_id)
        arrived = self._receive(plan, index, steps) if k else {}
        work = []  # (step, rows) computed here now
        for s in steps:
            if k == 0:
                work.append((s, Rows.of(s.start, torch.tensor(s.tokens, dtype=torch.long), None, None)))
                continue
            handoff, rows = arrived.get(s.seq_id, (None, None))
            if handoff is None:
                continue  # it exited upstream (WAND), or is a draft parked upstream
            parked = state.parked.pop(s.seq_id, None)
            rows = rows if parked is None else parked.then(rows)
            if handoff.park:
                state.parked[s.seq_id] = rows.kept() if parked is None else rows  # `then` made new tensors
            else:
                work.append((s, rows))
        started = time.perf_counter()
        onward = self._compute_and_decide(work, decisions, logits) if work else []
        self.worker.busy_s += time.perf_counter() - started
        self._send(plan, index, steps, onward)

    # ---- compute and decide --------------------------------------------------------------------
    def _compute_and_decide(self, work: list[tuple[SeqStep, Rows]], decisions: list, logits: list
                            ) -> list[tuple[SeqStep, Rows, bool]]:
        """Run the slice over every row owed, then apply each sequence's rule. Returns what goes
        downstream: (step, rows, park)."""
        k, specs, computed = self.stage, self.state.specs, self.state.computed
        segments, logit_counts = [], []
        for s, rows in work:
            require(rows.start == computed.get(s.seq_id, 0),
                    f"stage {k} worker {self.worker_id}: sequence {s.seq_id} continues at position "
                    f"{rows.start} but {computed.get(s.seq_id, 0)} are computed here")
            spec = specs[s.seq_id]
            num_logits = max(0, min(len(rows), rows.start + len(rows) - s.logits_from)) if spec.weights[k] > 0 else 0
            require(rows.num_acc in (0, num_logits) or not num_logits,
                    f"stage {k}: sequence {s.seq_id} has {rows.num_acc} Log-OP sums for "
                    f"{num_logits} positions that need a distribution")
            segments.append(Segment(s.seq_id, rows.start, len(rows), num_logits))
            logit_counts.append(num_logits)
        packed = concat_rows([rows for _, rows in work])  # (N, ...): the upstream's message itself, in the usual case
        batch = ExtendBatch(
            segments=segments,
            token_ids=packed.token_ids,  # (N,)
            prev_token_ids=torch.tensor([s.prev_token for s, _ in work], dtype=torch.long) if k == 0 else None,
            trunk=packed.trunk if k else None,  # (N, C)
        )
        result = self.worker.extend(batch)
        history = self.state.history
        for s, rows in work:
            computed[s.seq_id] = rows.start + len(rows)
            if history and s.seq_id in history:
                self.state.record(s.seq_id, rows.start, rows.token_ids.tolist())
        logprobs = None if result.logits is None else log_probs(result.logits)  # (M, V)
        outs = self._accumulate(work, logit_counts, logprobs, packed, Block(packed.token_ids, result.trunk, None))
        with_specs = [(s, specs[s.seq_id]) for s, _ in work]
        self._keep_rows(with_specs, outs)
        greedy = self.decider.batch_greedy(with_specs, outs)  # every plain argmax of the step, in one op
        onward, row, lent = [], 0, self.state.lent
        for (s, spec), n_logits, out in zip(with_specs, logit_counts, outs):
            own = None if logprobs is None else logprobs[row : row + n_logits]  # (n, V) this stage's own
            if n_logits and spec.rule == "logits":
                logits.append((s.seq_id, k, result.logits[row : row + n_logits]))
            if s.seq_id not in greedy:
                how = self.decider.decide(s, spec, out, own, decisions)
            elif greedy[s.seq_id] is None:
                how = Onward.CONTINUE  # WAND: no exit here
            else:
                decisions.append(Decision(s.seq_id, k, greedy[s.seq_id]))
                how = Onward.FINAL
            if how is not Onward.HELD and k + 1 <= spec.reach:
                rows = out.without_acc() if how is Onward.FINAL else out
                if lent and s.seq_id in lent:  # cached blocks' rows the next stage lacks go first
                    rows = lent.pop(s.seq_id).then(rows)
                onward.append((s, rows, how is not Onward.CONTINUE))
            row += n_logits
        return onward

    def _keep_rows(self, with_specs, outs: list[Rows]) -> None:
        """Prefix caching: at the deepest stage of a sequence that keeps rows, hold its output rows
        until the coordinator says which of its blocks are kept (StageState.keep)."""
        kept = self.state.kept_rows
        for (s, spec), out in zip(with_specs, outs):
            if spec.keep_rows and spec.reach == self.stage:
                rows = out.without_acc()
                kept[s.seq_id] = kept[s.seq_id].then(rows) if s.seq_id in kept else rows.kept()

    def _accumulate(self, work, logit_counts: list[int], logprobs: torch.Tensor | None, packed: Block, out: Block
                    ) -> list[Rows]:
        """Each sequence's rows after this stage, with w_k * log p_k added to the Log-OP sums that came
        from upstream: for the whole batch in one op when every sequence with a distribution to add
        brought its sums (or none did), one sequence at a time otherwise."""
        k, specs = self.stage, self.state.specs
        weights = [specs[s.seq_id].weights[k] if n and specs[s.seq_id].rule != "logits" else 0.0
                   for (s, _), n in zip(work, logit_counts)]
        carrying = {rows.num_acc > 0 for (_, rows), w in zip(work, weights) if w}
        if all(weights) and len(carrying) == 1:  # the whole batch at once (the usual case)
            lp = logprobs if len(set(weights)) == 1 else logprobs * torch.tensor(
                [w for w, n in zip(weights, logit_counts) for _ in range(n)], device=logprobs.device)[:, None]
            total = rules.accumulate(packed.acc if carrying == {True} else None, lp,
                                     weights[0] if lp is logprobs else 1.0)  # (M, V)
            block, rows_out, row, logit_row = Block(out.token_ids, out.trunk, total), [], 0, 0
            for (_, rows), n in zip(work, logit_counts):
                rows_out.append(Rows(rows.start, len(rows), n, block, row, logit_row))
                row, logit_row = row + len(rows), logit_row + n
            return rows_out
        rows_out, row, logit_row = [], 0, 0
        for (_, rows), n, w in zip(work, logit_counts, weights):
            acc = rules.accumulate(rows.acc, logprobs[logit_row : logit_row + n], w) if w else rows.acc
            trunk = None if out.trunk is None else out.trunk.select(slice(row, row + len(rows)))
            rows_out.append(Rows.of(rows.start, rows.token_ids, trunk, acc))
            row, logit_row = row + len(rows), logit_row + n
        return rows_out

    # ---- neighbours ----------------------------------------------------------------------------
    def _receive(self, plan: StepPlan, index: int, steps: list[SeqStep]) -> dict[int, tuple]:
        """What every upstream worker of these sequences hands over in this micro-batch, per sequence."""
        specs = self.state.specs
        sources = sorted({specs[s.seq_id].homes[self.stage - 1] for s in steps})
        arrived, drafted = {}, self.state.drafted
        for message in self.neighbours.receive(plan.step, index, sources):
            arrived.update(rows_by_sequence(message))
            if message.drafted is not None:  # speculative sampling; a received view: kept as a copy
                for seq_id, q in drafted_by_sequence(message).items():
                    drafted[seq_id] = q.clone() if seq_id not in drafted else torch.cat([drafted[seq_id], q])
        return arrived

    def _send(self, plan: StepPlan, index: int, steps: list[SeqStep], onward) -> None:
        """A `Boundary` to every downstream worker of these sequences (possibly with no rows)."""
        k, specs = self.stage, self.state.specs
        out: dict[int, list] = {}
        for s in steps:
            spec = specs[s.seq_id]
            if k <= s.depth and k + 1 <= spec.reach:
                out.setdefault(spec.homes[k + 1], [])
        for s, rows, park in onward:
            out[specs[s.seq_id].homes[k + 1]].append((s.seq_id, rows, park))
        held = self.state.drafted  # sampled drafts' q go along with their rows
        drafted = {s.seq_id: held.pop(s.seq_id) for s, _, _ in onward if s.seq_id in held} if held else None
        self.neighbours.send(plan, {dst: boundary_of(plan.step, index, items, drafted) for dst, items in out.items()})


def takes_part(spec: SeqSpec, s: SeqStep, stage: int, worker_id: int) -> bool:
    """Whether `worker_id` (serving `stage`) has work for this sequence in this step: computing
    (stages 0..depth) or keeping rows parked by stage depth (stage depth + 1)."""
    return stage <= min(s.depth + 1, spec.reach) and spec.homes[stage] == worker_id


def serve_forever(runner: StageRunner, control, results, connect) -> None:
    """A worker process's loop: read the coordinator's messages in order and answer each step, and
    between plans run a decode run's steps (stage_workers/decode_run.py). `runner`: a `StageRunner`,
    or a `GroupRunner` (stage_workers/stage_group.py) for a worker that holds several stages.
    `connect(rewire)` opens the channels of a `Rewire` and returns (inbound, outbound, decided_in,
    decided_out) dicts. A step that fails here is undone and reported; one the coordinator aborts
    while it runs is undone and dropped."""
    runner.attach(control)
    neighbours = runner.neighbours  # the upstream face: inbound channels, plans read while waiting
    run = DecodeRun(runner, control)
    while True:
        plan = run.next_step()
        if plan is None:
            # a step's plan may come without a wake-up: the upstream's data that follows it wakes this worker
            upstream = tuple(neighbours.inbound.values())
            message = neighbours.backlog.popleft() if neighbours.backlog else control.recv(also=upstream).message
            if isinstance(message, Rewire):
                inbound, outbound, decided_in, decided_out = connect(message)
                runner.rewire(inbound, outbound)
                run.rewire(decided_in, decided_out)
                continue
            if isinstance(message, Grant):
                continue  # for a run that has ended
            plan = message
            run.begin(plan)
        ok = True
        try:
            result = runner.run_step(plan)
        except Interrupted:
            runner.undo(plan.step)
            result, ok = None, False
        except Exception as exc:  # reported to the coordinator, which aborts the step everywhere
            runner.undo(plan.step)
            result = StepResult(plan.step, plan.epoch, runner.worker_id, error=traceback.format_exc(),
                                lost_peer=exc.worker_id if isinstance(exc, PeerLost) else None)
        try:
            run.after(plan, result, ok)  # the decision edge first: the next step waits on it
            if result is not None:
                neighbours.unless_aborted(
                    lambda: results.send(result, plan.step, plan.epoch, interrupt=control), plan.step)
        except Interrupted:
            pass  # the coordinator aborted the step: the plan that says so undoes it
        control.mark(plan.step)  # done with it: a coordinator waiting too long sees who is not
