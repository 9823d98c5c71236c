"""How the Ray backend starts its CPU stage workers in their Ray processes."""

from __future__ import annotations

import os
import time
from dataclasses import replace

import pytest
import ray
import torch

from coordinator import PoEModel
from coordinator.core.engine import EngineConfig
from coordinator.serving_config import ServingConfig, load_serving_config

# CPU seconds an idle worker may use in a second: Ray's own threads take up to 0.02; OpenMP teams left
# spinning (OMP_WAIT_POLICY=active) took 0.24-0.33 in the busiest worker on 2 cores
IDLE_CPU_S = 0.1


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, all its threads, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


@pytest.mark.parametrize("config, spin", [(ServingConfig(), "30000"), (None, None)], ids=["per-stage", "default"])
def test_cpu_workers_compute_on_every_core_and_sleep_soon_when_idle(ray_session, tiny_dir, config, spin):
    """Ray would give a 0.5-CPU actor one thread; a sequence's stages compute one at a time, so
    each worker takes every core, and waiting workers' OpenMP threads spin only briefly on them:
    once a generation is done, the workers' processes use (almost) no CPU. The default config's
    one worker, alone on the node, keeps libgomp's own spin."""
    probe = lambda actor: (torch.get_num_threads(), os.environ.get("GOMP_SPINCOUNT"))  # noqa: E731 (a lambda travels by value)
    ids = torch.randint(0, 500, (2, 120), generator=torch.Generator().manual_seed(0))  # prompt steps on every thread
    with PoEModel.on_ray(tiny_dir, config=config) as cluster:
        actors = list({id(a): a for a in cluster.backend.actors}.values())
        seen = ray.get([a.__ray_call__.remote(probe) for a in actors])
        pids = ray.get([a.pid.remote() for a in actors])
        cluster.generate(ids, 8)
        before = [cpu_seconds(pid) for pid in pids]
        time.sleep(1.0)
        idle = [cpu_seconds(pid) - b for pid, b in zip(pids, before)]
    assert seen == [(len(os.sched_getaffinity(0)), spin)] * (4 if config else 1)
    assert max(idle) < IDLE_CPU_S, f"CPU seconds each worker used in the second after a generation: {idle}"


def test_with_micro_batches_cpu_workers_share_the_cores(ray_session, tiny_dir, tiny_model):
    """Two micro-batches keep two stages computing at once: each worker takes half the cores (at
    least one), not all of them, which would put twice as many OpenMP threads as cores to work
    (16 gRPC streams on small, 2 cores: 66-72 tok/s against 328-346 with one micro-batch)."""
    serving = replace(load_serving_config(None), engine=EngineConfig(pipeline_micro_batches=2))
    with PoEModel.on_ray(tiny_dir, config=serving) as cluster:
        seen = ray.get([a.__ray_call__.remote(lambda actor: actor.num_threads) for a in cluster.backend.actors])
        ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
        assert torch.equal(torch.as_tensor(cluster.generate(ids, 6)), torch.as_tensor(tiny_model.generate(ids, 6)))
    assert seen == [max(1, len(os.sched_getaffinity(0)) // 2)] * 4
