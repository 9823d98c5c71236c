"""Rows of sequences between stages: packed blocks and per-sequence views into them.

A `Block` is what one message or one computed batch holds for several sequences, rows packed
one after another; `Rows` are one sequence's consecutive positions in a block, sliced out only
when that sequence's own tensors are needed, so rows that tile a block go back together without
a copy (`concat_rows`). `rows_by_sequence` and `boundary_of` turn a `Boundary` message into
rows and back. Nothing here knows stages, channels or decisions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .messages import Boundary, Handoff, TrunkState, require


@dataclass(frozen=True)
class Block:
    """Packed rows of several sequences: a received message's, or a computed batch's."""

    token_ids: torch.Tensor  # (N,)
    trunk: TrunkState | None  # (N, C); None before stage 0 computed them (or when held)
    acc: torch.Tensor | None  # (M, V) Log-OP sums of some of the rows

    @property
    def num_rows(self) -> int:
        return self.token_ids.shape[0]

    @property
    def num_acc(self) -> int:
        return 0 if self.acc is None else self.acc.shape[0]


class Rows:
    """Consecutive positions of one sequence between stages, start..start+len-1: rows
    [row0, row0 + len) of a `Block`, whose last `num_acc` carry Log-OP sums (rows [acc0, acc0 +
    num_acc) of the block's sums). Tensors are sliced only when one sequence's are asked for:
    rows that tile a block go back together without a copy (`concat_rows`)."""

    __slots__ = ("start", "length", "num_acc", "block", "row0", "acc0")

    def __init__(self, start: int, length: int, num_acc: int, block: Block, row0: int = 0, acc0: int = 0):
        self.start, self.length, self.num_acc, self.block, self.row0, self.acc0 = start, length, num_acc, block, row0, acc0

    @classmethod
    def of(cls, start: int, token_ids: torch.Tensor, trunk: TrunkState | None, acc: torch.Tensor | None) -> "Rows":
        """Rows made of tensors of their own."""
        return cls(start, token_ids.shape[0], 0 if acc is None else acc.shape[0], Block(token_ids, trunk, acc))

    def __len__(self) -> int:
        return self.length

    def _whole(self) -> bool:
        return self.row0 == 0 and self.length == self.block.num_rows

    @property
    def token_ids(self) -> torch.Tensor:
        return self.block.token_ids if self._whole() else self.block.token_ids[self.row0 : self.row0 + self.length]

    @property
    def trunk(self) -> TrunkState | None:
        t = self.block.trunk
        return t if t is None or self._whole() else t.select(slice(self.row0, self.row0 + self.length))

    @property
    def acc(self) -> torch.Tensor | None:
        if self.num_acc == 0:
            return None
        acc = self.block.acc
        return acc if self.acc0 == 0 and self.num_acc == acc.shape[0] else acc[self.acc0 : self.acc0 + self.num_acc]

    def without_acc(self) -> "Rows":
        return Rows(self.start, self.length, 0, self.block, self.row0, self.acc0)

    def then(self, later: "Rows") -> "Rows":
        """These rows followed by `later` (which must start where these end)."""
        require(later.start == self.start + len(self), f"rows {self.start}+{len(self)} then rows at {later.start}")
        require(self.num_acc == 0 or later.num_acc == len(later), "Log-OP sums must cover a suffix of the rows")
        block = concat_rows([self, later])
        return Rows(self.start, len(self) + len(later), block.num_acc, block)

    def kept(self) -> "Rows":
        """These rows as tensors of their own: rows kept across steps must not hold on to (and so keep
        alive) the whole batch message they arrived in."""
        trunk = self.trunk
        trunk = None if trunk is None else trunk.map(torch.clone)
        acc = self.acc
        return Rows.of(self.start, self.token_ids.clone(), trunk, None if acc is None else acc.clone())

    def since(self, position: int) -> "Rows | None":
        """The rows at positions >= position (None if none); only rows without Log-OP sums."""
        skip = max(position - self.start, 0)
        if skip >= len(self):
            return None
        require(self.num_acc == 0, "rows with Log-OP sums are not cut at the front")
        return self if skip == 0 else Rows(position, len(self) - skip, 0, self.block, self.row0 + skip)

    def before(self, length: int) -> "Rows | None":
        """The rows at positions < length (None if none)."""
        keep = length - self.start
        if keep <= 0:
            return None
        if keep >= len(self):
            return self
        num_acc = max(0, keep - (len(self) - self.num_acc))
        return Rows(self.start, keep, num_acc, self.block, self.row0, self.acc0)


def concat_rows(parts: list[Rows]) -> Block:
    """The parts' rows one after another (and their sums): the block itself, or a slice of it, when
    the parts tile one block in order (a batch split per sequence and put back together)."""
    first, last = parts[0], parts[-1]
    block = first.block
    with_acc = [p for p in parts if p.num_acc]
    tiled = (all(p.block is block for p in parts)
             and all(b.row0 == a.row0 + a.length for a, b in zip(parts, parts[1:]))
             and all(b.acc0 == a.acc0 + a.num_acc for a, b in zip(with_acc, with_acc[1:])))
    if tiled:
        whole = Rows(first.start, last.row0 + last.length - first.row0, sum(p.num_acc for p in parts), block, first.row0,
                     with_acc[0].acc0 if with_acc else 0)
        return Block(whole.token_ids, whole.trunk, whole.acc)
    accs = [p.acc for p in with_acc]
    return Block(cat_adjacent([p.token_ids for p in parts]), None if first.block.trunk is None else
                 TrunkState.cat([p.trunk for p in parts]), cat_adjacent(accs) if accs else None)


def cat_rows(parts: list[Rows]) -> Rows:
    """One sequence's consecutive rows, one part after another, as one `Rows`."""
    for a, b in zip(parts, parts[1:]):
        require(b.start == a.start + len(a), f"rows {a.start}+{len(a)} then rows at {b.start}")
    block = concat_rows(parts)
    return Rows(parts[0].start, block.num_rows, block.num_acc, block)


def rows_by_sequence(message: Boundary) -> dict[int, tuple[Handoff, Rows]]:
    """A boundary message's rows, per sequence (views into the message, sliced only if needed)."""
    block = Block(message.token_ids, message.trunk, message.acc)
    out, row, acc_row = {}, 0, 0
    for h in message.handoffs:
        out[h.seq_id] = (h, Rows(h.start, h.length, h.num_acc, block, row, acc_row))
        row, acc_row = row + h.length, acc_row + h.num_acc
    return out


def drafted_by_sequence(message: Boundary) -> dict[int, torch.Tensor]:
    """A boundary message's sampled drafts' distributions, per sequence: (n, V) each."""
    out, row = {}, 0
    for h in message.handoffs:
        if h.num_drafted:
            out[h.seq_id] = message.drafted[row : row + h.num_drafted]
            row += h.num_drafted
    return out


def boundary_of(step: int, index: int, items: list[tuple[int, Rows, bool]],
                drafted: dict[int, torch.Tensor] | None = None) -> Boundary:
    """`drafted`: seq_id -> (n, V) sampled drafts' distributions going along with its rows."""
    if drafted:
        handoffs = tuple(Handoff(seq_id, rows.start, len(rows), rows.num_acc, park,
                                 drafted[seq_id].shape[0] if seq_id in drafted else 0) for seq_id, rows, park in items)
    else:
        handoffs = tuple(Handoff(seq_id, rows.start, len(rows), rows.num_acc, park) for seq_id, rows, park in items)
    if not items:
        return Boundary(step, index, handoffs, torch.empty(0, dtype=torch.long), None, None)
    block = concat_rows([rows for _, rows, _ in items])  # the computed batch itself when everything goes on together
    q = [drafted[h.seq_id] for h in handoffs if h.num_drafted] if drafted else None
    return Boundary(step, index, handoffs, block.token_ids, block.trunk, block.acc, torch.cat(q) if q else None)


def cat_adjacent(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors one after another along dim 0; no copy when they are already adjacent rows of one
    buffer (a batch's rows split per sequence and put back together, the common case)."""
    first = tensors[0]
    if len(tensors) == 1:
        return first
    end, last = first.data_ptr(), tensors[-1]
    for t in tensors:  # consecutive in memory, between two ends of one storage: rows of one buffer
        if t.data_ptr() != end or not t.is_contiguous():
            return torch.cat(tensors)
        end += t.nbytes
    if last.untyped_storage().data_ptr() != first.untyped_storage().data_ptr():
        return torch.cat(tensors)
    rows = sum(t.shape[0] for t in tensors)
    return first.as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())
