"""The mode suite: every generation mode against the full-recompute oracle, as test functions.

They run in the modules that import them, on each module's `served` fixture, a (model, oracle)
pair per case: tests/test_modes.py (in process and on Ray, on the CPU) and
tests/test_modes_gpu.py (on a CUDA device). Generated tokens are checked position by position
against the oracle's distribution at the served prefix (teacher forcing), so one oracle forward
checks a whole continuation; a token may differ from the oracle's only where the oracle's top-2
margin is within TIE (a numerical tie).
"""

from __future__ import annotations

import pytest
import torch
from oracle import Oracle
from support import stage_infos

TIE = 1e-4
# logits against the fp32 oracle, by the dtype the workers compute in: fp32 workers differ by
# float rounding alone (at most ~8e-6 on the tiny variants, the bf16-stored one included)
LOGPROB_TOL = {"float32": 1e-4, "bfloat16": 2e-3}


def logprob_tol(model) -> float:
    return LOGPROB_TOL[stage_infos(model)[0].dtype]


def prompts(model, batch: int, length: int, seed: int) -> torch.Tensor:
    """(batch, length) random prompts, longer than the variant's short window."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=g)


def assert_follows(oracle: Oracle, row: list[int], prompt_len: int, stages=None, weights=None):
    """Each new token is the oracle's argmax at its prefix, ties aside."""
    lps = oracle.stage_logprobs(row)  # (K, T, V)
    K = lps.shape[0]
    stages = list(range(K)) if stages is None else stages
    score = oracle.score(lps, stages, weights)  # (T, V)
    for t in range(prompt_len, len(row)):
        s = score[t - 1]
        best = int(s.argmax())
        assert row[t] == best or s[best] - s[row[t]] < TIE, f"position {t}: served {row[t]}, oracle {best}"


def test_forward_and_forward_stage_match_the_oracle(served):
    model, oracle = served
    ids = prompts(model, 2, 40, seed=1)
    full, tol = model.forward(ids), logprob_tol(model)
    for b in range(2):
        assert torch.allclose(full[b], oracle.forward(ids[b].tolist()), atol=tol)
        for stage in range(model.config.num_stages):
            logits = model.forward_stage(ids[b : b + 1], stage)[0]
            assert torch.allclose(logits, oracle.stage_logits(ids[b].tolist())[stage], atol=tol)


def test_full_greedy_batch_rows_are_independent_and_exact(served):
    model, oracle = served
    ids = prompts(model, 3, 40, seed=2)
    out = model.generate(ids, 12)
    assert out.shape == (3, 52) and torch.equal(out[:, :40], ids)
    for b in range(3):
        assert_follows(oracle, out[b].tolist(), 40)
    assert torch.equal(model.generate(ids[1:2], 12), out[1:2]), "a row alone gives the same tokens"


def test_prefix_and_single_stage(served):
    model, oracle = served
    ids = prompts(model, 2, 33, seed=3)
    K = model.config.num_stages
    for m in range(1, K + 1):
        out = model.generate_prefix(ids, max_stages=m, max_new_tokens=8)
        for b in range(2):
            assert_follows(oracle, out[b].tolist(), 33, stages=list(range(m)))
    for s in range(K):
        out = model.generate_stage(ids, stage=s, max_new_tokens=8)
        for b in range(2):
            assert_follows(oracle, out[b].tolist(), 33, stages=[s])


def test_weighted_composition(served):
    model, oracle = served
    ids = prompts(model, 2, 35, seed=4)
    K = model.config.num_stages
    stages, weights = [K - 1, 0], [1.0, 0.5]
    out = model.generate_parallel_composition(ids, stages, weights, max_new_tokens=10)
    for b in range(2):
        assert_follows(oracle, out[b].tolist(), 35, stages=stages, weights=weights)


def test_sampling_matches_the_oracle_and_is_seeded(served):
    model, oracle = served
    ids = prompts(model, 2, 30, seed=5)
    kwargs = dict(do_sample=True, temperature=0.9, top_k=40, top_p=0.9, seed=11)
    out = model.generate(ids, 10, **kwargs)
    for b in range(2):
        expected = oracle.sample(ids[b].tolist(), 10, temperature=0.9, top_k=40, top_p=0.9, seed=11 + b)
        assert out[b, 30:].tolist() == expected
    assert torch.equal(model.generate(ids, 10, **kwargs), out)


def test_wand_exits_and_stages_used_match_the_oracle(served):
    model, oracle = served
    ids = prompts(model, 3, 40, seed=6)
    K = model.config.num_stages
    bounds = [0.6] * (K - 1) + [0.0]
    out, used = model.generate_wand(ids, 14, safety=1.0, p99_bounds=bounds, return_stages_used=True)
    assert used.shape == (3, 14)
    for b in range(3):
        tokens, stages_used = oracle.wand(ids[b].tolist(), 14, safety=1.0, p99_bounds=bounds)
        assert out[b, 40:].tolist() == tokens and used[b].tolist() == stages_used
    assert len(set(used.flatten().tolist())) > 1, "bounds should make some tokens exit early"
    no_bounds, used_all = model.generate_wand(ids, 6, return_stages_used=True, p99_bounds=[float("inf")] * K)
    assert torch.equal(no_bounds, model.generate(ids, 6)) and (used_all == K - 1).all()


def test_speculative_equals_full_greedy(served):
    model, oracle = served
    ids = prompts(model, 2, 36, seed=7)
    full = model.generate(ids, 15)
    for draft_stage, k_draft in [(0, 3), (model.config.num_stages - 2, 2), (0, 1)]:
        out, rates = model.generate_speculative(ids, draft_stage, k_draft, 15, return_acceptance=True)
        assert torch.equal(out, full), f"draft_stage={draft_stage}, k_draft={k_draft}"
        for b in range(2):
            _, expected_rate = oracle.speculative(ids[b].tolist(), 15, draft_stage, k_draft)
            assert rates[b] == pytest.approx(expected_rate)


def test_eos_stops_a_row_and_pads_it(served):
    model, _ = served
    ids = prompts(model, 2, 30, seed=8)
    free = model.generate(ids, 10)
    eos = int(free[0, 33])  # row 0's 4th new token
    out = model.generate(ids, 10, eos_token_id=eos)
    stop = free[0, 30:].tolist().index(eos)
    assert out[0, : 31 + stop].tolist() == free[0, : 31 + stop].tolist()
    assert (out[0, 31 + stop :] == eos).all()
    spec = model.generate_speculative(ids, 0, 3, 10, eos_token_id=eos)
    assert torch.equal(spec, out)


def test_calibrate_wand_matches_the_oracle(served):
    model, oracle = served
    ids = prompts(model, 2, 30, seed=9)
    bounds = model.calibrate_wand(ids, quantile=0.9)
    expected = oracle.calibrate_wand([row.tolist() for row in ids], quantile=0.9)
    assert bounds == pytest.approx(expected, abs=1e-3)
    assert bounds[-1] == 0.0


CONTROLS = dict(repetition_penalty=1.4, presence_penalty=0.6, frequency_penalty=0.4, logit_bias={5: 4.0, 9: -100.0})


def repetitive_prompts(model, batch: int, seed: int) -> torch.Tensor:
    """(batch, 32) prompts of 8 distinct tokens repeated, where the penalties bite."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, 8), generator=g).repeat(1, 4)


def test_decoding_controls_in_every_mode_match_the_oracle(served):
    model, oracle = served
    ids, K = repetitive_prompts(model, 2, seed=12), model.config.num_stages
    bounds = [0.6] * (K - 1) + [0.0]
    rows = [ids[b].tolist() for b in range(2)]
    full = model.generate(ids, 12, **CONTROLS)
    assert not torch.equal(full, model.generate(ids, 12)), "the controls should change the greedy tokens"
    for b, row in enumerate(rows):
        assert full[b, 32:].tolist() == oracle.greedy(row, 12, controls=CONTROLS)
    cases = [(model.generate_prefix(ids, 2, 10, **CONTROLS), dict(stages=[0, 1])),
             (model.generate_stage(ids, 1, 10, **CONTROLS), dict(stages=[1])),
             (model.generate_parallel_composition(ids, [0, K - 1], [0.5, 1.0], 10, **CONTROLS),
              dict(stages=[0, K - 1], weights=[0.5, 1.0]))]
    for out, mode in cases:
        for b, row in enumerate(rows):
            assert out[b, 32:].tolist() == oracle.greedy(row, 10, controls=CONTROLS, **mode), mode
    sampled = model.generate(ids, 10, do_sample=True, temperature=0.8, top_p=0.95, min_p=0.02, seed=3, **CONTROLS)
    wand, used = model.generate_wand(ids, 10, p99_bounds=bounds, return_stages_used=True, **CONTROLS)
    for b, row in enumerate(rows):
        assert sampled[b, 32:].tolist() == oracle.sample(row, 10, temperature=0.8, top_p=0.95, seed=3 + b,
                                                         controls=CONTROLS, min_p=0.02)
        assert (wand[b, 32:].tolist(), used[b].tolist()) == oracle.wand(row, 10, p99_bounds=bounds, controls=CONTROLS)
    for draft_stage, k_draft in [(0, 3), (K - 1, 2)]:
        out, rates = model.generate_speculative(ids, draft_stage, k_draft, 12, return_acceptance=True, **CONTROLS)
        assert torch.equal(out, full), f"draft_stage={draft_stage}, k_draft={k_draft}"
        for b, row in enumerate(rows):
            assert rates[b] == pytest.approx(oracle.speculative(row, 12, draft_stage, k_draft, controls=CONTROLS)[1])


def test_min_tokens_holds_back_the_stop_ids(served):
    model, oracle = served
    ids = prompts(model, 1, 30, seed=13)
    free = model.generate(ids, 10)[0, 30:].tolist()
    eos = free[1]  # the 2nd new token
    assert model.generate(ids, 10, eos_token_id=eos)[0, 30:].tolist() == free[: free.index(eos) + 1]
    out = model.generate(ids, 10, eos_token_id=eos, min_tokens=6)[0, 30:].tolist()
    assert eos not in out[:6] and len(out) > 6
    expected = oracle.greedy(ids[0].tolist(), 10, eos_token_id=eos, controls=dict(min_tokens=6, stop_token_ids=[eos]))
    assert out == expected
    spec = model.generate_speculative(ids, 0, 3, 10, min_tokens=6, stop_token_ids=[eos])[0, 30:].tolist()
    assert spec == expected


def test_speculative_sampling_matches_the_oracle_and_is_seeded(served):
    model, oracle = served
    ids, K = prompts(model, 2, 30, seed=14), model.config.num_stages
    sampling = dict(do_sample=True, temperature=0.8, top_p=0.95, seed=21)
    for draft_stage, k_draft, controls in [(0, 3, {}), (K - 1, 2, {}), (1, 3, CONTROLS)]:
        out = model.generate_speculative(ids, draft_stage, k_draft, 10, **sampling, **controls)
        for b in range(2):
            expected = oracle.speculative_sample(ids[b].tolist(), 10, draft_stage, k_draft, temperature=0.8,
                                                 top_p=0.95, seed=21 + b, controls=controls)
            assert out[b, 30:].tolist() == expected, f"draft_stage={draft_stage}, k_draft={k_draft}, row {b}"
    assert torch.equal(model.generate_speculative(ids, K - 1, 2, 10, **sampling), 
                       model.generate_speculative(ids, K - 1, 2, 10, **sampling)), "seeded: reproducible"


def test_prefix_cache_warm_from_another_mode_matches_the_oracle(served):
    """A prompt computed by one mode serves the next from the cache (on by default). A prefix
    request leaves its blocks at depth 2: the full request after it computes stages 2-3 there from
    stage 1's kept output rows; WAND, speculation and sampling then hit blocks at full depth."""
    model, oracle = served
    K, size = model.config.num_stages, stage_infos(model)[0].kv_block_size
    ids = prompts(model, 1, 3 * size + 5, seed=21)  # 3 full blocks, then 5 positions
    row, n = ids[0].tolist(), len(ids[0])
    stats, before = model.engine.cache.stats, model.engine.cache.stats.hits
    assert_follows(oracle, model.generate_prefix(ids, max_stages=2, max_new_tokens=6)[0].tolist(), n, stages=[0, 1])
    full = model.generate(ids, 8)
    assert_follows(oracle, full[0].tolist(), n)
    bounds = [0.6] * (K - 1) + [0.0]
    out, used = model.generate_wand(ids, 8, safety=1.0, p99_bounds=bounds, return_stages_used=True)
    assert (out[0, n:].tolist(), used[0].tolist()) == oracle.wand(row, 8, safety=1.0, p99_bounds=bounds)
    assert torch.equal(model.generate_speculative(ids, 0, 3, 8), full)
    sampled = model.generate(ids, 8, do_sample=True, temperature=0.9, top_p=0.9, seed=3)
    assert sampled[0, n:].tolist() == oracle.sample(row, 8, temperature=0.9, top_p=0.9, seed=3)
    assert stats.hits - before >= 3 * 3 * size, "the requests after the full one found the prompt cached"
