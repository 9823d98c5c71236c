"""`StageReplicas`: one stage served by one or more identical workers, behind the worker interface.

A sequence is placed on one replica when the engine admits it (the replica with the most KV
blocks not yet promised, if the sequence fits there) and stays there, since its KV cache lives
there. `submit_extend` splits a packed batch by replica, starts the parts side by side (a
worker that offers `submit_extend`, as Ray's does, starts its call without waiting for the
result; an in-process one computes at once) and returns the wait that merges the results back
into segment order, so the pipeline sees one worker it can start now and wait on later.
Replicas come and go at runtime: removing one places its sequences on the others, whose KV
the engine then rebuilds from committed tokens. It knows workers and KV blocks; nothing of
tokens, modes or Ray.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch

from stage_workers.messages import ExtendBatch, ExtendResult, TrunkState, WorkerInfo
from stage_workers.transfer import to_device


class StageReplicas:
    def __init__(self, workers: list):
        assert workers, "a stage needs at least one worker"
        self.workers: list = []
        self.capacity: list[int] = []  # KV blocks of each replica
        self.promised: list[int] = []  # KV blocks of each replica promised to its sequences
        self.placed: dict[int, tuple[int, int]] = {}  # seq_id -> (replica, KV blocks promised there)
        self.stage: int | None = None
        self.block_size: int | None = None  # positions per KV block, the same on every replica
        for worker in workers:
            self.add_replica(worker)

    # ---- placement: the engine's KV admission ------------------------------------------------
    @property
    def max_blocks(self) -> int:
        """The most KV blocks one sequence can ever be promised here (a sequence lives on one replica)."""
        return max(self.capacity)

    @property
    def num_blocks(self) -> int:
        return sum(self.capacity)

    @property
    def num_free_blocks(self) -> int:
        """KV blocks not yet promised, over all replicas."""
        return self.num_blocks - sum(self.promised)

    def fits(self, num_blocks: int) -> bool:
        return any(c - p >= num_blocks for c, p in zip(self.capacity, self.promised))

    def place(self, seq_id: int, num_blocks: int) -> None:
        """Promise a sequence KV blocks on the replica with the most room; it runs there until released."""
        room = [c - p for c, p in zip(self.capacity, self.promised)]
        replica = room.index(max(room))
        assert room[replica] >= num_blocks, f"stage {self.stage}: sequence {seq_id} placed without room"
        self.placed[seq_id] = (replica, num_blocks)
        self.promised[replica] += num_blocks

    def release(self, seq_id: int) -> None:
        """Give back a finished sequence's promise (its KV is freed first); a no-op if never placed."""
        replica, num_blocks = self.placed.pop(seq_id, (None, 0))
        if replica is not None:
            self.promised[replica] -= num_blocks

    # ---- scaling ---------------------------------------------------------------------------
    def add_replica(self, worker) -> None:
        """Serve this stage with one more worker; sequences admitted from now on may go there."""
        info = worker.info()
        assert self.stage in (None, info.stage), f"a stage {info.stage} worker added to stage {self.stage}"
        assert self.block_size in (None, info.kv_block_size), "replicas of a stage share one KV block size"
        self.stage, self.block_size = info.stage, info.kv_block_size
        self.workers.append(worker)
        self.capacity.append(info.kv_num_blocks)
        self.promised.append(0)

    def remove_replica(self, index: int | None = None) -> tuple[object, list[int]]:
        """Take replica `index` (default: the least loaded) out of service and place its sequences
        on the others; the caller rebuilds their KV. Returns the worker and the moved seq_ids.
        Refuses, changing nothing, when it is the last replica or the others lack KV room."""
        if len(self.workers) == 1:
            raise ValueError(f"stage {self.stage} has one replica; it cannot be removed")
        index = self.promised.index(min(self.promised)) if index is None else index
        if not isinstance(index, int) or not 0 <= index < len(self.workers):
            raise ValueError(f"replica index={index!r} is out of range; allowed: 0..{len(self.workers) - 1}")
        moved = sorted((s for s, (r, _) in self.placed.items() if r == index), key=lambda s: -self.placed[s][1])
        room = [c - p for c, p in zip(self.capacity, self.promised)]
        room[index] = -1
        target = {}
        for seq_id in moved:  # largest promise first, each to the replica with the most room
            num_blocks, replica = self.placed[seq_id][1], room.index(max(room))
            if room[replica] < num_blocks:
                raise ValueError(
                    f"stage {self.stage}: replica {index}'s {len(moved)} sequences need "
                    f"{sum(self.placed[s][1] for s in moved)} KV blocks, the other replicas have "
                    f"{self.num_free_blocks - (self.capacity[index] - self.promised[index])} free; retry later"
                )
            room[replica] -= num_blocks
            target[seq_id] = replica
        worker = self.workers.pop(index)
        del self.capacity[index], self.promised[index]
        renumber = lambda r: r - (r > index)  # noqa: E731  replicas after `index` move down one
        self.placed = {s: (renumber(target.get(s, r)), n) for s, (r, n) in self.placed.items()}
        self.promised = [0] * len(self.workers)
        for replica, num_blocks in self.placed.values():
            self.promised[replica] += num_blocks
        return worker, moved

    # ---- the worker interface ----------------------------------------------------------------
    def extend(self, batch: ExtendBatch) -> ExtendResult:
        return self.submit_extend(batch)()

    def submit_extend(self, batch: ExtendBatch) -> Callable[[], ExtendResult]:
        """Start the batch on its sequences' replicas; returns the wait for the merged result."""
        groups: dict[int, list[int]] = {}  # replica -> indices of its segments, in batch order
        for i, seg in enumerate(batch.segments):
            groups.setdefault(self._home(seg.seq_id), []).append(i)
        if len(groups) == 1:
            return _start_extend(self.workers[next(iter(groups))], batch)
        rows, heads, row, head = [], [], 0, 0  # per segment: its packed rows and logits rows
        for seg in batch.segments:
            rows.append(range(row, row + seg.length))
            heads.append(range(head, head + seg.num_heads))
            row, head = row + seg.length, head + seg.num_heads
        waits, row_order, head_order = [], [], []
        for replica, idx in groups.items():
            part_rows = torch.tensor([p for i in idx for p in rows[i]], dtype=torch.long)  # (N_r,)
            part = ExtendBatch(
                segments=[batch.segments[i] for i in idx],
                token_ids=batch.token_ids[part_rows],
                prev_token_ids=None if batch.prev_token_ids is None else batch.prev_token_ids[idx],
                trunk=None if batch.trunk is None else batch.trunk.select(to_device(part_rows, batch.trunk.x.device)),
            )
            waits.append(_start_extend(self.workers[replica], part))
            row_order.append(part_rows)
            head_order.extend(h for i in idx for h in heads[i])
        places, head_places = torch.cat(row_order), torch.tensor(head_order, dtype=torch.long)  # (N,), (M,)
        return lambda: _merge([wait() for wait in waits], places, head_places)

    def rollback(self, seq_id: int, length: int) -> None:
        self.workers[self._home(seq_id)].rollback(seq_id, length)

    def free(self, seq_id: int) -> None:
        if seq_id in self.placed:
            self.workers[self.placed[seq_id][0]].free(seq_id)

    def info(self) -> WorkerInfo:
        """The stage's: its first replica's, with KV and memory summed over replicas."""
        infos = [w.info() for w in self.workers]
        return replace(infos[0], kv_num_blocks=sum(i.kv_num_blocks for i in infos),
                       kv_free_blocks=sum(i.kv_free_blocks for i in infos),
                       resident_bytes=sum(i.resident_bytes for i in infos))

    def _home(self, seq_id: int) -> int:
        assert seq_id in self.placed, f"stage {self.stage}: sequence {seq_id} was never placed on a replica"
        return self.placed[seq_id][0]


def _start_extend(worker, batch: ExtendBatch) -> Callable[[], ExtendResult]:
    """Start an extend; returns the wait for its result. An in-process worker computes it now."""
    submit = getattr(worker, "submit_extend", None)
    if submit is not None:
        return submit(batch)
    result = worker.extend(batch)
    return lambda: result


def _merge(results: list[ExtendResult], rows: torch.Tensor, heads: torch.Tensor) -> ExtendResult:
    """The parts' results, concatenated in part order, put back in the batch's packed order:
    `rows` (N,) and `heads` (M,) give each concatenated row's place in the original batch."""
    trunk = logits = None
    if results[0].trunk is not None:
        device, dtype = results[0].trunk.x.device, results[0].trunk.x.dtype
        order = to_device(_inverse(rows), device)  # a host index would be a blocking copy
        trunk = TrunkState.cat([r.trunk.to(device, dtype) for r in results]).select(order)  # (N, C)
    if len(heads):
        parts = [r.logits for r in results if r.logits is not None]
        device = parts[0].device
        logits = torch.cat([to_device(p, device) for p in parts])[to_device(_inverse(heads), device)]  # (M, V)
    return ExtendResult(trunk=trunk, logits=logits)


def _inverse(places: torch.Tensor) -> torch.Tensor:
    """(N,) the permutation that undoes `places`: output row places[j] is concatenated row j."""
    inverse = torch.empty_like(places)
    inverse[places] = torch.arange(len(places))
    return inverse
