"""`PoECluster`: the same surface as `PoEModel`, with each stage worker in its own Ray actor.

This is the only module that knows Ray. `StageActor` is a thin shim over `StageWorker` that
loads only its stage's slice in the actor's process; `RemoteWorker` gives the coordinator the
worker interface over an actor handle. A stage may run several replicas (`replicas` in the
serving config) and `scale_stage` changes that count while requests run. The engine,
pipeline, replica routing and modes are the in-process ones.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from stage_workers.config import load_config
from stage_workers.messages import ExtendBatch, ExtendResult, TrunkState, WorkerInfo, WorkerLost
from stage_workers.transfer import to_host
from stage_workers.worker import StageWorker, WorkerSpec

from . import requests as rq
from .engine import EngineConfig
from .model import PoEModel
from .serving_config import ServingConfig, StagePlacement, load_serving_config

PLACEMENT_TIMEOUT_S = 120
RESTART_TIMEOUT_S = 120  # a lost worker must be back (slice reloaded) within this
# OpenMP threads that finished their work sleep instead of spinning, so a waiting CPU worker
# leaves the cores to the one computing (spinning workers halved single-stream decode, 24 -> 16 tok/s)
CPU_WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


class StageActor:
    """Runs inside the actor process; results go back on the CPU."""

    def __init__(self, checkpoint: str, spec: WorkerSpec):
        if spec.device == "cpu" and spec.num_threads is None:
            # Ray caps a 0.5-CPU actor at one thread; a sequence's stages run one after another,
            # so the computing worker may take every core (idle ones sleep: CPU_WORKER_ENV)
            spec = replace(spec, num_threads=len(os.sched_getaffinity(0)))
        self.worker = StageWorker.from_checkpoint(checkpoint, spec)

    def extend(self, batch: ExtendBatch) -> ExtendResult:
        result = self.worker.extend(batch)
        if result.trunk is None:
            (logits,) = to_host([result.logits])
            return ExtendResult(trunk=None, logits=logits)
        x, x0, x_backout, logits = to_host([result.trunk.x, result.trunk.x0, result.trunk.x_backout, result.logits])
        return ExtendResult(trunk=TrunkState(x, x0, x_backout), logits=logits)

    def rollback(self, seq_id: int, length: int) -> None:
        self.worker.rollback(seq_id, length)

    def free(self, seq_id: int) -> None:
        self.worker.free(seq_id)

    def info(self) -> WorkerInfo:
        return self.worker.info()

    def pid(self) -> int:
        return os.getpid()

    def rss_bytes(self) -> int:
        """Resident memory of this worker process (Linux /proc; 0 where unavailable)."""
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return 0


LOST = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


class RemoteWorker:
    """The worker interface over an actor. Rollback and free need no reply: an actor runs one
    caller's calls in order, so the next extend sees them. A dead or restarting actor surfaces
    as `WorkerLost`, which the engine answers by rebuilding the sequences' KV."""

    def __init__(self, actor, stage: int):
        self.actor, self.stage = actor, stage

    def extend(self, batch: ExtendBatch) -> ExtendResult:
        return self.submit_extend(batch)()

    def submit_extend(self, batch: ExtendBatch) -> Callable[[], ExtendResult]:
        """Start an extend and return the wait for its result, so a stage's replicas run side by side."""
        ref = self.actor.extend.remote(batch)
        return lambda: self._result(ref)

    def _result(self, ref) -> ExtendResult:
        try:
            return ray.get(ref)
        except LOST as exc:
            back = self._wait_until_restarted()
            raise WorkerLost(self.stage, f"{type(exc).__name__}; {'restarted' if back else 'not restarted'}",
                             restarted=back) from exc

    def _wait_until_restarted(self) -> bool:
        """Block while Ray restarts the actor (it reloads its slice); False if it stays dead."""
        deadline = time.monotonic() + RESTART_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                ray.get(self.actor.pid.remote(), timeout=max(deadline - time.monotonic(), 0.1))
                return True
            except ray.exceptions.ActorUnavailableError:
                time.sleep(0.2)  # restarting
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                return False
        return False

    def rollback(self, seq_id: int, length: int) -> None:
        self.actor.rollback.remote(seq_id, length)

    def free(self, seq_id: int) -> None:
        self.actor.free.remote(seq_id)

    def info(self) -> WorkerInfo:
        return ray.get(self.actor.info.remote())


def _bundle(p: StagePlacement) -> dict[str, float]:
    bundle = {"CPU": p.num_cpus, "GPU": p.num_gpus}
    return {k: v for k, v in bundle.items() if v > 0} or {"CPU": 0.01}


def _reserve(bundles: list[dict[str, float]], strategy: str):
    """A ready placement group, or a RuntimeError saying what did not fit."""
    group = placement_group(bundles, strategy=strategy)
    try:
        ray.get(group.ready(), timeout=PLACEMENT_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        raise RuntimeError(
            f"Ray could not place the stage workers within {PLACEMENT_TIMEOUT_S}s: bundles "
            f"{bundles} do not fit the cluster's resources {ray.cluster_resources()}"
        ) from None
    return group


@dataclass
class Replica:
    """One stage worker's actor and the placement-group bundle it runs in."""

    actor: object
    group: object  # the placement group: the launch one, or one made for this replica
    bundle_index: int
    own_group: bool  # made when the stage scaled up; removed with the replica


class PoECluster(PoEModel):
    @classmethod
    def launch(cls, checkpoint: str | Path, config: str | Path | ServingConfig | None = None, dtype=None,
               address: str | None = None) -> "PoECluster":
        """Start (or join, with `address`) a Ray cluster and place each stage's replicas."""
        serving = config if isinstance(config, ServingConfig) else load_serving_config(config)
        checkpoint = str(Path(checkpoint).resolve())
        model_config = load_config(checkpoint)
        serving.check_num_stages(model_config.num_stages)
        owns_ray = not ray.is_initialized()
        if owns_ray:
            ray.init(address=address, include_dashboard=False, logging_level="WARNING",
                     log_to_driver=False, configure_logging=True)
        bundle_stages = [k for k in range(model_config.num_stages) for _ in range(serving.placement(k).replicas)]
        group = _reserve([_bundle(serving.placement(k)) for k in bundle_stages], serving.placement_strategy)
        dtype = str(dtype).removeprefix("torch.") if dtype is not None else None
        replicas: list[list[Replica]] = [[] for _ in range(model_config.num_stages)]
        for i, k in enumerate(bundle_stages):  # one bundle per replica, stage by stage
            replicas[k].append(Replica(_start_actor(checkpoint, serving, dtype, k, group, i), group, i, False))
        workers = [[RemoteWorker(r.actor, k) for r in rs] for k, rs in enumerate(replicas)]
        engine_config = EngineConfig(max_num_seqs=serving.max_num_seqs, max_recoveries=serving.max_worker_restarts,
                                     max_prefill_chunk=serving.max_prefill_chunk, pipeline_micro_batches=serving.pipeline_micro_batches)
        try:
            model = cls(model_config, workers, engine_config)
        except ray.exceptions.RayActorError as exc:
            for r in (r for rs in replicas for r in rs):
                ray.kill(r.actor)
            remove_placement_group(group)
            raise RuntimeError(f"a stage worker failed to start: {exc}") from None
        model.serving_config, model.checkpoint, model.dtype, model.owns_ray = serving, checkpoint, dtype, owns_ray
        model.placement_group, model.replicas = group, replicas  # stage -> its replicas, engine order
        model.spare_bundles = []  # (stage, bundle index) of the launch group freed by scaling down
        model._scaling = threading.Lock()
        return model

    @property
    def actors(self) -> list:
        """Every worker's actor, stage by stage (with one replica per stage, actors[k] is stage k's)."""
        return [r.actor for rs in self.replicas for r in rs]

    def scale_stage(self, stage: int, replicas: int) -> None:
        """Serve `stage` with `replicas` workers from now on, while requests run. An added worker
        loads its slice before it takes new sequences; a removed one's sequences move to the
        others (their KV rebuilt from committed tokens, their tokens unchanged), then it is killed."""
        rq.check_stage(self.config, stage)
        if not isinstance(replicas, int) or replicas < 1:
            raise ValueError(f"replicas={replicas!r} is invalid; allowed: an integer >= 1")
        with self._scaling:
            current = self.replicas[stage]
            while len(current) < replicas:
                replica = self._start_replica(stage)
                worker = RemoteWorker(replica.actor, stage)
                self.loop.call_in_loop(partial(self.engine.add_replica, stage, worker))
                current.append(replica)
            while len(current) > replicas:
                worker = self.loop.call_in_loop(partial(self.engine.remove_replica, stage))
                replica = next(r for r in current if r.actor is worker.actor)
                current.remove(replica)
                self._stop_replica(stage, replica)

    def _start_replica(self, stage: int) -> Replica:
        """A new replica whose slice is loaded (outside the engine loop), in a spare launch bundle if any."""
        spare = next((b for b in self.spare_bundles if b[0] == stage), None)
        if spare is not None:
            self.spare_bundles.remove(spare)
            group, index, own = self.placement_group, spare[1], False
        else:
            group, index, own = _reserve([_bundle(self.serving_config.placement(stage))], "PACK"), 0, True
        replica = Replica(_start_actor(self.checkpoint, self.serving_config, self.dtype, stage, group, index),
                          group, index, own)
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

    def worker_rss(self) -> list[int]:
        """Resident bytes of each worker's process, stage by stage."""
        return ray.get([a.rss_bytes.remote() for a in self.actors])

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        for replica in (r for rs in self.replicas for r in rs if r.own_group):
            remove_placement_group(replica.group)
        remove_placement_group(self.placement_group)
        if self.owns_ray:
            ray.shutdown()

    def __enter__(self) -> "PoECluster":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _start_actor(checkpoint: str, serving: ServingConfig, dtype: str | None, stage: int, group, bundle_index: int):
    p = serving.placement(stage)
    return ray.remote(StageActor).options(
        num_cpus=p.num_cpus, num_gpus=p.num_gpus, max_restarts=serving.max_worker_restarts,
        runtime_env={"env_vars": CPU_WORKER_ENV} if p.device == "cpu" else None,
        scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=bundle_index),
    ).remote(checkpoint, WorkerSpec(stage=stage, device=p.device, dtype=dtype or p.dtype,
                                    kv_cache_tokens=p.kv_cache_tokens, memory_fraction=p.memory_fraction,
                                    num_threads=p.num_threads))
