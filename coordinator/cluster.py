"""`PoECluster`: the same surface as `PoEModel`, with each stage worker in its own Ray actor.

This is the only module that knows Ray. `StageActor` is a thin shim over `StageWorker` that
loads only its stage's slice in the actor's process; `RemoteWorker` gives the coordinator the
worker interface over an actor handle. The engine, pipeline and modes are the in-process ones.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from stage_workers.config import load_config
from stage_workers.messages import ExtendBatch, ExtendResult, TrunkState, WorkerInfo, WorkerLost
from stage_workers.worker import StageWorker, WorkerSpec

from .engine import EngineConfig
from .model import PoEModel
from .serving_config import ServingConfig, StagePlacement, load_serving_config

PLACEMENT_TIMEOUT_S = 120
RESTART_TIMEOUT_S = 120  # a lost worker must be back (slice reloaded) within this


class StageActor:
    """Runs inside the actor process; results go back on the CPU."""

    def __init__(self, checkpoint: str, spec: WorkerSpec):
        self.worker = StageWorker.from_checkpoint(checkpoint, spec)

    def extend(self, batch: ExtendBatch) -> ExtendResult:
        result = self.worker.extend(batch)
        trunk = None if result.trunk is None else result.trunk.to("cpu", result.trunk.x.dtype)
        logits = None if result.logits is None else result.logits.cpu()
        return ExtendResult(trunk=trunk, logits=logits)

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
        try:
            return ray.get(self.actor.extend.remote(batch))
        except LOST as exc:
            back = self._wait_until_restarted()
            raise WorkerLost(self.stage, f"{type(exc).__name__}; {'restarted' if back else 'not restarted'}") from exc

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


class PoECluster(PoEModel):
    @classmethod
    def launch(cls, checkpoint: str | Path, config: str | Path | ServingConfig | None = None, dtype=None,
               address: str | None = None) -> "PoECluster":
        """Start (or join, with `address`) a Ray cluster and place one worker per stage."""
        serving = config if isinstance(config, ServingConfig) else load_serving_config(config)
        checkpoint = str(Path(checkpoint).resolve())
        model_config = load_config(checkpoint)
        serving.check_num_stages(model_config.num_stages)
        owns_ray = not ray.is_initialized()
        if owns_ray:
            ray.init(address=address, include_dashboard=False, logging_level="WARNING",
                     log_to_driver=False, configure_logging=True)
        placements = [serving.placement(k) for k in range(model_config.num_stages)]
        group = placement_group([_bundle(p) for p in placements], strategy=serving.placement_strategy)
        try:
            ray.get(group.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(group)
            raise RuntimeError(
                f"Ray could not place the stage workers within {PLACEMENT_TIMEOUT_S}s: bundles "
                f"{[_bundle(p) for p in placements]} do not fit the cluster's resources {ray.cluster_resources()}"
            ) from None
        dtype = str(dtype).removeprefix("torch.") if dtype is not None else None
        actors = [
            ray.remote(StageActor).options(
                num_cpus=p.num_cpus, num_gpus=p.num_gpus, max_restarts=serving.max_worker_restarts,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=k),
            ).remote(checkpoint, WorkerSpec(stage=k, device=p.device, dtype=dtype or p.dtype,
                                            kv_cache_tokens=p.kv_cache_tokens, num_threads=p.num_threads))
            for k, p in enumerate(placements)
        ]
        workers = [RemoteWorker(a, k) for k, a in enumerate(actors)]
        try:
            model = cls(model_config, workers, EngineConfig(max_num_seqs=serving.max_num_seqs,
                                                            max_recoveries=serving.max_worker_restarts))
        except ray.exceptions.RayActorError as exc:
            for a in actors:
                ray.kill(a)
            remove_placement_group(group)
            raise RuntimeError(f"a stage worker failed to start: {exc}") from None
        model.serving_config, model.placement_group, model.actors, model.owns_ray = serving, group, actors, owns_ray
        return model

    def worker_rss(self) -> list[int]:
        """Resident bytes of each stage worker's process, in stage order."""
        return ray.get([a.rss_bytes.remote() for a in self.actors])

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        remove_placement_group(self.placement_group)
        if self.owns_ray:
            ray.shutdown()

    def __enter__(self) -> "PoECluster":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
