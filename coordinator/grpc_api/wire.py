"""Translating between the gRPC messages (protos/) and the coordinator's requests and results.

Pure functions: request bytes become a message (or a `MalformedRequest` naming the field), a
`GenerateRequest` becomes a validated `GenerationRequest` (or a ValueError naming the field),
finished sequences become responses, and stage logits become scores.
Nothing here touches the network or the engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from google.protobuf.message import DecodeError

from coordinator.core import requests as rq
from coordinator.core.modes import MODES
from coordinator.core.sequence import Sequence
from coordinator.tokenizer import Tokenizer
from protos import poe_serving_pb2 as pb
from stage_workers.config import ModelConfig
from stage_workers.sampling import SamplingParams

DEFAULT_MAX_NEW_TOKENS = 16


@dataclass(frozen=True)
class MalformedRequest:
    """Request bytes that did not parse; the server answers INVALID_ARGUMENT with `reason`."""

    reason: str


def parse_request(message_class, data: bytes, max_bytes: int):
    """A parsed message, or a `MalformedRequest` naming the field at fault: the largest one of a
    request over `max_bytes`, or a string field that is not UTF-8 (gRPC alone would answer those
    with RESOURCE_EXHAUSTED and INTERNAL, naming nothing)."""
    name = message_class.DESCRIPTOR.full_name
    fields = _top_level_fields(message_class.DESCRIPTOR, data)
    if len(data) > max_bytes:
        largest = max(fields, key=lambda f: len(f[1]))[0].name if fields else "request"
        return MalformedRequest(f"{largest}: the {name} is {len(data):,} bytes; allowed: at most {max_bytes:,}")
    try:
        return message_class.FromString(data)
    except DecodeError as exc:
        for field, payload in fields:
            if field.type == field.TYPE_STRING and not _is_utf8(payload):
                return MalformedRequest(f"{field.name}: not valid UTF-8; allowed: UTF-8 text (or token ids in token_ids)")
        return MalformedRequest(f"request: the bytes are not a valid {name} message ({exc})")


def _is_utf8(payload: bytes) -> bool:
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]  # IndexError: truncated
        value, shift, pos = value | (byte & 0x7F) << shift, shift + 7, pos + 1
        if byte < 0x80:
            return value, pos


def _top_level_fields(descriptor, data: bytes) -> list[tuple[object, bytes]]:
    """(field, payload) of each known length-delimited top-level field, read from the wire format
    itself (requests nest no strings); stops quietly where the bytes stop making sense."""
    out, pos = [], 0
    try:
        while pos < len(data):
            key, pos = _varint(data, pos)
            number, wire_type = key >> 3, key & 7
            if wire_type == 0:
                _, pos = _varint(data, pos)
            elif wire_type in (1, 5):
                pos += 8 if wire_type == 1 else 4
            elif wire_type == 2:
                size, pos = _varint(data, pos)
                field = descriptor.fields_by_number.get(number)
                if field is not None:
                    out.append((field, data[pos : pos + size]))
                pos += size
            else:
                break  # groups: not in this API
    except IndexError:
        pass
    return out


def input_ids(message, tokenizer: Tokenizer, config: ModelConfig) -> list[int]:
    """`prompt` (tokenized with <|bos|>) or `token_ids` (as-is), checked against vocab and context."""
    which = message.WhichOneof("input")
    if which is None:
        raise ValueError("input: set either prompt or token_ids")
    ids = tokenizer.encode(message.prompt) if which == "prompt" else list(message.token_ids.ids)
    return rq.check_prompts(config, ids, name=which)[0]


def mode_of(message: pb.GenerateRequest, config: ModelConfig) -> rq.Mode:
    """The `mode` oneof (unset: full) through its MODES entry; its message's fields are the mode's
    arguments by name."""
    name = message.WhichOneof("mode") or "full"
    fields = getattr(message, name)
    return MODES[name].mode(config, {a.name: _set_value(fields, a.name) for a in MODES[name].args})


def _set_value(message, name: str):
    """A field's value, or None where proto3 cannot tell it from unset: an empty list, or a zero
    without explicit presence (the mode's default applies)."""
    value = getattr(message, name)
    if message.DESCRIPTOR.fields_by_name[name].has_presence:
        return value if message.HasField(name) else None
    if isinstance(value, (int, float)):
        return value or None
    return list(value) or None


def sampling_of(message: pb.GenerateRequest, mode: rq.Mode) -> SamplingParams | None:
    if not message.HasField("sampling") or message.sampling.temperature == 0:
        return None
    if not MODES[mode.name].samples:
        raise ValueError("sampling: WAND is greedy; remove sampling or use another mode")
    s = message.sampling
    top_p = s.top_p if s.top_p != 0 else None  # 0 is proto3's "unset"; 1.5, -0.5 or NaN are errors, not "no top-p"
    return rq.check_sampling(True, s.temperature, s.top_k or None, top_p, s.seed if s.HasField("seed") else None,
                             min_p=s.min_p or None)


def controls_of(message: pb.GenerateRequest, config: ModelConfig, max_new: int):
    """`controls` (unset: none) checked as the Python and HTTP surfaces check them."""
    c = message.controls
    return rq.check_controls(config, max_new, c.repetition_penalty if c.HasField("repetition_penalty") else None,
                             c.presence_penalty, c.frequency_penalty, dict(c.logit_bias), c.min_tokens)


def generation_request(message: pb.GenerateRequest, tokenizer: Tokenizer, config: ModelConfig) -> rq.GenerationRequest:
    ids = input_ids(message, tokenizer, config)
    max_new = message.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    rq.check_max_new_tokens(config, len(ids), max_new)
    mode = mode_of(message, config)
    stop = rq.check_stop_ids(config, list(message.stop_token_ids), name="stop_token_ids")
    structured = structured_of(message, tokenizer, config)
    logprobs = message.logprobs if message.HasField("logprobs") else None
    if logprobs is not None and logprobs > rq.MAX_LOGPROBS:
        raise ValueError(f"logprobs={logprobs} is invalid; allowed: 0..{rq.MAX_LOGPROBS} alternatives per token")
    salt = rq.check_cache_salt(message.cache_salt if message.HasField("cache_salt") else None)
    return rq.GenerationRequest(tuple(ids), max_new, mode, sampling_of(message, mode), stop,
                                controls_of(message, config, max_new), logprobs, structured, salt)


def structured_of(message: pb.GenerateRequest, tokenizer: Tokenizer, config: ModelConfig):
    """`structured_outputs` compiled, or None when unset."""
    if not message.HasField("structured_outputs"):
        return None
    from coordinator.structured_output import compile_structured, one_kind  # xgrammar: only when asked for

    so = message.structured_outputs
    given = {"json": so.json if so.HasField("json") else '{"type": "object"}' if so.json_object else None,
             "regex": so.regex if so.HasField("regex") else None, "choice": list(so.choice) or None,
             "grammar": so.grammar if so.HasField("grammar") else None}
    if so.json_object and so.HasField("json"):
        raise ValueError("structured_outputs sets json and json_object; allowed: exactly one kind")
    kind = one_kind(given, "structured_outputs")
    if kind is None:
        raise ValueError("structured_outputs is set but empty; allowed: one of json, json_object, regex, choice, "
                         "grammar")
    return compile_structured(tokenizer, config.vocab_size, *kind)


def token_logprobs(tokens: list[int], logprobs: list[float], top: list) -> list[pb.TokenLogprob]:
    """Each token's log-prob and alternatives (none when the request did not ask)."""
    return [pb.TokenLogprob(token_id=t, logprob=lp, top=[pb.TopLogprob(token_id=a, logprob=b) for a, b in alts])
            for t, lp, alts in zip(tokens, logprobs, top)]


def acceptance(seq: Sequence) -> float:
    return seq.num_accepted / seq.num_proposed if seq.num_proposed else 0.0


def generate_response(seq: Sequence, tokenizer: Tokenizer, ttft: float, total: float) -> pb.GenerateResponse:
    new = seq.new_tokens
    return pb.GenerateResponse(
        token_ids=new, text=tokenizer.decode(new), stages_used=seq.stages_used, acceptance_rate=acceptance(seq),
        finish_reason=seq.finish_reason, prompt_tokens=seq.num_prompt, cached_tokens=seq.num_cached_tokens,
        time_to_first_token_s=ttft, total_time_s=total,
        logprobs=token_logprobs(new, seq.logprobs, seq.top_logprobs),
    )


class TextStream:
    """Incremental detokenization: emits only text whose UTF-8 bytes are complete."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.tokens, self.sent = tokenizer, [], ""

    def push(self, tokens: list[int], final: bool = False) -> str:
        self.tokens.extend(tokens)
        text = self.tokenizer.decode(self.tokens)
        if not final and text.endswith("\ufffd"):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta


def score_response(ids: list[int], token_logprobs: list[float], tokenizer: Tokenizer,
                   count_bytes: bool) -> pb.ScoreResponse:
    """Full-PoE log p of each token after the first (as the deepest stage's worker computed them:
    one per position, NaN after the last), and bits per byte over those tokens."""
    logprobs = torch.tensor(token_logprobs[: len(ids) - 1], dtype=torch.float64)  # (T-1,)
    bpb = 0.0
    if count_bytes:
        nbytes = [tokenizer.num_bytes(t) for t in ids[1:]]
        counted = torch.tensor(nbytes) > 0
        if counted.any():
            bpb = float(-logprobs[counted].sum() / math.log(2) / sum(nbytes))
    return pb.ScoreResponse(token_logprobs=logprobs.tolist(), bits_per_byte=bpb)
