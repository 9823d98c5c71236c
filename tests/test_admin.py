"""The PoEAdmin service: scaling a stage's replicas on a running server, through gRPC and the CLI.

Over a model on Ray (`PoEModel.on_ray`) on the session's Ray: a stage scales up and back down while a request is in
flight, tokens stay those of `PoEModel`, ModelInfo lists every replica, and ListWorkers (`poe-serve
workers`) says where each runs. Over an in-process
model scaling is refused; bad arguments are INVALID_ARGUMENT naming the field.
"""

from __future__ import annotations

import threading

import grpc
import pytest
import ray
import torch

from coordinator import PoEModel, load_tokenizer
from coordinator.grpc_api.server import Server
from tools.cli import main
from tools.client import PoEClient


def ids(seed: int) -> list[int]:
    return torch.randint(0, 500, (20,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_scale_stage_while_serving_keeps_tokens_and_lists_replicas(ray_session, tiny_dir, tiny_model, capsys):
    from coordinator import PoEModel
    from coordinator.serving_config import ServingConfig

    expected = tiny_model.generate(torch.tensor([ids(1)]), 24)[0, 20:].tolist()
    with PoEModel.on_ray(tiny_dir, config=ServingConfig()) as cluster:  # one worker per stage
        server = Server(cluster, load_tokenizer(tiny_dir), port=0)
        try:
            with PoEClient(server.address, timeout=120) as client:
                result = {}
                in_flight = threading.Thread(
                    target=lambda: result.update(tokens=list(client.generate(token_ids=ids(1), max_new_tokens=24).token_ids)))
                in_flight.start()
                assert client.scale_stage(0, 2) == [2, 1, 1, 1]
                info = client.model_info()
                assert [(w.stage, w.replica) for w in info.workers] == [(0, 0), (0, 1), (1, 0), (2, 0), (3, 0)]
                located = client.list_workers()
                pids = ray.get([a.pid.remote() for a in cluster.backend.actors])
                assert [(w.stage, w.replica, w.pid) for w in located] == list(zip([0, 0, 1, 2, 3], [0, 1, 0, 0, 0], pids))
                assert {w.node_id for w in located} == {ray.get_runtime_context().get_node_id()}  # one node here
                assert all(w.node_ip == ray.util.get_node_ip_address() and w.device == "cpu" for w in located)
                main(["workers", "--server", server.address])
                assert f"    0       1  {located[1].node_id[:16]}" in capsys.readouterr().out
                main(["scale", "--server", server.address, "--stage", "0", "--replicas", "1"])
                assert "replicas per stage: [1, 1, 1, 1]" in capsys.readouterr().out
                in_flight.join(timeout=120)
                assert result["tokens"] == expected
                with pytest.raises(grpc.RpcError) as err:
                    client.scale_stage(7, 1)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "stage=7" in err.value.details()
                with pytest.raises(grpc.RpcError) as err:
                    client.scale_stage(1, 0)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "replicas=0" in err.value.details()
                assert list(client.generate(token_ids=ids(1), max_new_tokens=24).token_ids) == expected
        finally:
            server.stop(0)


def test_an_in_process_model_lists_its_workers_in_the_server_process(tiny_dir):
    import os

    server = Server(PoEModel.from_pretrained(tiny_dir), load_tokenizer(tiny_dir), port=0)
    try:
        with PoEClient(server.address, timeout=60) as client:
            located = client.list_workers()
        assert [(w.stage, w.node_id, w.device, w.pid) for w in located] == [
            (k, "in-process", "cpu", os.getpid()) for k in range(4)]
    finally:
        server.stop(0)


def test_scaling_an_in_process_model_is_refused(tiny_dir):
    server = Server(PoEModel.from_pretrained(tiny_dir), load_tokenizer(tiny_dir), port=0)
    try:
        with PoEClient(server.address, timeout=60) as client:
            with pytest.raises(grpc.RpcError) as err:
                client.scale_stage(0, 2)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "Ray" in err.value.details()
    finally:
        server.stop(0)
