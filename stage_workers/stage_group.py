"""A stage group: one worker serving several consecutive stages (one process, one CUDA context).

Each stage keeps its own `StageWorker` (its layers, its head, its KV cache) and its own
`StageRunner`; `GroupRunner` runs them one after another in stage order, handing each stage's
rows to the next over an in-memory channel (nothing serialized, nothing copied), so Log-OP
partial sums, WAND exits, drafts and prefix caching work inside a group exactly as between
processes. To the coordinator the group is one worker: one id on every stage it serves, one
plan read per step, one report (the decisions of all its stages). Its upstream face is its first
stage's channels, its downstream face its last stage's. It knows runners and channels; nothing
of modes or of where the other workers run.
"""

from __future__ import annotations

from collections import deque

from .channels import LocalChannel
from .messages import StepPlan, StepResult
from .step_runner import StageRunner


class StageGroup:
    """Several consecutive stages' workers, served as one worker (in process, or in one actor)."""

    def __init__(self, workers: list):
        stages = [w.stage for w in workers]
        assert stages == list(range(stages[0], stages[0] + len(stages))), f"a group's stages are consecutive: {stages}"
        self.workers = workers

    def members(self) -> list["GroupMember"]:
        """One handle per stage, as the engine's per-stage bookkeeping takes workers."""
        return [GroupMember(self, w) for w in self.workers]


class GroupMember:
    """A group's face on one of its stages: that stage's worker info; `group` names the worker."""

    def __init__(self, group: StageGroup, worker):
        self.group, self.worker, self.stage = group, worker, worker.stage

    def info(self):
        return self.worker.info()


class GroupRunner:
    def __init__(self, workers: list, worker_id: int, num_stages: int):
        self.worker_id, self.num_stages = worker_id, num_stages
        self.members = [StageRunner(w, worker_id, num_stages) for w in workers]
        self.stage = self.members[0].stage
        backlog = deque()  # plans read while any member waited: one queue for the group's loop
        for a, b in zip(self.members, self.members[1:]):
            channel = LocalChannel(f"{worker_id}:{a.stage}->{b.stage}")
            a.neighbours.outbound, b.neighbours.inbound = {worker_id: channel}, {worker_id: channel}
        for m in self.members:
            m.neighbours.backlog = backlog

    @property
    def neighbours(self):
        """The upstream face: the first stage's inbound channels and the group's backlog."""
        return self.members[0].neighbours

    def attach(self, control) -> None:
        for m in self.members:
            m.attach(control)

    def rewire(self, inbound: dict, outbound: dict) -> None:
        first, last = self.members[0].neighbours, self.members[-1].neighbours
        first.inbound, last.outbound = inbound, outbound

    def run_step(self, plan: StepPlan) -> StepResult | None:
        """Each stage's part in order; one report with every decision and stage logits of the group."""
        decisions, logits = [], []
        for i, m in enumerate(self.members):
            try:
                result = m.run_step(plan)
            except BaseException:
                for later in self.members[i + 1 :]:  # their changes still apply; the caller undoes the step
                    later.apply_changes(plan)
                raise
            if result is not None:
                decisions += result.decisions
                logits += result.logits
        if not decisions and not logits:
            return None
        return StepResult(plan.step, plan.epoch, self.worker_id, tuple(decisions), tuple(logits))

    def apply_changes(self, plan: StepPlan) -> None:
        for m in self.members:
            m.apply_changes(plan)

    def undo(self, step: int) -> None:
        for m in self.members:
            m.undo(step)

    def restart(self) -> None:
        for m in self.members:
            m.restart()

    def spec(self, seq_id: int):
        return next((spec for m in self.members if (spec := m.spec(seq_id)) is not None), None)

    def takes_part(self, s) -> bool:
        return any(m.takes_part(s) for m in self.members)
