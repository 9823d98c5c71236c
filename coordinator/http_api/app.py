"""The OpenAI-compatible HTTP front: a thin FastAPI app over the `EngineLoop`, served by uvicorn.

Routes: `POST /v1/completions` (whole, or streamed as server-sent events by sse-starlette),
`GET /v1/models`, `POST /tokenize` and `/detokenize` (vLLM's), `/health` (liveness: the engine loop has not died), `/ready` (readiness: not
draining, the engine loop runs and no stage is down) and `/metrics` (Prometheus,
coordinator/serving/metrics.py). The probes answer without the bearer token, as vLLM's /health does: a
Kubernetes probe cannot read a Secret. A completion counts as in flight in the server's `Drain`
(shared with gRPC) until its last byte is sent; once the drain started, new ones are 503. A
completion is validated at the boundary (schema.py's pydantic models, then the gRPC checks
through wire.py), submitted to the shared engine loop as one sequence per choice, and its
events become JSON as they come. A client that goes away has its sequences aborted, freeing its
KV, as gRPC does. Errors are OpenAI's JSON shape: 400 naming the field, 401, 404, 429 (queue
full), 503 (a lost worker, not ready, draining). `prompt_logprobs` is the one place the front
reads model scores. The front knows requests and events, not how the engine computes them.
"""

from __future__ import annotations

import hmac
import json
import math
import socket
import ssl
import threading
import time
import uuid
from dataclasses import dataclass
from functools import partial

import anyio
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException

from coordinator.core import requests as rq
from coordinator.core.engine_loop import EngineLoop, Event, QueueFull, RequestHandle
from coordinator.core.modes import MODES
from coordinator.grpc_api import wire
from coordinator.http_api.schema import (
    Completion,
    CompletionChoice,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    TokenizeRequest,
    TokenizeResponse,
    Usage,
)
from coordinator.http_api.wire import (
    BadRequest,
    ChoiceText,
    CompletionPlan,
    checked,
    completion_plan,
    from_validation_errors,
    logprobs_of,
    score_stages,
)
from coordinator.serving.drain import Drain
from coordinator.serving.metrics import Metrics
from coordinator.serving.readiness import not_ready
from coordinator.serving.security import ServerSecurity
from coordinator.serving_config import DEFAULT_MAX_REQUEST_BYTES
from coordinator.tokenizer import Tokenizer
from stage_workers.messages import WorkerLost

THREAD_HEADROOM = 16  # event-reading threads beyond running + queued sequences
PROBE_PATHS = ("/health", "/ready")  # answered without the bearer token
ADMITTED_PATHS = ("/v1/completions",)  # counted in flight by the drain, refused once it started


def prompt_logprobs(loop: EngineLoop, ids: list[int], top_n: int, mode: rq.Mode
                    ) -> tuple[list[float | None], list[dict[int, float] | None]]:
    """The log p of each token of a prompt given those before it, under the mode's Log-OP
    (score_stages), and each position's `top_n` most likely tokens with theirs; position 0 has
    no context (None). Blocks until scored.

    The front's one use of model scores (echo: generated tokens' log-probs come with their
    decisions). The deepest stage's worker computes these numbers (a `ScoreRequest`, as gRPC's
    Score); no vocabulary-sized tensor comes back."""
    if len(ids) < 2:
        return [None] * len(ids), [None] * len(ids)
    stages, weights = score_stages(mode, loop.engine.config.num_stages)
    decoder = loop.submit(rq.ScoreRequest(tuple(ids), stages, top_n, weights)).result().decoder
    top = [dict(alternatives) for alternatives in decoder.top[: len(ids) - 1]]
    return [None, *decoder.logprobs[: len(ids) - 1]], [None, *top]


# ---- errors ------------------------------------------------------------------------------------
class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": self.body()}, self.status, headers)

    def body(self) -> dict:
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}


def bad_request(exc: BadRequest) -> ApiError:
    return ApiError(400, str(exc), "invalid_request_error", exc.param)


def api_error(exc: BaseException, param: str | None = None) -> ApiError:
    """The answer to an error a request met in the engine (`param`: the field a ValueError is about)."""
    if isinstance(exc, ValueError):
        return ApiError(400, str(exc), "invalid_request_error", param)
    if isinstance(exc, QueueFull):
        return ApiError(429, str(exc), "rate_limit_error", code="queue_full")
    if isinstance(exc, WorkerLost):
        return ApiError(503, str(exc), "service_unavailable", code="worker_lost")
    return ApiError(500, f"{type(exc).__name__}: {exc}", "server_error")


class BearerToken:
    """ASGI middleware: every route but the probes needs `Authorization: Bearer <token>` (compared
    in constant time), checked before the body is read, as the gRPC interceptor does for every RPC."""

    def __init__(self, app, token: str):
        self.app, self.expected = app, f"Bearer {token}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in PROBE_PATHS:
            sent = dict(scope["headers"]).get(b"authorization")
            if sent is None or not hmac.compare_digest(sent, self.expected):
                error = ApiError(401, "missing 'Authorization: Bearer <token>' header" if sent is None else
                                 "invalid bearer token", "authentication_error", code="invalid_api_key")
                return await error.response({"WWW-Authenticate": "Bearer"})(scope, receive, send)
        await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` is refused (413) before it is parsed or
    tokenized: by its Content-Length when given, else once the chunks read so far pass it (the
    body is read here, at most `max_bytes` of it, then handed on)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(f"{int(length):,} bytes")(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size, more = size + len(chunks[-1]), message.get("more_body", False)
            if size > self.max_bytes:
                return await self._refuse(f"more than {self.max_bytes:,} bytes")(scope, receive, send)
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: a disconnect, when it comes
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _refuse(self, size: str) -> JSONResponse:
        return ApiError(413, f"request body: {size}; allowed: at most {self.max_bytes:,} "
                        "(max_request_bytes in the serving config)", "invalid_request_error",
                        code="request_too_large").response()


class Admission:
    """ASGI middleware: a completion counts in `drain` from its first byte in to its last byte out
    (a stream's included), so a drain waits for it; once the drain started, new ones are 503."""

    def __init__(self, app, drain: Drain):
        self.app, self.drain = app, drain

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in ADMITTED_PATHS:
            return await self.app(scope, receive, send)
        if not self.drain.enter():
            refused = ApiError(503, "draining: the server is shutting down and takes no new requests; "
                               "retry on another replica", "service_unavailable", code="draining")
            return await refused.response()(scope, receive, send)
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.leave()


# ---- completions -------------------------------------------------------------------------------
@dataclass
class _Choice:
    index: int
    handle: RequestHandle | None  # None: nothing to generate (max_tokens=0)
    text: ChoiceText
    finish_reason: str | None = None  # "stop" | "length" once ended
    ended: bool = False  # no more events will be read (the engine's last one came, or a stop string)
    error: BaseException | None = None
    started: bool = False  # a streamed chunk went out
    offset: int = 0  # a stream's text so far, in characters of the tokens' own texts (logprobs.text_offset)


class Front:
    """The routes' handlers over one model's engine loop."""

    def __init__(self, model, tokenizer: Tokenizer, model_name: str, metrics: Metrics, drain: Drain):
        self.model, self.loop, self.tokenizer, self.config = model, model.loop, tokenizer, model.config
        self.model_name, self.metrics, self.drain, self.created = model_name, metrics, drain, int(time.time())
        # A sequence's events are read by a thread blocked on its queue: room for the running batch and the queue
        self.limiter = anyio.CapacityLimiter(model.engine.engine_config.max_num_seqs + self.loop.max_queue
                                             + THREAD_HEADROOM)

    def not_ready(self) -> str | None:
        """Why new requests would not all be served, or None (coordinator/serving/readiness.py)."""
        return not_ready(self.drain.draining, self.loop, self.model)

    def check_ready(self) -> None:
        """503 unless ready (readiness)."""
        reason = self.not_ready()
        if reason is not None:
            raise ApiError(503, f"not ready: {reason}", "service_unavailable", code="not_ready")

    async def ready(self) -> dict:
        self.check_ready()
        return {"status": "ready"}

    async def health(self) -> dict:
        """200 unless the engine loop died or was stopped (liveness: only a new process helps). A
        stage down is not a liveness failure: Ray may bring it back, and readiness covers it."""
        failure = self.loop.failure()
        if failure is not None:
            raise ApiError(503, f"not live: {failure}", "service_unavailable", code="engine_loop_down")
        return {"status": "ok"}

    async def models(self) -> JSONResponse:
        card = ModelCard(id=self.model_name, created=self.created, max_model_len=self.config.sequence_len)
        return JSONResponse(ModelList(data=[card]).model_dump(mode="json"))

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ApiError(404, f"model={model!r} is not served; allowed: {self.model_name!r}",
                           "not_found_error", "model", "model_not_found")

    async def tokenize(self, body: TokenizeRequest) -> JSONResponse:
        self._check_model(body.model)
        ids = self.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        reply = TokenizeResponse(count=len(ids), max_model_len=self.config.sequence_len, tokens=ids,
                                 token_strs=self.tokenizer.token_texts(ids) if body.return_token_strs else None)
        return JSONResponse(reply.model_dump(mode="json"))

    async def detokenize(self, body: DetokenizeRequest) -> JSONResponse:
        self._check_model(body.model)
        ids = checked("tokens", rq.check_token_ids, self.config, body.tokens, "tokens")
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        return JSONResponse(DetokenizeResponse(prompt=text).model_dump(mode="json"))

    async def completions(self, body: CompletionRequest, request: Request):
        self.check_ready()
        self._check_model(body.model)
        plan = completion_plan(body, self.tokenizer, self.config, max_choices=self.loop.max_queue)
        choices = [_Choice(i, handle, ChoiceText(self.tokenizer, plan.stop), ended=handle is None,
                           finish_reason=None if handle else "length")
                   for i, handle in enumerate(self._submit(plan.requests))]
        head = dict(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=self.model_name)
        if body.stream:
            send, receive = anyio.create_memory_object_stream(math.inf)
            return EventSourceResponse(receive, data_sender_callable=partial(
                self._stream, body, plan, choices, head, send))
        if await self._run(choices, self._apply, request):
            return Response(status_code=499)  # the client went away; nobody reads this
        for choice in choices:
            if choice.error is not None:  # a ValueError here: longer than a worker's KV cache holds
                raise api_error(choice.error, "max_tokens")
        completion = Completion(**head, choices=[await self._choice(body, plan, c) for c in choices],
                                usage=self._usage(plan, choices))
        return JSONResponse(completion.model_dump(mode="json"))

    def _submit(self, requests) -> list[RequestHandle | None]:
        handles = []
        try:
            for request in requests:
                handles.append(None if request is None else self.loop.submit(request))
        except QueueFull as exc:
            for handle in filter(None, handles):
                self.loop.abort(handle)
            raise api_error(exc) from None
        return handles

    def _apply(self, choice: _Choice, event: Event) -> tuple[list[int], str]:
        """Apply one event to its choice; returns the tokens kept and the text that may be sent."""
        if event.error is not None:
            choice.error, choice.ended = event.error, True
            return [], ""
        tokens, text = choice.text.push(event.tokens, final=event.done)
        if choice.text.stopped and not event.done:  # a stop string: end the sequence here, freeing its KV
            self.metrics.end_at_stop_string(choice.handle)
            self.loop.abort(choice.handle)
        if choice.text.stopped or event.done:
            stopped = choice.text.stopped or choice.handle.seq.finish_reason == "stop"
            choice.ended, choice.finish_reason = True, "stop" if stopped else "length"
        return tokens, text

    async def _run(self, choices: list[_Choice], on_event, request: Request | None) -> bool:
        """Feed each choice's events to on_event(choice, event) until every choice has ended or one
        failed. With `request`, a client that goes away ends the wait (returns True). Sequences
        still running when it returns (or is cancelled: sse-starlette's disconnect) are aborted."""
        gone = False

        async def watch_client(scope) -> None:
            nonlocal gone
            while (await request.receive())["type"] != "http.disconnect":
                pass
            gone = True
            scope.cancel()

        async def pump(choice: _Choice, scope) -> None:
            while not choice.ended:
                event = await anyio.to_thread.run_sync(choice.handle.events.get, abandon_on_cancel=True,
                                                       limiter=self.limiter)
                on_event(choice, event)
            if choice.error is not None:
                scope.cancel()  # the response fails as a whole: stop the other choices

        try:
            async with anyio.create_task_group() as group:
                if request is not None:
                    group.start_soon(watch_client, group.cancel_scope)
                async with anyio.create_task_group() as pumps:
                    for choice in choices:
                        if not choice.ended:
                            pumps.start_soon(pump, choice, group.cancel_scope)
                group.cancel_scope.cancel()  # every choice ended: stop watching the client
        finally:
            for choice in choices:
                if not choice.ended:
                    self.loop.abort(choice.handle)
        return gone

    async def _choice(self, body: CompletionRequest, plan: CompletionPlan, choice: _Choice) -> CompletionChoice:
        prompt, tokens, seq = plan.prompt_of(choice.index), choice.text.tokens, choice.handle and choice.handle.seq
        logprobs = None
        if body.logprobs is not None:
            unscored = [None] * len(prompt.ids)  # left out of the answer: no echo
            scores, top = await self._prompt_logprobs(body, plan, prompt.ids) if body.echo else (unscored, unscored)
            # the tokens a stop string left (none with max_tokens=0)
            generated = seq.logprobs[: len(tokens)] if seq else []
            alternatives = [dict(a) for a in seq.top_logprobs[: len(tokens)]] if seq else []
            logprobs = logprobs_of(self.tokenizer, [*prompt.ids, *tokens], [*scores, *generated], [*top, *alternatives],
                                   0 if body.echo else len(prompt.ids), body.return_tokens_as_token_ids)
        extras = self._extras(body, prompt.ids, tokens, seq.stages_used if seq else [], seq)
        return CompletionChoice(index=choice.index, text=(prompt.text if body.echo else "") + choice.text.text,
                                logprobs=logprobs, finish_reason=choice.finish_reason, **extras)

    async def _prompt_logprobs(self, body: CompletionRequest, plan: CompletionPlan, ids: tuple[int, ...]):
        """prompt_logprobs on a worker thread, its failure an API error."""
        try:
            return await anyio.to_thread.run_sync(prompt_logprobs, self.loop, list(ids), body.logprobs, plan.mode)
        except Exception as exc:  # a full queue, a lost worker, a sequence larger than the KV cache
            raise api_error(exc, "prompt") from None

    @staticmethod
    def _extras(body: CompletionRequest, prompt_ids, tokens: list[int], stages_used: list[int], ended_seq) -> dict:
        """The fields OpenAI does not have, where asked for (token ids) or meaningful (PoE modes);
        `prompt_ids` and `ended_seq` only where the prompt's ids and the acceptance rate belong."""
        extras = {}
        if body.return_token_ids:
            extras["token_ids"] = tokens
            if prompt_ids is not None:
                extras["prompt_token_ids"] = list(prompt_ids)
        statistic = MODES[body.poe_mode].statistic
        if statistic == "stages_used":
            extras["stages_used"] = stages_used[: len(tokens)]
        if statistic == "acceptance" and ended_seq is not None:
            extras["acceptance_rate"] = wire.acceptance(ended_seq)
        return extras

    @staticmethod
    def _usage(plan: CompletionPlan, choices: list[_Choice]) -> Usage:
        """Each prompt counted once; its cached tokens are its first choice's (the one that ran first)."""
        prompt = sum(len(p.ids) for p in plan.prompts)
        completion = sum(len(c.text.tokens) for c in choices)
        first = [c for c in choices if c.index % plan.n == 0]
        cached = sum(c.handle.seq.num_cached_tokens for c in first if c.handle is not None and c.handle.seq)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))

    async def _stream(self, body: CompletionRequest, plan: CompletionPlan, choices: list[_Choice], head: dict,
                      send) -> None:
        """Send each choice's chunks as its events come, then usage (if asked) and [DONE]."""
        def emit(choice: _Choice, tokens: list[int], text: str, event: Event | None) -> None:
            prompt, first = plan.prompt_of(choice.index), not choice.started
            if first and body.echo:
                text = prompt.text + text
            tokens_shown = (body.return_token_ids or body.logprobs is not None  # per token
                            or MODES[body.poe_mode].statistic == "stages_used")
            if not (text or choice.ended or tokens and tokens_shown):
                return
            logprobs = None
            if body.logprobs is not None:  # the prompt's first (echo), then these tokens'
                scores, top = prompt_scores[choice.index // plan.n] if first and body.echo else ([], [])
                ids, kept = [*(prompt.ids if scores else ()), *tokens], len(tokens)  # the event's tokens kept
                logprobs = logprobs_of(self.tokenizer, ids, [*scores, *event.logprobs[:kept]],
                                       [*top, *(dict(a) for a in event.top_logprobs[:kept])], 0,
                                       body.return_tokens_as_token_ids, choice.offset)
                choice.offset += sum(len(self.tokenizer.decode([t])) for t in ids)
            choice.started = True
            ended_seq = choice.handle.seq if choice.ended and choice.handle is not None else None
            extras = self._extras(body, prompt.ids if first else None, tokens, event.stages_used if event else [],
                                  ended_seq)
            chunk = CompletionChoice(index=choice.index, text=text, logprobs=logprobs,
                                     finish_reason=choice.finish_reason if choice.ended else None, **extras)
            send.send_nowait({"data": Completion(**head, choices=[chunk], usage=None).model_dump_json()})

        def on_event(choice: _Choice, event: Event) -> None:
            tokens, text = self._apply(choice, event)
            if choice.error is None:
                emit(choice, tokens, text, event)

        prompt_scores = [await self._prompt_logprobs(body, plan, p.ids) if body.echo and body.logprobs is not None
                         else ([], []) for p in plan.prompts]
        async with send:
            for choice in choices:
                if choice.ended:  # max_tokens=0: the echo alone
                    emit(choice, [], "", None)
            await self._run(choices, on_event, None)
            failed = next((c.error for c in choices if c.error is not None), None)
            if failed is not None:
                await send.send({"data": json.dumps({"error": api_error(failed).body()})})
            elif body.stream_options is not None and body.stream_options.include_usage:
                usage = Completion(**head, choices=[], usage=self._usage(plan, choices))
                await send.send({"data": usage.model_dump_json()})
            await send.send({"data": "[DONE]"})


# ---- the app and its server --------------------------------------------------------------------
def build_app(front: Front, metrics: Metrics, token: str | None, api: bool = True,
              max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> FastAPI:
    """The ASGI app: the OpenAI routes, health and readiness (with `api`), and /metrics; the
    completions admitted through `front.drain`, their bodies at most `max_request_bytes`."""
    app = FastAPI(title="poe-serve", openapi_url="/openapi.json" if api else None, docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def on_api_error(_request, exc: ApiError):
        return exc.response()

    @app.exception_handler(BadRequest)
    async def on_bad_request(_request, exc: BadRequest):
        return bad_request(exc).response()

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError):
        content_type = request.headers.get("content-type", "")
        if request.method == "POST" and not content_type.startswith("application/json"):
            sent = f"Content-Type {content_type!r}" if content_type else "no Content-Type"
            return bad_request(BadRequest(None, f"request body: sent with {sent}; allowed: a JSON object "
                                                "with 'Content-Type: application/json'")).response()
        return bad_request(from_validation_errors(exc.errors())).response()

    @app.exception_handler(HTTPException)
    async def on_http(_request, exc: HTTPException):  # unknown routes and methods; a body that is not text
        message = str(exc.detail)
        if exc.status_code == 400 and message == "There was an error parsing the body":
            message = "request body: not valid JSON text (UTF-8); allowed: a JSON object in UTF-8"
        return ApiError(exc.status_code, message, "invalid_request_error").response()

    @app.api_route("/v1/chat/completions", methods=["GET", "POST"])
    async def chat():
        raise ApiError(404, "/v1/chat/completions: this is a base model with no chat template; allowed: "
                       "POST /v1/completions with a prompt", "invalid_request_error", code="chat_not_supported")

    @app.exception_handler(Exception)
    async def on_bug(_request, exc: Exception):
        return api_error(exc).response()

    @app.get("/metrics")
    async def scrape():
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    if api:
        app.get("/health")(front.health)
        app.get("/ready")(front.ready)
        app.get("/v1/models")(front.models)
        app.post("/v1/completions", response_model=None)(front.completions)
        app.post("/tokenize", response_model=None)(front.tokenize)
        app.post("/detokenize", response_model=None)(front.detokenize)
    app.add_middleware(Admission, drain=front.drain)
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)
    if token:  # added last, so it runs first: no answer, not even 503, without the token
        app.add_middleware(BearerToken, token=token)
    return app


def _ssl_options(security: ServerSecurity) -> dict:
    """uvicorn's TLS settings from the gRPC flags: the same certificate, key and client CA."""
    if security.cert_file is None:
        return {}
    options = dict(ssl_certfile=security.cert_file, ssl_keyfile=security.key_file)
    if security.client_ca_file:
        options.update(ssl_ca_certs=security.client_ca_file, ssl_cert_reqs=ssl.CERT_REQUIRED)
    return options


class HttpServer:
    """The app on uvicorn in its own thread; `api=False` serves /metrics alone (--metrics-port).
    `drain`: the gRPC server's admission, so one drain covers both fronts (default: its own)."""

    def __init__(self, model, tokenizer: Tokenizer, host: str = "127.0.0.1", port: int = 8000,
                 security: ServerSecurity = ServerSecurity(), model_name: str = "poe", api: bool = True,
                 grace: float = 5.0, drain: Drain | None = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES):
        self.metrics = Metrics(model, model_name)
        front = Front(model, tokenizer, model_name, self.metrics, drain or Drain())
        app = build_app(front, self.metrics, security.token, api, max_request_bytes)
        config = uvicorn.Config(app, log_level="warning",
                                lifespan="off", timeout_graceful_shutdown=grace, **_ssl_options(security))
        config.load()  # reads the TLS files now, so a bad one fails here rather than in the server's thread
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        self.socket = socket.create_server((host, port), family=family)  # a port in use fails here
        self.port = self.socket.getsockname()[1]
        scheme = "https" if security.cert_file else "http"
        self.url = f"{scheme}://{f'[{host}]' if ':' in host else host}:{self.port}"
        self.metrics.attach(model.loop)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]},
                                       name="poe-http", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"the HTTP server on {self.url} did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        """Stop taking connections, let open ones finish (up to `grace` seconds), then return."""
        self.server.should_exit = True
        self.thread.join()
        self.socket.close()


def serve_http(model, tokenizer: Tokenizer, host: str, http_port: int | None, metrics_port: int | None,
               security: ServerSecurity, model_name: str, drain: Drain | None = None,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> HttpServer | None:
    """`poe-serve serve`'s HTTP side: with `http_port`, the OpenAI API and /metrics there; else
    with `metrics_port`, /metrics alone; else nothing. Give at most one port. `drain`: the gRPC
    server's, so that SIGTERM drains both."""
    assert http_port is None or metrics_port is None, "/metrics is on the HTTP port when HTTP is on"
    if http_port is None and metrics_port is None:
        return None
    return HttpServer(model, tokenizer, host, metrics_port if http_port is None else http_port, security,
                      model_name, api=http_port is not None, drain=drain, max_request_bytes=max_request_bytes)
