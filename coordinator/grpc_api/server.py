"""The gRPC front: a thin `PoEServing` servicer over an `EngineLoop`, plus health and reflection.

Every RPC parses and validates its message (bytes that do not parse, a message over
its max_request_bytes, or bad arguments -> INVALID_ARGUMENT naming the field; only one over
TRANSPORT_LIMIT times that is RESOURCE_EXHAUSTED from gRPC itself, before any handler), submits to the shared engine loop (a full queue ->
RESOURCE_EXHAUSTED), and waits for its events. A client that goes away or runs out of deadline
has its sequence aborted, freeing its KV. Anything unexpected is INTERNAL with a request id
(coordinator/grpc_api/handler_errors.py). Health is SERVING only while the server admits requests, its
engine loop runs and no stage is down. The servicer knows messages and status codes; the
model behind it may be in-process or on Ray.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from coordinator.core import requests as rq
from coordinator.core.engine_loop import LIVENESS_POLL_S, EngineLoop, EngineLoopDown, QueueFull, RequestHandle
from coordinator.grpc_api import wire
from coordinator.grpc_api.admin import ADMIN_SERVICE_NAME, AdminServicer
from coordinator.grpc_api.handler_errors import InternalErrors, abort_internal
from coordinator.model import PoEModel
from coordinator.serving.drain import Drain
from coordinator.serving.readiness import not_ready
from coordinator.serving.security import ServerSecurity
from coordinator.serving_config import DEFAULT_MAX_REQUEST_BYTES
from coordinator.tokenizer import Tokenizer
from protos import poe_serving_pb2 as pb
from protos import poe_serving_pb2_grpc as pb_grpc
from stage_workers.messages import WorkerLost

log = logging.getLogger("poe_serve.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PoEServing"].full_name
REQUEST_TYPES = {m.name: getattr(pb, m.input_type.name) for m in pb.DESCRIPTOR.services_by_name["PoEServing"].methods}
TRANSPORT_LIMIT = 4  # gRPC's own limit, in request limits: larger is RESOURCE_EXHAUSTED before any handler
HANDLER_HEADROOM = 16  # handler threads beyond running + queued requests: health checks, quick refusals
FLUSH_GRACE_S = 1.0  # after a drain: the requests that finished send their last message; the rest are cancelled


def _status_of(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, QueueFull):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, (WorkerLost, EngineLoopDown)):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


def _abort(context, method: str, exc: BaseException) -> None:
    """End the RPC with exc's status; an unexpected error's text goes to the log, not the client."""
    code = _status_of(exc)
    if code == grpc.StatusCode.INTERNAL:
        abort_internal(context, method, exc)
    context.abort(code, f"{type(exc).__name__}: {exc}")


class PoEServicer(pb_grpc.PoEServingServicer):
    def __init__(self, model: PoEModel, tokenizer: Tokenizer, loop: EngineLoop, drain: Drain):
        self.model, self.tokenizer, self.loop, self.drain = model, tokenizer, loop, drain
        self.config = model.config

    # ---- helpers ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _admitted(self, context):
        """The request counts as in flight while the block runs; refused (UNAVAILABLE) while draining."""
        if not self.drain.enter():
            context.abort(grpc.StatusCode.UNAVAILABLE,
                          "the server is shutting down and takes no new requests; retry on another replica")
        try:
            yield
        finally:
            self.drain.leave()

    def _submit(self, request, context, method: str) -> RequestHandle:
        try:
            handle = self.loop.submit(request)
        except (QueueFull, EngineLoopDown) as exc:
            _abort(context, method, exc)
        if not context.add_callback(lambda: self.loop.abort(handle)):  # client gone or deadline passed
            self.loop.abort(handle)  # it already went: no callback will come
        return handle

    def _events(self, handle: RequestHandle, context, method: str):
        """Yield events until done; abort the RPC with the mapped status on error. Every wait is
        short: a client that left while the loop was busy frees this thread at once."""
        while True:
            try:
                event = handle.next_event(timeout=LIVENESS_POLL_S)
            except TimeoutError:
                if not context.is_active():  # its abort is queued for the loop (add_callback)
                    context.abort(grpc.StatusCode.CANCELLED, "cancelled: the client went away or its deadline passed")
                continue
            except EngineLoopDown as exc:
                _abort(context, method, exc)
            if event.error is not None:
                _abort(context, method, event.error)
            if event.done and handle.cancelled:  # the client is gone; nothing to answer
                context.abort(grpc.StatusCode.CANCELLED, "cancelled: the client went away or its deadline passed")
            yield event
            if event.done:
                return

    def _parse(self, fn, context, *args):
        try:
            return fn(*args)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    # ---- RPCs ------------------------------------------------------------------------------
    def Generate(self, request, context):
        with self._admitted(context):
            req = self._parse(wire.generation_request, context, request, self.tokenizer, self.config)
            handle = self._submit(req, context, "Generate")
            for _ in self._events(handle, context, "Generate"):
                pass
        seq = handle.seq
        done = time.perf_counter()
        ttft = (handle.first_token_at or done) - handle.submitted_at
        return wire.generate_response(seq, self.tokenizer, ttft, done - handle.submitted_at)

    def GenerateStream(self, request, context):
        with self._admitted(context):
            req = self._parse(wire.generation_request, context, request, self.tokenizer, self.config)
            handle = self._submit(req, context, "GenerateStream")
            text = wire.TextStream(self.tokenizer)
            for event in self._events(handle, context, "GenerateStream"):
                chunk = pb.GenerateChunk(token_ids=event.tokens, text=text.push(event.tokens, event.done),
                                         stages_used=event.stages_used,
                                         logprobs=wire.token_logprobs(event.tokens, event.logprobs, event.top_logprobs))
                if event.done:
                    chunk.finish_reason = handle.seq.finish_reason
                    chunk.acceptance_rate = wire.acceptance(handle.seq)
                    chunk.prompt_tokens, chunk.cached_tokens = handle.seq.num_prompt, handle.seq.num_cached_tokens
                if event.tokens or event.done:
                    yield chunk

    def Score(self, request, context):
        with self._admitted(context):
            ids = self._parse(wire.input_ids, context, request, self.tokenizer, self.config)
            if len(ids) < 2:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "input: scoring needs at least 2 tokens")
            stages = tuple(range(self.config.num_stages))
            handle = self._submit(rq.ScoreRequest(tuple(ids), stages), context, "Score")
            for _ in self._events(handle, context, "Score"):
                pass
        return wire.score_response(ids, handle.seq.decoder.logprobs, self.tokenizer,
                                   count_bytes=request.WhichOneof("input") == "prompt")

    def Tokenize(self, request, context):
        add_special = request.add_special_tokens if request.HasField("add_special_tokens") else True
        ids = self.tokenizer.encode(request.text, add_special_tokens=add_special)
        return pb.TokenizeResponse(token_ids=ids, max_model_len=self.config.sequence_len,
                                   token_strs=self.tokenizer.token_texts(ids) if request.return_token_strs else [])

    def Detokenize(self, request, context):
        ids = self._parse(rq.check_token_ids, context, self.config, request.token_ids, "token_ids")
        return pb.DetokenizeResponse(text=self.tokenizer.decode(ids, skip_special_tokens=False))

    def GetModelInfo(self, request, context):
        c = self.config
        workers = [
            pb.WorkerPlacement(stage=w.stage, replica=r, first_layer=w.layers[0], last_layer=w.layers[1],
                               device=w.device, dtype=w.dtype, parameters=w.num_parameters,
                               resident_bytes=w.resident_bytes, kv_cache_tokens=w.kv_num_blocks * w.kv_block_size)
            for r, w in self.model.replica_infos()
        ]
        return pb.ModelInfo(stage_layout=c.poe_stage_layout, boundary_layers=c.stage_boundaries,
                            vocab_size=c.vocab_size, context_length=c.sequence_len,
                            parameter_count=c.num_parameters(), workers=workers, poe_alpha=c.poe_alpha,
                            wand_p99_bounds=c.wand_p99_bounds or ())


class ParseRequests(grpc.ServerInterceptor):
    """PoEServing requests are parsed here, not by gRPC, so that bytes which do not parse (a
    prompt that is not UTF-8) or more than `max_bytes` of them are INVALID_ARGUMENT naming the
    field rather than INTERNAL or RESOURCE_EXHAUSTED."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        service, _, method = handler_call_details.method.strip("/").partition("/")
        if handler is None or handler.request_deserializer is None or service != SERVICE_NAME:
            return handler
        assert not handler.request_streaming, f"{method}: streaming requests are not parsed here"
        parse = functools.partial(wire.parse_request, REQUEST_TYPES[method], max_bytes=self.max_bytes)

        def checked(behaviour):
            def run(request, context):
                if isinstance(request, wire.MalformedRequest):
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
                return behaviour(request, context)
            return run

        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(checked(handler.unary_stream), parse,
                                                        handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(checked(handler.unary_unary), parse, handler.response_serializer)


class Server:
    """A running gRPC server over a model; `drain()` lets the requests in flight finish, `stop()` does not."""

    def __init__(self, model: PoEModel, tokenizer: Tokenizer, host: str = "127.0.0.1", port: int = 50051,
                 max_workers: int | None = None, max_queue: int = 256, security: ServerSecurity = ServerSecurity(),
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES):
        self.model, self.loop = model, model.loop
        self.loop.max_queue = max_queue
        self.admission = Drain()
        # A generation holds its handler thread until it ends, so the pool covers the running batch,
        # the queue and some room (health checks, refusals); past it gRPC answers RESOURCE_EXHAUSTED
        # rather than holding calls in an unbounded backlog that health checks would wait behind.
        max_workers = max_workers or model.engine.engine_config.max_num_seqs + max_queue + HANDLER_HEADROOM
        options = [("grpc.max_receive_message_length", TRANSPORT_LIMIT * max_request_bytes),
                   ("grpc.max_send_message_length", 64 << 20)]
        self.grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=options,
                                interceptors=[*security.interceptors(), InternalErrors(), ParseRequests(max_request_bytes)],
                                maximum_concurrent_rpcs=max_workers)
        pb_grpc.add_PoEServingServicer_to_server(PoEServicer(model, tokenizer, self.loop, self.admission), self.grpc)
        pb_grpc.add_PoEAdminServicer_to_server(AdminServicer(model), self.grpc)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, ADMIN_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc)
        credentials = security.credentials()
        if credentials is None:
            self.port = self.grpc.add_insecure_port(f"{host}:{port}")
        else:
            self.port = self.grpc.add_secure_port(f"{host}:{port}", credentials)
        if self.port == 0:
            raise OSError(f"cannot bind {host}:{port}")
        self.address = f"{host}:{self.port}"
        self._health_lock = threading.Lock()
        self._not_ready: str | None = None  # the reason last reported, to log each change once
        self.grpc.start()
        self.loop.listeners.append(self.update_health)  # the loop died, or a stage went down
        self.update_health()

    def readiness_problem(self) -> str | None:
        """Why the server is not ready (health NOT_SERVING), or None when it serves every request."""
        return not_ready(self.admission.draining, self.loop, self.model)

    def update_health(self) -> None:
        """Set the health of the PoEServing service and of the server ("") from readiness_problem()."""
        with self._health_lock:
            problem = self.readiness_problem()
            if problem != self._not_ready:
                if problem:
                    log.warning("health: NOT_SERVING (%s)", problem)
                else:
                    log.info("health: SERVING")
                self._not_ready = problem
            status = health_pb2.HealthCheckResponse.NOT_SERVING if problem else health_pb2.HealthCheckResponse.SERVING
            for name in ("", SERVICE_NAME):
                self.health.set(name, status)

    def drain(self, deadline: float) -> int:
        """Stop admitting (health NOT_SERVING at once, new requests UNAVAILABLE), let the requests in
        flight finish until `deadline` (time.monotonic()), then stop, cancelling the rest.
        Returns how many were still running at the deadline. A handler that returned may not have
        sent its last message and status yet: those get FLUSH_GRACE_S before the stop cancels."""
        self.admission.start()
        self.update_health()
        left = self.admission.wait(deadline)
        self.stop(FLUSH_GRACE_S)
        return left

    def stop(self, grace: float = 5.0) -> None:
        """Stop now: requests still running after `grace` seconds are cancelled (their KV freed)."""
        self.admission.start()
        if self.update_health in self.loop.listeners:
            self.loop.listeners.remove(self.update_health)
        self.update_health()
        self.grpc.stop(grace).wait()
