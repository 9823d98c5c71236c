"""Pipelined micro-batches: every worker runs a step's micro-batches in the same order, so
stage k+1 works on micro-batch m while stage k works on m+1.

Tokens, stage exits and logits must not depend on the number of micro-batches (fakes, the tiny
model in process and on Ray). Runners in threads over real shared-memory channels show the
overlap itself: stage 0 cannot finish its second micro-batch unless stage 1 has started the
first.
"""

from __future__ import annotations

import threading
import uuid

import pytest
import torch
from fakes import CONFIG, MIXED, VOCAB, FakeWorker, K, LosingWorker, reference_tokens, request
from support import free_blocks

from coordinator.core import requests as rq
from coordinator.core.engine import Engine, EngineConfig
from coordinator.core.pipeline import Pipeline
from coordinator.serving_config import config_from_yaml_dict
from stage_workers.channels import ShmChannel
from stage_workers.messages import SeqSpec, SeqStep, StepPlan
from stage_workers.step_runner import StageRunner


def engine_with(num_micro_batches: int, **engine_kwargs):
    workers = [FakeWorker(k, K) for k in range(K)]
    config = EngineConfig(pipeline_micro_batches=num_micro_batches, **engine_kwargs)
    return Engine(CONFIG, Pipeline(workers), config), workers


def score_request() -> rq.ScoreRequest:
    return rq.LogitsRequest(tuple((5 * i + 1) % VOCAB for i in range(19)), (0, 2))


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
        engine, workers = engine_with(num_micro_batches, max_prefill_chunk=8)
        got = outcomes(engine)
        for a, b in zip(got[:-1], expected[:-1]):
            assert a == b, f"{num_micro_batches} micro-batches"
        assert all(torch.equal(a, b) for a, b in zip(got[-1], expected[-1]))
        calls_per_step = max(len(w.calls) for w in workers) / max(len(plain.pipeline.stages[0].workers[0].calls), 1)
        assert num_micro_batches == 1 or calls_per_step > 1, "stage 0 ran several micro-batches per step"
        assert free_blocks(engine) == engine.capacity


def test_each_stage_runs_the_micro_batches_in_order_and_only_those_that_reach_it():
    engine, workers = engine_with(3)
    reach = {  # seq_id -> the stages it runs: all, a prefix of two, or a WAND exit at stage 0 every token
        engine.add(request([1, 2], 5, rq.full_mode(CONFIG))).seq_id: {0, 1, 2, 3},
        engine.add(request([3, 4], 5, rq.prefix_mode(CONFIG, 2))).seq_id: {0, 1},
        engine.add(request([5, 6], 5, rq.wand_mode(CONFIG, 0.0, (0.0,) * K))).seq_id: {0},
    }
    engine.step()  # the prompts
    for w in workers:
        del w.calls[:]
    engine.step()  # one decode step: three micro-batches of one sequence each
    order = [call[0][0] for call in workers[0].calls]  # one sequence per micro-batch, in micro-batch order
    assert sorted(order) == sorted(reach) and all(len(call) == 1 for call in workers[0].calls)
    for k, w in enumerate(workers):
        ran = [call[0][0] for call in w.calls]
        assert ran == [s for s in order if k in reach[s]], f"stage {k} ran {ran}"


def test_micro_batches_balance_positions_a_prompt_against_decode_tokens():
    engine, workers = engine_with(2)
    decoding = [engine.add(request([i, i + 1], 6, rq.full_mode(CONFIG))) for i in range(3)]
    engine.step()
    prompt = engine.add(request([i % VOCAB for i in range(20)], 2, rq.full_mode(CONFIG)))
    del workers[0].calls[:]
    engine.step()
    stage0 = [tuple(seg[0] for seg in call) for call in workers[0].calls]
    assert stage0 == [(prompt.seq_id,), tuple(s.seq_id for s in decoding)], "the prompt alone, then the decodes"


class Gate(FakeWorker):
    """Stage 0's second extend of a step waits (up to a timeout) until stage 1 has started its first."""

    def __init__(self, stage: int, started: threading.Event):
        super().__init__(stage, K)
        self.started, self.waited = started, None

    def extend(self, batch):
        if self.stage == 1:
            self.started.set()
        elif len(self.calls) == 1:
            self.waited = self.started.wait(timeout=10)
        return super().extend(batch)


def test_stage_1_computes_micro_batch_0_while_stage_0_computes_micro_batch_1():
    """Runners in threads over shared-memory channels, as Ray actors run them in processes."""
    started = threading.Event()
    fakes = [Gate(0, started), Gate(1, started)] + [FakeWorker(k, K) for k in (2, 3)]
    runners = [StageRunner(fake, worker_id=k, num_stages=K) for k, fake in enumerate(fakes)]
    tag = uuid.uuid4().hex[:8]
    channels = []
    for a, b in zip(runners, runners[1:]):
        reader = ShmChannel.create(f"test-{tag}-{a.worker_id}", 1 << 16, 2)
        writer = ShmChannel.attach(f"test-{tag}-{a.worker_id}", 1 << 16, 2)
        a.neighbours.outbound[b.worker_id], b.neighbours.inbound[a.worker_id] = writer, reader
        channels += [reader, writer]
    homes = tuple(range(K))
    specs = tuple(SeqSpec(seq_id, "sample", homes, (1.0,) * K, 0.0) for seq_id in (0, 1))
    batches = tuple((SeqStep(seq_id, 0, (seq_id + 1, 2, 3), -1, K - 1, 2),) for seq_id in (0, 1))
    plan = StepPlan(1, 0, new=specs, micro_batches=batches)
    results = [None] * K
    threads = [threading.Thread(target=lambda r=r: results.__setitem__(r.worker_id, r.run_step(plan)))
               for r in runners]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    finally:
        for channel in channels:
            channel.close()
    assert fakes[0].waited, "stage 0 waited in micro-batch 1 for stage 1 to start micro-batch 0"
    assert [d.seq_id for d in results[K - 1].decisions] == [0, 1]
    assert results[:K - 1] == [None] * (K - 1), "only the deciding stage reports"


def test_a_worker_lost_mid_wavefront_is_rebuilt_and_tokens_are_unchanged():
    workers = [FakeWorker(k, K) for k in range(K)]
    workers[2] = LosingWorker(2, K, lose_on={4, 9})
    engine = Engine(CONFIG, Pipeline(workers), EngineConfig(pipeline_micro_batches=2))
    seqs = [engine.add(request(*job)) for job in MIXED]
    assert len(seqs) > 2, "two micro-batches of several sequences"
    engine.run_to_completion(seqs)
    assert all(seq.recoveries == 2 for seq in seqs), "both losses were recovered"
    assert [(s.new_tokens, s.stages_used) for s in seqs] == reference_tokens()
    assert free_blocks(engine) == engine.capacity


def test_pipeline_micro_batches_is_read_from_yaml_and_checked():
    assert config_from_yaml_dict({"pipeline_micro_batches": 3}, "x.yaml").engine.pipeline_micro_batches == 3
    assert config_from_yaml_dict({}, "x.yaml").engine.pipeline_micro_batches == 1
    with pytest.raises(ValueError, match="x.yaml: pipeline_micro_batches=0 is invalid; allowed: an integer >= 1"):
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
    from coordinator import PoEModel
    from coordinator.serving_config import ServingConfig

    jobs = tiny_jobs(tiny_model.config, 6, seed=8)
    expected = [(s.new_tokens, s.stages_used) for s in tiny_model.run(jobs)]
    with PoEModel.on_ray(tiny_dir, config=ServingConfig(engine=EngineConfig(pipeline_micro_batches=2))) as cluster:
        assert cluster.engine.engine_config.pipeline_micro_batches == 2
        assert [(s.new_tokens, s.stages_used) for s in cluster.run(jobs)] == expected
        assert free_blocks(cluster.engine) == cluster.engine.capacity
