"""The embedded default checkpoint: every figure of its card, recomputed through the serving code.

The card (`checkpoints/default/README.md`, written by `poe-serve train` from `metrics.json`) is
recomputed on the same splits with `PoEModel` methods: the WAND bounds (`calibrate_wand` on the
calib split); the teacher-forced figures (`stage_logits`: bits per byte of full PoE, of each stage
and of the unigram baseline, accuracy, s2-s3 agreement, WAND's agreement, layers and exits, whose
exit rule is checked against `generate_wand` position by position); and the free-running figures
(`generate`, `generate_wand`, `generate_speculative` on the card's 8 prompts). Tolerances allow
float noise between machines and a few argmax flips, and sit far below the gaps the card's claims
rest on (full PoE beats its best stage by 0.0025 bits per byte).
"""

from __future__ import annotations

import io
import json
import tokenize

import pytest

from checkpoints import DEFAULT_CHECKPOINT
from stage_workers.logop import log_probs
from trainer.data import encode_documents, read_split
from trainer.evaluate import NUM_WINDOWS, free_running, model_card, teacher_forced, wand_exits, windows

CARD = json.loads((DEFAULT_CHECKPOINT / "metrics.json").read_text())
BPB_TOLERANCE = 1e-4  # bits per byte; the card prints 4 decimals
FLIPS = 3  # positions whose argmax may differ between machines


@pytest.fixture(scope="module")
def checkpoint():
    """conftest.py's `tokenizer` and `reference` load the default checkpoint in this module."""
    return DEFAULT_CHECKPOINT


@pytest.fixture(scope="module")
def model(reference):
    """The model under test: the in-process `PoEModel` of the default checkpoint."""
    return reference


@pytest.fixture(scope="module")
def eval_rows(model, tokenizer) -> list[list[int]]:
    return windows(encode_documents(tokenizer, read_split("eval")), model.config.sequence_len, NUM_WINDOWS)


def test_the_card_is_written_from_its_metrics(model):
    training = json.loads((DEFAULT_CHECKPOINT / "training.json").read_text())
    assert (DEFAULT_CHECKPOINT / "README.md").read_text() == model_card(model, CARD, training)


def test_it_ships_small_in_bf16_with_bounds_calibrated_on_the_calib_split(model, tokenizer):
    size = sum(p.stat().st_size for p in DEFAULT_CHECKPOINT.iterdir())
    assert size <= 25 * 2**20, f"the embedded checkpoint is {size / 2**20:.1f} MiB; the limit is 25 MiB"
    assert json.loads((DEFAULT_CHECKPOINT / "config.json").read_text())["torch_dtype"] == "bf16"
    calib = windows(encode_documents(tokenizer, read_split("calib")), model.config.sequence_len, NUM_WINDOWS)
    bounds = model.calibrate_wand(calib, quantile=0.99)
    assert bounds == pytest.approx(list(model.config.wand_p99_bounds), rel=1e-4, abs=1e-6)
    assert bounds == pytest.approx(CARD["wand_p99_bounds"], rel=1e-4, abs=1e-6) and bounds[-1] == 0.0


def test_teacher_forced_figures_are_the_cards(model, tokenizer, eval_rows):
    train_stream = encode_documents(tokenizer, read_split("train"))  # the card's unigram is fitted on it
    tf, card = teacher_forced(model, tokenizer, eval_rows, train_stream), CARD["teacher_forced"]
    assert tf["positions"] == card["positions"] == 12264
    for name, value in card["bpb"].items():
        assert tf["bpb"][name] == pytest.approx(value, abs=BPB_TOLERANCE), name
    flip = FLIPS / tf["positions"]
    for name in ("full_accuracy", "last_two_stage_agreement", "wand_agreement"):
        assert tf[name] == pytest.approx(card[name], abs=flip), name
    assert tf["wand_exit_fraction"] == pytest.approx(card["wand_exit_fraction"], abs=flip)
    assert tf["wand_mean_layers"] == pytest.approx(card["wand_mean_layers"], abs=flip * model.config.n_layer)
    # the claims the figures carry
    stages = [tf["bpb"][f"stage{k}"] for k in range(model.config.num_stages)]
    assert tf["bpb"]["full"] < min(stages) and tf["bpb"]["full"] < 0.75 * tf["bpb"]["unigram"]
    assert tf["wand_agreement"] >= 0.999 and tf["wand_mean_layers"] < model.config.n_layer


def test_teacher_forced_wand_exits_where_generate_wand_does(model, eval_rows):
    row, K = eval_rows[0][:64], model.config.num_stages
    logits = model.stage_logits([row], tuple(range(K)))[0]
    stages, tokens = wand_exits([log_probs(logits[k]) for k in range(K)], model.config.wand_p99_bounds,
                                model.config.poe_alpha)
    checked = range(16, len(row))
    served = [model.generate_wand([row[:p]], 1, return_stages_used=True) for p in checked]
    assert [int(used[0, 0]) for _, used in served] == stages[checked.start - 1 : -1].tolist()
    assert [int(out[0, -1]) for out, _ in served] == tokens[checked.start - 1 : -1].tolist()
    assert len(set(stages[checked.start - 1 : -1].tolist())) >= 3, "the positions exercise several exit stages"


def test_free_running_figures_are_the_cards(model, eval_rows):
    card = CARD["free_running"]
    prompts = [row[:64] for row in eval_rows[: card["prompts"]]]
    fr = free_running(model, prompts, card["new_tokens_per_prompt"])
    flip = FLIPS / (card["prompts"] * card["new_tokens_per_prompt"])  # of the tokens generated
    assert fr["speculative_equals_full"] is card["speculative_equals_full"] is True
    assert fr["wand_token_agreement"] == card["wand_token_agreement"] == 1.0
    assert fr["wand_mean_layers"] == pytest.approx(card["wand_mean_layers"], abs=flip * model.config.n_layer)
    assert fr["speculative_acceptance"] == pytest.approx(card["speculative_acceptance"], abs=flip)
    assert fr["wand_mean_layers"] < model.config.n_layer and fr["speculative_acceptance"] > 0.5


def python_tokens(source: str) -> list[int]:
    """Token types Python's own tokenizer reads, up to where the text is cut off."""
    kinds = []
    try:
        kinds.extend(t.type for t in tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, SyntaxError):  # an unfinished string or bracket at the cut-off
        pass
    return kinds


def test_a_code_prompt_continues_as_python_as_the_card_shows(model, tokenizer):
    prompt = "class Stack:\n    def __init__(self):\n"
    ids = tokenizer.encode(prompt)
    text = tokenizer.decode(model.generate(ids, 48)[0, len(ids):].tolist())
    assert text == CARD["samples"][prompt]
    kinds = python_tokens(prompt + text)[len(python_tokens(prompt)) - 1:]
    assert kinds.count(tokenize.NAME) >= 5 and tokenize.NEWLINE in kinds and tokenize.ERRORTOKEN not in kinds, text

