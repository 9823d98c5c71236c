"""A worker's decode step at fixed shapes, captured as one CUDA graph per bucket (gpt-fast's and
vLLM's practice), so a GPU decode step is one graph launch instead of hundreds of kernel launches.

A decode batch (one new position per sequence) is padded to a batch-size bucket with rows of the
cache's scratch block, its block tables to the key-span bucket that covers its longest
sequence, and every row gets logits or none does: shapes then depend only on the bucket
(batch, key span, logits or not), never on the batch's contents. Each bucket's step runs on static input
buffers: the first time it is captured into a graph, later it is replayed after copying the
new inputs in. On the CPU there is nothing to capture; the same padded step runs eagerly, which
is how the tests check that padding and bucketing change no result. This module knows the
slice, the cache and the step's inputs; nothing of sequences' meaning.
"""

from __future__ import annotations

from dataclasses import fields

import torch

from .attention import CacheAttention
from .kv_cache import PADDING
from .messages import ExtendBatch, ExtendResult, Segment, TrunkState
from .step_inputs import StepInputs

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MIN_SPAN = 64  # key spans are powers of two from here up to the context


def bucket(n: int, buckets) -> int | None:
    return next((b for b in buckets if b >= n), None)


class DecodeGraphs:
    def __init__(self, worker, capture: bool):
        """`worker`: a StageWorker; `capture`: record CUDA graphs (False: run the padded step eagerly)."""
        self.worker, self.capture = worker, capture
        sequence_len = worker.config.sequence_len
        self.spans = tuple(sorted({min(MIN_SPAN << i, sequence_len) for i in range(32) if MIN_SPAN << i < 2 * sequence_len}))
        self.graphs: dict[tuple[int, int, bool], _Graph] = {}

    def fits(self, batch: ExtendBatch) -> bool:
        """A decode batch: one position per sequence, every row with logits or none, and within the buckets."""
        segs = batch.segments
        return (all(s.length == 1 for s in segs) and len({s.num_logits for s in segs}) == 1
                and len(segs) <= BATCH_BUCKETS[-1])

    def run(self, batch: ExtendBatch) -> ExtendResult:
        """The batch's result, computed at its bucket's shapes (the cache holds its new positions' blocks)."""
        w, segs = self.worker, batch.segments
        B = len(segs)
        size, with_logits = bucket(B, BATCH_BUCKETS), segs[0].num_logits == 1
        span = bucket(max(s.start + 1 for s in segs), self.spans)
        padded = ExtendBatch(
            segments=segs + [Segment(PADDING, 0, 1, int(with_logits))] * (size - B),
            token_ids=_pad(batch.token_ids, size, 0),
            prev_token_ids=None if batch.prev_token_ids is None else _pad(batch.prev_token_ids, size, -1),
            trunk=None if batch.trunk is None else batch.trunk.map(lambda t: _pad(t, size, 0)),
        )
        inputs = StepInputs.build(padded, w.cache, table_width=-(-span // w.cache.block_size)).to(w.device)
        trunk = None if padded.trunk is None else padded.trunk.to(w.device, w.dtype)
        if not self.capture:
            result = self.step(padded.segments, inputs, trunk, span)
        else:
            key = (size, span, with_logits)
            if key not in self.graphs:
                self.graphs[key] = _Graph(self, padded.segments, inputs, trunk, span)
            result = self.graphs[key].replay(inputs, trunk)
        out_trunk = None if result.trunk is None else result.trunk.map(lambda t: t[:B].clone())
        return ExtendResult(out_trunk, None if result.logits is None else result.logits[:B].clone())

    def step(self, segments: list[Segment], inputs: StepInputs, trunk: TrunkState | None, span: int) -> ExtendResult:
        """The slice over a padded batch: what a graph captures (no host syncs, shapes from the bucket)."""
        w = self.worker
        attention = CacheAttention(w.cache, segments, inputs, w.slice.windows, w.config.n_head, key_span=span)
        pos = inputs.positions  # (B,)
        return w.slice(inputs, trunk, attention, w.cos[pos], w.sin[pos])


class _Graph:
    """One bucket's captured step and its static input buffers."""

    def __init__(self, owner: DecodeGraphs, segments: list[Segment], inputs: StepInputs, trunk, span: int):
        self.inputs = StepInputs(**{f.name: None if getattr(inputs, f.name) is None else getattr(inputs, f.name).clone()
                                    for f in fields(inputs)})
        self.trunk = None if trunk is None else trunk.map(torch.clone)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the main stream, as capture requires
            owner.step(segments, self.inputs, self.trunk, span)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.result = owner.step(segments, self.inputs, self.trunk, span)

    def replay(self, inputs: StepInputs, trunk) -> ExtendResult:
        for f in fields(inputs):
            if getattr(inputs, f.name) is not None:
                getattr(self.inputs, f.name).copy_(getattr(inputs, f.name), non_blocking=True)
        if trunk is not None:
            for static, new in zip((self.trunk.x, self.trunk.x0, self.trunk.x_backout), (trunk.x, trunk.x0, trunk.x_backout)):
                if static is not None:
                    static.copy_(new, non_blocking=True)
        self.graph.replay()
        return self.result


def _pad(t: torch.Tensor, size: int, value) -> torch.Tensor:
    """(n, ...) -> (size, ...), the new rows filled with `value`."""
    if t.shape[0] == size:
        return t
    return torch.cat([t, t.new_full((size - t.shape[0], *t.shape[1:]), value)])
