"""The HTTP port's message and error forms: protobuf JSON for requests and responses, and the google.rpc status
the gRPC port sends, written as a Connect error (Connect's HTTP status for the code, a JSON body with the code,
the message and the details, each base64 with a readable `debug` copy)."""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from google.protobuf import descriptor_pb2, json_format
from google.protobuf.descriptor import FileDescriptor
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from protobuf import Message as ConnectMessage
from protobuf import Registry, message_to_json_value
from protobuf.wkt import Any as AnyMessage
from protobuf.wkt import FileDescriptorSet

from imagesearch.api.status import errors_mapped, status_for
from imagesearch.errors import ImageSearchError, InvalidArgument


def connect_error(status: status_pb2.Status) -> ConnectError:
    """The google.rpc.Status the gRPC port would send, as a Connect error: same code, message and details."""
    name = code_pb2.Code.Name(status.code)
    code = Code.CANCELED if name == "CANCELLED" else Code[name]
    return ConnectError(code, status.message, [_detail(detail.type_url, detail.value) for detail in status.details])


def grpc_code(error: Exception | None) -> grpc.StatusCode:
    """The gRPC status code a Connect call ended with (`error`: what it raised, if anything)."""
    if error is None:
        return grpc.StatusCode.OK
    if not isinstance(error, ConnectError):
        return grpc.StatusCode.UNKNOWN
    return grpc.StatusCode.CANCELLED if error.code is Code.CANCELED else grpc.StatusCode[error.code.name]


@contextlib.asynccontextmanager
async def errors_as_connect(on_error: Callable[[ImageSearchError], Awaitable[None]] | None) -> AsyncIterator[None]:
    """The gRPC port's error mapping (status.errors_mapped), ending the call with a Connect error."""
    async with errors_mapped(_raise_connect_error, on_error, (ConnectError,)):
        yield


async def _raise_connect_error(status: status_pb2.Status, with_details: bool) -> NoReturn:
    raise connect_error(status) from None


def _detail(type_url: str, value: bytes) -> ConnectMessage:
    packed = AnyMessage(type_url=type_url, value=value)
    desc = _types(error_details_pb2.DESCRIPTOR).message(type_url.rpartition("/")[2])
    # Unpacked, connectrpc also writes the detail as JSON ("debug") beside its base64, so curl users can read it.
    unpacked = packed.unpack(desc) if desc is not None else None
    return unpacked if unpacked is not None else packed


@functools.cache
def _types(*roots: FileDescriptor) -> Registry:
    """The messages of `roots` and their imports for connectrpc's own protobuf runtime (protobuf-py), from the
    descriptors grpc uses. JSON names are the proto field names, as in the responses."""
    files: dict[str, FileDescriptor] = {}

    def visit(file: FileDescriptor) -> None:
        if file.name not in files:
            for dependency in file.dependencies:
                visit(dependency)
            files[file.name] = file

    for root in roots:
        visit(root)
    protos = descriptor_pb2.FileDescriptorSet(file=[_file_proto(f) for f in files.values()])
    return FileDescriptorSet.from_binary(protos.SerializeToString()).to_registry()


def _file_proto(file: FileDescriptor) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    file.CopyToProto(proto)

    def name_fields(messages: Any) -> None:
        for message in messages:
            for field in message.field:
                field.json_name = field.name
            name_fields(message.nested_type)

    name_fields(proto.message_type)
    return proto


class JsonCodec:
    """Protobuf JSON with the proto field names (as in the .proto, the error details and grpcurl's output) and
    every field written, defaults included ("created": false), for callers reading plain JSON. Requests accept
    both naming styles; an unknown field is INVALID_ARGUMENT, so a misspelt field is not silently ignored."""

    def name(self) -> str:
        return "json"

    def encode(self, message: Message) -> bytes:
        # Written by protobuf-py (connectrpc's own protobuf runtime) from the binary form: 3x faster than
        # google.protobuf's json_format (150 us against 490 us for 10 hits), which is most of the port's cost per
        # search. tests/test_http.py checks both write the same JSON.
        registry = _types(message.DESCRIPTOR.file, error_details_pb2.DESCRIPTOR)
        name = message.DESCRIPTOR.full_name
        desc = registry.message(name)
        assert desc is not None
        mirror = AnyMessage(type_url=f"type.googleapis.com/{name}", value=message.SerializeToString()).unpack(desc)
        assert mirror is not None
        value = message_to_json_value(mirror, registry=registry, always_emit_implicit=True, use_proto_field_name=True)
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()

    def decode(self, data: bytes | bytearray, message_class: type[Message]) -> Message:
        message = message_class()
        try:
            json_format.Parse(bytes(data), message)
        except (json_format.ParseError, ValueError) as exc:
            name = message_class.DESCRIPTOR.full_name
            raise connect_error(status_for(InvalidArgument([], f"the request is not a valid {name}: {exc}"))) from None
        return message
