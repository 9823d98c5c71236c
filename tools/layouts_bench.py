"""The bench's `layouts` section: single-stream decode through the serving config's worker layout
and through one worker per stage on the same resources, each with decode runs (the default) and
with a plan every step (`max_run_ahead: 0`), against the model in process. Per layout, the three
take turns in every round; one layout's cluster is up at a time, so the section fits where the
config takes a whole GPU. Reported per side: ms per token, the ratio to the in-process model
(median and spread over the rounds), and the host time per token: wall time minus the stage
workers' own compute, the part that the coordinator, the hand-offs and the step runners cost."""

from __future__ import annotations

import statistics
from dataclasses import replace

from coordinator.serving_config import ServingConfig, load_serving_config

PLANS = {"decode runs": None, "plan every step": 0}  # side -> max_run_ahead (None: the config's own)


def layout_name(groups: list[tuple[int, int]]) -> str:
    return "".join(f"[{a}]" if a == b else f"[{a}-{b}]" for a, b in groups)


def one_worker_per_stage(serving: ServingConfig, num_stages: int) -> ServingConfig:
    """The config's first worker's resources split evenly over one worker per stage."""
    base = serving.placement(0)
    share = replace(base, num_cpus=base.num_cpus / num_stages, num_gpus=base.num_gpus / num_stages,
                    memory_fraction=None if base.memory_fraction is None else base.memory_fraction / num_stages)
    return replace(serving, groups=(), stages=(share,) * num_stages)


def layout_rounds(model, checkpoint: str, config, dtype, ids, n: int, rounds: int, progress) -> dict:
    """`model`: the in-process model; `config`: the serving config (a YAML path, or None for the default)."""
    from coordinator import PoEModel
    from tools.bench import decode_ms_per_token

    serving = config if isinstance(config, ServingConfig) else load_serving_config(config)
    num_stages = model.config.num_stages
    layouts = {layout_name(serving.worker_groups(num_stages)): serving}
    layouts.setdefault(layout_name([(k, k) for k in range(num_stages)]), one_worker_per_stage(serving, num_stages))
    out = {}
    for name, layout in layouts.items():
        with PoEModel.on_ray(checkpoint, config=layout, dtype=dtype) as cluster:
            engine, own = cluster.engine, cluster.engine.engine_config
            sides = {"in process": (model, None), **{side: (cluster, ahead) for side, ahead in PLANS.items()}}
            ms = {side: [] for side in sides}
            busy = {side: [] for side in sides}
            decode_ms_per_token(cluster, ids, 4, "full")  # warm-up
            for r in range(rounds):
                for side, (m, ahead) in sides.items():
                    engine.engine_config = own if ahead is None else replace(own, max_run_ahead=ahead)
                    wall, compute = decode_ms_per_token(m, ids, n, "full")
                    ms[side].append(wall)
                    busy[side].append(compute)
                progress.update(0, note=f"layout {name} round {r + 1}/{rounds}")
            engine.engine_config = own
        ratios = {side: [a / b for a, b in zip(ms["in process"], v)] for side, v in ms.items()}
        out[name] = {
            "ms_per_token": ms, "compute_ms_per_token": busy,
            "over_model": {side: statistics.median(v) for side, v in ratios.items()},
            "over_model_spread": {side: [min(v), max(v)] for side, v in ratios.items()},
            "host_ms_per_token": {side: statistics.median(w - c for w, c in zip(ms[side], busy[side]))
                                  for side in sides},
        }
    return {"rounds": rounds, "decode_tokens": n, "layouts": out}
