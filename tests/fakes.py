"""Fake stage workers for engine tests, and an engine over them: hand-written logits, no model, no weights.

Stage k's logits at position p are a fixed pseudo-random function of (k, tokens[p-1], tokens[p]):
of the last two tokens only (one at p = 0), not of the whole prefix. Each fake checks the worker
contract (starts match what it has computed, the trunk rows it receives are the positions it
expects) and records every call. `greedy` is what full PoE over the fakes must generate.
"""

from __future__ import annotations

import hashlib

import torch

from coordinator.core import requests as rq
from coordinator.core.engine import Engine, EngineConfig
from coordinator.core.pipeline import Pipeline
from stage_workers.config import config_from_dict
from stage_workers.logop import combine, log_probs
from stage_workers.messages import ExtendResult, TrunkState, WorkerInfo, WorkerLost

VOCAB = 16
K = 4
CONFIG = config_from_dict(dict(vocab_size=VOCAB, n_layer=4, n_embd=32, n_head=2, sequence_len=128,
                               poe_stage_layout=[1, 1, 1, 1]))


def fake_logits(stage: int, prefix: tuple[int, ...], sharpness: float = 3.0) -> torch.Tensor:
    """(V,) logits for the token after `prefix` at `stage`, from its last two tokens. Later stages
    mostly agree with stage 0."""
    def noise(key):
        seed = int(hashlib.sha1(repr(key).encode()).hexdigest()[:8], 16)
        return torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed))

    return sharpness * (noise(("shared", prefix[-2:])) + 0.7 * noise((stage, prefix[-2:])))


class FakeWorker:
    def __init__(self, stage: int, num_stages: int, kv_blocks: int = 64, block_size: int = 4):
        self.stage, self.num_stages = stage, num_stages
        self.block_size, self.kv_blocks = block_size, kv_blocks
        self.tokens: dict[int, list[int]] = {}
        self.calls: list[list[tuple[int, int, int, int]]] = []  # per call: (seq, start, length, num_logits)
        self.rollbacks: list[tuple[int, int]] = []
        self.kept: dict[int, list[int]] = {}  # prefix caching: block id -> its tokens
        self.busy_s = 0.0

    def extend(self, batch) -> ExtendResult:
        self.calls.append([(s.seq_id, s.start, s.length, s.num_logits) for s in batch.segments])
        rows, logits, offset = [], [], 0
        for seg in batch.segments:
            history = self.tokens.setdefault(seg.seq_id, [])
            assert seg.start == len(history), f"stage {self.stage}: start {seg.start} but {len(history)} computed"
            new = batch.token_ids[offset : offset + seg.length].tolist()
            if batch.trunk is not None:  # upstream must hand over exactly these positions, in order
                got = batch.trunk.x[offset : offset + seg.length, 0].tolist()
                assert got == [float(seg.start + i) for i in range(seg.length)], f"stage {self.stage}: got rows {got}"
            history.extend(new)
            for p in range(seg.start + seg.length - seg.num_logits, seg.start + seg.length):
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

    def keep(self, block_id: int, seq_id: int, index: int) -> None:
        block = self.tokens[seq_id][index * self.block_size : (index + 1) * self.block_size]
        assert len(block) == self.block_size, f"stage {self.stage}: block {index} of sequence {seq_id} is not full"
        self.kept.setdefault(block_id, block)

    def share(self, seq_id: int, block_ids: list[int]) -> None:
        assert seq_id not in self.tokens, f"stage {self.stage}: sequence {seq_id} shares blocks after computing"
        self.tokens[seq_id] = [t for b in block_ids for t in self.kept[b]]

    def evict(self, block_id: int) -> None:
        self.kept.pop(block_id, None)

    def info(self) -> WorkerInfo:
        return WorkerInfo(self.stage, (self.stage, self.stage), "cpu", "float32", 0, self.block_size,
                          self.kv_blocks, self.kv_blocks, 0, self.busy_s)


class LosingWorker(FakeWorker):
    """Loses its whole state (like a restarted process) on chosen extend calls."""

    def __init__(self, *args, lose_on: set[int], **kwargs):
        super().__init__(*args, **kwargs)
        self.lose_on, self.num_extends = lose_on, 0

    def extend(self, batch):
        self.num_extends += 1
        if self.num_extends in self.lose_on:
            self.tokens.clear()
            self.kept.clear()
            raise WorkerLost(self.stage, "killed for the test")
        return super().extend(batch)


# ---- an engine over the fakes, and what it must generate ---------------------------------------
def make_engine(kv_blocks=64, **engine_kwargs):
    """An engine over one fake per stage; returns it and the fakes."""
    workers = [FakeWorker(k, K, kv_blocks=kv_blocks) for k in range(K)]
    return Engine(CONFIG, Pipeline(workers), EngineConfig(**engine_kwargs)), workers


def request(prompt, n, mode, **kw):
    return rq.GenerationRequest(tuple(prompt), n, mode, **kw)


def run(engine, request):
    seq = engine.add(request)
    engine.run_to_completion([seq])
    return seq


def expected_score(prefix, stages):
    """(V,) Log-OP score of `stages`' fake logits after `prefix`, equal weights."""
    return combine([log_probs(fake_logits(k, tuple(prefix))) for k in stages], [1.0] * len(stages), 0.0)


def greedy(prompt, n, stages=range(K)):
    """The `n` tokens greedy decoding over `stages` adds to `prompt`."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(expected_score(seq, list(stages)).argmax()))
    return seq[len(prompt):]


MIXED = [  # (prompt, max_new_tokens, mode): every mode, to run side by side
    ([1, 2], 8, rq.full_mode(CONFIG)),
    ([3], 9, rq.speculative_mode(CONFIG, 1, 2)),
    ([4, 4, 4], 8, rq.wand_mode(CONFIG, 1.0, (1.0, 1.0, 1.0, 0.0))),
    ([9, 1], 6, rq.composition_mode(CONFIG, [0, 3], [0.5, 2.0])),
    ([5, 6, 7], 7, rq.full_mode(CONFIG)),
    ([2, 2], 5, rq.prefix_mode(CONFIG, 3)),
]


def reference_tokens() -> list[tuple[list[int], list[int]]]:
    """(new tokens, exit stages) of each MIXED request run alone on a plain engine."""
    engine, _ = make_engine()
    return [(s.new_tokens, s.stages_used) for s in (run(engine, request(*job)) for job in MIXED)]


def make_grouped_engine(layout, replicas=None, kv_blocks=64, **engine_kwargs):
    """An engine over fakes laid out in stage groups (`layout`: (first, last) stages per worker;
    `replicas`: workers per group); returns it and each group's StageGroups."""
    from stage_workers.stage_group import StageGroup

    per_stage, groups = [[] for _ in range(K)], []
    for (first, last), n in zip(layout, replicas or [1] * len(layout)):
        groups.append([StageGroup([FakeWorker(k, K, kv_blocks=kv_blocks) for k in range(first, last + 1)])
                       for _ in range(n)])
        for group in groups[-1]:
            for member in group.members():
                per_stage[member.stage].append(member)
    return Engine(CONFIG, Pipeline(per_stage), EngineConfig(**engine_kwargs)), groups
