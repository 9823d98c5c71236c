"""The mode suite (tests/mode_suite.py) on a CUDA device, against the same full-recompute oracle.

Skipped without a GPU (scripts/gpu-check.sh runs it where one is lent). Workers serve fp32 here,
so tokens must match the fp32 oracle exactly (ties aside, as on the CPU); decode steps go
through the CUDA graphs of the bucketed decode step (stage_workers/decode_graphs.py).
"""

from __future__ import annotations

import pytest
import torch
from mode_suite import *  # noqa: F403  (the suite's tests, run on this module's `served`)
from oracle import Oracle

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu-check.sh)")


@pytest.fixture(scope="module", params=["tiny", "wide", "alpha"])
def served(request, checkpoint_dirs):
    from coordinator import PoEModel

    directory = checkpoint_dirs(request.param)
    with PoEModel.from_pretrained(directory, device="cuda", dtype="float32") as model:
        assert all(w.decode_graphs is not None for w in model.workers), "CUDA workers capture their decode steps"
        yield model, Oracle(directory)
