"""Replicated stages: placement, batch splitting and merging, scaling while requests run.

Fake workers show where each sequence ran; the tiny model checks that replicas change no
token or logit, in process and on Ray (with a `scale_stage` call during generation).
"""

from __future__ import annotations

import pytest
import torch
from fakes import CONFIG, MIXED, FakeWorker, K, greedy, reference_tokens, request
from support import free_blocks, stage_infos

from coordinator.core import requests as rq
from coordinator.core.engine import Engine
from coordinator.core.pipeline import Pipeline


def replicated_engine(replicas: list[int], stage0_blocks: int = 64):
    """An engine over fakes with replicas[k] workers on stage k; returns it and the fakes per stage."""
    fakes = [[FakeWorker(k, K, kv_blocks=stage0_blocks if k == 0 else 64) for _ in range(n)]
             for k, n in enumerate(replicas)]
    return Engine(CONFIG, Pipeline(fakes)), fakes


def seqs_seen(fake: FakeWorker) -> set[int]:
    return {seg[0] for call in fake.calls for seg in call}


@pytest.mark.parametrize("replicas", [[3, 1, 1, 1], [2, 1, 2, 1]], ids=["stage0x3", "stage0x2-stage2x2"])
def test_sequences_spread_over_replicas_stay_on_theirs_and_keep_their_tokens(replicas):
    engine, fakes = replicated_engine(replicas)
    seqs = [engine.add(request(*job)) for job in MIXED]
    engine.run_to_completion(seqs)
    assert [(s.new_tokens, s.stages_used) for s in seqs] == reference_tokens()
    for k, stage in enumerate(fakes):
        seen = [seqs_seen(f) for f in stage]
        assert all(seen), f"stage {k}: every replica runs some sequence"
        assert sum(len(s) for s in seen) == len(set().union(*seen)), f"stage {k}: a sequence ran on two replicas"
    assert any(len(c) > 1 for f in fakes[0] for c in f.calls), "a replica's part of a step holds several sequences"
    assert free_blocks(engine) == engine.capacity and not any(f.tokens for stage in fakes for f in stage)


def test_a_sequence_must_fit_one_replica():
    engine, _ = replicated_engine([2, 1, 1, 1], stage0_blocks=6)  # stage 0: 2 replicas of 6 blocks of 4 positions
    with pytest.raises(ValueError, match="needs 28 KV positions on stage 0, whose cache holds 24"):
        engine.add(request([1] * 20, 8, rq.full_mode(CONFIG)))  # 7 blocks: the stage has 12, a replica 6
    a, b, c = (engine.add(request([i] * 8, 8, rq.full_mode(CONFIG))) for i in (1, 2, 3))  # 4 blocks each
    engine.step()
    assert engine.running == [a, b] and list(engine.waiting) == [c], "4 blocks are free, but 2 on each replica"
    assert {s: r for s, (r, _) in engine.stages[0].placed.items()} == {a.seq_id: 0, b.seq_id: 1}
    engine.run_to_completion([a, b, c])
    assert c.new_tokens == greedy([3] * 8, 8)


def test_removing_a_replica_mid_generation_moves_its_sequences_and_keeps_their_tokens():
    engine, fakes = replicated_engine([3, 1, 1, 1])
    seqs = [engine.add(request(*job)) for job in MIXED]
    for _ in range(3):
        engine.step()
    removed = engine.remove_replica(0, 1)
    assert removed is fakes[0][1] and engine.stages[0].workers == [fakes[0][0], fakes[0][2]]
    moved = seqs_seen(removed) & {s.seq_id for s in engine.running}
    assert moved, "the removed replica had sequences in flight"
    num_calls = len(removed.calls)
    engine.run_to_completion(seqs)
    assert len(removed.calls) == num_calls, "nothing runs on a removed replica"
    assert [(s.new_tokens, s.stages_used) for s in seqs] == reference_tokens()
    for seq_id in moved:  # rebuilt on a remaining replica from position 0
        first = [seg for f in fakes[0] if f is not removed for c in f.calls for seg in c if seg[0] == seq_id][0]
        assert first[1] == 0 and first[2] > 1
    assert free_blocks(engine) == engine.capacity


def test_removing_a_replica_refuses_when_the_others_lack_room_and_changes_nothing():
    engine, fakes = replicated_engine([2, 1, 1, 1], stage0_blocks=6)
    a, b = (engine.add(request([i] * 8, 8, rq.full_mode(CONFIG))) for i in (1, 2))  # 4 blocks each
    engine.step()
    placed = dict(engine.stages[0].placed)
    with pytest.raises(ValueError, match="need 4 KV blocks, the other replicas have 2 free"):
        engine.remove_replica(0, 0)
    with pytest.raises(ValueError, match="stage 1 has one replica"):
        engine.remove_replica(1, 0)
    assert engine.stages[0].workers == fakes[0] and engine.stages[0].placed == placed
    engine.run_to_completion([a, b])
    assert a.new_tokens == greedy([1] * 8, 8) and b.new_tokens == greedy([2] * 8, 8)


def test_an_added_replica_takes_new_sequences():
    engine, fakes = replicated_engine([1, 1, 1, 1])
    first = [engine.add(request(*job)) for job in MIXED[:3]]
    engine.step()
    added = FakeWorker(0, K)
    engine.add_replica(0, added)
    later = [engine.add(request(*job)) for job in MIXED[3:]]
    engine.run_to_completion(first + later)
    assert seqs_seen(added) == {s.seq_id for s in later}, "the empty replica is the least loaded"
    assert [(s.new_tokens, s.stages_used) for s in first + later] == reference_tokens()


def test_replicas_of_the_tiny_model_give_the_plain_model_outputs(tiny_dir, tiny_model):
    from coordinator import PoEModel

    model = PoEModel.from_pretrained(tiny_dir, replicas=[2, 1, 2, 1])
    assert len(model.workers) == 6 and len(stage_infos(model)) == 4
    ids = torch.randint(0, model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(4))
    for call in (lambda m: m.generate(ids, 8), lambda m: m.generate_speculative(ids, 0, 3, 8),
                 lambda m: m.generate_wand(ids, 8, p99_bounds=[0.6, 0.6, 0.6, 0.0])):
        assert torch.equal(call(model), call(tiny_model))
    assert torch.allclose(model.forward(ids), tiny_model.forward(ids), atol=1e-5)
    with pytest.raises(ValueError, match=r"replicas=\[2, 1\] is invalid; allowed: 4 integers >= 1"):
        PoEModel.from_pretrained(tiny_dir, replicas=[2, 1])
    model.loop.stop()


def test_ray_stage_scales_down_and_up_while_requests_run(ray_session, tiny_dir, tiny_model):
    from coordinator import PoEModel
    from coordinator.serving_config import ServingConfig, StagePlacement

    config = tiny_model.config
    ids = torch.randint(0, config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(5))
    modes = [rq.full_mode(config), rq.speculative_mode(config, 0, 3), rq.wand_mode(config, 1.0, [0.6, 0.6, 0.6, 0.0]),
             rq.composition_mode(config, [0, 3], [0.5, 1.0])]
    jobs = [rq.build_requests(config, ids[i : i + 1], 40, mode)[0] for i, mode in enumerate(modes)]
    expected = [s.new_tokens for s in tiny_model.run(jobs)]
    serving = ServingConfig(stages=(StagePlacement(replicas=2),) + (StagePlacement(),) * 3)
    with PoEModel.on_ray(tiny_dir, config=serving) as cluster:
        assert [len(r) for r in cluster.backend.replicas] == [2, 1, 1, 1] and len(cluster.backend.actors) == 5
        rebuilt = []
        rebuild = cluster.engine.rebuild
        cluster.engine.rebuild = lambda seqs: (rebuilt.extend(seqs), rebuild(seqs))
        handles = [cluster.loop.submit(job) for job in jobs]
        assert handles[0].events.get(timeout=120).tokens, "generation is under way"
        cluster.scale_stage(0, 1)
        assert rebuilt, "the removed replica's sequences moved while in flight"
        cluster.scale_stage(0, 2)
        assert [len(r) for r in cluster.backend.replicas] == [2, 1, 1, 1]
        later = cluster.run(jobs[:2])  # the new replica is the least loaded
        assert [h.result(timeout=300).new_tokens for h in handles] == expected
        assert [s.new_tokens for s in later] == expected[:2]
        assert free_blocks(cluster.engine) == cluster.engine.capacity
