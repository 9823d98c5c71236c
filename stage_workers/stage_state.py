"""What one stage worker keeps about its sequences between steps, and how a step is undone.

Per sequence: its `SeqSpec` (sent once, when it first runs), the positions in this stage's KV
cache, rows computed upstream that this stage still owes (`parked`: a WAND exit, a draft), at
the last stage the Log-OP sums of drafted positions awaiting verification (`held`), sampled
drafts' distributions on their way to verification (`drafted`), and, for a sequence whose
decoding controls read earlier tokens, the token at every computed position (`history`,
stage_workers/controls.py). Before a step first touches a sequence, its state is noted, so a
step that fails anywhere can be undone here exactly (KV rolled back, parked, held and drafted
rows put back).

Prefix caching: a new sequence may start with cached KV blocks (`SeqSpec.prefix_blocks`), a
number of them on each stage. Where this stage has more of them than the next, the next stage
computes the difference from this stage's output rows, which this worker kept with the blocks
(`block_rows`, when this stage was their deepest) and lends the sequence (`lent`), to go
downstream ahead of its first computed rows. The deepest stage of a sequence that keeps rows
(`SeqSpec.keep_rows`) holds its output rows (`kept_rows`) until the coordinator says which
blocks are kept (`keep`). It knows the worker's rollback, free and KV-block verbs; nothing of
channels, hashes or decisions.
"""

from __future__ import annotations

import torch

from .messages import SeqSpec
from .rows import Rows, cat_rows

UNDO_STEPS = 4  # steps a worker can still undo: the one it runs and the few before


class StageState:
    def __init__(self, worker):
        self.worker = worker  # its KV cache is rolled back and freed with the sequences
        self.block_size = worker.info().kv_block_size  # positions per KV block (a cached block's too)
        self.specs: dict[int, SeqSpec] = {}  # the sequences this worker holds (it is among their homes)
        self.computed: dict[int, int] = {}  # seq_id -> positions in this stage's KV cache
        self.parked: dict[int, Rows] = {}  # rows computed upstream that this stage owes (WAND, drafts)
        self.held: dict[int, Rows] = {}  # last stage: drafted positions' sums awaiting verification
        # seq_id -> token at each position (penalties, min_tokens); valid up to computed[seq_id]
        self.history: dict[int, list[int]] = {}
        # speculative sampling: the round's sampled drafts' distributions q, (n, V), on their way to
        # (or at) the verifying stage
        self.drafted: dict[int, torch.Tensor] = {}
        # prefix caching: rows of cached blocks going downstream ahead of a new sequence's first rows;
        # the deepest stage's output rows not yet kept; block id -> its output rows (this stage its deepest)
        self.lent: dict[int, Rows] = {}
        self.kept_rows: dict[int, Rows] = {}
        self.block_rows: dict[int, Rows] = {}
        self._undo: list[tuple[int, dict]] = []  # the last steps begun: (step, seq_id -> state before it)
        self._stores = (self.parked, self.held, self.drafted, self.lent, self.kept_rows)  # what a step may change

    def learn(self, spec: SeqSpec) -> None:
        seq_id, k = spec.seq_id, self.worker.stage
        known = seq_id in self.specs
        self.specs[seq_id] = spec
        if known:
            return  # sent again (a plan that may not have reached every worker)
        if spec.controls is not None and spec.controls.uses_history:
            self.history.setdefault(seq_id, list(spec.prefix_tokens))
        num_cached = spec.prefix_lengths[k] if spec.prefix_lengths else 0
        if num_cached:
            self.worker.share(seq_id, list(spec.prefix_blocks[:num_cached]))
            self.computed[seq_id] = num_cached * self.block_size
            deeper = spec.prefix_lengths[k + 1] if k < spec.reach else num_cached
            if deeper < num_cached:
                self.lent[seq_id] = cat_rows([self.block_rows[b] for b in spec.prefix_blocks[deeper:num_cached]])

    def keep(self, seq_id: int, index: int, block_id: int, first_stage: int) -> None:
        """The sequence's full block `index` is kept under `block_id` on stages first_stage..reach
        (block_id -1: not kept); the stage before those no longer needs the rows it kept for it."""
        k, spec = self.worker.stage, self.specs.get(seq_id)
        if k == first_stage - 1:
            self.block_rows.pop(block_id, None)
        if spec is None:
            return
        if block_id >= 0 and first_stage <= k <= spec.reach:
            self.worker.keep(block_id, seq_id, index)
        rows = self.kept_rows.get(seq_id)
        if rows is not None and k == spec.reach:
            end = (index + 1) * self.block_size
            part = rows.since(end - self.block_size)
            part = None if part is None else part.before(end)
            if block_id >= 0 and first_stage <= k and part is not None and len(part) == self.block_size:
                self.block_rows[block_id] = part.kept()
            later = rows.since(end)
            if later is None:
                del self.kept_rows[seq_id]
            else:
                self.kept_rows[seq_id] = later

    def evict(self, block_id: int, first_stage: int) -> None:
        if self.worker.stage >= first_stage:
            self.worker.evict(block_id)
            self.block_rows.pop(block_id, None)

    def record(self, seq_id: int, start: int, token_ids: list[int]) -> None:
        """The tokens at positions start.. were computed here (what lies beyond a rollback or an
        undone step is overwritten, never read)."""
        history = self.history.get(seq_id)
        if history is not None:
            del history[start:]
            history.extend(token_ids)

    def begin(self, step: int) -> None:
        """A new step: what it changes is noted from now on (`remember`). The last few steps stay
        undoable: a decode run (stage_workers/decode_run.py) may begin one before the last ends."""
        self._undo = self._undo[-(UNDO_STEPS - 1) :] + [(step, {})]

    def remember(self, seq_id: int) -> None:
        """Note a sequence's state before this step first touches it (for `undo`)."""
        saved = self._undo[-1][1]
        if seq_id not in saved:
            saved[seq_id] = (self.computed.get(seq_id, 0), [store.get(seq_id) for store in self._stores])

    def undo(self, step: int) -> None:
        """Put every sequence this step and any later one touched back as it was (the step failed
        somewhere, or a decode run ended before it); a step not run here, or undone, changes nothing."""
        while self._undo and self._undo[-1][0] >= step:
            for seq_id, (computed, before) in self._undo.pop()[1].items():
                if self.computed.get(seq_id, 0) > computed:
                    self.worker.rollback(seq_id, computed)
                self.computed[seq_id] = computed
                for store, rows in zip(self._stores, before):
                    if rows is None:
                        store.pop(seq_id, None)
                    else:
                        store[seq_id] = rows

    def restart(self) -> None:
        """Forget everything: the worker lost its state (its process restarted)."""
        for store in (self.specs, self.computed, self.history, self.block_rows, *self._stores):
            store.clear()
        self._undo = []

    def forget(self, seq_id: int) -> None:
        self.worker.free(seq_id)
        for store in (self.specs, self.computed, self.history, *self._stores):
            store.pop(seq_id, None)

    def roll_back(self, seq_id: int, length: int) -> None:
        """Forget positions >= length (rejected drafts); a round's drafts are drafted anew."""
        self.drafted.pop(seq_id, None)
        if self.computed.get(seq_id, 0) > length:
            self.worker.rollback(seq_id, length)
            self.computed[seq_id] = length
        for store in (self.parked, self.held, self.kept_rows):
            rows = store.get(seq_id)
            if rows is not None and (kept := rows.before(length)) is not rows:
                if kept is None:
                    del store[seq_id]
                else:
                    store[seq_id] = kept
