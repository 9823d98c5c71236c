"""How stages map onto machines, read once from a YAML file in cluster_configs/.

`ServingConfig` holds one `StagePlacement` per stage (defaults, overridden per stage), or per
worker when workers serve stage groups (`workers:`, each with its `stages: [first, last]`), the
engine's limits (an `EngineConfig`, the same dataclass an in-process model takes) and the
server's. Unknown keys and bad values are errors that name the file and the field. It knows
nothing about Ray's API; `coordinator.ray_cluster.cluster` turns it into placement groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from pathlib import Path

import yaml

from coordinator.core.autoscaler import AutoscalingConfig, autoscaling_from_yaml
from coordinator.core.engine import EngineConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "cluster_configs"
DEFAULT_CONFIG = CONFIG_DIR / "local-cpu.yaml"
STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")
DEFAULT_MAX_REQUEST_BYTES = 4 << 20  # a request's bytes, on gRPC and HTTP: larger is refused before it is parsed


@dataclass(frozen=True)
class StagePlacement:
    num_cpus: float = 0.5  # Ray logical CPUs reserved for the worker
    num_gpus: float = 0.0  # fractional GPUs let one GPU hold several stages
    resources: tuple[tuple[str, float], ...] = ()  # custom Ray resources per worker ({name: amount} in YAML)
    label_selector: tuple[tuple[str, str], ...] = ()  # Ray node labels the worker's node must match ({key: value})
    accelerator_type: str | None = None  # Ray's accelerator type (H100, A10G, ...); needs num_gpus > 0
    device: str = "cpu"  # cpu | cuda (Ray sets CUDA_VISIBLE_DEVICES to the assigned GPU)
    dtype: str | None = None  # None: bf16 on CUDA, fp32 on CPU
    kv_cache_tokens: int | None = None  # KV pool per replica in positions; None: memory_fraction, else 8 * sequence_len
    memory_fraction: float | None = None  # share of the device's total memory for weights + KV; None: unused
    num_threads: int | None = None  # most torch threads of a CPU worker (small steps run on one); None: every core of its node
    replicas: int = 1  # workers serving this stage; a sequence stays on one
    cuda_graphs: bool | None = None  # decode steps as CUDA graphs per batch bucket; None: on for CUDA
    autoscaling: AutoscalingConfig | None = None  # replicas follow load within [min, max]; `replicas` is the start


@dataclass(frozen=True)
class ServingConfig:
    stages: tuple[StagePlacement, ...] = ()  # empty: `defaults` for every stage (a group's on each of its stages)
    defaults: StagePlacement = StagePlacement()
    groups: tuple[tuple[int, int], ...] = ()  # (first, last) stage of each worker, in order; empty: one per stage
    placement_strategy: str = "PACK"
    engine: EngineConfig = EngineConfig()  # the engine's limits: top-level keys of the YAML (max_num_seqs, ...)
    max_queue: int = 256  # requests waiting for KV room before RESOURCE_EXHAUSTED
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # one request's bytes (gRPC message, HTTP body) at most
    max_worker_restarts: int = 3  # Ray restarts of a lost worker process (Ray's max_restarts)
    step_timeout_s: float = 300.0  # a worker silent this long in a step is stuck: killed and restarted
    transport: str = "auto"  # channels: auto (shared memory on one node and device, else torch.distributed) | shm | dist
    cluster_autoscaling: bool = False  # Ray adds nodes for pending replicas (KubeRay): scale-ups wait, not refused
    source: str = ""

    def placement(self, stage: int) -> StagePlacement:
        return self.stages[stage] if self.stages else self.defaults

    def check_num_stages(self, num_stages: int) -> None:
        if self.groups and self.groups[-1][1] != num_stages - 1:
            raise ValueError(f"{self.source}: workers serve stages 0..{self.groups[-1][1]}, the checkpoint has "
                             f"stages 0..{num_stages - 1}; allowed: workers whose stages cover them all, in order")
        if self.stages and len(self.stages) != num_stages:
            raise ValueError(f"{self.source}: lists {len(self.stages)} stages, the checkpoint has {num_stages}")

    def worker_groups(self, num_stages: int) -> list[tuple[int, int]]:
        """The (first, last) stages of each worker: the `workers:` groups, else one worker per stage."""
        return list(self.groups) or [(k, k) for k in range(num_stages)]


def _placement(raw: dict, base: StagePlacement, where: str) -> StagePlacement:
    known = {f.name for f in fields(StagePlacement)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(known))}")
    if raw.get("autoscaling") is not None:
        raw = {**raw, "autoscaling": autoscaling_from_yaml(raw["autoscaling"], where)}
    for key, check in (("resources", _resource), ("label_selector", _label)):
        if key in raw:
            raw = {**raw, key: _mapping(raw[key], f"{where}: {key}", check)}
    p = replace(base, **raw)
    for key in ("num_cpus", "num_gpus"):
        value = getattr(p, key)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{where}: {key}={value!r} must be a number >= 0")
    if p.device not in ("cpu", "cuda") and not p.device.startswith("cuda:"):
        raise ValueError(f"{where}: device={p.device!r}; allowed: cpu, cuda")
    if p.device.startswith("cuda") and p.num_gpus <= 0:
        raise ValueError(f"{where}: device {p.device} needs num_gpus > 0 so Ray assigns a GPU")
    if p.accelerator_type is not None and (not isinstance(p.accelerator_type, str) or not p.accelerator_type
                                           or ":" in p.accelerator_type):
        raise ValueError(f"{where}: accelerator_type={p.accelerator_type!r}; allowed: null or Ray's accelerator "
                         "name (H100, A100, L4, A10G, ...)")
    if p.accelerator_type is not None and p.num_gpus <= 0:
        raise ValueError(f"{where}: accelerator_type {p.accelerator_type} needs num_gpus > 0")
    if p.dtype not in (None, "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"):
        raise ValueError(f"{where}: dtype={p.dtype!r}; allowed: null, float32, bfloat16, float16")
    for key in ("kv_cache_tokens", "num_threads"):
        value = getattr(p, key)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{where}: {key}={value!r} must be null or an integer >= 1")
    fraction = p.memory_fraction
    if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                                 or not 0 < fraction <= 1):
        raise ValueError(f"{where}: memory_fraction={fraction!r} must be null or a number in (0, 1]")
    if fraction is not None and p.kv_cache_tokens is not None:
        raise ValueError(f"{where}: set kv_cache_tokens or memory_fraction, not both")
    if p.cuda_graphs not in (None, True, False):
        raise ValueError(f"{where}: cuda_graphs={p.cuda_graphs!r} must be null, true or false")
    if not isinstance(p.replicas, int) or p.replicas < 1:
        raise ValueError(f"{where}: replicas={p.replicas!r} must be an integer >= 1")
    scaling = p.autoscaling
    if scaling is not None and not scaling.min_replicas <= p.replicas <= scaling.max_replicas:
        raise ValueError(f"{where}: replicas={p.replicas} is outside autoscaling's "
                         f"[min_replicas, max_replicas] = [{scaling.min_replicas}, {scaling.max_replicas}]")
    return p


def _workers(raw, defaults: StagePlacement, source: str) -> tuple[tuple, tuple]:
    """`workers:`: each a placement with `stages: [first, last]` (or one stage), consecutive from
    stage 0. Returns the groups and each stage's placement (its worker's)."""
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{source}: workers must be a non-empty list of {{stages: [first, last], ...}}")
    groups, stages = [], []
    for i, entry in enumerate(raw):
        where = f"{source}: workers[{i}]"
        if not isinstance(entry, dict) or "stages" not in entry:
            raise ValueError(f"{where}: each worker needs stages: [first, last] (the stages it serves)")
        span = entry["stages"]
        span = [span, span] if isinstance(span, int) and not isinstance(span, bool) else span
        start = groups[-1][1] + 1 if groups else 0
        if (not isinstance(span, list) or len(span) != 2 or not all(isinstance(s, int) and not isinstance(s, bool)
                                                                    for s in span) or span[0] != start
                or span[1] < span[0]):
            raise ValueError(f"{where}: stages={entry['stages']!r}; allowed: [{start}, last] with last >= {start} "
                             "(workers serve consecutive stages, in order, from stage 0)")
        groups.append((span[0], span[1]))
        placement = _placement({k: v for k, v in entry.items() if k != "stages"}, defaults, where)
        stages += [placement] * (span[1] - span[0] + 1)
    return tuple(groups), tuple(stages)


def _mapping(raw, where: str, check) -> tuple:
    """A YAML mapping as sorted (key, value) pairs, each checked by `check(where, key, value)`."""
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping {{name: value}}, got {type(raw).__name__}")
    for key, value in raw.items():
        check(where, key, value)
    return tuple(sorted(raw.items()))


def _resource(where: str, name, amount) -> None:
    if not isinstance(name, str) or not name or name in RAY_BUILTIN_RESOURCES:
        raise ValueError(f"{where}: resource name {name!r}; allowed: a custom resource name (for CPUs and GPUs "
                         "use num_cpus and num_gpus, for the accelerator accelerator_type)")
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0 < amount < math.inf:
        raise ValueError(f"{where}: {name}={amount!r} must be a number > 0")


def _label(where: str, key, value) -> None:
    if not isinstance(key, str) or not key:
        raise ValueError(f"{where}: label key {key!r} must be a non-empty string")
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: {key}={value!r} must be a non-empty string: a value, or Ray's "
                         "'in(a,b)', '!value', '!in(a,b)'")


def config_from_yaml_dict(raw: dict, source: str) -> ServingConfig:
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: expected a YAML mapping at the top level")
    engine_keys = tuple(f.name for f in fields(EngineConfig))
    limit_keys = ("max_queue", "max_worker_restarts", "max_request_bytes")
    known = {"stages", "workers", "defaults", "placement_strategy", "step_timeout_s", "transport", "cluster_autoscaling",
             *limit_keys, *engine_keys}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{source}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(known))}")
    defaults = _placement(raw.get("defaults") or {}, StagePlacement(), f"{source}: defaults")
    stages = tuple(
        _placement(entry or {}, defaults, f"{source}: stages[{i}]") for i, entry in enumerate(raw.get("stages") or [])
    )
    groups = ()
    if raw.get("workers") is not None:
        if "stages" in raw:
            raise ValueError(f"{source}: set stages (a worker per stage) or workers (each with its stage range), "
                             "not both")
        groups, stages = _workers(raw["workers"], defaults, source)
    strategy = raw.get("placement_strategy", "PACK")
    if strategy not in STRATEGIES:
        raise ValueError(f"{source}: placement_strategy={strategy!r}; allowed: {', '.join(STRATEGIES)}")
    limits = {k: raw.get(k, getattr(ServingConfig, k)) for k in limit_keys}
    for key, value in limits.items():
        low = 0 if key == "max_worker_restarts" else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{source}: {key}={value!r} must be an integer >= {low}")
    try:
        engine = EngineConfig(**{k: raw[k] for k in engine_keys if k in raw})
    except ValueError as exc:  # EngineConfig's own check names the key
        raise ValueError(f"{source}: {exc}") from None
    timeout = raw.get("step_timeout_s", ServingConfig.step_timeout_s)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise ValueError(f"{source}: step_timeout_s={timeout!r} must be a number of seconds > 0")
    transport = raw.get("transport", ServingConfig.transport)
    if transport not in ("auto", "shm", "dist"):
        raise ValueError(f"{source}: transport={transport!r}; allowed: auto, shm, dist")
    cluster_autoscaling = raw.get("cluster_autoscaling", False)
    if not isinstance(cluster_autoscaling, bool):
        raise ValueError(f"{source}: cluster_autoscaling={cluster_autoscaling!r} must be true or false")
    return ServingConfig(stages, defaults, groups, strategy, source=source, step_timeout_s=float(timeout), transport=transport,
                         cluster_autoscaling=cluster_autoscaling, engine=engine, **limits)


def load_serving_config(path: str | Path | None = None) -> ServingConfig:
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"cluster config {path} not found (see {CONFIG_DIR} for examples)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({exc})") from None
    return config_from_yaml_dict(raw, str(path))
