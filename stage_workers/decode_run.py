"""Steady decode without the coordinator: the steps a worker runs between two plans.

A plan may let the workers run `run_ahead` more steps on their own (`StepPlan.run_ahead`): decode
steps of the same sequences, each feeding the token decided in the step before. The worker that
decides a sequence's token sends it straight to the sequence's stage-0 worker (the decision edge,
`Decided`), which starts the next step without waiting for a plan; every other worker derives the
same step from the one it last ran (`next_step`) and waits for its upstream's rows as usual.

The coordinator reads the reports as before, one step behind, and lets the stage-0 workers start
step t + 2 once it has read step t (`Grant`). When it ends a run early (a stop string, a cancel,
a new request, a change of topology), at most one step past the last it read has run; its next
plan aborts the run's remaining steps (`StepPlan.aborted`), which every worker undoes as it
undoes a failed step (stage_workers/stage_state.py). It knows plans, channels and runners'
specs; nothing of modes.
"""

from __future__ import annotations

import select
import time

from .messages import Decided, Grant, SeqStep, StepPlan, StepResult, require
from .neighbours import RECV_TIMEOUT_S

UNKNOWN = -1  # a token only the sequence's stage-0 worker knows (no other stage reads it)


def next_step(plan: StepPlan, tokens: dict[int, int], draws: dict[int, tuple[float, ...]], index: int) -> StepPlan:
    """The run's step after `plan`: every sequence one position further, feeding its token
    (`tokens`, for the sequences whose stage 0 this worker serves), with its draw (`draws`: the
    run's, per sampled sequence; `index`: this step's among the run's later steps)."""

    def after(s: SeqStep) -> SeqStep:
        start = s.start + 1  # a run's steps are decode steps: one token each
        return s._replace(start=start, tokens=(tokens.get(s.seq_id, UNKNOWN),), prev_token=s.tokens[0],
                          logits_from=start, uniforms=draws[s.seq_id][index : index + 1] if s.seq_id in draws else ())

    return StepPlan(plan.step + 1, plan.epoch, micro_batches=tuple(tuple(map(after, mb)) for mb in plan.micro_batches),
                    run_ahead=plan.run_ahead - 1)


class DecodeRun:
    """One worker's side of decode runs: what it sends on its decision edges, and, at stage 0,
    when it may start the next step."""

    def __init__(self, runner, control):
        self.runner, self.control = runner, control
        self.worker_id = runner.worker_id
        self.first = runner.stage == 0  # it starts each step of a run
        self.plan: StepPlan | None = None  # the step last run, while a run goes on here
        self.fresh = False  # the step being run came from the coordinator
        self.granted = -1  # the last step the coordinator let the stage-0 workers start
        self.mine: set[int] = set()  # the run's sequences whose stage 0 this worker serves
        self.draws: dict[int, tuple[float, ...]] = {}  # the run's draws per sampled sequence
        self.index = 0  # the next step's among the run's later steps
        self.tokens: dict[int, int] = {}  # their tokens for the next step, as they arrive
        self.inbound: dict[int, object] = {}  # deciding worker id -> its decision edge to this worker
        self.outbound: dict[int, object] = {}  # stage-0 worker id -> this worker's decision edge to it

    def rewire(self, inbound: dict, outbound: dict) -> None:
        self.inbound, self.outbound = inbound, outbound

    def begin(self, plan: StepPlan) -> None:
        """A plan from the coordinator: whatever ran before has ended."""
        self.plan, self.tokens, self.fresh = None, {}, True

    def after(self, plan: StepPlan, result: StepResult | None, ok: bool) -> None:
        """The step ran (`ok`: to its end): a run's first step starts it here if this worker has a
        part (known once the plan's new sequences are learnt); while it goes on, the step's
        decisions go out on the decision edges."""
        fresh, self.fresh = self.fresh, False
        if not ok or (result is not None and result.error) or not plan.run_ahead:
            self.plan = None
            return
        if fresh:
            if not any(self.runner.takes_part(s) for mb in plan.micro_batches for s in mb):
                return
            self.granted = max(self.granted, plan.step + 1)  # a run's first step may follow at once
            self.mine = {s.seq_id for mb in plan.micro_batches for s in mb if self._home0(s.seq_id) == self.worker_id}
            self.draws, self.index = dict(plan.ahead_uniforms), 0
        elif self.plan is None:
            return
        self.plan = plan
        out: dict[int, list] = {}
        for d in () if result is None else result.decisions:
            home = self._home0(d.seq_id)
            if home == self.worker_id:
                self.tokens[d.seq_id] = d.token
            else:
                out.setdefault(home, []).append((d.seq_id, d.token))
        neighbours = self.runner.neighbours
        for dst, tokens in out.items():
            message, channel = Decided(plan.step, tuple(tokens)), self.outbound[dst]
            neighbours.unless_aborted(lambda: channel.send(message, plan.step, plan.epoch, interrupt=self.control,
                                                           deadline=time.monotonic() + RECV_TIMEOUT_S), plan.step, dst)

    def next_step(self) -> StepPlan | None:
        """The run's next step, once this worker may run it; None when there is none (no run, its
        last step ran, or the coordinator sent something: its message waits in the backlog)."""
        if self.plan is None:
            self._read_decided()  # what came after a run ended
            return None
        backlog = self.runner.neighbours.backlog
        while True:
            self._read_control(backlog)
            self._read_decided()
            if backlog:
                self.plan = None
                return None
            step = self.plan.step + 1
            if not self.first or (self.granted >= step and self.mine <= self.tokens.keys()):
                plan, self.tokens = next_step(self.plan, self.tokens, self.draws, self.index), {}
                self.index += 1
                return plan
            watch = [self.control.fileno(), *(c.fileno() for c in self.inbound.values())]
            ready = select.select(watch, [], [], RECV_TIMEOUT_S)[0]
            require(ready, f"worker {self.worker_id}: no decision or grant for step {step} in {RECV_TIMEOUT_S:.0f}s")
            for channel in (self.control, *self.inbound.values()):
                if channel.fileno() in ready:
                    channel.drain_wakeups()

    def _read_control(self, backlog) -> None:
        """Grants are taken here; any other message from the coordinator waits in the backlog."""
        for message in [m for m in backlog if isinstance(m, Grant)]:
            backlog.remove(message)
            self.granted = max(self.granted, message.step)
        while self.control.pending():
            message = self.control.recv().message
            if isinstance(message, Grant):
                self.granted = max(self.granted, message.step)
            else:
                backlog.append(message)

    def _read_decided(self) -> None:
        """The decision edges' messages: the tokens of the step last run; older ones (a run that
        ended) are dropped."""
        for channel in self.inbound.values():
            while channel.pending():
                message = channel.recv().message
                if self.plan is not None and message.step == self.plan.step:
                    self.tokens.update(message.tokens)

    def _home0(self, seq_id: int) -> int | None:
        spec = self.runner.spec(seq_id)
        return None if spec is None else spec.homes[0]
