"""A stage worker's channels: boundary messages from its upstream workers, to its downstream
ones, and the coordinator's channel, which interrupts any wait.

The coordinator may send its next plan while this worker still finishes a step (it waits only
for the decisions); such plans are kept in `backlog`, in order, and the wait goes on. A plan
that aborts the step being run ends the wait: `Interrupted`. Which channels carry a message in
a micro-batch follows from the plan alone, so the caller names who to wait for. It knows the
channels and the message envelopes; nothing of what the rows mean.
"""

from __future__ import annotations

import time
from collections import deque

from .framing import Interrupted, wait_for_message
from .messages import Boundary, PeerLost, StepPlan, require

RECV_TIMEOUT_S = 600.0  # a neighbour that sends nothing this long is stuck; the coordinator also watches


class Neighbours:
    def __init__(self, stage: int):
        self.stage = stage
        self.inbound: dict[int, object] = {}  # upstream worker id -> channel (this worker reads)
        self.outbound: dict[int, object] = {}  # downstream worker id -> channel (this worker writes)
        self.control = None  # the coordinator's channel to this worker, watched while waiting (out of process)
        self.backlog: deque = deque()  # its messages read while a step was still running
        self.early: dict[int, object] = {}  # upstream worker id -> a later step's message, received while waiting

    def rewire(self, inbound: dict, outbound: dict) -> None:
        """Use these channels from now on (the caller closes the ones dropped)."""
        self.inbound, self.outbound = inbound, outbound
        self.early.clear()

    def receive(self, step: int, index: int, sources: list[int]) -> list[Boundary]:
        """Micro-batch `index` of `step` from each upstream worker in `sources`; older messages (left
        from an aborted step) are dropped. A later step's message means the decode run this step
        belongs to has ended (stage_workers/decode_run.py): it is kept for that step, and the
        coordinator's plan that aborts this one ends the wait."""
        deadline = time.monotonic() + RECV_TIMEOUT_S
        messages = []
        for src in sources:
            channel = self.inbound[src]
            while True:
                envelope = self.early.pop(src, None) or self.unless_aborted(
                    lambda: channel.recv(deadline, interrupt=self.control), step, src)
                message = envelope.message
                if (envelope.step, message.micro_batch) == (step, index):
                    break
                if (envelope.step, message.micro_batch) > (step, index):
                    require(self.control is not None, f"stage {self.stage}: worker {src} sent step "
                            f"{envelope.step}.{message.micro_batch} while this worker runs {step}.{index}")
                    self.early[src] = envelope
                    self._await_abort(step, deadline)
            messages.append(message)
        return messages

    def send(self, plan: StepPlan, messages: dict[int, Boundary]) -> None:
        """Each message to its downstream worker (worker id -> message)."""
        deadline = time.monotonic() + RECV_TIMEOUT_S
        for dst, message in messages.items():
            channel = self.outbound[dst]
            self.unless_aborted(lambda: channel.send(message, plan.step, plan.epoch, rows=message.token_ids.shape[0],
                                                     deadline=deadline, interrupt=self.control), plan.step, dst)

    def _await_abort(self, step: int, deadline: float) -> None:
        """Wait for the coordinator's plan that aborts `step` (Interrupted), keeping other messages."""
        if any(isinstance(m, StepPlan) and step in m.aborted for m in self.backlog):
            raise Interrupted(f"stage {self.stage}: step {step} was aborted")

        def wait():
            wait_for_message(self.control, deadline, None)
            raise Interrupted(f"stage {self.stage}: a message from the coordinator")

        self.unless_aborted(wait, step)

    def unless_aborted(self, wait, step: int, peer: int | None = None):
        """Run `wait` (a receive or send that the coordinator's channel interrupts), keeping the plans
        that arrive meanwhile for later; a plan that aborts `step` ends it: Interrupted. A broken
        channel to worker `peer` is PeerLost."""
        while True:
            try:
                return wait()
            except ConnectionError as exc:
                if peer is None:
                    raise
                raise PeerLost(peer, str(exc)) from None
            except Interrupted:
                # its wake-ups first: left readable, they would end every later wait at once (a spin)
                self.control.drain_wakeups()
                while self.control.pending():
                    message = self.control.recv().message
                    self.backlog.append(message)
                    if isinstance(message, StepPlan) and step in message.aborted:
                        raise
