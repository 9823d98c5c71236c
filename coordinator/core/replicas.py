"""`StageReplicas`: one stage served by one or more identical workers: KV placement and scaling.

A sequence is placed on one replica when the engine admits it (the replica with the most KV
blocks not yet promised, if the sequence fits there) and stays there, since its KV cache lives
there; the step plan names that worker (`home_id`), and the workers of adjacent stages hand
each sequence's rows to each other accordingly. Replicas come and go at runtime: removing one
places its sequences on the others, whose KV the engine then rebuilds from committed tokens. It
knows workers' ids and KV blocks; nothing of tokens, modes or Ray.
"""

from __future__ import annotations

from dataclasses import replace

from stage_workers.messages import WorkerInfo


class StageReplicas:
    def __init__(self, workers: list, worker_ids: list[int]):
        assert workers and len(workers) == len(worker_ids), "a stage needs at least one worker, each with an id"
        self.workers: list = []
        self.worker_ids: list[int] = []
        self.capacity: list[int] = []  # KV blocks of each replica
        self.promised: list[int] = []  # KV blocks of each replica promised to its sequences
        self.cached: list[int] = []  # KV blocks of each replica held by the prefix cache (prefix_cache.py)
        self.placed: dict[int, tuple[int, int]] = {}  # seq_id -> (replica, KV blocks promised there)
        self.whole: dict[int, int] = {}  # seq_id -> KV blocks it needs without cached blocks (if moved)
        self.stage: int | None = None
        self.block_size: int | None = None  # positions per KV block, the same on every replica
        for worker, worker_id in zip(workers, worker_ids):
            self.add_replica(worker, worker_id)

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
        """KV blocks neither promised nor held by the prefix cache, over all replicas."""
        return self.num_blocks - sum(self.promised) - sum(self.cached)

    def place(self, seq_id: int, num_blocks: int, replica: int, whole: int) -> None:
        """Promise a sequence KV blocks on a replica (`whole`: all it needs, cached blocks included);
        it runs there until released."""
        self.placed[seq_id] = (replica, num_blocks)
        self.whole[seq_id] = whole
        self.promised[replica] += num_blocks

    def promise(self, seq_id: int, num_blocks: int) -> None:
        """Change what a placed sequence is promised (a rebuilt sequence computes all its positions again)."""
        replica, before = self.placed[seq_id]
        self.placed[seq_id] = (replica, num_blocks)
        self.promised[replica] += num_blocks - before

    def hold(self, seq_id: int) -> None:
        """One of the sequence's blocks is now held by the prefix cache, not promised to it."""
        replica, num_blocks = self.placed[seq_id]
        self.placed[seq_id] = (replica, num_blocks - 1)
        self.promised[replica] -= 1
        self.cached[replica] += 1

    def unhold(self, worker_id: int) -> None:
        """The prefix cache let one block of this worker go."""
        self.cached[self.worker_ids.index(worker_id)] -= 1

    def release(self, seq_id: int) -> None:
        """Give back a finished sequence's promise (its KV is freed first); a no-op if never placed."""
        replica, num_blocks = self.placed.pop(seq_id, (None, 0))
        self.whole.pop(seq_id, None)
        if replica is not None:
            self.promised[replica] -= num_blocks

    # ---- scaling ---------------------------------------------------------------------------
    def add_replica(self, worker, worker_id: int) -> None:
        """Serve this stage with one more worker; sequences admitted from now on may go there."""
        info = worker.info()
        assert self.stage in (None, info.stage), f"a stage {info.stage} worker added to stage {self.stage}"
        assert self.block_size in (None, info.kv_block_size), "replicas of a stage share one KV block size"
        self.stage, self.block_size = info.stage, info.kv_block_size
        self.workers.append(worker)
        self.worker_ids.append(worker_id)
        self.capacity.append(info.kv_num_blocks)
        self.promised.append(0)
        self.cached.append(0)

    def remove_replica(self, index: int | None = None) -> tuple[object, int, list[int]]:
        """Take replica `index` (default: the least loaded) out of service and place its sequences
        on the others; the caller rebuilds their KV. Returns the worker, its id and the moved seq_ids.
        Refuses, changing nothing, when it is the last replica or the others lack KV room."""
        if len(self.workers) == 1:
            raise ValueError(f"stage {self.stage} has one replica; it cannot be removed")
        index = self.promised.index(min(self.promised)) if index is None else index
        if not isinstance(index, int) or not 0 <= index < len(self.workers):
            raise ValueError(f"replica index={index!r} is out of range; allowed: 0..{len(self.workers) - 1}")
        # a moved sequence computes all its positions again, on another replica: it needs its whole KV
        moved = sorted((s for s, (r, _) in self.placed.items() if r == index), key=lambda s: -self.whole[s])
        room = [c - p - h for c, p, h in zip(self.capacity, self.promised, self.cached)]
        room[index] = -1
        target = {}
        for seq_id in moved:  # largest first, each to the replica with the most room
            num_blocks, replica = self.whole[seq_id], room.index(max(room))
            if room[replica] < num_blocks:
                raise ValueError(
                    f"stage {self.stage}: replica {index}'s {len(moved)} sequences need "
                    f"{sum(self.whole[s] for s in moved)} KV blocks, the other replicas have "
                    f"{sum(max(r, 0) for r in room)} free; retry later"
                )
            room[replica] -= num_blocks
            target[seq_id] = replica
        worker, worker_id = self.workers.pop(index), self.worker_ids.pop(index)
        del self.capacity[index], self.promised[index], self.cached[index]
        renumber = lambda r: r - (r > index)  # noqa: E731  replicas after `index` move down one
        self.placed = {s: (renumber(target[s]), self.whole[s]) if s in target else (renumber(r), n)
                       for s, (r, n) in self.placed.items()}
        self.promised = [0] * len(self.workers)
        for replica, num_blocks in self.placed.values():
            self.promised[replica] += num_blocks
        return worker, worker_id, moved

    def refresh_capacity(self, worker_id: int) -> list[int]:
        """Re-read a restarted replica's KV size (sized from free memory, it may have changed);
        returns the sequences placed there that no longer fit, largest first."""
        i = self.worker_ids.index(worker_id)
        self.capacity[i] = self.workers[i].info().kv_num_blocks
        load, over = self.promised[i] + self.cached[i], []
        for num_blocks, seq_id in sorted(((n, s) for s, (r, n) in self.placed.items() if r == i), reverse=True):
            if load <= self.capacity[i]:
                break
            over.append(seq_id)
            load -= num_blocks
        return over

    # ---- who holds what --------------------------------------------------------------------------
    def home_id(self, seq_id: int) -> int:
        """The id of the worker holding the sequence's KV on this stage."""
        assert seq_id in self.placed, f"stage {self.stage}: sequence {seq_id} was never placed on a replica"
        return self.worker_ids[self.placed[seq_id][0]]

    def info(self) -> WorkerInfo:
        """The stage's: its first replica's, with KV and memory summed over replicas."""
        infos = [w.info() for w in self.workers]
        return replace(infos[0], kv_num_blocks=sum(i.kv_num_blocks for i in infos),
                       kv_free_blocks=sum(i.kv_free_blocks for i in infos),
                       resident_bytes=sum(i.resident_bytes for i in infos))
