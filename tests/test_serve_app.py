"""The Ray Serve application (coordinator/ray_cluster/serve_app.py) without Serve: its `Coordinator` over the
in-process tiny model, and its builder as Serve calls it. The manifest that runs it is checked in
test_cluster_configs.py.

`check_health` is what Serve (and so KubeRay) sees: it must fail while a stage is down, the
engine loop is down or the server drains, and pass otherwise.
"""

from __future__ import annotations

import pydantic
import pytest
from fastapi.testclient import TestClient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ray.serve import Application
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary  # what Serve does with `args`

from coordinator import PoEModel, load_tokenizer
from coordinator.ray_cluster.serve_app import Coordinator, build
from tools.client import PoEClient


@pytest.fixture
def coordinator(tiny_dir):
    model = PoEModel.from_pretrained(tiny_dir)
    coordinator = Coordinator(model, load_tokenizer(tiny_dir), "tiny", grpc_port=0, grpc_host="127.0.0.1")
    yield coordinator
    coordinator.grpc.stop(0)
    model.loop.stop()


def test_check_health_passes_while_every_stage_serves(coordinator):
    coordinator.check_health()
    with PoEClient(coordinator.grpc.address, timeout=30) as client:
        assert client.generate(token_ids=[1, 2, 3], max_new_tokens=3).token_ids
        check = health_pb2_grpc.HealthStub(client.channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
    coordinator.check_health()


def test_check_health_fails_while_a_stage_is_down(coordinator):
    coordinator.model.engine.stages_down.add(2)  # as after a worker lost with no restart left
    with pytest.raises(RuntimeError, match=r"not ready: stages \[2\] have no live worker"):
        coordinator.check_health()
    coordinator.model.engine.stages_down.discard(2)
    coordinator.check_health()


def test_check_health_fails_once_the_engine_loop_is_down(coordinator):
    coordinator.model.loop.stop()
    with pytest.raises(RuntimeError, match="engine loop is not running"):
        coordinator.check_health()


def test_a_drain_covers_both_fronts_and_fails_the_health_check(coordinator):
    assert coordinator.front.drain is coordinator.grpc.admission  # one drain: HTTP and gRPC
    assert coordinator.drain(timeout=5) == 0
    with pytest.raises(RuntimeError, match="draining"):
        coordinator.check_health()


def test_the_http_app_reports_readiness_and_liveness(coordinator):
    with TestClient(coordinator.app()) as client:  # the ASGI app Serve's proxy runs
        assert client.get("/ready").status_code == 200 and client.get("/health").status_code == 200
        coordinator.model.engine.stages_down.add(1)
        ready = client.get("/ready")
        assert ready.status_code == 503 and "[1]" in ready.json()["error"]["message"]
        assert client.get("/health").status_code == 200  # a stage down is not a liveness failure
        coordinator.model.engine.stages_down.discard(1)


def test_the_builder_takes_serve_args_and_refuses_unknown_ones(tiny_dir):
    app = call_user_app_builder_with_args_if_necessary(build, {"checkpoint": str(tiny_dir), "shutdown_timeout_s": 12})
    assert isinstance(app, Application)
    assert app._bound_deployment.name == "PoECoordinator"
    assert app._bound_deployment._deployment_config.graceful_shutdown_timeout_s == 12
    with pytest.raises(pydantic.ValidationError, match="chekpoint"):
        call_user_app_builder_with_args_if_necessary(build, {"checkpoint": str(tiny_dir), "chekpoint": "x"})
    with pytest.raises(pydantic.ValidationError, match="grpc_port"):
        call_user_app_builder_with_args_if_necessary(build, {"checkpoint": str(tiny_dir), "grpc_port": "50051"})


def test_the_app_serves_completions_under_ray_serve(ray_session, tiny_dir, tiny_model):
    """The deployment itself on the session's Ray (about 10 s here): it launches the stage workers,
    answers /ready and a completion with the in-process model's tokens, and Serve reports it RUNNING."""
    import json
    import socket
    import urllib.request

    from ray import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        app = call_user_app_builder_with_args_if_necessary(build, {"checkpoint": str(tiny_dir), "served_model_name": "tiny",
                                                                  "shutdown_timeout_s": 5})
        serve.run(app, name="poe-serve", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(url + "/ready", timeout=30) as reply:
            assert json.loads(reply.read()) == {"status": "ready"}
        body = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 5, "temperature": 0, "return_token_ids": True}
        request = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as reply:
            tokens = json.loads(reply.read())["choices"][0]["token_ids"]
        assert tokens == tiny_model.generate([[1, 2, 3]], 5)[0, 3:].tolist()
        assert serve.status().applications["poe-serve"].status == "RUNNING"
    finally:
        serve.shutdown()
