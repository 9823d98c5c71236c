"""Every message between the coordinator and a stage worker, as typed dataclasses.

A worker call extends some sequences by a run of new positions each. Positions of all
sequences in a call are *packed*: row `n` of every `(N, ...)` tensor belongs to the segment
that covers it, segments in order. The same messages travel in-process and through Ray; they
hold tensors, never Python lists of numbers. Nothing here computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .transfer import to_device


class WorkerLost(RuntimeError):
    """A stage worker's process went away (its KV cache with it)."""

    def __init__(self, stage: int, detail: str):
        super().__init__(f"stage {stage} worker lost: {detail}")
        self.stage = stage


@dataclass(frozen=True)
class Segment:
    seq_id: int
    start: int  # first new position; must equal what the worker has computed for seq_id
    length: int  # new positions in this call (>= 1)
    num_heads: int = 0  # stage logits wanted for the last num_heads new positions


@dataclass
class TrunkState:
    """What a downstream slice needs for the packed positions of one call."""

    x: torch.Tensor  # (N, C) residual stream after the upstream boundary layer
    x0: torch.Tensor  # (N, C) smeared input embedding, mixed back in at every layer
    x_backout: torch.Tensor | None  # (N, C) residual after layer n_layer//2, once computed

    def to(self, device, dtype) -> "TrunkState":
        move = lambda t: None if t is None else to_device(t, torch.device(device)).to(dtype)  # noqa: E731
        return TrunkState(move(self.x), move(self.x0), move(self.x_backout))

    def select(self, rows: torch.Tensor | slice) -> "TrunkState":
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return TrunkState(pick(self.x), pick(self.x0), pick(self.x_backout))

    @staticmethod
    def cat(parts: list["TrunkState"]) -> "TrunkState":
        if len(parts) == 1:
            return parts[0]
        backouts = [p.x_backout for p in parts]
        assert all(b is None for b in backouts) or all(b is not None for b in backouts), (
            "cannot pack trunk states from before and after the backout layer together"
        )
        return TrunkState(
            torch.cat([p.x for p in parts]),
            torch.cat([p.x0 for p in parts]),
            None if backouts[0] is None else torch.cat(backouts),
        )


@dataclass
class ExtendBatch:
    segments: list[Segment]
    token_ids: torch.Tensor  # (N,) int64, the token at every new position
    prev_token_ids: torch.Tensor | None = None  # (B,) stage 0 only: token before each start, -1 at 0
    trunk: TrunkState | None = None  # None for stage 0, which embeds token_ids itself

    @property
    def num_positions(self) -> int:
        return int(self.token_ids.numel())


@dataclass
class ExtendResult:
    trunk: TrunkState | None  # (N, C) for the downstream stage; None from the last stage
    logits: torch.Tensor | None  # (M, V) fp32 stage logits, M = sum of num_heads, segment order


@dataclass(frozen=True)
class WorkerInfo:
    stage: int
    layers: tuple[int, int]  # first and last layer of the slice
    device: str
    dtype: str
    num_parameters: int
    kv_block_size: int
    kv_num_blocks: int
    kv_free_blocks: int
    resident_bytes: int  # weights plus preallocated KV cache
