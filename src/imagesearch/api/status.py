"""Domain errors -> gRPC statuses (one table), with the details a caller can act on; the error mapping both ports
end a failed call with (`errors_mapped`); and the one wrapper every gRPC call runs in: request parsing, the
caller's deadline and error mapping, for unary and streaming RPCs alike."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc
import structlog
from google.protobuf import duration_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from imagesearch.api import call_edge
from imagesearch.errors import (
    DeadlineExceeded,
    ImageSearchError,
    InvalidArgument,
    NotFound,
    Overloaded,
    StoreUnavailable,
    UnknownProducts,
)
from imagesearch.v1 import products_pb2

log = structlog.get_logger(__name__)

# Domain error -> gRPC status. Looked up along the exception's MRO, so subclasses (ImageTooLarge) inherit.
STATUS_FOR_ERROR: dict[type[ImageSearchError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}
# How long a client should wait before retrying (sent as google.rpc.RetryInfo with UNAVAILABLE and
# RESOURCE_EXHAUSTED).
RETRY_DELAY_S = 1
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
# A cancellation this close to the caller's deadline is recorded as DEADLINE_EXCEEDED, not CANCELLED (_within).
DEADLINE_TOLERANCE_S = 0.05
# google.rpc.ResourceInfo.resource_type of a product, for NOT_FOUND details.
PRODUCT_RESOURCE_TYPE = products_pb2.Product.DESCRIPTOR.full_name

# grpc's own ways of ending a call, raised by context.abort and by misuse of the context: never remapped.
_GRPC_ENDINGS = (grpc.aio.AbortError, grpc.aio.UsageError)

Context = grpc.aio.ServicerContext[Any, Any]
# A handler: (request or request stream, context) -> response, or an async iterator of responses.
Handler = Callable[[Any, Context], Any]
ErrorHook = Callable[[ImageSearchError], Any]
# How a port ends a failed call, in its own form: (status, with_details) -> raises. `with_details` is False for
# the answer to an unexpected error, which has no details to send.
Fail = Callable[[status_pb2.Status, bool], Awaitable[NoReturn]]


def status_for(exc: ImageSearchError) -> status_pb2.Status:
    """The google.rpc.Status for a domain error: canonical code, message, and details a client can act on."""
    code = next((STATUS_FOR_ERROR[t] for t in type(exc).__mro__ if t in STATUS_FOR_ERROR), None)
    if code is None:
        log.error("unmapped domain error", error=repr(exc))
        code = grpc.StatusCode.INTERNAL
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=str(exc))
    if isinstance(exc, InvalidArgument):
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in exc.violations
            ]
        )
        status.details.add().Pack(bad_request)
    if isinstance(exc, UnknownProducts):
        for product_id in exc.product_ids:
            info = error_details_pb2.ResourceInfo(
                resource_type=PRODUCT_RESOURCE_TYPE, resource_name=product_id, description="no product with this id"
            )
            status.details.add().Pack(info)
    if code in _RETRYABLE:
        retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=RETRY_DELAY_S))
        status.details.add().Pack(retry)
    return status


@contextlib.asynccontextmanager
async def errors_mapped(
    fail: Fail, on_error: ErrorHook | None, passed_through: tuple[type[BaseException], ...]
) -> AsyncIterator[None]:
    """The error mapping of every call, on either port: a domain error ends the call with its status
    (`status_for`; `on_error` is told first), any other exception with INTERNAL naming the request id. The port's
    own way of ending a call (`passed_through`) and cancellation (no Exception) pass unchanged. `fail` ends the
    call, in the port's form."""
    try:
        yield
    except ImageSearchError as exc:
        if on_error is not None:
            await on_error(exc)
        await fail(status_for(exc), True)
    except passed_through:
        raise
    except Exception:
        # The traceback goes to the log, under the request id the caller is given; never to the caller.
        log.exception("unhandled error")
        message = f"internal error; request id {call_edge.request_id() or ''}"
        await fail(status_pb2.Status(code=code_pb2.INTERNAL, message=message), False)


def rpc_behaviour(
    handler: Handler,
    request_type: type[Message],
    *,
    client_streaming: bool,
    on_error: ErrorHook | None = None,
) -> Callable[[Any, Context], Any]:
    """Wrap a handler as a grpc behaviour taking raw request bytes.

    Every RPC runs through here:
    - requests are parsed here rather than by grpc, so a frame that is not a valid message is the caller's error
      (INVALID_ARGUMENT naming the message type), not UNKNOWN with a traceback in the log;
    - the handler runs no longer than the caller's deadline: past it, nobody will read the answer, so queued
      encodes and store calls are cancelled instead of finishing late (DEADLINE_EXCEEDED);
    - domain errors become statuses with details (`status_for`), anything else INTERNAL with the request id,
      the traceback going to the log only.
    `on_error` is told every domain error first (store health watches UNAVAILABLE).
    """

    def parsed(request: Any) -> Any:
        if client_streaming:
            return _parse_stream(request, request_type)
        return _parse(request, request_type)

    if inspect.isasyncgenfunction(handler):

        async def streaming(request: Any, context: Context) -> AsyncIterator[Any]:
            async with errors_mapped(_aborting(context), on_error, _GRPC_ENDINGS):
                deadline = _deadline(context)
                responses = handler(parsed(request), context)
                while True:
                    # The deadline bounds the handler's work, not grpc's writes of what it yielded.
                    async with _within(deadline):
                        try:
                            response = await anext(responses)
                        except StopAsyncIteration:
                            return
                    yield response

        return streaming

    async def single(request: Any, context: Context) -> Any:
        async with errors_mapped(_aborting(context), on_error, _GRPC_ENDINGS), _within(_deadline(context)):
            return await handler(parsed(request), context)
        raise AssertionError("unreachable: a failed RPC is aborted")  # pragma: no cover

    return single


def _parse(raw: bytes, request_type: type[Message]) -> Message:
    try:
        return request_type.FromString(raw)
    except DecodeError:
        name = request_type.DESCRIPTOR.full_name
        raise InvalidArgument([], f"the request is not a valid {name}") from None


async def _parse_stream(raw_messages: AsyncIterable[bytes], request_type: type[Message]) -> AsyncIterator[Any]:
    async for raw in raw_messages:
        yield _parse(raw, request_type)


def _deadline(context: Context) -> float | None:
    """The caller's deadline on the event loop's clock (None: no deadline)."""
    remaining = context.time_remaining()
    return None if remaining is None else asyncio.get_running_loop().time() + max(remaining, 0.0)


@contextlib.asynccontextmanager
async def _within(deadline: float | None) -> AsyncIterator[None]:
    try:
        async with asyncio.timeout_at(deadline):
            yield
    except TimeoutError:
        raise DeadlineExceeded("the deadline passed before the request finished") from None
    except asyncio.CancelledError:
        # The caller's own timer fires at the same deadline and grpc then cancels the RPC, often a moment before
        # our timer (the deadline reached us later than the caller set it). That cancellation is the deadline too.
        if deadline is not None and asyncio.get_running_loop().time() >= deadline - DEADLINE_TOLERANCE_S:
            raise DeadlineExceeded("the deadline passed before the request finished") from None
        raise


def _aborting(context: Context) -> Fail:
    async def abort(status: status_pb2.Status, with_details: bool) -> NoReturn:
        rich = rpc_status.to_status(status)
        details = rich.trailing_metadata if with_details else ()
        # A failed call sent no response, so no headers with the request id (interceptors.py): its trailers do.
        await context.abort(rich.code, rich.details, (*details, *_request_id_metadata()))

    return abort


def _request_id_metadata() -> tuple[tuple[str, str], ...]:
    request_id = call_edge.request_id()
    return ((call_edge.REQUEST_ID_HEADER, request_id),) if request_id else ()
