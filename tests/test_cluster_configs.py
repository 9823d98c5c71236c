"""Every YAML in cluster_configs/ is loaded and checked, so a new file is covered without a new test.

Three kinds live there: placement configs (ServingConfig keys, read by `load_serving_config`),
Ray cluster-launcher configs (`ray up`) and KubeRay manifests; a file of no known kind fails.
Each check runs on the files that hold what it checks (a RayJob, a RayService, an autoscaled
placement; found when the module loads), so none skips, and a deployment's file that loses one
fails test_the_directory_covers_each_deployment.
Nothing here starts Ray or talks to a cloud or to Kubernetes: resources are checked on paper.
KubeRay manifests are validated against the KubeRay CRDs' schemas (vendored in tests/schemas/)
and their Services and pod templates against Kubernetes' own (the kubernetes-validate package),
both strict: an unknown field is an error, as `kubectl apply --validate=strict` makes it.
"""

from __future__ import annotations

import json
import re
import shlex
import socket
import subprocess
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
SCHEMAS = Path(__file__).parent / "schemas"  # KubeRay CRD schemas: see extract_crd_schema.py
KUBERNETES_VERSION = "1.33.0"  # the Kubernetes API the pod templates and Services are checked against


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


def document_kinds(path: Path) -> set[str]:
    """The `kind` of every document of a KubeRay file."""
    return {d.get("kind") for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)}


def kuberay_files_with(kind: str) -> list:
    """The KubeRay files holding a `kind` document: the checks of a RayJob run on the files that
    have one, and test_the_directory_covers_each_deployment fails when a file loses one."""
    return [pytest.param(p, id=p.name) for p in CONFIG_FILES
            if config_kind(p) == "kuberay" and kind in document_kinds(p)]


def autoscaled_rayservice_files() -> list:
    """The KubeRay files whose RayService serves a placement with an autoscaled stage."""
    found = []
    for param in kuberay_files_with("RayService"):
        docs = yaml.safe_load_all(param.values[0].read_text())
        (rayservice,) = (d for d in docs if d and d["kind"] == "RayService")
        (application,) = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"]
        config = load_serving_config(REPO / application["args"]["config"])
        if any(config.placement(k).autoscaling for k in range(NUM_STAGES)):
            found.append(param)
    return found


RAYJOB_FILES, RAYSERVICE_FILES = kuberay_files_with("RayJob"), kuberay_files_with("RayService")
AUTOSCALED_RAYSERVICE_FILES = autoscaled_rayservice_files()


def stage_placements(config: ServingConfig) -> list[StagePlacement]:
    return [config.placement(k) for k in range(NUM_STAGES)]


def bundles(config: ServingConfig) -> list[dict[str, float]]:
    """One Ray placement-group bundle per worker (a stage's, or a stage group's), as
    coordinator.ray_cluster.cluster asks for them."""
    placements = [config.placement(first) for first, _ in config.worker_groups(NUM_STAGES)]
    return [{"CPU": p.num_cpus, "GPU": p.num_gpus} for p in placements for _ in range(p.replicas)]


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
    """Each deployment's file is there, of its kind, with the documents the KubeRay checks run on."""
    expected = {"local-cpu.yaml": "placement", "one-gpu.yaml": "placement", "four-gpus.yaml": "placement",
                "multi-node.yaml": "placement", "ray-cluster-launcher.yaml": "launcher",
                "kuberay-rayjob.yaml": "kuberay", "kuberay-rayservice.yaml": "kuberay"}
    assert {name: config_kind(CONFIG_DIR / name) for name in expected} == expected
    documents = {"kuberay-rayjob.yaml": {"RayJob", "Service"}, "kuberay-rayservice.yaml": {"RayService", "Service"}}
    assert {name: document_kinds(CONFIG_DIR / name) for name in documents} == documents
    assert [p.id for p in AUTOSCALED_RAYSERVICE_FILES] == ["kuberay-rayservice.yaml"], "its stages are autoscaled"


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


def test_stage_groups_must_cover_the_checkpoints_stages(tmp_path):
    path = tmp_path / "groups.yaml"
    path.write_text("workers:\n  - {stages: [0, 1], num_cpus: 1}\n  - {stages: 2, replicas: 2}\n")
    config = load_serving_config(path)
    assert config.worker_groups(3) == [(0, 1), (2, 2)] and config.placement(1).num_cpus == 1
    assert config.placement(2).replicas == 2 and len(bundles(config)) == 3
    config.check_num_stages(3)
    with pytest.raises(ValueError, match="workers serve stages 0..2, the checkpoint has stages 0..3"):
        config.check_num_stages(4)


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
    # min_workers, not max_workers: PoEModel waits PLACEMENT_TIMEOUT_S, less than a GPU node's boot
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


def worker_pods(spec: dict, count: str) -> list[dict[str, float]]:
    """Resources of every worker pod of a RayCluster spec, `count` (minReplicas, maxReplicas) per group."""
    pods = []
    for group in spec["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        pods += [{"CPU": quantity(limits["cpu"]), "GPU": float(limits.get("nvidia.com/gpu", 0))}] * group[count]
    return pods


@pytest.mark.parametrize("path", RAYJOB_FILES)
def test_rayjob_serves_an_existing_placement_config(path):
    rayjob = kuberay_docs(path)["RayJob"]
    assert rayjob["apiVersion"] == "ray.io/v1"
    flags = serve_flags(path, rayjob)
    config_path = REPO / flags["--config"]
    assert config_path.is_file() and config_kind(config_path) == "placement", f"{path}: --config {config_path}"
    load_serving_config(config_path).check_num_stages(NUM_STAGES)
    assert flags.get("--checkpoint") and flags.get("--host") == "0.0.0.0", f"{path}: {flags}"
    spec = rayjob["spec"]["rayClusterSpec"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:  # ray.io/v1: map[string]string
        assert all(isinstance(v, str) for v in group.get("rayStartParams", {}).values()), group["rayStartParams"]


@pytest.mark.parametrize("path", RAYJOB_FILES)
def test_rayjob_gpu_workers_fit_its_placement_config(path):
    rayjob = kuberay_docs(path)["RayJob"]
    config = load_serving_config(REPO / serve_flags(path, rayjob)["--config"])
    spec = rayjob["spec"]["rayClusterSpec"]
    for group in spec["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        requests, limits = container["resources"]["requests"], container["resources"]["limits"]
        assert requests.get("nvidia.com/gpu") == limits.get("nvidia.com/gpu"), f"{path}: GPU requests != limits"
    pods = worker_pods(spec, "minReplicas")
    assert can_place(bundles(config), pods, config.placement_strategy), (
        f"{path}: {bundles(config)} ({config.placement_strategy}) do not fit the worker pods {pods}")


def container_ports(pod: dict) -> dict:
    return {p.get("name"): p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}


def service_targets(path: Path, docs: dict, pod: dict) -> list[int]:
    """The head pod's ports the Service sends traffic to (after checking that it selects the head)."""
    service = docs.get("Service")
    assert service is not None, f"{path}: no Service exposes the server"
    labels = pod.get("metadata", {}).get("labels", {})
    selector = service["spec"]["selector"]
    assert selector.items() <= labels.items(), f"{path}: Service selector {selector} misses head labels {labels}"
    ports = container_ports(pod)
    return [ports.get(p["targetPort"], p["targetPort"]) for p in service["spec"]["ports"]]


@pytest.mark.parametrize("path", RAYJOB_FILES)
def test_service_targets_the_ports_the_entrypoint_serves(path):
    docs = kuberay_docs(path)
    flags, pod = serve_flags(path, docs["RayJob"]), head_pod(docs["RayJob"])
    targets = service_targets(path, docs, pod)
    for flag in ("--port", "--http-port"):
        port = int(flags[flag])
        assert port in container_ports(pod).values(), f"{path}: the head container does not declare {flag} {port}"
        assert port in targets, f"{path}: Service targets {targets}, the entrypoint serves {flag} {port}"


PROBE_URL = re.compile(r"http://127\.0\.0\.1:(\d+)(/\S*)")


def probe_urls(probe: dict) -> list[tuple[int, str]]:
    """(port, path) of each URL a probe asks: httpGet's, or those in an exec probe's command."""
    if "httpGet" in probe:
        return [(probe["httpGet"]["port"], probe["httpGet"]["path"])]
    return [(int(port), route) for port, route in PROBE_URL.findall(" ".join(probe["exec"]["command"]))]


@pytest.mark.parametrize("path", RAYJOB_FILES)
def test_rayjob_probes_ask_the_servers_ready_and_health_on_its_http_port(path):
    docs = kuberay_docs(path)
    http_port = int(serve_flags(path, docs["RayJob"])["--http-port"])
    (container,) = head_pod(docs["RayJob"])["spec"]["containers"]
    for probe, route in (("readinessProbe", "/ready"), ("livenessProbe", "/health")):
        assert probe in container, f"{path}: the head container has no {probe}"
        urls = probe_urls(container[probe])
        assert (http_port, route) in urls, f"{path}: {probe} asks {urls}, not {route} on --http-port {http_port}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_probe(probe: dict, http_port: int, server_port: int, ray_health_url: str) -> int:
    """Run an exec probe's command here, against `server_port` instead of the manifest's port."""
    command = [arg.replace(f"127.0.0.1:{http_port}/", f"127.0.0.1:{server_port}/")
               .replace(f"/127.0.0.1/{http_port}", f"/127.0.0.1/{server_port}")
               .replace("http://127.0.0.1:52365/api/healthz", ray_health_url) for arg in probe["exec"]["command"]]
    return subprocess.run(command, timeout=30).returncode


@pytest.mark.parametrize("path", RAYJOB_FILES)
def test_rayjob_probes_pass_until_the_server_listens_then_follow_it(path, tiny_dir):
    """KubeRay submits the job only once the head pod is Ready: before the server listens, both
    probes pass; then readiness fails while a stage is down and liveness only once the loop died."""
    from coordinator import PoEModel, load_tokenizer
    from coordinator.http_api.app import HttpServer

    docs = kuberay_docs(path)
    http_port = int(serve_flags(path, docs["RayJob"])["--http-port"])
    (container,) = head_pod(docs["RayJob"])["spec"]["containers"]
    ready, live = container["readinessProbe"], container["livenessProbe"]
    model = PoEModel.from_pretrained(tiny_dir)
    http = HttpServer(model, load_tokenizer(tiny_dir), port=0)
    ray_healthy, nobody = f"{http.url}/health", free_port()  # stands in for Ray's agent
    try:
        assert run_probe(ready, http_port, nobody, ray_healthy) == 0, "not listening yet: must pass"
        assert run_probe(live, http_port, nobody, ray_healthy) == 0, "not listening yet: must pass"
        assert run_probe(ready, http_port, nobody, f"http://127.0.0.1:{nobody}/api/healthz") != 0, "Ray down"
        assert run_probe(ready, http_port, http.port, ray_healthy) == 0
        model.engine.stages_down.add(1)
        assert run_probe(ready, http_port, http.port, ray_healthy) != 0, "a stage down: not ready"
        assert run_probe(live, http_port, http.port, ray_healthy) == 0, "a stage down: still live"
        model.engine.stages_down.discard(1)
        model.loop.stop()
        assert run_probe(live, http_port, http.port, f"{http.url}/metrics") != 0, "the loop died: not live"
    finally:
        http.stop()


def pod_templates(doc: dict) -> list[dict]:
    spec = doc["spec"].get("rayClusterSpec") or doc["spec"]["rayClusterConfig"]
    return [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]


def shutdown_timeout(path: Path, doc: dict) -> float:
    """The drain time of the server a RayJob or a RayService runs."""
    if doc["kind"] == "RayJob":
        return float(serve_flags(path, doc).get("--shutdown-timeout", 30))
    (application,) = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]
    return float(application["args"].get("shutdown_timeout_s", 30))


@pytest.mark.parametrize("path", files_of("kuberay"))
def test_pods_wait_longer_than_the_drain_before_sigkill(path):
    for doc in (d for d in kuberay_docs(path).values() if d["kind"] in ("RayJob", "RayService")):
        timeout = shutdown_timeout(path, doc)
        for template in pod_templates(doc):
            grace = template["spec"].get("terminationGracePeriodSeconds", 30)
            assert grace > timeout, f"{path}: terminationGracePeriodSeconds {grace} <= the drain's {timeout} s"
        if doc["kind"] == "RayJob":  # `ray job stop` (KubeRay's, on deletion) SIGKILLs after this
            (head,) = head_pod(doc)["spec"]["containers"]
            env = {e["name"]: e.get("value") for e in head.get("env", [])}
            assert float(env.get("RAY_JOB_STOP_WAIT_TIME_S", 3)) > timeout, f"{path}: RAY_JOB_STOP_WAIT_TIME_S"
            assert "poe-serve [s]erve" in " ".join(head["lifecycle"]["preStop"]["exec"]["command"]), path


# --- KubeRay RayService -------------------------------------------------------------------------


def serve_application(path: Path, rayservice: dict) -> dict:
    from ray.serve.schema import DeploymentSchema, ServeDeploySchema

    config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)  # Ray Serve's own schema of serveConfigV2
    (application,) = config["applications"]
    for deployment in application.get("deployments", []):  # DeploymentSchema allows unknown keys
        unknown = set(deployment) - set(DeploymentSchema.model_fields)
        assert not unknown, f"{path}: serveConfigV2 deployment {deployment['name']}: unknown keys {unknown}"
    return application


@pytest.mark.parametrize("path", RAYSERVICE_FILES)
def test_rayservice_builds_the_serve_app_from_its_args(path):
    import importlib

    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary  # as Serve calls it

    rayservice = kuberay_docs(path)["RayService"]
    application = serve_application(path, rayservice)
    module, _, name = application["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), name)
    app = call_user_app_builder_with_args_if_necessary(builder, application["args"])  # validates the args
    names = {d["name"] for d in application.get("deployments", [])}
    assert names <= {app._bound_deployment.name}, f"{path}: serveConfigV2 names deployments {names}"
    config_path = REPO / application["args"]["config"]
    assert config_kind(config_path) == "placement", f"{path}: args.config {config_path}"
    load_serving_config(config_path).check_num_stages(NUM_STAGES)


@pytest.mark.parametrize("path", AUTOSCALED_RAYSERVICE_FILES)
def test_an_autoscaled_placement_runs_on_a_cluster_that_adds_nodes_for_it(path):
    """Stages with autoscaling: blocks need Ray's in-tree autoscaler on, cluster_autoscaling in
    the placement (so scale-ups wait for nodes), pods for the starting replicas at minReplicas and
    room for every stage at its max_replicas at maxReplicas."""
    docs = kuberay_docs(path)
    config = load_serving_config(REPO / serve_application(path, docs["RayService"])["args"]["config"])
    scaled = [config.placement(k).autoscaling for k in range(NUM_STAGES)]
    spec = docs["RayService"]["spec"]["rayClusterConfig"]
    assert spec.get("enableInTreeAutoscaling") is True and config.cluster_autoscaling, path
    most = [{"CPU": config.placement(k).num_cpus, "GPU": config.placement(k).num_gpus}
            for k, a in enumerate(scaled) for _ in range(a.max_replicas if a else config.placement(k).replicas)]
    assert can_place(bundles(config), worker_pods(spec, "minReplicas"), config.placement_strategy)
    assert can_place(most, worker_pods(spec, "maxReplicas"), config.placement_strategy), (
        f"{path}: every stage at max_replicas needs {len(most)} bundles; maxReplicas pods cannot hold them")


@pytest.mark.parametrize("path", RAYSERVICE_FILES)
def test_rayservice_pins_the_coordinator_to_the_head_that_exposes_its_grpc_port(path):
    docs = kuberay_docs(path)
    application = serve_application(path, docs["RayService"])
    (deployment,) = application["deployments"]
    wanted = deployment["ray_actor_options"]["resources"]
    head = docs["RayService"]["spec"]["rayClusterConfig"]["headGroupSpec"]
    offered = json.loads(json.loads(head["rayStartParams"]["resources"]))  # KubeRay's quoted JSON
    assert all(offered.get(k, 0) >= v for k, v in wanted.items()), f"{path}: the head offers {offered}, not {wanted}"
    port = application["args"]["grpc_port"]
    assert port in service_targets(path, docs, head["template"]), f"{path}: no Service targets grpc_port {port}"


# --- schemas ------------------------------------------------------------------------------------


def strict(schema):
    """The schema with unknown properties refused wherever it lists properties (as the API server's
    strict field validation does), except where it keeps unknown fields on purpose."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    return out


@pytest.mark.parametrize("path", files_of("kuberay"))
def test_kuberay_manifests_match_the_crd_schemas(path):
    import jsonschema  # in the test extra: a missing install fails here rather than skipping

    for doc in kuberay_docs(path).values():
        if doc["kind"] in ("RayJob", "RayService"):
            schema = json.loads((SCHEMAS / f"{doc['kind'].lower()}-v1.json").read_text())
            errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                      for e in jsonschema.Draft7Validator(strict(schema)).iter_errors(doc)]
            assert not errors, f"{path}: {doc['kind']} does not match the KubeRay CRD: {errors}"


@pytest.mark.parametrize("path", files_of("kuberay"))
def test_services_and_pod_templates_match_the_kubernetes_schemas(path):
    import kubernetes_validate  # in the test extra: a missing install fails here rather than skipping

    for doc in kuberay_docs(path).values():
        if doc["kind"] == "Service":
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        elif doc["kind"] in ("RayJob", "RayService"):
            for template in pod_templates(doc):  # a PodTemplateSpec is a Pod's metadata and spec
                pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "template", **template.get("metadata", {})},
                       "spec": template["spec"]}
                kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)


def test_a_misspelt_field_fails_the_schemas():
    import jsonschema
    import kubernetes_validate

    rayjob = kuberay_docs(CONFIG_DIR / "kuberay-rayjob.yaml")["RayJob"]
    rayjob["spec"]["shutdownAfterJobFinish"] = True
    with pytest.raises(jsonschema.ValidationError, match="shutdownAfterJobFinish"):
        jsonschema.validate(rayjob, strict(json.loads((SCHEMAS / "rayjob-v1.json").read_text())))
    (container,) = head_pod(rayjob)["spec"]["containers"]
    container["readinessProbe"]["periodSecond"] = 5
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": {"containers": [container]}}
    with pytest.raises(kubernetes_validate.ValidationError, match="periodSecond"):
        kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)


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
    "zero-token-budget": ("max_num_batched_tokens: 0\n", "max_num_batched_tokens=0 is invalid; allowed: an integer >= 1"),
    "negative-recoveries": ("max_recoveries: -1\n", "max_recoveries=-1 is invalid; allowed: an integer >= 0"),
    "zero-step-timeout": ("step_timeout_s: 0\n", "step_timeout_s=0 must be a number of seconds > 0"),
    "autoscaling-unknown-key": ("stages:\n  - {autoscaling: {max: 2, target_utilization: 0.5}}\n",
                                "stages[0]: autoscaling: unknown key 'max'"),
    "replicas-outside-autoscaling": ("stages:\n  - {replicas: 3, autoscaling: {max_replicas: 2, target_kv_usage: 0.5}}\n",
                                     "stages[0]: replicas=3 is outside autoscaling's [min_replicas, max_replicas] = [1, 2]"),
    "cluster-autoscaling-not-bool": ("cluster_autoscaling: sometimes\n",
                                     "cluster_autoscaling='sometimes' must be true or false"),
    "resources-not-a-mapping": ("defaults:\n  resources: [big_memory]\n",
                                "defaults: resources: expected a mapping {name: value}, got list"),
    "resource-builtin": ("stages:\n  - {resources: {GPU: 1}}\n", "stages[0]: resources: resource name 'GPU'; allowed:"),
    "resource-zero": ("defaults:\n  resources: {big_memory: 0}\n", "defaults: resources: big_memory=0 must be a number > 0"),
    "label-not-string": ("defaults:\n  label_selector: {pool: 3}\n",
                         "defaults: label_selector: pool=3 must be a non-empty string"),
    "accelerator-without-gpu": ("defaults:\n  accelerator_type: H100\n",
                                "defaults: accelerator_type H100 needs num_gpus > 0"),
    "accelerator-prefixed": ("defaults:\n  num_gpus: 1\n  accelerator_type: 'accelerator_type:H100'\n",
                             "defaults: accelerator_type='accelerator_type:H100'; allowed:"),
    "workers-and-stages": ("stages:\n  - {}\nworkers:\n  - {stages: [0, 3]}\n",
                           "set stages (a worker per stage) or workers (each with its stage range), not both"),
    "worker-without-stages": ("workers:\n  - {num_cpus: 1}\n", "workers[0]: each worker needs stages: [first, last]"),
    "workers-with-a-gap": ("workers:\n  - {stages: [0, 1]}\n  - {stages: [3, 3]}\n",
                           "workers[1]: stages=[3, 3]; allowed: [2, last] with last >= 2"),
    "workers-backwards": ("workers:\n  - {stages: [0, 2]}\n  - {stages: [3, 1]}\n",
                          "workers[1]: stages=[3, 1]; allowed: [3, last] with last >= 3"),
    "worker-unknown-key": ("workers:\n  - {stages: [0, 3], gpus: 1}\n", "workers[0]: unknown key 'gpus'"),
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


def test_per_stage_resources_labels_and_accelerator_become_the_workers_bundles(tmp_path):
    from coordinator.ray_cluster.cluster import ACCELERATOR_SHARE, _bundle

    path = tmp_path / "mixed.yaml"
    path.write_text("defaults:\n  num_cpus: 1\n  resources: {spot: 1}\n  label_selector: {pool: spot}\n"
                    "stages:\n  - {resources: {big_memory: 2}, label_selector: {pool: 'in(highmem,big)'}}\n"
                    "  - {num_gpus: 1, accelerator_type: H100}\n  - {}\n  - {}\n")
    config = load_serving_config(path)
    assert _bundle(config.placement(0)) == {"CPU": 1, "big_memory": 2}  # a stage's entry replaces the default's
    assert dict(config.placement(0).label_selector) == {"pool": "in(highmem,big)"}
    assert _bundle(config.placement(1)) == {"CPU": 1, "GPU": 1, "spot": 1, "accelerator_type:H100": ACCELERATOR_SHARE}
    assert _bundle(config.placement(3)) == {"CPU": 1, "spot": 1} and dict(config.placement(3).label_selector) == {
        "pool": "spot"}


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
