"""Readiness and drain of the gRPC server, over a fresh in-process tiny model each time.

Health (the server's "" and PoEServing) is SERVING only while the server admits requests, its
engine loop runs and every stage has a worker. A stage whose lost worker was not restarted, an
engine loop that died and a drain each turn it NOT_SERVING, as seen by a gRPC health client.
While draining, new requests are UNAVAILABLE and those in flight finish (up to the deadline).
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator import PoEModel, load_tokenizer
from coordinator.grpc_api.server import SERVICE_NAME, Server
from stage_workers.messages import WorkerLost
from tools.client import PoEClient

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def served(tiny_dir):
    model = PoEModel.from_pretrained(tiny_dir)
    server = Server(model, load_tokenizer(tiny_dir), port=0)
    with PoEClient(server.address, timeout=30) as client:
        yield model, server, client
    server.stop(0)
    model.loop.stop()


def health(client: PoEClient) -> list[int]:
    """The status of the server ("") and of the PoEServing service."""
    stub = health_pb2_grpc.HealthStub(client.channel)
    return [stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status for name in ("", SERVICE_NAME)]


def lose_worker_for_good(model: PoEModel, stage: int) -> None:
    """The stage's worker reports itself lost with no restart left, once (it then computes again)."""
    worker = model.workers[stage]
    real = worker.extend

    def lost(batch):
        worker.extend = real
        raise WorkerLost(stage, "injected: no restarts left", restarted=False)

    worker.extend = lost


def test_a_stage_down_turns_health_not_serving(served):
    model, _, client = served
    expected = client.generate(token_ids=[1, 2, 3], max_new_tokens=4).token_ids
    assert health(client) == [SERVING, SERVING]
    lose_worker_for_good(model, 2)
    with pytest.raises(grpc.RpcError) as lost:  # the stage has no worker left: requests that need it fail
        client.generate(token_ids=[1, 2, 3], max_new_tokens=4)
    assert lost.value.code() == grpc.StatusCode.UNAVAILABLE and "stage 2" in lost.value.details()
    assert model.stages_down() == [2]
    assert health(client) == [NOT_SERVING, NOT_SERVING]
    assert expected


def test_an_engine_loop_that_died_turns_health_not_serving_and_requests_unavailable(served, monkeypatch):
    model, _, client = served
    reached = threading.Event()

    def broken_schedule():
        reached.set()
        time.sleep(0.3)  # the request below is in flight when the loop dies
        raise RuntimeError("injected")

    monkeypatch.setattr(model.engine, "schedule", broken_schedule)
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as in_flight:
        client.generate(token_ids=[1, 2, 3], max_new_tokens=4)
    assert reached.is_set() and time.monotonic() - t0 < 5
    assert in_flight.value.code() == grpc.StatusCode.UNAVAILABLE and "engine loop" in in_flight.value.details()
    assert health(client) == [NOT_SERVING, NOT_SERVING]
    with pytest.raises(grpc.RpcError) as later:
        list(client.stream(token_ids=[1, 2, 3], max_new_tokens=4))
    assert later.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_drain_refuses_new_requests_and_lets_those_in_flight_finish(served, tiny_model):
    model, server, client = served
    expected = tiny_model.generate([[4, 5, 6]], 60)[0, 3:].tolist()
    stream = client.stream(token_ids=[4, 5, 6], max_new_tokens=60)
    first = next(stream)  # in flight
    left: list[int] = []
    drainer = threading.Thread(target=lambda: left.append(server.drain(time.monotonic() + 60)))
    drainer.start()
    while not server.admission.draining:
        time.sleep(0.001)
    assert health(client) == [NOT_SERVING, NOT_SERVING]
    with pytest.raises(grpc.RpcError) as refused:
        client.generate(token_ids=[1, 2, 3], max_new_tokens=2)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in refused.value.details()
    chunks = [first, *stream]
    assert [t for c in chunks for t in c.token_ids] == expected and chunks[-1].finish_reason == "length"
    drainer.join(30)
    assert left == [0]


def test_a_drain_cancels_what_is_still_running_at_its_deadline(served):
    model, server, client = served
    stream = client.stream(token_ids=[4, 5, 6], max_new_tokens=240)
    next(stream)
    # the engine loop is held past the drain's deadline and grace: the stream cannot end first, on any machine
    threading.Thread(target=model.loop.call_in_loop, args=(lambda: time.sleep(2.5),), daemon=True).start()
    t0 = time.monotonic()
    assert server.drain(t0 + 0.5) == 1
    assert time.monotonic() - t0 < 5
    with pytest.raises(grpc.RpcError):
        list(stream)
    deadline = time.monotonic() + 5
    while model.engine.has_work():  # the cancelled sequence leaves the engine, its KV freed
        assert time.monotonic() < deadline, "the cancelled request is still in the engine"
        time.sleep(0.01)
