"""Stages on distinct nodes, with Ray's own multi-node simulation (`ray.cluster_utils.Cluster`):
a head with no CPUs and five 1-CPU nodes, each stage worker on a node of its own
(STRICT_SPREAD), the fifth node spare.

Every mode matches the oracle with the stages on four nodes over torch.distributed; a node
removed mid-generation (over torch.distributed and over shared memory) costs a restart of its
worker on the spare node, and the requests in flight end with the tokens they would have had;
per-stage `resources` and `label_selector` put each stage on the node that has them. These
tests run before the session's Ray starts (one Ray per process): the cluster is theirs alone.
"""

from __future__ import annotations

import time

import mode_suite
import pytest
import ray
import torch
from oracle import Oracle

from coordinator import PoEModel
from coordinator.core import requests as rq
from coordinator.core.modes import MODES
from coordinator.serving_config import config_from_yaml_dict
from tools.soak import SimulatedNodes

pytestmark = pytest.mark.before_session_ray
NUM_NODES = 5  # one per stage and a spare for a restarted worker
NEW_TOKENS = 40
RESUME_LIMIT_S = 60  # no token for this long after a removal: the loss was not detected (a liveness bound)
SUITE = [getattr(mode_suite, name) for name in (  # the mode suite's checks, on this module's models
    "test_forward_and_forward_stage_match_the_oracle", "test_full_greedy_batch_rows_are_independent_and_exact",
    "test_prefix_and_single_stage", "test_weighted_composition", "test_sampling_matches_the_oracle_and_is_seeded",
    "test_wand_exits_and_stages_used_match_the_oracle", "test_speculative_equals_full_greedy")]
JOBS = [  # (mode, its arguments, the reference call)
    ("full", {}, lambda m, ids: m.generate(ids, NEW_TOKENS)),
    ("speculative", {"draft_stage": 0, "k_draft": 3}, lambda m, ids: m.generate_speculative(ids, 0, 3, NEW_TOKENS)),
    ("wand", {"safety": 1.0, "p99_bounds": [0.6, 0.6, 0.6, 0.0]},
     lambda m, ids: m.generate_wand(ids, NEW_TOKENS, 1.0, [0.6, 0.6, 0.6, 0.0])),
]


@pytest.fixture(scope="module")
def nodes():
    simulated = SimulatedNodes(NUM_NODES)
    ray.init(address=simulated.cluster.address, log_to_driver=False, logging_level="WARNING")
    yield simulated
    ray.shutdown()
    simulated.cluster.shutdown()


def launch(checkpoint, transport: str, stages=None) -> PoEModel:
    raw = {"placement_strategy": "STRICT_SPREAD", "transport": transport, "defaults": {"num_cpus": 1}}
    return PoEModel.on_ray(checkpoint, config=config_from_yaml_dict(raw | ({"stages": stages} if stages else {}),
                                                                    "four nodes"))


def node_of_each_stage(model: PoEModel) -> list[str]:
    return [where.node_id for stage, replica, where in model.worker_locations()]


def test_every_mode_matches_the_oracle_with_each_stage_on_its_own_node(nodes, tiny_dir):
    with launch(tiny_dir, "dist") as model:
        assert len(set(node_of_each_stage(model))) == 4, model.worker_locations()
        for check in SUITE:
            check((model, Oracle(tiny_dir)))


@pytest.mark.parametrize("transport", ["dist", "shm"])
def test_a_node_removed_mid_generation_costs_a_restart_and_no_token(nodes, tiny_dir, tiny_model, transport):
    prompts = [torch.randint(0, 500, (1, 24), generator=torch.Generator().manual_seed(i)) for i in range(len(JOBS))]
    expected = [call(tiny_model, ids)[0, 24:].tolist() for (_, _, call), ids in zip(JOBS, prompts)]
    with launch(tiny_dir, transport) as model:
        before = node_of_each_stage(model)
        handles = [model.loop.submit(rq.build_requests(model.config, ids, NEW_TOKENS, MODES[name].mode(model.config, args))[0])
                   for (name, args, _), ids in zip(JOBS, prompts)]
        tokens = [[] for _ in JOBS]
        tokens[0] += handles[0].next_event(timeout=RESUME_LIMIT_S).tokens
        while len(tokens[0]) < 3:
            tokens[0] += handles[0].next_event(timeout=RESUME_LIMIT_S).tokens
        removed = time.monotonic()
        nodes.remove(before[2])
        resumed = None
        for i, handle in enumerate(handles):
            while True:
                event = handle.next_event(timeout=RESUME_LIMIT_S)
                assert event.error is None, f"{JOBS[i][0]}: {event.error}"
                tokens[i] += event.tokens
                if resumed is None and event.tokens:
                    resumed = time.monotonic()
                if event.done:
                    break
        print(f"\n{transport}: the first token after the removal came {resumed - removed:.1f}s later")
        assert tokens == expected
        after = node_of_each_stage(model)
        assert after[2] not in before and after[:2] + after[3:] == before[:2] + before[3:], (before, after)
        fresh = model.generate(prompts[0], 5)[0, 24:].tolist()  # and the engine goes on serving
        assert fresh == expected[0][:5]


def test_per_stage_resources_and_labels_put_each_stage_on_the_node_that_has_them(nodes, tiny_dir, tiny_model):
    slots = sorted(nodes.slots.values())[-4:]
    by_slot = {slot: node_id for node_id, slot in nodes.slots.items()}
    wanted = [slots[2], slots[0], slots[3], slots[1]]  # not the order Ray would pick by itself
    stages = [{"resources": {f"slot{wanted[0]}": 1}}, {"label_selector": {"slot": str(wanted[1])}},
              {"resources": {f"slot{wanted[2]}": 1}}, {"label_selector": {"slot": str(wanted[3])}}]
    with launch(tiny_dir, "auto", stages) as model:
        assert node_of_each_stage(model) == [by_slot[s] for s in wanted]
        assert model.generate([[4, 5, 6]], 4).tolist() == tiny_model.generate([[4, 5, 6]], 4).tolist()
