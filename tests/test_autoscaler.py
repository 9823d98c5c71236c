"""Per-stage autoscaling: the decision with a fake clock, the YAML block, and for real on Ray (a
sustained speculative load grows stage 0, idleness shrinks it back, and no token changes)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from coordinator.autoscaler import AutoscalingConfig, StageAutoscaler, StageSignals, autoscaling_from_yaml


CLOCK = {"t": 0.0, "busy": 0.0}


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
