"""A KV pool sized from the device's memory: the arithmetic, the worker that uses it, the errors."""

from __future__ import annotations

import pytest
import torch
from support import stage_infos

import stage_workers.worker as worker_module
from stage_workers.memory import device_memory, kv_tokens_for_memory
from stage_workers.worker import StageWorker, WorkerSpec

MiB = 2**20


def test_the_pool_takes_the_fraction_of_total_memory_left_after_the_weights():
    # 0.5 of 100 MiB = 50 MiB; minus 10 MiB of weights = 40 MiB; 64 KiB per 16-position block
    tokens = kv_tokens_for_memory(0.5, free=90 * MiB, total=100 * MiB, weight_bytes=10 * MiB,
                                  bytes_per_position=4096, block_size=16, stage=0)
    assert tokens == 40 * MiB // (4096 * 16) * 16


def test_the_pool_never_takes_more_than_is_free_now():
    tokens = kv_tokens_for_memory(1.0, free=8 * MiB, total=100 * MiB, weight_bytes=10 * MiB,
                                  bytes_per_position=4096, block_size=16, stage=0)
    assert tokens == 8 * MiB // (4096 * 16) * 16


def test_a_fraction_smaller_than_the_weights_is_an_error_naming_the_stage_and_the_sizes():
    with pytest.raises(ValueError, match=r"stage 2: memory_fraction=0.05 of .* after 10 MiB of weights") as info:
        kv_tokens_for_memory(0.05, free=90 * MiB, total=100 * MiB, weight_bytes=10 * MiB,
                             bytes_per_position=4096, block_size=16, stage=2)
    assert "Allowed: a larger memory_fraction, or kv_cache_tokens" in str(info.value)


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5, True, "half"])
def test_a_fraction_outside_zero_to_one_is_refused(fraction):
    with pytest.raises(ValueError, match="allowed: a number in \\(0, 1\\]"):
        kv_tokens_for_memory(fraction, free=MiB, total=MiB, weight_bytes=0, bytes_per_position=1, block_size=1, stage=0)


def test_host_memory_is_read_from_proc_meminfo():
    free, total = device_memory(torch.device("cpu"))
    assert 0 < free <= total


def test_a_worker_with_memory_fraction_sizes_its_cache_from_the_device(tiny_dir, monkeypatch):
    monkeypatch.setattr(worker_module, "device_memory", lambda device: (64 * MiB, 100 * MiB))
    worker = StageWorker.from_checkpoint(tiny_dir, WorkerSpec(stage=1, memory_fraction=0.25))
    weights = sum(p.nbytes for p in worker.slice.parameters())
    per_block = worker.cache.nbytes // (worker.cache.num_blocks + 1)  # + the scratch block of padding rows
    assert worker.cache.num_blocks + 1 == (25 * MiB - weights) // per_block
    assert worker.info().resident_bytes <= 25 * MiB < worker.info().resident_bytes + per_block


def test_kv_cache_tokens_wins_and_the_default_stays_without_a_fraction(tiny_dir):
    fixed = StageWorker.from_checkpoint(tiny_dir, WorkerSpec(stage=0, kv_cache_tokens=64))
    default = StageWorker.from_checkpoint(tiny_dir, WorkerSpec(stage=0))
    assert fixed.cache.num_blocks * fixed.cache.block_size == 64
    assert default.cache.num_blocks * default.cache.block_size == 8 * default.config.sequence_len


def test_a_model_sized_from_host_memory_serves_the_same_tokens(tiny_dir, tiny_model):
    from coordinator import PoEModel

    free, total = device_memory(torch.device("cpu"))
    fraction = 32 * MiB / total  # a few MiB of KV per worker after the tiny weights
    sized = PoEModel.from_pretrained(tiny_dir, memory_fraction=fraction)
    ids = torch.randint(0, sized.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    assert torch.equal(sized.generate(ids, max_new_tokens=8), tiny_model.generate(ids, max_new_tokens=8))
    blocks = [info.kv_num_blocks for info in stage_infos(sized)]
    assert blocks != [info.kv_num_blocks for info in stage_infos(tiny_model)] and min(blocks) > 0
