"""Pipelined micro-batches: a step's sequences move through the stages as a wavefront.

Fakes whose extends start without computing (as a Ray actor's do) log every start and wait, so
the tests see which calls were in flight together; tokens, stage exits and logits must not
depend on the number of micro-batches, on fakes, the tiny model in process and on Ray.
"""

from __future__ import annotations

import pytest
import torch

from coordinator import requests as rq
from coordinator.engine import Engine, EngineConfig
from coordinator.pipeline import Pipeline
from coordinator.serving_config import config_from_yaml_dict

from fakes import VOCAB, FakeWorker
from test_engine import CONFIG, K, LosingWorker, request
from test_replicas import MIXED, reference_tokens


class DeferredWorker(FakeWorker):
    """Starts an extend and computes it only when waited on; logs ("start" | "wait", stage, seq_ids)."""

    def __init__(self, stage: int, log: list):
        super().__init__(stage, K)
        self.log = log

    def submit_extend(self, batch):
        seq_ids = tuple(seg.seq_id for seg in batch.segments)
        self.log.append(("start", self.stage, seq_ids))

        def wait():
            self.log.append(("wait", self.stage, seq_ids))
            return self.extend(batch)

        return wait


def deferred_engine(num_micro_batches: int, **engine_kwargs):
    log: list = []
    workers = [DeferredWorker(k, log) for k in range(K)]
    config = EngineConfig(pipeline_micro_batches=num_micro_batches, **engine_kwargs)
    return Engine(CONFIG, Pipeline(workers), config), log


def wavefronts(log: list) -> list[list[tuple[int, tuple[int, ...]]]]:
    """The log cut into wavefronts: the calls started together, each waited on before the next start."""
    waves = []
    while log:
        num_starts = next((i for i, event in enumerate(log) if event[0] == "wait"), len(log))
        starts, waits = log[:num_starts], log[num_starts : 2 * num_starts]
        assert [e[1:] for e in waits] == [e[1:] for e in starts], "a wavefront waits on exactly what it started"
        waves.append([e[1:] for e in starts])
        log = log[2 * num_starts :]
    return waves


def score_request() -> rq.ScoreRequest:
    return rq.ScoreRequest(tuple((5 * i + 1) % VOCAB for i in range(19)), (0, 2))


def mixed_requests() -> list:
    """Every mode, a sampled row, a prompt longer than one prefill chunk and a scorer."""
    sampling = rq.check_sampling(True, 0.9, None, 0.95, 3)
    return [request(*job) for job in MIXED] + [
        request([i % VOCAB for i in range(21)], 6, rq.full_mode(CONFIG), sampling=sampling),
        request([(3 * i) % VOCAB for i in range(23)], 7, rq.wand_mode(CONFIG, 1.0, (2.0, 2.0, 2.0, 0.0))),
        score_request(),
    ]


def outcomes(engine: Engine) -> list:
    seqs = [engine.add(r) for r in mixed_requests()]
    engine.run_to_completion(seqs)
    scored = seqs[-1].decoder
    return [(s.new_tokens, s.stages_used, s.num_accepted) for s in seqs[:-1]] + [
        [scored.stage_logits(k) for k in (0, 2)]
    ]


def test_tokens_exits_and_logits_do_not_depend_on_the_number_of_micro_batches():
    plain = Engine(CONFIG, Pipeline([FakeWorker(k, K) for k in range(K)]), EngineConfig(max_prefill_chunk=8))
    expected = outcomes(plain)
    wand_exits = [e[1] for e in expected[2:-1] if e[1]]
    assert any(min(u) < K - 1 == max(u) for u in wand_exits), "WAND exits both early and at the last stage"
    for num_micro_batches in (1, 2, 3):
        engine, log = deferred_engine(num_micro_batches, max_prefill_chunk=8)
        got = outcomes(engine)
        for a, b in zip(got[:-1], expected[:-1]):
            assert a == b, f"{num_micro_batches} micro-batches"
        assert all(torch.equal(a, b) for a, b in zip(got[-1], expected[-1]))
        largest = max(len(wave) for wave in wavefronts(log))
        assert largest == min(num_micro_batches, K), "that many extends were in flight at once"
        assert engine.free_blocks == engine.capacity


def test_stage_1_gets_micro_batch_0_in_the_wavefront_where_stage_0_gets_micro_batch_1():
    engine, log = deferred_engine(2)
    a, b = engine.add(request([1, 2, 3], 4, rq.full_mode(CONFIG))), engine.add(request([4, 5, 6], 4, rq.full_mode(CONFIG)))
    for _ in range(3):
        del log[:]
        engine.step()
        A, B = (a.seq_id,), (b.seq_id,)
        assert wavefronts(log) == [
            [(0, A)],
            [(1, A), (0, B)],
            [(2, A), (1, B)],
            [(3, A), (2, B)],
            [(3, B)],
        ]


def test_a_micro_batch_runs_a_stage_only_when_one_of_its_sequences_reaches_it():
    engine, log = deferred_engine(3)
    reach = {  # seq_id -> the stages it runs: all, a prefix of two, or a WAND exit at stage 0 every token
        engine.add(request([1, 2], 5, rq.full_mode(CONFIG))).seq_id: {0, 1, 2, 3},
        engine.add(request([3, 4], 5, rq.prefix_mode(CONFIG, 2))).seq_id: {0, 1},
        engine.add(request([5, 6], 5, rq.wand_mode(CONFIG, 0.0, (0.0,) * K))).seq_id: {0},
    }
    while engine.running or engine.waiting:
        del log[:]
        engine.step()
        first: dict[int, int] = {}  # seq_id -> wavefront of its stage-0 call, its micro-batch's index
        stages: dict[int, set[int]] = {s: set() for s in reach}
        for t, wave in enumerate(wavefronts(log)):
            assert len({k for k, _ in wave}) == len(wave), "one call per stage per wavefront"
            for k, seq_ids in wave:
                assert len(seq_ids) == 1, "three sequences, three micro-batches"
                first.setdefault(seq_ids[0], t)
                assert t == first[seq_ids[0]] + k, "micro-batch m runs stage k at wavefront m + k"
                stages[seq_ids[0]].add(k)
        assert sorted(first.values()) == [0, 1, 2]
        assert stages == {s: r for s, r in reach.items() if s in stages}


def test_micro_batches_balance_positions_a_prompt_against_decode_tokens():
    engine, log = deferred_engine(2)
    decoding = [engine.add(request([i, i + 1], 6, rq.full_mode(CONFIG))) for i in range(3)]
    engine.step()
    prompt = engine.add(request([i % VOCAB for i in range(20)], 2, rq.full_mode(CONFIG)))
    del log[:]
    engine.step()
    stage0 = [seq_ids for wave in wavefronts(log) for k, seq_ids in wave if k == 0]
    assert stage0 == [(prompt.seq_id,), tuple(s.seq_id for s in decoding)], "the prompt alone, then the decodes"


def test_a_worker_lost_mid_wavefront_is_rebuilt_and_tokens_are_unchanged():
    workers = [FakeWorker(k, K) for k in range(K)]
    workers[2] = LosingWorker(2, K, lose_on={4, 9})
    engine = Engine(CONFIG, Pipeline(workers), EngineConfig(pipeline_micro_batches=2))
    seqs = [engine.add(request(*job)) for job in MIXED]
    engine.run_to_completion(seqs)
    assert all(seq.recoveries == 2 for seq in seqs), "both losses were recovered"
    assert [(s.new_tokens, s.stages_used) for s in seqs] == reference_tokens()
    assert engine.free_blocks == engine.capacity


def test_pipeline_micro_batches_is_read_from_yaml_and_checked():
    assert config_from_yaml_dict({"pipeline_micro_batches": 3}, "x.yaml").pipeline_micro_batches == 3
    assert config_from_yaml_dict({}, "x.yaml").pipeline_micro_batches == 1
    with pytest.raises(ValueError, match="x.yaml: pipeline_micro_batches=0 must be an integer >= 1"):
        config_from_yaml_dict({"pipeline_micro_batches": 0}, "x.yaml")


def tiny_jobs(config, rows: int, seed: int) -> list:
    ids = torch.randint(0, config.vocab_size, (rows, 24), generator=torch.Generator().manual_seed(seed))
    K_ = config.num_stages
    modes = [rq.full_mode(config), rq.speculative_mode(config, 0, 3),
             rq.wand_mode(config, 1.0, [0.6] * (K_ - 1) + [0.0]), rq.composition_mode(config, [0, K_ - 1], [0.5, 1.0]),
             rq.prefix_mode(config, 2), rq.full_mode(config)]
    return [rq.build_requests(config, ids[i : i + 1], 10, modes[i % len(modes)])[0] for i in range(rows)]


def test_three_micro_batches_on_the_tiny_model_give_the_plain_model_outputs(tiny_dir, tiny_model):
    from coordinator import PoEModel

    model = PoEModel.from_pretrained(tiny_dir, engine_config=EngineConfig(pipeline_micro_batches=3))
    jobs = tiny_jobs(model.config, 7, seed=6)
    expected = [(s.new_tokens, s.stages_used) for s in tiny_model.run(jobs)]
    assert [(s.new_tokens, s.stages_used) for s in model.run(jobs)] == expected
    ids = torch.randint(0, model.config.vocab_size, (3, 30), generator=torch.Generator().manual_seed(7))
    assert torch.allclose(model.forward(ids), tiny_model.forward(ids), atol=1e-5)
    model.loop.stop()


def test_ray_cluster_with_two_micro_batches_gives_the_plain_model_tokens(ray_session, tiny_dir, tiny_model):
    from coordinator.cluster import PoECluster
    from coordinator.serving_config import ServingConfig

    jobs = tiny_jobs(tiny_model.config, 6, seed=8)
    expected = [(s.new_tokens, s.stages_used) for s in tiny_model.run(jobs)]
    with PoECluster.launch(tiny_dir, config=ServingConfig(pipeline_micro_batches=2)) as cluster:
        assert cluster.engine.engine_config.pipeline_micro_batches == 2
        assert [(s.new_tokens, s.stages_used) for s in cluster.run(jobs)] == expected
        assert cluster.engine.free_blocks == cluster.engine.capacity
