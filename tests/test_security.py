"""API keys (read/write scopes) and TLS / mutual TLS, with certificates generated at test time.

Every test goes through the real server. The scope each rpc needs is written out here (EXPECTED_SCOPES, the
README's table) rather than read from imagesearch.api.auth, so a wrong entry there fails a test too.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import RunningServer, free_port, jpeg_bytes, start_server, stop_server
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from rpc import chunks, index, product, stream

from imagesearch.api.auth import REQUIRED_SCOPE
from imagesearch.config import Settings
from imagesearch.model.encoder import ClipEncoder
from imagesearch.server import STARTUP_FAILURE, serve
from imagesearch.v1 import image_search_service_pb2 as pb
from imagesearch.v1 import image_search_service_pb2_grpc as pb_grpc

READ_KEY = "read-key-0123456789abcdef"
WRITE_KEY = "write-key-0123456789abcdef"
KEYS_FILE = f"# scopes\nread {READ_KEY}\nwrite {WRITE_KEY}  # the indexer\n"
SERVICE = pb.DESCRIPTOR.services_by_name["ImageSearchService"]
EXPECTED_SCOPES = {
    "Search": "read",
    "FindDuplicates": "read",
    "SearchInline": "read",
    "GetProduct": "read",
    "ListProducts": "read",
    "GetServiceInfo": "read",
    "IndexProduct": "write",
    "IndexProductInline": "write",
    "IndexProducts": "write",
    "DeleteProduct": "write",
}
SEEDED = "seeded"
Metadata = tuple[tuple[str, str], ...]


def bearer(key: str) -> Metadata:
    return (("authorization", f"Bearer {key}"),)


def _keyed_settings(settings: Settings, tmp_path: Path, **changes: Any) -> Settings:
    keys = tmp_path / "api-keys"
    keys.write_text(KEYS_FILE)
    return dataclasses.replace(settings, api_keys_file=keys, **changes)


@pytest.fixture
async def keyed(settings: Settings, encoder: ClipEncoder, tmp_path: Path) -> AsyncIterator[RunningServer]:
    """A server with API keys on, holding one product (SEEDED)."""
    running = await start_server(_keyed_settings(settings, tmp_path), encoder)
    try:
        await _index_seeded(running.stub)
        yield running
    finally:
        await stop_server(running)


@dataclasses.dataclass
class Client:
    """Stubs on one server. Client-streaming rpcs go through the sync client (in a thread, as the server runs on
    this event loop): when the server refuses a call while an asyncio client is still sending, that client may
    report INTERNAL instead of the server's status (grpc/grpc#36066); the sync client reports the status."""

    stub: pb_grpc.ImageSearchServiceAsyncStub
    sync: pb_grpc.ImageSearchServiceStub


@pytest.fixture
def client(keyed: RunningServer) -> Iterator[Client]:
    with grpc.insecure_channel(keyed.target) as channel:
        yield Client(keyed.stub, pb_grpc.ImageSearchServiceStub(channel))


def _code(error: grpc.RpcError) -> grpc.StatusCode:
    """The status of a failed call, from either client."""
    assert isinstance(error, grpc.Call | grpc.aio.AioRpcError)
    return error.code()


def _details(error: grpc.RpcError) -> str | None:
    """The status message of a failed call, from either client."""
    assert isinstance(error, grpc.Call | grpc.aio.AioRpcError)
    return error.details()


async def _index_seeded(stub: pb_grpc.ImageSearchServiceAsyncStub) -> None:
    messages = [pb.IndexProductRequest(product=product(SEEDED)), pb.IndexProductRequest(image_chunk=jpeg_bytes())]
    await stub.IndexProduct(stream(*messages), metadata=bearer(WRITE_KEY))


async def _catalogue(stub: pb_grpc.ImageSearchServiceAsyncStub) -> list[str]:
    response = await stub.ListProducts(pb.ListProductsRequest(), metadata=bearer(WRITE_KEY))
    return sorted(p.id for p in response.products)


# --- every rpc x {no key, read key, write key} ---------------------------------------------------------------

# A call of each rpc that succeeds when allowed, and checks that it did its work. Streaming rpcs carry the key
# in their metadata like the others.
Call = Callable[[Client, Metadata], Awaitable[None]]


async def _search(client: Client, metadata: Metadata) -> None:
    query = pb.SearchRequest(query=pb.SearchQuery(text="a red product"))
    response = await asyncio.to_thread(client.sync.Search, iter([query]), metadata=metadata)
    assert [hit.product.id for hit in response.hits] == [SEEDED]


async def _search_inline(client: Client, metadata: Metadata) -> None:
    request = pb.SearchInlineRequest(query=pb.SearchQuery(text="a red product"))
    response = await client.stub.SearchInline(request, metadata=metadata)
    assert [hit.product.id for hit in response.hits] == [SEEDED]


async def _get_product(client: Client, metadata: Metadata) -> None:
    response = await client.stub.GetProduct(pb.GetProductRequest(id=SEEDED), metadata=metadata)
    assert response.product.id == SEEDED


async def _list_products(client: Client, metadata: Metadata) -> None:
    response = await client.stub.ListProducts(pb.ListProductsRequest(), metadata=metadata)
    assert [p.id for p in response.products] == [SEEDED]


async def _get_service_info(client: Client, metadata: Metadata) -> None:
    response = await client.stub.GetServiceInfo(pb.GetServiceInfoRequest(), metadata=metadata)
    assert response.server_version


async def _find_duplicates(client: Client, metadata: Metadata) -> None:
    response = await client.stub.FindDuplicates(pb.FindDuplicatesRequest(product_id=SEEDED), metadata=metadata)
    assert list(response.products) == []  # the one product has no duplicate


async def _index_product(client: Client, metadata: Metadata) -> None:
    messages = [pb.IndexProductRequest(product=product("one"))]
    messages += [pb.IndexProductRequest(image_chunk=c) for c in chunks(jpeg_bytes((0, 90, 200)))]
    response = await asyncio.to_thread(client.sync.IndexProduct, iter(messages), metadata=metadata)
    assert response.created
    assert await _catalogue(client.stub) == sorted(["one", SEEDED])


async def _index_product_inline(client: Client, metadata: Metadata) -> None:
    request = pb.IndexProductInlineRequest(product=product("inline"), image=jpeg_bytes((0, 90, 200)))
    response = await client.stub.IndexProductInline(request, metadata=metadata)
    assert response.created
    assert await _catalogue(client.stub) == sorted(["inline", SEEDED])


async def _index_products(client: Client, metadata: Metadata) -> None:
    messages = [pb.IndexProductsRequest(product=product("bulk")), pb.IndexProductsRequest(image_chunk=jpeg_bytes())]

    def call() -> list[pb.IndexProductsResponse]:
        return list(client.sync.IndexProducts(iter(messages), metadata=metadata))

    responses = await asyncio.to_thread(call)
    assert [(r.id, r.created, r.HasField("error")) for r in responses] == [("bulk", True, False)]
    assert await _catalogue(client.stub) == sorted(["bulk", SEEDED])


async def _delete_product(client: Client, metadata: Metadata) -> None:
    await client.stub.DeleteProduct(pb.DeleteProductRequest(id=SEEDED), metadata=metadata)
    assert await _catalogue(client.stub) == []


CALLS: dict[str, Call] = {
    "Search": _search,
    "SearchInline": _search_inline,
    "GetProduct": _get_product,
    "ListProducts": _list_products,
    "GetServiceInfo": _get_service_info,
    "FindDuplicates": _find_duplicates,
    "IndexProduct": _index_product,
    "IndexProductInline": _index_product_inline,
    "IndexProducts": _index_products,
    "DeleteProduct": _delete_product,
}


def test_every_rpc_declares_the_expected_scope() -> None:
    for method in SERVICE.methods:
        path = f"/{SERVICE.full_name}/{method.name}"
        assert method.name in EXPECTED_SCOPES, f"{method.name}: add its scope to EXPECTED_SCOPES and the README"
        assert REQUIRED_SCOPE.get(path) == EXPECTED_SCOPES[method.name], path
    assert set(REQUIRED_SCOPE) == {f"/{SERVICE.full_name}/{m.name}" for m in SERVICE.methods}


@pytest.mark.parametrize("key", ["none", "read", "write"])
@pytest.mark.parametrize("method", [m.name for m in SERVICE.methods])
async def test_each_rpc_needs_its_scope(client: Client, method: str, key: str) -> None:
    call = CALLS[method]  # a KeyError here: a new rpc needs a call above
    metadata = {"none": (), "read": bearer(READ_KEY), "write": bearer(WRITE_KEY)}[key]
    allowed = key == "write" or (key == "read" and EXPECTED_SCOPES[method] == "read")
    if allowed:
        await call(client, metadata)
        return
    with pytest.raises(grpc.RpcError) as err:
        await call(client, metadata)
    if key == "none":
        assert _code(err.value) == grpc.StatusCode.UNAUTHENTICATED
        assert _details(err.value) == "missing or unknown API key: send 'authorization: Bearer KEY'"
    else:
        assert _code(err.value) == grpc.StatusCode.PERMISSION_DENIED
        assert _details(err.value) == f"this API key may only read; /{SERVICE.full_name}/{method} needs write"
    assert await _catalogue(client.stub) == [SEEDED]  # a refused write changed nothing


@pytest.mark.parametrize(
    "metadata",
    [
        pytest.param((), id="no-header"),
        pytest.param((("authorization", "Bearer wrong-key-0123456789"),), id="unknown-key"),
        pytest.param((("authorization", READ_KEY),), id="no-bearer-scheme"),
        pytest.param((("authorization", f"Basic {READ_KEY}"),), id="other-scheme"),
        pytest.param((("authorization", "Bearer "),), id="empty-token"),
        pytest.param((("authorization", f"Bearer {READ_KEY[:-1]}"),), id="key-prefix"),
        pytest.param((("authorization", f"Bearer {READ_KEY}x"),), id="key-extended"),
    ],
)
async def test_missing_or_unknown_key_is_unauthenticated(client: Client, metadata: Metadata) -> None:
    with pytest.raises(grpc.RpcError) as err:
        await _get_service_info(client, metadata)
    assert _code(err.value) == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:  # a streaming rpc with the same header
        await _search(client, metadata)
    assert _code(err.value) == grpc.StatusCode.UNAUTHENTICATED


async def test_read_key_may_search_but_not_write(client: Client) -> None:
    await _search(client, bearer(READ_KEY))
    with pytest.raises(grpc.RpcError) as err:
        await _index_product(client, bearer(READ_KEY))
    assert _code(err.value) == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as err:
        await _index_products(client, bearer(READ_KEY))
    assert _code(err.value) == grpc.StatusCode.PERMISSION_DENIED
    assert await _catalogue(client.stub) == [SEEDED]


# --- methods nobody declared: refused, served or not ---------------------------------------------------------


class _ExtraMethods(grpc.GenericRpcHandler):
    """Methods the contract does not declare, served anyway (a debug endpoint someone registers, say): the
    interceptor must not let them through just because they are missing from its table."""

    PATHS = ("/imagesearch.v1.ImageSearchService/Backdoor", "/imagesearch.v1.Internal/Echo")

    def __init__(self) -> None:
        self.calls: list[str] = []

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        path: str = handler_call_details.method
        if path not in self.PATHS:
            return None

        async def echo(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            self.calls.append(path)
            return request

        return grpc.unary_unary_rpc_method_handler(echo)


@pytest.fixture
async def with_extra_methods(
    settings: Settings, encoder: ClipEncoder, tmp_path: Path
) -> AsyncIterator[tuple[RunningServer, _ExtraMethods]]:
    extra = _ExtraMethods()
    running = await start_server(_keyed_settings(settings, tmp_path), encoder, handlers=(extra,))
    try:
        yield running, extra
    finally:
        await stop_server(running)


async def _raw_call(channel: grpc.aio.Channel, path: str, metadata: Metadata) -> bytes:
    call = channel.unary_unary(path, request_serializer=bytes, response_deserializer=bytes)
    return await call(b"ping", metadata=metadata)


@pytest.mark.parametrize("path", _ExtraMethods.PATHS)
async def test_served_methods_without_a_scope_are_refused(
    with_extra_methods: tuple[RunningServer, _ExtraMethods], path: str
) -> None:
    running, extra = with_extra_methods
    for metadata, code in [
        ((), grpc.StatusCode.UNAUTHENTICATED),
        (bearer(READ_KEY), grpc.StatusCode.PERMISSION_DENIED),
        (bearer(WRITE_KEY), grpc.StatusCode.PERMISSION_DENIED),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _raw_call(running.channel, path, metadata)
        assert err.value.code() == code
    assert extra.calls == []


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/imagesearch.v1.ImageSearchService/Nope", id="unknown-method"),
        pytest.param("/imagesearch.v2.ImageSearchService/Search", id="unknown-service"),
        pytest.param("/grpc.health.v1.HealthX/Check", id="open-service-name-prefix"),
    ],
)
async def test_unknown_methods_are_refused_without_a_key(keyed: RunningServer, path: str) -> None:
    # Without a key a caller learns nothing, not even whether a method exists (UNIMPLEMENTED would say so).
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _raw_call(keyed.channel, path, ())
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _raw_call(keyed.channel, path, bearer(WRITE_KEY))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_server_refuses_to_start_when_an_rpc_has_no_scope(tmp_path: Path) -> None:
    # The contract gains an rpc nobody gave a scope: the server module must refuse to load (the first step of
    # `imagesearch serve`), not serve the rpc to everyone. The descriptor is replaced by a stand-in with one
    # more method, in a child process so that this one keeps the real modules.
    script = textwrap.dedent(
        """
        import types
        from imagesearch.v1 import image_search_service_pb2 as pb
        real = pb.DESCRIPTOR.services_by_name["ImageSearchService"]
        service = types.SimpleNamespace(
            full_name=real.full_name, methods=[*real.methods, types.SimpleNamespace(name="ExportEverything")]
        )
        pb.DESCRIPTOR = types.SimpleNamespace(services_by_name={"ImageSearchService": service})
        import imagesearch.server
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode != 0
    assert "MissingScopeError" in result.stderr
    assert "ExportEverything" in result.stderr


# --- health and reflection: open by name, unless IMAGESEARCH_AUTH_PROTECT_ALL -------------------------------


async def _list_services(channel: grpc.aio.Channel, metadata: Metadata) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = [r async for r in stub.ServerReflectionInfo(stream(request), metadata=metadata)]
    return [s.name for s in responses[0].list_services_response.service]


async def _reflection_v1(channel: grpc.aio.Channel, metadata: Metadata) -> None:
    call = channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    async for _ in call(stream(reflection_pb2.ServerReflectionRequest(list_services="")), metadata=metadata):
        pass


async def test_health_and_reflection_stay_open(keyed: RunningServer) -> None:
    assert (await keyed.health.Check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.SERVING
    assert SERVICE.full_name in await _list_services(keyed.channel, ())
    # Reflection v1 is not served: UNIMPLEMENTED, so that grpcurl falls back to v1alpha.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _reflection_v1(keyed.channel, ())
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_protect_all_puts_health_and_reflection_behind_a_read_key(
    settings: Settings, encoder: ClipEncoder, tmp_path: Path
) -> None:
    protected = await start_server(_keyed_settings(settings, tmp_path, auth_protect_all=True), encoder)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await protected.health.Check(health_pb2.HealthCheckRequest())
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _list_services(protected.channel, ())
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _reflection_v1(protected.channel, ())
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

        response = await protected.health.Check(health_pb2.HealthCheckRequest(), metadata=bearer(READ_KEY))
        assert response.status == health_pb2.HealthCheckResponse.SERVING
        assert SERVICE.full_name in await _list_services(protected.channel, bearer(READ_KEY))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _reflection_v1(protected.channel, bearer(READ_KEY))
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(grpc.aio.AioRpcError) as err:  # the service's own rpcs keep their scopes
            await protected.stub.DeleteProduct(pb.DeleteProductRequest(id=SEEDED), metadata=bearer(READ_KEY))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
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


# --- a bad keys file stops the server at start --------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(None, id="missing-file"),
        pytest.param("", id="empty-file"),
        pytest.param("# only a comment\n\n", id="no-keys"),
        pytest.param(f"read {READ_KEY}\nadmin {WRITE_KEY}\n", id="unknown-scope"),
        pytest.param(f"read {READ_KEY}\nwrite\n", id="no-key-on-line"),
        pytest.param(f"read {READ_KEY} {WRITE_KEY}\n", id="three-fields"),
        pytest.param("read 0123456789abcde\n", id="short-key"),
    ],
)
async def test_bad_api_keys_file_is_a_startup_failure(settings: Settings, tmp_path: Path, content: str | None) -> None:
    keys = tmp_path / "api-keys"
    if content is not None:
        keys.write_text(content)
    port = free_port()
    starting = asyncio.create_task(serve(dataclasses.replace(settings, port=port, api_keys_file=keys)))
    # serve() returns only at shutdown once it has started: if it serves, that is the failure, not a hang.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        while not starting.done():
            try:
                await _health_over(channel, timeout_s=1)
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.05)
                continue
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            pytest.fail("the server started with a bad API keys file")
    assert starting.result() == STARTUP_FAILURE


# --- TLS -----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    foreign_client_cert: Path  # signed by a CA the server does not trust
    foreign_client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    for ca in ("ca", "foreign-ca"):
        _openssl(
            "req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2", "-subj", f"/CN={ca}", cwd=d
        )  # fmt: skip
    (d / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name, ca in (("server", "ca"), ("client", "ca"), ("foreign-client", "foreign-ca")):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        extra = ["-extfile", "server.ext"] if name == "server" else []
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", *extra, cwd=d,
        )  # fmt: skip
    return Pki(
        d / "ca.pem",
        d / "server.pem",
        d / "server.key",
        d / "client.pem",
        d / "client.key",
        d / "foreign-client.pem",
        d / "foreign-client.key",
    )


async def _health_over(channel: grpc.aio.Channel, timeout_s: float = 30) -> int:
    response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
    return response.status


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


async def test_tls_and_api_keys_together(settings: Settings, encoder: ClipEncoder, pki: Pki, tmp_path: Path) -> None:
    running = await start_server(
        _keyed_settings(settings, tmp_path, tls_cert_file=pki.server_cert, tls_key_file=pki.server_key), encoder
    )
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
        target = f"localhost:{running.port}"
        async with grpc.aio.secure_channel(target, credentials) as channel:
            with grpc.secure_channel(target, credentials) as sync_channel:
                client = Client(pb_grpc.ImageSearchServiceStub(channel), pb_grpc.ImageSearchServiceStub(sync_channel))
                with pytest.raises(grpc.RpcError) as err:  # TLS alone is not a key
                    await _get_service_info(client, ())
                assert _code(err.value) == grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(grpc.RpcError) as err:
                    await _search(client, ())
                assert _code(err.value) == grpc.StatusCode.UNAUTHENTICATED
                await _index_seeded(client.stub)
                await _search(client, bearer(READ_KEY))
                with pytest.raises(grpc.RpcError) as err:
                    await _delete_product(client, bearer(READ_KEY))
                assert _code(err.value) == grpc.StatusCode.PERMISSION_DENIED
                await _index_products(client, bearer(WRITE_KEY))
    finally:
        await stop_server(running)


async def test_mutual_tls_requires_a_client_certificate_from_its_ca(
    settings: Settings, encoder: ClipEncoder, pki: Pki
) -> None:
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
        foreign_cert = grpc.ssl_channel_credentials(
            root_certificates=pki.ca.read_bytes(),
            private_key=pki.foreign_client_key.read_bytes(),
            certificate_chain=pki.foreign_client_cert.read_bytes(),
        )
        for refused in (without_cert, foreign_cert):
            async with grpc.aio.secure_channel(target, refused) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await _health_over(channel)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await stop_server(running)
