"""The engine and pipeline with fake stage workers: scheduling, catch-up, rollback, batching, chunked prefill."""

from __future__ import annotations

import math

import pytest
import torch
from fakes import (
    CONFIG,
    VOCAB,
    FakeWorker,
    K,
    LosingWorker,
    expected_score,
    fake_logits,
    greedy,
    make_engine,
    request,
    run,
)
from oracle import top2_margin
from support import free_blocks

from coordinator.core import requests as rq
from coordinator.core.engine import Engine, EngineConfig
from coordinator.core.pipeline import Pipeline
from stage_workers.logop import combine, log_probs, normalize
from stage_workers.messages import WorkerLost


def wand_greedy(prompt, n, bounds):
    """WAND (safety 1) over the fakes: each token from the shallowest stage j whose score over
    stages 0..j has a top-2 margin above bounds[j]. Returns (new tokens, the stage each exited at)."""
    tokens, used = list(prompt), []
    for _ in range(n):
        for j in range(K):
            score = expected_score(tokens, range(j + 1))
            if j == K - 1 or top2_margin(score) > bounds[j]:
                tokens.append(int(score.argmax()))
                used.append(j)
                break
    return tokens[len(prompt):], used


def test_full_mode_computes_each_position_once_per_stage():
    engine, workers = make_engine()
    seq = run(engine, request([1, 2, 3], 6, rq.full_mode(CONFIG)))
    assert seq.new_tokens == greedy([1, 2, 3], 6)
    for w in workers:  # prefill of 3, then 5 single-token decodes (the last token is never fed)
        assert [c[0][1:3] for c in w.calls] == [(0, 3)] + [(p, 1) for p in range(3, 8)]


def test_prefix_mode_never_calls_stages_past_its_deepest():
    engine, workers = make_engine()
    seq = run(engine, request([5, 6], 4, rq.prefix_mode(CONFIG, 2)))
    assert seq.new_tokens == greedy([5, 6], 4, stages=[0, 1])
    assert workers[2].calls == [] and workers[3].calls == []


def test_wand_defers_skipped_stages_and_catches_up_in_one_batch():
    engine, workers = make_engine()
    bounds = (2.0, 2.0, 2.0, 0.0)
    seq = run(engine, request([3, 1], 12, rq.wand_mode(CONFIG, 1.0, bounds)))
    tokens, used = wand_greedy([3, 1], 12, bounds)
    assert seq.new_tokens == tokens and seq.stages_used == used
    assert 0 in used and K - 1 in used, "the fake table should exercise both early and full exits"
    deepest_lengths = [c[0][2] for c in workers[K - 1].calls]
    assert max(deepest_lengths) > 1, "a skipped stage catches up several positions in one extend"
    # the deepest stage ran only for tokens that needed it, and then caught up every position up to
    # the one it scored, each once: the prompt (2) plus one per new token before the last full-depth one
    last_full = max(i for i, stage in enumerate(used) if stage == K - 1)
    assert len(deepest_lengths) == used.count(K - 1)
    assert sum(deepest_lengths) == 2 + last_full


def test_speculative_equals_full_greedy_and_rolls_back_rejected_drafts():
    engine, workers = make_engine()
    seq = run(engine, request([2, 7], 15, rq.speculative_mode(CONFIG, 0, 3)))
    assert seq.new_tokens == greedy([2, 7], 15)
    assert seq.num_proposed > 0 and 0 < seq.num_accepted < seq.num_proposed
    assert any(w.rollbacks for w in workers), "some drafts were rejected and rolled back"
    verify_lengths = [c[0][2] for c in workers[K - 1].calls]
    assert verify_lengths[0] == 2 + 3, "the first verification also catches up the prompt"
    assert max(verify_lengths[1:]) == 4, "verification covers k_draft + 1 positions in one pass"


def test_requests_of_mixed_modes_share_steps_and_stay_exact():
    engine, workers = make_engine()
    reqs = [
        request([1, 2], 5, rq.full_mode(CONFIG)),
        request([3], 7, rq.speculative_mode(CONFIG, 1, 2)),
        request([4, 4, 4], 6, rq.wand_mode(CONFIG, 1.0, (1.0, 1.0, 1.0, 0.0))),
        request([9], 4, rq.composition_mode(CONFIG, [0, 3], [0.5, 2.0])),
    ]
    seqs = [engine.add(r) for r in reqs]
    engine.step()
    late = engine.add(request([6, 5], 3, rq.full_mode(CONFIG)))  # joins a running batch
    engine.run_to_completion(seqs + [late])
    assert max(len(c) for c in workers[0].calls) >= 4, "several sequences share one extend"
    assert seqs[0].new_tokens == greedy([1, 2], 5)
    assert seqs[1].new_tokens == greedy([3], 7)
    assert (seqs[2].new_tokens, seqs[2].stages_used) == wand_greedy([4, 4, 4], 6, (1.0, 1.0, 1.0, 0.0))
    assert late.new_tokens == greedy([6, 5], 3)
    composed = [9]
    for _ in range(4):
        s = combine([log_probs(fake_logits(k, tuple(composed))) for k in (0, 3)], [0.5, 2.0], 0.0)
        composed.append(int(s.argmax()))
    assert seqs[3].new_tokens == composed[1:]


def test_stop_token_ends_a_sequence_and_frees_its_cache():
    engine, workers = make_engine()
    full = greedy([1, 2], 8)
    stop = full[3]
    seq = run(engine, request([1, 2], 8, rq.full_mode(CONFIG), stop_token_ids=frozenset({stop})))
    assert seq.new_tokens == full[: full.index(stop) + 1] and seq.finish_reason == "stop"
    assert all(seq.seq_id not in w.tokens for w in workers)
    assert free_blocks(engine) == engine.capacity


def test_requests_wait_for_kv_room_and_oversized_ones_are_refused():
    engine, _ = make_engine(kv_blocks=6)  # 6 blocks of 4 positions per stage
    with pytest.raises(ValueError, match="needs 28 KV positions on stage 0, whose cache holds 24"):
        engine.add(request([1] * 20, 8, rq.full_mode(CONFIG)))
    a = engine.add(request([1] * 8, 8, rq.full_mode(CONFIG)))  # 4 blocks
    b = engine.add(request([2] * 4, 4, rq.full_mode(CONFIG)))  # 2 blocks: fits beside a
    c = engine.add(request([3] * 4, 4, rq.full_mode(CONFIG)))  # must wait
    engine.step()
    assert engine.running == [a, b] and list(engine.waiting) == [c]
    engine.run_to_completion([a, b, c])
    assert c.new_tokens == greedy([3] * 4, 4)


def test_a_lost_worker_is_rebuilt_from_committed_tokens_and_tokens_are_unchanged():
    workers = [FakeWorker(k, K) for k in range(K)]
    workers[2] = LosingWorker(2, K, lose_on={4, 9})
    engine = Engine(CONFIG, Pipeline(workers))
    reqs = [
        request([1, 2], 8, rq.full_mode(CONFIG)),
        request([3], 9, rq.speculative_mode(CONFIG, 1, 2)),
        request([4, 4, 4], 8, rq.wand_mode(CONFIG, 1.0, (1.0, 1.0, 1.0, 0.0))),
    ]
    seqs = [engine.add(r) for r in reqs]
    engine.run_to_completion(seqs)
    assert all(seq.recoveries == 2 for seq in seqs), "both losses were recovered"
    clean, _ = make_engine()
    for seq, req in zip(seqs, reqs):
        alone = run(clean, req)
        assert (seq.new_tokens, seq.stages_used) == (alone.new_tokens, alone.stages_used)
    assert seqs[0].new_tokens == greedy([1, 2], 8) and seqs[1].new_tokens == greedy([3], 9)
    assert free_blocks(engine) == engine.capacity


def test_only_the_lost_workers_sequences_are_rebuilt_and_its_new_kv_size_is_read():
    """Stage 2 has two replicas; one restarts with a smaller KV pool. The other replica's
    sequences are not touched; of the restarted one's, those that no longer fit fail (UNAVAILABLE),
    the rest are rebuilt with their tokens unchanged."""

    class Shrinking(LosingWorker):
        def extend(self, batch):
            if self.num_extends + 1 in self.lose_on:
                self.kv_blocks = 5  # the restarted process sized its pool from less free memory
            return super().extend(batch)

    workers = [FakeWorker(k, K) for k in range(K)]
    workers[2] = [Shrinking(2, K, lose_on={4}, kv_blocks=64), FakeWorker(2, K)]
    engine = Engine(CONFIG, Pipeline(workers))
    jobs = [([1, 2], 8), ([3], 9), ([4, 4, 4], 8), ([5, 6], 8)]  # 3 KV blocks each
    seqs = [engine.add(request(prompt, n, rq.full_mode(CONFIG))) for prompt, n in jobs]
    engine.step()
    on_lost = {s.seq_id for s in seqs if engine.stages[2].placed[s.seq_id][0] == 0}
    assert len(on_lost) == 2
    rebuilt = []
    rebuild = engine.rebuild
    engine.rebuild = lambda s: (rebuilt.extend(x.seq_id for x in s), rebuild(s))
    while not all(s.finished for s in seqs):
        engine.step()
    assert engine.stages[2].capacity[0] == 5, "the restarted worker's KV size was re-read"
    failed = [s for s in seqs if s.error is not None]
    assert len(failed) == 1 and failed[0].seq_id in on_lost, "6 blocks promised there, 5 left: one does not fit"
    assert isinstance(failed[0].error, WorkerLost) and "too few" in str(failed[0].error)
    assert set(rebuilt) == on_lost - {failed[0].seq_id}, "only the lost worker's sequences were rebuilt"
    for s, (prompt, n) in zip(seqs, jobs):
        if s.error is None:
            assert s.new_tokens == greedy(prompt, n), f"sequence {s.seq_id}"
    assert free_blocks(engine) == engine.capacity


def test_a_worker_lost_too_often_fails_its_sequences_with_the_error():
    workers = [FakeWorker(k, K) for k in range(K)]
    workers[1] = LosingWorker(1, K, lose_on=set(range(2, 100)))
    engine = Engine(CONFIG, Pipeline(workers))
    seq = engine.add(request([1, 2], 8, rq.full_mode(CONFIG)))
    with pytest.raises(WorkerLost, match="stage 1 worker lost"):
        engine.run_to_completion([seq])
    assert seq.finished and free_blocks(engine) == engine.capacity and not engine.running


# ---- chunked prefill ------------------------------------------------------------------------

MODES = {
    "full": lambda: rq.full_mode(CONFIG),
    "prefix": lambda: rq.prefix_mode(CONFIG, 2),
    "composition": lambda: rq.composition_mode(CONFIG, [0, 3], [0.5, 2.0]),
    "wand": lambda: rq.wand_mode(CONFIG, 1.0, (1.0, 1.0, 1.0, 0.0)),
    "speculative": lambda: rq.speculative_mode(CONFIG, 1, 3),
}


def test_a_long_prompt_enters_in_chunks_on_every_stage():
    engine, workers = make_engine(max_prefill_chunk=8)
    prompt = [i % VOCAB for i in range(30)]
    seq = run(engine, request(prompt, 4, rq.full_mode(CONFIG)))
    assert seq.new_tokens == greedy(prompt, 4)
    chunks, rest, decodes = [(0, 8, 0), (8, 8, 0), (16, 8, 0)], [(24, 6, 1)], [(p, 1, 1) for p in (30, 31, 32)]
    for w in workers:  # (start, length, num_logits): chunks without logits, the rest of the prompt, decodes
        assert [c[0][1:] for c in w.calls] == chunks + rest + decodes


def test_a_decoding_sequence_gets_a_token_every_step_while_a_prompt_is_chunked():
    engine, workers = make_engine(max_prefill_chunk=8)
    decoding = engine.add(request([1, 2], 12, rq.full_mode(CONFIG)))
    engine.step()
    prompt = [i % VOCAB for i in range(40)]
    long = engine.add(request(prompt, 3, rq.full_mode(CONFIG)))
    for step in range(1, 6):  # five chunks of 8; the last is the decoder's own plan and yields a token
        engine.step()
        assert len(decoding.new_tokens) == step + 1 and long.num_computed == [8 * step] * K
        assert [c[1:3] for c in workers[0].calls[-1]] == [(step + 1, 1), (8 * (step - 1), 8)]
        assert len(long.new_tokens) == (step == 5)
    engine.run_to_completion([decoding, long])
    assert decoding.new_tokens == greedy([1, 2], 12) and long.new_tokens == greedy(prompt, 3)


@pytest.mark.parametrize("mode", MODES)
def test_chunked_prefill_gives_the_unchunked_tokens(mode):
    prompt = [(7 * i) % VOCAB for i in range(23)]
    alone = run(make_engine()[0], request(prompt, 10, MODES[mode]()))
    for chunk in (1, 5, 22):
        engine, workers = make_engine(max_prefill_chunk=chunk)
        seq = run(engine, request(prompt, 10, MODES[mode]()))
        assert (seq.new_tokens, seq.stages_used) == (alone.new_tokens, alone.stages_used), f"chunk {chunk}"
        assert max(n for call in workers[0].calls for _, _, n, _ in call) <= chunk


def test_chunked_prefill_gives_the_unchunked_sampled_tokens():
    sampling = rq.check_sampling(True, 0.9, None, 0.95, 3)
    req = request([i % VOCAB for i in range(21)], 8, rq.full_mode(CONFIG), sampling=sampling)
    assert run(make_engine(max_prefill_chunk=4)[0], req).new_tokens == run(make_engine()[0], req).new_tokens


def test_logits_in_chunks_return_stage_logits_at_every_position():
    tokens = tuple((5 * i + 1) % VOCAB for i in range(19))
    engine, workers = make_engine(max_prefill_chunk=6)
    seq = run(engine, rq.LogitsRequest(tokens, (0, 2)))
    assert [c[0][1:] for c in workers[2].calls] == [(0, 6, 6), (6, 6, 6), (12, 6, 6), (18, 1, 1)]
    assert workers[3].calls == []
    for k in (0, 2):
        expected = torch.stack([fake_logits(k, tokens[: p + 1]) for p in range(len(tokens))])  # (T, V)
        assert torch.equal(seq.decoder.stage_logits(k), expected)


def test_scoring_in_chunks_returns_each_tokens_logprob_and_alternatives_from_the_workers():
    tokens = tuple((5 * i + 1) % VOCAB for i in range(19))
    engine, workers = make_engine(max_prefill_chunk=6)
    seq = run(engine, rq.ScoreRequest(tokens, (0, 2), top_n=3))
    assert workers[3].calls == [] and len(workers[2].calls) == 4
    for p in range(len(tokens)):
        lp = normalize(expected_score(tokens[: p + 1], (0, 2)))  # (V,)
        if p + 1 < len(tokens):
            assert seq.decoder.logprobs[p] == pytest.approx(float(lp[tokens[p + 1]]), abs=1e-6)
        top = lp.topk(3)
        assert [t for t, _ in seq.decoder.top[p]] == top.indices.tolist()
        assert [v for _, v in seq.decoder.top[p]] == pytest.approx(top.values.tolist(), abs=1e-6)
    assert math.isnan(seq.decoder.logprobs[-1]), "no token follows the last position"


def test_chunked_prefill_on_the_tiny_model_gives_the_same_tokens_and_logits(tiny_dir, tiny_model):
    from coordinator import PoEModel

    chunked = PoEModel.from_pretrained(tiny_dir, engine_config=EngineConfig(max_prefill_chunk=7))
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    K_ = tiny_model.config.num_stages
    calls = [
        lambda m: m.generate(ids, 6),
        lambda m: m.generate_parallel_composition(ids, [0, K_ - 1], [0.5, 1.0], 6),
        lambda m: m.generate_wand(ids, 6, p99_bounds=[0.6] * (K_ - 1) + [0.0], return_stages_used=True),
        lambda m: m.generate_speculative(ids, 0, 3, 6),
    ]
    for call in calls:
        out, expected = call(chunked), call(tiny_model)  # a tensor, or (tokens, stages_used)
        out, expected = (out, expected) if isinstance(out, tuple) else ((out,), (expected,))
        assert all(torch.equal(a, b) for a, b in zip(out, expected))
    assert torch.allclose(chunked.forward(ids), tiny_model.forward(ids), atol=1e-4)
    assert torch.allclose(chunked.forward_stage(ids, 1), tiny_model.forward_stage(ids, 1), atol=1e-4)
    chunked.loop.stop()


def test_a_step_feeds_at_most_max_num_batched_tokens_decodes_first_and_tokens_are_unchanged():
    engine, workers = make_engine(max_num_batched_tokens=10, max_prefill_chunk=8)
    decoding = [engine.add(request([i, i + 1], 12, rq.full_mode(CONFIG))) for i in range(3)]
    engine.step()
    prompts = [[(3 * i + j) % VOCAB for i in range(20)] for j in range(2)]
    long = [engine.add(request(p, 3, rq.full_mode(CONFIG))) for p in prompts]
    for _ in range(4):
        engine.step()
        fed = [seg for seg in workers[0].calls[-1]]
        assert sum(length for _, _, length, _ in fed) <= 10, f"fed {fed}"
        assert {seq.seq_id for seq in decoding} <= {seq_id for seq_id, *_ in fed}, "every decode got its token"
    engine.run_to_completion(decoding + long)
    assert [s.new_tokens for s in decoding] == [greedy([i, i + 1], 12) for i in range(3)]
    assert [s.new_tokens for s in long] == [greedy(p, 3) for p in prompts]


def test_engine_limits_are_checked():
    for name in ("max_num_batched_tokens", "max_prefill_chunk", "max_num_seqs"):
        with pytest.raises(ValueError, match=f"{name}=0 is invalid"):
            EngineConfig(**{name: 0})
