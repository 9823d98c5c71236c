"""Shared fixtures: random checkpoints written once per session, and models loaded from them.

Checkpoints are made by the project's writer with the `tiny` preset and overrides, so every
variant (layout, heads, dtype, name prefix, shards, short windows) runs the real loading code.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

from checkpoints.writer import init_checkpoint

# CI replays the same generated requests every run (a red CI blocks a landing); a local run
# explores new ones each time.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# The tests' own torch work (oracles, expected tokens) runs on the main thread with one thread, so
# it never owns an OpenMP team that would slow the engine loop's thread (stage_workers/compute_thread.py)
torch.set_num_threads(1)

# name -> init_checkpoint keyword arguments
VARIANTS = {
    # the default: tiny preset, fp32, short window 16 so 40-token prompts cross it
    "tiny": dict(seed=0, short_window=16),
    # another layout and head count, GQA 3:1, HF-free canonical keys, model. prefix, sharded
    "wide": dict(seed=1, n_layer=6, poe_stage_layout=[3, 1, 1, 1], n_embd=96, n_head=6, n_kv_head=2,
                 short_window=24, window_pattern="SL", name_prefix="model.", max_shard_bytes=120_000),
    # no GQA, poe_alpha != 0, three stages
    "alpha": dict(seed=2, n_layer=5, poe_stage_layout=[2, 2, 1], n_head=2, n_kv_head=2, poe_alpha=0.5,
                  short_window=12),
    # stored in bf16 (served in fp32 by default)
    "bf16": dict(seed=3, dtype="bf16", short_window=16),
}


@pytest.fixture(scope="session")
def checkpoint_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = init_checkpoint(root / name, "tiny", **VARIANTS[name])
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tiny_dir(checkpoint_dirs):
    return checkpoint_dirs("tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from coordinator import PoEModel

    return PoEModel.from_pretrained(tiny_dir)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session; clusters join it and leave it running."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield ray
    ray.shutdown()
