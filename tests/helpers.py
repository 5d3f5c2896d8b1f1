"""Plain helpers shared by several test files: waiting for what a test cannot await, the server's own record of
its RPCs, injected failures, local HTTP servers, and the `imagesearch serve` process."""

from __future__ import annotations

import asyncio
import http.server
import inspect
import os
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from conftest import TEST_MODEL, RunningServer
from grpc_health.v1 import health_pb2, health_pb2_grpc


async def until(condition: Callable[[], bool | Awaitable[bool]], what: str, timeout_s: float = 60) -> None:
    """Wait for an event the test cannot await directly; the timeout only bounds a hang, it is not asserted on.
    `condition` may be a plain or an async function."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if await result if inspect.isawaitable(result) else result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.01)


def rpc_codes(running: RunningServer, method: str) -> dict[str, float]:
    """The server's own record of finished RPCs of `method` by status code (its metrics), not the client's."""
    counts: dict[str, float] = {}
    for metric in running.components.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == "imagesearch_rpcs_total" and sample.labels["method"] == method and sample.value:
                counts[sample.labels["code"]] = sample.value
    return counts


def raising(error: Exception) -> Callable[..., Any]:
    """An async stand-in for a method (a store's, to inject an outage) that raises `error` on every call."""

    async def fail(*args: Any, **kwargs: Any) -> Any:
        raise error

    return fail


class QuietHandler(http.server.BaseHTTPRequestHandler):
    """A request handler that logs nothing, so pytest's output stays clean."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def http_server(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[int]:
    """A local HTTP server with `handler`, serving from a thread until the block ends; yields its port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def serve_process(tmp_path: Path, port: int, **env: str) -> subprocess.Popen[bytes]:
    """A real `imagesearch serve` process on 127.0.0.1:`port` with the test model on CPU and its data under
    `tmp_path`; `env` adds or overrides variables, and none of this process's IMAGESEARCH_* or OTEL_* variables
    reach it. Its log (stderr) is piped for the test to read."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("IMAGESEARCH_", "OTEL_"))}
    environ.update(
        IMAGESEARCH_PORT=str(port),
        IMAGESEARCH_HOST="127.0.0.1",
        IMAGESEARCH_DATA_DIR=str(tmp_path / "data"),
        IMAGESEARCH_MODEL=TEST_MODEL,
        IMAGESEARCH_DEVICE="cpu",
    )
    environ.update(env)
    return subprocess.Popen(
        [sys.executable, "-m", "imagesearch.cli", "serve"],
        env=environ,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def wait_serving(port: int, timeout_s: float = 60) -> None:
    """Wait until the server on `port` reports SERVING through gRPC health."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                if (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                time.sleep(0.1)
    raise AssertionError("server did not become SERVING")
