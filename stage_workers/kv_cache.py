"""A worker's paged KV cache: one preallocated pool shared by all its live sequences.

Layout, written once:
    k, v:  (num_layers, (num_blocks + 1) * block_size, Hkv, D)   a flat pool of slots per layer
    slot of (seq, position p) = block_tables[seq][p // block_size] * block_size + p % block_size
A sequence's table lists whole blocks; its length is how many positions hold valid keys. The extra
block (`scratch_block`) belongs to no sequence: the padding rows of a fixed-size decode batch (a
CUDA graph's) write and read there.

Prefix caching: a full block can be kept under a block id the coordinator chose (`keep`), the
same id on every worker for the same tokens; a later sequence starts with kept blocks (`share`)
and never writes to them. A block goes back to the free list when nothing refers to it: no
sequence's table and no kept id (`refs`). This class knows nothing about attention masks,
stages, hashes or requests.
"""

from __future__ import annotations

import torch

PADDING = -1  # the sequence id of a padding row


class KVCacheFull(RuntimeError):
    """Raised when a sequence needs more blocks than the pool has free."""


class PagedKVCache:
    def __init__(self, num_layers, num_blocks, block_size, n_kv_head, head_dim, dtype, device):
        assert num_blocks >= 1 and block_size >= 1, "the KV pool needs at least one block"
        shape = (num_layers, (num_blocks + 1) * block_size, n_kv_head, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.scratch_block = num_blocks  # padding rows only: never handed to a sequence
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self.refs = [0] * num_blocks  # per block: sequence tables and kept ids that refer to it
        self.block_tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}
        self.kept: dict[int, int] = {}  # the coordinator's block id -> block (prefix caching)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def length(self, seq_id: int) -> int:
        return self.lengths.get(seq_id, 0)

    def blocks_needed(self, seq_id: int, new_length: int) -> int:
        """Blocks a sequence must still take to hold positions 0..new_length-1."""
        return max(-(-new_length // self.block_size) - len(self.block_tables.get(seq_id, [])), 0)

    def reserve(self, seq_id: int, new_length: int) -> None:
        """Own enough blocks for positions 0..new_length-1 and record the new length."""
        need = self.blocks_needed(seq_id, new_length)
        if need > len(self._free):
            raise KVCacheFull(
                f"KV cache full: sequence {seq_id} needs {need} more blocks of {self.block_size} "
                f"positions, {len(self._free)} of {self.num_blocks} are free"
            )
        table = self.block_tables.setdefault(seq_id, [])
        for _ in range(need):
            table.append(self._free.pop())
            self.refs[table[-1]] = 1
        self.lengths[seq_id] = new_length

    def truncate(self, seq_id: int, length: int) -> None:
        """Forget positions >= length; blocks past the new end go back to the pool."""
        table = self.block_tables.get(seq_id, [])
        keep = -(-length // self.block_size)
        while len(table) > keep:
            self._release(table.pop())
        if seq_id in self.lengths:
            self.lengths[seq_id] = min(self.lengths[seq_id], length)

    def free(self, seq_id: int) -> None:
        for block in reversed(self.block_tables.pop(seq_id, [])):
            self._release(block)
        self.lengths.pop(seq_id, None)

    # ---- prefix caching ----------------------------------------------------------------------
    def keep(self, block_id: int, seq_id: int, index: int) -> None:
        """Keep the sequence's block `index` (full) under `block_id`, past the sequence's end."""
        if block_id not in self.kept:
            block = self.block_tables[seq_id][index]
            self.kept[block_id] = block
            self.refs[block] += 1

    def share(self, seq_id: int, block_ids: list[int]) -> None:
        """A new sequence starts with these kept blocks: its positions 0..len * block_size - 1."""
        table = [self.kept[b] for b in block_ids]
        for block in table:
            self.refs[block] += 1
        self.block_tables[seq_id] = table
        self.lengths[seq_id] = len(table) * self.block_size

    def evict(self, block_id: int) -> None:
        """Stop keeping `block_id` (a no-op if it is not kept here)."""
        block = self.kept.pop(block_id, None)
        if block is not None:
            self._release(block)

    def _release(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            self._free.append(block)

    def padded_tables(self, seq_ids: list[int], width: int | None = None) -> torch.Tensor:
        """(B, width) int64 block ids on the host (width: the longest table unless given), padded with
        block 0; seq_id PADDING (a padding row of a fixed-size batch) gets the scratch block."""
        tables = [[self.scratch_block] if s == PADDING else self.block_tables[s] for s in seq_ids]
        width = width or max(len(t) for t in tables)
        rows = [t + [0] * (width - len(t)) for t in tables]
        return torch.tensor(rows, dtype=torch.long)

    def slots(self, tables: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tables: (B, max_blocks); positions: (B, P) valid positions. Returns (B, P) slots, on
        the device of its inputs (the host when planning a call, the cache's when attending)."""
        blocks = tables.gather(1, torch.div(positions, self.block_size, rounding_mode="floor"))
        return blocks * self.block_size + positions % self.block_size
