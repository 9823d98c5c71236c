"""How a step reaches the stage workers: in process, or in other processes over shared memory.

`LocalTransport` wraps each in-process worker in a `StageRunner` and wires the runners with
in-memory channels, one per pair of workers on adjacent stages; a step runs the runners one
after another in stage order (whatever a runner receives, its upstream has sent already).
`ChannelTransport` drives the same runners inside worker processes (Ray actors, started by
coordinator/ray_cluster/cluster.py) over shared-memory channels. Both take a `StepPlan` and return the
participants' `StepResult`s. This module knows runners, channels and worker ids; nothing of
sequences, modes or Ray.
"""

from __future__ import annotations

import datetime
import logging
import select
import time
import uuid

from stage_workers.channels import LocalChannel, ShmChannel, open_channel
from stage_workers.framing import ChannelTimeout, Packed, serialize
from stage_workers.messages import Edge, Grant, Rewire, StepPlan, StepResult, WorkerLost
from stage_workers.stage_group import GroupRunner
from stage_workers.step_runner import StageRunner

log = logging.getLogger("poe_serve.transport")
START_TIMEOUT_S = 120.0  # a worker's loop (after loading its slice) must open its control channel within this
LIVENESS_TICK_S = 0.2  # how often a waiting coordinator checks that its workers are alive
PEER_LOSS_CONFIRM_S = 10.0  # a worker behind a broken channel that Ray still calls alive after this is killed
CONTROL_SLOT_BYTES = 1 << 20  # plans and reports; larger ones (stage logits) spill to a file of their own
DECIDED_SLOT_BYTES = 1 << 16  # a decision edge's messages: a step's token ids
TRANSPORTS = ("auto", "shm", "dist")


class LocalTransport:
    runs_ahead = False  # runners run one after another: nothing to overlap (stage_workers/decode_run.py)

    def __init__(self):
        self.runners: dict[int, StageRunner | GroupRunner] = {}  # worker id -> its runner

    def add(self, worker_id: int, stage: int, worker, num_stages: int) -> None:
        """`worker`: a stage worker, or a `GroupMember` of a stage group (one runner for the group)."""
        group = getattr(worker, "group", None)
        self.runners[worker_id] = (GroupRunner(group.workers, worker_id, num_stages) if group is not None
                                   else StageRunner(worker, worker_id, num_stages))

    def remove(self, worker_id: int) -> None:
        del self.runners[worker_id]

    def connect(self, topology: list[list[int]], epoch: int) -> None:
        """A fresh channel from every worker to each worker of the stage after its last one
        (`topology`: worker ids per stage; a stage group's id is on each of its stages)."""
        inbound, outbound = {w: {} for w in self.runners}, {w: {} for w in self.runners}
        for a, b in edges(topology):
            inbound[b][a] = outbound[a][b] = LocalChannel(f"{a}->{b}@{epoch}")
        for worker_id, runner in self.runners.items():
            runner.rewire(inbound[worker_id], outbound[worker_id])

    def run(self, plan: StepPlan, expected_items: int, participants: set[int]) -> list[StepResult]:
        """Every runner's part of the step, in stage order; if one raises, the step is undone on all."""
        ordered = sorted(self.runners.values(), key=lambda r: r.stage)
        results = []
        for i, runner in enumerate(ordered):
            try:
                result = runner.run_step(plan)
            except BaseException as exc:
                lost = None
                if isinstance(exc, WorkerLost):
                    exc.worker_id = lost = runner.worker_id if exc.worker_id is None else exc.worker_id
                for later in ordered[i + 1 :]:
                    later.apply_changes(plan)
                for r in ordered:
                    if r.worker_id == lost:
                        r.restart()  # as a restarted process would, it starts afresh
                    else:
                        r.undo(plan.step)
                raise
            if result is not None:
                results.append(result)
        return results


def spans(topology: list[list[int]]) -> dict[int, tuple[int, int]]:
    """Each worker's first and last stage (a stage group's id is on each stage it serves)."""
    out: dict[int, tuple[int, int]] = {}
    for k, ids in enumerate(topology):
        for w in ids:
            out[w] = (out[w][0], k) if w in out else (k, k)
    return out


def decision_edges(topology: list[list[int]]) -> list[tuple[int, int]]:
    """(deciding worker, stage-0 worker) of every decision edge (stage_workers/decode_run.py): from
    each other worker to each worker of stage 0 (a worker's own decisions need no channel)."""
    return [(a, b) for a in spans(topology) for b in topology[0] if a != b]


def edges(topology: list[list[int]]) -> list[tuple[int, int]]:
    """(upstream, downstream) worker ids of every data channel: from each worker to each worker
    of the stage after its last one."""
    return [(a, b) for a, (_, last) in spans(topology).items() if last + 1 < len(topology)
            for b in topology[last + 1]]


class ChannelTransport:
    """How a step reaches stage workers in other processes (Ray actors) over shared memory.

    Each worker has a control channel from the coordinator (plans, rewirings) and a result
    channel back; each pair of workers on adjacent stages has a data channel. A step is one
    plan written to every control channel, then the participants' reports read back: nothing
    else passes through the coordinator. `processes` starts a worker's loop and tells which
    have died (cluster.py does it with Ray); a worker found dead raises `WorkerLost`, and one
    that reports nothing within `step_timeout_s` is killed, so a step never waits forever. A
    channel that breaks (torch.distributed reports a closed or reset peer, on the coordinator's
    side or in a worker's report) loses the worker behind it in the same way, as soon as Ray
    confirms that it died.
    Channels are named after both ends' incarnations: when a worker restarts or replicas come
    and go, only the channels touching them are rebuilt, and the next plan's `aborted` tells
    the others to undo what the failed step did.
    """

    runs_ahead = True  # decode runs: workers step on their own between plans (stage_workers/decode_run.py)

    def __init__(self, processes, step_timeout_s: float, data_slot_bytes: int, kind: str = "auto"):
        """`kind`: auto (shared memory between processes of one node and one device, torch.distributed
        otherwise: gloo between hosts, NCCL between GPUs), or shm / dist for every channel."""
        assert kind in TRANSPORTS, f"transport={kind!r}; allowed: {', '.join(TRANSPORTS)}"
        self.processes, self.kind = processes, kind
        self.step_timeout_s, self.data_slot_bytes = step_timeout_s, data_slot_bytes
        self._store = None  # the TCPStore torch.distributed channels meet at, made when one is needed
        self.tag = uuid.uuid4().hex[:10]
        self.stage_of: dict[int, int] = {}  # worker id -> stage
        self.incarnation: dict[int, int] = {}  # worker id -> times started (a restart is a new incarnation)
        self.control: dict[int, ShmChannel] = {}  # worker id -> the coordinator's channel to it (writer side)
        self.results: dict[int, ShmChannel] = {}  # worker id -> its channel back (reader side)
        self.wiring: dict[int, Rewire] = {}  # worker id -> the data channels it was last told to use
        self.lost: set[int] = set()  # workers found dead and not (yet) restarted
        self.names: dict[str, int] = {}  # every channel made -> its reader (-1: the coordinator), for unlinking
        self._early: list[StepResult] = []  # reports read before their step's turn (a decode run's later steps)

    def add(self, worker_id: int, stage: int, worker, num_stages: int) -> None:
        self.stage_of[worker_id] = stage
        self.incarnation[worker_id] = 0
        self.num_stages = num_stages
        self.processes.register(worker_id, worker)

    def remove(self, worker_id: int) -> None:
        self._drop(worker_id)
        self.processes.forget(worker_id)
        del self.stage_of[worker_id], self.incarnation[worker_id]
        self.wiring.pop(worker_id, None)
        self.lost.discard(worker_id)

    def _drop(self, worker_id: int) -> None:
        for channels in (self.control, self.results):
            channel = channels.pop(worker_id, None)
            if channel is not None:
                channel.close()

    # ---- wiring ----------------------------------------------------------------------------
    def connect(self, topology: list[list[int]], epoch: int) -> None:
        """Start the loop of every worker that has none (new, or restarted), then send each worker
        whose data channels changed its new set; the log says which kind each data channel is."""
        for worker_id in spans(topology):
            if worker_id not in self.control and worker_id not in self.lost:
                self._start(worker_id)
        live = [(a, b) for a, b in edges(topology) if a not in self.lost and b not in self.lost]
        for worker_id in spans(topology):
            if worker_id in self.lost:
                continue
            decided = [(a, b) for a, b in decision_edges(topology) if a not in self.lost and b not in self.lost]
            rewire = Rewire(epoch, tuple(self._edge(a, worker_id) for a, b in live if b == worker_id),
                            tuple(self._edge(worker_id, b) for a, b in live if a == worker_id),
                            tuple(self._edge(a, worker_id, decided=True) for a, b in decided if b == worker_id),
                            tuple(self._edge(worker_id, b, decided=True) for a, b in decided if a == worker_id))
            if worker_id not in self.wiring or self.wiring[worker_id][1:] != rewire[1:]:
                self._send(worker_id, rewire, -1, epoch)
                self.wiring[worker_id] = rewire
        kinds = [f"{e.src}->{e.dst} {e.kind}" for w in self.wiring.values() for e in w.outbound]
        log.info("data channels (epoch %d, worker id -> worker id): %s", epoch, ", ".join(kinds) or "none")

    def _edge(self, src: int, dst: int, decided: bool = False) -> Edge:
        """A data channel, or (`decided`) a decision edge: a few token ids a step, no tensors."""
        name = f"{self.tag}-{src}.{self.incarnation[src]}-{dst}.{self.incarnation[dst]}" + ("-d" if decided else "")
        self.names[name] = dst
        if decided:
            return self._address(name, src, dst, DECIDED_SLOT_BYTES, 8, tensors=False)
        return self._address(name, src, dst, self.data_slot_bytes, 2)

    def _address(self, name: str, src: int, dst: int, slot_bytes: int, num_slots: int, tensors: bool = True) -> Edge:
        """The channel's kind from where its ends run (worker id -1: this process)."""
        (src_node, src_device), (dst_node, dst_device) = self._where(src), self._where(dst)
        on_gpus = tensors and src_device.startswith("cuda") and dst_device.startswith("cuda")
        if self.kind == "shm" or (self.kind == "auto" and src_node == dst_node and
                                  (not on_gpus or src_device == dst_device)):
            return Edge(name, src, dst, slot_bytes, num_slots)
        if self._store is None:
            import torch.distributed as dist  # only when a channel crosses hosts or GPUs

            self._store = dist.TCPStore(self.processes.node_ip(), 0, is_master=True, wait_for_workers=False,
                                        timeout=datetime.timedelta(seconds=START_TIMEOUT_S))
        store = f"{self.processes.node_ip()}:{self._store.port}"
        return Edge(name, src, dst, slot_bytes, num_slots, "nccl" if on_gpus else "dist", store)

    def _where(self, worker_id: int) -> tuple[str, str]:
        """(node address, device) of a worker; the coordinator is on its own node, on the host."""
        return (self.processes.node_ip(), "cpu") if worker_id == -1 else self.processes.placement(worker_id)

    def _start(self, worker_id: int) -> None:
        name = f"{self.tag}-w{worker_id}.{self.incarnation[worker_id]}"
        self.names.update({f"{name}-ctl": worker_id, f"{name}-res": -1})
        self.processes.locate(worker_id)
        control = self._address(f"{name}-ctl", -1, worker_id, CONTROL_SLOT_BYTES, 4)
        results = self._address(f"{name}-res", worker_id, -1, CONTROL_SLOT_BYTES, 4)
        host = self.processes.node_ip()
        self.results[worker_id] = open_channel(results, is_reader=True, host=host)
        self.processes.start(worker_id, self.num_stages, control, results)
        deadline = time.monotonic() + START_TIMEOUT_S
        while worker_id not in self.control:  # the worker's loop creates it; a loop that failed never will
            try:
                self.control[worker_id] = open_channel(control, is_reader=False, host=host, timeout=LIVENESS_TICK_S)
            except ChannelTimeout:
                if self.processes.dead([worker_id]) or time.monotonic() > deadline:
                    raise RuntimeError(f"stage {self.stage_of[worker_id]} worker {worker_id} did not start its "
                                       f"step loop: {self.processes.why(worker_id)}") from None
        self.wiring.pop(worker_id, None)

    # ---- the step ----------------------------------------------------------------------------
    def run(self, plan: StepPlan, expected_items: int, participants: set[int]) -> list[StepResult]:
        """Send the plan to every worker; return reports until they hold `expected_items`
        decisions and stage logits (a failed worker's report ends the wait too)."""
        deadline = time.monotonic() + self.step_timeout_s
        packed = serialize(plan, plan.step, plan.epoch)  # encoded once for every worker
        # A worker of stage > 0 with a part in the step is woken by its upstream's data, one wake-up
        # per worker per step instead of two (on a few cores, wake-ups are the cost); so its plan is
        # written first, before any worker that could send it data is woken.
        quiet = {w for w in participants if self.stage_of[w] > 0}
        for worker_id in sorted(self.control, key=lambda w: w not in quiet):
            self._send(worker_id, packed, wake=worker_id not in quiet, deadline=deadline)
        return self.collect(plan.step, expected_items, participants, deadline)

    def collect(self, step: int, expected_items: int, participants: set[int], deadline: float | None = None
                ) -> list[StepResult]:
        """The reports of `step` (a plan's, or a decode run's later step: stage_workers/decode_run.py)
        until they hold `expected_items` decisions and stage logits. A later step's report that comes
        first is kept for its turn; an earlier step's (aborted) is dropped."""
        deadline = deadline or time.monotonic() + self.step_timeout_s
        readers = list(self.results.values())
        reports, items = [], 0
        self._early = [r for r in self._early if r.step >= step]
        while items < expected_items:
            report = next((r for r in self._early if r.step == step), None)
            if report is None:
                waiting = [channel for channel in readers if channel.pending()]
                if not waiting:  # wake-ups are not counts: a channel is read once it says a message waits
                    ready = select.select(readers, [], [], LIVENESS_TICK_S)[0]
                    for channel in ready:
                        channel.drain_wakeups()
                    if not ready:
                        self._check(deadline, {w for w in participants if w in self.control and
                                               self.control[w].marked() < step})
                    continue
                self._early += [r for r in (channel.recv().message for channel in waiting) if r.step >= step]
                continue
            self._early.remove(report)
            reports.append(report)
            items += len(report.decisions) + len(report.logits)
            if report.lost_peer in self.control:
                self._lose(report.lost_peer, f"worker {report.worker_id}'s channel to it broke")
            if report.error:
                return reports
        return reports

    def grant(self, worker_ids, step: int) -> None:
        """Let a decode run's stage-0 workers start `step` (the coordinator read step - 2)."""
        for worker_id in worker_ids:
            self._send(worker_id, Grant(step), step)

    def _send(self, worker_id: int, message, step: int = -1, epoch: int = -1, wake: bool = True,
              deadline: float | None = None) -> None:
        """A plan (packed) or a rewiring to a worker's control channel, retried a tick at a time while
        the worker is alive: a dead or stuck one raises `WorkerLost`, as does a broken channel."""
        channel, deadline = self.control[worker_id], deadline or time.monotonic() + self.step_timeout_s
        while True:
            try:
                if isinstance(message, Packed):
                    return channel.send_packed(message, deadline=time.monotonic() + LIVENESS_TICK_S, wake=wake)
                return channel.send(message, step, epoch, deadline=time.monotonic() + LIVENESS_TICK_S)
            except ChannelTimeout:
                self._check(deadline, {worker_id})
            except ConnectionError as exc:
                self._lose(worker_id, f"its control channel broke ({exc})")

    def _lose(self, worker_id: int, why: str) -> None:
        """Raise `WorkerLost` for a worker behind a broken channel once Ray reports it dead (a lost
        node takes Ray a moment to notice); one Ray still calls alive after PEER_LOSS_CONFIRM_S is
        killed, as a stuck one is."""
        confirm_by = time.monotonic() + PEER_LOSS_CONFIRM_S
        while not self.processes.dead([worker_id]):
            if time.monotonic() > confirm_by:
                self.processes.kill(worker_id)
                why += f"; Ray still reported it alive after {PEER_LOSS_CONFIRM_S:g}s, so it was killed"
                break
            time.sleep(LIVENESS_TICK_S / 4)
        self._lost(worker_id, why)

    def _check(self, deadline: float, waiting_on: set[int]) -> None:
        """Raise `WorkerLost` for a dead worker; past the deadline, kill the first (by stage) of
        `waiting_on`, the workers that have not finished the step (alive but stuck), and raise it
        as lost."""
        for worker_id, channel in list(self.results.items()):  # a result channel that broke loses its worker
            if channel.failure() is not None:
                self._lose(worker_id, f"its result channel broke ({channel.failure()})")
        dead, why = self.processes.dead(list(self.control)), "its process died"
        if not dead and waiting_on and time.monotonic() > deadline:
            dead = [min(waiting_on, key=lambda w: self.stage_of[w])]
            why = f"it reported nothing within the step timeout of {self.step_timeout_s:.0f}s and was killed"
            self.processes.kill(dead[0])
        if dead:
            self._lost(dead[0], why)

    def _lost(self, worker_id: int, why: str) -> None:
        """Forget a dead worker's channels, wait for Ray to restart it, and raise `WorkerLost`."""
        self._drop(worker_id)
        for name in [n for n, reader in self.names.items() if reader == worker_id]:
            ShmChannel.unlink(name)  # what the dead process created and can no longer remove
            del self.names[name]
        restarted = self.processes.wait_restarted(worker_id)
        self.incarnation[worker_id] += 1
        if not restarted:
            self.lost.add(worker_id)
        raise WorkerLost(self.stage_of[worker_id], f"{why}; " + ("Ray restarted it" if restarted else
                         "no restarts left"), restarted=restarted, worker_id=worker_id)

    def close(self) -> None:
        for worker_id in list(self.control) + list(self.results):
            self._drop(worker_id)
        for name in self.names:
            ShmChannel.unlink(name)
        self.names.clear()
