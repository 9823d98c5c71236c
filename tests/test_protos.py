"""The committed gRPC stubs are what `python -m protos.regenerate` makes from the .proto today."""

from __future__ import annotations

import re

from protos.regenerate import ROOT, generate

# generator version stamps differ between grpcio-tools releases without changing the API
VERSION_STAMPS = re.compile(
    r"# Protobuf Python Version: .*\n"
    r"|_runtime_version\.ValidateProtobufRuntimeVersion\([^)]*\)\n"
    r"|GRPC_GENERATED_VERSION = .*\n"
)


def normalized(text: str) -> str:
    return VERSION_STAMPS.sub("", text)


def test_committed_stubs_are_current(tmp_path):
    fresh = generate(tmp_path)
    assert [p.name for p in fresh] == ["poe_serving_pb2.py", "poe_serving_pb2.pyi", "poe_serving_pb2_grpc.py"]
    for path in fresh:
        committed = (ROOT / "protos" / path.name).read_text()
        assert normalized(committed) == normalized(path.read_text()), (
            f"protos/{path.name} is stale: run `python -m protos.regenerate` and commit the result")


def test_the_wire_contract_names_are_there():
    from protos import poe_serving_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["PoEServing"]
    assert service.full_name == "poe.v1.PoEServing"
    assert {m.name for m in service.methods} >= {"Generate", "GenerateStream", "Score", "GetModelInfo"}
    request = pb.GenerateRequest.DESCRIPTOR
    assert [f.name for f in request.oneofs_by_name["input"].fields] == ["prompt", "token_ids"]
    assert [f.name for f in request.oneofs_by_name["mode"].fields] == [
        "full", "prefix", "stage", "wand", "speculative", "composition"]
    assert {"max_new_tokens", "sampling", "stop_token_ids"} <= set(request.fields_by_name)
    assert {"token_ids", "text", "stages_used", "acceptance_rate", "finish_reason"} <= set(
        pb.GenerateResponse.DESCRIPTOR.fields_by_name)
    assert {"token_logprobs", "bits_per_byte"} <= set(pb.ScoreResponse.DESCRIPTOR.fields_by_name)
