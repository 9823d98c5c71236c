"""Every message of the data plane, as typed dataclasses: coordinator -> workers, worker ->
worker, worker -> coordinator, and a worker's call into its own slice.

A step goes out as one `StepPlan`, the same for every worker: the sequences of each
micro-batch with what enters stage 0 and what to decide. Sequences are described once
(`SeqSpec`, when they first run); after that a plan carries only what changed. Stage k hands
its boundary states straight to stage k+1's worker as a `Boundary`, with the running Log-OP
sums of the positions that need a distribution; the stage that decides a token returns only
`Decision`s (token ids, an exit stage, acceptance, Score log-probs) in a `StepResult`; a sampled
draft's distribution travels with its rows to the verifying stage (`Boundary.drafted`). No
tensor with a vocabulary or hidden dimension is in a `StepResult` of a generation step.
Inside a worker, a call into the slice extends some sequences by a run of new positions each
(`ExtendBatch` -> `ExtendResult`); positions of all sequences in a call are *packed*: row `n`
of every `(N, ...)` tensor belongs to the segment that covers it, segments in order.
Nothing here computes.

Crossing processes, a message pickles its tensors as numpy arrays, which pickle protocol 5
carries as out-of-band buffers, without copying into the pickle stream; the channels
(stage_workers/channels.py) lay those buffers into shared memory. What arrives may be a
read-only view of the transport's buffer, so nothing writes into a received message's tensors.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from typing import Literal, NamedTuple

import numpy as np
import torch

from .controls import Controls
from .sampling import SamplingParams
from .transfer import to_device


class WorkerLost(RuntimeError):
    """A stage worker's process went away (its KV cache with it), or stopped answering."""

    def __init__(self, stage: int, detail: str, restarted: bool = True, worker_id: int | None = None):
        super().__init__(f"stage {stage} worker lost: {detail}")
        self.stage = stage
        self.restarted = restarted  # False: the worker stays dead (no restarts left)
        self.worker_id = worker_id  # which of the stage's workers (None: unknown, so all of them)


class PeerLost(ConnectionError):
    """A channel to a neighbouring worker broke (the peer's process or node went away): the worker
    reports it, naming the peer, and the coordinator recovers that peer as a lost worker."""

    def __init__(self, worker_id: int, detail: str):
        super().__init__(f"the channel to worker {worker_id} broke: {detail}")
        self.worker_id = worker_id


class ContractError(RuntimeError):
    """A message broke the data plane's contract (a bug upstream, or a stale peer): the step fails
    on every worker and is undone; the worker goes on serving."""


def require(condition, message: str) -> None:
    """A contract check that holds under `python -O` too (unlike assert)."""
    if not condition:
        raise ContractError(message)


class _Array(NamedTuple):
    """A CPU tensor as it is pickled: its bytes as a numpy array, and the torch dtype's name."""

    array: np.ndarray
    dtype: str

    @staticmethod
    def of(t: torch.Tensor) -> "_Array":
        t = t.detach().cpu().contiguous()
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
    num_logits: int = 0  # stage logits wanted for the last num_logits new positions


@dataclass
class TrunkState:
    """What a downstream slice needs for the packed positions of one call."""

    x: torch.Tensor  # (N, C) residual stream after the upstream boundary layer
    x0: torch.Tensor  # (N, C) smeared input embedding, mixed back in at every layer
    x_backout: torch.Tensor | None  # (N, C) residual after layer n_layer//2, once computed
    __reduce__ = _reduce

    def map(self, fn) -> "TrunkState":
        """`fn` applied to each tensor (the backout residual only once computed)."""
        return TrunkState(fn(self.x), fn(self.x0), None if self.x_backout is None else fn(self.x_backout))

    def to(self, device, dtype) -> "TrunkState":
        return self.map(lambda t: to_device(t, torch.device(device)).to(dtype))

    def select(self, rows: torch.Tensor | slice) -> "TrunkState":
        return TrunkState(self.x[rows], self.x0[rows], None if self.x_backout is None else self.x_backout[rows])

    @staticmethod
    def cat(parts: list["TrunkState"], cat=torch.cat) -> "TrunkState":
        """`cat`: how tensors are put together (the runner passes one that reuses adjacent rows)."""
        if len(parts) == 1:
            return parts[0]
        backouts = [p.x_backout for p in parts]
        require(all(b is None for b in backouts) or all(b is not None for b in backouts),
                "cannot pack trunk states from before and after the backout layer together")
        return TrunkState(cat([p.x for p in parts]), cat([p.x0 for p in parts]),
                          None if backouts[0] is None else cat(backouts))


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
    logits: torch.Tensor | None  # (M, V) fp32 stage logits, M = sum of num_logits, segment order
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
    busy_s: float = 0.0  # seconds spent computing and deciding since the process started (stage utilization)


@dataclass(frozen=True)
class WorkerLocation:
    """Where a stage worker runs."""

    node_id: str  # Ray's node id (hex); "in-process" for a worker in the coordinator's process
    node_ip: str
    device: str
    pid: int


# ---- the step: coordinator -> every worker --------------------------------------------------
# The step's records are NamedTuples: they cross processes as plain tuples (`encode` below), about
# ten times cheaper than pickled dataclasses, so a plan of hundreds of sequences costs microseconds.
Rule = Literal["sample", "wand", "speculative", "score", "logits"]
Action = Literal["none", "decide", "draft"]


class SeqSpec(NamedTuple):
    """What every worker keeps about a sequence while it runs; sent when it first runs (and again
    after a rebuild). The rule says what its deciding stage does:
    - "sample": argmax or sample of the Log-OP of the weighted stages, at the step's deepest stage;
    - "wand": after each stage, exit when the prefix score's margin clears `exit_thresholds`;
    - "speculative": stage `draft_stage` drafts with its own distribution; the last stage verifies;
    - "score": the full-PoE log-prob of given tokens (and top_n alternatives) at every position;
    - "logits": each weighted stage's logits (forward, forward_stage, calibration: never decode).
    """

    seq_id: int
    rule: Rule
    homes: tuple[int, ...]  # the worker holding this sequence's KV on each stage 0..reach
    weights: tuple[float, ...]  # Log-OP weight of every stage (0: not combined)
    alpha: float  # the checkpoint's poe_alpha
    sampling: SamplingParams | None = None  # "sample": None is greedy
    exit_thresholds: tuple[float, ...] = ()  # "wand": safety * bound per stage (+inf: never exit there)
    draft_stage: int = -1  # "speculative"
    top_n: int = 0  # "score": alternatives returned per position
    controls: Controls | None = None  # penalties, bias, min_tokens (stage_workers/controls.py); None: none
    logprobs: int | None = None  # generation: the chosen tokens' log-probs and this many alternatives each
    # prefix caching: the cached blocks its first positions start with (block ids, chain order), and
    # how many of them it uses on each stage 0..reach (non-increasing: deeper stages may lack some)
    prefix_blocks: tuple[int, ...] = ()
    prefix_lengths: tuple[int, ...] = ()
    keep_rows: bool = False  # stage `reach` keeps its output rows of full blocks, for deeper stages' catch-up
    prefix_tokens: tuple[int, ...] = ()  # the cached positions' tokens, for controls that read history

    @property
    def reach(self) -> int:
        """The deepest stage this sequence ever runs (its KV is placed on stages 0..reach)."""
        return len(self.homes) - 1


class SeqStep(NamedTuple):
    """One sequence's part of a step, the same for every worker. Stage 0 computes `tokens`; stage
    k > 0 computes what stage k-1 handed it; each stage up to `depth` runs, and rows computed at
    `depth` (or at a WAND exit) wait in the next stage's worker until it runs for the sequence."""

    seq_id: int
    start: int  # position of tokens[0]
    tokens: tuple[int, ...]  # entering stage 0 this step (at least one)
    prev_token: int  # the token at start - 1 (-1 at position 0): stage 0's smear
    depth: int  # deepest stage that computes this step
    logits_from: int  # positions >= logits_from get a distribution this step
    action: Action = "decide"  # "none": a prompt chunk; "draft": a speculative draft pass
    # draws from the request's generator, for a sampled choice: one for a token or a draft; for a
    # sampled verification, one per draft (its acceptance test) and one for the token after
    uniforms: tuple[float, ...] = ()
    targets: tuple[int, ...] = ()  # "score": the token after each position with logits (-1: none)
    # structured output: the tokens its grammar allows at each position decided (packed bitmasks,
    # stage_workers/controls.py apply_masks): one for a token or a draft, k + 1 for a verification
    masks: tuple[bytes, ...] = ()


class StepPlan(NamedTuple):
    """One step, broadcast to every worker: first the changes (forget, roll back, new sequences),
    then the micro-batches in the order every worker runs them."""

    step: int
    epoch: int  # bumped whenever the topology changes or a step is aborted
    frees: tuple[int, ...] = ()  # sequences to forget on every stage
    rollbacks: tuple[tuple[int, int], ...] = ()  # (seq_id, length): forget positions >= length
    new: tuple[SeqSpec, ...] = ()
    micro_batches: tuple[tuple[SeqStep, ...], ...] = ()
    aborted: tuple[int, ...] = ()  # steps every worker undoes first (they failed somewhere)
    # prefix caching: (seq_id, block index, block id, first stage): the sequence's full block is kept
    # under the id on stages first..reach (id -1: not kept; stage reach's rows of it may go)
    keeps: tuple[tuple[int, int, int, int], ...] = ()
    evictions: tuple[tuple[int, int], ...] = ()  # (block id, first stage): no longer kept on stages first..
    # a decode run (stage_workers/decode_run.py): the workers run this many more steps on their own,
    # each feeding the token decided in the step before; with each sampled sequence's draws for them
    run_ahead: int = 0
    ahead_uniforms: tuple[tuple[int, tuple[float, ...]], ...] = ()


class Grant(NamedTuple):
    """Coordinator -> a decode run's first workers: they may start `step` (it has read step - 2)."""

    step: int


class Edge(NamedTuple):
    """A channel's address: data from worker `src` to worker `dst` (-1: the coordinator)."""

    name: str  # unique: channels are rebuilt, never reused
    src: int
    dst: int
    slot_bytes: int = 1 << 20  # shm: bytes per slot
    num_slots: int = 4  # shm: slots in the ring
    kind: str = "shm"  # shm: one node | dist: torch.distributed over gloo | nccl: tensor bytes GPU to GPU
    store: str = ""  # dist, nccl: HOST:PORT of the coordinator's TCPStore


class Rewire(NamedTuple):
    """A worker's new set of data channels (a replica came or went, or a neighbour restarted)."""

    epoch: int
    inbound: tuple[Edge, ...]  # from upstream workers (this worker creates them)
    outbound: tuple[Edge, ...]  # to downstream workers
    decided_in: tuple[Edge, ...] = ()  # a stage-0 worker's decision edges from the workers that decide
    decided_out: tuple[Edge, ...] = ()  # a deciding worker's decision edges to the stage-0 workers


# ---- worker -> worker ------------------------------------------------------------------------
class Handoff(NamedTuple):
    """One sequence's rows in a `Boundary`: positions start..start+length-1."""

    seq_id: int
    start: int
    length: int
    num_acc: int  # the last num_acc rows carry a Log-OP accumulator
    park: bool  # True: the downstream stage keeps the rows for later (WAND exit, draft); False: compute now
    num_drafted: int = 0  # sampled drafts' distributions q (rows of `Boundary.drafted`) going to the verifier


class Boundary(NamedTuple):
    """What stage k hands one stage k+1 worker in one micro-batch of a step (possibly nothing)."""

    step: int
    micro_batch: int
    handoffs: tuple[Handoff, ...]
    token_ids: torch.Tensor  # (N,) the token at every row
    trunk: TrunkState | None  # (N, C) boundary states; None when there are no rows
    acc: torch.Tensor | None  # (M, V) fp32 Log-OP sums, M = sum of num_acc, handoff order
    drafted: torch.Tensor | None = None  # (Q, V) fp32 sampled drafts' q, Q = sum of num_drafted, handoff order


class Decided(NamedTuple):
    """The decision edge: the tokens a worker decided in a decode run's step, for the sequences'
    stage-0 worker, which feeds them in the next step without waiting for a plan."""

    step: int
    tokens: tuple[tuple[int, int], ...]  # (seq_id, token)


# ---- worker -> coordinator -------------------------------------------------------------------
class Decision(NamedTuple):
    """What a deciding stage returns for a sequence: a handful of numbers. Every sequence of a
    step gets exactly one (from its deepest stage when nothing is decided: token -1)."""

    seq_id: int
    stage: int  # the stage that decided (WAND's exit stage)
    token: int = -1  # the chosen token: the next token, a draft, or the bonus token after verification
    accepted: int = -1  # speculative verification: drafts accepted
    # "score": log p of each target (NaN: no target); a generation asking for log-probs: of each token
    # decided (a verification's accepted drafts, then its token)
    logprobs: tuple[float, ...] = ()
    top: tuple[tuple[tuple[int, float], ...], ...] = ()  # top_n (token, log p) alternatives per position


class StepResult(NamedTuple):
    """One worker's report of a step: sent by a worker that decided something for a sequence (or
    is the deepest stage of a sequence that decides nothing this step: a prompt chunk, stage
    logits), or that failed."""

    step: int
    epoch: int
    worker_id: int
    decisions: tuple[Decision, ...] = ()
    # rule "logits" only (forward, forward_stage, calibration; never a decode step): (seq_id, stage, (n, V))
    logits: tuple[tuple[int, int, torch.Tensor], ...] = ()
    error: str | None = None  # the step failed here: every worker undoes it
    lost_peer: int | None = None  # the failure was a broken channel to this worker (PeerLost)


# ---- the wire format of the step's messages ----------------------------------------------------
def encode(message) -> tuple[tuple, list[torch.Tensor]]:
    """A step message as (plain tuple for `marshal`, tensors laid out raw after it)."""
    kind = type(message)
    if kind is Boundary:  # token ids in the plain part; x, x0 (and the backout residual) as one (S, N, C) tensor
        trunk, tensors = message.trunk, []
        if trunk is not None:
            tensors.append(torch.stack([t for t in (trunk.x, trunk.x0, trunk.x_backout) if t is not None]))
        tensors += [t for t in (message.acc, message.drafted) if t is not None]
        flags = (trunk is not None, trunk is not None and trunk.x_backout is not None, message.acc is not None,
                 message.drafted is not None)
        return (_BOUNDARY, message.step, message.micro_batch, tuple(map(tuple, message.handoffs)),
                tuple(message.token_ids.tolist()), flags), tensors
    if kind is StepPlan:
        new = tuple(spec[:5] + (None if spec.sampling is None else tuple(vars(spec.sampling).values()),) + spec[6:9]
                    + (None if spec.controls is None else tuple(spec.controls),) + spec[10:] for spec in message.new)
        batches = tuple(tuple(map(tuple, mb)) for mb in message.micro_batches)
        return (_PLAN, message.step, message.epoch, tuple(message.frees), tuple(message.rollbacks), new, batches,
                message.aborted, message.keeps, message.evictions, message.run_ahead, message.ahead_uniforms), []
    if kind is StepResult:
        logits = tuple((seq_id, stage) for seq_id, stage, _ in message.logits)
        return (_RESULT, message.step, message.epoch, message.worker_id, tuple(map(tuple, message.decisions)),
                logits, message.error, message.lost_peer), [t for _, _, t in message.logits]
    if kind is Rewire:
        return (_REWIRE, message.epoch) + tuple(tuple(map(tuple, edges)) for edges in message[1:]), []
    if kind is Grant or kind is Decided:
        return (_GRANT if kind is Grant else _DECIDED, *message), []
    raise TypeError(f"{kind.__name__} is not a step message")


def decode(plain: tuple, tensors: list[torch.Tensor]):
    """The inverse of `encode`."""
    kind = plain[0]
    if kind == _BOUNDARY:
        _, step, micro_batch, handoffs, token_ids, (has_trunk, has_backout, has_acc, has_drafted) = plain
        it = iter(tensors)
        states = next(it) if has_trunk else None  # (S, N, C)
        trunk = None if states is None else TrunkState(states[0], states[1], states[2] if has_backout else None)
        return Boundary(step, micro_batch, tuple(Handoff(*h) for h in handoffs), torch.tensor(token_ids, dtype=torch.long),
                        trunk, next(it) if has_acc else None, next(it) if has_drafted else None)
    if kind == _PLAN:
        _, step, epoch, frees, rollbacks, new, batches, aborted, keeps, evictions, run_ahead, ahead_uniforms = plain
        specs = tuple(SeqSpec(*spec[:5], None if spec[5] is None else SamplingParams(*spec[5]), *spec[6:9],
                              None if spec[9] is None else Controls(*spec[9]), *spec[10:]) for spec in new)
        return StepPlan(step, epoch, frees, rollbacks, specs,
                        tuple(tuple(SeqStep(*s) for s in mb) for mb in batches), aborted, keeps, evictions, run_ahead,
                        ahead_uniforms)
    if kind == _RESULT:
        _, step, epoch, worker_id, decisions, logits, error, lost_peer = plain
        return StepResult(step, epoch, worker_id, tuple(Decision(*d) for d in decisions),
                          tuple((seq_id, stage, t) for (seq_id, stage), t in zip(logits, tensors)), error, lost_peer)
    if kind == _REWIRE:
        return Rewire(plain[1], *(tuple(Edge(*e) for e in edges) for edges in plain[2:]))
    if kind == _GRANT:
        return Grant(*plain[1:])
    if kind == _DECIDED:
        return Decided(*plain[1:])
    raise ValueError(f"unknown step message kind {kind!r}")


_BOUNDARY, _PLAN, _RESULT, _REWIRE, _GRANT, _DECIDED = range(6)
