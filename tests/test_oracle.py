"""Self-consistency of the test oracle (tests/oracle.py): its modes agree with each other, its
checkpoint reading is format-blind, and the parts of the trunk that are easy to get silently
wrong (sliding windows, causality, vocab padding) visibly matter.

These tests check the oracle against itself and the spec only; they never touch the fast path.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from oracle import Oracle, filtered_logits, top2_margin, window_mask

from checkpoints.writer import init_checkpoint

PROMPT = [(7 * i + 3) % 512 for i in range(40)]  # 40 tokens: crosses the short window of 16
TIE = 1e-4  # margins below this are "ties" the tests set aside


def rewrite_config(directory, drop=(), **changes):
    path = directory / "config.json"
    cfg = {k: v for k, v in json.loads(path.read_text()).items() if k not in drop}
    path.write_text(json.dumps({**cfg, **changes}))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("oracle_checkpoints")
    tiny = init_checkpoint(root / "tiny", "tiny", seed=0, short_window=16)
    # same weights, model. prefix, sharded, config under Hugging Face names
    hf = init_checkpoint(root / "hf", "tiny", seed=0, short_window=16, name_prefix="model.", max_shard_bytes=200_000)
    rewrite_config(hf, drop=("n_embd", "n_layer", "n_head", "n_kv_head", "sequence_len"),
                   hidden_size=64, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                   max_position_embeddings=256)
    # same weights, every window as long as the sequence
    long = shutil.copytree(tiny, root / "long")
    rewrite_config(long, short_window=256)
    # vocab padded to 520 rows in the tensors, 512 real
    padded = init_checkpoint(root / "padded_full", "tiny", seed=4, short_window=16, vocab_size=520)
    cropped = shutil.copytree(padded, root / "padded")
    rewrite_config(cropped, vocab_size=512)
    return dict(tiny=tiny, hf=hf, long=long, padded_full=padded, padded=cropped)


@pytest.fixture(scope="module")
def oracle(dirs):
    return Oracle(dirs["tiny"])


def test_window_mask_is_causal_and_windowed():
    visible = torch.isfinite(window_mask(6, 2, torch.float32))
    for i in range(6):
        assert [j for j in range(6) if visible[i, j]] == list(range(max(0, i - 2), i + 1))


def test_shapes_dtypes_and_normalization(oracle):
    logits = oracle.stage_logits(PROMPT)
    assert logits.shape == (oracle.num_stages, len(PROMPT), oracle.vocab_size) and logits.dtype == torch.float32
    assert logits.abs().max() <= 15.0
    lp = oracle.forward(PROMPT)
    assert lp.shape == (len(PROMPT), oracle.vocab_size)
    assert torch.allclose(lp.exp().sum(-1), torch.ones(len(PROMPT)), atol=1e-5)


def test_earlier_positions_ignore_later_tokens(oracle):
    full = oracle.stage_logits(PROMPT)
    prefix = oracle.stage_logits(PROMPT[:25])
    assert torch.allclose(full[:, :25], prefix, atol=1e-5)


def test_score_weights_and_alpha(oracle):
    lp = oracle.stage_logprobs(PROMPT)[:, -1]  # (K, V)
    assert torch.allclose(oracle.score(lp, [0, 2], [1.0, 3.0]), (lp[0] + 3 * lp[2]) / 4)
    assert torch.allclose(oracle.score(lp, [1], [5.0]), lp[1])  # alpha 0: one stage is itself at any weight
    assert torch.allclose(oracle.next_distribution(PROMPT, stages=[3]), lp[3], atol=1e-6)


def test_poe_alpha_scales_by_total_weight(dirs, tmp_path):
    d = shutil.copytree(dirs["tiny"], tmp_path / "alpha")
    rewrite_config(d, poe_alpha=0.5)
    half = Oracle(d)
    lp = half.stage_logprobs(PROMPT)[:, -1]  # (K, V)
    assert half.poe_alpha == 0.5
    assert torch.allclose(half.score(lp, [0, 1], [2.0, 2.0]), (2 * lp[0] + 2 * lp[1]) / 2.0)


def test_greedy_is_repeated_argmax_of_forward(oracle):
    tokens = oracle.greedy(PROMPT, 8)
    seq = list(PROMPT)
    for token in tokens:
        lp = oracle.forward(seq)[-1]
        if top2_margin(lp) > TIE:
            assert token == int(lp.argmax())
        seq.append(token)


def test_greedy_stops_after_eos(oracle):
    tokens = oracle.greedy(PROMPT, 8)
    assert oracle.greedy(PROMPT, 8, eos_token_id=tokens[2]) == tokens[: tokens.index(tokens[2]) + 1]


@pytest.mark.parametrize("draft_stage,k_draft", [(0, 3), (2, 2), (3, 4)])
def test_speculative_equals_greedy(oracle, draft_stage, k_draft):
    tokens, acceptance = oracle.speculative(PROMPT, 9, draft_stage=draft_stage, k_draft=k_draft)
    assert tokens == oracle.greedy(PROMPT, 9)
    assert 0.0 <= acceptance <= 1.0


def test_speculative_truncates_after_eos(oracle):
    greedy = oracle.greedy(PROMPT, 9)
    tokens, _ = oracle.speculative(PROMPT, 9, k_draft=3, eos_token_id=greedy[4])
    assert tokens == greedy[: greedy.index(greedy[4]) + 1]


def test_wand_without_bounds_is_full_greedy(oracle):
    tokens, used = oracle.wand(PROMPT, 6)
    assert tokens == oracle.greedy(PROMPT, 6)
    assert used == [oracle.num_stages - 1] * 6


def test_wand_with_zero_bounds_emits_at_stage_zero(oracle):
    tokens, used = oracle.wand(PROMPT, 6, p99_bounds=[0.0] * oracle.num_stages)
    stage0 = oracle.greedy(PROMPT, 6, stages=[0])
    margins = oracle.greedy_margins(PROMPT, stage0, stages=[0])
    assert min(margins) > TIE
    assert tokens == stage0 and used == [0] * 6


def test_margin_above_the_exit_gap_guarantees_the_full_argmax(oracle):
    seq = PROMPT + oracle.greedy(PROMPT, 24)
    lp = oracle.stage_logprobs(seq)  # (K, T, V)
    full = oracle.score(lp, range(oracle.num_stages)).argmax(-1)  # (T,)
    exits = 0
    for j, gap in enumerate(oracle.exit_gaps(seq)):
        score_j = oracle.score(lp, range(j + 1))  # (T, V)
        top = score_j.topk(2, dim=-1).values
        safe = (top[:, 0] - top[:, 1]).double() > gap + TIE
        assert torch.equal(score_j.argmax(-1)[safe], full[safe]), f"stage {j} exit would change the token"
        exits += int(safe.sum())
    assert exits > 0, "no position was safe to exit early: the check above proved nothing"


def test_calibrated_bounds_end_in_zero_and_keep_greedy(oracle):
    greedy = oracle.greedy(PROMPT, 8)
    bounds = oracle.calibrate_wand([PROMPT + greedy], quantile=1.0)
    assert len(bounds) == oracle.num_stages and bounds[-1] == 0.0 and all(b >= 0 for b in bounds)
    assert oracle.wand(PROMPT, 8, p99_bounds=bounds)[0] == greedy


def test_calibration_quantile_is_monotone(oracle):
    seqs = [PROMPT[:30], PROMPT[5:40]]
    low, high = oracle.calibrate_wand(seqs, 0.5), oracle.calibrate_wand(seqs, 0.99)
    assert all(a <= b for a, b in zip(low, high))


def test_wand_bounds_file_overrides_config(dirs, tmp_path):
    d = shutil.copytree(dirs["tiny"], tmp_path / "bounds")
    rewrite_config(d, wand_p99_bounds=[9.0, 9.0, 9.0, 0.0])
    (d / "wand_bounds.json").write_text(json.dumps({"wand_p99_bounds": [1.0, 2.0, 3.0, 0.0]}))
    assert Oracle(d).wand_p99_bounds == [1.0, 2.0, 3.0, 0.0]


def test_top_k_one_sampling_is_greedy(oracle):
    assert oracle.sample(PROMPT, 5, top_k=1, seed=3) == oracle.greedy(PROMPT, 5)


def test_sampling_is_reproducible_per_seed(oracle):
    a = oracle.sample(PROMPT, 6, temperature=1.3, top_k=50, top_p=0.9, seed=11)
    assert a == oracle.sample(PROMPT, 6, temperature=1.3, top_k=50, top_p=0.9, seed=11)
    assert a != oracle.sample(PROMPT, 6, temperature=1.3, top_k=50, top_p=0.9, seed=12)


def test_top_p_keeps_the_top_token():
    lp = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.isfinite(filtered_logits(lp, 1.0, None, 0.7)).tolist() == [True, True, False, False]
    assert torch.isfinite(filtered_logits(lp, 1.0, None, 0.01)).tolist() == [True, False, False, False]


def test_hf_aliases_prefix_and_shards_give_identical_logits(dirs, oracle):
    assert len(json.loads((dirs["hf"] / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert torch.equal(Oracle(dirs["hf"]).stage_logits(PROMPT), oracle.stage_logits(PROMPT))


def test_short_windows_matter_beyond_the_window(dirs, oracle):
    long = Oracle(dirs["long"])
    assert oracle.windows[:3] == [16, 16, 16] and long.windows[:3] == [256, 256, 256]
    assert torch.equal(long.stage_logits(PROMPT[:17]), oracle.stage_logits(PROMPT[:17]))  # i - j <= 16 everywhere
    assert not torch.allclose(long.stage_logits(PROMPT), oracle.stage_logits(PROMPT), atol=1e-3)


def test_padded_vocab_rows_are_cropped(dirs):
    full, cropped = Oracle(dirs["padded_full"]), Oracle(dirs["padded"])
    assert cropped.vocab_size == 512 and cropped.stage_logits(PROMPT).shape[-1] == 512
    assert torch.equal(cropped.stage_logits(PROMPT), full.stage_logits(PROMPT)[..., :512])


def test_bf16_compute_stays_close_to_fp32(dirs, oracle):
    lp16 = Oracle(dirs["tiny"], dtype=torch.bfloat16).forward(PROMPT)
    assert lp16.dtype == torch.float32
    assert (lp16.exp() - oracle.forward(PROMPT).exp()).abs().max() < 0.05
    assert math.isfinite(lp16.sum().item())
