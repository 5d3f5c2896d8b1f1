"""Stream framing: the "head message, then image chunks" streams of Search and IndexProduct (a product's further
images each after an `image_index` message), and the bulk stream of IndexProducts, with the chunk and image byte
limits enforced as the bytes arrive; and the unary forms (SearchInline, IndexProductInline) as those streams, so
that both forms run one handler."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

from imagesearch.api.convert import product_from_proto
from imagesearch.config import Settings
from imagesearch.domain import Product
from imagesearch.errors import FieldViolation, ImageTooLarge, InvalidArgument
from imagesearch.images import ImageUpload
from imagesearch.search.bulk import BulkItem
from imagesearch.search.validation import Violations, check_product, check_uploads, product_uploads
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


class ProductImages:
    """A product's image bytes as they arrive: chunks go to the image the last `image_index` named (the first
    image before any). Indexes are bounded by the product's image entries and the server's limit, so a stream
    holds at most that many images of at most max_image_bytes each."""

    def __init__(self, settings: Settings, images_described: int) -> None:
        self._settings = settings
        self._described = images_described
        self._most = min(max(images_described, 1), settings.max_images_per_product)
        self._current = ImageChunks(settings)
        self._images = {0: self._current}

    def start(self, index: int) -> None:
        if not 0 <= index < self._most:
            raise InvalidArgument(FieldViolation("image_index", self._range(index)))
        if index in self._images and (index != 0 or self._images[0].seen):
            raise InvalidArgument(FieldViolation("image_index", f"{index} was sent before: send each image once"))
        self._current = self._images[index] = ImageChunks(self._settings)

    def add(self, chunk: bytes) -> None:
        self._current.add(chunk)

    @property
    def sent(self) -> dict[int, bytes]:
        """The bytes of each image that was sent, by its index."""
        return {index: chunks.image for index, chunks in self._images.items() if chunks.image is not None}

    def _range(self, index: int) -> str:
        if self._described > self._most:
            return f"is {index}; a product has at most {self._most} images on this server (0 to {self._most - 1})"
        if self._most == 1:
            return f"is {index}, but the product describes one image (product.images has at most one entry)"
        return f"is {index}; this product's images are 0 to {self._most - 1} (its entries in product.images)"


@dataclass
class StreamedRequest:
    head: Any
    images: dict[int, bytes]

    @property
    def image(self) -> bytes | None:
        """The first (for a search, the only) image; None when no chunk was sent."""
        return self.images.get(0)


async def read_stream(requests: AsyncIterable[Any], head_field: str, settings: Settings) -> StreamedRequest:
    """Read a "head message, then image chunks" stream (for a product, `image_index` messages between its
    images). Refuses an oversized image as soon as the running total passes the limit, without reading (or
    buffering) the rest."""
    head: Any = None
    images: ProductImages | None = None
    async for message in requests:
        which = message.WhichOneof("content")
        if which == head_field:
            if head is not None:
                raise InvalidArgument(FieldViolation(head_field, "sent twice: only the first message carries it"))
            head = getattr(message, head_field)
            images = ProductImages(settings, len(getattr(head, "images", ())))
        elif which in ("image_chunk", "image_index"):
            if images is None:
                raise InvalidArgument(
                    FieldViolation(which, f"arrived before {head_field}: the first message must carry it")
                )
            if which == "image_chunk":
                images.add(message.image_chunk)
            else:
                images.start(message.image_index)
        else:
            raise InvalidArgument(FieldViolation("content", f"empty message: set {head_field} or image_chunk"))
    if head is None or images is None:
        raise InvalidArgument(FieldViolation(head_field, "required: the first message must carry it"))
    return StreamedRequest(head=head, images=images.sent)


def as_stream(request: Any, head_field: str, message_type: type[Any], chunk_bytes: int) -> AsyncIterator[Any]:
    """A unary form's request (the head and the whole image in `image`, or a product's images in `images`) as
    the stream of its streaming form: the head message, then each image in chunks of `chunk_bytes` (after its
    `image_index`). An empty image is no image. The streaming handler then applies the same limits and rules;
    `inline_image_errors` names the image field in its errors."""
    if not request.HasField(head_field):
        raise InvalidArgument(FieldViolation(head_field, "required"))
    several: list[bytes] = list(getattr(request, "images", ()))
    if several and request.image:
        raise InvalidArgument(FieldViolation("images", "send the image in image or the images in images, not both"))
    described = len(getattr(request, head_field).images) if several else 0
    if len(several) > max(described, 1):
        raise InvalidArgument(
            FieldViolation("images", f"has {len(several)} entries, more than product.images describes ({described})")
        )
    images = [(0, request.image)] if not several else list(enumerate(several))

    async def messages() -> AsyncIterator[Any]:
        yield message_type(**{head_field: getattr(request, head_field)})
        for index, data in images:
            if not data:
                continue  # no bytes: the image is fetched from its URL (or refused by the rules)
            if index:
                yield message_type(image_index=index)
            view = memoryview(data)
            for start in range(0, len(view), chunk_bytes):
                yield message_type(image_chunk=view[start : start + chunk_bytes].tobytes())

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
    images = ProductImages(settings, 0)
    error: InvalidArgument | None = None
    async for message in requests:
        which = message.WhichOneof("content")
        if which == "product":
            if current is not None:
                yield _bulk_item(position, current, images.sent, error, settings, fetches_urls)
            position += 1
            current, images, error = message.product, ProductImages(settings, len(message.product.images)), None
        elif which in ("image_chunk", "image_index"):
            if current is None:
                raise InvalidArgument(FieldViolation(which, "arrived before the first product message"))
            if error is None:
                try:
                    images.add(message.image_chunk) if which == "image_chunk" else images.start(message.image_index)
                except InvalidArgument as exc:
                    error = exc  # skip the rest of this product's images, keep reading the stream
        else:
            raise InvalidArgument(FieldViolation("content", "empty message: set product or image_chunk"))
    if current is not None:
        yield _bulk_item(position, current, images.sent, error, settings, fetches_urls)


def product_request(
    message: products_pb2.Product,
    sent: dict[int, bytes],
    settings: Settings,
    fetches_urls: bool,
    stream_error: InvalidArgument | None = None,
) -> tuple[Product, list[ImageUpload], list[FieldViolation]]:
    """A product to index with the images it brings, and every rule it breaks (none: ready to index).
    `stream_error`: the image bytes already broke a limit as they arrived; the images' own rules would only
    repeat it."""
    product = product_from_proto(message)
    uploads = product_uploads(product, sent)
    v = Violations()
    check_product(product, v)
    if stream_error is None:
        check_uploads(product, uploads, settings.max_images_per_product, fetches_urls, v)
    else:
        v.items += stream_error.violations
    return product, uploads, v.items


def _bulk_item(
    position: int,
    message: products_pb2.Product,
    sent: dict[int, bytes],
    error: InvalidArgument | None,
    settings: Settings,
    fetches_urls: bool,
) -> BulkItem:
    product, uploads, violations = product_request(message, sent, settings, fetches_urls, error)
    return BulkItem(position, product, uploads, InvalidArgument(violations) if violations else None)
