"""Which thread runs a process's torch work on the CPU, and with how many OpenMP threads.

PyTorch's CPU ops run their parallel regions on libgomp (OpenMP), with two behaviours that cost a
stage worker dearly if ignored (measured on 2 cores, a chain of rms_norm, a 256x256 linear and
relu on 16 rows, the shape of a small model's decode step):
- once the process's main thread has run a parallel region (it then owns a team of threads),
  the same ops on any other thread cost 3.4x more (28 -> 95 us): libgomp then counts more
  threads than cores and stops spinning between regions, so each region wakes its team
  through the kernel. A thread's team goes away when the thread ends.
- the OpenMP thread count is per thread: in a Ray actor (OMP_NUM_THREADS=1) a count set on the
  thread that loaded the worker leaves the thread that computes single-threaded.
So a worker is loaded on a short-lived thread (`off_main_thread`) and the thread that runs its
steps sets its own thread count (`compute_here`).

A third behaviour matters when several workers share a node's cores: after a step, a worker's
idle OpenMP threads spin for a while, taking cores from the stage that computes next. A step too
small to gain from a second thread therefore runs on one (`step_threads`): its team stays asleep.
Nothing here knows models or Ray.
"""

from __future__ import annotations

import threading
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def off_main_thread(fn: Callable[..., T], *args, **kwargs) -> T:
    """`fn(*args, **kwargs)` on a thread that ends with it (so the main thread never owns an
    OpenMP team); its result is returned and its exception raised here."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append((True, fn(*args, **kwargs)))
        except BaseException as exc:  # re-raised on the caller's thread
            outcome.append((False, exc))

    thread = threading.Thread(target=run, name="poe-load")
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


# Below this many multiply-adds in a step's largest matmul (rows x weight elements), a step runs on
# one thread. Measured on 2 cores (small preset, width 256, in one process): one thread decodes as
# fast as two up to batch 4 (1M MACs in the MLP's matmuls), two are 1.13-1.4x faster from batch 8
# (2M). In a cluster of four CPU workers, one thread for those steps made single-stream decode
# 1.28x faster on average, and steadier (docs/benchmarks.md).
PARALLEL_MIN_MACS = 1_500_000


def step_threads(rows: int, largest_weight: int, most: int) -> int:
    """OpenMP threads for a step of `rows` positions whose largest matmul weight has
    `largest_weight` elements, on a worker allowed `most`."""
    return most if rows * largest_weight >= PARALLEL_MIN_MACS else 1


def use_threads(num_threads: int) -> None:
    """The calling thread's OpenMP thread count, changed only if it differs (a change costs ~10 us)."""
    if torch.get_num_threads() != num_threads:
        torch.set_num_threads(num_threads)


def compute_here(num_threads: int | None) -> None:
    """Make the calling thread, the one that runs a worker's steps, use `num_threads` OpenMP
    threads (None: leave the default)."""
    if num_threads:
        use_threads(num_threads)
