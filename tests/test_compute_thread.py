"""Where a worker's torch work runs (stage_workers/compute_thread.py): loading happens on a
thread of its own, so the main thread never owns an OpenMP team, and what it returns or raises
reaches the caller."""

from __future__ import annotations

import threading

import pytest
import torch

from stage_workers.compute_thread import compute_here, off_main_thread
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


def test_compute_here_sets_the_calling_threads_count():
    before = torch.get_num_threads()
    seen = off_main_thread(lambda: (compute_here(1), torch.get_num_threads())[1])
    assert seen == 1
    compute_here(None)  # leaves it alone
    torch.set_num_threads(before)
