"""Prefix caching over the fake workers: a shared prompt is computed once per stage, every mode
gives the tokens it gives without the cache, and blocks at partial depth are caught up, not
recomputed. The positions each worker computed are counted from its calls."""

from __future__ import annotations

import itertools

import pytest
from fakes import CONFIG, MIXED, FakeWorker, K, LosingWorker, greedy, make_engine, request, run
from support import free_blocks

from coordinator.core import requests as rq
from coordinator.core.engine import Engine, EngineConfig
from coordinator.core.pipeline import Pipeline

B = 4  # the fakes' KV block size
PROMPT = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]  # 3 full blocks and 2 positions


def computed(worker, seq_id) -> int:
    """Positions the worker computed for a sequence."""
    return sum(length for call in worker.calls for s, _, length, _ in call if s == seq_id)


def assert_kept_as_counted(engine, workers) -> None:
    """Each worker keeps exactly the blocks the engine's cache says it holds, and the engine counts them."""
    for k, stage in enumerate(engine.stages):
        for replica, worker_id in enumerate(stage.worker_ids):
            worker = stage.workers[replica]
            held = {b.block_id for b in engine.cache.blocks.values() if b.workers[k] == worker_id}
            assert set(worker.kept) == held, f"stage {k} worker {worker_id}"
            assert stage.cached[replica] == len(held)


def first_computed(worker, seq_id) -> int:
    """The lowest position the worker computed for a sequence."""
    return min(start for call in worker.calls for s, start, _, _ in call if s == seq_id)


def test_a_full_request_after_a_prefix_request_computes_only_the_missing_stages():
    engine, workers = make_engine()
    first = run(engine, request(PROMPT, 3, rq.prefix_mode(CONFIG, 2)))
    assert first.new_tokens == greedy(PROMPT, 3, stages=range(2))
    depth = [[k for k, w in enumerate(b.workers) if w is not None] for b in engine.cache.blocks.values()]
    assert depth[:3] == [[0, 1]] * 3, "the prompt's blocks are kept at depth 2 (stages 0-1)"
    second = run(engine, request(PROMPT + [15], 5, rq.full_mode(CONFIG)))
    assert second.new_tokens == greedy(PROMPT + [15], 5)
    counts = [computed(w, second.seq_id) for w in workers]
    # stages 0-1 skip the 12 cached positions; stages 2-3 compute them (from stage 1's kept rows) and the rest
    assert counts == [15 - 12 + 4, 15 - 12 + 4, 15 + 4, 15 + 4], counts
    assert second.num_cached_tokens == 0, "no position was cached on every stage it runs"
    third = run(engine, request(PROMPT + [15], 5, rq.full_mode(CONFIG)))
    assert third.new_tokens == second.new_tokens and third.num_cached_tokens == 12
    assert [computed(w, third.seq_id) for w in workers] == [15 - 12 + 4] * K


@pytest.mark.parametrize("warm, then", list(itertools.product(range(len(MIXED)), repeat=2)))
def test_every_mode_warm_from_every_mode_gives_the_tokens_it_gives_cold(warm, then):
    cold, _ = make_engine(enable_prefix_caching=False)
    engine, _ = make_engine()
    shared = PROMPT[:9]
    (_, n_a, mode_a), (prompt_b, n_b, mode_b) = MIXED[warm], MIXED[then]
    a = request(shared + [2], n_a, mode_a)
    b = request(shared + list(prompt_b), n_b, mode_b)
    for job in (a, b):
        expected = run(cold, job)
        got = run(engine, job)
        assert (got.new_tokens, got.stages_used) == (expected.new_tokens, expected.stages_used)
    assert engine.cache.stats.hits or engine.cache.stats.queries, "the cache was consulted"
    assert free_blocks(engine) == engine.capacity


def test_requests_running_together_share_blocks_kept_while_they_run():
    engine, workers = make_engine()
    long = run(engine, request(PROMPT, 1, rq.full_mode(CONFIG)))
    seqs = [engine.add(request(PROMPT + [t], 6, mode)) for t, mode in
            [(1, rq.full_mode(CONFIG)), (2, rq.wand_mode(CONFIG, 1.0, (1.0, 1.0, 1.0, 0.0))),
             (3, rq.speculative_mode(CONFIG, 1, 2)), (4, rq.prefix_mode(CONFIG, 3))]]
    engine.run_to_completion(seqs)
    for seq in seqs:
        stages = range(seq.reach + 1)
        if seq.request.mode.name == "wand":
            continue  # checked against the cold engine above
        assert seq.new_tokens == greedy(seq.request.prompt_ids, 6, stages=stages)
        assert seq.num_cached_tokens == 12
        assert all(first_computed(w, seq.seq_id) == 12 for w in workers[: seq.reach + 1])
    assert computed(workers[0], long.seq_id) == 14


def test_requests_arriving_together_compute_a_shared_prompt_once():
    """The first computes the shared blocks; the others wait until they are kept, then start from them."""
    engine, workers = make_engine(max_prefill_chunk=4)  # the shared prompt takes 4 steps
    seqs = [engine.add(request(PROMPT + [t], 3, rq.full_mode(CONFIG))) for t in range(4)]
    engine.run_to_completion(seqs)
    assert [s.num_cached_tokens for s in seqs] == [0, 12, 12, 12]
    assert [s.new_tokens for s in seqs] == [greedy(PROMPT + [t], 3) for t in range(4)]
    assert sum(computed(workers[0], s.seq_id) for s in seqs) == 15 + 3 * 3 + 4 * 2


def test_different_cache_salts_never_share_blocks():
    engine, workers = make_engine()
    a = run(engine, request(PROMPT, 2, rq.full_mode(CONFIG), cache_salt="tenant-a"))
    b = run(engine, request(PROMPT, 2, rq.full_mode(CONFIG), cache_salt="tenant-b"))
    c = run(engine, request(PROMPT, 2, rq.full_mode(CONFIG), cache_salt="tenant-a"))
    d = run(engine, request(PROMPT, 2, rq.full_mode(CONFIG)))
    assert [s.num_cached_tokens for s in (a, b, c, d)] == [0, 0, 12, 0]
    assert computed(workers[0], b.seq_id) == 15 and computed(workers[0], d.seq_id) == 15
    assert a.new_tokens == b.new_tokens == c.new_tokens == d.new_tokens == greedy(PROMPT, 2)


def test_eviction_under_memory_pressure_loses_no_running_sequence():
    """8 KV blocks per worker; each request needs 5. Cached blocks are evicted, oldest first, to
    admit the next request; none is evicted while a running sequence uses it."""
    engine, workers = make_engine(kv_blocks=8)
    prompts = [[p] * 13 for p in range(1, 7)]
    for prompt in prompts + prompts[:2]:
        seq = run(engine, request(prompt, 6, rq.full_mode(CONFIG)))
        assert seq.new_tokens == greedy(prompt, 6)
        assert_kept_as_counted(engine, workers)
    assert engine.cache.stats.evicted > 0
    together = [engine.add(request(prompts[5] + [t], 3, rq.full_mode(CONFIG))) for t in (1, 2)]
    engine.run_to_completion(together)
    assert [s.new_tokens for s in together] == [greedy(prompts[5] + [t], 3) for t in (1, 2)]
    assert free_blocks(engine) == engine.capacity


def test_a_restarted_workers_blocks_are_dropped_everywhere_and_a_later_hit_is_correct():
    workers = [FakeWorker(k, K) for k in range(K)]
    workers[2] = LosingWorker(2, K, lose_on={3})
    engine = Engine(CONFIG, Pipeline(workers), EngineConfig())
    first = run(engine, request(PROMPT, 2, rq.full_mode(CONFIG)))  # extends 1-2 on stage 2
    assert first.num_cached_tokens == 0 and len(engine.cache.blocks) == 3
    dropped = []
    drop = engine.cache.drop
    engine.cache.drop = lambda stage, worker_id: (dropped.append(stage), drop(stage, worker_id))
    second = run(engine, request(PROMPT, 4, rq.full_mode(CONFIG)))  # hits, then stage 2 is lost
    assert dropped == [2] and second.recoveries == 1 and second.new_tokens == greedy(PROMPT, 4)
    assert_kept_as_counted(engine, workers)  # stage 3 let the blocks go too; the rebuilt sequence kept them again
    third = run(engine, request(PROMPT, 4, rq.full_mode(CONFIG)))
    assert third.new_tokens == greedy(PROMPT, 4) and third.num_cached_tokens == 12
    assert_kept_as_counted(engine, workers)


def test_replicas_route_a_prompt_to_the_replica_holding_it():
    workers = [FakeWorker(0, K), [FakeWorker(1, K), FakeWorker(1, K)], FakeWorker(2, K), FakeWorker(3, K)]
    engine = Engine(CONFIG, Pipeline(workers), EngineConfig())
    replicas = engine.stages[1]
    long_a = engine.add(request([9] * 30, 20, rq.full_mode(CONFIG)))  # 13 blocks, on replica 0
    engine.step()
    first = run(engine, request(PROMPT, 2, rq.full_mode(CONFIG)))  # replica 1 had more room
    home = replicas.worker_ids[1]
    long_b = engine.add(request([8] * 60, 20, rq.full_mode(CONFIG)))  # 20 blocks: replica 1 has more room again
    engine.step()
    assert [replicas.home_id(s.seq_id) for s in (long_a, long_b)] == [replicas.worker_ids[0], home]
    again = engine.add(request(PROMPT + [3], 2, rq.full_mode(CONFIG)))
    engine.step()
    assert replicas.home_id(again.seq_id) == home, "placed where its prompt is cached, though it has less room"
    engine.run_to_completion([long_a, long_b, again])
    assert first.num_cached_tokens == 0 and again.num_cached_tokens == 12
    assert again.new_tokens == greedy(PROMPT + [3], 2)
    assert_kept_as_counted(engine, workers)


def test_scores_do_not_use_the_cache_and_caching_can_be_turned_off():
    engine, workers = make_engine()
    run(engine, request(PROMPT, 2, rq.full_mode(CONFIG)))
    score = run(engine, rq.ScoreRequest(tuple(PROMPT), tuple(range(K))))
    assert computed(workers[0], score.seq_id) == len(PROMPT)
    off, workers_off = make_engine(enable_prefix_caching=False)
    run(off, request(PROMPT, 2, rq.full_mode(CONFIG)))
    again = run(off, request(PROMPT, 2, rq.full_mode(CONFIG)))
    assert computed(workers_off[0], again.seq_id) == len(PROMPT) + 1 and not off.cache.blocks
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        EngineConfig(enable_prefix_caching="yes")
