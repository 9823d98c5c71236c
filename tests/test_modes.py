"""The mode suite (tests/mode_suite.py) on the CPU, on the in-process model and on Ray.

Each case is (backend, checkpoint variant); every test of the suite runs on each.
"""

from __future__ import annotations

import pytest
from mode_suite import *  # noqa: F403  (the suite's tests, run on this module's `served`)
from oracle import Oracle

CASES = [("local", "tiny"), ("local", "wide"), ("local", "alpha"), ("local", "bf16"), ("ray", "tiny")]


@pytest.fixture(scope="module", params=CASES, ids=[f"{b}-{v}" for b, v in CASES])
def served(request, checkpoint_dirs):
    """(model, oracle) for one case; Ray cases share the session's Ray instance."""
    from coordinator import PoEModel

    backend, variant = request.param
    directory = checkpoint_dirs(variant)
    if backend == "local":
        model = PoEModel.from_pretrained(directory)
    else:
        request.getfixturevalue("ray_session")
        model = PoEModel.on_ray(directory)
    with model:
        yield model, Oracle(directory)
