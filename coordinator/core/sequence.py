"""A live sequence: its tokens, what each stage has computed, and what the caller gets back.

The pipeline owns `num_computed`; the mode decoder owns the token list and the results.
Invariant, per sequence: num_computed[0] >= num_computed[1] >= ..., and the worker of stage k
holds stage k-1's boundary states for exactly positions num_computed[k]..num_computed[k-1]-1
(parked there by a WAND exit or a speculative draft) until stage k next runs for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from coordinator.core.requests import GenerationRequest, ScoreRequest


@dataclass
class Sequence:
    seq_id: int
    request: GenerationRequest | ScoreRequest
    tokens: list[int]  # prompt, committed tokens, then speculative drafts in flight
    num_stages: int
    reach: int  # the deepest stage it may run (its KV is placed on stages 0..reach)
    num_committed: int = 0  # prompt + accepted new tokens; set to the prompt length at creation
    stages_used: list[int] = field(default_factory=list)  # WAND: exit stage per new token
    num_proposed: int = 0  # speculative drafts proposed / accepted
    num_accepted: int = 0
    finish_reason: str | None = None  # "length" | "stop" | "cancelled" | "error: ..." once finished
    error: BaseException | None = None  # why a step failed for this sequence
    num_computed: list[int] = field(default_factory=list)
    decoder: object = None  # the mode's decoder (coordinator.core.modes), set by the engine
    kv_blocks: list[int] = field(default_factory=list)  # KV blocks promised on each stage
    recoveries: int = 0  # times rebuilt after a lost worker
    logprobs: list[float] = field(default_factory=list)  # each new token's log-prob, when the request asks
    top_logprobs: list[tuple[tuple[int, float], ...]] = field(default_factory=list)  # and its alternatives
    # prefix caching (coordinator/core/prefix_cache.py)
    uses_cache: bool = False  # looks its prompt up in the cache and offers it its full blocks
    keeps_rows: bool = False  # its deepest stage is not the last: it keeps its blocks' output rows there
    prefix_blocks: tuple[int, ...] = ()  # the cached blocks it started with (block ids, chain order)
    prefix_lengths: list[int] = field(default_factory=list)  # how many of them each stage 0..reach used
    num_cached_tokens: int = 0  # prompt positions it found cached on every stage it runs
    cache_keys: list[bytes] = field(default_factory=list)  # chain hashes of its full blocks, as computed
    cache_blocks: list = field(default_factory=list)  # the cached blocks it uses (it holds a reference)
    num_kept: int = 0  # its full blocks already offered to the cache
    computing: list[tuple[int, bytes]] = field(default_factory=list)  # (index, hash) of prompt blocks it computes

    def __post_init__(self):
        self.num_committed = self.num_committed or len(self.tokens)
        self.num_prompt = len(self.tokens)
        self.num_computed = [0] * self.num_stages

    def restart_from_committed(self) -> None:
        """Forget all computed state (KV is freed by the caller); keep the committed tokens."""
        del self.tokens[self.num_committed :]
        self.num_computed = [0] * self.num_stages
        self.prefix_blocks, self.prefix_lengths, self.num_kept = (), [], 0

    def start_cached(self, blocks: tuple[int, ...], lengths: list[int], block_size: int) -> None:
        """Start from cached blocks: stage k has computed the first lengths[k] of them."""
        self.prefix_blocks, self.prefix_lengths = blocks, lengths
        self.num_computed[: len(lengths)] = [n * block_size for n in lengths]
        self.num_cached_tokens = lengths[-1] * block_size

    @property
    def num_unfed(self) -> int:
        """Tokens known but not yet fed to stage 0."""
        return len(self.tokens) - self.num_computed[0]

    @property
    def new_tokens(self) -> list[int]:
        return self.tokens[self.num_prompt : self.num_committed]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def commit(self, new: list[int], decision=None) -> list[int]:
        """Append accepted tokens up to a stop token or max_new_tokens; returns those kept. The
        `decision` that chose them brings their log-probs, when the request asks for them."""
        request = self.request
        kept = []
        for token in new:
            kept.append(token)
            if token in request.stop_token_ids:
                self.finish_reason = "stop"
                break
            if self.num_committed - self.num_prompt + len(kept) >= request.max_new_tokens:
                self.finish_reason = "length"
                break
        del self.tokens[self.num_committed :]
        self.tokens.extend(kept)
        self.num_committed = len(self.tokens)
        if decision is not None and decision.logprobs:
            self.logprobs += decision.logprobs[: len(kept)]
            self.top_logprobs += decision.top[: len(kept)]
        return kept
