"""The mode suite (tests/mode_suite.py) on the CPU, on the in-process model and on Ray.

Each case is (backend, checkpoint variant); every test of the suite runs on each.
"""

from __future__ import annotations

import pytest
from mode_suite import *  # noqa: F403  (the suite's tests, run on this module's `served`)
from oracle import Oracle

# (backend, checkpoint variant); "groups" backends lay the stages out in stage groups
CASES = [("local", "tiny"), ("local", "wide"), ("local", "alpha"), ("local", "bf16"), ("ray", "tiny"),
         ("local-groups [0-3]", "tiny"), ("local-groups [0][1-3]", "tiny"), ("ray-groups [0-1][2-3]", "tiny"),
         ("ray-groups [0-3]", "tiny")]


@pytest.fixture(scope="module", params=CASES, ids=[f"{b}-{v}" for b, v in CASES])
def served(request, checkpoint_dirs):
    """(model, oracle) for one case; Ray cases share the session's Ray instance."""
    from coordinator import PoEModel
    from coordinator.serving_config import ServingConfig

    backend, variant = request.param
    directory = checkpoint_dirs(variant)
    if backend == "local":
        model = PoEModel.from_pretrained(directory)
    elif backend.startswith("local-groups"):
        model = grouped_in_process(directory, [(0, 3)] if backend.endswith("[0-3]") else [(0, 0), (1, 3)])
    else:
        request.getfixturevalue("ray_session")
        groups = {"ray": (), "ray-groups [0-1][2-3]": ((0, 1), (2, 3)), "ray-groups [0-3]": ((0, 3),)}[backend]
        model = PoEModel.on_ray(directory, config=ServingConfig(groups=groups))
    with model:
        yield model, Oracle(directory)


def grouped_in_process(directory, groups):
    """An in-process model whose stages run as stage groups (GroupRunners over in-memory channels)."""
    from coordinator import PoEModel
    from coordinator.model import InProcessWorkers
    from stage_workers.config import load_config
    from stage_workers.stage_group import StageGroup
    from stage_workers.worker import StageWorker, WorkerSpec

    config = load_config(directory)
    members = [m for first, last in groups for m in StageGroup(
        [StageWorker.from_checkpoint(directory, WorkerSpec(stage=k)) for k in range(first, last + 1)]).members()]
    return PoEModel(config, InProcessWorkers(members), checkpoint=directory)
