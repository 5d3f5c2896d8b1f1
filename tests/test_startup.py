"""Configuration, model loading and the `imagesearch serve` process lifecycle."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO

import grpc
import pytest
from conftest import RunningServer, free_port, jpeg_bytes
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import serve_process, wait_serving
from rpc import index, product, search

from imagesearch.cli import main
from imagesearch.config import Settings, SettingsError
from imagesearch.errors import ModelLoadError
from imagesearch.model.encoder import ClipEncoder
from imagesearch.model.loading import ModelSpec
from imagesearch.v1 import image_search_service_pb2 as pb
from imagesearch.v1 import image_search_service_pb2_grpc as pb_grpc


def test_settings_read_prefixed_environment_and_overrides() -> None:
    env = {"IMAGESEARCH_PORT": "6000", "IMAGESEARCH_CACHE": "NONE", "IMAGESEARCH_OFFLINE": "yes", "OTHER": "x"}
    settings = Settings.from_env(env, data_dir=Path("/srv/data"), model=None)
    assert (settings.port, settings.cache, settings.offline) == (6000, "none", True)
    assert settings.data_dir == Path("/srv/data")
    assert settings.model == Settings().model  # None overrides are ignored


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        pytest.param({"IMAGESEARCH_PORT": "http"}, "IMAGESEARCH_PORT", id="port-not-int"),
        pytest.param({"IMAGESEARCH_PORT": "70000"}, "IMAGESEARCH_PORT", id="port-range"),
        pytest.param({"IMAGESEARCH_CACHE": "memcached"}, "IMAGESEARCH_CACHE", id="cache-choice"),
        pytest.param({"IMAGESEARCH_CACHE": "redis"}, "IMAGESEARCH_CACHE", id="redis-without-url"),
        pytest.param({"IMAGESEARCH_OFFLINE": "maybe"}, "IMAGESEARCH_OFFLINE", id="bool"),
        pytest.param({"IMAGESEARCH_MAX_TOP_K": "5"}, "IMAGESEARCH_DEFAULT_TOP_K", id="default-above-max"),
        pytest.param({"IMAGESEARCH_PRECISION": "fp8"}, "IMAGESEARCH_PRECISION", id="precision-choice"),
        pytest.param({"IMAGESEARCH_RUNTIME": "onnx"}, "IMAGESEARCH_RUNTIME", id="runtime-choice"),
        # Removed settings are refused with what replaces them, never silently ignored.
        pytest.param(
            {"IMAGESEARCH_QUANTIZE_IMAGE_TOWER": "true"}, "IMAGESEARCH_PRECISION=int8", id="removed-int8-switch"
        ),
        pytest.param({"IMAGESEARCH_IMAGE_PRECISION": "f32"}, "IMAGESEARCH_PRECISION", id="renamed-precision"),
    ],
)
def test_settings_reject_invalid_values_naming_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env(env)


def test_cli_reports_configuration_errors_with_exit_code_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("IMAGESEARCH_PORT", "not-a-port")
    assert main(["serve"]) == 2
    assert "IMAGESEARCH_PORT" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("spec", "kind", "arch", "pretrained"),
    [
        pytest.param("ViT-B-32:laion2b_s34b_b79k", "pretrained", "ViT-B-32", "laion2b_s34b_b79k", id="tag"),
        pytest.param("ViT-L-14:/models/l14.pt", "checkpoint", "ViT-L-14", "", id="checkpoint"),
        pytest.param("local-dir:/models/x", "local-dir", "", "", id="local-dir"),
        pytest.param("ViT-B-32:random", "random", "ViT-B-32", "", id="random"),
        pytest.param("synthetic-clip", "local-dir", "", "", id="bundled"),
    ],
)
def test_model_spec_parses_every_form(spec: str, kind: str, arch: str, pretrained: str) -> None:
    parsed = ModelSpec.parse(spec)
    assert (parsed.kind, parsed.arch, parsed.pretrained) == (kind, arch, pretrained)


@pytest.mark.parametrize("spec", ["nonsense", "ViT-B-32:", "local-dir:/does/not/exist"])
def test_unusable_model_spec_fails_with_instructions(spec: str) -> None:
    with pytest.raises(ModelLoadError) as err:
        ClipEncoder.load(spec, device="cpu")
    assert "local-dir" in str(err.value)


def test_missing_pretrained_weights_fail_fast_offline() -> None:
    # No hub is reachable here; offline mode must turn the download into an immediate, explained failure.
    started = time.monotonic()
    with pytest.raises(ModelLoadError) as err:
        ClipEncoder.load("RN50:openai", device="cpu", offline=True)
    assert time.monotonic() - started < 30
    assert "IMAGESEARCH_MODEL" in str(err.value)


async def test_closed_store_gives_unavailable_with_retry_info(running: RunningServer) -> None:
    await index(running.stub, product("a"), jpeg_bytes())
    await running.components.store.close()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await search(running.stub, text="mug")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await running.stub.GetProduct(pb.GetProductRequest(id="a"))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_serve_process_drains_on_sigterm_and_exits_zero(tmp_path: Path) -> None:
    port = free_port()
    process = serve_process(tmp_path, port)
    try:
        wait_serving(port)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=30)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            process.send_signal(signal.SIGTERM)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        _, logs = process.communicate(timeout=30)
        assert process.returncode == 0
        assert b'"event": "stopped"' in logs
        # Start-up objects were moved out of the garbage collector's sight before serving (server.py).
        serving = next(json.loads(line) for line in logs.splitlines() if b'"event": "serving"' in line)
        assert serving["gc_frozen_objects"] > 10_000
    finally:
        process.kill()
        process.communicate()


def test_serve_refuses_unreachable_qdrant_with_exit_code_3(tmp_path: Path) -> None:
    process = serve_process(tmp_path, free_port(), IMAGESEARCH_QDRANT_URL=f"http://127.0.0.1:{free_port()}")
    try:
        _, logs = process.communicate(timeout=60)
        assert process.returncode == 3
        assert b"startup failed" in logs
    finally:
        process.kill()
        process.communicate()


class ServerLog:
    """The lines a server process writes to stderr, read as they come (so the pipe never fills), to wait on."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stderr is not None
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(process.stderr,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[bytes]) -> None:
        for raw in stream:
            with self._changed:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._changed.notify_all()

    def wait_for(self, text: str, timeout_s: float = 60) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: any(text in line for line in self.lines), timeout_s):
                raise AssertionError(f"the server never logged {text!r}:\n" + self.tail())

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.lines[-lines:])

    def finish(self, timeout_s: float = 30) -> None:
        self._thread.join(timeout_s)


async def test_sigterm_under_load_finishes_in_flight_searches_and_refuses_new_ones(tmp_path: Path) -> None:
    port = free_port()
    process = serve_process(tmp_path, port, IMAGESEARCH_SHUTDOWN_GRACE_S="20")
    log = ServerLog(process)
    try:
        await asyncio.to_thread(wait_serving, port)
        release = asyncio.Event()
        heads_sent: list[int] = []

        async def held_search(i: int) -> AsyncIterator[pb.SearchRequest]:
            yield pb.SearchRequest(query=pb.SearchQuery(top_k=3))
            heads_sent.append(i)
            await release.wait()  # the call is in flight, its image not yet sent
            yield pb.SearchRequest(image_chunk=jpeg_bytes((i * 10, 0, 0)))

        async def heads_only() -> AsyncIterator[pb.SearchRequest]:
            yield pb.SearchRequest(query=pb.SearchQuery())

        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.ImageSearchServiceStub(channel)
            calls = [stub.Search(held_search(i), timeout=60) for i in range(20)]
            deadline = time.monotonic() + 60
            while len(heads_sent) < 20 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            # All 20 streams are open on the server: a later Search on the same connection was answered, and the
            # server takes the calls of a connection in the order they arrive.
            with pytest.raises(grpc.aio.AioRpcError) as probe:
                await stub.Search(heads_only(), timeout=30)
            assert probe.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # nothing to search by

            process.send_signal(signal.SIGTERM)
            await asyncio.to_thread(log.wait_for, '"event": "shutting down"')
            # From here new calls are refused (a call racing the first step of the stop may still get in).
            refused = None
            for _ in range(50):
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as late_channel:
                    try:
                        await pb_grpc.ImageSearchServiceStub(late_channel).GetServiceInfo(
                            pb.GetServiceInfoRequest(), timeout=5
                        )
                    except grpc.aio.AioRpcError as err:
                        refused = err.code()
                        break
            # UNAVAILABLE; or CANCELLED for a call that reached the server as the stop began, before a handler took
            # it: gRPC core cancels such pending calls (grpc/grpc#41785, fix proposed in grpc/grpc#41786). Either
            # way the call never ran.
            assert refused in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), log.tail()
            release.set()
            results = await asyncio.gather(*calls, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        assert not failed, f"{failed[:1]}\n{log.tail()}"
        assert all(r.query_kind == pb.QUERY_KIND_IMAGE for r in results if not isinstance(r, BaseException))
        await asyncio.to_thread(process.wait, 30)
        log.finish()
        assert process.returncode == 0, log.tail()
        assert not [line for line in log.lines if '"unhandled error"' in line or '"code": "INTERNAL"' in line]
    finally:
        process.kill()
        process.communicate()


async def test_kill_9_during_bulk_index_loses_no_acknowledged_product(tmp_path: Path) -> None:
    port = free_port()
    process = serve_process(tmp_path, port)
    acknowledged: list[str] = []
    try:
        await asyncio.to_thread(wait_serving, port)

        async def products() -> AsyncIterator[pb.IndexProductsRequest]:
            for i in range(400):
                yield pb.IndexProductsRequest(product=product(f"crash-{i}"))
                yield pb.IndexProductsRequest(image_chunk=jpeg_bytes((i % 256, 40, 90)))
                await asyncio.sleep(0.005)  # a steady stream, so the kill lands mid-import

        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.ImageSearchServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError):  # the server dies under the stream
                async for response in stub.IndexProducts(products()):
                    assert not response.HasField("error")
                    acknowledged.append(response.id)
                    if len(acknowledged) == 60:
                        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=30)
    finally:
        process.kill()
        process.communicate()
    assert len(acknowledged) >= 60

    restarted = serve_process(tmp_path, port)
    try:
        await asyncio.to_thread(wait_serving, port)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.ImageSearchServiceStub(channel)
            for product_id in acknowledged:
                assert (await stub.GetProduct(pb.GetProductRequest(id=product_id))).product.id == product_id
            info = await stub.GetServiceInfo(pb.GetServiceInfoRequest())
            assert info.store.product_count >= len(acknowledged)
    finally:
        restarted.send_signal(signal.SIGTERM)
        restarted.communicate(timeout=30)


def _server_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


async def _flood(port: int, uploads: int, image: bytes) -> list[object]:
    async def lazily(data: bytes) -> AsyncIterator[pb.SearchRequest]:
        yield pb.SearchRequest(query=pb.SearchQuery())
        for start in range(0, len(data), 64 * 1024):
            yield pb.SearchRequest(image_chunk=data[start : start + 64 * 1024])

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ImageSearchServiceStub(channel)
        return await asyncio.gather(
            *(stub.Search(lazily(image), timeout=60) for _ in range(uploads)), return_exceptions=True
        )


async def test_flood_of_large_uploads_keeps_server_memory_bounded(tmp_path: Path) -> None:
    # The server runs in its own process so its memory is measured alone. With 4 encoding requests admitted at
    # a time, the rest are refused before their uploads are read: memory must not grow with the flood's size.
    port = free_port()
    process = serve_process(
        tmp_path,
        port,
        IMAGESEARCH_MAX_CONCURRENT_REQUESTS="4",
        IMAGESEARCH_MAX_IMAGE_BYTES=str(5 * 1024 * 1024),
    )
    try:
        await asyncio.to_thread(wait_serving, port)
        upload = jpeg_bytes((10, 200, 30)) + b"\0" * (4 * 1024 * 1024)
        await _flood(port, 8, upload)  # warm-up: the allocator's one-time growth
        baseline = _server_rss_mib(process.pid)
        await _flood(port, 24, upload)  # 96 MiB offered
        after_small = _server_rss_mib(process.pid)
        results = await _flood(port, 96, upload)  # 384 MiB offered
        after_large = _server_rss_mib(process.pid)
        refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert refused and len(refused) < len(results)  # some were admitted and served, the rest refused
        assert after_large - after_small < 64, (baseline, after_small, after_large)
        assert after_large - baseline < 192, (baseline, after_small, after_large)
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)
