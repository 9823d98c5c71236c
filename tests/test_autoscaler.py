"""Per-stage autoscaling: the decision with a fake clock, the YAML block, and for real on Ray (a
sustained speculative load grows stage 0, idleness shrinks it back, and no token changes)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from coordinator.core import requests as rq
from coordinator.core.autoscaler import AutoscalingConfig, StageAutoscaler, StageSignals, autoscaling_from_yaml

CLOCK = {"t": 0.0, "busy": 0.0}
UTILIZATION_TARGET = 0.3  # the Ray test: drafting keeps stage 0 busier than this (~0.45 measured), the others not (~0.15)


def feed(scaler: StageAutoscaler, t0: float, seconds: int, busy_share: float, replicas: int, kv=(0, 100)):
    """One sample a second from t0 for `seconds`, the stage busy for `busy_share` of the time since
    the sample before; returns the decisions made."""
    if not scaler.samples:
        CLOCK.update(t=t0, busy=0.0)
    decisions = []
    for i in range(seconds + 1):
        now = t0 + i
        CLOCK["busy"] += busy_share * replicas * (now - CLOCK["t"])
        CLOCK["t"] = now
        scaler.observe(now, StageSignals(replicas, CLOCK["busy"], *kv))
        decisions.append(scaler.decide(now))
    return [d for d in decisions if d is not None]


def test_a_busy_stage_scales_up_only_once_the_wish_has_held_for_the_upscale_delay():
    scaler = StageAutoscaler(0, AutoscalingConfig(1, 4, target_utilization=0.25, upscale_delay_s=5,
                                                  downscale_delay_s=20, look_back_period_s=3))
    assert feed(scaler, 0, 4, busy_share=0.6, replicas=1) == [], "wanted 3 for 4 s: not yet"
    assert scaler.wanted() == 3  # ceil(1 * 0.6 / 0.25)
    assert feed(scaler, 5, 2, busy_share=0.6, replicas=1) == [3]


def test_an_idle_stage_scales_down_after_the_downscale_delay_and_not_below_min():
    scaler = StageAutoscaler(0, AutoscalingConfig(2, 4, target_utilization=0.5, upscale_delay_s=1,
                                                  downscale_delay_s=10, look_back_period_s=2))
    assert feed(scaler, 0, 9, busy_share=0.0, replicas=4) == []
    assert feed(scaler, 10, 2, busy_share=0.0, replicas=4) == [2], "min_replicas holds"


def test_a_short_burst_does_not_scale_and_the_larger_signal_wins():
    scaler = StageAutoscaler(1, AutoscalingConfig(1, 3, target_utilization=0.5, target_kv_usage=0.5,
                                                  upscale_delay_s=5, look_back_period_s=2))
    assert feed(scaler, 0, 3, busy_share=0.9, replicas=1) == []
    assert feed(scaler, 4, 3, busy_share=0.1, replicas=1) == [], "the wish reversed before its delay"
    assert feed(scaler, 8, 6, busy_share=0.1, replicas=1, kv=(90, 100)) == [2], "KV usage 0.9 / 0.5"


def test_autoscaling_blocks_are_checked_with_the_field_named():
    assert autoscaling_from_yaml({"max_replicas": 2, "target_utilization": 0.5}, "x.yaml: stages[0]").max_replicas == 2
    bad = {
        "unknown key 'max'": {"max": 2, "target_utilization": 0.5},
        "max_replicas=1 is below min_replicas=2": {"min_replicas": 2, "max_replicas": 1, "target_utilization": 0.5},
        "target_utilization=1.5 must be null or a number in (0, 1]": {"max_replicas": 2, "target_utilization": 1.5},
        "set target_utilization and/or target_kv_usage": {"max_replicas": 2},
        "upscale_delay_s=-1 must be a number of seconds >= 0": {"target_kv_usage": 0.5, "upscale_delay_s": -1},
    }
    for message, raw in bad.items():
        with pytest.raises(ValueError, match="x.yaml: stages\\[0\\]: autoscaling: " + message.replace("(", "\\(")
                           .replace(")", "\\)").replace("[", "\\[").replace("]", "\\]")):
            autoscaling_from_yaml(raw, "x.yaml: stages[0]")


def test_on_ray_speculative_load_grows_stage_0_idleness_shrinks_it_and_no_token_changes(ray_session, tiny_dir,
                                                                                          tiny_model):
    """Drafting keeps stage 0 busy while the later stages mostly wait: with the same autoscaling
    block on every stage, only stage 0 grows under the load, and it shrinks back once idle."""
    from coordinator import PoEModel
    from coordinator.serving_config import ServingConfig, StagePlacement

    config = tiny_model.config
    mode = rq.speculative_mode(config, 0, 8)
    prompts = torch.randint(0, config.vocab_size, (6, 12), generator=torch.Generator().manual_seed(11))
    jobs = [rq.build_requests(config, prompts[i : i + 1], 40, mode)[0] for i in range(len(prompts))]
    expected = [s.new_tokens for s in tiny_model.run(jobs)]
    scaling = AutoscalingConfig(min_replicas=1, max_replicas=2, target_utilization=UTILIZATION_TARGET,
                                upscale_delay_s=1.0, downscale_delay_s=2.0, metrics_interval_s=0.25,
                                look_back_period_s=1.0)
    serving = ServingConfig(stages=(StagePlacement(autoscaling=scaling),) * config.num_stages)
    with PoEModel.on_ray(tiny_dir, config=serving) as cluster:
        stop, outputs, errors = threading.Event(), [], []

        def load(client: int) -> None:  # one client: request after request, round the prompts
            i = client
            while not stop.is_set():
                try:
                    outputs.append((i, cluster.run([jobs[i]])[0].new_tokens))
                except BaseException as exc:  # the assertion below names it
                    errors.append(exc)
                    return
                i = (i + 1) % len(jobs)

        clients = [threading.Thread(target=load, args=(c,)) for c in range(len(jobs))]
        for t in clients:
            t.start()
        deadline = time.monotonic() + 120
        while [len(r) for r in cluster.backend.replicas][0] < 2 and time.monotonic() < deadline and not errors:
            time.sleep(0.1)
        grown = len(outputs)
        while len(outputs) < grown + len(jobs) and time.monotonic() < deadline and not errors:
            time.sleep(0.1)  # requests keep running on the grown stage
        stop.set()
        for t in clients:
            t.join()
        assert not errors, errors[0]
        assert [len(r) for r in cluster.backend.replicas] == [2, 1, 1, 1], cluster.autoscaler.history
        while len(cluster.backend.replicas[0]) > 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        history = [(stage, replicas) for _, stage, replicas in cluster.autoscaler.history]
        assert history == [(0, 2), (0, 1)], "stage 0 grew under drafting and shrank when idle; no other stage moved"
        assert len(outputs) > grown + len(jobs) - 1
        assert all(tokens == expected[i] for i, tokens in outputs), "a request's tokens changed"
        assert cluster.run(jobs[:2])[0].new_tokens == expected[0]
