"""Per-stage autoscaling: each stage's replicas follow its own load, with Ray Serve's fields and
semantics.

A stage's `autoscaling:` block (serving YAML) names `min_replicas`, `max_replicas`, a target
for the stage's utilization (the share of wall time its workers spend computing) and/or for
its KV usage (the share of its KV blocks promised to sequences), and how long a decision must
hold before it is carried out (`upscale_delay_s`, `downscale_delay_s`). Every
`metrics_interval_s` the controller averages each signal over `look_back_period_s` and, as Ray
Serve does, wants `ceil(replicas * observed / target)` replicas (the larger of the two
signals), within [min_replicas, max_replicas]; once that wish has pointed the same way for the
delay, it calls `scale_stage`. Speculative drafting loads stage 0 most, so stage 0 grows under
it while the others stay. `StageAutoscaler` is the pure decision (tested with a fake clock);
`Autoscaler` is the thread that samples a model and scales it. Nothing here knows Ray.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, fields

log = logging.getLogger("poe_serve.autoscaler")


@dataclass(frozen=True)
class AutoscalingConfig:
    min_replicas: int = 1
    max_replicas: int = 1
    target_utilization: float | None = None  # busy share of the stage's workers to hold, in (0, 1]
    target_kv_usage: float | None = None  # share of the stage's KV blocks promised, in (0, 1]
    upscale_delay_s: float = 30.0  # a wish for more replicas must hold this long (Ray Serve's default)
    downscale_delay_s: float = 600.0  # a wish for fewer must hold this long (Ray Serve's default)
    metrics_interval_s: float = 10.0  # how often signals are sampled and decisions made
    look_back_period_s: float = 30.0  # the window the signals are averaged over


def autoscaling_from_yaml(raw, where: str) -> AutoscalingConfig:
    """An `autoscaling:` mapping, checked; errors name `where` (file and stage) and the field."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: autoscaling must be a mapping of {', '.join(f.name for f in fields(AutoscalingConfig))}")
    known = {f.name for f in fields(AutoscalingConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{where}: autoscaling: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(known))}")
    config = AutoscalingConfig(**raw)
    for name in ("min_replicas", "max_replicas"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: autoscaling: {name}={value!r} must be an integer >= 1")
    if config.max_replicas < config.min_replicas:
        raise ValueError(f"{where}: autoscaling: max_replicas={config.max_replicas} is below "
                         f"min_replicas={config.min_replicas}")
    for name in ("target_utilization", "target_kv_usage"):
        value = getattr(config, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1):
            raise ValueError(f"{where}: autoscaling: {name}={value!r} must be null or a number in (0, 1]")
    if config.target_utilization is None and config.target_kv_usage is None:
        raise ValueError(f"{where}: autoscaling: set target_utilization and/or target_kv_usage")
    for name in ("upscale_delay_s", "downscale_delay_s", "metrics_interval_s", "look_back_period_s"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise ValueError(f"{where}: autoscaling: {name}={value!r} must be a number of seconds >= 0")
    if config.metrics_interval_s <= 0:
        raise ValueError(f"{where}: autoscaling: metrics_interval_s must be > 0")
    return config


@dataclass(frozen=True)
class StageSignals:
    """One stage at one moment, as the controller samples it."""

    replicas: int
    busy_s: float  # its workers' total compute time so far (only differences matter)
    kv_used: int  # KV blocks promised to sequences, over its replicas
    kv_capacity: int


class StageAutoscaler:
    """The decision for one stage: signals in, a replica count out once it has held long enough."""

    def __init__(self, stage: int, config: AutoscalingConfig):
        self.stage, self.config = stage, config
        self.samples: deque[tuple[float, StageSignals]] = deque()
        self.wish_since: float | None = None  # when the current direction of wish began
        self.wish_up: bool | None = None

    def observe(self, now: float, signals: StageSignals) -> None:
        if self.samples and self.samples[-1][1].replicas != signals.replicas:
            self.samples.clear()  # busy time of a removed worker is gone: restart the window
        self.samples.append((now, signals))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.config.look_back_period_s:
            self.samples.popleft()

    def utilization(self) -> float | None:
        """Busy share of the stage's workers over the window (None until two samples)."""
        if len(self.samples) < 2:
            return None
        (t0, first), (t1, last) = self.samples[0], self.samples[-1]
        return max(last.busy_s - first.busy_s, 0.0) / max((t1 - t0) * last.replicas, 1e-9)

    def kv_usage(self) -> float:
        return sum(s.kv_used / max(s.kv_capacity, 1) for _, s in self.samples) / max(len(self.samples), 1)

    def wanted(self) -> int | None:
        """Ray Serve's rule: ceil(replicas * observed / target), the larger of the two signals."""
        if not self.samples:
            return None
        c, replicas = self.config, self.samples[-1][1].replicas
        ratios = []
        utilization = self.utilization()
        if c.target_utilization is not None and utilization is not None:
            ratios.append(utilization / c.target_utilization)
        if c.target_kv_usage is not None:
            ratios.append(self.kv_usage() / c.target_kv_usage)
        if not ratios:
            return None
        return min(max(math.ceil(replicas * max(ratios) - 1e-9), c.min_replicas), c.max_replicas)

    def decide(self, now: float) -> int | None:
        """The replica count to scale to now, or None (no change, or one not yet held for its delay)."""
        wanted = self.wanted()
        replicas = self.samples[-1][1].replicas if self.samples else None
        if wanted is None or wanted == replicas:
            self.wish_since = self.wish_up = None
            return None
        up = wanted > replicas
        if self.wish_up is not up:
            self.wish_since, self.wish_up = now, up
        delay = self.config.upscale_delay_s if up else self.config.downscale_delay_s
        if now - self.wish_since < delay:
            return None
        self.wish_since = self.wish_up = None
        self.samples.clear()  # the new replicas start a new window
        return wanted


class Autoscaler:
    """A thread that samples every autoscaled stage of `model` and scales it (`model.scale_stage`)."""

    def __init__(self, model, configs: dict[int, AutoscalingConfig]):
        self.model = model
        self.stages = {k: StageAutoscaler(k, c) for k, c in configs.items()}
        self.interval = min(c.metrics_interval_s for c in configs.values())
        self.history: list[tuple[float, int, int]] = []  # (time, stage, replicas) of every scaling done
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="poe-autoscaler", daemon=True)

    def start(self) -> "Autoscaler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tick(time.monotonic())
            except Exception:  # a failed sample or scaling is logged; the next tick tries again
                log.exception("autoscaler: a tick failed")

    def tick(self, now: float) -> None:
        signals = self.model.stage_signals()
        for k, stage in self.stages.items():
            stage.observe(now, signals[k])
            target = stage.decide(now)
            if target is not None and not self._stop.is_set():
                log.info("autoscaler: stage %d: %d -> %d replicas (utilization %s, KV usage %.2f)", k,
                         signals[k].replicas, target, stage.utilization(), stage.kv_usage())
                try:
                    self.model.scale_stage(k, target)
                except (ValueError, RuntimeError) as exc:  # no room in the cluster: tried again after the delay
                    log.warning("autoscaler: stage %d: could not scale to %d replicas: %s", k, target, exc)
                    continue
                self.history.append((now, k, target))
