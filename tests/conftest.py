"""Shared fixtures: a real grpc.aio server on a free port, with the bundled trained test model, a real Qdrant Edge
store in a temp dir and a real cache backend, driven through the generated stubs."""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import grpc
import pytest
from grpc_health.v1 import health_pb2_grpc
from PIL import Image

from imagesearch.api.health import StoreHealth
from imagesearch.config import ENV_PREFIX, Settings
from imagesearch.model.encoder import ClipEncoder
from imagesearch.search.urlfetch import ImageFetcher, Resolve
from imagesearch.server import Components, build_server, open_components
from imagesearch.store import VectorStore
from imagesearch.v1 import image_search_service_pb2_grpc as pb_grpc

# The small CLIP the project trains itself (src/imagesearch/models/synthetic-clip): a real, learned open_clip
# model that loads in a fraction of a second, so tests exercise the real encoder path and real rankings.
TEST_MODEL = "synthetic-clip"


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def encoder() -> ClipEncoder:
    return ClipEncoder.load(TEST_MODEL, device="cpu")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(host="127.0.0.1", port=0, data_dir=tmp_path / "data", model=TEST_MODEL, device="cpu")


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    components: Components
    store_health: StoreHealth
    channel: grpc.aio.Channel
    stub: pb_grpc.ImageSearchServiceAsyncStub
    health: health_pb2_grpc.HealthStub

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


async def start_server(
    settings: Settings,
    encoder: ClipEncoder,
    store: VectorStore | None = None,
    resolve: Resolve | None = None,
    handlers: Sequence[grpc.GenericRpcHandler] = (),
) -> RunningServer:
    """A real server on a free port; `store` replaces the embedded store the settings would open, `resolve` the
    system resolver its URL fetcher would look host names up in, and `handlers` serve methods besides the service's."""
    components = await open_components(settings, encoder=encoder)
    if store is not None:
        await components.store.close()
        components.store = store
    if resolve is not None:
        await components.fetcher.close()
        components.fetcher = ImageFetcher(components.fetcher.policy, resolve=resolve)
    server, port, store_health = build_server(settings, components)
    server.add_generic_rpc_handlers(tuple(handlers))
    await server.start()
    await store_health.serving()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return RunningServer(
        server,
        port,
        components,
        store_health,
        channel,
        pb_grpc.ImageSearchServiceStub(channel),
        health_pb2_grpc.HealthStub(channel),
    )


def self_signed_certificate(directory: Path, dns_name: str) -> tuple[Path, Path]:
    """A self-signed EC certificate for `dns_name` (CN and subjectAltName) and its key, made with openssl in
    `directory`: (cert.pem, key.pem)."""
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", "key.pem", "-out", "cert.pem", "-days", "2", "-subj", f"/CN={dns_name}",
         "-addext", f"subjectAltName=DNS:{dns_name}"],
        cwd=directory, check=True, capture_output=True,
    )  # fmt: skip
    return directory / "cert.pem", directory / "key.pem"


async def stop_server(running: RunningServer) -> None:
    await running.channel.close()
    await running.server.stop(0)
    await running.store_health.close()
    await running.components.close()


@pytest.fixture
async def running(settings: Settings, encoder: ClipEncoder) -> AsyncIterator[RunningServer]:
    started = await start_server(settings, encoder)
    try:
        yield started
    finally:
        await stop_server(started)


@pytest.fixture
def stub(running: RunningServer) -> pb_grpc.ImageSearchServiceAsyncStub:
    return running.stub


def jpeg_bytes(colour: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture
def image_bytes() -> Iterator[bytes]:
    yield jpeg_bytes()


class RedisProcess:
    """A real redis-server on a free loopback port, owned by the test that uses it (so it can be stopped and
    restarted to simulate an outage). Persistence off: nothing is written to disk."""

    def __init__(self) -> None:
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed; run: bash tools/install.sh")
        self._process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        self.stop()
        pytest.fail(f"redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
            self._process = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def redis_process() -> Iterator[RedisProcess]:
    process = RedisProcess()
    process.start()
    yield process
    process.stop()


@pytest.fixture
def redis_url(redis_process: RedisProcess, request: pytest.FixtureRequest) -> str:
    """The shared test Redis. Each test gets its own cache namespace (see `cache_namespace`), so tests never
    see each other's entries."""
    return redis_process.url


@pytest.fixture
def cache_namespace(request: pytest.FixtureRequest) -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


def load_eval_tool() -> ModuleType:
    """tools/eval_synthetic_clip.py as a module. The tool is a script, not a package module; it is loaded by path
    so that tests run the same evaluation code."""
    path = Path(__file__).resolve().parent.parent / "tools" / "eval_synthetic_clip.py"
    spec = importlib.util.spec_from_file_location("eval_synthetic_clip", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module
