"""Every YAML in cluster_configs/ is loaded and checked, so a new file is covered without a new test.

Three kinds live there: placement configs (ServingConfig keys, read by `load_serving_config`),
Ray cluster-launcher configs (`ray up`) and KubeRay manifests; a file of no known kind fails.
Nothing here starts Ray or talks to a cloud or to Kubernetes: resources are checked on paper.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from checkpoints.writer import preset_config
from coordinator.serving_config import CONFIG_DIR, ServingConfig, StagePlacement, load_serving_config

REPO = CONFIG_DIR.parent
CONFIG_FILES = sorted([*CONFIG_DIR.glob("*.yaml"), *CONFIG_DIR.glob("*.yml")])
PLACEMENT_KEYS = {f.name for f in fields(ServingConfig)} - {"source"}
KUBERAY_KINDS = ("RayJob", "RayService", "RayCluster")
KINDS = ("placement", "launcher", "kuberay")
NUM_STAGES = preset_config("1.5b").num_stages  # the card's layout [12, 5, 4, 3]
MULTI_NODE = CONFIG_DIR / "multi-node.yaml"  # the placement the cluster-launcher configs are sized for


def config_kind(path: Path) -> str:
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as exc:
        return f"unknown (not valid YAML: {exc})"
    if len(docs) == 1 and isinstance(docs[0], dict):
        if {"provider", "available_node_types"} <= set(docs[0]):
            return "launcher"
        if set(docs[0]) & PLACEMENT_KEYS and "apiVersion" not in docs[0]:
            return "placement"  # load_serving_config names any unknown key
    if docs and all(isinstance(d, dict) and {"apiVersion", "kind"} <= set(d) for d in docs):
        if any(d["kind"] in KUBERAY_KINDS and str(d["apiVersion"]).startswith("ray.io/") for d in docs):
            return "kuberay"
    return "unknown"


def files_of(kind: str) -> list:
    return [pytest.param(p, id=p.name) for p in CONFIG_FILES if config_kind(p) == kind]


def stage_placements(config: ServingConfig) -> list[StagePlacement]:
    return [config.placement(k) for k in range(NUM_STAGES)]


def bundles(config: ServingConfig) -> list[dict[str, float]]:
    """One Ray placement-group bundle per stage worker, as coordinator.cluster asks for them."""
    return [{"CPU": p.num_cpus, "GPU": p.num_gpus} for p in stage_placements(config) for _ in range(p.replicas)]


def can_place(wanted: list[dict[str, float]], nodes: list[dict[str, float]], strategy: str) -> bool:
    """First-fit of bundles onto nodes' resources under a Ray strategy (exact for these few equal bundles)."""
    free = [dict(n) for n in nodes]
    if strategy == "STRICT_PACK":
        total = {k: sum(b[k] for b in wanted) for k in ("CPU", "GPU")}
        return any(all(n.get(k, 0) >= v for k, v in total.items()) for n in free)
    used: set[int] = set()
    for bundle in wanted:
        for i, node in enumerate(free):
            if (strategy == "STRICT_SPREAD" and i in used) or any(node.get(k, 0) < v for k, v in bundle.items()):
                continue
            node.update({k: node.get(k, 0) - v for k, v in bundle.items()})
            used.add(i)
            break
        else:
            return False
    return True


def is_gpu(p: StagePlacement) -> bool:
    return p.num_gpus > 0


# --- every file ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[p.name for p in CONFIG_FILES])
def test_every_config_file_is_a_known_kind(path):
    kind = config_kind(path)
    assert kind in KINDS, (
        f"{path}: {kind}; expected a placement config (keys {sorted(PLACEMENT_KEYS)}), a `ray up` config "
        f"(provider, available_node_types) or KubeRay documents (apiVersion ray.io/*, kind {KUBERAY_KINDS})"
    )


def test_the_directory_covers_each_deployment():
    expected = {"local-cpu.yaml": "placement", "one-gpu.yaml": "placement", "four-gpus.yaml": "placement",
                "multi-node.yaml": "placement", "ray-cluster-launcher.yaml": "launcher",
                "kuberay-rayjob.yaml": "kuberay"}
    assert {name: config_kind(CONFIG_DIR / name) for name in expected if (CONFIG_DIR / name).is_file()} == expected


# --- placement configs --------------------------------------------------------------------------


@pytest.mark.parametrize("path", files_of("placement"))
def test_placement_config_loads_and_fits_the_checkpoint(path):
    config = load_serving_config(path)
    assert config.source == str(path)
    config.check_num_stages(NUM_STAGES)
    assert NUM_STAGES == 4


@pytest.mark.parametrize("path", files_of("placement"))
def test_gpu_stages_use_cuda_and_bfloat16_and_cpu_stages_reserve_no_gpu(path):
    for k, p in enumerate(stage_placements(load_serving_config(path))):
        if is_gpu(p):
            assert p.device.startswith("cuda") and p.dtype in ("bfloat16", "bf16"), f"{path}: stage {k}: {p}"
            assert p.num_gpus <= 1, f"{path}: stage {k}: a worker drives one device, num_gpus={p.num_gpus}"
        else:
            assert p.device == "cpu", f"{path}: stage {k}: {p}"


def test_local_cpu_fits_a_two_core_machine():
    config = load_serving_config(CONFIG_DIR / "local-cpu.yaml")
    assert not any(is_gpu(p) for p in stage_placements(config))
    assert sum(b["CPU"] for b in bundles(config)) <= 2
    assert can_place(bundles(config), [{"CPU": 2}], config.placement_strategy)


def test_one_gpu_holds_every_stage():
    config = load_serving_config(CONFIG_DIR / "one-gpu.yaml")
    assert all(is_gpu(p) for p in stage_placements(config))
    assert sum(b["GPU"] for b in bundles(config)) <= 1
    assert config.placement_strategy == "STRICT_PACK"
    assert can_place(bundles(config), [{"CPU": 8, "GPU": 1}], config.placement_strategy)


def test_four_gpus_puts_one_stage_per_gpu_on_one_node():
    config = load_serving_config(CONFIG_DIR / "four-gpus.yaml")
    assert len(config.stages) == 4 and [p.num_gpus for p in config.stages] == [1, 1, 1, 1]
    assert config.placement_strategy == "STRICT_PACK"
    assert can_place(bundles(config), [{"CPU": 16, "GPU": 4}], config.placement_strategy)
    assert not can_place(bundles(config), [{"CPU": 16, "GPU": 2}] * 2, config.placement_strategy)


def test_multi_node_spreads_one_stage_per_gpu_across_nodes():
    config = load_serving_config(MULTI_NODE)
    assert config.placement_strategy in ("SPREAD", "STRICT_SPREAD")
    assert [p.num_gpus for p in stage_placements(config)] == [1] * NUM_STAGES
    assert can_place(bundles(config), [{"CPU": 8, "GPU": 1}] * NUM_STAGES, config.placement_strategy)


# --- Ray cluster launcher -----------------------------------------------------------------------


def load_launcher(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("path", files_of("launcher"))
def test_launcher_has_the_keys_ray_up_requires(path):
    raw = load_launcher(path)
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type"):
        assert raw.get(key), f"{path}: {key} is missing"
    assert "type" in raw["provider"], f"{path}: provider.type is missing"
    types = raw["available_node_types"]
    assert raw["head_node_type"] in types, f"{path}: head_node_type {raw['head_node_type']!r} is not a node type"
    for name, node in types.items():
        assert isinstance(node.get("resources"), dict), f"{path}: {name}.resources is missing"
        assert isinstance(node.get("node_config"), dict) and node["node_config"], f"{path}: {name}.node_config"
        assert node.get("min_workers", 0) <= node.get("max_workers", raw.get("max_workers", 0)), name
    workers = sum(node.get("max_workers", 0) for name, node in types.items() if name != raw["head_node_type"])
    assert workers <= raw.get("max_workers", workers), f"{path}: node types allow more workers than max_workers"


@pytest.mark.parametrize("path", files_of("launcher"))
def test_launcher_matches_rays_schema(path):
    import jsonschema  # in the test extra: a missing install fails here rather than skipping
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(load_launcher(path), schema)


@pytest.mark.parametrize("path", files_of("launcher"))
def test_launcher_installs_poe_serve_and_starts_ray(path):
    raw = load_launcher(path)
    setup = raw.get("setup_commands", []) + raw.get("head_setup_commands", []) + raw.get("worker_setup_commands", [])
    installs = [c for c in setup if "pip install" in c and "poe-serve" in c]
    assert installs, f"{path}: no setup command pip-installs poe-serve: {setup}"
    mounted = raw.get("file_mounts") or {}
    for command in installs:  # an install from a local path needs that path synced to the node
        paths = [arg for arg in shlex.split(command) if arg.startswith(("~", "/", "."))]
        assert all(p.rstrip("/") in mounted for p in paths), f"{path}: {command!r} installs from an unmounted path"
    assert any("ray start --head" in c for c in raw["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in raw["worker_start_ray_commands"])


@pytest.mark.parametrize("path", files_of("launcher"))
def test_launcher_starts_enough_gpu_nodes_for_the_multi_node_placement(path):
    raw = load_launcher(path)
    config = load_serving_config(MULTI_NODE)
    nodes = [node["resources"] for name, node in raw["available_node_types"].items()
             if name != raw["head_node_type"] for _ in range(node.get("min_workers", 0))]
    # min_workers, not max_workers: PoECluster waits PLACEMENT_TIMEOUT_S, less than a GPU node's boot
    assert can_place(bundles(config), nodes, config.placement_strategy), (
        f"{path}: {bundles(config)} ({config.placement_strategy}) do not fit the nodes started at once: {nodes}")


# --- KubeRay ------------------------------------------------------------------------------------


def kuberay_docs(path: Path) -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for d in docs:
        assert d.get("metadata", {}).get("name"), f"{path}: a {d['kind']} document has no metadata.name"
    return {d["kind"]: d for d in docs}


def serve_flags(path: Path, rayjob: dict) -> dict[str, str]:
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:2] == ["poe-serve", "serve"], f"{path}: entrypoint {argv[:2]} is not `poe-serve serve`"
    return dict(zip(argv[2::2], argv[3::2]))


def head_pod(rayjob: dict) -> dict:
    return rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]


def quantity(value) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


@pytest.mark.parametrize("path", files_of("kuberay"))
def test_rayjob_serves_an_existing_placement_config(path):
    rayjob = kuberay_docs(path).get("RayJob")
    if rayjob is None:
        pytest.skip(f"{path}: no RayJob")
    assert rayjob["apiVersion"] == "ray.io/v1"
    flags = serve_flags(path, rayjob)
    config_path = REPO / flags["--config"]
    assert config_path.is_file() and config_kind(config_path) == "placement", f"{path}: --config {config_path}"
    load_serving_config(config_path).check_num_stages(NUM_STAGES)
    assert flags.get("--checkpoint") and flags.get("--host") == "0.0.0.0", f"{path}: {flags}"
    spec = rayjob["spec"]["rayClusterSpec"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:  # ray.io/v1: map[string]string
        assert all(isinstance(v, str) for v in group.get("rayStartParams", {}).values()), group["rayStartParams"]


@pytest.mark.parametrize("path", files_of("kuberay"))
def test_rayjob_gpu_workers_fit_its_placement_config(path):
    rayjob = kuberay_docs(path).get("RayJob")
    if rayjob is None:
        pytest.skip(f"{path}: no RayJob")
    config = load_serving_config(REPO / serve_flags(path, rayjob)["--config"])
    pods = []
    for group in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        requests, limits = container["resources"]["requests"], container["resources"]["limits"]
        assert requests.get("nvidia.com/gpu") == limits.get("nvidia.com/gpu"), f"{path}: GPU requests != limits"
        pod = {"CPU": quantity(limits["cpu"]), "GPU": float(limits.get("nvidia.com/gpu", 0))}
        pods += [pod] * group.get("minReplicas", group["replicas"])
    assert can_place(bundles(config), pods, config.placement_strategy), (
        f"{path}: {bundles(config)} ({config.placement_strategy}) do not fit the worker pods {pods}")


@pytest.mark.parametrize("path", files_of("kuberay"))
def test_service_targets_the_port_the_entrypoint_serves(path):
    docs = kuberay_docs(path)
    if "RayJob" not in docs:
        pytest.skip(f"{path}: no RayJob")
    port = int(serve_flags(path, docs["RayJob"])["--port"])
    service = docs.get("Service")
    assert service is not None, f"{path}: no Service exposes the gRPC port {port}"
    pod = head_pod(docs["RayJob"])
    labels = pod.get("metadata", {}).get("labels", {})
    selector = service["spec"]["selector"]
    assert selector.items() <= labels.items(), f"{path}: Service selector {selector} misses head labels {labels}"
    container_ports = {p.get("name"): p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
    assert port in container_ports.values(), f"{path}: the head container does not declare port {port}"
    targets = [container_ports.get(p["targetPort"], p["targetPort"]) for p in service["spec"]["ports"]]
    assert port in targets, f"{path}: Service targets {targets}, the entrypoint serves {port}"


# --- errors name the file and the field ---------------------------------------------------------

BAD_PLACEMENTS = {  # id: (file text, what the error must say after the file name)
    "unknown-key": ("placement_strategy: PACK\nnum_gpu: 1\n", "unknown key 'num_gpu'; allowed:"),
    "negative-gpus": ("defaults:\n  num_gpus: -1\n", "defaults: num_gpus=-1 must be a number >= 0"),
    "cuda-without-gpu": ("defaults:\n  device: cuda\n  num_gpus: 0\n", "defaults: device cuda needs num_gpus > 0"),
    "bad-strategy": ("placement_strategy: STRICT\n",
                     "placement_strategy='STRICT'; allowed: PACK, SPREAD, STRICT_PACK, STRICT_SPREAD"),
    "unknown-stage-key": ("stages:\n  - {}\n  - {gpus: 1}\n", "stages[1]: unknown key 'gpus'"),
    "bad-dtype": ("defaults:\n  dtype: int8\n", "defaults: dtype='int8'; allowed:"),
    "zero-replicas": ("stages:\n  - {replicas: 0}\n", "stages[0]: replicas=0 must be an integer >= 1"),
    "zero-queue": ("max_queue: 0\n", "max_queue=0 must be an integer >= 1"),
    "memory-fraction-over-1": ("defaults:\n  memory_fraction: 1.5\n",
                               "defaults: memory_fraction=1.5 must be null or a number in (0, 1]"),
    "memory-fraction-and-tokens": ("stages:\n  - {memory_fraction: 0.2, kv_cache_tokens: 4096}\n",
                                   "stages[0]: set kv_cache_tokens or memory_fraction, not both"),
    "zero-token-budget": ("max_num_batched_tokens: 0\n", "max_num_batched_tokens=0 must be an integer >= 1"),
    "negative-recoveries": ("max_recoveries: -1\n", "max_recoveries=-1 must be an integer >= 0"),
    "zero-step-timeout": ("step_timeout_s: 0\n", "step_timeout_s=0 must be a number of seconds > 0"),
    "autoscaling-unknown-key": ("stages:\n  - {autoscaling: {max: 2, target_utilization: 0.5}}\n",
                                "stages[0]: autoscaling: unknown key 'max'"),
    "replicas-outside-autoscaling": ("stages:\n  - {replicas: 3, autoscaling: {max_replicas: 2, target_kv_usage: 0.5}}\n",
                                     "stages[0]: replicas=3 is outside autoscaling's [min_replicas, max_replicas] = [1, 2]"),
    "cluster-autoscaling-not-bool": ("cluster_autoscaling: sometimes\n",
                                     "cluster_autoscaling='sometimes' must be true or false"),
    "not-a-mapping": ("- PACK\n", "expected a YAML mapping"),
    "not-yaml": ("defaults: [\n", "not valid YAML"),
}


@pytest.mark.parametrize("text,message", BAD_PLACEMENTS.values(), ids=BAD_PLACEMENTS.keys())
def test_bad_placement_config_error_names_the_file_and_field(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        load_serving_config(path)
    assert str(path) in str(info.value) and message in str(info.value), str(info.value)


def test_wrong_stage_count_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "two-stages.yaml"
    path.write_text("stages:\n  - {}\n  - {}\n")
    config = load_serving_config(path)
    with pytest.raises(ValueError, match=re.escape(f"{path}: lists 2 stages, the checkpoint has {NUM_STAGES}")):
        config.check_num_stages(NUM_STAGES)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml not found"):
        load_serving_config(tmp_path / "nope.yaml")


def test_unknown_yaml_kind_is_not_accepted(tmp_path):
    stray = tmp_path / "stray.yaml"
    stray.write_text("name: something\nreplicas: 3\n")
    assert config_kind(stray) == "unknown"
