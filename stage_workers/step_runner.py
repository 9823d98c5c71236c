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

The runner also keeps what a stage owes across steps (parked rows; at the last stage, the
accumulators of drafted positions awaiting verification) and what to undo if a step is
aborted elsewhere. It knows the worker interface, the messages and the decision rules; it does
not know where its neighbours run (in-process runners use in-memory channels, Ray actors
shared memory).
"""

from __future__ import annotations

import time
import traceback
from collections import deque
from dataclasses import dataclass

import torch

from . import decisions as rules
from .channels import Interrupted
from .logop import log_probs
from .messages import (Boundary, Decision, ExtendBatch, Handoff, Rewire, Segment, SeqSpec, SeqStep, StepPlan,
                       StepResult, TrunkState, require)
from .sampling import sample

RECV_TIMEOUT_S = 600.0  # a neighbour that sends nothing this long is stuck; the coordinator also watches


@dataclass
class Rows:
    """Consecutive positions of one sequence between stages: start..start+len-1."""

    start: int
    token_ids: torch.Tensor  # (n,)
    trunk: TrunkState | None  # (n, C) boundary states; None before stage 0 computed them (or when held)
    acc: torch.Tensor | None  # (m, V) Log-OP sums of the last m rows (m <= n)

    def __len__(self) -> int:
        return self.token_ids.shape[0]

    @property
    def num_acc(self) -> int:
        return 0 if self.acc is None else self.acc.shape[0]

    def then(self, later: "Rows") -> "Rows":
        """These rows followed by `later` (which must start where these end)."""
        require(later.start == self.start + len(self), f"rows {self.start}+{len(self)} then rows at {later.start}")
        require(self.acc is None or later.num_acc == len(later), "Log-OP sums must cover a suffix of the rows")
        trunk = None if self.trunk is None else TrunkState.cat([self.trunk, later.trunk])
        acc = later.acc if self.acc is None else torch.cat([self.acc, later.acc])
        return Rows(self.start, torch.cat([self.token_ids, later.token_ids]), trunk, acc)

    def kept(self) -> "Rows":
        """These rows as tensors of their own: rows kept across steps must not hold on to (and so keep
        alive) the whole batch message they arrived in."""
        trunk = None if self.trunk is None else TrunkState(*(None if t is None else t.clone() for t in
                                                             (self.trunk.x, self.trunk.x0, self.trunk.x_backout)))
        return Rows(self.start, self.token_ids.clone(), trunk, None if self.acc is None else self.acc.clone())

    def before(self, length: int) -> "Rows | None":
        """The rows at positions < length (None if none)."""
        keep = length - self.start
        if keep <= 0:
            return None
        if keep >= len(self):
            return self
        num_acc = max(0, keep - (len(self) - self.num_acc))
        return Rows(self.start, self.token_ids[:keep], None if self.trunk is None else self.trunk.select(slice(0, keep)),
                    None if self.acc is None or num_acc == 0 else self.acc[:num_acc])


class StageRunner:
    def __init__(self, worker, worker_id: int, num_stages: int):
        self.worker, self.worker_id, self.num_stages = worker, worker_id, num_stages
        self.stage: int = worker.stage
        self.inbound: dict[int, object] = {}  # upstream worker id -> channel (this runner reads)
        self.outbound: dict[int, object] = {}  # downstream worker id -> channel (this runner writes)
        self.control = None  # the coordinator's channel to this runner, watched while waiting (Ray)
        self.backlog: deque = deque()  # its messages read while a step was still running
        self.specs: dict[int, SeqSpec] = {}  # the sequences this worker holds (it is among their homes)
        self.computed: dict[int, int] = {}  # seq_id -> positions in this stage's KV cache
        self.parked: dict[int, Rows] = {}  # rows computed upstream that this stage owes (WAND, drafts)
        self.held: dict[int, Rows] = {}  # last stage: drafted positions' sums awaiting verification
        self._undo: tuple[int, dict] | None = None  # (step, seq_id -> state before it)
        self.busy_s = 0.0  # time spent computing and deciding, over all steps (per-stage busy metrics)

    # ---- the step ------------------------------------------------------------------------------
    def run_step(self, plan: StepPlan) -> StepResult | None:
        """Do this worker's part of the step; a `StepResult` if it took part, else None."""
        self.apply_changes(plan)
        decisions, logits = [], []
        for index, micro_batch in enumerate(plan.micro_batches):
            mine = [s for s in micro_batch if s.seq_id in self.specs
                    and takes_part(self.specs[s.seq_id], s, self.stage, self.worker_id)]
            if mine:
                self._micro_batch(plan, index, mine, decisions, logits)
        if not decisions and not logits:
            return None
        return StepResult(plan.step, plan.epoch, self.worker_id, tuple(decisions), tuple(logits))

    def apply_changes(self, plan: StepPlan) -> None:
        """What the plan changes before its micro-batches: undo an aborted step, forget and roll
        back sequences, learn new ones."""
        if plan.aborted >= 0:
            self.undo(plan.aborted)
        for seq_id in plan.frees:
            self._forget(seq_id)
        for seq_id, length in plan.rollbacks:
            self._roll_back(seq_id, length)
        self.specs.update((spec.seq_id, spec) for spec in plan.new if self.worker_id in spec.homes)
        self._undo = (plan.step, {})

    def _micro_batch(self, plan: StepPlan, index: int, steps: list[SeqStep], decisions: list, logits: list) -> None:
        k = self.stage
        for s in steps:
            self._remember(s.seq_id)
        arrived = self._receive(plan, index, steps) if k else {}
        work = []  # (step, rows) computed here now
        for s in steps:
            if k == 0:
                work.append((s, Rows(s.start, torch.tensor(s.tokens, dtype=torch.long), None, None)))
                continue
            handoff, rows = arrived.get(s.seq_id, (None, None))
            if handoff is None:
                continue  # it exited upstream (WAND), or is a draft parked upstream
            parked = self.parked.pop(s.seq_id, None)
            rows = rows if parked is None else parked.then(rows)
            if handoff.park:
                self.parked[s.seq_id] = rows.kept() if parked is None else rows  # `then` made new tensors
            else:
                work.append((s, rows))
        started = time.perf_counter()
        onward = self._compute_and_decide(work, decisions, logits) if work else []
        self.busy_s += time.perf_counter() - started
        self._send(plan, index, steps, onward)

    # ---- compute and decide --------------------------------------------------------------------
    def _compute_and_decide(self, work: list[tuple[SeqStep, Rows]], decisions: list, logits: list
                            ) -> list[tuple[SeqStep, Rows, bool]]:
        """Run the slice over every row owed, then apply each sequence's rule. Returns what goes
        downstream: (step, rows, park)."""
        k = self.stage
        segments, heads = [], []
        for s, rows in work:
            require(rows.start == self.computed.get(s.seq_id, 0),
                    f"stage {k} worker {self.worker_id}: sequence {s.seq_id} continues at position "
                    f"{rows.start} but {self.computed.get(s.seq_id, 0)} are computed here")
            spec = self.specs[s.seq_id]
            num_heads = max(0, min(len(rows), rows.start + len(rows) - s.head_from)) if spec.weights[k] > 0 else 0
            require(rows.num_acc in (0, num_heads) or not num_heads,
                    f"stage {k}: sequence {s.seq_id} has {rows.num_acc} Log-OP sums for "
                    f"{num_heads} positions that need a distribution")
            segments.append(Segment(s.seq_id, rows.start, len(rows), num_heads))
            heads.append(num_heads)
        batch = ExtendBatch(
            segments=segments,
            token_ids=_cat([rows.token_ids for _, rows in work]),  # (N,)
            prev_token_ids=torch.tensor([s.prev_token for s, _ in work], dtype=torch.long) if k == 0 else None,
            trunk=TrunkState.cat([rows.trunk for _, rows in work]) if k else None,  # (N, C)
        )
        result = self.worker.extend(batch)
        for s, rows in work:
            self.computed[s.seq_id] = rows.start + len(rows)
        logprobs = None if result.logits is None else log_probs(result.logits)  # (M, V)
        onward, row, head = [], 0, 0
        for (s, rows), n_head in zip(work, heads):
            n = len(rows)
            trunk = None if result.trunk is None else result.trunk.select(slice(row, row + n))  # (n, C)
            spec = self.specs[s.seq_id]
            acc = rows.acc
            if n_head and spec.rule == "logits":
                logits.append((s.seq_id, k, result.logits[head : head + n_head]))
            elif n_head:
                acc = rules.accumulate(acc, logprobs[head : head + n_head], spec.weights[k])
            out = Rows(rows.start, rows.token_ids, trunk, acc)
            park = self._decide(s, spec, out, None if logprobs is None else logprobs[head : head + n_head], decisions)
            if park is not None and k + 1 <= spec.reach:
                onward.append((s, out if park != "final" else Rows(out.start, out.token_ids, out.trunk, None),
                               park != "continue"))
            row, head = row + n, head + n_head
        return onward

    def _decide(self, s: SeqStep, spec: SeqSpec, rows: Rows, own: torch.Tensor | None, decisions: list) -> str | None:
        """Apply the sequence's rule at this stage. Returns how its rows go on: "continue" (the next
        stage computes them now), "park" (the next stage keeps them, with their sums), "final"
        (a token was decided: the next stage keeps them, without sums), or None (held here)."""
        k, last = self.stage, self.num_stages - 1
        if s.action == "none" or spec.rule == "logits":  # nothing to decide; the deepest stage says it is done
            if k < s.depth:
                return "continue"
            decisions.append(Decision(s.seq_id, k))
            return "park"
        if spec.rule == "wand":
            score = rows.acc[-1:] / rules.divisor(spec.weights, k, spec.alpha)  # (1, V)
            threshold = torch.tensor([spec.exit_thresholds[k]], device=score.device)
            if k == last or bool(rules.wand_exits(score, threshold)):
                decisions.append(Decision(s.seq_id, k, int(score[0].argmax())))
                return "final"
            return "continue"
        if k < s.depth:
            return "continue"
        if spec.rule == "sample":
            score = rows.acc[-1] / rules.divisor(spec.weights, k, spec.alpha)  # (V,)
            token = int(score.argmax()) if spec.sampling is None else sample(
                score - torch.logsumexp(score, dim=-1), spec.sampling, s.uniform)
            decisions.append(Decision(s.seq_id, k, token))
            return "final"
        if spec.rule == "score":
            scores = rows.acc / rules.divisor(spec.weights, k, spec.alpha)  # (n, V)
            logprobs, top = rules.token_logprobs(scores, list(s.targets), spec.top_n)
            decisions.append(Decision(s.seq_id, k, logprobs=tuple(logprobs), top=tuple(map(tuple, top))))
            return "final"
        if s.action == "draft":  # speculative: this stage's own distribution drafts the next token
            decisions.append(Decision(s.seq_id, k, int(own[-1].argmax())))
            if k == last:
                held = self.held.get(s.seq_id)
                kept = Rows(rows.start, rows.token_ids, None, rows.acc)
                self.held[s.seq_id] = kept.kept() if held is None else held.then(kept)
                return None
            return "park"
        return self._verify(s, spec, rows, decisions)

    def _verify(self, s: SeqStep, spec: SeqSpec, rows: Rows, decisions: list) -> str:
        """Speculative verification at the last stage: the full-PoE choice at the last committed
        position and each drafted one; drafts kept up to the first disagreement, plus one token."""
        held = self.held.pop(s.seq_id, None)
        kept = Rows(rows.start, rows.token_ids, None, rows.acc)
        rows = kept if held is None else held.then(kept)
        scores = rows.acc / rules.divisor(spec.weights, self.stage, spec.alpha)  # (k+1, V)
        targets = scores.argmax(dim=-1).tolist()
        drafts = rows.token_ids[len(rows) - len(targets) + 1 :].tolist()
        accepted = rules.verify_drafts(targets, drafts)
        decisions.append(Decision(s.seq_id, self.stage, targets[accepted], accepted))
        return "final"

    # ---- neighbours ----------------------------------------------------------------------------
    def _receive(self, plan: StepPlan, index: int, steps: list[SeqStep]) -> dict[int, tuple[Handoff, Rows]]:
        """What every upstream worker of these sequences hands over in this micro-batch."""
        sources = sorted({self.specs[s.seq_id].homes[self.stage - 1] for s in steps})
        deadline = time.monotonic() + RECV_TIMEOUT_S
        arrived = {}
        for src in sources:
            channel = self.inbound[src]
            while True:
                envelope = self.unless_aborted(lambda: channel.recv(deadline, interrupt=self.control), plan.step)
                message = envelope.message
                if (envelope.step, message.micro_batch) == (plan.step, index):
                    break
                require((envelope.step, message.micro_batch) < (plan.step, index),  # older: left from an aborted step
                        f"stage {self.stage}: worker {src} sent step {envelope.step}.{message.micro_batch} "
                        f"while this worker runs {plan.step}.{index}")
            arrived.update(_split(message))
        return arrived

    def _send(self, plan: StepPlan, index: int, steps: list[SeqStep], onward) -> None:
        """A `Boundary` to every downstream worker of these sequences (possibly with no rows)."""
        k = self.stage
        out: dict[int, list] = {}
        for s in steps:
            spec = self.specs[s.seq_id]
            if k <= s.depth and k + 1 <= spec.reach:
                out.setdefault(spec.homes[k + 1], [])
        for s, rows, park in onward:
            out[self.specs[s.seq_id].homes[k + 1]].append((s.seq_id, rows, park))
        deadline = time.monotonic() + RECV_TIMEOUT_S
        for dst, items in out.items():
            message = _boundary(plan.step, index, items)
            channel = self.outbound[dst]
            self.unless_aborted(lambda: channel.send(message, plan.step, plan.epoch, rows=message.token_ids.shape[0],
                                                     deadline=deadline, interrupt=self.control), plan.step)

    def unless_aborted(self, wait, step: int):
        """Run `wait` (a receive or send that the coordinator's channel interrupts). The coordinator
        may send the next plan while this worker still finishes a step (it waits only for the
        decisions); such messages are kept for later and the wait goes on. A plan that aborts
        this step (the step failed elsewhere) ends it: Interrupted."""
        while True:
            try:
                return wait()
            except Interrupted:
                while self.control.pending():
                    message = self.control.recv().message
                    self.backlog.append(message)
                    if isinstance(message, StepPlan) and message.aborted == step:
                        raise

    def rewire(self, inbound: dict, outbound: dict) -> None:
        """Use these channels from now on (the caller closes the ones dropped)."""
        self.inbound, self.outbound = inbound, outbound

    # ---- what a stage keeps between steps ------------------------------------------------------
    def _remember(self, seq_id: int) -> None:
        """Note a sequence's state before this step first touches it (for `undo`)."""
        saved = self._undo[1]
        if seq_id not in saved:
            saved[seq_id] = (self.computed.get(seq_id, 0), self.parked.get(seq_id), self.held.get(seq_id))

    def undo(self, step: int) -> None:
        """Put every sequence the step touched back as it was (the step failed somewhere)."""
        if self._undo is None or self._undo[0] != step:
            return  # this worker did not run that step, or has undone it already
        for seq_id, (computed, parked, held) in self._undo[1].items():
            if self.computed.get(seq_id, 0) > computed:
                self.worker.rollback(seq_id, computed)
            self.computed[seq_id] = computed
            for store, rows in ((self.parked, parked), (self.held, held)):
                if rows is None:
                    store.pop(seq_id, None)
                else:
                    store[seq_id] = rows
        self._undo = None

    def restart(self) -> None:
        """Forget everything: the worker lost its state (its process restarted)."""
        for store in (self.specs, self.computed, self.parked, self.held):
            store.clear()
        self._undo = None

    def _forget(self, seq_id: int) -> None:
        self.worker.free(seq_id)
        for store in (self.specs, self.computed, self.parked, self.held):
            store.pop(seq_id, None)

    def _roll_back(self, seq_id: int, length: int) -> None:
        """Forget positions >= length (rejected drafts)."""
        if self.computed.get(seq_id, 0) > length:
            self.worker.rollback(seq_id, length)
            self.computed[seq_id] = length
        for store in (self.parked, self.held):
            rows = store.get(seq_id)
            if rows is not None and (kept := rows.before(length)) is not rows:
                if kept is None:
                    del store[seq_id]
                else:
                    store[seq_id] = kept


def takes_part(spec: SeqSpec, s: SeqStep, stage: int, worker_id: int) -> bool:
    """Whether `worker_id` (serving `stage`) has work for this sequence in this step: computing
    (stages 0..depth) or keeping rows parked by stage depth (stage depth + 1)."""
    return stage <= min(s.depth + 1, spec.reach) and spec.homes[stage] == worker_id


def _split(message: Boundary) -> dict[int, tuple[Handoff, Rows]]:
    """A boundary message's rows, per sequence."""
    if len(message.handoffs) == 1:  # the whole message is one sequence's: nothing to slice
        h = message.handoffs[0]
        return {h.seq_id: (h, Rows(h.start, message.token_ids, message.trunk, message.acc))}
    out, row, acc_row = {}, 0, 0
    for h in message.handoffs:
        rows = slice(row, row + h.length)
        acc = None if h.num_acc == 0 else message.acc[acc_row : acc_row + h.num_acc]
        out[h.seq_id] = (h, Rows(h.start, message.token_ids[rows], message.trunk.select(rows), acc))
        row, acc_row = row + h.length, acc_row + h.num_acc
    return out


def _boundary(step: int, index: int, items: list[tuple[int, Rows, bool]]) -> Boundary:
    handoffs = tuple(Handoff(seq_id, rows.start, len(rows), rows.num_acc, park) for seq_id, rows, park in items)
    if not items:
        return Boundary(step, index, handoffs, torch.empty(0, dtype=torch.long), None, None)
    accs = [rows.acc for _, rows, _ in items if rows.acc is not None]
    return Boundary(step, index, handoffs, _cat([rows.token_ids for _, rows, _ in items]),
                    TrunkState.cat([rows.trunk for _, rows, _ in items]), _cat(accs) if accs else None)


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def serve_forever(runner: StageRunner, control, results, connect) -> None:
    """A worker process's loop: read the coordinator's messages in order and answer each step.
    `connect(rewire)` opens the channels of a `Rewire` and returns (inbound, outbound) dicts.
    A step that fails here is undone and reported; one the coordinator aborts while it runs is
    undone and dropped."""
    runner.control = control
    while True:
        # a step's plan may come without a wake-up: the upstream's data that follows it wakes this worker
        upstream = tuple(runner.inbound.values())
        message = runner.backlog.popleft() if runner.backlog else control.recv(also=upstream).message
        if isinstance(message, Rewire):
            runner.rewire(*connect(message))
            continue
        try:
            result = runner.run_step(message)
        except Interrupted:
            runner.undo(message.step)
            continue
        except Exception:  # reported to the coordinator, which aborts the step everywhere
            runner.undo(message.step)
            result = StepResult(message.step, message.epoch, runner.worker_id, error=traceback.format_exc())
        if result is not None:
            try:
                runner.unless_aborted(lambda: results.send(result, message.step, message.epoch, interrupt=control),
                                      message.step)
            except Interrupted:
                pass  # the coordinator aborted the step: the plan that says so undoes it
        control.mark(message.step)  # done with it: a coordinator waiting too long sees who is not
