"""Decode runs on Ray (stage_workers/decode_run.py): in steady decode the workers step on their own,
the deciding worker handing each token to stage 0 over the decision edge, and the coordinator
reads the decisions one step behind. Every mode on every layout is checked against the oracle in
tests/test_modes.py (its Ray cases run decode runs); here: how few plans a steady decode takes, and
that a sequence ended while the next step already runs leaves every worker as if it had not run."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch
from mode_suite import assert_follows
from oracle import Oracle

from coordinator import PoEModel
from coordinator.core import requests as rq
from coordinator.core.engine import EngineConfig
from coordinator.serving_config import ServingConfig

LAYOUTS = {"[0][1][2][3]": (), "[0-3]": ((0, 3),)}


@pytest.fixture(scope="module", params=list(LAYOUTS), ids=list(LAYOUTS))
def cluster(request, ray_session, tiny_dir):
    with PoEModel.on_ray(tiny_dir, config=ServingConfig(groups=LAYOUTS[request.param])) as model:
        yield model


@pytest.fixture(scope="module")
def oracle(tiny_dir):
    return Oracle(tiny_dir)


def plans_sent(model) -> list:
    """Every plan the coordinator sends from now on (each goes to every worker at once)."""
    transport, sent = model.engine.pipeline.transport, []
    run = transport.run

    def counted(plan, *args):
        sent.append(plan)
        return run(plan, *args)

    transport.run = counted
    return sent


def prompt(seed: int, length: int = 21) -> tuple[int, ...]:
    return tuple(torch.randint(0, 512, (length,), generator=torch.Generator().manual_seed(seed)).tolist())


def generation(config, prompt_ids, max_new_tokens: int) -> rq.GenerationRequest:
    return rq.GenerationRequest(prompt_ids, max_new_tokens, rq.full_mode(config))


def test_a_steady_decode_of_32_tokens_takes_at_most_two_plans(cluster, oracle):
    sent = plans_sent(cluster)
    ids = torch.tensor([prompt(1)])
    out = cluster.generate(ids, 32)
    assert_follows(oracle, out[0].tolist(), ids.shape[1])
    decode_plans = [p for p in sent if p.micro_batches]
    assert len(decode_plans) <= 2, f"{len(decode_plans)} plans for one sequence's 32 tokens"
    assert decode_plans[-1].run_ahead == 30, "the prompt's plan, then one plan for the rest"


def test_a_sequence_ended_while_the_next_step_runs_is_rolled_back_everywhere(cluster, oracle):
    """A stop string is matched by the front after the coordinator has read a step; by then the
    workers may be running the next one. The engine is stepped by hand, on the engine loop's thread."""
    engine, config = cluster.engine, cluster.config

    def until(seq, done) -> None:
        while not done(seq):
            engine.step()

    def stopped_while_running() -> tuple:
        a = engine.add(generation(config, prompt(2), 24))
        b = engine.add(generation(config, prompt(3), 24))
        until(a, lambda a: len(a.new_tokens) >= 6)
        pipeline = engine.pipeline
        assert pipeline.running_ahead
        unread, control = pipeline.unread_step, pipeline.transport.control
        deadline = time.monotonic() + 30
        while min(c.marked() for c in control.values()) < unread:  # every worker ran the step it was let run
            assert time.monotonic() < deadline, "the workers did not run the step they were let run"
            time.sleep(0.01)
        time.sleep(0.2)
        assert max(c.marked() for c in control.values()) == unread, "at most one step past the last read"
        sent = plans_sent(cluster)
        engine.abort(a, "stop")  # what a front does when a stop string matches
        until(b, lambda b: b.finished)
        # continuing the stopped sequence (its prompt and tokens as the next prompt) starts from
        # the blocks it left in the prefix cache, on every worker
        c = engine.add(generation(config, tuple(a.tokens), 8))
        until(c, lambda c: c.finished)
        return a, b, c, unread, sent

    a, b, c, unread, sent = cluster.loop.call_in_loop(stopped_while_running)
    assert unread in sent[0].aborted, "the plan after the stop aborts the step the workers ran"
    assert len(b.new_tokens) == 24 and b.error is None and c.error is None
    assert_follows(oracle, b.tokens, b.num_prompt)  # the other sequence goes on as if the step never ran
    assert c.num_cached_tokens > 0
    assert_follows(oracle, c.tokens, c.num_prompt)


def test_max_run_ahead_0_plans_every_step_with_the_same_tokens(cluster):
    ids = torch.tensor([prompt(4)])
    with_runs = cluster.generate(ids, 8)
    engine = cluster.engine
    config, engine.engine_config = engine.engine_config, replace(engine.engine_config, max_run_ahead=0)
    try:
        sent = plans_sent(cluster)
        assert torch.equal(cluster.generate(ids, 8), with_runs)
    finally:
        engine.engine_config = config
    assert len([p for p in sent if p.micro_batches]) == 8 and not any(p.run_ahead for p in sent)
    with pytest.raises(ValueError, match="max_run_ahead"):
        EngineConfig(max_run_ahead=-1)
