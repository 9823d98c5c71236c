"""poe-serve as a Ray Serve application: what a KubeRay RayService runs from its serveConfigV2.

`build(args)` is the application builder that `import_path: coordinator.ray_cluster.serve_app:build` names;
Serve validates `args` against `ServeArgs` (unknown or mistyped fields are errors naming them).
Its one deployment, `PoECoordinator`, launches the model on Ray (`PoEModel.on_ray`) in its constructor (the stage
workers as Ray actors, as `poe-serve serve` does), then serves the OpenAI-compatible HTTP API
through Serve's proxy (the ASGI app is http_api's, built once the workers are up) and, with
`grpc_port`, poe-serve's gRPC server from the replica's node. `check_health` fails while the
coordinator is not ready (a stage down for good, the engine loop down): Serve stops routing to
the replica and replaces it, which relaunches the stage workers. When Serve stops the replica it
first lets its HTTP requests finish (`graceful_shutdown_timeout_s`); then gRPC drains for
`shutdown_timeout_s` and the workers are released.

`Coordinator` is the plain part, the fronts over a launched model, built and tested without
Serve; the deployment is a thin shim over it. Each replica is a whole pipeline (its own stage
workers). This module knows nothing of Kubernetes. (No `from __future__ import annotations`:
Serve reads the builder's annotation as a class to validate `args` with it.)
"""

import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application

from coordinator import PoEModel
from coordinator.grpc_api.server import Server
from coordinator.http_api.app import Front, build_app
from coordinator.serving.drain import Drain
from coordinator.serving.metrics import Metrics
from coordinator.serving.security import ServerSecurity
from coordinator.serving_config import DEFAULT_MAX_REQUEST_BYTES
from coordinator.tokenizer import Tokenizer, load_tokenizer


class ServeArgs(BaseModel):
    """serveConfigV2's `args` for `coordinator.ray_cluster.serve_app:build` (the flags of `poe-serve serve`)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    checkpoint: str  # checkpoint directory, the same path on every node (a shared volume)
    config: str | None = None  # placement YAML; None: cluster_configs/local-cpu.yaml
    dtype: str | None = None  # worker dtype; None: the placement's
    served_model_name: str | None = None  # the HTTP API's model id; None: the checkpoint directory's name
    grpc_port: int | None = Field(None, ge=0, le=65535)  # also serve gRPC here; None: HTTP only
    grpc_host: str = "0.0.0.0"  # the gRPC bind address (on the replica's node)
    auth_token_file: str | None = None  # bearer token for every route but the probes, and for gRPC
    shutdown_timeout_s: float = Field(30.0, gt=0)  # HTTP, then gRPC, drain for up to this each

    def model_name(self) -> str:
        return self.served_model_name or Path(self.checkpoint).name

    def security(self) -> ServerSecurity:
        token = Path(self.auth_token_file).read_text().strip() if self.auth_token_file else None
        return ServerSecurity(token)


class Coordinator:
    """poe-serve's fronts over a launched model: the HTTP app (served by whoever hosts it) and,
    with a gRPC port, the gRPC server; one drain for both."""

    def __init__(self, model, tokenizer: Tokenizer, model_name: str, security: ServerSecurity = ServerSecurity(),
                 grpc_port: int | None = None, grpc_host: str = "0.0.0.0", max_queue: int = 256,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES):
        self.model, self.token, self.max_request_bytes = model, security.token, max_request_bytes
        model.loop.max_queue = max_queue
        self.grpc = None if grpc_port is None else Server(model, tokenizer, grpc_host, grpc_port, max_queue=max_queue,
                                                          security=security, max_request_bytes=max_request_bytes)
        self.metrics = Metrics(model, model_name)
        self.front = Front(model, tokenizer, model_name, self.metrics,
                           Drain() if self.grpc is None else self.grpc.admission)
        self.metrics.attach(model.loop)

    def app(self):
        """The ASGI app: the OpenAI routes, /health, /ready and /metrics (coordinator/http_api/app.py)."""
        return build_app(self.front, self.metrics, self.token, max_request_bytes=self.max_request_bytes)

    def check_health(self) -> None:
        """Raise while not ready: draining, the engine loop down, or a stage with no live worker."""
        problem = self.front.not_ready()
        if problem is not None:
            raise RuntimeError(f"poe-serve is not ready: {problem}")

    def drain(self, timeout: float) -> int:
        """Refuse new requests on both fronts and let those in flight finish for up to `timeout`
        seconds; then stop gRPC. Returns how many were still running."""
        deadline = time.monotonic() + timeout
        if self.grpc is not None:
            return self.grpc.drain(deadline)
        self.front.drain.start()
        return self.front.drain.wait(deadline)


@serve.deployment(num_replicas=1, health_check_period_s=10, health_check_timeout_s=30)
@serve.ingress()
class PoECoordinator:
    """The Serve shim: launch the cluster, host the `Coordinator`, report its health."""

    def __init__(self, args: dict):
        self.args = ServeArgs.model_validate(args)
        self.cluster = PoEModel.on_ray(self.args.checkpoint, config=self.args.config, dtype=self.args.dtype)
        serving = self.cluster.backend.serving_config
        try:
            self.coordinator = Coordinator(self.cluster, load_tokenizer(self.args.checkpoint), self.args.model_name(),
                                           self.args.security(), self.args.grpc_port, self.args.grpc_host,
                                           serving.max_queue, serving.max_request_bytes)
        except BaseException:
            self.cluster.shutdown()
            raise

    def __serve_build_asgi_app__(self):
        return self.coordinator.app()

    def check_health(self) -> None:
        self.coordinator.check_health()

    def __del__(self):
        self.coordinator.drain(self.args.shutdown_timeout_s)
        self.cluster.shutdown()


def build(args: ServeArgs) -> Application:
    """The application of serveConfigV2's `import_path: coordinator.ray_cluster.serve_app:build`."""
    return PoECoordinator.options(graceful_shutdown_timeout_s=args.shutdown_timeout_s).bind(args.model_dump())
