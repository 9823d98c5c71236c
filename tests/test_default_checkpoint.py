"""The embedded default checkpoint: it loads, it has learned, and its card's claims hold.

The card (`checkpoints/default/README.md`, written by `poe-serve train`) is recomputed here on
the same eval split through the serving code: full PoE beats every single stage and a
unigram baseline in bits per byte; WAND with the shipped bounds agrees with full PoE while
evaluating fewer layers; stage-0 drafts are mostly accepted; a code prompt continues as Python.
"""

from __future__ import annotations

import io
import json
import tokenize

import numpy as np
import pytest
import torch

from checkpoints import DEFAULT_CHECKPOINT
from coordinator import PoEModel, load_tokenizer
from trainer.data import encode_documents, read_split
from trainer.evaluate import NUM_WINDOWS, teacher_forced, windows

CARD = json.loads((DEFAULT_CHECKPOINT / "metrics.json").read_text())


@pytest.fixture(scope="module")
def model():
    return PoEModel.from_pretrained(DEFAULT_CHECKPOINT)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(DEFAULT_CHECKPOINT)


@pytest.fixture(scope="module")
def eval_stream(tokenizer) -> np.ndarray:
    return encode_documents(tokenizer, read_split("eval"))


def test_it_ships_small_in_bf16_with_calibrated_wand_bounds(model):
    size = sum(p.stat().st_size for p in DEFAULT_CHECKPOINT.iterdir())
    assert size <= 25 * 2**20, f"the embedded checkpoint is {size / 2**20:.1f} MiB; the limit is 25 MiB"
    bounds = model.config.wand_p99_bounds
    assert bounds is not None and len(bounds) == model.config.num_stages and bounds[-1] == 0.0
    assert list(bounds) == pytest.approx(CARD["wand_p99_bounds"])


def test_full_poe_beats_every_stage_and_a_unigram_baseline(model, tokenizer, eval_stream):
    rows = windows(eval_stream, model.config.sequence_len, NUM_WINDOWS)
    # the unigram is fitted on the eval text itself here: a stronger baseline than the card's
    tf = teacher_forced(model, tokenizer, rows, eval_stream)
    bpb = tf["bpb"]
    stages = [bpb[f"stage{k}"] for k in range(model.config.num_stages)]
    assert bpb["full"] < min(stages), f"full {bpb['full']:.4f} vs stages {stages}"
    assert bpb["full"] < 0.75 * bpb["unigram"], f"full {bpb['full']:.4f} vs unigram {bpb['unigram']:.4f}"
    card = CARD["teacher_forced"]["bpb"]
    assert bpb["full"] == pytest.approx(card["full"], abs=0.02), "the card describes this checkpoint"
    assert tf["wand_agreement"] >= 0.99 and tf["wand_mean_layers"] < model.config.n_layer


def test_wand_and_speculation_on_validation_prompts(model, eval_stream):
    rows = windows(eval_stream, 48, 6)
    prompts = torch.tensor(rows)  # (6, 48)
    full = model.generate(prompts, 24)
    wand, used = model.generate_wand(prompts, 24, safety=1.0, return_stages_used=True)
    layers = torch.tensor([b + 1 for b in model.config.stage_boundaries])[used].float().mean()
    assert (wand == full).float()[:, 48:].mean() >= 0.99
    assert layers < model.config.n_layer, "WAND evaluates fewer layers per token than full PoE"
    spec, rates = model.generate_speculative(prompts, 0, 3, 24, return_acceptance=True)
    assert torch.equal(spec, full) and sum(rates) / len(rates) > 0.5


def python_tokens(source: str) -> list[int]:
    """Token types Python's own tokenizer reads, up to where the text is cut off."""
    kinds = []
    try:
        kinds.extend(t.type for t in tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, SyntaxError):  # an unfinished string or bracket at the cut-off
        pass
    return kinds


def test_a_code_prompt_continues_as_python(model, tokenizer):
    prompt = "class Stack:\n    def __init__(self):\n"
    ids = tokenizer.encode(prompt)
    text = tokenizer.decode(model.generate(ids, 40)[0, len(ids):].tolist())
    kinds = python_tokens(prompt + text)[len(python_tokens(prompt)) - 1:]
    assert kinds.count(tokenize.NAME) >= 5 and tokenize.NEWLINE in kinds and tokenize.ERRORTOKEN not in kinds, text
    assert any(word in text.split() for word in ("self", "return", "def", "if", "import", "self.")), text
