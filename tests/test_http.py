"""The HTTP/JSON port (api/http.py) through a real HTTP client (httpx) against a real server: the same handlers,
rules, errors, keys and TLS as the gRPC port, plus /healthz, /openapi.json and /docs."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import ssl
import struct
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from conftest import jpeg_bytes, self_signed_certificate
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from helpers import QuietHandler, http_server, raising

from imagesearch.api.status import status_for
from imagesearch.config import Settings
from imagesearch.errors import FieldViolation, InvalidArgument, StoreUnavailable
from imagesearch.model.encoder import ClipEncoder
from imagesearch.server import Components, Servers, build_servers, open_components
from imagesearch.v1 import image_search_service_pb2 as pb
from imagesearch.v1 import image_search_service_pb2_grpc as pb_grpc
from imagesearch.v1 import products_pb2

SERVICE = "/imagesearch.v1.ImageSearchService/"
READ_KEY = "read-key-0123456789abcdef"
WRITE_KEY = "write-key-0123456789abcdef"
DESCRIPTOR = pb.DESCRIPTOR.services_by_name["ImageSearchService"]


@dataclass
class Running:
    servers: Servers
    components: Components
    http: httpx.AsyncClient
    stub: pb_grpc.ImageSearchServiceAsyncStub

    async def call(self, method: str, body: dict[str, Any], **kwargs: Any) -> httpx.Response:
        return await self.http.post(SERVICE + method, json=body, **kwargs)


@contextlib.asynccontextmanager
async def serving(settings: Settings, encoder: ClipEncoder, **http_client: Any) -> AsyncIterator[Running]:
    """A real server with both ports (the HTTP one on a free port), an httpx client for it and a gRPC stub."""
    settings = dataclasses.replace(settings, http_port=0)
    components = await open_components(settings, encoder=encoder)
    servers = build_servers(settings, components)
    assert servers.http is not None
    await servers.grpc.start()
    await servers.http.start()
    await servers.store_health.serving()
    base_url = f"{servers.http.scheme}://localhost:{servers.http.port}"
    try:
        async with (
            httpx.AsyncClient(base_url=base_url, timeout=30, **http_client) as client,
            grpc.aio.insecure_channel(f"127.0.0.1:{servers.port}") as channel,
        ):
            yield Running(servers, components, client, pb_grpc.ImageSearchServiceStub(channel))
    finally:
        await servers.http.stop(0)
        await servers.grpc.stop(0)
        await servers.store_health.close()
        await components.close()


@pytest.fixture
async def running(settings: Settings, encoder: ClipEncoder) -> AsyncIterator[Running]:
    async with serving(settings, encoder) as started:
        yield started


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def product(product_id: str, **fields: Any) -> dict[str, Any]:
    return {"id": product_id, "name": product_id, "category": "mugs", "price": 5, "currency": "EUR", **fields}


async def index(running: Running, product_id: str, image: bytes, **fields: Any) -> dict[str, Any]:
    response = await running.call("IndexProductInline", {"product": product(product_id, **fields), "image": b64(image)})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def details(response: httpx.Response) -> dict[str, Message]:
    """The error's details by type, decoded from their base64 as a client would."""
    types = {
        "google.rpc.BadRequest": error_details_pb2.BadRequest,
        "google.rpc.RetryInfo": error_details_pb2.RetryInfo,
        "google.rpc.ResourceInfo": error_details_pb2.ResourceInfo,
    }
    decoded: dict[str, Message] = {}
    for detail in response.json().get("details", []):
        value = base64.b64decode(detail["value"] + "=" * (-len(detail["value"]) % 4))
        decoded[detail["type"]] = types[detail["type"]].FromString(value)
    return decoded


def violations(response: httpx.Response) -> list[str]:
    bad_request = details(response)["google.rpc.BadRequest"]
    assert isinstance(bad_request, error_details_pb2.BadRequest)
    return [v.field for v in bad_request.field_violations]


# ---- every operation ----------------------------------------------------------------------------------------------


async def test_index_get_list_delete_over_http(running: Running) -> None:
    created = await index(running, "mug-1", jpeg_bytes(), attributes={"colour": "red"})
    assert created["created"] is True and created["product"]["attributes"] == {"colour": "red"}
    assert (await index(running, "mug-1", jpeg_bytes()))["created"] is False  # an upsert, as over gRPC

    got = await running.call("GetProduct", {"id": "mug-1"})
    assert got.status_code == 200 and got.json()["product"]["name"] == "mug-1"
    listed = await running.call("ListProducts", {"page_size": 10})
    assert [p["id"] for p in listed.json()["products"]] == ["mug-1"] and listed.json()["next_page_token"] == ""

    deleted = await running.call("DeleteProduct", {"id": "mug-1"})
    assert deleted.status_code == 200 and deleted.json() == {}
    assert (await running.call("GetProduct", {"id": "mug-1"})).status_code == 404
    info = await running.call("GetServiceInfo", {})
    assert info.json()["store"]["product_count"] == "0"  # int64: a string in protobuf JSON


async def test_search_by_text_over_http_matches_grpc(running: Running) -> None:
    await index(running, "red", jpeg_bytes((220, 20, 20)))
    await index(running, "blue", jpeg_bytes((20, 20, 220)))
    response = await running.call("SearchInline", {"query": {"text": "a red mug", "top_k": 2}})
    assert response.status_code == 200
    body = response.json()
    assert body["query_kind"] == "QUERY_KIND_TEXT"
    over_grpc = await running.stub.Search(_stream(pb.SearchRequest(query=pb.SearchQuery(text="a red mug", top_k=2))))
    assert [h["product"]["id"] for h in body["hits"]] == [h.product.id for h in over_grpc.hits]
    assert [h["score"] for h in body["hits"]] == pytest.approx([h.score for h in over_grpc.hits])


async def test_search_by_inline_image_over_http(running: Running) -> None:
    image = jpeg_bytes((30, 160, 40))
    await index(running, "green", image)
    await index(running, "red", jpeg_bytes((220, 20, 20)))
    body = (await running.call("SearchInline", {"query": {"top_k": 1}, "image": b64(image)})).json()
    assert body["query_kind"] == "QUERY_KIND_IMAGE"
    assert [h["product"]["id"] for h in body["hits"]] == ["green"] and body["hits"][0]["score"] > 0.99


@pytest.fixture
def image_host() -> Iterator[str]:
    """A local image server, for searches and indexing by URL."""
    image = jpeg_bytes((30, 160, 40))

    class Handler(QuietHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/green.jpg" else 404)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(image)))
            self.end_headers()
            self.wfile.write(image)

    with http_server(Handler) as port:
        yield f"http://127.0.0.1:{port}"


async def test_search_and_index_by_image_url_over_http(
    settings: Settings, encoder: ClipEncoder, image_host: str
) -> None:
    fetching = dataclasses.replace(settings, fetch_image_urls=True, fetch_allowed_hosts="127.0.0.1")
    async with serving(fetching, encoder) as running:
        indexed = await running.call(
            "IndexProductInline", {"product": product("green", image_url=f"{image_host}/green.jpg")}
        )
        assert indexed.status_code == 200 and indexed.json()["created"] is True
        await index(running, "red", jpeg_bytes((220, 20, 20)))
        query = {"image_url": f"{image_host}/green.jpg", "top_k": 1}
        body = (await running.call("SearchInline", {"query": query})).json()
        assert [h["product"]["id"] for h in body["hits"]] == ["green"] and body["hits"][0]["score"] > 0.99
        missing = await running.call("SearchInline", {"query": {"image_url": f"{image_host}/gone.jpg"}})
        assert missing.status_code == 400 and violations(missing) == ["query.image_url"]


async def test_inline_rpcs_over_grpc(running: Running) -> None:
    image = jpeg_bytes((30, 160, 40))
    indexed = await running.stub.IndexProductInline(
        pb.IndexProductInlineRequest(product=products_pb2.Product(id="green", name="g"), image=image)
    )
    assert indexed.created and indexed.product.id == "green"
    found = await running.stub.SearchInline(pb.SearchInlineRequest(query=pb.SearchQuery(top_k=1), image=image))
    assert [h.product.id for h in found.hits] == ["green"] and found.query_kind == pb.QUERY_KIND_IMAGE


def envelope(message: dict[str, Any], flags: int = 0) -> bytes:
    data = json.dumps(message).encode()
    return struct.pack(">BI", flags, len(data)) + data


def unenvelope(body: bytes) -> list[tuple[int, Any]]:
    messages, pos = [], 0
    while pos < len(body):
        flags, length = struct.unpack(">BI", body[pos : pos + 5])
        messages.append((flags, json.loads(body[pos + 5 : pos + 5 + length])))
        pos += 5 + length
    return messages


async def test_client_stream_over_connect_streaming(running: Running) -> None:
    # Connect clients (connect-go, connect-es, ...) call the streaming rpcs themselves: enveloped JSON messages.
    image = jpeg_bytes((30, 160, 40))
    await index(running, "green", image)
    body = envelope({"query": {"top_k": 1}}) + envelope({"image_chunk": b64(image)})
    response = await running.http.post(
        SERVICE + "Search", content=body, headers={"content-type": "application/connect+json"}
    )
    assert response.status_code == 200
    [(_, result), (end_flags, end)] = unenvelope(response.content)
    assert [h["product"]["id"] for h in result["hits"]] == ["green"]
    assert end_flags == 2 and "error" not in end


async def test_grpc_web_for_browsers(running: Running) -> None:
    response = await running.http.post(
        SERVICE + "GetServiceInfo", content=envelope({}), headers={"content-type": "application/grpc-web+json"}
    )
    assert response.status_code == 200
    body = response.content
    length = struct.unpack(">I", body[1:5])[0]
    assert json.loads(body[5 : 5 + length])["server_version"]
    trailers = body[5 + length :]
    assert trailers[0] == 0x80 and b"grpc-status:0" in trailers.replace(b" ", b"")


def test_search_inline_response_mirrors_search_response() -> None:
    # SearchInline answers with the bytes of a SearchResponse (service.py): the two must keep one wire format.
    def fields(message: Any) -> list[tuple[Any, ...]]:
        return [
            (f.name, f.number, f.type, f.is_repeated, f.message_type and f.message_type.full_name)
            for f in message.DESCRIPTOR.fields
        ]

    assert fields(pb.SearchInlineResponse) == fields(pb.SearchResponse)


# ---- errors: the gRPC status, as Connect errors -------------------------------------------------------------------


async def test_invalid_argument_is_400_with_bad_request(running: Running) -> None:
    response = await running.call("SearchInline", {"query": {"text": "mug", "top_k": 1000}})
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "invalid_argument" and "query.top_k" in body["message"]
    assert violations(response) == ["query.top_k"]
    # A readable copy beside the base64, for curl users.
    assert body["details"][0]["debug"]["field_violations"][0]["field"] == "query.top_k"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        pytest.param({"query": {"text": "mug"}, "image": b64(b"not an image")}, "image", id="undecodable-image"),
        pytest.param(
            {"query": {"image_url": "http://127.0.0.1/x.jpg"}, "image": b64(jpeg_bytes())},
            "query.image_url",
            id="image-and-url",
        ),
        pytest.param({"image": b64(jpeg_bytes())}, "query", id="no-query"),
    ],
)  # fmt: skip
async def test_inline_search_errors_name_the_inline_fields(running: Running, body: dict[str, Any], field: str) -> None:
    response = await running.call("SearchInline", body)
    assert response.status_code == 400
    assert field in violations(response)


async def test_oversized_inline_image_is_refused(settings: Settings, encoder: ClipEncoder) -> None:
    async with serving(dataclasses.replace(settings, max_image_bytes=4000), encoder) as running:
        response = await running.call("SearchInline", {"query": {}, "image": b64(b"x" * 5000)})
        assert response.status_code == 400 and violations(response) == ["image"]
        # Past the request limit (the image limit as base64 plus 256 KiB) the body is not read: RESOURCE_EXHAUSTED.
        huge = await running.call("SearchInline", {"query": {}, "image": b64(b"x" * 400_000)})
        assert huge.status_code == 429 and huge.json()["code"] == "resource_exhausted"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await running.stub.SearchInline(pb.SearchInlineRequest(image=b"x" * 5000))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"query": {"text": "mug"}', id="truncated-json"),
        pytest.param(b'{"querry": {"text": "mug"}}', id="unknown-field"),
        pytest.param(b'{"query": {"top_k": "many"}}', id="wrong-type"),
    ],
)
async def test_malformed_json_is_400(running: Running, body: bytes) -> None:
    response = await running.http.post(
        SERVICE + "SearchInline", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and response.json()["code"] == "invalid_argument"
    assert "google.rpc.BadRequest" in details(response)


async def test_not_found_is_404_with_resource_info(running: Running) -> None:
    response = await running.call("SearchInline", {"query": {"like_product_ids": ["ghost"]}})
    assert response.status_code == 404 and response.json()["code"] == "not_found"
    info = details(response)["google.rpc.ResourceInfo"]
    assert isinstance(info, error_details_pb2.ResourceInfo) and info.resource_name == "ghost"


async def test_store_outage_is_503_with_retry_info_and_health_follows(
    running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    down = raising(StoreUnavailable("qdrant is unreachable (injected)"))
    monkeypatch.setattr(running.components.store, "get", down)
    monkeypatch.setattr(running.components.store, "ping", down)
    response = await running.call("GetProduct", {"id": "any"})
    assert response.status_code == 503 and response.json()["code"] == "unavailable"
    retry = details(response)["google.rpc.RetryInfo"]
    assert isinstance(retry, error_details_pb2.RetryInfo) and retry.retry_delay.seconds >= 1
    # The same health as the gRPC port: NOT_SERVING while the store fails.
    healthz = await running.http.get("/healthz")
    assert healthz.status_code == 503 and healthz.json() == {"status": "NOT_SERVING"}
    check = await running.http.post("/grpc.health.v1.Health/Check", json={})
    assert check.json() == {"status": "NOT_SERVING"}


async def test_overload_is_429_with_retry_info(running: Running) -> None:
    admission = running.servers.service.admission
    admission.in_flight = admission.limit  # every encoding slot taken: the gRPC port's admission, shared
    try:
        response = await running.call("SearchInline", {"query": {"text": "mug"}})
    finally:
        admission.in_flight = 0
    assert response.status_code == 429 and response.json()["code"] == "resource_exhausted"
    assert "google.rpc.RetryInfo" in details(response)


async def test_deadline_is_504(running: Running) -> None:
    response = await running.call("SearchInline", {"query": {"text": "mug"}}, headers={"connect-timeout-ms": "0"})
    assert response.status_code == 504 and response.json()["code"] == "deadline_exceeded"


async def test_unexpected_failure_is_500_with_the_request_id_only(
    running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(running.components.store, "get", raising(RuntimeError("secret internals")))
    response = await running.call("GetProduct", {"id": "any"}, headers={"x-request-id": "req-42"})
    assert response.status_code == 500
    assert response.json() == {"code": "internal", "message": "internal error; request id req-42"}
    assert response.headers["x-request-id"] == "req-42"


async def test_unknown_method_is_404(running: Running) -> None:
    assert (await running.call("NoSuchMethod", {})).status_code == 404


async def test_request_id_is_echoed(running: Running) -> None:
    response = await running.call("GetServiceInfo", {}, headers={"x-request-id": "abc-1"})
    assert response.headers["x-request-id"] == "abc-1"
    assert len((await running.call("GetServiceInfo", {})).headers["x-request-id"]) == 32


# ---- API keys and TLS ---------------------------------------------------------------------------------------------


def keyed(settings: Settings, tmp_path: Path, **changes: Any) -> Settings:
    keys = tmp_path / "api-keys"
    keys.write_text(f"read {READ_KEY}\nwrite {WRITE_KEY}\n")
    return dataclasses.replace(settings, api_keys_file=keys, **changes)


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def test_api_keys_and_scopes_over_http(settings: Settings, encoder: ClipEncoder, tmp_path: Path) -> None:
    async with serving(keyed(settings, tmp_path), encoder) as running:
        body = {"product": product("p"), "image": b64(jpeg_bytes())}
        no_key = await running.call("IndexProductInline", body)
        assert no_key.status_code == 401 and no_key.json()["code"] == "unauthenticated"
        wrong = await running.call("SearchInline", {"query": {"text": "mug"}}, headers=bearer("wrong-key-0123456789"))
        assert wrong.status_code == 401
        read_only = await running.call("IndexProductInline", body, headers=bearer(READ_KEY))
        assert read_only.status_code == 403 and read_only.json()["code"] == "permission_denied"
        assert (await running.call("IndexProductInline", body, headers=bearer(WRITE_KEY))).status_code == 200
        search = await running.call("SearchInline", {"query": {"text": "mug"}}, headers=bearer(READ_KEY))
        assert search.status_code == 200 and [h["product"]["id"] for h in search.json()["hits"]] == ["p"]
        # Health and the documents stay open, as health and reflection on the gRPC port.
        assert (await running.http.get("/healthz")).status_code == 200
        assert (await running.http.post("/grpc.health.v1.Health/Check", json={})).status_code == 200
        assert (await running.http.get("/openapi.json")).status_code == 200


async def test_protect_all_closes_health_and_documents(
    settings: Settings, encoder: ClipEncoder, tmp_path: Path
) -> None:
    async with serving(keyed(settings, tmp_path, auth_protect_all=True), encoder) as running:
        for path in ("/healthz", "/openapi.json", "/docs/"):
            assert (await running.http.get(path)).status_code == 401, path
            assert (await running.http.get(path, headers=bearer(READ_KEY))).status_code == 200, path
        assert (await running.http.post("/grpc.health.v1.Health/Check", json={})).status_code == 401


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed_certificate(tmp_path_factory.mktemp("tls"), "localhost")


async def test_tls_settings_apply_to_the_http_port(
    settings: Settings, encoder: ClipEncoder, tls_files: tuple[Path, Path]
) -> None:
    cert, key = tls_files
    tls = dataclasses.replace(settings, tls_cert_file=cert, tls_key_file=key)
    async with serving(tls, encoder, verify=ssl.create_default_context(cafile=str(cert))) as running:
        assert running.servers.http is not None and running.servers.http.scheme == "https"
        assert (await running.http.get("/healthz")).json() == {"status": "SERVING"}
        async with httpx.AsyncClient() as plain:
            with pytest.raises(httpx.HTTPError):
                await plain.get(f"http://localhost:{running.servers.http.port}/healthz")


# ---- health, documents, drain -------------------------------------------------------------------------------------


async def test_openapi_document_and_docs_page(running: Running) -> None:
    document = (await running.http.get("/openapi.json")).json()
    unary = {m.name for m in DESCRIPTOR.methods if not (m.client_streaming or m.server_streaming)}
    assert {p.removeprefix(SERVICE) for p in document["paths"] if p.startswith(SERVICE)} == unary
    page = await running.http.get("/docs/")
    assert page.status_code == 200 and "../openapi.json" in page.text
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert (await running.http.get(f"/docs/{asset}")).status_code == 200
    redirect = await running.http.get("/docs")
    assert redirect.status_code == 308 and redirect.headers["location"] == "/docs/"
    assert (await running.http.get("/docs/../../etc/passwd")).status_code == 404


async def test_healthz_turns_503_when_draining(running: Running) -> None:
    assert (await running.http.get("/healthz")).json() == {"status": "SERVING"}
    await running.servers.store_health.servicer.enter_graceful_shutdown()
    assert (await running.http.get("/healthz")).status_code == 503


async def test_stop_lets_a_call_in_flight_finish(running: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    await index(running, "p", jpeg_bytes())
    store = running.components.store
    original = store.get
    entered = asyncio.Event()

    async def slow(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        await asyncio.sleep(0.3)
        return await original(*args, **kwargs)

    monkeypatch.setattr(store, "get", slow)
    call = asyncio.ensure_future(running.call("GetProduct", {"id": "p"}))
    await entered.wait()
    assert running.servers.http is not None
    await running.servers.http.stop(5)
    assert (await call).status_code == 200


async def _stream(*messages: Any) -> AsyncIterator[Any]:
    for message in messages:
        yield message


def test_connect_error_json_shape() -> None:
    from imagesearch.api.http import JsonCodec

    # Responses spell fields as in the .proto and write defaults; requests take either spelling.
    codec = JsonCodec()
    assert json.loads(codec.encode(pb.IndexProductInlineResponse())) == {"created": False}
    decoded = codec.decode(b'{"query": {"topK": 3, "page_size": 2}}', pb.SearchInlineRequest)
    assert isinstance(decoded, pb.SearchInlineRequest) and (decoded.query.top_k, decoded.query.page_size) == (3, 2)


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(
            pb.SearchInlineResponse(
                hits=[
                    pb.SearchHit(
                        product=products_pb2.Product(id="p", price=2.5, attributes={"k": "v"}), score=0.28108305
                    )
                ],
                query_kind=pb.QUERY_KIND_TEXT,
                server_time_ms=1.5,
            ),
            id="search",
        ),
        pytest.param(
            pb.GetServiceInfoResponse(store=pb.GetServiceInfoResponse.StoreInfo(product_count=2**40)), id="int64"
        ),
        pytest.param(pb.IndexProductInlineResponse(), id="defaults"),
        pytest.param(
            pb.IndexProductsResponse(id="x", error=status_for(InvalidArgument(FieldViolation("product.id", "bad")))),
            id="status-with-details",
        ),
    ],
)
def test_json_codec_writes_what_json_format_writes(message: Message) -> None:
    from google.protobuf import json_format

    from imagesearch.api.http import JsonCodec

    expected = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    # Floats match as float32 (json_format prints a float's shortest float32 form, protobuf-py its double form).
    assert _float32(json.loads(JsonCodec().encode(message))) == _float32(expected)


def _float32(value: Any) -> Any:
    if isinstance(value, float):
        return struct.unpack("f", struct.pack("f", value))[0]
    if isinstance(value, dict):
        return {k: _float32(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_float32(v) for v in value]
    return value


def test_grpc_status_maps_to_the_same_connect_code() -> None:
    from connectrpc.code import Code

    from imagesearch.api.http import connect_error
    from imagesearch.api.status import status_for
    from imagesearch.errors import InvalidArgument, NotFound, Overloaded

    for error, code in (
        (InvalidArgument([]), Code.INVALID_ARGUMENT),
        (NotFound("x"), Code.NOT_FOUND),
        (Overloaded("x"), Code.RESOURCE_EXHAUSTED),
    ):
        status = status_for(error)
        converted = connect_error(status)
        assert converted.code is code and converted.message == status.message
        assert [d.type_name for d in converted.details] == [d.type_url.rpartition("/")[2] for d in status.details]
        assert rpc_status.to_status(status).code.name.lower().replace("cancelled", "canceled") == code.value
