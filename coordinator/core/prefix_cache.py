"""Prefix caching that knows depth: full KV blocks kept across requests, found by their tokens' hash.

vLLM's automatic prefix caching, per stage. A full block of a sequence's tokens is named by the
hash of its parent block's hash, its token ids and, for the first block, the request's
`cache_salt` (the chain carries it on), so one hash means one prefix. The hash maps to one block
id, which means the same tokens on every worker; each worker keeps only its own layers' KV under
it (stage_workers/kv_cache.py `keep`).

Depth: a block records, per stage, the worker holding its KV there (None: no request computed
that stage for it). A request that stops shallower (prefix or single-stage mode) leaves the
deeper stages None, and its deepest stage keeps the block's output rows (`rows_at`), so a deeper
request later computes only the missing stages for those positions: the next stage catches up
from those rows, as after a WAND exit, and nothing cached is computed again. A request uses, on
each stage, the leading blocks held there by its own worker (`match`); a replica is chosen by
where the prefix is held (`homes`), when it has room.

Blocks are reference-counted by the running sequences that use them (hit or kept them); blocks
no sequence uses wait in an LRU and are evicted only when a replica needs their room. A lost
worker's blocks are dropped on its stage and the deeper ones, everywhere at once. The KV each
replica's cache holds is counted in its `StageReplicas.cached`, apart from blocks promised to
running sequences. The cache knows hashes, block ids, worker ids and counts; nothing of tensors,
modes or Ray.
"""

from __future__ import annotations

import hashlib
import itertools
from array import array
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from coordinator.core.replicas import StageReplicas
from coordinator.core.sequence import Sequence


@dataclass(eq=False)
class CachedBlock:
    block_id: int
    key: bytes
    workers: list[int | None]  # per stage: the worker holding its KV there (None: not computed there)
    rows_at: int | None  # the stage whose worker keeps the block's output rows (its deepest, if not the last)
    refs: int = 0  # running sequences that use it


@dataclass
class CacheStats:
    queries: int = 0  # prompt tokens looked up (vLLM's prefix_cache_queries)
    hits: int = 0  # of them, found cached on every stage the request runs
    evicted: int = 0  # blocks evicted for room


@dataclass
class PrefixCache:
    stages: list[StageReplicas]  # KV accounting per replica (`cached` blocks), shared with the engine
    block_size: int
    evict: Callable[[int, int], None]  # tell the workers: (block id, first stage) is no longer kept
    blocks: dict[bytes, CachedBlock] = field(default_factory=dict)
    lru: OrderedDict = field(default_factory=OrderedDict)  # block_id -> block, unused blocks, oldest first
    stats: CacheStats = field(default_factory=CacheStats)

    def __post_init__(self):
        self.num_stages = len(self.stages)
        self._ids = itertools.count()
        self._unused: dict[tuple[int, int], int] = {}  # (stage, worker) -> unused blocks held there
        self._computing: dict[bytes, int] = {}  # prompt blocks running sequences compute -> how many of them

    # ---- hashing -------------------------------------------------------------------------------
    def keys(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """The chain hashes of the sequence's first `num_blocks` full blocks (extending seq.cache_keys)."""
        keys, size = seq.cache_keys, self.block_size
        while len(keys) < num_blocks:
            j = len(keys)
            parent = keys[-1] if keys else b"salt:" + (seq.request.cache_salt or "").encode()
            keys.append(hashlib.sha256(parent + array("q", seq.tokens[j * size : (j + 1) * size]).tobytes()).digest())
        return keys[:num_blocks]

    def _prompt_keys(self, seq: Sequence) -> list[bytes]:
        """The hashes of the prompt's blocks a sequence may find cached: one position at least is
        computed (the first token's distribution)."""
        return self.keys(seq, (seq.num_prompt - 1) // self.block_size)

    # ---- admission -----------------------------------------------------------------------------
    def homes(self, seq: Sequence) -> list[int | None]:
        """Per stage up to the sequence's reach: the worker holding its prompt's first cached block."""
        keys = self._prompt_keys(seq)
        first = self.blocks.get(keys[0]) if keys else None
        return [None if first is None else first.workers[k] for k in range(seq.reach + 1)]

    def match(self, seq: Sequence, homes: list[int]) -> tuple[list[CachedBlock], list[int]]:
        """The cached blocks the sequence can start with, if placed on `homes`, and how many of them
        each stage 0..reach uses. Stage k uses the leading blocks its worker holds; past the next
        stage's blocks, only those whose output rows this stage kept (the next stage catches up
        from them)."""
        chain = []
        for key in self._prompt_keys(seq):
            block = self.blocks.get(key)
            if block is None:
                break
            chain.append(block)
        held = []
        for k, worker in enumerate(homes):
            n = 0
            while n < len(chain) and chain[n].workers[k] == worker and (not held or n < held[-1]):
                n += 1
            held.append(n)
        lengths = [0] * len(homes)
        for k in range(len(homes) - 1, -1, -1):
            n = held[k] if k == len(homes) - 1 else lengths[k + 1]
            while n < held[k] and chain[n].rows_at == k:
                n += 1
            lengths[k] = n
        return chain[: lengths[0]], lengths

    def computing(self, seq: Sequence) -> bool:
        """Whether the first block of the prompt that the cache lacks is being computed by a running
        sequence: the request then waits for it to be kept rather than computing it alongside."""
        for key in self._prompt_keys(seq):
            if key not in self.blocks:
                return key in self._computing
        return False

    def room(self, stage: int, replica: int, protect: list[CachedBlock] = ()) -> int:
        """KV blocks a replica can give: free, or held by unused cached blocks (except `protect`)."""
        replicas, worker = self.stages[stage], self.stages[stage].worker_ids[replica]
        unused = self._unused.get((stage, worker), 0) - sum(b.refs == 0 and b.workers[stage] == worker for b in protect)
        return replicas.capacity[replica] - replicas.promised[replica] - replicas.cached[replica] + unused

    def use(self, seq: Sequence, blocks: list[CachedBlock]) -> None:
        for block in blocks:
            self._ref(block, +1)
        seq.cache_blocks.extend(blocks)

    def start(self, seq: Sequence) -> None:
        """The sequence is admitted: its prompt's full blocks past its cached ones are being computed."""
        keys = self.keys(seq, seq.num_prompt // self.block_size)
        seq.computing = list(enumerate(keys))[len(seq.prefix_blocks) :]
        for _, key in seq.computing:
            self._computing[key] = self._computing.get(key, 0) + 1

    def release(self, seq: Sequence) -> None:
        """The sequence no longer uses its blocks (it ended, or is rebuilt)."""
        for block in seq.cache_blocks:
            self._ref(block, -1)
        seq.cache_blocks = []
        self._computed(seq, seq.num_prompt)

    def make_room(self, stage: int) -> None:
        """Evict unused blocks, oldest first, until no replica of `stage` holds more than it has."""
        replicas = self.stages[stage]
        for r, worker in enumerate(replicas.worker_ids):
            over = replicas.promised[r] + replicas.cached[r] - replicas.capacity[r]
            for block in [b for b in self.lru.values() if b.workers[stage] == worker][:max(over, 0)]:
                self._drop_block(block, 0)
                self.stats.evicted += 1

    # ---- keeping a sequence's blocks -------------------------------------------------------------
    def keep(self, seq: Sequence) -> list[tuple[int, int, int, int]]:
        """Keep the sequence's full blocks computed on every stage it runs (committed tokens only);
        returns the workers' `StepPlan.keeps` entries."""
        num_full = min(seq.num_committed, seq.num_computed[seq.reach]) // self.block_size
        if num_full <= seq.num_kept:
            return []
        entries, homes = [], [stage.home_id(seq.seq_id) for stage in self.stages[: seq.reach + 1]]
        for j, key in enumerate(self.keys(seq, num_full)[seq.num_kept :], start=seq.num_kept):
            first = self._keep_block(seq, j, key, homes)
            if first is not None:
                entries.append((seq.seq_id, j, self.blocks[key].block_id, first))
            elif seq.keeps_rows:
                entries.append((seq.seq_id, j, -1, 0))  # not kept: the deepest stage lets its rows go
        self._computed(seq, num_full)
        seq.num_kept = max(seq.num_kept, num_full)
        return entries

    def _computed(self, seq: Sequence, num_blocks: int) -> None:
        """The sequence's blocks before `num_blocks` are no longer being computed (kept, or let go)."""
        while seq.computing and seq.computing[0][0] < num_blocks:
            key = seq.computing.pop(0)[1]
            self._computing[key] -= 1
            if not self._computing[key]:
                del self._computing[key]

    def _keep_block(self, seq: Sequence, j: int, key: bytes, homes: list[int]) -> int | None:
        """Keep block j on the stages past the cached block's depth (all of them for a new block),
        which the sequence computed: the same tokens give the same KV whichever request computed
        them. Returns the first such stage (None: nothing new)."""
        reach, block = seq.reach, self.blocks.get(key)
        if block is None:
            block = self.blocks[key] = CachedBlock(next(self._ids), key, [None] * self.num_stages, None)
        first = next((k for k, worker in enumerate(block.workers) if worker is None), self.num_stages)
        if first > reach:
            return None
        if all(b is not block for b in seq.cache_blocks):
            self.use(seq, [block])
        for k in range(first, reach + 1):
            block.workers[k] = homes[k]
            self.stages[k].hold(seq.seq_id)
        block.rows_at = reach if reach < self.num_stages - 1 else None
        return first

    # ---- losing workers --------------------------------------------------------------------------
    def drop(self, stage: int, worker_id: int | None = None) -> None:
        """A worker of `stage` lost its KV (None: every worker of it), or left: its blocks are no
        longer held on that stage or any deeper one, anywhere."""
        current = set(self.stages[stage].worker_ids)
        for block in list(self.blocks.values()):
            worker = block.workers[stage]
            if worker is None or (worker_id is not None and worker != worker_id and worker in current):
                continue
            self._drop_block(block, stage)

    def drop_missing(self, stage: int) -> None:
        """Blocks held by a worker no longer among the stage's replicas go (a replica was removed)."""
        current = set(self.stages[stage].worker_ids)
        for worker in {b.workers[stage] for b in self.blocks.values()} - current - {None}:
            self.drop(stage, worker)

    # ---- bookkeeping -------------------------------------------------------------------------------
    def _ref(self, block: CachedBlock, delta: int) -> None:
        block.refs += delta
        if self.blocks.get(block.key) is not block:
            return  # dropped meanwhile (its worker was lost)
        if block.refs == 0 or (delta > 0 and block.refs == 1):
            sign = 1 if block.refs == 0 else -1
            for k, worker in enumerate(block.workers):
                if worker is not None:
                    self._unused[(k, worker)] = self._unused.get((k, worker), 0) + sign
            if block.refs == 0:
                self.lru[block.block_id] = block
            else:
                self.lru.pop(block.block_id, None)

    def _forget_holder(self, block: CachedBlock, k: int) -> None:
        worker = block.workers[k]
        if worker in self.stages[k].worker_ids:
            self.stages[k].unhold(worker)
        if block.refs == 0:
            self._unused[(k, worker)] -= 1
        block.workers[k] = None

    def _drop_block(self, block: CachedBlock, stage: int) -> None:
        """The block is no longer held on `stage` or deeper, anywhere; from stage 0, it is gone."""
        for k in range(stage, self.num_stages):
            if block.workers[k] is not None:
                self._forget_holder(block, k)
        if block.rows_at is not None and block.rows_at >= stage:
            block.rows_at = None
        self.evict(block.block_id, stage)
        if stage == 0:
            del self.blocks[block.key]
            self.lru.pop(block.block_id, None)
