"""The `PoEAdmin` gRPC service: operator calls on a running server: scaling a stage, and where
each stage worker runs.

Only a model whose stage workers run on Ray (`PoEModel.on_ray`) can scale; over an in-process
model the call is FAILED_PRECONDITION. In-flight requests keep running while a stage scales
and keep their tokens. It knows the model's scaling verb and status codes, nothing else.
"""

from __future__ import annotations

import grpc

from protos import poe_serving_pb2 as pb
from protos import poe_serving_pb2_grpc as pb_grpc

ADMIN_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PoEAdmin"].full_name


class AdminServicer(pb_grpc.PoEAdminServicer):
    def __init__(self, model):
        self.model = model

    def ScaleStage(self, request, context):
        if not self.model.backend.scalable:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          "scaling needs stage workers on Ray (poe-serve serve); this server runs an in-process model")
        try:
            self.model.scale_stage(request.stage, request.replicas)
        except ValueError as exc:  # stage out of range, replicas < 1, or no KV room to move sequences
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except RuntimeError as exc:  # Ray could not place or start a new worker
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        return pb.ScaleStageResponse(replicas=[len(stage.workers) for stage in self.model.engine.stages])

    def ListWorkers(self, request, context):
        try:
            located = self.model.worker_locations()
        except Exception as exc:  # a worker Ray is restarting does not answer within the signals timeout
            context.abort(grpc.StatusCode.UNAVAILABLE, f"a stage worker did not say where it runs: {exc}; retry")
        return pb.ListWorkersResponse(workers=[
            pb.WorkerLocation(stage=k, replica=r, node_id=w.node_id, node_ip=w.node_ip, device=w.device, pid=w.pid)
            for k, r, w in located])
