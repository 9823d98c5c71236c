"""Every message between the coordinator and a stage worker, as typed dataclasses.

A worker call extends some sequences by a run of new positions each. Positions of all
sequences in a call are *packed*: row `n` of every `(N, ...)` tensor belongs to the segment
that covers it, segments in order. The same messages travel in-process and through Ray; they
hold tensors, never Python lists of numbers. Nothing here computes.

Crossing processes, a message pickles its tensors as numpy arrays, which pickle protocol 5
(and so Ray) carries as out-of-band buffers, without copying: a Ray round trip of a trunk
state took 1.3 ms against 2.4 ms as pickled torch tensors. What arrives may be a read-only view
of the transport's buffer, so nothing writes into a received message's tensors.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np
import torch

from .transfer import to_device


class WorkerLost(RuntimeError):
    """A stage worker's process went away (its KV cache with it)."""

    def __init__(self, stage: int, detail: str, restarted: bool = True):
        super().__init__(f"stage {stage} worker lost: {detail}")
        self.stage = stage
        self.restarted = restarted  # False: the worker stays dead (no restarts left); the stage is down


class _Array(NamedTuple):
    """A CPU tensor as it is pickled: its bytes as a numpy array, and the torch dtype's name."""

    array: np.ndarray
    dtype: str

    @staticmethod
    def of(t: torch.Tensor) -> "_Array":
        t = t.detach().contiguous()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: carry the bits
            return _Array(t.view(torch.int16).numpy(), "bfloat16")
        return _Array(t.numpy(), str(t.dtype).removeprefix("torch."))

    def tensor(self) -> torch.Tensor:
        with warnings.catch_warnings():  # read-only buffers: see the module docstring
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(self.array)
        return t.view(torch.bfloat16) if self.dtype == "bfloat16" else t


def _reduce(message):
    """Pickle a message dataclass with its tensors as `_Array`s (out-of-band numpy buffers)."""
    values = [getattr(message, f.name) for f in fields(message)]
    return _rebuild, (type(message), [_Array.of(v) if isinstance(v, torch.Tensor) else v for v in values])


def _rebuild(cls, values):
    return cls(*[v.tensor() if isinstance(v, _Array) else v for v in values])


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
    __reduce__ = _reduce

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
    __reduce__ = _reduce

    @property
    def num_positions(self) -> int:
        return int(self.token_ids.numel())


@dataclass
class ExtendResult:
    trunk: TrunkState | None  # (N, C) for the downstream stage; None from the last stage
    logits: torch.Tensor | None  # (M, V) fp32 stage logits, M = sum of num_heads, segment order
    __reduce__ = _reduce


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
