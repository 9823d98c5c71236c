"""Unexpected exceptions in gRPC handlers: INTERNAL with a request id for the client, the rest for the log.

gRPC answers an exception escaping a handler with UNKNOWN and the exception's text. Here every
handler of every service is wrapped: a status the handler chose (`context.abort`) passes
through, anything else becomes INTERNAL naming a fresh request id, and the exception with its
traceback goes to the log under that id. It knows status codes, not the model.
"""

from __future__ import annotations

import logging
import uuid

import grpc

log = logging.getLogger("poe_serve.server")


def abort_internal(context: grpc.ServicerContext, method: str, exc: BaseException) -> None:
    """Log `exc` under a new request id and end the RPC with INTERNAL naming only that id."""
    request_id = uuid.uuid4().hex[:16]
    log.error("request %s: %s failed: %s: %s", request_id, method, type(exc).__name__, exc, exc_info=exc)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id}); the server log has the details")


def _guard(behaviour, method: str, streaming: bool):
    def run(request, context):
        try:
            return behaviour(request, context)
        except Exception as exc:
            if context.code() is not None:  # the handler aborted with a status of its own
                raise
            abort_internal(context, method, exc)

    def run_stream(request, context):
        try:
            yield from behaviour(request, context)
        except Exception as exc:
            if context.code() is not None:
                raise
            abort_internal(context, method, exc)

    return run_stream if streaming else run


class InternalErrors(grpc.ServerInterceptor):
    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        kinds = {
            (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
            (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
            (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
            (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
        }
        name, make = kinds[(handler.request_streaming, handler.response_streaming)]
        behaviour = _guard(getattr(handler, name), method, streaming=handler.response_streaming)
        return make(behaviour, handler.request_deserializer, handler.response_serializer)
