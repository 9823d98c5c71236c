"""Translating between the HTTP API's JSON (coordinator/http_api/schema.py) and the coordinator's requests.

Pure functions, as coordinator/grpc_api/wire.py is for gRPC: a `CompletionRequest` becomes a
`CompletionPlan` (validated prompts and one `GenerationRequest` per choice) or a `BadRequest`
naming the field, through the same checks as gRPC (coordinator/core/requests.py); `ChoiceText` turns
a choice's tokens into text as they come, cut exactly before a stop string; `logprobs_of` lays
out scores as OpenAI's `logprobs` object. Nothing here touches the network or the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from coordinator.core import requests as rq
from coordinator.core.modes import ARG_NAMES, MODES
from coordinator.grpc_api import wire
from coordinator.http_api.schema import CompletionRequest, Logprobs
from coordinator.tokenizer import Tokenizer
from stage_workers.config import ModelConfig
from stage_workers.sampling import SamplingParams

NEUTRAL = {"best_of": (None, 1), "suffix": (None,)}  # OpenAI fields served only at these values
CONTROL_FIELDS = ("repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias", "min_tokens")


class BadRequest(ValueError):
    """Bad input, answered 400; `param` names the field at fault (None: the body as a whole)."""

    def __init__(self, param: str | None, message: str):
        super().__init__(message)
        self.param = param


def checked(param: str, check, *args, also: tuple[str, ...] = ()):
    """check(*args), its ValueError becoming a BadRequest for `param`, or for the field of `also`
    that the message starts with (coordinator/core/requests.py messages start with the argument)."""
    try:
        return check(*args)
    except ValueError as exc:
        message = str(exc)
        named = sorted((p for p in also if message.startswith(p)), key=len)  # the longest: stages, not stage
        raise BadRequest(named[-1] if named else param, message) from None


def allowed(field: str) -> str:
    return CompletionRequest.model_fields[field].description


def from_validation_errors(errors) -> BadRequest:
    """pydantic's errors (FastAPI's, with "body" first in each location) -> one BadRequest naming
    the first field at fault and what it allows."""
    error = errors[0]
    loc = [part for part in error["loc"] if part != "body"]
    if error["type"] == "json_invalid":
        return BadRequest(None, f"request body: not valid JSON ({error['msg']}); allowed: a JSON object of "
                                "completion fields, in UTF-8")
    if not loc or loc[0] not in CompletionRequest.model_fields and error["type"] != "extra_forbidden":
        return BadRequest(None, f"request body: {error['msg']}; allowed: a JSON object of completion fields")
    field, path = str(loc[0]), ".".join(map(str, loc))
    if error["type"] == "extra_forbidden":
        return BadRequest(field, f"{path}: unknown field; allowed: OpenAI's completion fields and poe-serve's "
                                 "extra fields (docs/http.md)")
    if error["type"] == "missing":
        return BadRequest(field, f"{field}: required; allowed: {allowed(field)}")
    shown = repr(error.get("input"))
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return BadRequest(field, f"{field}={shown} is invalid ({error['msg']}); allowed: {allowed(field)}")


# ---- request -> plan ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Prompt:
    ids: tuple[int, ...]  # fed to the model: a text prompt's ids start with <|bos|>
    text: str  # what echo returns: the prompt string, or the token ids decoded


@dataclass(frozen=True)
class CompletionPlan:
    prompts: tuple[Prompt, ...]
    n: int  # choices per prompt
    requests: tuple[rq.GenerationRequest | None, ...]  # one per choice, prompt-major; None: max_tokens=0
    stop: tuple[str, ...]  # stop strings
    mode: rq.Mode

    def prompt_of(self, choice: int) -> Prompt:
        return self.prompts[choice // self.n]


def completion_plan(body: CompletionRequest, tokenizer: Tokenizer, config: ModelConfig,
                    max_choices: int) -> CompletionPlan:
    for field, values in NEUTRAL.items():
        if getattr(body, field) not in values:
            raise BadRequest(field, f"{field}={getattr(body, field)!r} is not supported; allowed: {allowed(field)}")
    if body.stream_options is not None and not body.stream:
        raise BadRequest("stream_options", "stream_options is set without stream=true; allowed: unset")
    prompts = _prompts(body.prompt, tokenizer, config)
    if len(prompts) * body.n > max_choices:
        raise BadRequest("n", f"{len(prompts)} prompts x n={body.n} choices is more than the server queues; "
                              f"allowed: at most {max_choices} choices in one request")
    mode = mode_of(body, config)
    sampling = sampling_of(body, mode)
    stop_ids = checked("stop_token_ids", rq.check_stop_ids, config, body.stop_token_ids or [], "stop_token_ids")
    max_new = wire.DEFAULT_MAX_NEW_TOKENS if body.max_tokens is None else body.max_tokens
    controls = checked("logit_bias", rq.check_controls, config, max_new, *(getattr(body, f) for f in CONTROL_FIELDS),
                       also=CONTROL_FIELDS)
    structured = structured_of(body, tokenizer, config)
    salt = checked("cache_salt", rq.check_cache_salt, body.cache_salt)
    requests = []
    for prompt in prompts:
        if max_new:
            try:
                rq.check_max_new_tokens(config, len(prompt.ids), max_new)
            except ValueError as exc:  # requests.py's message, with the argument under its HTTP name
                raise BadRequest("max_tokens", str(exc).replace("max_new_tokens", "max_tokens")) from None
        for _ in range(body.n):
            seeded = sampling  # choice i samples with seed + i, as PoEModel's row i does
            if sampling is not None and sampling.seed is not None:
                seeded = replace(sampling, seed=sampling.seed + len(requests))
            requests.append(rq.GenerationRequest(prompt.ids, max_new, mode, seeded, stop_ids, controls, body.logprobs,
                                                 structured, salt) if max_new else None)
    return CompletionPlan(prompts, body.n, tuple(requests), _stop_strings(body.stop), mode)


def _prompts(prompt, tokenizer: Tokenizer, config: ModelConfig) -> tuple[Prompt, ...]:
    items = [prompt] if isinstance(prompt, str) or prompt and isinstance(prompt[0], int) else prompt
    if not items:
        raise BadRequest("prompt", f"prompt is empty; allowed: {allowed('prompt')}")
    texts = items if isinstance(items[0], str) else None
    rows = [tokenizer.encode(t) for t in texts] if texts is not None else items  # text gets <|bos|>, ids go as-is
    rows = checked("prompt", rq.check_prompts, config, rows, "prompt")
    texts = texts or [tokenizer.decode(row) for row in rows]
    return tuple(Prompt(tuple(row), text) for row, text in zip(rows, texts))


def _stop_strings(stop) -> tuple[str, ...]:
    strings = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if "" in strings:
        raise BadRequest("stop", f"stop has an empty string; allowed: {allowed('stop')}")
    return strings


def structured_of(body: CompletionRequest, tokenizer: Tokenizer, config: ModelConfig):
    """`structured_outputs` (vLLM's) or `response_format` (OpenAI's), compiled; None for neither (or
    response_format text). Both at once, or two kinds, is a BadRequest."""
    given, field = {}, "structured_outputs"
    if body.structured_outputs is not None:
        given = {k: v for k, v in body.structured_outputs.model_dump(by_alias=True).items() if v is not None}
        if not given:
            raise BadRequest(field, "structured_outputs is set but empty; allowed: one of json, regex, choice, grammar")
    fmt = body.response_format
    if fmt is not None and fmt.type != "text":
        if given:
            raise BadRequest("response_format", "response_format and structured_outputs are both set; allowed: one")
        if fmt.type == "json_schema" and fmt.json_schema is None:
            raise BadRequest("response_format", "response_format type json_schema needs json_schema: {name, schema}")
        given, field = {"json": fmt.json_schema.schema_ if fmt.json_schema else {"type": "object"}}, "response_format"
    if not given:
        return None
    from coordinator.structured_output import compile_structured, one_kind  # xgrammar: only when asked for

    kind = checked(field, one_kind, given, field)
    return checked(field, compile_structured, tokenizer, config.vocab_size, *kind, field)


def score_stages(mode: rq.Mode, num_stages: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """The stages and weights whose Log-OP scores a prompt's positions (echo): the mode's own
    for full, prefix, stage and composition; the full PoE for WAND and speculation."""
    if isinstance(mode, rq.Composition):
        return mode.stages, mode.weights
    return tuple(range(num_stages)), (1.0,) * num_stages


def mode_of(body: CompletionRequest, config: ModelConfig) -> rq.Mode:
    """`poe_mode` through its MODES entry, its arguments read from the fields of the same names; a
    field of another mode is refused."""
    info = MODES[body.poe_mode]
    values = {name: getattr(body, name) for name in ARG_NAMES}
    return checked(info.args[0].name if info.args else "poe_mode", info.mode, config, values, also=ARG_NAMES)


def sampling_of(body: CompletionRequest, mode: rq.Mode) -> SamplingParams | None:
    """None (greedy) for temperature 0; unset is OpenAI's 1.0, except in the greedy-only mode (WAND)."""
    greedy_only = not MODES[mode.name].samples
    if body.temperature == 0 or body.temperature is None and greedy_only:
        return None
    if greedy_only:
        raise BadRequest("temperature", f"poe_mode={body.poe_mode!r} is greedy; allowed: temperature 0 or unset")
    temperature = 1.0 if body.temperature is None else body.temperature
    return checked("temperature", rq.check_sampling, True, temperature, body.top_k, body.top_p, body.seed,
                   "temperature > 0", body.min_p, also=("top_k", "top_p", "min_p", "seed"))


# ---- results -> JSON ---------------------------------------------------------------------------
class ChoiceText:
    """One choice's text as its tokens arrive: complete UTF-8 only, cut exactly before the first
    stop string (which is left out, as vLLM does); text that may be the start of a stop string
    is held back until later tokens tell."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, stop
        self.stream = wire.TextStream(tokenizer)
        self.text = ""  # the choice's text so far, cut before a stop string
        self.num_sent = 0  # characters of it handed out
        self.hold = max(map(len, stop), default=1) - 1
        self.stopped = False  # a stop string ended the choice

    @property
    def tokens(self) -> list[int]:
        """The tokens kept: after a stop string, up to the one that completed it."""
        return self.stream.tokens

    def push(self, tokens: list[int], final: bool = False) -> tuple[list[int], str]:
        """Add new tokens; returns (those kept, the text that may be sent now)."""
        assert not self.stopped, "a choice ended by a stop string takes no more tokens"
        before = len(self.tokens)
        self.text += self.stream.push(tokens, final)
        hits = [(i, s) for s in self.stop if (i := self.text.find(s)) >= 0]
        if hits:
            cut, stop = min(hits)
            kept = next(j for j in range(1, len(self.tokens) + 1) if stop in self.tokenizer.decode(self.tokens[:j]))
            del self.tokens[max(kept, before):]
            self.text, self.stopped, final = self.text[:cut], True, True
        end = len(self.text) if final else max(self.num_sent, len(self.text) - self.hold)
        delta, self.num_sent = self.text[self.num_sent : end], end
        return self.tokens[before:], delta


def logprobs_of(tokenizer: Tokenizer, ids: list[int], token_logprobs: list[float | None],
                top: list[dict[int, float] | None], start: int, as_token_ids: bool, offset: int = 0) -> Logprobs:
    """OpenAI's logprobs object for positions start.. of `ids` (start 0: the prompt too, as echo
    asks). Each position's alternatives also hold the token itself, as OpenAI's API returns them.
    Offsets are cumulative lengths of the tokens' texts, as vLLM's, from `offset` (a stream's
    earlier chunks' text)."""
    def name(t: int) -> str:
        return f"token_id:{t}" if as_token_ids else tokenizer.decode([t], skip_special_tokens=False)

    tokens, tops, offsets = [], [], []
    for i in range(start, len(ids)):
        tokens.append(name(ids[i]))
        offsets.append(offset)
        offset += len(tokenizer.decode([ids[i]]))
        tops.append(None if top[i] is None else {**{name(t): lp for t, lp in top[i].items()},
                                                 name(ids[i]): token_logprobs[i]})
    return Logprobs(tokens=tokens, token_logprobs=token_logprobs[start:], top_logprobs=tops, text_offset=offsets)
