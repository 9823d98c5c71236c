"""What a caller may ask for, validated once at the boundary.

Full, prefix, single-stage and composition modes are all a `Composition` (a stage set with
weights); WAND and speculation have their own mode types. `build_request` turns the card's
Python arguments into a `GenerationRequest` or raises `ValueError` naming the argument, what
was wrong and what is allowed. The gRPC server builds the same objects. Nothing here runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch

from stage_workers.config import ModelConfig
from stage_workers.controls import Controls
from stage_workers.sampling import SamplingParams

MAX_K_DRAFT = 16  # drafts per speculative round; more only wastes verification work
# Log-OP and sampling run in fp32: a stage weight or temperature below MIN_SCALE rounds to 0, a
# weight above MAX_SCALE overflows to inf, and either turns every score into NaN
MIN_SCALE, MAX_SCALE = 1e-30, 1e30
MAX_LOGPROBS = 20  # log-prob alternatives per token (vLLM's default limit; OpenAI's is 5)


@dataclass(frozen=True)
class Composition:
    stages: tuple[int, ...]  # sorted, unique
    weights: tuple[float, ...]  # one per stage, finite and > 0
    name: str = "composition"  # full | prefix | stage | composition: its entry in coordinator/core/modes.py MODES

    def deepest_stage(self, num_stages: int) -> int:
        return max(self.stages)


@dataclass(frozen=True)
class Wand:
    safety: float
    bounds: tuple[float, ...]  # one per stage; +inf means never exit there
    name: ClassVar[str] = "wand"

    def deepest_stage(self, num_stages: int) -> int:
        return num_stages - 1


@dataclass(frozen=True)
class Speculative:
    draft_stage: int
    k_draft: int
    name: ClassVar[str] = "speculative"

    def deepest_stage(self, num_stages: int) -> int:
        return num_stages - 1


Mode = Composition | Wand | Speculative


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    mode: Mode
    sampling: SamplingParams | None = None  # None: greedy
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)
    controls: Controls | None = None  # penalties, bias, min_tokens (its prompt_len and stop_ids unset); None: none
    logprobs: int | None = None  # each new token's log-prob and this many alternatives; None: none
    structured: object = None  # a StructuredOutput (coordinator/structured_output.py): its grammar; None: free
    cache_salt: str | None = None  # prefix caching: only requests with the same salt share cached blocks

    def __post_init__(self):
        if self.structured is not None:  # a structured sequence also ends with its grammar's end token
            object.__setattr__(self, "stop_token_ids", self.stop_token_ids | {self.structured.end_token_id})


@dataclass(frozen=True)
class ScoreRequest:
    """The Log-OP of `stages` at every position of a fixed sequence, read by the deepest stage's
    worker: each next token's log-prob, and the top_n alternatives per position (Score)."""

    token_ids: tuple[int, ...]
    stages: tuple[int, ...]
    top_n: int = 0
    weights: tuple[float, ...] | None = None  # one per stage; None: all 1


@dataclass(frozen=True)
class LogitsRequest:
    """The given stages' logits at every position of a fixed sequence (forward, forward_stage,
    calibration): the one request whose results have the vocabulary's size."""

    token_ids: tuple[int, ...]
    stages: tuple[int, ...]


# ---- validation helpers --------------------------------------------------------------------
def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_stage(config: ModelConfig, stage, name: str = "stage") -> int:
    if not _is_int(stage) or not 0 <= stage < config.num_stages:
        raise ValueError(f"{name}={stage!r} is out of range; allowed: an integer 0..{config.num_stages - 1}")
    return stage


def check_prompts(config: ModelConfig, input_ids, name: str = "input_ids") -> list[list[int]]:
    """A (B, T) tensor or a list of ints -> B rows of token ids, each non-empty and in vocab."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.dim() != 2 or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise ValueError(f"{name} must be a (B, T) integer tensor or a list of ints; got {tuple(input_ids.shape)} {input_ids.dtype}")
        rows = input_ids.tolist()
    elif isinstance(input_ids, (list, tuple)) and all(_is_int(t) for t in input_ids):
        rows = [list(input_ids)]
    elif isinstance(input_ids, (list, tuple)) and all(isinstance(r, (list, tuple)) for r in input_ids):
        rows = [list(r) for r in input_ids]
    else:
        raise ValueError(f"{name} must be a (B, T) integer tensor or a list of ints")
    if not rows:
        raise ValueError(f"{name} is empty; give at least one row of at least one token")
    for r, row in enumerate(rows):
        if not row:
            raise ValueError(f"{name} row {r} is empty; a prompt needs at least one token (e.g. <|bos|>)")
        bad = [t for t in row if not _is_int(t) or not 0 <= t < config.vocab_size]
        if bad:
            raise ValueError(f"{name} row {r} has token id {bad[0]!r}; allowed: 0..{config.vocab_size - 1}")
        if len(row) > config.sequence_len:
            raise ValueError(
                f"{name} row {r} has {len(row)} tokens; the context limit (sequence_len) is {config.sequence_len}"
            )
    return rows


def check_max_new_tokens(config: ModelConfig, prompt_len: int, max_new_tokens) -> int:
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid; allowed: an integer >= 1")
    if prompt_len + max_new_tokens > config.sequence_len:
        room = config.sequence_len - prompt_len
        allowed = f"max_new_tokens <= {room}" if room >= 1 else f"a prompt of at most {config.sequence_len - 1} tokens"
        raise ValueError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context limit "
            f"(sequence_len) of {config.sequence_len}; allowed: {allowed}"
        )
    return max_new_tokens


def check_sampling(do_sample: bool, temperature, top_k, top_p, seed, switch: str = "do_sample=True", min_p=None
                   ) -> SamplingParams | None:
    """Sampling parameters, or None (greedy). With sampling off, a sampling parameter that is set
    (a temperature other than the card's default 1.0, top_k, top_p, min_p or a seed) is an error
    rather than silently ignored; `switch` names what turns sampling on, for the message."""
    if not do_sample:
        given = [(name, value) for name, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p),
                                                   ("min_p", min_p), ("seed", seed))
                 if value is not None and (name, value) != ("temperature", 1.0)]
        if given:
            name, value = given[0]
            raise ValueError(f"{name}={value!r} is set but sampling is off; allowed: {switch} to sample, "
                             f"or {name} unset for greedy decoding")
        return None
    temperature = 1.0 if temperature is None else temperature
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < MIN_SCALE:
        raise ValueError(f"temperature={temperature!r} is invalid; allowed: a finite number >= {MIN_SCALE:g}")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} is invalid; allowed: None or an integer >= 1")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r} is invalid; allowed: None or a number in (0, 1]")
    if min_p is not None and (not _is_number(min_p) or not 0 <= min_p <= 1):
        raise ValueError(f"min_p={min_p!r} is invalid; allowed: None or a number in [0, 1]")
    if seed is not None and not _is_int(seed):
        raise ValueError(f"seed={seed!r} is invalid; allowed: None or an integer")
    return SamplingParams(float(temperature), top_k, None if top_p is None else float(top_p), seed,
                          None if not min_p else float(min_p))


# the options every generate method takes by keyword: decoding controls, and the prefix cache's salt
CONTROL_NAMES = ("repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias", "min_tokens",
                 "stop_token_ids", "structured_outputs", "cache_salt")
MAX_LOGIT_BIAS = 100.0  # OpenAI's range; larger biases are clamped to it
MAX_PENALTY = 2.0  # OpenAI's range for presence_penalty and frequency_penalty: -2..2


def check_controls(config: ModelConfig, max_new_tokens: int, repetition_penalty=None, presence_penalty=None,
                   frequency_penalty=None, logit_bias=None, min_tokens=None) -> Controls | None:
    """Decoding controls (stage_workers/controls.py), or None when every one is neutral or unset."""
    repetition_penalty = 1.0 if repetition_penalty is None else repetition_penalty
    if not _is_number(repetition_penalty) or not MIN_SCALE <= repetition_penalty <= MAX_SCALE:
        raise ValueError(f"repetition_penalty={repetition_penalty!r} is invalid; allowed: a finite number > 0 "
                         "(1: none; above 1 discourages repeats)")
    for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        if value is not None and (not _is_number(value) or not -MAX_PENALTY <= value <= MAX_PENALTY):
            raise ValueError(f"{name}={value!r} is invalid; allowed: a number from -2 to 2")
    bias = []
    for token, amount in (logit_bias or {}).items():
        token = int(token) if isinstance(token, str) and token.lstrip("-").isdigit() else token  # JSON keys are strings
        if not _is_int(token) or not 0 <= token < config.vocab_size:
            raise ValueError(f"logit_bias key {token!r} is invalid; allowed: token ids 0..{config.vocab_size - 1}")
        if not _is_number(amount) or math.isnan(amount):
            raise ValueError(f"logit_bias[{token}]={amount!r} is invalid; allowed: a number (clamped to -100..100)")
        if amount:
            bias.append((token, max(-MAX_LOGIT_BIAS, min(MAX_LOGIT_BIAS, float(amount)))))
    min_tokens = 0 if min_tokens is None else min_tokens
    if not _is_int(min_tokens) or min_tokens < 0 or _is_int(max_new_tokens) and min_tokens > max_new_tokens:
        raise ValueError(f"min_tokens={min_tokens!r} is invalid; allowed: an integer from 0 to the request's "
                         f"maximum of new tokens ({max_new_tokens})")
    controls = Controls(float(repetition_penalty), float(presence_penalty or 0.0), float(frequency_penalty or 0.0),
                        tuple(sorted(bias)), min_tokens)
    return None if controls == Controls() else controls


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_token_ids(config: ModelConfig, ids, name: str) -> list[int]:
    """Token ids of the model's vocabulary (any number of them), as a list."""
    ids = list(ids)
    for t in ids:
        if not _is_int(t) or not 0 <= t < config.vocab_size:
            raise ValueError(f"{name}={t!r} is invalid; allowed: token ids 0..{config.vocab_size - 1}")
    return ids


def check_stop_ids(config: ModelConfig, stop_ids, name: str = "eos_token_id") -> frozenset[int]:
    return frozenset(check_token_ids(config, [] if stop_ids is None else [stop_ids] if _is_int(stop_ids)
                                     else stop_ids, name))


MAX_CACHE_SALT = 1024  # characters


def check_cache_salt(salt, name: str = "cache_salt") -> str | None:
    """None, or a non-empty string of at most MAX_CACHE_SALT characters: only requests with the
    same salt share cached KV blocks (coordinator/core/prefix_cache.py)."""
    if salt is None:
        return None
    if not isinstance(salt, str) or not 1 <= len(salt) <= MAX_CACHE_SALT:
        raise ValueError(f"{name}={salt!r:.60} is invalid; allowed: a non-empty string of at most {MAX_CACHE_SALT} "
                         f"characters")
    return salt


# ---- modes ---------------------------------------------------------------------------------
def full_mode(config: ModelConfig) -> Composition:
    return Composition(tuple(range(config.num_stages)), (1.0,) * config.num_stages, "full")


def prefix_mode(config: ModelConfig, max_stages) -> Composition:
    if not _is_int(max_stages) or not 1 <= max_stages <= config.num_stages:
        raise ValueError(f"max_stages={max_stages!r} is out of range; allowed: an integer 1..{config.num_stages}")
    return Composition(tuple(range(max_stages)), (1.0,) * max_stages, "prefix")


def stage_mode(config: ModelConfig, stage) -> Composition:
    return Composition((check_stage(config, stage),), (1.0,), "stage")


def composition_mode(config: ModelConfig, stages, stage_weights=None) -> Composition:
    if isinstance(stages, torch.Tensor):
        stages = stages.tolist()
    if not isinstance(stages, (list, tuple)) or not stages:
        raise ValueError(f"stages={stages!r} is invalid; allowed: a non-empty list of stage indices 0..{config.num_stages - 1}")
    for s in stages:
        check_stage(config, s, "stages entry")
    if len(set(stages)) != len(stages):
        raise ValueError(f"stages={list(stages)} has duplicates; each stage may appear once")
    if stage_weights is None:
        stage_weights = [1.0] * len(stages)
    if isinstance(stage_weights, torch.Tensor):
        stage_weights = stage_weights.tolist()
    if len(stage_weights) != len(stages):
        raise ValueError(f"stage_weights has {len(stage_weights)} entries for {len(stages)} stages; give one weight per stage")
    for w in stage_weights:
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not MIN_SCALE <= w <= MAX_SCALE:
            raise ValueError(f"stage_weights entry {w!r} is invalid; allowed: finite numbers > 0, "
                             f"from {MIN_SCALE:g} to {MAX_SCALE:g}")
    pairs = sorted(zip(stages, (float(w) for w in stage_weights)))
    return Composition(tuple(s for s, _ in pairs), tuple(w for _, w in pairs), "composition")


def wand_mode(config: ModelConfig, safety, p99_bounds=None) -> Wand:
    if not isinstance(safety, (int, float)) or isinstance(safety, bool) or not math.isfinite(safety) or safety < 0:
        raise ValueError(f"safety={safety!r} is invalid; allowed: a finite number >= 0")
    if p99_bounds is None:
        p99_bounds = config.wand_p99_bounds or (math.inf,) * config.num_stages
    if isinstance(p99_bounds, torch.Tensor):
        p99_bounds = p99_bounds.tolist()
    if len(p99_bounds) != config.num_stages or not all(
        isinstance(b, (int, float)) and not math.isnan(b) and b >= 0 for b in p99_bounds
    ):
        raise ValueError(f"p99_bounds={list(p99_bounds)!r} is invalid; allowed: {config.num_stages} numbers >= 0, one per stage")
    return Wand(float(safety), tuple(float(b) for b in p99_bounds))


def speculative_mode(config: ModelConfig, draft_stage, k_draft) -> Speculative:
    check_stage(config, draft_stage, "draft_stage")
    if not _is_int(k_draft) or not 1 <= k_draft <= MAX_K_DRAFT:
        raise ValueError(f"k_draft={k_draft!r} is out of range; allowed: an integer 1..{MAX_K_DRAFT}")
    return Speculative(draft_stage, k_draft)


def build_requests(config: ModelConfig, input_ids, max_new_tokens, mode: Mode, sampling=None, stop_ids=frozenset(),
                   controls: Controls | None = None, structured=None, cache_salt: str | None = None):
    """One request per prompt row; each row is independent. Row r samples with seed + r."""
    rows = check_prompts(config, input_ids)
    for row in rows:
        check_max_new_tokens(config, len(row), max_new_tokens)
    requests = []
    for r, row in enumerate(rows):
        row_sampling = sampling
        if sampling is not None and sampling.seed is not None:
            row_sampling = replace(sampling, seed=sampling.seed + r)
        requests.append(GenerationRequest(tuple(row), max_new_tokens, mode, row_sampling, stop_ids, controls,
                                          structured=structured, cache_salt=cache_salt))
    return requests
