"""Metrics: the recording methods move the right series, registries are isolated, and /metrics serves them."""

from __future__ import annotations

import asyncio
import threading
import urllib.request
from wsgiref.simple_server import WSGIServer

import grpc
import prometheus_client
import pytest
from conftest import RunningServer, jpeg_bytes
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from rpc import index, product, search

from imagesearch.metrics import Metrics, split_method
from imagesearch.v1 import image_search_service_pb2 as pb

SEARCH = "/imagesearch.v1.ImageSearchService/Search"
SERVICE = "imagesearch.v1.ImageSearchService"


def value(metrics: Metrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(name, labels)
    assert found is not None, f"no sample {name}{labels}"
    return found


def test_rpcs_are_counted_by_method_and_code_and_timed_by_method() -> None:
    metrics = Metrics()
    metrics.observe_rpc(SEARCH, "OK", 0.02)
    metrics.observe_rpc(SEARCH, "OK", 0.2)
    metrics.observe_rpc(SEARCH, "INVALID_ARGUMENT", 0.001)
    metrics.observe_rpc("/grpc.health.v1.Health/Check", "OK", 0.0005)

    assert value(metrics, "imagesearch_rpcs_total", service=SERVICE, method="Search", code="OK") == 2
    assert value(metrics, "imagesearch_rpcs_total", service=SERVICE, method="Search", code="INVALID_ARGUMENT") == 1
    assert value(metrics, "imagesearch_rpcs_total", service="grpc.health.v1.Health", method="Check", code="OK") == 1
    assert value(metrics, "imagesearch_rpc_duration_seconds_count", service=SERVICE, method="Search") == 3
    assert value(metrics, "imagesearch_rpc_duration_seconds_sum", service=SERVICE, method="Search") == pytest.approx(
        0.221
    )
    # Bucket boundaries are upper bounds (le): 0.001 and 0.02 fall under 0.025, 0.2 does not.
    assert value(metrics, "imagesearch_rpc_duration_seconds_bucket", service=SERVICE, method="Search", le="0.025") == 2


def test_encoder_batches_by_kind() -> None:
    metrics = Metrics()
    metrics.observe_batch("image", 8, 0.4)
    metrics.observe_batch("image", 1, 0.05)
    metrics.observe_batch("text", 3, 0.01)

    assert value(metrics, "imagesearch_encoder_batch_size_count", kind="image") == 2
    assert value(metrics, "imagesearch_encoder_batch_size_sum", kind="image") == 9
    assert value(metrics, "imagesearch_encoder_batch_size_bucket", kind="image", le="1.0") == 1
    assert value(metrics, "imagesearch_encoder_batch_size_bucket", kind="image", le="8.0") == 2
    assert value(metrics, "imagesearch_encoder_batch_duration_seconds_sum", kind="image") == pytest.approx(0.45)
    assert value(metrics, "imagesearch_encoder_batch_size_sum", kind="text") == 3


def test_cache_lookups_by_tier_and_outcome_start_at_zero() -> None:
    metrics = Metrics()
    # Every known series exists before the first lookup, so dashboards and rate() have data from the start.
    for tier in ("embedding", "result"):
        for outcome in ("hit", "miss", "bypass"):
            assert value(metrics, "imagesearch_cache_lookups_total", tier=tier, outcome=outcome) == 0
    metrics.observe_cache("embedding", "hit")
    metrics.observe_cache("embedding", "hit")
    metrics.observe_cache("result", "miss")
    assert value(metrics, "imagesearch_cache_lookups_total", tier="embedding", outcome="hit") == 2
    assert value(metrics, "imagesearch_cache_lookups_total", tier="result", outcome="miss") == 1
    assert value(metrics, "imagesearch_cache_lookups_total", tier="result", outcome="bypass") == 0


def test_store_calls_are_timed_and_failures_counted() -> None:
    metrics = Metrics()
    metrics.observe_store("search", 0.003)
    with metrics.time_store("upsert"):
        pass
    with pytest.raises(ConnectionError), metrics.time_store("upsert"):
        raise ConnectionError("qdrant went away")

    assert value(metrics, "imagesearch_store_duration_seconds_count", operation="search") == 1
    assert value(metrics, "imagesearch_store_duration_seconds_sum", operation="search") == pytest.approx(0.003)
    # The failed call is timed too (a timeout is exactly the slow call one wants to see) and counted as an error.
    assert value(metrics, "imagesearch_store_duration_seconds_count", operation="upsert") == 2
    assert value(metrics, "imagesearch_store_errors_total", operation="upsert") == 1
    assert metrics.registry.get_sample_value("imagesearch_store_errors_total", {"operation": "search"}) is None


async def test_cancelled_store_calls_are_not_recorded() -> None:
    metrics = Metrics()

    async def slow_search() -> None:
        with metrics.time_store("search"):
            await asyncio.sleep(10)

    task = asyncio.create_task(slow_search())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (
        metrics.registry.get_sample_value("imagesearch_store_duration_seconds_count", {"operation": "search"}) is None
    )
    assert metrics.registry.get_sample_value("imagesearch_store_errors_total", {"operation": "search"}) is None


def test_each_metrics_object_has_its_own_registry() -> None:
    # Two servers in one process (as in the tests) must neither clash at registration nor see each other's counts.
    first, second = Metrics(), Metrics()
    first.observe_cache("result", "hit")
    assert value(first, "imagesearch_cache_lookups_total", tier="result", outcome="hit") == 1
    assert value(second, "imagesearch_cache_lookups_total", tier="result", outcome="hit") == 0


def test_process_metrics_can_be_left_out() -> None:
    assert Metrics().registry.get_sample_value("process_resident_memory_bytes") is not None
    assert Metrics(process_metrics=False).registry.get_sample_value("process_resident_memory_bytes") is None


def test_split_method() -> None:
    assert split_method(SEARCH) == (SERVICE, "Search")
    assert split_method("/grpc.health.v1.Health/Watch") == ("grpc.health.v1.Health", "Watch")
    assert split_method("odd") == ("", "odd")


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode("utf-8")
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def test_http_endpoint_serves_the_registry_and_follows_new_observations() -> None:
    metrics = Metrics()
    endpoint = metrics.start_http_server(0, "127.0.0.1")
    try:
        assert endpoint.port > 0
        before = scrape(endpoint.port)
        assert before["imagesearch_cache_lookups_total{outcome=hit,tier=embedding}"] == 0
        assert "process_cpu_seconds_total{}" in before

        metrics.observe_rpc(SEARCH, "OK", 0.05)
        metrics.observe_cache("embedding", "hit")
        metrics.observe_batch("text", 4, 0.02)
        metrics.observe_store("search", 0.004)

        after = scrape(endpoint.port)
        assert after[f"imagesearch_rpcs_total{{code=OK,method=Search,service={SERVICE}}}"] == 1
        assert after[f"imagesearch_rpc_duration_seconds_count{{method=Search,service={SERVICE}}}"] == 1
        assert after["imagesearch_cache_lookups_total{outcome=hit,tier=embedding}"] == 1
        assert after["imagesearch_encoder_batch_size_sum{kind=text}"] == 4
        assert after["imagesearch_store_duration_seconds_count{operation=search}"] == 1
    finally:
        endpoint.stop()
    endpoint.stop()  # idempotent
    with pytest.raises(OSError):
        scrape(endpoint.port)


def test_http_endpoint_accepts_the_grpc_host_forms() -> None:
    # IMAGESEARCH_HOST's default is "[::]"; the endpoint binds the same interface, brackets and all.
    metrics = Metrics(process_metrics=False)
    try:
        endpoint = metrics.start_http_server(0, "[::]")
    except OSError:
        pytest.skip("no IPv6 on this machine")
    try:
        assert "imagesearch_cache_lookups_total{outcome=miss,tier=result}" in scrape(endpoint.port)
    finally:
        endpoint.stop()


def test_http_endpoint_falls_back_to_ipv4_where_ipv6_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    real_start = prometheus_client.start_http_server
    tried: list[str] = []

    def no_ipv6(port: int, addr: str, registry: CollectorRegistry) -> tuple[WSGIServer, threading.Thread]:
        tried.append(addr)
        if ":" in addr:
            raise OSError(97, "Address family not supported by protocol")
        return real_start(port, addr=addr, registry=registry)

    monkeypatch.setattr(prometheus_client, "start_http_server", no_ipv6)
    endpoint = Metrics(process_metrics=False).start_http_server(0, "[::]")
    try:
        assert tried == ["::", "0.0.0.0"]
        assert "imagesearch_cache_lookups_total{outcome=hit,tier=result}" in scrape(endpoint.port)
    finally:
        endpoint.stop()
    # Only the wildcard falls back: an explicit address that cannot be bound is an error.
    with pytest.raises(OSError):
        Metrics(process_metrics=False).start_http_server(0, "[::1]")


def test_http_endpoint_refuses_a_port_in_use() -> None:
    metrics = Metrics(process_metrics=False)
    endpoint = metrics.start_http_server(0, "127.0.0.1")
    try:
        with pytest.raises(OSError):
            Metrics(process_metrics=False).start_http_server(endpoint.port, "127.0.0.1")
    finally:
        endpoint.stop()


async def test_server_metrics_move_with_real_rpcs(running: RunningServer) -> None:
    endpoint = running.components.metrics.start_http_server(0, "127.0.0.1")
    try:
        await index(running.stub, product("m"), jpeg_bytes())
        await search(running.stub, text="mug")
        await search(running.stub, image=jpeg_bytes((1, 2, 3)))
        with pytest.raises(grpc.aio.AioRpcError):
            await running.stub.GetProduct(pb.GetProductRequest(id="missing"))
        body = await asyncio.to_thread(_scrape, endpoint.port)
    finally:
        endpoint.stop()
    assert _sample(body, "imagesearch_rpcs_total", method="Search", code="OK") == 2
    assert _sample(body, "imagesearch_rpcs_total", method="GetProduct", code="NOT_FOUND") == 1
    assert _sample(body, "imagesearch_encoder_batch_size_count", kind="image") == 2  # index + image search
    assert _sample(body, "imagesearch_encoder_batch_size_count", kind="text") == 1
    assert _sample(body, "imagesearch_store_duration_seconds_count", operation="search") == 2
    assert _sample(body, "imagesearch_store_duration_seconds_count", operation="upsert") == 1
    assert _sample(body, "imagesearch_cache_lookups_total", tier="embedding", outcome="miss") == 2
    assert _sample(body, "imagesearch_cache_lookups_total", tier="result", outcome="miss") == 2


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text: str = response.read().decode()
        return text


def _sample(body: str, name: str, **labels: str) -> float:
    for line in body.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name}{labels}")
