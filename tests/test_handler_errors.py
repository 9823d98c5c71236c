"""Unexpected exceptions in handlers: the client gets INTERNAL naming a request id, the log gets the rest.

Faults are injected where a handler calls into the serving code (the reply builders, the model
info, the engine's step), on a real server over the in-process tiny model. The exception's text
must reach the log under the id the client was given, never the client; the server keeps serving.
"""

from __future__ import annotations

import logging
import re

import grpc
import pytest

from coordinator import PoEModel, load_tokenizer
from coordinator.grpc_api import wire
from coordinator.grpc_api.server import Server
from tools.client import PoEClient

SECRET = "secret detail /etc/model-path 42"


@pytest.fixture(scope="module")
def served(tiny_dir):
    model = PoEModel.from_pretrained(tiny_dir)
    server = Server(model, load_tokenizer(tiny_dir), port=0)
    with PoEClient(server.address, timeout=60) as client:
        yield model, client
    server.stop(0)


def boom(*_args, **_kwargs):
    raise RuntimeError(SECRET)


def break_engine_update(model, monkeypatch):
    monkeypatch.setattr(model.engine, "update", boom)  # inside a step: that step's sequences fail


FAULTS = {
    "Generate reply": (lambda m, mp: mp.setattr(wire, "generate_response", boom),
                       lambda c: c.generate(token_ids=[1, 2, 3], max_new_tokens=3)),
    "GenerateStream text": (lambda m, mp: mp.setattr(wire.TextStream, "push", boom),
                            lambda c: list(c.stream(token_ids=[1, 2, 3], max_new_tokens=3))),
    "Score reply": (lambda m, mp: mp.setattr(wire, "score_response", boom),
                    lambda c: c.score(token_ids=[1, 2, 3])),
    "GetModelInfo": (lambda m, mp: mp.setattr(m, "replica_infos", boom), lambda c: c.model_info()),
    "engine step": (break_engine_update, lambda c: c.generate(token_ids=[1, 2, 3], max_new_tokens=3)),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_an_unexpected_exception_is_internal_with_a_request_id_and_only_the_log_has_its_text(
        served, monkeypatch, caplog, fault):
    model, client = served
    expected = model.generate([[1, 2, 3]], 3)[0, 3:].tolist()
    inject, call = FAULTS[fault]
    with monkeypatch.context() as patch:
        inject(model, patch)
        with caplog.at_level(logging.ERROR, logger="poe_serve.server"), pytest.raises(grpc.RpcError) as err:
            call(client)
    assert err.value.code() == grpc.StatusCode.INTERNAL, err.value.details()
    found = re.search(r"request id ([0-9a-f]{16})", err.value.details())
    assert found and SECRET not in err.value.details() and "RuntimeError" not in err.value.details()
    logged = [r for r in caplog.records if found.group(1) in r.getMessage()]
    assert len(logged) == 1 and SECRET in logged[0].getMessage() and logged[0].exc_info is not None
    assert list(client.generate(token_ids=[1, 2, 3], max_new_tokens=3).token_ids) == expected


def test_each_failure_gets_its_own_request_id(served, monkeypatch):
    _, client = served
    monkeypatch.setattr(wire, "generate_response", boom)
    ids = set()
    for _ in range(3):
        with pytest.raises(grpc.RpcError) as err:
            client.generate(token_ids=[1, 2], max_new_tokens=2)
        ids.add(re.search(r"request id ([0-9a-f]+)", err.value.details()).group(1))
    assert len(ids) == 3
