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

import math
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


@dataclass(frozen=True)
class Block:
    """Packed rows of several sequences: a received message's, or a computed batch's."""

    token_ids: torch.Tensor  # (N,)
    trunk: TrunkState | None  # (N, C); None before stage 0 computed them (or when held)
    acc: torch.Tensor | None  # (M, V) Log-OP sums of some of the rows

    @property
    def num_rows(self) -> int:
        return self.token_ids.shape[0]

    @property
    def num_acc(self) -> int:
        return 0 if self.acc is None else self.acc.shape[0]


class Rows:
    """Consecutive positions of one sequence between stages, start..start+len-1: rows
    [row0, row0 + len) of a `Block`, whose last `num_acc` carry Log-OP sums (rows [acc0, acc0 +
    num_acc) of the block's sums). Tensors are sliced only when one sequence's are asked for:
    rows that tile a block go back together without a copy (`pack`)."""

    __slots__ = ("start", "length", "num_acc", "block", "row0", "acc0")

    def __init__(self, start: int, length: int, num_acc: int, block: Block, row0: int = 0, acc0: int = 0):
        self.start, self.length, self.num_acc, self.block, self.row0, self.acc0 = start, length, num_acc, block, row0, acc0

    @classmethod
    def of(cls, start: int, token_ids: torch.Tensor, trunk: TrunkState | None, acc: torch.Tensor | None) -> "Rows":
        """Rows made of tensors of their own."""
        return cls(start, token_ids.shape[0], 0 if acc is None else acc.shape[0], Block(token_ids, trunk, acc))

    def __len__(self) -> int:
        return self.length

    def _whole(self) -> bool:
        return self.row0 == 0 and self.length == self.block.num_rows

    @property
    def token_ids(self) -> torch.Tensor:
        return self.block.token_ids if self._whole() else self.block.token_ids[self.row0 : self.row0 + self.length]

    @property
    def trunk(self) -> TrunkState | None:
        t = self.block.trunk
        return t if t is None or self._whole() else t.select(slice(self.row0, self.row0 + self.length))

    @property
    def acc(self) -> torch.Tensor | None:
        if self.num_acc == 0:
            return None
        acc = self.block.acc
        return acc if self.acc0 == 0 and self.num_acc == acc.shape[0] else acc[self.acc0 : self.acc0 + self.num_acc]

    def without_acc(self) -> "Rows":
        return Rows(self.start, self.length, 0, self.block, self.row0, self.acc0)

    def then(self, later: "Rows") -> "Rows":
        """These rows followed by `later` (which must start where these end)."""
        require(later.start == self.start + len(self), f"rows {self.start}+{len(self)} then rows at {later.start}")
        require(self.num_acc == 0 or later.num_acc == len(later), "Log-OP sums must cover a suffix of the rows")
        block = pack([self, later])
        return Rows(self.start, len(self) + len(later), block.num_acc, block)

    def kept(self) -> "Rows":
        """These rows as tensors of their own: rows kept across steps must not hold on to (and so keep
        alive) the whole batch message they arrived in."""
        trunk = self.trunk
        trunk = None if trunk is None else trunk.map(torch.clone)
        acc = self.acc
        return Rows.of(self.start, self.token_ids.clone(), trunk, None if acc is None else acc.clone())

    def before(self, length: int) -> "Rows | None":
        """The rows at positions < length (None if none)."""
        keep = length - self.start
        if keep <= 0:
            return None
        if keep >= len(self):
            return self
        num_acc = max(0, keep - (len(self) - self.num_acc))
        return Rows(self.start, keep, num_acc, self.block, self.row0, self.acc0)


def pack(parts: list[Rows]) -> Block:
    """The parts' rows one after another (and their sums): the block itself, or a slice of it, when
    the parts tile one block in order (a batch split per sequence and put back together)."""
    first, last = parts[0], parts[-1]
    block = first.block
    with_acc = [p for p in parts if p.num_acc]
    tiled = (all(p.block is block for p in parts)
             and all(b.row0 == a.row0 + a.length for a, b in zip(parts, parts[1:]))
             and all(b.acc0 == a.acc0 + a.num_acc for a, b in zip(with_acc, with_acc[1:])))
    if tiled:
        whole = Rows(first.start, last.row0 + last.length - first.row0, sum(p.num_acc for p in parts), block, first.row0,
                     with_acc[0].acc0 if with_acc else 0)
        return Block(whole.token_ids, whole.trunk, whole.acc)
    accs = [p.acc for p in with_acc]
    return Block(_cat([p.token_ids for p in parts]), None if first.block.trunk is None else
                 TrunkState.cat([p.trunk for p in parts]), _cat(accs) if accs else None)


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
                work.append((s, Rows.of(s.start, torch.tensor(s.tokens, dtype=torch.long), None, None)))
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
        self.worker.busy_s += time.perf_counter() - started
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
        packed = pack([rows for _, rows in work])  # (N, ...): the upstream's message itself, in the usual case
        batch = ExtendBatch(
            segments=segments,
            token_ids=packed.token_ids,  # (N,)
            prev_token_ids=torch.tensor([s.prev_token for s, _ in work], dtype=torch.long) if k == 0 else None,
            trunk=packed.trunk if k else None,  # (N, C)
        )
        result = self.worker.extend(batch)
        for s, rows in work:
            self.computed[s.seq_id] = rows.start + len(rows)
        logprobs = None if result.logits is None else log_probs(result.logits)  # (M, V)
        outs = self._accumulate(work, heads, logprobs, packed, Block(packed.token_ids, result.trunk, None))
        greedy = self._decide_greedy(work, outs)  # every plain argmax of the step, in one op
        onward, head = [], 0
        for (s, _), n_head, out in zip(work, heads, outs):
            spec = self.specs[s.seq_id]
            if n_head and spec.rule == "logits":
                logits.append((s.seq_id, k, result.logits[head : head + n_head]))
            park = greedy.get(s.seq_id)
            if park is None:
                park = self._decide(s, spec, out, None if logprobs is None else logprobs[head : head + n_head],
                                    decisions)
            elif park != "continue":
                decisions.append(Decision(s.seq_id, k, park[1]))
                park = "final"
            if park is not None and k + 1 <= spec.reach:
                onward.append((s, out if park != "final" else out.without_acc(), park != "continue"))
            head += n_head
        return onward

    def _accumulate(self, work, heads: list[int], logprobs: torch.Tensor | None, packed: Block, out: Block
                    ) -> list[Rows]:
        """Each sequence's rows after this stage, with w_k * log p_k added to the Log-OP sums that came
        from upstream: for the whole batch in one op when every sequence with a distribution to add
        brought its sums (or none did), one sequence at a time otherwise."""
        k = self.stage
        weights = [self.specs[s.seq_id].weights[k] if n and self.specs[s.seq_id].rule != "logits" else 0.0
                   for (s, _), n in zip(work, heads)]
        carrying = {rows.num_acc > 0 for (_, rows), w in zip(work, weights) if w}
        if all(weights) and len(carrying) == 1:  # the whole batch at once (the usual case)
            lp = logprobs if len(set(weights)) == 1 else logprobs * torch.tensor(
                [w for w, n in zip(weights, heads) for _ in range(n)], device=logprobs.device)[:, None]
            total = rules.accumulate(packed.acc if carrying == {True} else None, lp,
                                     weights[0] if lp is logprobs else 1.0)  # (M, V)
            block, rows_out, row, head = Block(out.token_ids, out.trunk, total), [], 0, 0
            for (_, rows), n in zip(work, heads):
                rows_out.append(Rows(rows.start, len(rows), n, block, row, head))
                row, head = row + len(rows), head + n
            return rows_out
        rows_out, row, head = [], 0, 0
        for (_, rows), n, w in zip(work, heads, weights):
            acc = rules.accumulate(rows.acc, logprobs[head : head + n], w) if w else rows.acc
            trunk = None if out.trunk is None else out.trunk.select(slice(row, row + len(rows)))
            rows_out.append(Rows.of(rows.start, rows.token_ids, trunk, acc))
            row, head = row + len(rows), head + n
        return rows_out

    def _decide_greedy(self, work, outs: list[Rows]) -> dict[int, object]:
        """The step's plain decisions at once: a greedy token at the deepest stage, and WAND's
        margin test. seq_id -> "continue" (WAND goes on) or ("final", token)."""
        k, last = self.stage, self.num_stages - 1
        picked, last_rows, divisors, thresholds = [], [], [], []
        for (s, _), rows in zip(work, outs):
            spec = self.specs[s.seq_id]
            if rows.num_acc == 0 or s.action != "decide":
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
            stacked = _cat([r.acc[-1:] for r in last_rows])  # (B, V)
        scores = stacked / divisors[0] if len(set(divisors)) == 1 else \
            stacked / torch.tensor(divisors, device=stacked.device)[:, None]
        tokens = scores.argmax(dim=-1).tolist()
        wand = [t > -math.inf for t in thresholds]
        exits = rules.wand_exits(scores, torch.tensor(thresholds, device=scores.device)).tolist() if any(wand) \
            else [True] * len(picked)
        return {seq_id: ("final", token) if done or not w else "continue"
                for seq_id, token, done, w in zip(picked, tokens, exits, wand)}

    def _decide(self, s: SeqStep, spec: SeqSpec, rows: Rows, own: torch.Tensor | None, decisions: list) -> str | None:
        """Apply the sequence's rule at this stage. Returns how its rows go on: "continue" (the next
        stage computes them now), "park" (the next stage keeps them, with their sums), "final"
        (a token was decided: the next stage keeps them, without sums), or None (held here).
        WAND and greedy tokens are not here: `_decide_greedy` decides them for the whole batch."""
        k, last = self.stage, self.num_stages - 1
        if s.action == "none" or spec.rule == "logits":  # nothing to decide; the deepest stage says it is done
            if k < s.depth:
                return "continue"
            decisions.append(Decision(s.seq_id, k))
            return "park"
        if k < s.depth:
            return "continue"
        if spec.rule == "sample":  # a sampled token (greedy ones: `_decide_greedy`)
            score = rows.acc[-1] / rules.divisor(spec.weights, k, spec.alpha)  # (V,)
            token = sample(score - torch.logsumexp(score, dim=-1), spec.sampling, s.uniform)
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
                kept = Rows.of(rows.start, rows.token_ids, None, rows.acc)
                self.held[s.seq_id] = kept.kept() if held is None else held.then(kept)
                return None
            return "park"
        return self._verify(s, spec, rows, decisions)

    def _verify(self, s: SeqStep, spec: SeqSpec, rows: Rows, decisions: list) -> str:
        """Speculative verification at the last stage: the full-PoE choice at the last committed
        position and each drafted one; drafts kept up to the first disagreement, plus one token."""
        held = self.held.pop(s.seq_id, None)
        kept = Rows.of(rows.start, rows.token_ids, None, rows.acc)
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
    """A boundary message's rows, per sequence (views into the message, sliced only if needed)."""
    block = Block(message.token_ids, message.trunk, message.acc)
    out, row, acc_row = {}, 0, 0
    for h in message.handoffs:
        out[h.seq_id] = (h, Rows(h.start, h.length, h.num_acc, block, row, acc_row))
        row, acc_row = row + h.length, acc_row + h.num_acc
    return out


def _boundary(step: int, index: int, items: list[tuple[int, Rows, bool]]) -> Boundary:
    handoffs = tuple(Handoff(seq_id, rows.start, len(rows), rows.num_acc, park) for seq_id, rows, park in items)
    if not items:
        return Boundary(step, index, handoffs, torch.empty(0, dtype=torch.long), None, None)
    block = pack([rows for _, rows, _ in items])  # the computed batch itself when everything goes on together
    return Boundary(step, index, handoffs, block.token_ids, block.trunk, block.acc)


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors one after another along dim 0; no copy when they are already adjacent rows of one
    buffer (a batch's rows split per sequence and put back together, the common case)."""
    first = tensors[0]
    if len(tensors) == 1:
        return first
    end, last = first.data_ptr(), tensors[-1]
    for t in tensors:  # consecutive in memory, between two ends of one storage: rows of one buffer
        if t.data_ptr() != end or not t.is_contiguous():
            return torch.cat(tensors)
        end += t.nbytes
    if last.untyped_storage().data_ptr() != first.untyped_storage().data_ptr():
        return torch.cat(tensors)
    rows = sum(t.shape[0] for t in tensors)
    return first.as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())


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
