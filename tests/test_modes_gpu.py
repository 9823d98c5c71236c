"""The mode suite of tests/test_modes.py on a CUDA device, against the same full-recompute oracle.

Skipped without a GPU (scripts/gpu-check.sh runs it where one is lent). Workers serve fp32 here,
so tokens must match the fp32 oracle exactly (ties aside, as on the CPU); decode steps go
through the CUDA graphs of the bucketed decode step (stage_workers/decode_graphs.py).
"""

from __future__ import annotations

import pytest
import torch

from oracle import Oracle
from test_modes import (test_calibrate_wand_matches_the_oracle, test_eos_stops_a_row_and_pads_it,  # noqa: F401
                        test_forward_and_forward_stage_match_the_oracle, test_full_greedy_batch_rows_are_independent_and_exact,
                        test_prefix_and_single_stage, test_sampling_matches_the_oracle_and_is_seeded,
                        test_speculative_equals_full_greedy, test_wand_exits_and_stages_used_match_the_oracle,
                        test_weighted_composition)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu-check.sh)")


@pytest.fixture(scope="module", params=["tiny", "wide", "alpha"])
def served(request, checkpoint_dirs):
    from coordinator import PoEModel

    directory = checkpoint_dirs(request.param)
    model = PoEModel.from_pretrained(directory, device="cuda", dtype="float32")
    assert all(w.decode_graphs is not None for w in model.workers), "CUDA workers capture their decode steps"
    yield model, Oracle(directory)
    model.loop.stop()
