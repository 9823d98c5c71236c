"""Structured output: a grammar that every generated token must keep, with xgrammar.

A request asks for one of `json` (a JSON schema, or any JSON object), `regex`, `choice` (one of
given strings) or `grammar` (EBNF), by vLLM's names (`structured_outputs`) or OpenAI's
(`response_format`). `compile_structured` checks it once, at the boundary, into a
`StructuredOutput` (a ValueError naming the field otherwise); each sequence then keeps a
`GrammarState`, a matcher over its tokens, in the coordinator. Before each step the state gives
the allowed tokens at every position the step decides, as xgrammar's packed int32 bitmask
(`ceil(V / 32)` words, a few hundred bytes), which travels with the step to the deciding
worker; the worker masks the scores it chooses from (stage_workers/stage_decisions.py). JSON is
generated without free whitespace (`any_whitespace=False`: ", " and ": " separators, nothing
else), so a weak model cannot loop on newlines inside an object. A structured sequence ends with
`<|bos|>`, nanochat's document delimiter, which the grammar allows once it is complete.
Nothing here knows stages or workers.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache

import xgrammar as xgr

from coordinator.tokenizer import Tokenizer

KINDS = ("json", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutput:
    kind: str  # one of KINDS
    source: str  # what the caller gave, as text (the schema's JSON, the regex, the choices, the EBNF)
    grammar: xgr.CompiledGrammar
    end_token_id: int  # the token that ends the sequence once the grammar is complete

    def state(self) -> "GrammarState":
        return GrammarState(self)


@lru_cache(maxsize=8)
def _compiler(tokenizer: Tokenizer, vocab_size: int) -> xgr.GrammarCompiler:
    """One compiler per tokenizer and model vocabulary (it caches compiled grammars itself).
    Special tokens and ids the tokenizer does not know are never allowed, but the end token."""
    encoding = tokenizer.encoding
    vocab = [b"" if i in tokenizer.special_ids or i not in tokenizer.known_ids else encoding.decode_single_token_bytes(i)
             for i in range(vocab_size)]
    info = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.RAW, vocab_size=vocab_size,
                             stop_token_ids=[tokenizer.bos_token_id])
    return xgr.GrammarCompiler(info, max_threads=1)


def compile_structured(tokenizer: Tokenizer, vocab_size: int, kind: str, value, field: str = "structured_outputs"
                       ) -> StructuredOutput:
    """`value`: a schema (dict or JSON text; None for any JSON object) for json, a pattern for
    regex, a list of strings for choice, EBNF text for grammar. ValueError names `field.kind`."""
    compiler, name = _compiler(tokenizer, vocab_size), f"{field}.{kind}"
    try:
        if kind == "json":
            source = value if isinstance(value, str) else json.dumps(value if value is not None else {"type": "object"})
            json.loads(source)
            grammar = compiler.compile_json_schema(source, any_whitespace=False)
        elif kind == "regex":
            source = str(value)
            grammar = compiler.compile_regex(source)
        elif kind == "choice":
            if not isinstance(value, (list, tuple)) or not value or not all(isinstance(c, str) and c for c in value):
                raise ValueError(f"got {value!r}")
            source = json.dumps(list(value))
            grammar = compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in value))
        elif kind == "grammar":
            source = str(value)
            grammar = compiler.compile_grammar(source)
        else:
            raise ValueError(f"unknown kind; allowed: {', '.join(KINDS)}")
    except (ValueError, RuntimeError, TypeError) as exc:  # xgrammar raises RuntimeError on a bad schema or grammar
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        reason = re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", reason)  # xgrammar's "[time] file.cc:line: " prefix
        raise ValueError(f"{name} is invalid: {reason[:300]}; allowed: {ALLOWED[kind] if kind in ALLOWED else KINDS}"
                         ) from None
    return StructuredOutput(kind, source, grammar, tokenizer.bos_token_id)


ALLOWED = {"json": "a JSON schema (an object), or {} for any JSON object", "regex": "a regular expression",
           "choice": "a non-empty list of non-empty strings", "grammar": "an EBNF grammar with a root rule"}


def one_kind(given: dict, field: str, known_only: bool = False) -> tuple[str, object] | None:
    """The one kind set in `given` (kind -> value, None: unset), or None; two kinds are an error,
    and with `known_only` so is any other key."""
    unknown = sorted(set(given) - set(KINDS)) if known_only else []
    if unknown:
        raise ValueError(f"{field}.{unknown[0]} is not a kind of structured output; allowed: {', '.join(KINDS)}")
    kinds = [k for k in KINDS if given.get(k) is not None]
    if len(kinds) > 1:
        raise ValueError(f"{field} sets {' and '.join(kinds)}; allowed: exactly one of {', '.join(KINDS)}")
    return (kinds[0], given[kinds[0]]) if kinds else None


class GrammarState:
    """A sequence's matcher over its new tokens (drafts included, until verified)."""

    def __init__(self, structured: StructuredOutput):
        self.matcher = xgr.GrammarMatcher(structured.grammar)
        self.bitmask = xgr.allocate_token_bitmask(1, structured.grammar.tokenizer_info.vocab_size)  # (1, ceil(V/32))
        end = structured.end_token_id
        self.ended = bytearray(self.bitmask.numel() * 4)  # after the end token: only it (nothing after it is kept)
        self.ended[end // 8] |= 1 << (end % 8)  # little-endian int32 words: byte t // 8, bit t % 8
        self.past_end = 0  # tokens accepted after the end token

    def mask(self) -> bytes:
        """The tokens allowed next, as the packed bitmask's bytes (bit t % 32 of word t // 32: token t)."""
        if self.matcher.is_terminated():
            return bytes(self.ended)
        self.matcher.fill_next_token_bitmask(self.bitmask)
        return self.bitmask.numpy().tobytes()

    def accept(self, tokens: list[int]) -> None:
        """Advance over tokens (drafts past the end token count, and are never kept)."""
        for token in tokens:
            if self.matcher.is_terminated():
                self.past_end += 1
            elif not self.matcher.accept_token(token):
                raise RuntimeError(f"token {token} breaks the sequence's grammar (a mask was not applied)")

    def rollback(self, num_tokens: int) -> None:
        past_end = min(num_tokens, self.past_end)
        self.past_end -= past_end
        if num_tokens > past_end:
            self.matcher.rollback(num_tokens - past_end)

