"""A small Python client for the PoEServing gRPC API.

`PoEClient(address).generate(prompt, mode="wand", ...)` builds the request message from plain
arguments (the names of the mode table, coordinator/core/modes.py, as the local Python API
uses them) and returns the response message. It knows the wire format, not the model.
"""

from __future__ import annotations

import json

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.core.modes import MODES
from protos import poe_serving_pb2 as pb
from protos import poe_serving_pb2_grpc as pb_grpc


def build_request(prompt: str | None = None, token_ids: list[int] | None = None, max_new_tokens: int = 16,
                  mode: str = "full", temperature: float | None = None, top_k: int | None = None,
                  top_p: float | None = None, seed: int | None = None, stop_token_ids: list[int] | None = None,
                  min_p: float | None = None, repetition_penalty: float | None = None, presence_penalty: float = 0.0,
                  frequency_penalty: float = 0.0, logit_bias: dict[int, float] | None = None, min_tokens: int = 0,
                  logprobs: int | None = None, structured_outputs: dict | None = None, cache_salt: str | None = None,
                  **mode_args) -> pb.GenerateRequest:
    """`mode_args`: the mode's arguments by name (coordinator/core/modes.py MODES: max_stages,
    stage, stages, stage_weights, safety, p99_bounds, draft_stage, k_draft); None is unset."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; allowed: {', '.join(MODES)}")
    MODES[mode].check_names(mode_args)
    request = pb.GenerateRequest(max_new_tokens=max_new_tokens, stop_token_ids=stop_token_ids or [])
    controls = pb.DecodingControls(presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                                   logit_bias=logit_bias or {}, min_tokens=min_tokens)
    if repetition_penalty is not None:
        controls.repetition_penalty = repetition_penalty
    if controls.ListFields():
        request.controls.CopyFrom(controls)
    if logprobs is not None:
        request.logprobs = logprobs
    if cache_salt is not None:
        request.cache_salt = cache_salt
    if structured_outputs is not None:  # {kind: value}, as PoEModel takes it; a json schema may be a dict
        so = request.structured_outputs
        so.SetInParent()
        for kind, value in structured_outputs.items():
            if kind == "choice":
                so.choice.extend(value)
            elif kind == "json_object":
                so.json_object = bool(value)
            else:
                setattr(so, kind, value if isinstance(value, str) else json.dumps(value))
    if token_ids is not None:
        request.token_ids.ids.extend(token_ids)
    else:
        request.prompt = prompt or ""
    fields = getattr(request, mode)
    fields.SetInParent()
    for arg in MODES[mode].args:
        value = mode_args.get(arg.name)
        if value is None:
            continue
        if arg.many:
            getattr(fields, arg.name).extend(value)
        else:
            setattr(fields, arg.name, value)
    if temperature:
        request.sampling.temperature = temperature
        request.sampling.top_k = top_k or 0
        request.sampling.top_p = top_p or 0.0
        request.sampling.min_p = min_p or 0.0
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

    def tokenize(self, text: str, add_special_tokens: bool = True, return_token_strs: bool = False
                 ) -> pb.TokenizeResponse:
        request = pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens,
                                     return_token_strs=return_token_strs)
        return self.stub.Tokenize(request, timeout=self.timeout, metadata=self.metadata)

    def detokenize(self, token_ids: list[int]) -> str:
        request = pb.DetokenizeRequest(token_ids=token_ids)
        return self.stub.Detokenize(request, timeout=self.timeout, metadata=self.metadata).text

    def model_info(self) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout, metadata=self.metadata)

    def scale_stage(self, stage: int, replicas: int) -> list[int]:
        """Serve `stage` with `replicas` workers; returns the workers per stage afterwards."""
        request = pb.ScaleStageRequest(stage=stage, replicas=replicas)
        return list(self.admin.ScaleStage(request, timeout=self.timeout, metadata=self.metadata).replicas)

    def list_workers(self) -> list[pb.WorkerLocation]:
        """Where every stage worker runs (stage, replica, node id and address, device, pid)."""
        request = pb.ListWorkersRequest()
        return list(self.admin.ListWorkers(request, timeout=self.timeout, metadata=self.metadata).workers)

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
