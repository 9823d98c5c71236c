"""Where a worker's torch work runs (stage_workers/compute_thread.py): loading happens on a
thread of its own, so the main thread never owns an OpenMP team, and what it returns or raises
reaches the caller."""

from __future__ import annotations

import threading

import pytest
import torch

from stage_workers.compute_thread import PARALLEL_MIN_MACS, compute_here, off_main_thread, step_threads
from stage_workers.messages import ExtendBatch, Segment
from stage_workers.worker import StageWorker, WorkerSpec


def test_off_main_thread_runs_elsewhere_and_hands_back_the_result_or_the_error():
    ran_on = off_main_thread(lambda x, y=0: (threading.current_thread(), x + y), 2, y=3)
    assert ran_on[0] is not threading.current_thread() and not ran_on[0].is_alive() and ran_on[1] == 5
    with pytest.raises(FileNotFoundError, match="nowhere"):
        off_main_thread(open, "/nowhere/at/all")


def test_a_worker_loaded_off_the_main_thread_serves_like_one_loaded_on_it(tiny_dir, tiny_model):
    spec = WorkerSpec(stage=0)
    worker = off_main_thread(StageWorker.from_checkpoint, tiny_dir, spec)
    here = StageWorker.from_checkpoint(tiny_dir, spec)
    for a, b in zip(worker.slice.parameters(), here.slice.parameters()):
        assert torch.equal(a, b)


def test_compute_here_sets_the_calling_threads_count_and_none_leaves_it_alone():
    def counts():
        torch.set_num_threads(3)
        compute_here(None)
        left_alone = torch.get_num_threads()
        compute_here(1)
        return left_alone, torch.get_num_threads()

    before = torch.get_num_threads()
    try:
        assert off_main_thread(counts) == (3, 1)
    finally:
        torch.set_num_threads(before)


def test_a_step_too_small_for_two_threads_runs_on_one():
    assert step_threads(1, PARALLEL_MIN_MACS - 1, 2) == 1
    assert step_threads(2, PARALLEL_MIN_MACS // 2, 4) == 4
    assert step_threads(10**6, 10**6, 1) == 1


def test_a_cpu_worker_picks_its_threads_per_step_and_computes_the_same(tiny_dir):
    """A worker allowed two threads decodes one position on one and a long prompt chunk on two;
    what it computes equals a worker that never changes its count."""
    allowed = StageWorker.from_checkpoint(tiny_dir, WorkerSpec(stage=0, num_threads=2))
    plain = StageWorker.from_checkpoint(tiny_dir, WorkerSpec(stage=0))
    width = allowed.config.n_embd
    long = -(-PARALLEL_MIN_MACS // (4 * width * width))  # positions that make a step worth two threads
    assert long < allowed.config.sequence_len - 1
    ids = torch.arange(long + 1) % allowed.config.vocab_size

    def steps(worker):  # on a thread of its own: the test's main thread keeps its count
        prompt = worker.extend(ExtendBatch([Segment(0, 0, long, 1)], ids[:long], torch.tensor([-1])))
        after_prompt = torch.get_num_threads()
        decode = worker.extend(ExtendBatch([Segment(0, long, 1, 1)], ids[long:], ids[long - 1 : long]))
        return prompt, after_prompt, decode, torch.get_num_threads()

    prompt, after_prompt, decode, after_decode = off_main_thread(steps, allowed)
    assert (after_prompt, after_decode) == (2, 1)
    same_prompt, _, same_decode, _ = off_main_thread(steps, plain)
    for got, want in ((prompt, same_prompt), (decode, same_decode)):
        torch.testing.assert_close(got.logits, want.logits)
        torch.testing.assert_close(got.trunk.x, want.trunk.x)
