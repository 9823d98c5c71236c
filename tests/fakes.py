"""A fake stage worker for engine tests: hand-written logits, no model, no weights.

Stage k's logits at position p are a fixed pseudo-random function of (k, tokens[0..p]).
Each fake checks the worker contract (starts match what it has computed, the trunk rows it
receives are the positions it expects) and records every call.
"""

from __future__ import annotations

import hashlib

import torch

from stage_workers.messages import ExtendResult, TrunkState, WorkerInfo

VOCAB = 16


def fake_logits(stage: int, prefix: tuple[int, ...], sharpness: float = 3.0) -> torch.Tensor:
    """(V,) logits for the token after `prefix` at `stage`. Later stages mostly agree with stage 0."""
    def noise(key):
        seed = int(hashlib.sha1(repr(key).encode()).hexdigest()[:8], 16)
        return torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed))

    return sharpness * (noise(("shared", prefix[-2:])) + 0.7 * noise((stage, prefix[-2:])))


class FakeWorker:
    def __init__(self, stage: int, num_stages: int, kv_blocks: int = 64, block_size: int = 4):
        self.stage, self.num_stages = stage, num_stages
        self.block_size, self.kv_blocks = block_size, kv_blocks
        self.tokens: dict[int, list[int]] = {}
        self.calls: list[list[tuple[int, int, int, int]]] = []  # per call: (seq, start, length, heads)
        self.rollbacks: list[tuple[int, int]] = []
        self.busy_s = 0.0

    def extend(self, batch) -> ExtendResult:
        self.calls.append([(s.seq_id, s.start, s.length, s.num_heads) for s in batch.segments])
        rows, logits, offset = [], [], 0
        for seg in batch.segments:
            history = self.tokens.setdefault(seg.seq_id, [])
            assert seg.start == len(history), f"stage {self.stage}: start {seg.start} but {len(history)} computed"
            new = batch.token_ids[offset : offset + seg.length].tolist()
            if batch.trunk is not None:  # upstream must hand over exactly these positions, in order
                got = batch.trunk.x[offset : offset + seg.length, 0].tolist()
                assert got == [float(seg.start + i) for i in range(seg.length)], f"stage {self.stage}: got rows {got}"
            history.extend(new)
            for p in range(seg.start + seg.length - seg.num_heads, seg.start + seg.length):
                logits.append(fake_logits(self.stage, tuple(history[: p + 1])))
            rows.extend(range(seg.start, seg.start + seg.length))
            offset += seg.length
        x = torch.tensor(rows, dtype=torch.float32)[:, None]
        trunk = None if self.stage == self.num_stages - 1 else TrunkState(x, x.clone(), None)
        return ExtendResult(trunk=trunk, logits=torch.stack(logits) if logits else None)

    def rollback(self, seq_id: int, length: int) -> None:
        self.rollbacks.append((seq_id, length))
        del self.tokens[seq_id][length:]

    def free(self, seq_id: int) -> None:
        self.tokens.pop(seq_id, None)

    def info(self) -> WorkerInfo:
        return WorkerInfo(self.stage, (self.stage, self.stage), "cpu", "float32", 0, self.block_size,
                          self.kv_blocks, self.kv_blocks, 0, self.busy_s)
