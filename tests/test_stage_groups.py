"""Stage groups over the fakes: one worker serving several consecutive stages gives every mode the
tokens of one worker per stage, with and without replicas, and a group is one worker to the
coordinator (one id, one report per step)."""

from __future__ import annotations

import pytest
from fakes import CONFIG, MIXED, K, make_grouped_engine, reference_tokens, request
from support import free_blocks

from coordinator.core import requests as rq

LAYOUTS = {"[0-3]": [(0, 3)], "[0][1-3]": [(0, 0), (1, 3)], "[0-1][2-3]": [(0, 1), (2, 3)],
           "[0][1][2][3]": [(0, 0), (1, 1), (2, 2), (3, 3)]}


@pytest.mark.parametrize("replicas", [False, True], ids=["one", "replicas"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_mode_in_every_layout_gives_the_tokens_of_one_worker_per_stage(layout, replicas):
    groups = LAYOUTS[layout]
    engine, workers = make_grouped_engine(groups, [2] * len(groups) if replicas else None)
    seqs = [engine.add(request(*job)) for job in MIXED]
    engine.run_to_completion(seqs)
    assert [(s.new_tokens, s.stages_used) for s in seqs] == reference_tokens()
    assert engine.pipeline.topology == [[i * (1 + replicas) + r for i, (a, b) in enumerate(groups) if a <= k <= b
                                         for r in range(1 + replicas)] for k in range(K)]
    assert free_blocks(engine) == engine.capacity
    if replicas:
        used = [{s for w in g.workers for call in w.calls for s, *_ in call} for gs in workers for g in gs]
        assert all(used), "every replica served some sequences"


def test_wand_exits_inside_a_group_park_rows_in_the_group():
    """WAND exits at stages 1 and 2, both inside one worker, catch up later as across workers."""
    engine, workers = make_grouped_engine([(0, 0), (1, 3)])
    mode = rq.wand_mode(CONFIG, 1.0, (9.0, 1.5, 0.3, 0.0))
    seq = engine.add(request([4, 4, 4], 12, mode))
    engine.run_to_completion([seq])
    reference = make_grouped_engine([(0, 0), (1, 1), (2, 2), (3, 3)])[0]
    expected = reference.add(request([4, 4, 4], 12, mode))
    reference.run_to_completion([expected])
    assert (seq.new_tokens, seq.stages_used) == (expected.new_tokens, expected.stages_used)
    assert {1, 2, 3} <= set(seq.stages_used), "exits at each stage of the group"


def test_removing_a_group_replica_moves_its_sequences_on_every_stage_it_served():
    engine, groups = make_grouped_engine([(0, 1), (2, 3)], [2, 1])
    seqs = [engine.add(request(*job)) for job in MIXED]
    engine.step()
    engine.remove_replica(1, 0)  # stage 1's first replica is the first group's: it leaves stages 0 and 1
    assert [len(stage.workers) for stage in engine.stages] == [1, 1, 1, 1]
    engine.run_to_completion(seqs)
    assert [(s.new_tokens, s.stages_used) for s in seqs] == reference_tokens()


def test_a_stage_group_on_ray_scales_as_one_worker(ray_session, tiny_dir):
    """Scaling stage 1 of a [0-1][2-3] layout adds a worker serving stages 0 and 1; tokens stay."""
    import torch

    from coordinator import PoEModel
    from coordinator.serving_config import ServingConfig

    ids = torch.randint(0, 500, (2, 20), generator=torch.Generator().manual_seed(3))
    with PoEModel.from_pretrained(tiny_dir) as reference:
        expected = reference.generate(ids, 8)
    with PoEModel.on_ray(tiny_dir, config=ServingConfig(groups=((0, 1), (2, 3)))) as cluster:
        assert len({pid for _, _, w in cluster.worker_locations() for pid in [w.pid]}) == 2, "two processes"
        assert torch.equal(cluster.generate(ids, 8), expected)
        cluster.scale_stage(1, 2)
        topology = cluster.engine.pipeline.topology
        assert topology[0] == topology[1] and len(topology[0]) == 2 and topology[2] == topology[3]
        assert torch.equal(cluster.generate(ids, 8), expected)
        cluster.scale_stage(0, 1)
        assert [len(ids) for ids in cluster.engine.pipeline.topology] == [1, 1, 1, 1]
        assert torch.equal(cluster.generate(ids, 8), expected)
