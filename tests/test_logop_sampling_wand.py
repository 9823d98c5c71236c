"""The pure math: Log-OP, sampling filters, the deciding stage's rules, and WAND's calibration."""

from __future__ import annotations

import math

import oracle
import pytest
import torch
from oracle import top2_margin

from coordinator.core.wand import bounds_from_gaps, exit_gaps
from stage_workers.controls import Controls, apply_controls
from stage_workers.decisions import accumulate, divisor, token_logprobs, verify_drafts, wand_exits, wand_threshold
from stage_workers.logop import combine, log_probs, normalize
from stage_workers.sampling import SamplingParams, draw_uniform, filtered_logits, make_generator, sample


def random_logprobs(*shape, seed=0):
    return log_probs(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3)


def test_logop_is_the_weighted_geometric_mean_at_alpha_zero():
    a, b = random_logprobs(5, 11, seed=1), random_logprobs(5, 11, seed=2)
    assert torch.allclose(combine([a, b], [1.0, 3.0], 0.0), (a + 3 * b) / 4)
    assert torch.allclose(combine([a, b], [1.0, 3.0], 1.0), a + 3 * b)
    assert torch.allclose(combine([a, b], [2.0, 2.0], 0.5), (2 * a + 2 * b) / 2.0)


def test_normalize_gives_log_probabilities_with_the_same_ranking():
    score = combine([random_logprobs(3, 7, seed=3), random_logprobs(3, 7, seed=4)], [1, 1], 0.0)
    lp = normalize(score)
    assert torch.allclose(lp.exp().sum(-1), torch.ones(3))
    assert torch.equal(lp.argmax(-1), score.argmax(-1))


def test_top_k_keeps_exactly_k_tokens():
    lp = random_logprobs(50, seed=5)
    kept = torch.isfinite(filtered_logits(lp, SamplingParams(top_k=7)))
    assert kept.sum() == 7 and set(kept.nonzero().flatten().tolist()) == set(lp.topk(7).indices.tolist())


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    lp = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.isfinite(filtered_logits(lp, SamplingParams(top_p=0.7))).tolist() == [True, True, False, False]
    assert torch.isfinite(filtered_logits(lp, SamplingParams(top_p=0.5))).tolist() == [True, False, False, False]
    assert torch.isfinite(filtered_logits(lp, SamplingParams(top_p=0.01))).sum() == 1


def test_sampling_is_reproducible_with_a_seed_and_follows_the_distribution():
    lp = torch.log(torch.tensor([0.1, 0.6, 0.3]))
    draws = lambda seed: [sample(lp, SamplingParams(), draw_uniform(g)) for g in [make_generator(seed)]  # noqa: E731
                          for _ in range(2000)]
    first = draws(7)
    assert first == draws(7)
    freq = torch.bincount(torch.tensor(first), minlength=3).float() / len(first)
    assert torch.allclose(freq, torch.tensor([0.1, 0.6, 0.3]), atol=0.04)


def test_low_temperature_sampling_is_greedy():
    lp = random_logprobs(100, seed=8)
    g = make_generator(0)
    assert all(sample(lp, SamplingParams(temperature=1e-4), draw_uniform(g)) == int(lp.argmax()) for _ in range(20))


def test_wand_rule():
    scores = torch.tensor([[0.0, 2.0, 1.0]] * 4)  # margin 1.0 in every row
    thresholds = torch.tensor([wand_threshold(0.9, 1.0), wand_threshold(0.9, 2.0), wand_threshold(math.inf, 1.0),
                               wand_threshold(math.inf, 0.0)])
    assert wand_exits(scores, thresholds).tolist() == [True, False, False, False]  # an infinite bound never exits


def test_a_running_sum_of_weighted_stage_logprobs_is_the_logop_score():
    lps = [random_logprobs(3, 9, seed=s) for s in range(3)]
    weights, alpha = (0.5, 0.0, 2.0), 0.3
    acc = None
    for lp, w in zip(lps, weights):
        acc = acc if w == 0 else accumulate(acc, lp, w)
    expected = combine([lps[0], lps[2]], [0.5, 2.0], alpha)
    assert torch.equal(acc / divisor(weights, 2, alpha), expected), "bit for bit what the coordinator computed"


def test_verification_keeps_drafts_up_to_the_first_disagreement():
    assert verify_drafts([5, 6, 7, 8], [5, 6, 9]) == 2
    assert verify_drafts([4, 6, 7, 8], [5, 6, 7]) == 0
    assert verify_drafts([5, 6, 7, 8], [5, 6, 7]) == 3
    assert verify_drafts([5], []) == 0


def test_token_logprobs_pick_each_target_and_the_top_alternatives():
    scores = random_logprobs(4, 10, seed=9) * 2
    logprobs, top = token_logprobs(scores, [3, 0, 9, -1], top_n=2)
    lp = normalize(scores)
    assert logprobs[:3] == pytest.approx([float(lp[0, 3]), float(lp[1, 0]), float(lp[2, 9])])
    assert math.isnan(logprobs[3])
    assert [[t for t, _ in row] for row in top] == lp.topk(2).indices.tolist()


def test_exit_gaps_guarantee_the_full_argmax():
    shared = torch.randn(200, 30, generator=torch.Generator().manual_seed(10)) * 3  # (T, V)
    lps = [log_probs(shared + torch.randn(200, 30, generator=torch.Generator().manual_seed(s)) * 0.9)
           for s in range(3)]  # stages that mostly agree, as trained ones do: some margins clear U_j
    full = combine(lps, [1, 1, 1], 0.0)
    prefix = combine(lps[:1], [1], 0.0)
    gaps = exit_gaps(prefix, full)
    assert (gaps >= 0).all()
    safe = torch.tensor([top2_margin(row) > gap for row, gap in zip(prefix, gaps.tolist())])  # margin above U_j
    assert safe.sum() >= 50, f"only {int(safe.sum())} of 200 positions clear their bound: too few to check"
    assert torch.equal(prefix.argmax(-1)[safe], full.argmax(-1)[safe]), "an exit there keeps the full argmax"
    assert (prefix.argmax(-1) != full.argmax(-1))[~safe].any(), "elsewhere the prefix argmax does differ at times"
    assert torch.equal(exit_gaps(full, full), torch.zeros(200))


def test_bounds_are_the_quantile_and_the_last_stage_is_zero():
    gaps = [torch.arange(101.0), torch.arange(101.0) * 2, torch.zeros(101)]
    assert bounds_from_gaps(gaps, 0.99) == [pytest.approx(99.0), pytest.approx(198.0), 0.0]


def test_controls_follow_the_oracles_rule_in_order():
    g = torch.Generator().manual_seed(4)
    lp = torch.log_softmax(torch.randn(3, 16, generator=g), dim=-1)  # (3, V) at positions 4, 5, 6
    history = [1, 2, 2, 3, 9, 9, 1]  # prompt 1, 2, 2, 3; output 9, 9, 1
    controls = Controls(1.5, 0.5, 0.25, ((2, 3.0), (9, -1.0)), 3, (9, 11), 4)
    out = apply_controls(lp, controls, history, [4, 5, 6])
    for row, q in enumerate([4, 5, 6]):
        expected = oracle.controlled(lp[row], history[: q + 1], 4, repetition_penalty=1.5, presence_penalty=0.5,
                                     frequency_penalty=0.25, logit_bias={2: 3.0, 9: -1.0}, min_tokens=3,
                                     stop_token_ids=[9, 11])
        assert torch.allclose(out[row], expected, atol=1e-6), row
    assert torch.isinf(out[0, 11]) and torch.isinf(out[1, 11]) and torch.isfinite(out[2, 11]), "min_tokens: 3 made"
    assert torch.equal(apply_controls(lp, Controls(), history, [4, 5, 6]), lp)


def test_min_p_drops_tokens_below_a_share_of_the_top():
    lp = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.isfinite(filtered_logits(lp, SamplingParams(min_p=0.2))).tolist() == [True, True, True, False]
    assert torch.isfinite(filtered_logits(lp, SamplingParams(min_p=0.5))).tolist() == [True, True, False, False]
