"""The engine and pipeline with fake stage workers: scheduling, catch-up, rollback, batching."""

from __future__ import annotations

import pytest
import torch

from coordinator import requests as rq
from coordinator.engine import Engine
from coordinator.logop import combine, log_probs, top2_margin
from coordinator.pipeline import Pipeline
from stage_workers.config import config_from_dict
from stage_workers.messages import WorkerLost

from fakes import VOCAB, FakeWorker, fake_logits

K = 4
CONFIG = config_from_dict(dict(vocab_size=VOCAB, n_layer=4, n_embd=32, n_head=2, sequence_len=128,
                               poe_stage_layout=[1, 1, 1, 1]))


def make_engine(kv_blocks=64, **engine_kwargs):
    workers = [FakeWorker(k, K, kv_blocks=kv_blocks) for k in range(K)]
    return Engine(CONFIG, Pipeline(workers), [w.info() for w in workers]), workers


def expected_score(prefix, stages):
    return combine([log_probs(fake_logits(k, tuple(prefix))) for k in stages], [1.0] * len(stages), 0.0)


def greedy(prompt, n, stages=range(K)):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(expected_score(seq, list(stages)).argmax()))
    return seq[len(prompt):]


def run(engine, request):
    seq = engine.add(request)
    engine.run_to_completion([seq])
    return seq


def request(prompt, n, mode, **kw):
    return rq.GenerationRequest(tuple(prompt), n, mode, **kw)


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
    tokens, used = [3, 1], []
    for _ in range(12):
        for j in range(K):
            score = expected_score(tokens, range(j + 1))
            if j == K - 1 or top2_margin(score) > bounds[j]:
                tokens.append(int(score.argmax()))
                used.append(j)
                break
    assert seq.new_tokens == tokens[2:] and seq.stages_used == used
    assert 0 in used and K - 1 in used, "the fake table should exercise both early and full exits"
    deepest_lengths = [c[0][2] for c in workers[K - 1].calls]
    assert max(deepest_lengths) > 1, "a skipped stage catches up several positions in one extend"
    assert sum(deepest_lengths) == len(workers[K - 1].tokens.get(seq.seq_id, [])) or seq.finished


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
    assert engine.free_blocks == engine.capacity


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


class LosingWorker(FakeWorker):
    """Loses its whole state (like a restarted process) on chosen extend calls."""

    def __init__(self, *args, lose_on: set[int], **kwargs):
        super().__init__(*args, **kwargs)
        self.lose_on, self.num_extends = lose_on, 0

    def extend(self, batch):
        self.num_extends += 1
        if self.num_extends in self.lose_on:
            self.tokens.clear()
            raise WorkerLost(self.stage, "killed for the test")
        return super().extend(batch)


def test_a_lost_worker_is_rebuilt_from_committed_tokens_and_tokens_are_unchanged():
    workers = [FakeWorker(k, K) for k in range(K)]
    workers[2] = LosingWorker(2, K, lose_on={4, 9})
    engine = Engine(CONFIG, Pipeline(workers), [w.info() for w in workers])
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
    assert engine.free_blocks == engine.capacity


def test_a_worker_lost_too_often_fails_its_sequences_with_the_error():
    workers = [FakeWorker(k, K) for k in range(K)]
    workers[1] = LosingWorker(1, K, lose_on=set(range(2, 100)))
    engine = Engine(CONFIG, Pipeline(workers), [w.info() for w in workers])
    seq = engine.add(request([1, 2], 8, rq.full_mode(CONFIG)))
    with pytest.raises(WorkerLost, match="stage 1 worker lost"):
        engine.run_to_completion([seq])
    assert seq.finished and engine.free_blocks == engine.capacity and not engine.running
