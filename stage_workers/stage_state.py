"""What one stage worker keeps about its sequences between steps, and how a step is undone.

Per sequence: its `SeqSpec` (sent once, when it first runs), the positions in this stage's KV
cache, rows computed upstream that this stage still owes (`parked`: a WAND exit, a draft), at
the last stage the Log-OP sums of drafted positions awaiting verification (`held`), sampled
drafts' distributions on their way to verification (`drafted`), and, for a sequence whose
decoding controls read earlier tokens, the token at every computed position (`history`,
stage_workers/controls.py). Before a step first touches a sequence, its state is noted, so a
step that fails anywhere can be undone here exactly (KV rolled back, parked, held and drafted
rows put back). It knows the worker's rollback
and free verbs; nothing of channels or decisions.
"""

from __future__ import annotations

import torch

from .messages import SeqSpec
from .rows import Rows


class StageState:
    def __init__(self, worker):
        self.worker = worker  # its KV cache is rolled back and freed with the sequences
        self.specs: dict[int, SeqSpec] = {}  # the sequences this worker holds (it is among their homes)
        self.computed: dict[int, int] = {}  # seq_id -> positions in this stage's KV cache
        self.parked: dict[int, Rows] = {}  # rows computed upstream that this stage owes (WAND, drafts)
        self.held: dict[int, Rows] = {}  # last stage: drafted positions' sums awaiting verification
        # seq_id -> token at each position (penalties, min_tokens); valid up to computed[seq_id]
        self.history: dict[int, list[int]] = {}
        # speculative sampling: the round's sampled drafts' distributions q, (n, V), on their way to
        # (or at) the verifying stage
        self.drafted: dict[int, torch.Tensor] = {}
        self._undo: tuple[int, dict] | None = None  # (step, seq_id -> state before it)

    def learn(self, spec: SeqSpec) -> None:
        self.specs[spec.seq_id] = spec
        if spec.controls is not None and spec.controls.uses_history:
            self.history.setdefault(spec.seq_id, [])

    def record(self, seq_id: int, start: int, token_ids: list[int]) -> None:
        """The tokens at positions start.. were computed here (what lies beyond a rollback or an
        undone step is overwritten, never read)."""
        history = self.history.get(seq_id)
        if history is not None:
            del history[start:]
            history.extend(token_ids)

    def begin(self, step: int) -> None:
        """A new step: what it changes is noted from now on (`remember`)."""
        self._undo = (step, {})

    def remember(self, seq_id: int) -> None:
        """Note a sequence's state before this step first touches it (for `undo`)."""
        saved = self._undo[1]
        if seq_id not in saved:
            saved[seq_id] = (self.computed.get(seq_id, 0), self.parked.get(seq_id), self.held.get(seq_id),
                             self.drafted.get(seq_id))

    def undo(self, step: int) -> None:
        """Put every sequence the step touched back as it was (the step failed somewhere)."""
        if self._undo is None or self._undo[0] != step:
            return  # this worker did not run that step, or has undone it already
        for seq_id, (computed, parked, held, drafted) in self._undo[1].items():
            if self.computed.get(seq_id, 0) > computed:
                self.worker.rollback(seq_id, computed)
            self.computed[seq_id] = computed
            for store, rows in ((self.parked, parked), (self.held, held), (self.drafted, drafted)):
                if rows is None:
                    store.pop(seq_id, None)
                else:
                    store[seq_id] = rows
        self._undo = None

    def restart(self) -> None:
        """Forget everything: the worker lost its state (its process restarted)."""
        for store in (self.specs, self.computed, self.parked, self.held, self.history, self.drafted):
            store.clear()
        self._undo = None

    def forget(self, seq_id: int) -> None:
        self.worker.free(seq_id)
        for store in (self.specs, self.computed, self.parked, self.held, self.history, self.drafted):
            store.pop(seq_id, None)

    def roll_back(self, seq_id: int, length: int) -> None:
        """Forget positions >= length (rejected drafts); a round's drafts are drafted anew."""
        self.drafted.pop(seq_id, None)
        if self.computed.get(seq_id, 0) > length:
            self.worker.rollback(seq_id, length)
            self.computed[seq_id] = length
        for store in (self.parked, self.held):
            rows = store.get(seq_id)
            if rows is not None and (kept := rows.before(length)) is not rows:
                if kept is None:
                    del store[seq_id]
                else:
                    store[seq_id] = kept
