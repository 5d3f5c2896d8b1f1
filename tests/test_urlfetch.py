"""Image URLs: fetched only when enabled, never from non-public addresses unless allow-listed (SSRF).

A real HTTP server on loopback serves the images; loopback is exactly what the default policy must refuse, so
the tests that fetch successfully allow-list 127.0.0.1 explicitly.
"""

from __future__ import annotations

import dataclasses
import http.server
import ipaddress
import threading
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from conftest import RunningServer, jpeg_bytes, start_server, stop_server
from rpc import index, product, search, stream, violated_fields

from imagesearch.config import Settings
from imagesearch.errors import InvalidArgument
from imagesearch.model.encoder import ClipEncoder
from imagesearch.search.urlfetch import FetchPolicy, ImageFetcher, _is_public
from imagesearch.v1 import image_search_service_pb2 as pb

IMAGE = jpeg_bytes((30, 160, 40), size=(96, 96))


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        routes = {
            "/shoe.jpg": (200, {"Content-Type": "image/jpeg"}, IMAGE),
            "/big.jpg": (200, {"Content-Type": "image/jpeg"}, b"\xff" * 200_000),
            "/missing.jpg": (404, {}, b"no"),
            "/hop": (302, {"Location": "/shoe.jpg"}, b""),
            "/loop": (302, {"Location": "/loop"}, b""),
            "/to-metadata": (302, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""),
        }
        status, headers, body = routes.get(self.path, (404, {}, b""))
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def image_host() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
async def fetching(settings: Settings, encoder: ClipEncoder) -> AsyncIterator[RunningServer]:
    running = await start_server(
        dataclasses.replace(settings, fetch_image_urls=True, fetch_allowed_hosts="127.0.0.1", max_image_bytes=100_000),
        encoder,
    )
    try:
        yield running
    finally:
        await stop_server(running)


async def _search_url(running: RunningServer, url: str) -> pb.SearchResponse:
    response: pb.SearchResponse = await running.stub.Search(
        stream(pb.SearchRequest(query=pb.SearchQuery(image_url=url)))
    )
    return response


async def test_search_by_image_url_matches_search_by_bytes(fetching: RunningServer, image_host: str) -> None:
    await index(fetching.stub, product("shoe"), IMAGE)
    await index(fetching.stub, product("other"), jpeg_bytes((200, 0, 200)))
    by_url = await _search_url(fetching, f"{image_host}/shoe.jpg")
    by_bytes = await search(fetching.stub, image=IMAGE)
    assert [h.product.id for h in by_url.hits] == [h.product.id for h in by_bytes.hits]
    assert by_url.hits[0].product.id == "shoe"
    assert by_url.query_kind == pb.QUERY_KIND_IMAGE
    redirected = await _search_url(fetching, f"{image_host}/hop")
    assert redirected.hits[0].product.id == "shoe"


async def test_index_fetches_product_image_url_when_no_chunks(fetching: RunningServer, image_host: str) -> None:
    item = product("by-url", image_url=f"{image_host}/shoe.jpg")
    response = await fetching.stub.IndexProduct(stream(pb.IndexProductRequest(product=item)))
    assert response.created
    assert (await search(fetching.stub, image=IMAGE)).hits[0].product.id == "by-url"


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/missing.jpg", id="http-404"),
        pytest.param("/big.jpg", id="too-large"),
        pytest.param("/loop", id="redirect-loop"),
        pytest.param("/to-metadata", id="redirect-to-link-local"),
    ],
)
async def test_bad_image_urls_are_refused(fetching: RunningServer, image_host: str, path: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _search_url(fetching, image_host + path)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(err.value) == ["query.image_url"]


async def test_default_policy_refuses_loopback(settings: Settings, encoder: ClipEncoder, image_host: str) -> None:
    running = await start_server(dataclasses.replace(settings, fetch_image_urls=True), encoder)  # no allow-list
    try:
        for url in (f"{image_host}/shoe.jpg", "http://localhost/x.jpg", "file:///etc/passwd", "ftp://a/b.jpg"):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _search_url(running, url)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, url
    finally:
        await stop_server(running)


async def test_fetching_is_off_by_default(running: RunningServer, image_host: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _search_url(running, f"{image_host}/shoe.jpg")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as err:  # and a product URL alone is not an image
        await running.stub.IndexProduct(
            stream(pb.IndexProductRequest(product=product("p", image_url=f"{image_host}/shoe.jpg")))
        )
    assert "image_chunk" in violated_fields(err.value)


async def test_image_url_and_chunks_together_are_refused(fetching: RunningServer, image_host: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fetching.stub.Search(
            stream(
                pb.SearchRequest(query=pb.SearchQuery(image_url=f"{image_host}/shoe.jpg")),
                pb.SearchRequest(image_chunk=IMAGE),
            )
        )
    assert violated_fields(err.value) == ["query.image_url"]


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("93.184.216.34", True),
        ("2606:4700::1111", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),  # carrier-grade NAT
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("::1", False),
        ("fe80::1", False),
        ("fd00::1", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped loopback
    ],
)
def test_public_address_rule(address: str, public: bool) -> None:
    assert _is_public(ipaddress.ip_address(address)) is public


async def test_allow_list_accepts_networks_and_names() -> None:
    hosts, networks = FetchPolicy.parse_allow_list(" Images.Internal , 10.0.0.0/8,127.0.0.1")
    assert hosts == frozenset({"images.internal"})
    assert [str(n) for n in networks] == ["10.0.0.0/8", "127.0.0.1/32"]
    fetcher = ImageFetcher(FetchPolicy(enabled=True))
    try:
        with pytest.raises(InvalidArgument):
            await fetcher.fetch("http://127.0.0.1:9/x.jpg", field="f")
    finally:
        await fetcher.close()
