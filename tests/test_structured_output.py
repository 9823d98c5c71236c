"""Structured output on the embedded default model: every output keeps its grammar.

20 prompts x 3 JSON schemas (flat; nested with arrays and enums; required and optional fields)
must each parse and validate with `jsonschema`; regex and choice outputs must match; greedy
structured output must equal the oracle's greedy decoding under the same grammar (xgrammar's
matcher masking the oracle's full-recompute scores), and speculation must give the same tokens.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import torch
import xgrammar as xgr
from oracle import Oracle

from coordinator import PoEModel
from coordinator.structured_output import compile_structured

DEFAULT = Path(__file__).resolve().parent.parent / "checkpoints" / "default"
PROMPTS = ["def add(a, b):\n", "import json\n", "config = ", "# settings\n", "class User:\n", "data = {\n",
           "user = ", "for i in range(3):\n", "print(", "x = 1\n", "return ", "items = [", "if name:\n",
           "record = ", "def load(path):\n", "value = ", "#!/usr/bin/env python\n", "result = ", "args = ", "{"]
SCHEMAS = {
    "flat": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12}, "count": {"type": "integer", "minimum": 0, "maximum": 999},
        "ok": {"type": "boolean"}}, "required": ["name", "count", "ok"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "kind": {"enum": ["file", "dir", "link"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
        "point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -99, "maximum": 99},
                                                   "y": {"type": "integer", "minimum": -99, "maximum": 99}},
                  "required": ["x", "y"], "additionalProperties": False}},
        "required": ["kind", "tags", "point"], "additionalProperties": False},
    "required": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 9999}, "label": {"type": "string", "maxLength": 8},
        "note": {"type": "string", "maxLength": 8}}, "required": ["id", "label"], "additionalProperties": False},
}
MAX_NEW = 96


@pytest.fixture(scope="module")
def default():
    with PoEModel.from_pretrained(DEFAULT) as model:
        yield model, model.tokenizer


def continuations(model, tokenizer, prompts, method="generate", *args, **kwargs) -> list[str]:
    rows = [tokenizer.encode(p) for p in prompts]
    texts = []
    for row in rows:  # one call per row: rows of a batch pad to the longest
        out = getattr(model, method)([row], *args, **kwargs)
        texts.append(tokenizer.decode(out[0, len(row):].tolist()))
    return texts


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_every_output_parses_and_follows_its_schema(default, name):
    model, tokenizer = default
    schema = SCHEMAS[name]
    rows = [tokenizer.encode(p) for p in PROMPTS]
    seqs = model.run_mode(rows, MAX_NEW, model_mode(model), None, None, {"structured_outputs": {"json": schema}})
    for prompt, seq in zip(PROMPTS, seqs):
        assert seq.finish_reason == "stop", f"{prompt!r}: did not end within {MAX_NEW} tokens"
        value = json.loads(tokenizer.decode(seq.new_tokens))
        jsonschema.validate(value, schema)


def model_mode(model):
    from coordinator.core.requests import full_mode

    return full_mode(model.config)


def test_regex_and_choice_outputs_match(default):
    model, tokenizer = default
    for text in continuations(model, tokenizer, PROMPTS[:5], "generate", 24,
                              structured_outputs={"regex": r"[a-z]{2,6}_[0-9]{1,3}"}):
        assert re.fullmatch(r"[a-z]{2,6}_[0-9]{1,3}", text), text
    choices = ["yes", "no", "maybe later"]
    texts = continuations(model, tokenizer, PROMPTS[:5], "generate_wand", 16, structured_outputs={"choice": choices})
    assert all(text in choices for text in texts), texts
    grammar = 'root ::= "[" item ("," item)* "]"\nitem ::= [0-9]+'
    for text in continuations(model, tokenizer, PROMPTS[:3], "generate_speculative", 0, 3, 24,
                              structured_outputs={"grammar": grammar}):
        assert re.fullmatch(r"\[[0-9]+(,[0-9]+)*\]", text) or not text.endswith("]"), text  # cut by max tokens


def oracle_structured_greedy(oracle: Oracle, structured, ids: list[int], n: int, stages=None) -> list[int]:
    """The oracle's greedy decoding with xgrammar's matcher masking its scores."""
    matcher = xgr.GrammarMatcher(structured.grammar)
    bitmask = xgr.allocate_token_bitmask(1, oracle.vocab_size)
    seq, out = list(ids), []
    while len(out) < n and not matcher.is_terminated():
        score = oracle.next_score(seq, stages)[None].clone()  # (1, V)
        matcher.fill_next_token_bitmask(bitmask)
        xgr.apply_token_bitmask_inplace(score, bitmask)
        token = int(score.argmax())
        assert matcher.accept_token(token)
        seq.append(token)
        out.append(token)
    return out


def test_greedy_structured_output_equals_the_oracle_under_the_same_mask(default):
    model, tokenizer = default
    oracle = Oracle(DEFAULT)
    structured = compile_structured(tokenizer, model.config.vocab_size, "json", SCHEMAS["nested"])
    for prompt in PROMPTS[:2]:
        ids = tokenizer.encode(prompt)
        kwargs = dict(structured_outputs={"json": SCHEMAS["nested"]})
        full = model.generate([ids], 48, **kwargs)[0, len(ids):].tolist()
        expected = oracle_structured_greedy(oracle, structured, ids, 48)
        assert full[: len(expected)] == expected
        assert model.generate_speculative([ids], 0, 3, 48, **kwargs)[0, len(ids):].tolist() == full
        prefix = model.generate_prefix([ids], 2, 48, **kwargs)[0, len(ids):].tolist()
        assert prefix[: len(expected)] == oracle_structured_greedy(oracle, structured, ids, 48, stages=[0, 1])


def test_bad_structured_outputs_are_explained(default):
    model, _ = default
    cases = [({"json": {"type": "objectx"}}, r"structured_outputs\.json is invalid: .*objectx"),
             ({"regex": "[a-"}, r"structured_outputs\.regex is invalid"),
             ({"choice": []}, r"structured_outputs\.choice is invalid: got \[\]; allowed: a non-empty list"),
             ({"json": {}, "regex": "a"}, r"structured_outputs sets json and regex; allowed: exactly one"),
             ({"grammar": "root ::= "}, r"structured_outputs\.grammar is invalid"),
             ({"jsn": {}}, r"structured_outputs\.jsn is not a kind")]
    for given, message in cases:
        with pytest.raises(ValueError, match=message):
            model.generate([1, 2], 4, structured_outputs=given)
    assert model.generate([1, 2], 2).shape == (1, 4), "the model keeps serving"
    assert torch.equal(model.generate([1, 2], 3, structured_outputs={"choice": ["ab"]})[0, :2], torch.tensor([1, 2]))
