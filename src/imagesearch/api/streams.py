"""Stream framing: the "head message, then image chunks" streams of Search and IndexProduct, and the bulk
stream of IndexProducts, with the chunk and image byte limits enforced as the bytes arrive; and the unary forms
(SearchInline, IndexProductInline) as those streams, so that both forms run one handler."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

from imagesearch.api.convert import product_from_proto
from imagesearch.config import Settings
from imagesearch.errors import FieldViolation, ImageTooLarge, InvalidArgument
from imagesearch.search.bulk import BulkItem
from imagesearch.search.validation import Violations, check_image_source, check_product
from imagesearch.v1 import products_pb2


class ImageChunks:
    """Collects one image's chunks, enforcing the per-chunk and per-image byte limits as they arrive."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._chunks: list[bytes] = []
        self._total = 0
        self.seen = False

    def add(self, chunk: bytes) -> None:
        limit = self._settings.max_chunk_bytes
        if len(chunk) > limit:
            raise InvalidArgument(FieldViolation("image_chunk", f"a chunk of {len(chunk)} bytes; the limit is {limit}"))
        self._total += len(chunk)
        if self._total > self._settings.max_image_bytes:
            self._chunks.clear()  # refused: free it now
            raise ImageTooLarge(
                FieldViolation("image_chunk", f"the image exceeds the limit of {self._settings.max_image_bytes} bytes")
            )
        self._chunks.append(chunk)
        self.seen = True

    @property
    def image(self) -> bytes | None:
        """The whole image; None when no chunk was sent (b"" when only empty chunks were)."""
        return b"".join(self._chunks) if self.seen else None


@dataclass
class StreamedRequest:
    head: Any
    image: bytes | None


async def read_stream(requests: AsyncIterable[Any], head_field: str, settings: Settings) -> StreamedRequest:
    """Read a "head message, then image chunks" stream. Refuses an oversized image as soon as the running
    total passes the limit, without reading (or buffering) the rest."""
    head: Any = None
    chunks = ImageChunks(settings)
    async for message in requests:
        which = message.WhichOneof("content")
        if which == head_field:
            if head is not None:
                raise InvalidArgument(FieldViolation(head_field, "sent twice: only the first message carries it"))
            head = getattr(message, head_field)
        elif which == "image_chunk":
            if head is None:
                raise InvalidArgument(
                    FieldViolation("image_chunk", f"arrived before {head_field}: the first message must carry it")
                )
            chunks.add(message.image_chunk)
        else:
            raise InvalidArgument(FieldViolation("content", f"empty message: set {head_field} or image_chunk"))
    if head is None:
        raise InvalidArgument(FieldViolation(head_field, "required: the first message must carry it"))
    return StreamedRequest(head=head, image=chunks.image)


def as_stream(request: Any, head_field: str, message_type: type[Any], chunk_bytes: int) -> AsyncIterator[Any]:
    """A unary form's request (the head and the whole image in `image`) as the stream of its streaming form: the
    head message, then the image in chunks of `chunk_bytes`. An empty `image` is no image. The streaming handler
    then applies the same limits and rules; `inline_image_errors` names the image field in its errors."""
    if not request.HasField(head_field):
        raise InvalidArgument(FieldViolation(head_field, "required"))
    image = memoryview(request.image)

    async def messages() -> AsyncIterator[Any]:
        yield message_type(**{head_field: getattr(request, head_field)})
        for start in range(0, len(image), chunk_bytes):
            yield message_type(image_chunk=image[start : start + chunk_bytes].tobytes())

    return messages()


@contextlib.contextmanager
def inline_image_errors() -> Iterator[None]:
    """Around a streaming handler serving a unary form: the image the caller sent is the field `image`, not the
    `image_chunk` messages it was split into."""
    try:
        yield
    except InvalidArgument as exc:
        if not any(v.field == "image_chunk" for v in exc.violations):
            raise
        renamed = [dataclasses.replace(v, field="image") if v.field == "image_chunk" else v for v in exc.violations]
        raise type(exc)(renamed) from None


async def read_bulk_stream(
    requests: AsyncIterable[Any], settings: Settings, fetches_urls: bool
) -> AsyncIterator[BulkItem]:
    """Split an IndexProducts stream into products. A problem with one product (bad field, oversized image)
    becomes that product's error; only a stream that cannot be parsed at all raises."""
    position = -1
    current: products_pb2.Product | None = None
    chunks = ImageChunks(settings)
    chunk_error: InvalidArgument | None = None
    async for message in requests:
        which = message.WhichOneof("content")
        if which == "product":
            if current is not None:
                yield _bulk_item(position, current, chunks.image, chunk_error, fetches_urls)
            position += 1
            current, chunks, chunk_error = message.product, ImageChunks(settings), None
        elif which == "image_chunk":
            if current is None:
                raise InvalidArgument(FieldViolation("image_chunk", "arrived before the first product message"))
            if chunk_error is None:
                try:
                    chunks.add(message.image_chunk)
                except InvalidArgument as exc:
                    chunk_error = exc  # skip the rest of this image, keep reading the stream
        else:
            raise InvalidArgument(FieldViolation("content", "empty message: set product or image_chunk"))
    if current is not None:
        yield _bulk_item(position, current, chunks.image, chunk_error, fetches_urls)


def _bulk_item(
    position: int,
    message: products_pb2.Product,
    image: bytes | None,
    error: InvalidArgument | None,
    fetches_urls: bool,
) -> BulkItem:
    product = product_from_proto(message)
    v = Violations()
    check_product(product, v)
    if error is None:
        check_image_source(image, product, fetches_urls, v)
    else:
        v.items += error.violations
    return BulkItem(position, product, image, InvalidArgument(v.items) if v.items else None)
