"""API keys (read/write scopes) and TLS / mutual TLS, with certificates generated at test time."""

from __future__ import annotations

import dataclasses
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from conftest import RunningServer, jpeg_bytes, start_server, stop_server
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rpc import index, product, search

from imagesearch.config import Settings
from imagesearch.model.encoder import ClipEncoder
from imagesearch.v1 import image_search_service_pb2 as pb
from imagesearch.v1 import image_search_service_pb2_grpc as pb_grpc

READ_KEY = "read-key-0123456789abcdef"
WRITE_KEY = "write-key-0123456789abcdef"


def bearer(key: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {key}"),)


@pytest.fixture
async def keyed(settings: Settings, encoder: ClipEncoder, tmp_path: Path) -> AsyncIterator[RunningServer]:
    keys = tmp_path / "api-keys"
    keys.write_text(f"# scopes\nread {READ_KEY}\nwrite {WRITE_KEY}  # the indexer\n")
    running = await start_server(dataclasses.replace(settings, api_keys_file=keys), encoder)
    try:
        yield running
    finally:
        await stop_server(running)


async def test_read_key_may_search_but_not_write(keyed: RunningServer) -> None:
    item = product("a")
    messages = [pb.IndexProductRequest(product=item), pb.IndexProductRequest(image_chunk=jpeg_bytes())]

    async def requests() -> AsyncIterator[pb.IndexProductRequest]:
        for message in messages:
            yield message

    await keyed.stub.IndexProduct(requests(), metadata=bearer(WRITE_KEY))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await keyed.stub.IndexProduct(requests(), metadata=bearer(READ_KEY))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await keyed.stub.DeleteProduct(pb.DeleteProductRequest(id="a"), metadata=bearer(READ_KEY))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED

    response = await keyed.stub.GetProduct(pb.GetProductRequest(id="a"), metadata=bearer(READ_KEY))
    assert response.product.id == "a"
    await keyed.stub.DeleteProduct(pb.DeleteProductRequest(id="a"), metadata=bearer(WRITE_KEY))


@pytest.mark.parametrize(
    "metadata",
    [
        pytest.param((), id="no-header"),
        pytest.param((("authorization", "Bearer wrong-key-0123456789"),), id="unknown-key"),
        pytest.param((("authorization", READ_KEY),), id="no-bearer-scheme"),
        pytest.param((("authorization", f"Bearer {READ_KEY[:-1]}"),), id="key-prefix"),
    ],
)
async def test_missing_or_unknown_key_is_unauthenticated(keyed: RunningServer, metadata: tuple[()]) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await keyed.stub.GetServiceInfo(pb.GetServiceInfoRequest(), metadata=metadata)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await search(keyed.stub, text="mug")  # no key: streaming RPCs are refused too
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_health_stays_open_unless_protected(
    keyed: RunningServer, settings: Settings, encoder: ClipEncoder, tmp_path: Path
) -> None:
    assert (await keyed.health.Check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.SERVING
    protected = await start_server(
        dataclasses.replace(
            settings, data_dir=tmp_path / "other", api_keys_file=tmp_path / "api-keys", auth_protect_all=True
        ),
        encoder,
    )
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await protected.health.Check(health_pb2.HealthCheckRequest())
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        response = await protected.health.Check(health_pb2.HealthCheckRequest(), metadata=bearer(READ_KEY))
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await stop_server(protected)


async def test_api_keys_are_never_logged(keyed: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    await keyed.stub.GetServiceInfo(pb.GetServiceInfoRequest(), metadata=bearer(READ_KEY))
    with pytest.raises(grpc.aio.AioRpcError):
        await keyed.stub.DeleteProduct(pb.DeleteProductRequest(id="x"), metadata=bearer(READ_KEY))
    output = capsys.readouterr()
    assert "permission denied" in output.out + output.err  # the refusal was logged...
    assert READ_KEY not in output.out + output.err
    assert WRITE_KEY not in output.out + output.err  # ...without the key


# --- TLS -----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test-ca", cwd=d)
    (d / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        extra = ["-extfile", "server.ext"] if name == "server" else []
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", *extra, cwd=d,
        )  # fmt: skip
    return Pki(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key")


async def _health_over(channel: grpc.aio.Channel) -> int:
    return (await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)).status


async def test_tls_server_accepts_tls_clients_only(settings: Settings, encoder: ClipEncoder, pki: Pki) -> None:
    running = await start_server(
        dataclasses.replace(settings, tls_cert_file=pki.server_cert, tls_key_file=pki.server_key), encoder
    )
    target = f"localhost:{running.port}"
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
        async with grpc.aio.secure_channel(target, credentials) as channel:
            assert await _health_over(channel) == health_pb2.HealthCheckResponse.SERVING
            await index(pb_grpc.ImageSearchServiceStub(channel), product("tls"), jpeg_bytes())
        async with grpc.aio.insecure_channel(target) as plaintext:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _health_over(plaintext)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await stop_server(running)


async def test_mutual_tls_requires_a_client_certificate(settings: Settings, encoder: ClipEncoder, pki: Pki) -> None:
    running = await start_server(
        dataclasses.replace(
            settings, tls_cert_file=pki.server_cert, tls_key_file=pki.server_key, tls_client_ca_file=pki.ca
        ),
        encoder,
    )
    target = f"localhost:{running.port}"
    try:
        with_cert = grpc.ssl_channel_credentials(
            root_certificates=pki.ca.read_bytes(),
            private_key=pki.client_key.read_bytes(),
            certificate_chain=pki.client_cert.read_bytes(),
        )
        async with grpc.aio.secure_channel(target, with_cert) as channel:
            assert await _health_over(channel) == health_pb2.HealthCheckResponse.SERVING
        without_cert = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
        async with grpc.aio.secure_channel(target, without_cert) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _health_over(channel)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await stop_server(running)
