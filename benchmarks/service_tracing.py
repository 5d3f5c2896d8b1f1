"""The tracing A/B of benchmarks/service.py (--tracing): a stand-in OpenTelemetry collector, and uncached text
searches alternating between a traced server and an untraced twin."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import time
from concurrent import futures
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc
from service_report import Row, row
from service_server import fill_catalogue, free_port, process_cpu_s, start_server, wait_serving

from imagesearch.client import ImageSearchClient


class OtlpSink:
    """A stand-in OpenTelemetry collector on loopback: accepts OTLP/gRPC trace exports and counts the spans, so a
    traced server pays for creating, processing and exporting every span, as it would with a real collector."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        sink = self
        self.spans = 0

        class Servicer(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                sink.spans += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
                return trace_service_pb2.ExportTraceServiceResponse()

        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Servicer(), self._server)
        self.endpoint = f"http://127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"
        self._server.start()

    def stop(self) -> None:
        self._server.stop(None)


async def tracing_overhead(
    args: argparse.Namespace, data_dir: Path, otlp_endpoint: str, model_id: str, dimension: int
) -> tuple[list[Row], dict[str, float]]:
    """Uncached text searches alternating between two servers started together from identical copies of the
    catalogue, one traced (sampled, exported to `otlp_endpoint`) and one not, each call after a pause, the order
    swapped every round: both see the same machine, which on a shared one moves more between runs than tracing
    costs, and neither has a history the other lacks (a server that has just started runs slower for a while).
    Returns the rows (off, on) and figures: the median of the per-round differences (on - off, in ms), which slow
    swings of the machine's load do not move, and each server's CPU time per search (all its threads, the span
    exporter's included), which waiting does not move."""
    servers: dict[str, subprocess.Popen[bytes]] = {}
    ports = {"off": free_port(), "on": free_port()}
    off_s: list[float] = []
    on_s: list[float] = []
    rounds = max(100, 4 * args.n)
    cpu_s: dict[int, float] = {}
    try:
        for name, port in ports.items():
            ab_dir = data_dir / f"tracing-{name}"
            await fill_catalogue(ab_dir, model_id, dimension, args.catalogue)
            # The runtime's converted graph from the main run: both start as a restarted server would.
            if (data_dir / "runtime-cache").is_dir():
                shutil.copytree(data_dir / "runtime-cache", ab_dir / "runtime-cache", dirs_exist_ok=True)
            endpoint = otlp_endpoint if name == "on" else None
            servers[name] = start_server(ab_dir, args, time.perf_counter(), port=port, otlp_endpoint=endpoint)
        for port in ports.values():
            await wait_serving(f"127.0.0.1:{port}")
        twin, traced = servers["off"], servers["on"]
        async with (
            ImageSearchClient(f"127.0.0.1:{ports['off']}") as off,
            ImageSearchClient(f"127.0.0.1:{ports['on']}") as on,
        ):
            pairs = [(off, off_s), (on, on_s)]
            for i in range(-20, rounds):
                if i == 0:
                    cpu_s = {pid: process_cpu_s(pid) for pid in (twin.pid, traced.pid)}
                for client, into in pairs if i % 2 else pairs[::-1]:
                    # Longer than SETTLE_S: the other server's OpenMP threads spin on after its forward.
                    await asyncio.sleep(0.05)
                    started = time.perf_counter()
                    await client.search(text=f"a green canvas tote, size {i}")
                    if i >= 0:
                        into.append(time.perf_counter() - started)
            # The traced server's last spans are exported within its batch delay (5 s): count that work too.
            await asyncio.sleep(6)
            cpu_s = {pid: process_cpu_s(pid) - before for pid, before in cpu_s.items()}
    finally:
        for server in servers.values():
            server.terminate()
            server.wait(timeout=60)
    figures = {
        "median_paired_difference_ms": statistics.median(on - off for on, off in zip(on_s, off_s, strict=True)) * 1e3,
        "cpu_ms_per_search_off": cpu_s[twin.pid] / rounds * 1000.0,
        "cpu_ms_per_search_on": cpu_s[traced.pid] / rounds * 1000.0,
    }
    return [row("text search, uncached, tracing off", off_s), row("text search, uncached, tracing on", on_s)], figures


def report(sink: OtlpSink, rows: list[Row], figures: dict[str, float]) -> dict[str, Any]:
    """Print the A/B and return it for the JSON."""
    off, on = rows
    print(f"\ntracing: {sink.spans} spans exported to the local collector; alternating calls, same run:")
    for r in rows:
        print(f"  {r.path:<40} n={r.n}  p50 {r.p50_ms:.2f} ms  p95 {r.p95_ms:.2f} ms  p99 {r.p99_ms:.2f} ms")
    cpu_off, cpu_on = figures["cpu_ms_per_search_off"], figures["cpu_ms_per_search_on"]
    paired = figures["median_paired_difference_ms"]
    print(
        f"  p50 difference: {on.p50_ms - off.p50_ms:+.2f} ms ({on.p50_ms / off.p50_ms:.3f}x); median of the "
        f"per-round differences (on - off, adjacent calls): {paired:+.2f} ms"
    )
    print(f"  server CPU per search: {cpu_off:.2f} ms off, {cpu_on:.2f} ms on ({cpu_on - cpu_off:+.2f} ms)")
    return {
        "spans_exported": sink.spans,
        "rows": [asdict(r) for r in rows],
        "p50_difference_ms": on.p50_ms - off.p50_ms,
        **figures,
    }
