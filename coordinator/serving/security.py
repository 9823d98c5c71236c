"""Transport security for the gRPC server: optional TLS or mutual TLS, and a bearer token.

`ServerSecurity` is built from file paths (CLI flags) and gives the server its credentials
(None: plaintext, for loopback) and its interceptors. The token is compared in constant time
on every RPC, health and reflection included; a missing or wrong token is UNAUTHENTICATED
before any handler runs. Nothing here knows the model.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path

import grpc

AUTH_HEADER = "authorization"


def _read(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} file {p} not found")
    return p.read_bytes()


@dataclass(frozen=True)
class ServerSecurity:
    token: str | None = None  # required as "authorization: Bearer <token>" on every RPC
    cert_file: str | None = None  # server certificate chain (PEM): enables TLS
    key_file: str | None = None  # its private key (PEM)
    client_ca_file: str | None = None  # CA for client certificates (PEM): enables mutual TLS

    def __post_init__(self):
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls: give both the certificate and the key, or neither")
        if self.client_ca_file and not self.cert_file:
            raise ValueError("tls: a client CA (mutual TLS) needs the server certificate and key too")
        if self.token is not None and not self.token.strip():
            raise ValueError("auth token: empty; give a non-empty token or none")

    def credentials(self) -> grpc.ServerCredentials | None:
        if self.cert_file is None:
            return None
        pair = (_read(self.key_file, "tls key"), _read(self.cert_file, "tls certificate"))
        ca = _read(self.client_ca_file, "client CA")
        return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)

    def interceptors(self) -> list[grpc.ServerInterceptor]:
        return [BearerTokenInterceptor(self.token)] if self.token else []


def _deny(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that fails with UNAUTHENTICATED."""

    def abort(_request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


class BearerTokenInterceptor(grpc.ServerInterceptor):
    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        sent = dict(handler_call_details.invocation_metadata or ()).get(AUTH_HEADER)
        if sent is None:
            return _deny(handler, "missing 'authorization: Bearer <token>' metadata")
        if not hmac.compare_digest(sent.encode(), self._expected):
            return _deny(handler, "invalid bearer token")
        return handler


def client_credentials(root_cert_file: str | None = None, cert_file: str | None = None,
                       key_file: str | None = None) -> grpc.ChannelCredentials:
    """TLS channel credentials: the CA that signed the server, and a client pair for mutual TLS."""
    return grpc.ssl_channel_credentials(_read(root_cert_file, "tls root certificate"),
                                        _read(key_file, "tls client key"), _read(cert_file, "tls client certificate"))
