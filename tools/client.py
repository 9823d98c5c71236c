"""A small Python client for the PoEServing gRPC API.

`PoEClient(address).generate(prompt, mode="wand", ...)` builds the request message from plain
arguments (the same names as the local Python API) and returns the response message. It knows
the wire format, not the model.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import poe_serving_pb2 as pb
from protos import poe_serving_pb2_grpc as pb_grpc


def build_request(prompt: str | None = None, token_ids: list[int] | None = None, max_new_tokens: int = 16,
                  mode: str = "full", max_stages: int | None = None, stage: int | None = None,
                  stages: list[int] | None = None, stage_weights: list[float] | None = None,
                  safety: float = 1.0, p99_bounds: list[float] | None = None, draft_stage: int = 0,
                  k_draft: int = 3, temperature: float | None = None, top_k: int | None = None,
                  top_p: float | None = None, seed: int | None = None,
                  stop_token_ids: list[int] | None = None) -> pb.GenerateRequest:
    request = pb.GenerateRequest(max_new_tokens=max_new_tokens, stop_token_ids=stop_token_ids or [])
    if token_ids is not None:
        request.token_ids.ids.extend(token_ids)
    else:
        request.prompt = prompt or ""
    if mode == "full":
        request.full.SetInParent()
    elif mode == "prefix":
        request.prefix.max_stages = max_stages or 0
    elif mode == "stage":
        request.stage.stage = stage or 0
    elif mode == "wand":
        request.wand.safety = safety
        request.wand.p99_bounds.extend(p99_bounds or [])
    elif mode == "speculative":
        request.speculative.draft_stage, request.speculative.k_draft = draft_stage, k_draft
    elif mode == "composition":
        request.composition.stages.extend(stages or [])
        request.composition.stage_weights.extend(stage_weights or [])
    else:
        raise ValueError(f"mode={mode!r}; allowed: full, prefix, stage, wand, speculative, composition")
    if temperature:
        request.sampling.temperature = temperature
        request.sampling.top_k = top_k or 0
        request.sampling.top_p = top_p or 0.0
        if seed is not None:
            request.sampling.seed = seed
    return request


class PoEClient:
    def __init__(self, address: str, timeout: float = 300.0, token: str | None = None,
                 credentials: grpc.ChannelCredentials | None = None):
        """`token`: sent as a bearer token; `credentials`: TLS (see coordinator.serving.security.client_credentials)."""
        options = [("grpc.max_receive_message_length", 64 << 20)]
        metadata = [("authorization", f"Bearer {token}")] if token else None
        self.channel = (grpc.secure_channel(address, credentials, options) if credentials
                        else grpc.insecure_channel(address, options))
        self.stub = pb_grpc.PoEServingStub(self.channel)
        self.admin = pb_grpc.PoEAdminStub(self.channel)
        self.timeout, self.metadata = timeout, metadata

    def generate(self, prompt: str | None = None, **kwargs) -> pb.GenerateResponse:
        return self.stub.Generate(build_request(prompt, **kwargs), timeout=self.timeout, metadata=self.metadata)

    def stream(self, prompt: str | None = None, **kwargs):
        return self.stub.GenerateStream(build_request(prompt, **kwargs), timeout=self.timeout, metadata=self.metadata)

    def score(self, prompt: str | None = None, token_ids: list[int] | None = None) -> pb.ScoreResponse:
        request = pb.ScoreRequest(token_ids=pb.TokenIds(ids=token_ids)) if token_ids is not None else pb.ScoreRequest(prompt=prompt)
        return self.stub.Score(request, timeout=self.timeout, metadata=self.metadata)

    def model_info(self) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout, metadata=self.metadata)

    def scale_stage(self, stage: int, replicas: int) -> list[int]:
        """Serve `stage` with `replicas` workers; returns the workers per stage afterwards."""
        request = pb.ScaleStageRequest(stage=stage, replicas=replicas)
        return list(self.admin.ScaleStage(request, timeout=self.timeout, metadata=self.metadata).replicas)

    def health(self) -> str:
        stub = health_pb2_grpc.HealthStub(self.channel)
        status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=self.timeout, metadata=self.metadata)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(status.status)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "PoEClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
