"""How `PoECluster` starts its CPU stage workers in their Ray processes."""

from __future__ import annotations

import os

import ray
import torch

from coordinator.cluster import PoECluster


def test_cpu_workers_compute_on_every_core_and_sleep_soon_when_idle(ray_session, tiny_dir):
    """Ray would give a 0.5-CPU actor one thread; a sequence's stages compute one at a time, so
    each worker takes every core, and waiting workers' OpenMP threads spin only briefly on them."""
    probe = lambda actor: (torch.get_num_threads(), os.environ.get("GOMP_SPINCOUNT"))  # noqa: E731 (a lambda travels by value)
    with PoECluster.launch(tiny_dir) as cluster:
        seen = ray.get([a.__ray_call__.remote(probe) for a in cluster.actors])
    assert seen == [(len(os.sched_getaffinity(0)), "30000")] * 4
