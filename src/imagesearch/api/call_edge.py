"""The edge of every call, on either port: what happens as a call starts and as it ends, whatever it runs.

At the start: the call's request id (the caller's x-request-id, or a fresh one) and its method are bound to every
log line written while it runs, and named on the server span. At the end: one log line with the final status and
the time taken, the same in the metrics, and the log context cleared. The gRPC port calls `begin` and `end` from
its interceptor (interceptors.py), the HTTP/JSON port from its Connect interceptors (http/edge.py); the server
span's status follows `span_ended` on the HTTP port, as opentelemetry-instrumentation-grpc sets it on the gRPC
port's span. Both ports echo `REQUEST_ID_HEADER` back, each in its own way.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import grpc
import structlog
from opentelemetry import trace

from imagesearch import tracing
from imagesearch.metrics import Metrics

log = structlog.get_logger("imagesearch.rpc")

REQUEST_ID_HEADER = "x-request-id"
# A caller's id is logged on every line of its call and echoed back: a longer one is cut, not trusted whole.
MAX_REQUEST_ID_CHARS = 128
# Statuses that are the server's fault: their log line is a warning.
_SERVER_ERRORS = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)


@dataclass(frozen=True)
class Call:
    method: str
    started: float


def request_id_from(header: str | None) -> str:
    """The call's request id: the caller's (`header`, the x-request-id it sent, cut short), or a fresh one."""
    return (header or "")[:MAX_REQUEST_ID_CHARS] or uuid.uuid4().hex


def begin(method: str, request_id: str, **bound: str) -> Call:
    """Start a call: its log context (request id, method and `bound`) replaces whatever the task held before."""
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id, method=method, **bound)
    # The server span (tracing on) names the request id, as the log line names the trace id.
    trace.get_current_span().set_attribute(tracing.REQUEST_ID, request_id)
    return Call(method, time.perf_counter())


def end(call: Call, code: grpc.StatusCode, metrics: Metrics | None) -> None:
    """End a call with the status it ended with: its one log line and its metrics."""
    elapsed_s = time.perf_counter() - call.started
    if metrics is not None:
        metrics.observe_rpc(call.method, code.name, elapsed_s)
    elapsed_ms = round(elapsed_s * 1000.0, 2)
    level = "warning" if code in _SERVER_ERRORS else "info"
    getattr(log, level)("rpc", code=code.name, duration_ms=elapsed_ms)
    structlog.contextvars.clear_contextvars()


def span_ended(span: trace.Span, code: grpc.StatusCode, message: str) -> None:
    """End a server span with the call's status code, failed only for the server's faults (tracing.SERVER_FAULTS):
    a caller's error leaves the span's status unset."""
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code.name in tracing.SERVER_FAULTS:
        span.set_status(trace.Status(trace.StatusCode.ERROR, f"{code}: {message}"))
    span.end()


def request_id() -> str | None:
    """The request id of the call running in this task, if any."""
    bound = structlog.contextvars.get_contextvars().get("request_id")
    return str(bound) if bound else None
