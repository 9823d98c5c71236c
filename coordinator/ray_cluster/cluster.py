"""The Ray backend of `PoEModel` (`PoEModel.on_ray`): each stage worker in its own Ray actor
(a worker may serve a stage group: several consecutive stages in one actor).

The runtime's one module that imports Ray for the workers (serve_app.py beside it imports Ray
Serve; tools/transport_bench.py has benchmark actors of its own). Ray places the workers,
restarts them and reports them dead; the steps themselves do not go through it. `StageActor` is
a thin shim that loads only its stage's slice in the actor's process and runs the same
`StageRunner` loop as the in-process model, over shared-memory channels (`serve`): plans from
the coordinator, boundary states straight to the next stage's actor, decisions back.
`RayProcesses` is what the channel transport (coordinator/core/transport.py) needs from Ray:
start a loop, find dead actors, wait for a restart, kill a stuck one. `RayCluster` holds the
actors and placement groups: a stage may run several replicas (`replicas` in the serving
config) and `scale_stage` changes that count while requests run, by hand or by the stage's
autoscaler. The engine, pipeline, replica placement and modes are the in-process ones.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from coordinator.core.transport import ChannelTransport
from coordinator.serving_config import ServingConfig, StagePlacement, load_serving_config
from stage_workers.channels import open_channel
from stage_workers.compute_thread import compute_here, off_main_thread
from stage_workers.config import load_config
from stage_workers.messages import Edge, Rewire, WorkerInfo, WorkerLocation
from stage_workers.stage_group import GroupRunner
from stage_workers.step_runner import StageRunner, serve_forever
from stage_workers.worker import StageWorker, WorkerSpec

PLACEMENT_TIMEOUT_S = 120
NODE_START_TIMEOUT_S = 600  # with cluster_autoscaling: how long a new replica may wait for Ray to add a node
RESTART_TIMEOUT_S = 120  # a lost worker must be back (slice reloaded) within this
CONNECT_TIMEOUT_S = 5.0  # a Ray address that accepts no connection within this is refused at once
ACCELERATOR_SHARE = 0.001  # of the accelerator_type:<name> resource a worker takes (as Ray's own accelerator_type= does)
SIGNALS_TIMEOUT_S = 5.0  # load signals (busy time) not read within this are skipped this round
ACTOR_THREADS = 4  # the step loop holds one; info, pid and the like answer on the others
# OpenMP threads spin only briefly (about 30k spins) after a parallel region before they sleep:
# long enough to bridge the gaps between one stage's ops, short enough that a worker waiting for
# its next step leaves the cores to the one computing. (Spinning at libgomp's default halved
# single-stream decode, 24 -> 16 tok/s; never spinning, OMP_WAIT_POLICY=PASSIVE, woke the team
# through the kernel at every op: small preset 50 vs 55-59 tok/s, 1.5b bf16 163 vs 147 ms/token.)
# A worker alone on its node (one worker serving every stage) keeps libgomp's default spin: it
# takes no other worker's core, and its single-stream decode went from 0.94x to 1.00x of the
# in-process model's (small preset, 2 cores).
CPU_WORKER_ENV = {"GOMP_SPINCOUNT": "30000"}


class StageActor:
    """Runs inside the actor process: the stage workers of its stages (one, or a stage group's)
    and, once `serve` is called, their step loop."""

    def __init__(self, checkpoint: str, specs: list[WorkerSpec], side_by_side: int = 1):
        """`specs`: one per stage served, consecutive; `side_by_side`: how many workers of a node may
        compute at once (the step's micro-batches)."""
        if specs[0].device == "cpu" and specs[0].num_threads is None:
            # Ray caps a 0.5-CPU actor at one thread; a sequence's stages run one after another,
            # so the computing worker may take every core (idle ones sleep: CPU_WORKER_ENV), or
            # its share of them when micro-batches keep several stages busy at once
            specs = [replace(s, num_threads=max(1, len(os.sched_getaffinity(0)) // side_by_side)) for s in specs]
        self.workers = [off_main_thread(StageWorker.from_checkpoint, checkpoint, s) for s in specs]
        self.worker = self.workers[0]
        self.num_threads = specs[0].num_threads  # set by the thread that will compute (`serve`)
        self.channels: dict[str, object] = {}  # data channels by name (shared memory or torch.distributed)

    def placement(self) -> tuple[str, str]:
        """(this node's address, this worker's device: cpu, or cuda:<the GPUs Ray gave it>)."""
        device = "cpu" if self.worker.device.type != "cuda" else f"cuda:{','.join(map(str, ray.get_gpu_ids()))}"
        return ray.util.get_node_ip_address(), device

    def serve(self, worker_id: int, num_stages: int, control: Edge, results: Edge) -> None:
        """Run this worker's step loop on the coordinator's channels; it returns only if it fails
        (the coordinator watches this call to learn that the worker is gone)."""
        compute_here(self.num_threads)  # this thread runs every step
        runner = (StageRunner(self.worker, worker_id, num_stages) if len(self.workers) == 1
                  else GroupRunner(self.workers, worker_id, num_stages))
        host = ray.util.get_node_ip_address()
        control_channel = open_channel(control, is_reader=True, host=host)
        serve_forever(runner, control_channel, open_channel(results, is_reader=False, host=host), self._connect)

    def _connect(self, rewire: Rewire) -> tuple[dict, dict, dict, dict]:
        """Open the channels a `Rewire` names (this worker creates those it reads) and close the rest;
        returns (inbound, outbound, decided_in, decided_out), each peer worker id -> channel."""
        inbound, outbound = rewire.inbound + rewire.decided_in, rewire.outbound + rewire.decided_out
        wanted = {e.name for e in inbound + outbound}
        for name in [n for n in self.channels if n not in wanted]:
            self.channels.pop(name).close()
        host, device = ray.util.get_node_ip_address(), str(self.worker.device)
        for e in inbound:
            if e.name not in self.channels:
                self.channels[e.name] = open_channel(e, is_reader=True, host=host, device=device)
        for e in outbound:  # after creating every inbound one: no two workers wait on each other
            if e.name not in self.channels:
                self.channels[e.name] = open_channel(e, is_reader=False, host=host, device=device,
                                                     timeout=RESTART_TIMEOUT_S)
        return ({e.src: self.channels[e.name] for e in rewire.inbound},
                {e.dst: self.channels[e.name] for e in rewire.outbound},
                {e.src: self.channels[e.name] for e in rewire.decided_in},
                {e.dst: self.channels[e.name] for e in rewire.decided_out})

    def info(self, stage: int | None = None) -> WorkerInfo:
        """A stage's worker's (default: the first it serves)."""
        return self.worker.info() if stage is None else self.workers[stage - self.worker.stage].info()

    def location(self) -> WorkerLocation:
        node_ip, device = self.placement()
        return WorkerLocation(ray.get_runtime_context().get_node_id(), node_ip, device, os.getpid())

    def pid(self) -> int:
        return os.getpid()

    def rss_bytes(self) -> int:
        """Resident memory of this worker process (Linux /proc; 0 where unavailable)."""
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return 0


class RemoteWorker:
    """A stage worker's actor as the coordinator's placement code sees it: its stage and `info()`;
    an actor serving a stage group has one per stage, with the same `group` (its `Replica`)."""

    def __init__(self, actor, stage: int, group=None):
        self.actor, self.stage, self.group = actor, stage, group

    def info(self) -> WorkerInfo:
        return ray.get(self.actor.info.remote(self.stage))


class RayProcesses:
    """The worker processes behind `ChannelTransport`: start a worker's step loop, tell which
    loops ended (the actor died), wait for Ray to restart one, kill one that is stuck."""

    def __init__(self):
        self.workers: dict[int, RemoteWorker] = {}
        self.serving: dict[int, object] = {}  # worker id -> its `serve` call, pending while it lives
        self.pids: dict[int, int] = {}  # worker id -> the process its loop runs in
        self.placements: dict[int, tuple[str, str]] = {}  # worker id -> (node address, device)

    def register(self, worker_id: int, worker: RemoteWorker) -> None:
        self.workers[worker_id] = worker

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def locate(self, worker_id: int) -> None:
        """Learn where a (new or restarted) worker runs: its process, node and device."""
        actor = self.workers[worker_id].actor
        self.pids[worker_id], self.placements[worker_id] = ray.get([actor.pid.remote(), actor.placement.remote()])

    def placement(self, worker_id: int) -> tuple[str, str]:
        return self.placements[worker_id]

    def start(self, worker_id: int, num_stages: int, control: Edge, results: Edge) -> None:
        self.serving[worker_id] = self.workers[worker_id].actor.serve.remote(worker_id, num_stages, control, results)

    def dead(self, worker_ids: list[int]) -> list[int]:
        refs = {self.serving[w]: w for w in worker_ids if w in self.serving}
        ended, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0) if refs else ([], [])
        return [refs[ref] for ref in ended]

    def why(self, worker_id: int) -> str:
        """Why a worker's loop is not running: its error if it ended, else that it is still starting."""
        ref = self.serving.get(worker_id)
        if ref is None or not ray.wait([ref], timeout=0)[0]:
            return "its loop has not started (the actor may still be waiting for resources)"
        try:
            ray.get(ref)
        except Exception as exc:  # the actor's own error, or Ray's word that it died
            return f"{type(exc).__name__}: {exc}"
        return "its loop returned"

    def wait_restarted(self, worker_id: int) -> bool:
        """Block while Ray restarts the actor (it reloads its slice); False if it stays dead."""
        self.serving.pop(worker_id, None)
        actor = self.workers[worker_id].actor
        deadline = time.monotonic() + RESTART_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                if ray.get(actor.pid.remote(), timeout=max(deadline - time.monotonic(), 0.1)) != self.pids[worker_id]:
                    return True
                time.sleep(0.05)  # the old process still answers (a kill takes a moment)
            except ray.exceptions.ActorUnavailableError:
                time.sleep(0.2)  # restarting
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                return False
        return False

    def kill(self, worker_id: int) -> None:
        ray.kill(self.workers[worker_id].actor, no_restart=False)

    def forget(self, worker_id: int) -> None:
        self.workers.pop(worker_id, None)
        self.serving.pop(worker_id, None)


def _bundle(p: StagePlacement) -> dict[str, float]:
    """A worker's resources: CPUs, GPUs, custom ones, and its accelerator type as Ray spells it."""
    bundle = {"CPU": p.num_cpus, "GPU": p.num_gpus, **dict(p.resources)}
    if p.accelerator_type:
        bundle[f"accelerator_type:{p.accelerator_type}"] = ACCELERATOR_SHARE
    return {k: v for k, v in bundle.items() if v > 0} or {"CPU": 0.01}


def _reserve(placements: list[StagePlacement], strategy: str, timeout: float = PLACEMENT_TIMEOUT_S):
    """A ready placement group, one bundle per placement (with its node labels), or a RuntimeError
    saying what did not fit."""
    bundles = [_bundle(p) for p in placements]
    selectors = [dict(p.label_selector) for p in placements]
    group = placement_group(bundles, strategy=strategy,
                            bundle_label_selector=selectors if any(selectors) else None)
    try:
        ray.get(group.ready(), timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        labels = f" on nodes labelled {selectors}" if any(selectors) else ""
        raise RuntimeError(
            f"Ray could not place the stage workers within {timeout:g}s: bundles "
            f"{bundles}{labels} do not fit the cluster's resources {ray.cluster_resources()}"
        ) from None
    return group


@dataclass
class Replica:
    """One stage worker's actor and the placement-group bundle it runs in."""

    actor: object
    group: object  # the placement group: the launch one, or one made for this replica
    bundle_index: int
    own_group: bool  # made when the stage scaled up; removed with the replica


class RayCluster:
    """The Ray backend of `PoEModel`: each stage worker in a Ray actor, placed by the serving
    config; replicas started and stopped by `scale_stage`; every actor and placement group
    released by `close`."""

    scalable = True

    def __init__(self, serving: ServingConfig, checkpoint: str, num_stages: int, dtype: str | None, owns_ray: bool,
                 group, replicas: list[list[Replica]], transport: ChannelTransport):
        self.serving_config, self.checkpoint, self.num_stages, self.dtype = serving, checkpoint, num_stages, dtype
        self.owns_ray = owns_ray  # this process started Ray, so `close` stops it
        self.placement_group, self.replicas = group, replicas  # stage -> its replicas, engine order
        self.groups = serving.worker_groups(num_stages)  # (first, last) stage of each worker
        # at launch, per stage; a stage group's actor has one on each of its stages
        self.workers = [[RemoteWorker(r.actor, k, r) for r in rs] for k, rs in enumerate(replicas)]
        self.transport = transport
        self.spare_bundles: list[tuple[int, int]] = []  # (stage, bundle index) of the launch group freed by scaling down
        self._scaling = threading.Lock()

    @property
    def actors(self) -> list:
        """Every replica's actor, stage by stage (with one replica per stage, actors[k] is stage k's;
        a stage group's actor is on each of its stages)."""
        return [r.actor for rs in self.replicas for r in rs]

    def group_of(self, stage: int) -> tuple[int, int]:
        """The (first, last) stages of the workers serving `stage`."""
        return next(g for g in self.groups if g[0] <= stage <= g[1])

    def scale_stage(self, model, stage: int, replicas: int) -> None:
        """Serve `stage` with `replicas` workers from now on (`PoEModel.scale_stage`, arguments
        checked); a stage group's workers serve all its stages, so it scales with them."""
        first, last = self.group_of(stage)
        with self._scaling:
            serving = {id(w.actor) for w in model.engine.stages[first].workers}
            current = [r for r in self.replicas[first] if id(r.actor) in serving]
            self._check_room(first, replicas - len(current))
            while len(current) < replicas:
                replica = self._start_replica(first)
                members = [RemoteWorker(replica.actor, k, replica) for k in range(first, last + 1)]
                model.loop.call_in_loop(partial(model.engine.add_replica, first, members))
                current.append(replica)
            while len(current) > replicas:
                worker = model.loop.call_in_loop(partial(model.engine.remove_replica, first))
                replica = next(r for r in current if r.actor is worker.actor)
                current.remove(replica)
                self._stop_replica(first, replica)
            for k in range(first, last + 1):
                self.replicas[k] = list(current)

    def _check_room(self, stage: int, more: int) -> None:
        """Refuse at once a count the cluster's resources can never hold (rather than wait for
        placement groups that cannot be placed), unless Ray adds nodes on demand (cluster_autoscaling)."""
        if more <= 0 or self.serving_config.cluster_autoscaling:
            return
        bundle, total = _bundle(self.serving_config.placement(stage)), ray.cluster_resources()
        held = {key: sum(_bundle(self.serving_config.placement(first)).get(key, 0) * len(self.replicas[first])
                         for first, _ in self.groups) for key in bundle}
        for key, amount in bundle.items():
            if held[key] + more * amount > total.get(key, 0) + 1e-9:
                room = int((total.get(key, 0) - held[key]) // amount) if amount else more
                raise ValueError(
                    f"replicas: stage {stage} needs {amount:g} {key} per worker; the cluster has "
                    f"{total.get(key, 0):g} {key} and its workers hold {held[key]:g}, room for {max(room, 0)} more; "
                    f"allowed: at most {len(self.replicas[stage]) + max(room, 0)} replicas")

    def _start_replica(self, stage: int) -> Replica:
        """A new replica whose slice is loaded (outside the engine loop), in a spare launch bundle if any."""
        spare = next((b for b in self.spare_bundles if b[0] == stage), None)
        if spare is not None:
            self.spare_bundles.remove(spare)
            group, index, own = self.placement_group, spare[1], False
        else:
            timeout = NODE_START_TIMEOUT_S if self.serving_config.cluster_autoscaling else PLACEMENT_TIMEOUT_S
            group, index, own = _reserve([self.serving_config.placement(stage)], "PACK", timeout), 0, True
        replica = Replica(_start_actor(self.checkpoint, self.serving_config, self.num_stages, self.dtype,
                                       self.group_of(stage), group, index), group, index, own)
        try:
            ray.get(replica.actor.pid.remote())
        except ray.exceptions.RayActorError as exc:
            self._stop_replica(stage, replica)
            raise RuntimeError(f"a stage {stage} worker failed to start: {exc}") from None
        return replica

    def _stop_replica(self, stage: int, replica: Replica) -> None:
        ray.kill(replica.actor)
        if replica.own_group:
            remove_placement_group(replica.group)
        else:
            self.spare_bundles.append((stage, replica.bundle_index))

    def busy_seconds(self, workers: list) -> list[float]:
        """One round of calls to the workers, answered within SIGNALS_TIMEOUT_S: a worker that Ray is
        restarting would otherwise hold up a metrics scrape or the autoscaler until it is back."""
        infos = ray.get([w.actor.info.remote(w.stage) for w in workers], timeout=SIGNALS_TIMEOUT_S)
        return [info.busy_s for info in infos]

    def locations(self, workers: list) -> list[WorkerLocation]:
        return ray.get([w.actor.location.remote() for w in workers], timeout=SIGNALS_TIMEOUT_S)

    def worker_rss(self) -> list[int]:
        """Resident bytes of each worker's process, stage by stage."""
        return ray.get([a.rss_bytes.remote() for a in self.actors])

    def close(self) -> None:
        """Kill every actor and remove the placement groups (after the model stopped its engine loop)."""
        replicas = list({id(r): r for rs in self.replicas for r in rs}.values())  # a group's once
        for replica in replicas:
            ray.kill(replica.actor)
        self.transport.close()
        for replica in (r for r in replicas if r.own_group):
            remove_placement_group(replica.group)
        remove_placement_group(self.placement_group)
        if self.owns_ray:
            ray.shutdown()


def launch(model_class, checkpoint: str | Path, config: str | Path | ServingConfig | None = None, dtype=None,
           address: str | None = None):
    """`PoEModel.on_ray`: start (or join, with `address`) a Ray cluster, place each stage's
    replicas, and return the model over them."""
    serving = config if isinstance(config, ServingConfig) else load_serving_config(config)
    checkpoint = str(Path(checkpoint).resolve())
    model_config = load_config(checkpoint)
    serving.check_num_stages(model_config.num_stages)
    owns_ray = not ray.is_initialized()
    if owns_ray:
        check_reachable(address)
        ray.init(address=address or "local", include_dashboard=False, logging_level="WARNING",
                 log_to_driver=False, configure_logging=True)
    group, replicas, transport = None, [[] for _ in range(model_config.num_stages)], None
    try:
        groups = serving.worker_groups(model_config.num_stages)
        bundle_groups = [g for g in groups for _ in range(serving.placement(g[0]).replicas)]
        group = _reserve([serving.placement(g[0]) for g in bundle_groups], serving.placement_strategy)
        dtype = str(dtype).removeprefix("torch.") if dtype is not None else None
        for i, (first, last) in enumerate(bundle_groups):  # one bundle per replica, worker by worker
            replica = Replica(_start_actor(checkpoint, serving, model_config.num_stages, dtype, (first, last), group,
                                           i), group, i, False)
            for k in range(first, last + 1):
                replicas[k].append(replica)
        transport = ChannelTransport(RayProcesses(), serving.step_timeout_s, _data_slot_bytes(model_config, serving),
                                     serving.transport)
        cluster = RayCluster(serving, checkpoint, model_config.num_stages, dtype, owns_ray, group, replicas, transport)
        scaled = {first: serving.placement(first).autoscaling for first, _ in groups  # a worker's, by its first stage
                  if serving.placement(first).autoscaling is not None}
        return model_class(model_config, cluster, serving.engine, scaled, checkpoint=Path(checkpoint))
    except BaseException as exc:  # a worker that failed to start, or an interrupt: release what started
        if transport is not None:
            transport.close()
        for r in {id(r): r for rs in replicas for r in rs}.values():
            ray.kill(r.actor)
        if group is not None:
            remove_placement_group(group)
        if owns_ray:
            ray.shutdown()
        if isinstance(exc, (ray.exceptions.RayActorError, RuntimeError)):
            raise RuntimeError(f"a stage worker failed to start: {exc}") from None
        raise


def check_reachable(address: str | None, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """A ValueError, within `timeout`, when `address` (HOST:PORT of a Ray head's GCS) does not accept
    a connection: Ray itself would retry for minutes. None, "auto", "local" and ray:// go to Ray."""
    import socket

    if not address or address in ("auto", "local") or "://" in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        raise ValueError(f"no Ray cluster answers at {address} (--address or RAY_ADDRESS): {reason}; allowed: "
                         "the HOST:PORT of a running Ray head (`ray start --head` prints it), or unset to "
                         "start a local Ray") from None


def _start_actor(checkpoint: str, serving: ServingConfig, num_stages: int, dtype: str | None,
                 stages: tuple[int, int], group, bundle_index: int):
    """An actor serving stages first..last; a `memory_fraction` is shared by them as their layers are."""
    p, (first, last) = serving.placement(stages[0]), stages
    layers = load_config(checkpoint).poe_stage_layout[first : last + 1]
    share = [n / sum(layers) for n in layers]
    groups = serving.worker_groups(num_stages)
    alone = len(groups) == 1 and p.replicas == 1 and p.autoscaling is None  # the only worker: every step on every core
    return ray.remote(StageActor).options(
        num_cpus=p.num_cpus, num_gpus=p.num_gpus, max_restarts=serving.max_worker_restarts,
        max_concurrency=ACTOR_THREADS,
        runtime_env={"env_vars": CPU_WORKER_ENV} if p.device == "cpu" and not alone else None,
        scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=bundle_index),
    ).remote(checkpoint, [WorkerSpec(stage=k, device=p.device, dtype=dtype or p.dtype,
                                     kv_cache_tokens=p.kv_cache_tokens, num_threads=p.num_threads,
                                     memory_fraction=None if p.memory_fraction is None else p.memory_fraction * part,
                                     cuda_graphs=p.cuda_graphs, shares_cores=not alone)
                        for k, part in zip(range(first, last + 1), share)],
             min(serving.engine.pipeline_micro_batches, num_stages))


def _data_slot_bytes(config, serving: ServingConfig) -> int:
    """A data channel slot holds a decode step's boundary message for the whole batch (x, x0, the
    backout residual and a Log-OP sum per sequence); prompt chunks larger than that spill."""
    per_sequence = 3 * config.n_embd * 4 + config.vocab_size * 4 + 64
    return min(64 << 20, max(1 << 20, serving.engine.max_num_seqs * per_sequence + (64 << 10)))
