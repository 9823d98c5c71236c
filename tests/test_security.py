"""Bearer tokens, TLS and mutual TLS on the real gRPC server, over the in-process model.

Certificates are made per test session with the `openssl` command line (a CA, a server
certificate for 127.0.0.1/localhost, and a client certificate signed by the same CA: the
`certs` fixture in conftest.py).
"""

from __future__ import annotations

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from support import TOKEN

from coordinator import PoEModel, load_tokenizer
from coordinator.grpc_api.admin import ADMIN_SERVICE_NAME
from coordinator.grpc_api.server import SERVICE_NAME, Server
from coordinator.serving.security import ServerSecurity, client_credentials
from tools.client import PoEClient


@pytest.fixture(scope="module")
def model(tiny_dir):
    return PoEModel.from_pretrained(tiny_dir)


def serve(model, tiny_dir, security: ServerSecurity) -> Server:
    return Server(model, load_tokenizer(tiny_dir), port=0, security=security)


def test_server_binds_loopback_by_default(model, tiny_dir):
    server = serve(model, tiny_dir, ServerSecurity())
    try:
        assert server.address.startswith("127.0.0.1:")
    finally:
        server.stop(0)


def list_services(client: PoEClient) -> set[str]:
    """Server reflection's list of services, asked with the client's metadata."""
    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    replies = stub.ServerReflectionInfo(iter([request]), timeout=30, metadata=client.metadata)
    return {s.name for s in next(replies).list_services_response.service}


def test_bearer_token_is_checked_on_every_rpc(model, tiny_dir):
    server = serve(model, tiny_dir, ServerSecurity(token=TOKEN))
    try:
        expected = model.generate([[1, 2, 3]], 3)[0, 3:].tolist()
        with PoEClient(server.address, token=TOKEN, timeout=30) as good:
            assert list(good.generate(token_ids=[1, 2, 3], max_new_tokens=3).token_ids) == expected
            assert good.health() == "SERVING"
            assert {SERVICE_NAME, ADMIN_SERVICE_NAME} <= list_services(good)
            with pytest.raises(grpc.RpcError) as err:  # the admin handler ran: it needs Ray to scale
                good.scale_stage(0, 2)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        for token in (None, "wrong", TOKEN + "x"):
            with PoEClient(server.address, token=token, timeout=30) as bad:
                for call in (lambda: bad.generate(token_ids=[1, 2, 3], max_new_tokens=3),
                             lambda: list(bad.stream(token_ids=[1, 2, 3], max_new_tokens=3)),
                             lambda: bad.score(token_ids=[1, 2, 3]), bad.model_info, bad.health,
                             lambda: list_services(bad), lambda: bad.scale_stage(0, 2)):
                    with pytest.raises(grpc.RpcError) as err:
                        call()
                    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, token
    finally:
        server.stop(0)


def test_tls_and_mutual_tls(model, tiny_dir, certs):
    c = lambda name: str(certs / name)  # noqa: E731
    tls = serve(model, tiny_dir, ServerSecurity(token=TOKEN, cert_file=c("server.pem"), key_file=c("server.key")))
    mtls = serve(model, tiny_dir, ServerSecurity(cert_file=c("server.pem"), key_file=c("server.key"),
                                                 client_ca_file=c("ca.pem")))
    try:
        with PoEClient(tls.address, token=TOKEN, credentials=client_credentials(c("ca.pem")), timeout=30) as client:
            assert len(client.generate(token_ids=[5, 6], max_new_tokens=2).token_ids) == 2
        with PoEClient(tls.address, token=TOKEN, timeout=5) as plaintext:
            with pytest.raises(grpc.RpcError) as err:
                plaintext.health()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        pair = client_credentials(c("ca.pem"), c("client.pem"), c("client.key"))
        with PoEClient(mtls.address, credentials=pair, timeout=30) as client:
            assert client.health() == "SERVING"
        with PoEClient(mtls.address, credentials=client_credentials(c("ca.pem")), timeout=5) as no_client_cert:
            with pytest.raises(grpc.RpcError) as err:
                no_client_cert.health()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        tls.stop(0)
        mtls.stop(0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(cert_file="a.pem"), "both the certificate and the key"),
    (dict(client_ca_file="ca.pem"), "needs the server certificate"),
    (dict(token="  "), "empty"),
])
def test_security_settings_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ServerSecurity(**kwargs)


def test_missing_certificate_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pem"):
        (tmp_path / "k").write_text("key")
        ServerSecurity(cert_file=str(tmp_path / "nope.pem"), key_file=str(tmp_path / "k")).credentials()
