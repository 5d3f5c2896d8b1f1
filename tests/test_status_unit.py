"""Error mapping and the wrapper every RPC runs in (api/status.py), driven with a stand-in for grpc's servicer
context: which status and details each domain error becomes, what a corrupt frame, an unexpected exception or
a passed deadline gets, and that the handler's work stops at the deadline. Fast; part of the mutation-testing
selection (tools/mutation.sh). test_reliability.py and test_hardening.py show the same through a real server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any, cast

import grpc
import pytest
import structlog
import structlog.testing
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2

from imagesearch.api.status import (
    DEADLINE_TOLERANCE_S,
    PRODUCT_RESOURCE_TYPE,
    RETRY_DELAY_S,
    STATUS_FOR_ERROR,
    rpc_behaviour,
    status_for,
)
from imagesearch.errors import (
    DeadlineExceeded,
    FieldViolation,
    ImageSearchError,
    ImageTooLarge,
    InvalidArgument,
    ModelLoadError,
    NotFound,
    Overloaded,
    StoreUnavailable,
    UnknownProducts,
)
from imagesearch.v1 import image_search_service_pb2 as pb

CORRUPT_FRAME = b"\xff\xff\xff\xff\x0f" * 4
REQUEST = pb.GetProductRequest(id="sku-1")
Context = grpc.aio.ServicerContext[Any, Any]


class FakeContext:
    """What rpc_behaviour uses of grpc.aio.ServicerContext: the time left, and abort (which raises, as grpc's)."""

    def __init__(self, remaining_s: float | None = None) -> None:
        self.remaining_s = remaining_s
        self.aborts: list[tuple[grpc.StatusCode, str, tuple[tuple[str, Any], ...]]] = []

    def time_remaining(self) -> float | None:
        return self.remaining_s

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: tuple[tuple[str, Any], ...] = ()
    ) -> None:
        self.aborts.append((code, details, tuple(trailing_metadata)))
        raise grpc.aio.AbortError()

    @property
    def code(self) -> grpc.StatusCode:
        [(code, _, _)] = self.aborts
        return code

    @property
    def status(self) -> status_pb2.Status:
        [(_, _, metadata)] = self.aborts
        [raw] = [value for key, value in metadata if key == "grpc-status-details-bin"]
        return status_pb2.Status.FromString(raw)

    @property
    def metadata(self) -> dict[str, Any]:
        [(_, _, metadata)] = self.aborts
        return dict(metadata)


@pytest.fixture(autouse=True)
def request_id() -> Iterator[str]:
    structlog.contextvars.bind_contextvars(request_id="rid-42")
    yield "rid-42"
    structlog.contextvars.clear_contextvars()


def details_of(status: status_pb2.Status, kind: type[Message]) -> list[Any]:
    found = []
    for detail in status.details:
        if detail.Is(kind.DESCRIPTOR):
            message = kind()
            detail.Unpack(message)
            found.append(message)
    return found


async def call_unary(handler: Any, context: FakeContext, request: bytes = REQUEST.SerializeToString()) -> Any:
    behaviour = rpc_behaviour(handler, pb.GetProductRequest, client_streaming=False)
    return await behaviour(request, cast(Context, context))


# --- status_for: one table, details a client can act on ---------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "code"),
    [
        pytest.param(InvalidArgument(FieldViolation("f", "bad")), grpc.StatusCode.INVALID_ARGUMENT, id="invalid"),
        pytest.param(ImageTooLarge(FieldViolation("image_chunk", "big")), grpc.StatusCode.INVALID_ARGUMENT, id="sub"),
        pytest.param(NotFound("gone"), grpc.StatusCode.NOT_FOUND, id="not-found"),
        pytest.param(UnknownProducts(["a"]), grpc.StatusCode.NOT_FOUND, id="unknown-products"),
        pytest.param(StoreUnavailable("down"), grpc.StatusCode.UNAVAILABLE, id="store"),
        pytest.param(Overloaded("busy"), grpc.StatusCode.RESOURCE_EXHAUSTED, id="overloaded"),
        pytest.param(DeadlineExceeded("late"), grpc.StatusCode.DEADLINE_EXCEEDED, id="deadline"),
        pytest.param(ModelLoadError("no model"), grpc.StatusCode.INTERNAL, id="unmapped"),
        pytest.param(ImageSearchError("base"), grpc.StatusCode.INTERNAL, id="base-class"),
    ],
)
def test_each_domain_error_has_its_status_code_and_message(error: ImageSearchError, code: grpc.StatusCode) -> None:
    status = status_for(error)
    assert status.code == getattr(code_pb2, code.name) == code.value[0]
    assert status.message == str(error)


def test_unmapped_domain_error_is_logged_as_an_error() -> None:
    # A domain error without a status is a server bug: INTERNAL to the caller, an error line for the operator.
    with structlog.testing.capture_logs() as logs:
        status_for(ModelLoadError("weights missing"))
    assert [(e["log_level"], e["event"]) for e in logs] == [("error", "unmapped domain error")]
    assert "ModelLoadError" in logs[0]["error"] and "weights missing" in logs[0]["error"]
    with structlog.testing.capture_logs() as logs:
        status_for(NotFound("gone"))
    assert logs == []


def test_status_table_covers_the_errors_a_request_can_cause() -> None:
    assert set(STATUS_FOR_ERROR) == {InvalidArgument, NotFound, StoreUnavailable, Overloaded, DeadlineExceeded}


@pytest.mark.parametrize(
    ("error", "retry"),
    [
        pytest.param(StoreUnavailable("down"), True, id="unavailable"),
        pytest.param(Overloaded("busy"), True, id="resource-exhausted"),
        pytest.param(DeadlineExceeded("late"), False, id="deadline"),
        pytest.param(NotFound("gone"), False, id="not-found"),
        pytest.param(InvalidArgument(FieldViolation("f", "bad")), False, id="invalid"),
        pytest.param(ModelLoadError("x"), False, id="internal"),
    ],
)
def test_retry_info_comes_with_retryable_codes_only(error: ImageSearchError, retry: bool) -> None:
    retries = details_of(status_for(error), error_details_pb2.RetryInfo)
    assert [r.retry_delay.seconds for r in retries] == ([RETRY_DELAY_S] if retry else [])
    assert RETRY_DELAY_S == 1


def test_invalid_argument_lists_every_violation_in_bad_request() -> None:
    error = InvalidArgument([FieldViolation("query.text", "too long"), FieldViolation("query.top_k", "too big")])
    [bad_request] = details_of(status_for(error), error_details_pb2.BadRequest)
    assert [(v.field, v.description) for v in bad_request.field_violations] == [
        ("query.text", "too long"),
        ("query.top_k", "too big"),
    ]
    assert len(status_for(error).details) == 1


def test_unknown_products_name_each_product_in_resource_info() -> None:
    status = status_for(UnknownProducts(["nope", "nada"]))
    infos = details_of(status, error_details_pb2.ResourceInfo)
    assert [(i.resource_type, i.resource_name) for i in infos] == [
        (PRODUCT_RESOURCE_TYPE, "nope"),
        (PRODUCT_RESOURCE_TYPE, "nada"),
    ]
    assert PRODUCT_RESOURCE_TYPE == "imagesearch.v1.Product"
    assert all(i.description[:1].islower() for i in infos)  # prose, as BadRequest's descriptions
    assert len(status.details) == 2
    assert details_of(status_for(NotFound("gone")), error_details_pb2.ResourceInfo) == []


# --- rpc_behaviour: parsing and error mapping ----------------------------------------------------------------


async def test_handler_gets_the_parsed_request_and_its_answer_is_returned() -> None:
    seen: list[Any] = []

    async def handler(request: pb.GetProductRequest, context: Context) -> str:
        seen.append(request)
        return "answer"

    context = FakeContext()
    assert await call_unary(handler, context) == "answer"
    assert seen == [REQUEST]
    assert context.aborts == []


async def test_corrupt_frame_is_invalid_argument_naming_the_message_type() -> None:
    async def handler(request: Any, context: Context) -> None:
        raise AssertionError("a corrupt frame must not reach the handler")

    context = FakeContext()
    with pytest.raises(grpc.aio.AbortError):
        await call_unary(handler, context, CORRUPT_FRAME)
    assert context.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "imagesearch.v1.GetProductRequest" in context.status.message
    assert context.metadata["x-request-id"] == "rid-42"


async def test_domain_error_is_aborted_with_its_rich_status_and_request_id() -> None:
    async def handler(request: Any, context: Context) -> None:
        raise StoreUnavailable("store down")

    told: list[ImageSearchError] = []

    async def on_error(exc: ImageSearchError) -> None:
        told.append(exc)

    context = FakeContext()
    behaviour = rpc_behaviour(handler, pb.GetProductRequest, client_streaming=False, on_error=on_error)
    with pytest.raises(grpc.aio.AbortError):
        await behaviour(REQUEST.SerializeToString(), cast(Context, context))
    assert context.code == grpc.StatusCode.UNAVAILABLE
    assert context.status.code == code_pb2.UNAVAILABLE
    assert details_of(context.status, error_details_pb2.RetryInfo)
    assert context.metadata["x-request-id"] == "rid-42"
    assert [type(e) for e in told] == [StoreUnavailable]


async def test_error_without_a_request_id_carries_none() -> None:
    structlog.contextvars.clear_contextvars()

    async def handler(request: Any, context: Context) -> None:
        raise NotFound("gone")

    context = FakeContext()
    with pytest.raises(grpc.aio.AbortError):
        await call_unary(handler, context)
    assert context.code == grpc.StatusCode.NOT_FOUND
    assert "x-request-id" not in context.metadata


async def test_unexpected_exception_is_internal_with_the_request_id_and_no_traceback() -> None:
    async def handler(request: Any, context: Context) -> None:
        raise KeyError("secret internal detail")

    context = FakeContext()
    with pytest.raises(grpc.aio.AbortError):
        await call_unary(handler, context)
    [(code, details, metadata)] = context.aborts
    assert code == grpc.StatusCode.INTERNAL
    assert "rid-42" in details and "secret" not in details and "KeyError" not in details
    assert dict(metadata) == {"x-request-id": "rid-42"}


async def test_abort_by_the_handler_itself_is_passed_through_unchanged() -> None:
    async def handler(request: Any, context: Context) -> None:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no")

    context = FakeContext()
    with pytest.raises(grpc.aio.AbortError):
        await call_unary(handler, context)
    assert [code for code, _, _ in context.aborts] == [grpc.StatusCode.PERMISSION_DENIED]  # not INTERNAL as well


@pytest.mark.parametrize("error", [asyncio.CancelledError(), grpc.aio.UsageError("bad use")])
async def test_cancellation_and_grpc_usage_errors_are_not_turned_into_statuses(error: BaseException) -> None:
    async def handler(request: Any, context: Context) -> None:
        raise error

    context = FakeContext()
    with pytest.raises(type(error)):
        await call_unary(handler, context)
    assert context.aborts == []


# --- rpc_behaviour: the caller's deadline -------------------------------------------------------------------


async def test_handler_past_the_deadline_is_cancelled_and_answers_deadline_exceeded() -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def handler(request: Any, context: Context) -> None:
        started.set()
        try:
            await asyncio.sleep(30)  # queued work, far longer than the deadline
        except asyncio.CancelledError:
            cancelled.set()
            raise

    context = FakeContext(remaining_s=0.05)
    with pytest.raises(grpc.aio.AbortError):
        await call_unary(handler, context)
    assert started.is_set() and cancelled.is_set()
    assert context.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert context.metadata["x-request-id"] == "rid-42"


async def test_deadline_already_passed_stops_the_handler_at_its_first_wait() -> None:
    finished: list[bool] = []

    async def handler(request: Any, context: Context) -> None:
        await asyncio.sleep(0.05)
        finished.append(True)

    for remaining_s in (-5.0, 0.0):
        context = FakeContext(remaining_s=remaining_s)
        with pytest.raises(grpc.aio.AbortError):
            await call_unary(handler, context)
        assert context.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert finished == []


async def test_handler_within_the_deadline_or_without_one_finishes() -> None:
    async def handler(request: Any, context: Context) -> str:
        await asyncio.sleep(0.01)
        return "done"

    for remaining_s in (None, 60.0):
        context = FakeContext(remaining_s=remaining_s)
        assert await call_unary(handler, context) == "done"
        assert context.aborts == []


async def cancelled_while_running(remaining_s: float | None) -> FakeContext:
    """Run a handler under a deadline `remaining_s` away and cancel it from outside (as grpc does when the
    caller's timer fires or the caller goes away) once it is running."""
    started = asyncio.Event()

    async def handler(request: Any, context: Context) -> None:
        started.set()
        await asyncio.sleep(30)

    context = FakeContext(remaining_s=remaining_s)
    task = asyncio.ensure_future(call_unary(handler, context))
    await started.wait()
    task.cancel()
    with contextlib.suppress(grpc.aio.AbortError, asyncio.CancelledError):
        await task
    return context


async def test_cancellation_at_the_deadline_is_recorded_as_deadline_exceeded() -> None:
    # The caller's timer and ours fire together; grpc's cancellation often arrives a moment before our timer.
    context = await cancelled_while_running(remaining_s=DEADLINE_TOLERANCE_S / 2)
    assert context.code == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_cancellation_well_before_the_deadline_stays_a_cancellation() -> None:
    for remaining_s in (None, 30.0):
        context = await cancelled_while_running(remaining_s)
        assert context.aborts == []


# --- rpc_behaviour: streams -----------------------------------------------------------------------------------


async def frames(*raw: bytes) -> AsyncIterator[bytes]:
    for frame in raw:
        yield frame


async def test_client_stream_is_parsed_message_by_message() -> None:
    async def handler(requests: AsyncIterator[pb.GetProductRequest], context: Context) -> list[str]:
        return [request.id async for request in requests]

    behaviour = rpc_behaviour(handler, pb.GetProductRequest, client_streaming=True)
    raw = [pb.GetProductRequest(id=i).SerializeToString() for i in ("a", "b")]
    assert await behaviour(frames(*raw), cast(Context, FakeContext())) == ["a", "b"]

    context = FakeContext()
    with pytest.raises(grpc.aio.AbortError):
        await behaviour(frames(raw[0], CORRUPT_FRAME), cast(Context, context))
    assert context.code == grpc.StatusCode.INVALID_ARGUMENT


async def test_response_stream_yields_every_response_then_ends() -> None:
    async def handler(requests: AsyncIterator[pb.GetProductRequest], context: Context) -> AsyncIterator[str]:
        async for request in requests:
            yield request.id

    behaviour = rpc_behaviour(handler, pb.GetProductRequest, client_streaming=True)
    raw = [pb.GetProductRequest(id=i).SerializeToString() for i in ("a", "b", "c")]
    context = FakeContext(remaining_s=60.0)
    assert [r async for r in behaviour(frames(*raw), cast(Context, context))] == ["a", "b", "c"]
    assert context.aborts == []


async def test_response_stream_stops_at_the_deadline_after_what_it_answered() -> None:
    cancelled = asyncio.Event()

    async def handler(request: pb.GetProductRequest, context: Context) -> AsyncIterator[str]:
        yield "first"
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        yield "never"

    behaviour = rpc_behaviour(handler, pb.GetProductRequest, client_streaming=False)
    context = FakeContext(remaining_s=0.05)
    answered = []
    with pytest.raises(grpc.aio.AbortError):
        async for response in behaviour(REQUEST.SerializeToString(), cast(Context, context)):
            answered.append(response)
    assert answered == ["first"]
    assert cancelled.is_set()
    assert context.code == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_response_stream_maps_domain_errors_and_tells_the_hook() -> None:
    context = FakeContext()

    async def handler(request: pb.GetProductRequest, given: Context) -> AsyncIterator[str]:
        assert given is context  # the handler gets grpc's context, as a unary one does
        yield request.id
        raise StoreUnavailable("store down")

    told: list[ImageSearchError] = []

    async def on_error(exc: ImageSearchError) -> None:
        told.append(exc)

    behaviour = rpc_behaviour(handler, pb.GetProductRequest, client_streaming=False, on_error=on_error)
    answered = []
    with pytest.raises(grpc.aio.AbortError):
        async for response in behaviour(REQUEST.SerializeToString(), cast(Context, context)):
            answered.append(response)
    assert answered == ["sku-1"]
    assert context.code == grpc.StatusCode.UNAVAILABLE
    assert [type(e) for e in told] == [StoreUnavailable]
