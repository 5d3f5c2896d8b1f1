"""Image URLs: fetched only when enabled, never from non-public addresses unless allow-listed (SSRF).

Real HTTP servers on several loopback addresses (127.0.0.2, 127.0.0.3 and 127.0.0.1, all on one port) serve the
images and record every request they get. Loopback is exactly what the default policy refuses, so each test
allow-lists the one it fetches from, and every refusal is shown to be the check's own: the server it would have
reached records no request. Host names resolve through a fake resolver (`FakeDns`) that answers with loopback
addresses; no traffic ever leaves loopback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.server
import io
import ipaddress
import random
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import RunningServer, jpeg_bytes, self_signed_certificate, start_server, stop_server
from PIL import Image
from rpc import index, product, search, stream, violated_fields

from imagesearch.config import Settings
from imagesearch.errors import ImageTooLarge, InvalidArgument
from imagesearch.model.encoder import ClipEncoder
from imagesearch.search.urlfetch import FetchPolicy, Hop, ImageFetcher, Resolve, _is_public, resolve_host
from imagesearch.v1 import image_search_service_pb2 as pb

IMAGE = jpeg_bytes((30, 160, 40), size=(96, 96))
# A call that should be refused at once gets this long before DEADLINE_EXCEEDED shows it was not: a bound on a
# wrong outcome, not a measurement.
DEADLINE_S = 60


def _noise_jpeg(size: int) -> bytes:
    """A valid JPEG of well over `size` // 2 bytes (noise does not compress)."""
    rng = random.Random(7)
    side = 64
    while True:
        image = Image.frombytes("RGB", (side, side), bytes(rng.getrandbits(8) for _ in range(side * side * 3)))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=95)
        if buffer.tell() > size:
            return buffer.getvalue()
        side *= 2


BIG_IMAGE = _noise_jpeg(150_000)
CAP = 100_000  # max_image_bytes for the size tests: BIG_IMAGE is over it, IMAGE well under


# --- loopback HTTP servers that record what they get ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Seen:
    path: str
    host_header: str | None


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ImageHost

    def do_GET(self) -> None:
        self.server.requests.append(Seen(self.path, self.headers.get("Host")))
        self.server.agents.append((self.headers.get("User-Agent"), self.headers.get("Accept")))
        route = self.server.routes.get(self.path.split("?", 1)[0])
        if route is None:
            self._send(404, b"")
        else:
            route(self)

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


Route = Callable[[_Handler], None]


def ok(body: bytes) -> Route:
    return lambda h: h._send(200, body, {"Content-Type": "image/jpeg"})


def redirect(location: str) -> Route:
    return lambda h: h._send(302, b"", {"Location": location})


def chunked(body: bytes) -> Route:
    """No Content-Length: only the running count can stop a body that is too large."""

    def route(h: _Handler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "image/jpeg")
        h.send_header("Transfer-Encoding", "chunked")
        h.send_header("Connection", "close")
        h.end_headers()
        for start in range(0, len(body), 8192):
            piece = body[start : start + 8192]
            h.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        h.wfile.write(b"0\r\n\r\n")

    return route


def declares(length: int, body: bytes) -> Route:
    """Declares `length` bytes, sends `body` (fewer) and holds the connection open."""

    def route(h: _Handler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "image/jpeg")
        h.send_header("Content-Length", str(length))
        h.end_headers()
        h.wfile.write(body)
        h.wfile.flush()
        h.server.release.wait()

    return route


def stalls(h: _Handler) -> None:
    """Reads the request and never answers."""
    h.server.release.wait()


def trickles(h: _Handler) -> None:
    """Answers, then sends a byte every 50 ms for as long as the client reads: no single read ever waits long."""
    h.send_response(200)
    h.send_header("Content-Type", "image/jpeg")
    h.send_header("Connection", "close")
    h.end_headers()
    while not h.server.release.wait(0.05):
        h.wfile.write(b"\xff")
        h.wfile.flush()


class ImageHost(http.server.ThreadingHTTPServer):
    def __init__(self, address: str, port: int, routes: dict[str, Route]) -> None:
        self.routes = routes
        self.requests: list[Seen] = []
        self.agents: list[tuple[str | None, str | None]] = []  # (User-Agent, Accept) of each request
        self.release = threading.Event()
        self.address_family = socket.AF_INET6 if ":" in address else socket.AF_INET
        super().__init__((address, port), _Handler)
        self.port: int = self.server_address[1]
        self.address = address
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def url(self, path: str, *, host: str | None = None, scheme: str = "http") -> str:
        host = host or (f"[{self.address}]" if ":" in self.address else self.address)
        return f"{scheme}://{host}:{self.port}{path}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hung up on a refused or cut-off body

    def stop(self) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()


@dataclasses.dataclass
class Hosts:
    """One HTTP server on each of three loopback addresses, all on the same port, so that the same URL reaches
    a different server depending only on which address the fetcher connects to."""

    a: ImageHost  # 127.0.0.2: the one tests allow-list
    b: ImageHost  # 127.0.0.3: another loopback address, not allow-listed
    local: ImageHost  # 127.0.0.1: what the system resolver answers for "localhost"

    @property
    def all(self) -> list[ImageHost]:
        return [self.a, self.b, self.local]


def _routes(port: int) -> dict[str, Route]:
    return {
        "/shoe.jpg": ok(IMAGE),
        "/big.jpg": ok(BIG_IMAGE),
        "/big-chunked.jpg": chunked(BIG_IMAGE),
        "/small-chunked.jpg": chunked(IMAGE),
        "/declares-big.jpg": declares(10 * CAP, IMAGE),
        "/stall.jpg": stalls,
        "/trickle.jpg": trickles,
        "/hop": redirect("/shoe.jpg"),
        # A Location header on a 200 is not a redirect; a redirect status without one is not an image.
        "/located.jpg": lambda h: h._send(200, IMAGE, {"Content-Type": "image/jpeg", "Location": "/big.jpg"}),
        "/no-location": lambda h: h._send(302, b""),
        "/loop": redirect("/loop"),
        "/to-b": redirect(f"http://127.0.0.3:{port}/shoe.jpg"),
        "/to-localhost": redirect(f"http://localhost:{port}/shoe.jpg"),
        "/to-ftp": redirect(f"ftp://127.0.0.2:{port}/shoe.jpg"),
    }


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    for _ in range(20):  # another process may hold the port on one of the other addresses: try another port
        started: list[ImageHost] = []
        try:
            started.append(ImageHost("127.0.0.2", 0, {}))
            port = started[0].port
            started[0].routes.update(_routes(port))
            started += [ImageHost(address, port, _routes(port)) for address in ("127.0.0.3", "127.0.0.1")]
        except OSError:
            for host in started:
                host.stop()
            continue
        try:
            yield Hosts(*started)
        finally:
            for host in started:
                host.stop()
        return
    pytest.fail("no port free on 127.0.0.1, 127.0.0.2 and 127.0.0.3 at once")


class FakeDns:
    """The addresses of a few host names, recording every lookup. Literal addresses resolve to themselves, other
    names do not resolve: nothing reaches a real DNS server."""

    def __init__(self, answers: dict[str, list[str]] | None = None) -> None:
        self.answers = answers or {}
        self.lookups: list[str] = []
        self.ports: list[int] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        self.ports.append(port)
        try:
            return [str(ipaddress.ip_address(host))]
        except ValueError:
            pass
        if host not in self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "unknown name")
        return self.answers[host]


# --- the service under test ----------------------------------------------------------------------------------

Start = Callable[..., Awaitable[RunningServer]]


@pytest.fixture
async def start(settings: Settings, encoder: ClipEncoder) -> AsyncIterator[Start]:
    """Starts a real server with URL fetching on and the given settings; with `resolve`, its fetcher looks host
    names up there instead of in the system resolver (everything else as the server builds it)."""
    started: list[RunningServer] = []

    async def start_fetching(*, resolve: Resolve | None = None, **changes: Any) -> RunningServer:
        data_dir = settings.data_dir.with_name(f"data-{len(started)}")  # each server its own store
        changes.setdefault("fetch_image_urls", True)
        fetching = dataclasses.replace(settings, data_dir=data_dir, **changes)
        running = await start_server(fetching, encoder, resolve=resolve)
        started.append(running)
        return running

    try:
        yield start_fetching
    finally:
        for running in started:
            await stop_server(running)


async def _search_url(running: RunningServer, url: str) -> pb.SearchResponse:
    response: pb.SearchResponse = await running.stub.Search(
        stream(pb.SearchRequest(query=pb.SearchQuery(image_url=url))), timeout=DEADLINE_S
    )
    return response


async def _refused(running: RunningServer, url: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _search_url(running, url)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, url
    assert violated_fields(err.value) == ["query.image_url"], url


def _paths(host: ImageHost) -> list[str]:
    return [seen.path for seen in host.requests]


# --- fetching that works --------------------------------------------------------------------------------------


async def test_search_by_image_url_matches_search_by_bytes(start: Start, hosts: Hosts) -> None:
    running = await start(fetch_allowed_hosts="127.0.0.2")
    await index(running.stub, product("shoe"), IMAGE)
    await index(running.stub, product("other"), jpeg_bytes((200, 0, 200)))
    by_url = await _search_url(running, hosts.a.url("/shoe.jpg"))
    by_bytes = await search(running.stub, image=IMAGE)
    assert [h.product.id for h in by_url.hits] == [h.product.id for h in by_bytes.hits]
    assert by_url.hits[0].product.id == "shoe"
    assert by_url.query_kind == pb.QUERY_KIND_IMAGE
    redirected = await _search_url(running, hosts.a.url("/hop"))
    assert redirected.hits[0].product.id == "shoe"
    assert _paths(hosts.a) == ["/shoe.jpg", "/hop", "/shoe.jpg"]


async def test_index_fetches_product_image_url_when_no_chunks(start: Start, hosts: Hosts) -> None:
    running = await start(fetch_allowed_hosts="127.0.0.2")
    item = product("by-url", image_url=hosts.a.url("/shoe.jpg"))
    response = await running.stub.IndexProduct(stream(pb.IndexProductRequest(product=item)))
    assert response.created
    assert (await search(running.stub, image=IMAGE)).hits[0].product.id == "by-url"


# --- which addresses: refused before any connection ------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.2", "127.0.0.3", "localhost", "LOCALHOST"])
async def test_default_policy_refuses_loopback_without_connecting(start: Start, hosts: Hosts, host: str) -> None:
    running = await start()  # no allow-list
    await _refused(running, hosts.a.url("/shoe.jpg", host=host))
    assert [h.requests for h in hosts.all] == [[], [], []]


async def test_allow_list_by_network_admits_only_its_range(start: Start, hosts: Hosts) -> None:
    running = await start(fetch_allowed_hosts="10.0.0.0/8, 127.0.0.2/32")
    await _search_url(running, hosts.a.url("/shoe.jpg"))
    await _refused(running, hosts.b.url("/shoe.jpg"))  # 127.0.0.3: loopback, outside the range
    assert _paths(hosts.a) == ["/shoe.jpg"]
    assert hosts.b.requests == []


async def test_allow_list_by_name_admits_only_that_name(start: Start, hosts: Hosts) -> None:
    dns = FakeDns({"images.internal": ["127.0.0.2"], "other.internal": ["127.0.0.2"]})
    running = await start(fetch_allowed_hosts="Images.Internal", resolve=dns)
    await _search_url(running, hosts.a.url("/shoe.jpg", host="images.internal"))
    await _refused(running, hosts.a.url("/shoe.jpg", host="other.internal"))  # the same address, another name
    await _refused(running, hosts.a.url("/shoe.jpg"))  # the address itself is not on the list either
    assert hosts.a.requests == [Seen("/shoe.jpg", f"images.internal:{hosts.a.port}")]


async def test_every_address_a_name_resolves_to_must_be_allowed(start: Start, hosts: Hosts) -> None:
    # The first answer is allowed (and is the one a fetcher would connect to); the second is the cloud metadata
    # endpoint. Refused, and no connection is made even to the allowed one.
    dns = FakeDns({"mixed.test": ["127.0.0.2", "169.254.169.254"]})
    running = await start(fetch_allowed_hosts="127.0.0.2", resolve=dns)
    await _refused(running, hosts.a.url("/shoe.jpg", host="mixed.test"))
    assert hosts.a.requests == []


async def test_connection_goes_to_the_checked_address(start: Start, hosts: Hosts) -> None:
    # DNS rebinding: the checked lookup says 127.0.0.2 (allowed), a second lookup would say 127.0.0.1 (what the
    # system resolver answers for "localhost", where another server listens on the same port). The fetcher
    # must connect to the address it checked, once per hop, with the name in the Host header.
    dns = FakeDns({"localhost": ["127.0.0.2"]})
    running = await start(fetch_allowed_hosts="127.0.0.2", resolve=dns)
    await _search_url(running, hosts.a.url("/hop", host="localhost"))
    host_header = f"localhost:{hosts.a.port}"
    assert hosts.a.requests == [Seen("/hop", host_header), Seen("/shoe.jpg", host_header)]
    assert hosts.local.requests == []
    assert dns.lookups == ["localhost", "localhost"]  # each hop looked up and checked


async def test_tls_server_name_is_the_host_name(start: Start, tls_host: TlsHost) -> None:
    # Connecting to the checked address must still send the name in TLS SNI (and check the certificate for it).
    # The test server's certificate is not trusted, so the fetch fails after the server has seen the name.
    dns = FakeDns({"shop.test": ["127.0.0.2"]})
    running = await start(fetch_allowed_hosts="127.0.0.2", resolve=dns)
    await _refused(running, f"https://shop.test:{tls_host.port}/shoe.jpg")
    assert tls_host.server_names == ["shop.test"]


# --- redirects: every hop checked -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "target"),
    [
        pytest.param("/to-b", "b", id="to-another-loopback-address"),
        pytest.param("/to-localhost", "local", id="to-localhost"),
    ],
)
async def test_redirect_to_a_refused_address_is_not_followed(
    start: Start, hosts: Hosts, path: str, target: str
) -> None:
    running = await start(fetch_allowed_hosts="127.0.0.2")
    await _refused(running, hosts.a.url(path))
    assert _paths(hosts.a) == [path]
    assert getattr(hosts, target).requests == []


async def test_redirects_are_limited(start: Start, hosts: Hosts) -> None:
    running = await start(fetch_allowed_hosts="127.0.0.2", fetch_max_redirects=2)
    await _refused(running, hosts.a.url("/loop"))
    assert _paths(hosts.a) == ["/loop"] * 3  # the request and two redirects, then no more


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("ftp://127.0.0.2:{port}/shoe.jpg", id="ftp"),
        pytest.param("gopher://127.0.0.2:{port}/shoe.jpg", id="gopher"),
        pytest.param("ws://127.0.0.2:{port}/shoe.jpg", id="ws"),
        pytest.param("file:///etc/passwd", id="file"),
        pytest.param("//127.0.0.2:{port}/shoe.jpg", id="no-scheme"),
        pytest.param("http:///shoe.jpg", id="no-host"),
        pytest.param("127.0.0.2:{port}/shoe.jpg", id="not-a-url"),
        pytest.param("http://127.0.0.2:{port}/to-ftp", id="redirect-to-ftp"),
    ],
)
async def test_only_http_and_https_are_fetched(start: Start, hosts: Hosts, url: str) -> None:
    # The host is allowed: only the scheme check can refuse, and it does before looking anything up.
    dns = FakeDns()
    running = await start(fetch_allowed_hosts="127.0.0.2", resolve=dns)
    redirects = "/to-" in url
    await _refused(running, url.format(port=hosts.a.port))
    assert dns.lookups == (["127.0.0.2"] if redirects else [])
    assert _paths(hosts.a) == (["/to-ftp"] if redirects else [])


# --- size and time limits -------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/big.jpg", "/big-chunked.jpg"], ids=["content-length", "chunked"])
async def test_body_over_the_limit_is_refused(start: Start, hosts: Hosts, path: str) -> None:
    # BIG_IMAGE is a valid image: without the cap it would be searched with.
    running = await start(fetch_allowed_hosts="127.0.0.2", max_image_bytes=CAP)
    await _refused(running, hosts.a.url(path))
    await _search_url(running, hosts.a.url("/small-chunked.jpg"))  # the same server, under the limit
    larger = await start(fetch_allowed_hosts="127.0.0.2", max_image_bytes=2 * len(BIG_IMAGE))
    await _search_url(larger, hosts.a.url(path))


async def test_declared_length_over_the_limit_is_refused_before_reading(start: Start, hosts: Hosts) -> None:
    # The server declares more than the limit, sends less and waits: only the declared length can refuse this
    # before the (long) fetch timeout; reading the body would run into DEADLINE_EXCEEDED instead.
    running = await start(fetch_allowed_hosts="127.0.0.2", max_image_bytes=CAP, fetch_timeout_s=3 * DEADLINE_S)
    await _refused(running, hosts.a.url("/declares-big.jpg"))


@pytest.mark.parametrize("path", ["/stall.jpg", "/trickle.jpg"], ids=["no-answer", "endless-body"])
async def test_fetch_timeout_bounds_a_slow_server(start: Start, hosts: Hosts, path: str) -> None:
    # Without the timeout the call would run into its deadline (DEADLINE_EXCEEDED); the server did get the
    # request, so the refusal is the timeout's, not a connection error.
    running = await start(fetch_allowed_hosts="127.0.0.2", fetch_timeout_s=0.5)
    await _refused(running, hosts.a.url(path))
    assert _paths(hosts.a) == [path]


async def test_http_error_answer_is_refused(start: Start, hosts: Hosts) -> None:
    running = await start(fetch_allowed_hosts="127.0.0.2")
    await _refused(running, hosts.a.url("/missing.jpg"))
    assert _paths(hosts.a) == ["/missing.jpg"]


# --- off by default, and one image per request ----------------------------------------------------------------


async def test_fetching_is_off_by_default(running: RunningServer, hosts: Hosts) -> None:
    await _refused(running, hosts.a.url("/shoe.jpg"))
    assert hosts.a.requests == []


async def test_fetching_stays_off_with_an_allow_list(start: Start, hosts: Hosts) -> None:
    running = await start(fetch_image_urls=False, fetch_allowed_hosts="127.0.0.2")
    await _refused(running, hosts.a.url("/shoe.jpg"))
    with pytest.raises(grpc.aio.AioRpcError) as err:  # and a product URL alone is not an image
        await running.stub.IndexProduct(
            stream(pb.IndexProductRequest(product=product("p", image_url=hosts.a.url("/shoe.jpg"))))
        )
    assert "image_chunk" in violated_fields(err.value)
    assert hosts.a.requests == []


async def test_image_url_and_chunks_together_are_refused(start: Start, hosts: Hosts) -> None:
    running = await start(fetch_allowed_hosts="127.0.0.2")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await running.stub.Search(
            stream(
                pb.SearchRequest(query=pb.SearchQuery(image_url=hosts.a.url("/shoe.jpg"))),
                pb.SearchRequest(image_chunk=IMAGE),
            )
        )
    assert violated_fields(err.value) == ["query.image_url"]
    assert hosts.a.requests == []


# --- the address rule and the allow-list syntax ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("93.184.216.34", True),
        ("2606:4700::1111", True),
        ("127.0.0.1", False),
        ("127.0.0.2", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),  # carrier-grade NAT
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("255.255.255.255", False),
        ("::1", False),
        ("::", False),
        ("fe80::1", False),
        ("fd00::1", False),
        ("ff02::1", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped loopback
        ("::ffff:169.254.169.254", False),
    ],
)
def test_public_address_rule(address: str, public: bool) -> None:
    assert _is_public(ipaddress.ip_address(address)) is public


def test_allow_list_accepts_networks_and_names() -> None:
    hosts, networks = FetchPolicy.parse_allow_list(" Images.Internal , 10.0.0.0/8,127.0.0.1,, fd00::/8")
    assert hosts == frozenset({"images.internal"})
    assert [str(n) for n in networks] == ["10.0.0.0/8", "127.0.0.1/32", "fd00::/8"]


# --- the fetcher itself, without a server: what each refusal says, and the settings that guard it ------------

FIELD = "query.image_url"
Fetcher = Callable[..., ImageFetcher]


@pytest.fixture
async def fetcher() -> AsyncIterator[Fetcher]:
    """Builds fetchers (URL fetching on, the allow-list given as the setting's text) and closes them after."""
    made: list[ImageFetcher] = []

    def build(dns: Resolve | None = None, *, allow: str = "127.0.0.2", **policy: Any) -> ImageFetcher:
        names, networks = FetchPolicy.parse_allow_list(allow)
        policy = {"enabled": True, "allowed_hosts": names, "allowed_networks": networks, **policy}
        made.append(ImageFetcher(FetchPolicy(**policy), resolve=dns or FakeDns()))
        return made[-1]

    yield build
    for each in made:
        await each.close()


async def _why(fetcher: ImageFetcher, url: str) -> str:
    """The description of the one violation a refused fetch raises; it names the field it was given."""
    with pytest.raises(InvalidArgument) as err:
        await fetcher.fetch(url, field=FIELD)
    [violation] = err.value.violations
    assert violation.field == FIELD
    return violation.description


def _closed_port() -> int:
    """A port on 127.0.0.2 where nothing listens (bound, then released)."""
    with socket.create_server(("127.0.0.2", 0)) as probe:
        return int(probe.getsockname()[1])


async def test_each_refusal_says_why(fetcher: Fetcher, hosts: Hosts) -> None:
    dns = FakeDns({"metadata.test": ["10.0.0.1", "169.254.169.254"], "empty.test": []})
    fetch = fetcher(dns, max_redirects=2)
    assert await _why(ImageFetcher(FetchPolicy()), hosts.a.url("/shoe.jpg")) == (
        "fetching images by URL is disabled on this server: send the image bytes"
    )
    ftp = f"ftp://127.0.0.2:{hosts.a.port}/shoe.jpg"
    assert await _why(fetch, ftp) == f"only http and https URLs can be fetched, got {ftp!r}"
    for malformed in ("http://127.0.0.2:99999/shoe.jpg", "http://127.0.0.2:port/shoe.jpg", "http://[::1/shoe.jpg"):
        assert await _why(fetch, malformed) == f"{malformed!r} is not a valid URL"
    assert await _why(fetch, "http://nowhere.test/shoe.jpg") == "cannot resolve host 'nowhere.test'"
    assert await _why(fetch, "http://empty.test/shoe.jpg") == "cannot resolve host 'empty.test'"
    assert await _why(fetch, "http://metadata.test/a.jpg") == (
        "metadata.test resolves to a non-public address (10.0.0.1); refused"
    )
    missing = hosts.a.url("/missing.jpg")
    assert await _why(fetch, missing) == f"{missing} answered HTTP 404"
    no_location = hosts.a.url("/no-location")
    assert await _why(fetch, no_location) == f"{no_location} answered HTTP 302"
    assert await _why(fetch, hosts.a.url("/loop")) == "more than 2 redirects"
    closed = f"http://127.0.0.2:{_closed_port()}/shoe.jpg"
    assert await _why(fetch, closed) == f"could not fetch {closed}: ConnectError"


async def test_size_refusals_say_which_limit_and_the_limit_itself_is_allowed(fetcher: Fetcher, hosts: Hosts) -> None:
    # A body of exactly max_bytes is fine, whether its length is declared or only counted; one byte less is not.
    exact = fetcher(max_bytes=len(IMAGE))
    for path in ("/shoe.jpg", "/small-chunked.jpg"):
        assert await exact.fetch(hosts.a.url(path), field=FIELD) == IMAGE
    under = fetcher(max_bytes=len(IMAGE) - 1)
    declared, counted = hosts.a.url("/shoe.jpg"), hosts.a.url("/small-chunked.jpg")
    for url, why in (
        (declared, f"{declared} is {len(IMAGE)} bytes; the limit is {len(IMAGE) - 1}"),
        (counted, f"{counted} exceeds the limit of {len(IMAGE) - 1} bytes"),
    ):
        with pytest.raises(ImageTooLarge) as err:
            await under.fetch(url, field=FIELD)
        assert [(v.field, v.description) for v in err.value.violations] == [(FIELD, why)]


async def test_read_timeout_and_overall_timeout_are_both_enforced(fetcher: Fetcher, hosts: Hosts) -> None:
    # A server that never answers is cut off by the HTTP client's read timeout (timeout_s); one that answers a
    # byte at a time never lets a read time out, and is cut off by the bound on the whole fetch (twice timeout_s).
    fetch = fetcher(timeout_s=0.5)
    stall, trickle = hosts.a.url("/stall.jpg"), hosts.a.url("/trickle.jpg")
    assert await _why(fetch, stall) == f"could not fetch {stall}: ReadTimeout"
    assert await _why(fetch, trickle) == f"fetching {trickle} timed out"


async def test_a_200_with_a_location_header_is_the_image(fetcher: Fetcher, hosts: Hosts) -> None:
    assert await fetcher().fetch(hosts.a.url("/located.jpg"), field=FIELD) == IMAGE
    assert _paths(hosts.a) == ["/located.jpg"]


async def test_requests_say_who_asks_and_for_what(fetcher: Fetcher, hosts: Hosts) -> None:
    await fetcher().fetch(hosts.a.url("/shoe.jpg"), field=FIELD)
    assert hosts.a.agents == [("imagesearch/1 (+image fetch)", "image/*")]


async def test_environment_proxies_are_ignored(fetcher: Fetcher, hosts: Hosts, monkeypatch: pytest.MonkeyPatch) -> None:
    # A proxy from the environment would make the connection, to wherever it likes: the address checks would
    # check nothing. The "proxy" here is the server on 127.0.0.3; it must see no request.
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, f"http://127.0.0.3:{hosts.b.port}")
    assert await fetcher().fetch(hosts.a.url("/shoe.jpg"), field=FIELD) == IMAGE
    assert hosts.b.requests == []


async def test_urls_without_a_port_use_the_schemes_default(fetcher: Fetcher) -> None:
    # The lookup (and so the check and the connection) is for port 80 or 443. Nothing listens there on
    # 127.0.0.2, so the fetch itself fails; what matters is where it went.
    dns = FakeDns({"images.test": ["127.0.0.2"]})
    fetch = fetcher(dns, allow="images.test")
    for url in ("http://images.test/shoe.jpg", "https://images.test/shoe.jpg", "http://images.test:8080/a.jpg"):
        with contextlib.suppress(InvalidArgument):
            await fetch.fetch(url, field=FIELD)
    assert dns.ports == [80, 443, 8080]


@pytest.mark.parametrize(
    ("url", "host", "port", "host_header", "target"),
    [
        ("http://Shop.Test/a.jpg?x=1", "shop.test", 80, "shop.test", "http://192.0.2.1:80/a.jpg?x=1"),
        ("https://shop.test/a.jpg", "shop.test", 443, "shop.test", "https://192.0.2.1:443/a.jpg"),
        ("http://shop.test:8080/a.jpg", "shop.test", 8080, "shop.test:8080", "http://192.0.2.1:8080/a.jpg"),
        ("https://shop.test:80/a.jpg", "shop.test", 80, "shop.test:80", "https://192.0.2.1:80/a.jpg"),
        ("http://[2001:db8::1]:8080/a.jpg", "2001:db8::1", 8080, "[2001:db8::1]:8080", "http://192.0.2.1:8080/a.jpg"),
        ("http://[2001:db8::1]/a.jpg", "2001:db8::1", 80, "[2001:db8::1]", "http://192.0.2.1:80/a.jpg"),
    ],
)
def test_hop_keeps_the_urls_name_and_connects_to_the_checked_address(
    url: str, host: str, port: int, host_header: str, target: str
) -> None:
    hop = Hop.of(url, FIELD)
    assert (hop.host, hop.port, hop.host_header) == (host, port, host_header)
    assert hop.target("192.0.2.1") == target
    assert hop.target("2001:db8::2") == target.replace("192.0.2.1", "[2001:db8::2]")


async def test_ipv6_addresses_are_fetched_in_brackets(fetcher: Fetcher) -> None:
    try:
        host = ImageHost("::1", 0, {"/shoe.jpg": ok(IMAGE)})
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    try:
        dns = FakeDns({"v6.test": ["::1"]})
        fetch = fetcher(dns, allow="::1")
        assert await fetch.fetch(host.url("/shoe.jpg"), field=FIELD) == IMAGE
        assert await fetch.fetch(host.url("/shoe.jpg", host="v6.test"), field=FIELD) == IMAGE
        assert host.requests == [Seen("/shoe.jpg", f"[::1]:{host.port}"), Seen("/shoe.jpg", f"v6.test:{host.port}")]
    finally:
        host.stop()


async def test_a_scoped_address_is_checked_without_its_zone(fetcher: Fetcher) -> None:
    # Resolvers answer link-local IPv6 addresses with a zone ("%eth0"); the address before it is what is checked.
    dns = FakeDns({"scoped.test": ["fe80::1%eth0"]})
    why = await _why(fetcher(dns), "http://scoped.test/a.jpg")
    assert why == "scoped.test resolves to a non-public address (fe80::1); refused"


async def test_the_system_resolver_answers_each_address_once() -> None:
    assert await resolve_host("127.0.0.1", 80) == ["127.0.0.1"]


def test_allow_list_networks_may_name_any_address_in_them() -> None:
    # "10.1.2.3/8" is the operator's way of writing 10.0.0.0/8: a network, not a host name that matches nothing.
    assert FetchPolicy.parse_allow_list("10.1.2.3/8") == (frozenset(), (ipaddress.ip_network("10.0.0.0/8"),))


# --- a TLS server that records the server name clients ask for ------------------------------------------------


class TlsHost:
    def __init__(self, cert: Path, key: Path) -> None:
        self.server_names: list[str | None] = []
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        context.sni_callback = self._record_name
        self._context = context
        self._socket = socket.create_server(("127.0.0.2", 0))
        self.port: int = self._socket.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _record_name(
        self, connection: ssl.SSLObject | ssl.SSLSocket, name: str | None, context: ssl.SSLContext
    ) -> None:
        self.server_names.append(name)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._socket.accept()
            except OSError:
                return  # closed
            with conn:
                try:
                    with self._context.wrap_socket(conn, server_side=True) as tls:
                        tls.recv(1)
                except (OSError, ssl.SSLError):
                    pass

    def stop(self) -> None:
        self._socket.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone would not
        self._socket.close()
        self._thread.join()


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed_certificate(tmp_path_factory.mktemp("tls"), "shop.test")


@pytest.fixture
def tls_host(self_signed: tuple[Path, Path]) -> Iterator[TlsHost]:
    host = TlsHost(*self_signed)
    try:
        yield host
    finally:
        host.stop()
