"""The stage worker's contract checks are errors, not asserts: they hold under `python -O`, and a
message that breaks the contract fails its step without corrupting the worker."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stage_workers.messages import ContractError, ExtendBatch, Segment
from stage_workers.worker import StageWorker, WorkerSpec

BROKEN = {
    "no segments": lambda w: ExtendBatch([], torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)),
    "a gap": lambda w: ExtendBatch([Segment(0, 3, 1)], torch.tensor([5]), torch.tensor([1])),
    "a sequence twice": lambda w: ExtendBatch([Segment(0, 0, 1), Segment(0, 0, 1)], torch.tensor([5, 6]),
                                              torch.tensor([-1, -1])),
    "more logit rows than positions": lambda w: ExtendBatch([Segment(0, 0, 1, 2)], torch.tensor([5]), torch.tensor([-1])),
    "past the context": lambda w: ExtendBatch([Segment(0, 0, w.config.sequence_len + 1)],
                                              torch.zeros(w.config.sequence_len + 1, dtype=torch.long),
                                              torch.tensor([-1])),
}


@pytest.mark.parametrize("case", BROKEN)
def test_a_batch_that_breaks_the_contract_is_refused_and_changes_nothing(tiny_dir, case):
    worker = StageWorker.from_checkpoint(tiny_dir, WorkerSpec(stage=0))
    free = worker.cache.num_free_blocks
    with pytest.raises(ContractError, match="stage 0 worker"):
        worker.extend(BROKEN[case](worker))
    assert worker.cache.num_free_blocks == free and worker.cache.length(0) == 0
    worker.extend(ExtendBatch([Segment(0, 0, 2, 1)], torch.tensor([5, 6]), torch.tensor([-1])))  # still serves


def test_the_checks_hold_under_python_dash_O(tiny_dir):
    script = (
        "import torch\n"
        "from stage_workers.messages import ContractError, ExtendBatch, Segment\n"
        "from stage_workers.worker import StageWorker, WorkerSpec\n"
        "assert False, 'asserts are off under -O: this line does nothing'\n"
        f"w = StageWorker.from_checkpoint({str(tiny_dir)!r}, WorkerSpec(stage=0))\n"
        "try:\n"
        "    w.extend(ExtendBatch([Segment(0, 3, 1)], torch.tensor([5]), torch.tensor([1])))\n"
        "except ContractError as exc:\n"
        "    print('refused:', exc)\n"
    )
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-O", "-c", script], capture_output=True, text=True, cwd=root, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "refused: stage 0 worker: sequence 0 extends at 3 but has 0 cached" in out.stdout


def test_kept_blocks_outlive_their_sequence_and_are_shared_until_evicted():
    from stage_workers.kv_cache import PagedKVCache

    cache = PagedKVCache(num_layers=1, num_blocks=4, block_size=2, n_kv_head=1, head_dim=2, dtype=torch.float32,
                         device="cpu")
    cache.reserve(0, 5)  # 3 blocks
    first, second = cache.block_tables[0][:2]
    cache.keep(100, 0, 0)
    cache.keep(101, 0, 1)
    cache.keep(101, 0, 1)  # kept again (a plan sent twice): no second reference
    cache.free(0)
    assert cache.num_free_blocks == 2, "the kept blocks stay"
    cache.share(1, [100, 101])
    assert cache.block_tables[1] == [first, second] and cache.length(1) == 4
    cache.reserve(1, 6)
    cache.evict(100)
    assert cache.num_free_blocks == 1, "sequence 1 still reads block 100"
    cache.truncate(1, 4)
    cache.free(1)
    assert cache.num_free_blocks == 3 and cache.kept == {101: second}
    cache.evict(101)
    cache.evict(101)  # evicting what is not kept does nothing
    assert cache.num_free_blocks == 4
