"""Stage workers compute: each owns a contiguous trunk slice ending at a stage boundary, that
stage's head and its own KV cache, loaded from only its slice of the checkpoint."""

from .worker import StageWorker, WorkerSpec

__all__ = ["StageWorker", "WorkerSpec"]
