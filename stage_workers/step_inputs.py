"""A worker call's index tensors: built on the host from its segments, then one copy to the device.

Where every packed position lives (its segment, absolute position and cache slot), which rows
get logits, and the smear's previous tokens are all known from Python ints before the call
computes anything. Working them out here, on the host, means the device never has to report a
size back (no boolean indexing on the device), and one non-blocking copy brings them all over:
a decode step on a GPU runs to its results without a host sync. This module knows the cache's
block tables but none of its tensors, and nothing of weights.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .kv_cache import PagedKVCache
from .messages import ExtendBatch
from .transfer import pack_to_device


@dataclass
class StepInputs:
    token_ids: torch.Tensor  # (N,) the token at every packed position
    prev_ids: torch.Tensor | None  # stage 0: (N,) the token before each position, -1 at position 0 (the smear)
    positions: torch.Tensor  # (N,) absolute position of every packed position
    write_slots: torch.Tensor  # (N,) KV cache slot each new key and value goes to
    pad_index: torch.Tensor  # (N,) row of each packed position in the padded (B * n_max) layout
    logit_rows: torch.Tensor  # (M,) packed rows whose stage logits are returned, segment order
    starts: torch.Tensor  # (B,) first new position of each segment
    lengths: torch.Tensor  # (B,) new positions of each segment
    q_pos: torch.Tensor  # (B, n_max) absolute position of each padded query; pads repeat the start
    tables: torch.Tensor  # (B, max_blocks) block ids of each sequence, padded with block 0

    @classmethod
    def build(cls, batch: ExtendBatch, cache: PagedKVCache, table_width: int | None = None) -> "StepInputs":
        """On the host. The cache must already hold blocks for every new position (reserve).
        `table_width`: block-table columns (default: the longest table), fixed for a CUDA graph."""
        segs = batch.segments
        B, n_max = len(segs), max(s.length for s in segs)
        starts = torch.tensor([s.start for s in segs])  # (B,)
        lengths = torch.tensor([s.length for s in segs])  # (B,)
        tables = cache.padded_tables([s.seq_id for s in segs], table_width)  # (B, max_blocks)
        r = torch.arange(n_max)
        q_valid = r < lengths[:, None]  # (B, n_max)
        q_pos = starts[:, None] + torch.where(q_valid, r, 0)  # (B, n_max)
        firsts, logit_rows, end = [], [], 0  # each segment's first packed row; rows given logits
        for s in segs:
            firsts.append(end)
            end += s.length
            logit_rows.extend(range(end - s.num_logits, end))
        return cls(
            token_ids=batch.token_ids,
            prev_ids=None if batch.prev_token_ids is None else _previous_tokens(batch, firsts),
            positions=q_pos[q_valid],
            write_slots=cache.slots(tables, q_pos)[q_valid],
            pad_index=(torch.arange(B)[:, None] * n_max + r)[q_valid],
            logit_rows=torch.tensor(logit_rows, dtype=torch.long),
            starts=starts,
            lengths=lengths,
            q_pos=q_pos,
            tables=tables,
        )

    def to(self, device: torch.device) -> "StepInputs":
        """All of them on `device` in one non-blocking copy."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        present = [name for name, t in values.items() if t is not None]
        moved = pack_to_device([values[name] for name in present], device)
        return StepInputs(**{**values, **dict(zip(present, moved))})


def _previous_tokens(batch: ExtendBatch, firsts: list[int]) -> torch.Tensor:
    """(N,) the token before each packed position: the previous row's, or at a segment's first row
    the token before its start (`prev_token_ids`)."""
    prev = torch.roll(batch.token_ids, 1)
    prev[firsts] = batch.prev_token_ids
    return prev
