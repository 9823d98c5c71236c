"""The OpenAI-compatible HTTP API's JSON bodies, as pydantic models.

`CompletionRequest` is what `POST /v1/completions` accepts: OpenAI's completions fields, the
extra fields vLLM takes beside them (`top_k`, `min_p`, `min_tokens`, `repetition_penalty`,
`stop_token_ids`, `return_token_ids`, `return_tokens_as_token_ids`) and poe-serve's PoE fields (`poe_mode` and its arguments). Types
are strict (a string is not a number, a float not an int) and unknown fields are refused, so a
typo is an error rather than a silent default; ranges are checked by coordinator/core/requests.py,
the same checks gRPC runs. The response models are OpenAI's; extras (token ids, WAND stages,
acceptance) appear only when asked for or meaningful. Nothing here knows the engine or tokens.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from coordinator.core.modes import MODES
from coordinator.core.requests import MAX_LOGPROBS

PoEMode = Literal[tuple(MODES)]


def _is_none(value) -> bool:
    return value is None


def _extra(description: str):
    """A response field OpenAI does not have: left out of the JSON when not set."""
    return Field(None, exclude_if=_is_none, description=description)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = Field(False, description="a last chunk with usage and no choices")
    include_obfuscation: bool | None = Field(None, description="accepted and ignored (OpenAI's padding of chunks)")


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field("response", description="a name (ignored)")
    description: str | None = Field(None, description="a description (ignored)")
    schema_: dict = Field(alias="schema", description="a JSON schema object")
    strict: bool | None = Field(None, description="true or false (the output always follows the schema)")


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text", "json_object", "json_schema"] = Field(description="text, json_object or json_schema")
    json_schema: JsonSchemaFormat | None = Field(None, description="{name, schema, strict}, with type json_schema")


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: exactly one kind."""

    model_config = ConfigDict(extra="forbid", strict=True)
    json_: dict | str | None = Field(None, alias="json", description="a JSON schema (an object or its JSON text)")
    regex: str | None = Field(None, description="a regular expression")
    choice: list[str] | None = Field(None, description="a non-empty list of strings")
    grammar: str | None = Field(None, description="an EBNF grammar")


class _OpenAICompletion(BaseModel):
    # Each description ends an error message about its field: "allowed: <description>".
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(description="the served model's id (GET /v1/models)")
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="a string, a list of strings, a list of token ids or a list of token-id lists")
    max_tokens: int | None = Field(None, ge=0, description="an integer >= 0 (default 16)")
    temperature: float | None = Field(None, description="a number >= 0; 0 is greedy (default 1, or greedy for "
                                                        "poe_mode wand)")
    top_p: float | None = Field(None, description="a number in (0, 1]")
    top_k: int | None = Field(None, description="an integer >= 1")
    min_p: float | None = Field(None, description="a number in [0, 1]: drop tokens below min_p x the top probability")
    seed: int | None = Field(None, description="an integer; choice i samples with seed + i")
    n: int = Field(1, ge=1, description="an integer >= 1: choices per prompt")
    stop: str | list[str] | None = Field(None, description="a non-empty string or a list of them")
    stop_token_ids: list[int] | None = Field(None, description="a list of token ids")
    min_tokens: int | None = Field(None, description="an integer from 0 to max_tokens: no stop token id before it")
    repetition_penalty: float | None = Field(None, description="a number > 0 (1: none): seen tokens' log-probs "
                                                               "times it")
    frequency_penalty: float | None = Field(None, description="a number from -2 to 2 (default 0)")
    presence_penalty: float | None = Field(None, description="a number from -2 to 2 (default 0)")
    logit_bias: dict[str, float] | None = Field(None, description="token id -> bias, clamped to -100..100")
    stream: bool = Field(False, description="true or false")
    stream_options: StreamOptions | None = Field(None, description="{include_usage: bool}, with stream=true")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                 description=f"an integer 0..{MAX_LOGPROBS}: alternatives per token")
    echo: bool = Field(False, description="true or false: the prompt comes back before the completion")
    return_token_ids: bool = Field(False, description="true or false: token ids on each choice (vLLM's)")
    return_tokens_as_token_ids: bool = Field(False, description="true or false: logprobs tokens as 'token_id:N'")
    user: str | None = Field(None, description="a string (ignored)")
    cache_salt: str | None = Field(None, description="a non-empty string of at most 1024 characters: only requests "
                                                     "with the same salt share cached prompt blocks (vLLM's)")
    # OpenAI fields with no meaning here: accepted only at their neutral values
    best_of: int | None = Field(None, description="1 (or unset); more is not supported")
    suffix: str | None = Field(None, description="unset; suffixes are not supported")
    response_format: ResponseFormat | None = Field(None, description="{type: text | json_object | json_schema, "
                                                                     "json_schema: {name, schema}}")
    structured_outputs: StructuredOutputs | None = Field(None, description="one of {json, regex, choice, grammar}")
    poe_mode: PoEMode = Field("full", description=", ".join(MODES))  # PoE modes: extra body fields, as vLLM's


def _mode_field(mode: str, arg):
    kind = list[arg.kind] if arg.many else arg.kind
    default = "" if arg.default is None else f" (default {arg.default})"
    return kind | None, Field(None, description=f"poe_mode={mode}: {'a list of ' if arg.many else ''}{arg.help}{default}")


# OpenAI's fields, then each mode's arguments (coordinator/core/modes.py MODES) as fields of their own
CompletionRequest = create_model("CompletionRequest", __base__=_OpenAICompletion, __module__=__name__,
                                 **{a.name: _mode_field(m.name, a) for m in MODES.values() for a in m.args})


class Logprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache on every stage the request runs


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Logprobs | None
    finish_reason: Literal["stop", "length"] | None
    token_ids: list[int] | None = _extra("the generated token ids (return_token_ids)")
    prompt_token_ids: list[int] | None = _extra("the prompt's token ids, BOS included (return_token_ids)")
    stages_used: list[int] | None = _extra("poe_mode=wand: the stage each token exited at")
    acceptance_rate: float | None = _extra("poe_mode=speculative: accepted / proposed drafts")


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "poe-serve"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(BaseModel):
    """vLLM's `POST /tokenize` body (its completions form)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = Field(None, description="the served model's id (GET /v1/models), or unset")
    prompt: str = Field(description="the text to tokenize")
    add_special_tokens: bool = Field(True, description="true or false: <|bos|> first, as a text prompt gets it")
    return_token_strs: bool = Field(False, description="true or false: each token's text too")


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = _extra("each token's text (with return_token_strs)")


class DetokenizeRequest(BaseModel):
    """vLLM's `POST /detokenize` body."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = Field(None, description="the served model's id (GET /v1/models), or unset")
    tokens: list[int] = Field(description="a list of token ids")


class DetokenizeResponse(BaseModel):
    prompt: str
