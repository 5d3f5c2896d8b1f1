"""Generates the OpenAPI 3.1 document of the HTTP/JSON port from the protos (their comments included):
src/imagesearch/v1/image_search_service.openapi.json, served at /openapi.json and read by /docs.

No maintained generator for the Connect protocol installs from the registries this project can reach (PyPI,
npm, Debian): protoc-gen-connect-openapi and grpc-gateway's protoc-gen-openapiv2 are Go modules (Debian only
has grpc-gateway 1.6, which emits Swagger 2.0 for google.api.http annotations). This script is the small
substitute: it reads the descriptors protoc builds (with source info, for the comments) and writes one path per
unary rpc, `POST /PACKAGE.SERVICE/METHOD` with a JSON body, as the Connect protocol serves them, using the JSON
the server writes (proto field names, every field present; 64-bit integers as strings, bytes as base64, enums
by name). Streaming rpcs are left out: plain HTTP clients use their unary forms. tools/gen_proto.sh runs this,
and tools/check_contracts.sh (CI) checks the committed document is current.

Usage: tools/gen_openapi.py [OUTPUT]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
PROTOS = sorted(str(p.relative_to(PROTO_DIR)) for p in (PROTO_DIR / "imagesearch" / "v1").glob("*.proto"))
OUTPUT = ROOT / "src" / "imagesearch" / "v1" / "image_search_service.openapi.json"
SERVICE = "imagesearch.v1.ImageSearchService"

F = descriptor_pb2.FieldDescriptorProto
_SCALARS: dict[int, dict[str, Any]] = {
    F.TYPE_DOUBLE: {"type": "number", "format": "double"},
    F.TYPE_FLOAT: {"type": "number", "format": "float"},
    F.TYPE_INT32: {"type": "integer", "format": "int32"},
    F.TYPE_SINT32: {"type": "integer", "format": "int32"},
    F.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    F.TYPE_UINT32: {"type": "integer", "format": "int64", "minimum": 0},
    F.TYPE_FIXED32: {"type": "integer", "format": "int64", "minimum": 0},
    # Protobuf JSON writes 64-bit integers as strings (JavaScript numbers lose precision); numbers are accepted.
    F.TYPE_INT64: {"type": ["string", "integer"], "format": "int64"},
    F.TYPE_SINT64: {"type": ["string", "integer"], "format": "int64"},
    F.TYPE_SFIXED64: {"type": ["string", "integer"], "format": "int64"},
    F.TYPE_UINT64: {"type": ["string", "integer"], "format": "uint64"},
    F.TYPE_FIXED64: {"type": ["string", "integer"], "format": "uint64"},
    F.TYPE_BOOL: {"type": "boolean"},
    F.TYPE_STRING: {"type": "string"},
    F.TYPE_BYTES: {"type": "string", "format": "byte", "contentEncoding": "base64"},
}
# Well-known types with their own JSON form.
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Any": {
        "type": "object",
        "description": "A message of any type: `@type` names it, its fields follow.",
        "properties": {"@type": {"type": "string"}},
        "additionalProperties": True,
    },
    "google.protobuf.Duration": {"type": "string", "description": 'Seconds with an "s" suffix, e.g. "1.5s".'},
}
REQUIRED, OUTPUT_ONLY = 2, 3  # google.api.FieldBehavior
FIELD_BEHAVIOR = 1052  # the google.api.field_behavior extension's number
CONNECT_CODES = [
    "canceled", "unknown", "invalid_argument", "deadline_exceeded", "not_found", "already_exists",
    "permission_denied", "resource_exhausted", "failed_precondition", "aborted", "out_of_range", "unimplemented",
    "internal", "unavailable", "data_loss", "unauthenticated",
]  # fmt: skip


def descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "protos.binpb"
        subprocess.run(
            [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_DIR}", "--include_imports",
             "--include_source_info", f"--descriptor_set_out={out}", *PROTOS],
            check=True,
        )  # fmt: skip
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    health = descriptor_pb2.FileDescriptorProto()
    health_pb2.DESCRIPTOR.CopyToProto(health)
    files.file.append(health)
    return files


class Protos:
    """Messages, enums and comments by full name, from a descriptor set."""

    def __init__(self, files: descriptor_pb2.FileDescriptorSet) -> None:
        self.messages: dict[str, descriptor_pb2.DescriptorProto] = {}
        self.enums: dict[str, descriptor_pb2.EnumDescriptorProto] = {}
        self.comments: dict[str, str] = {}
        self.services: dict[str, descriptor_pb2.ServiceDescriptorProto] = {}
        for file in files.file:
            comments = {
                tuple(loc.path): loc.leading_comments for loc in file.source_code_info.location if loc.leading_comments
            }
            prefix = f"{file.package}." if file.package else ""
            for i, message in enumerate(file.message_type):
                self._message(prefix + message.name, message, (4, i), comments)
            for i, enum in enumerate(file.enum_type):
                self._enum(prefix + enum.name, enum, (5, i), comments)
            for i, service in enumerate(file.service):
                name = prefix + service.name
                self.services[name] = service
                self._comment(name, (6, i), comments)
                for j, method in enumerate(service.method):
                    self._comment(f"{name}.{method.name}", (6, i, 2, j), comments)

    def _comment(self, name: str, path: tuple[int, ...], comments: dict[tuple[int, ...], str]) -> None:
        if path in comments:
            self.comments[name] = _clean(comments[path])

    def _message(self, name: str, message: Any, path: tuple[int, ...], comments: dict[tuple[int, ...], str]) -> None:
        self.messages[name] = message
        self._comment(name, path, comments)
        for k, field in enumerate(message.field):
            self._comment(f"{name}.{field.name}", (*path, 2, k), comments)
        for j, nested in enumerate(message.nested_type):
            self._message(f"{name}.{nested.name}", nested, (*path, 3, j), comments)
        for j, enum in enumerate(message.enum_type):
            self._enum(f"{name}.{enum.name}", enum, (*path, 4, j), comments)

    def _enum(self, name: str, enum: Any, path: tuple[int, ...], comments: dict[tuple[int, ...], str]) -> None:
        self.enums[name] = enum
        self._comment(name, path, comments)
        for k, value in enumerate(enum.value):
            self._comment(f"{name}.{value.name}", (*path, 2, k), comments)


def _clean(comment: str) -> str:
    lines = [line[1:] if line.startswith(" ") else line for line in comment.strip("\n").split("\n")]
    return "\n".join(lines).strip()


def _behaviours(field: descriptor_pb2.FieldDescriptorProto) -> list[int]:
    """google.api.field_behavior values, read from the options' unknown fields (the extension need not be
    loaded): a packed or unpacked repeated enum, field 1052."""
    raw = field.options.SerializeToString()
    found: list[int] = []
    for number, wire_type, value in _fields(raw):
        if number != FIELD_BEHAVIOR:
            continue
        if wire_type == 0:
            found.append(value)
        elif wire_type == 2:
            found.extend(v for _, _, v in _varints(value))
    return found


def _fields(raw: bytes) -> Iterator[tuple[int, int, Any]]:
    pos = 0
    while pos < len(raw):
        key, pos = _varint(raw, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _varint(raw, pos)
            yield number, wire_type, value
        elif wire_type == 2:
            length, pos = _varint(raw, pos)
            yield number, wire_type, raw[pos : pos + length]
            pos += length
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        else:
            raise ValueError(f"unexpected wire type {wire_type}")


def _varints(raw: bytes) -> Iterator[tuple[int, int, int]]:
    pos = 0
    while pos < len(raw):
        value, pos = _varint(raw, pos)
        yield 0, 0, value


def _varint(raw: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = raw[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


class Schemas:
    """components/schemas: every message and enum reachable from the paths, by full name."""

    def __init__(self, protos: Protos) -> None:
        self.protos = protos
        self.schemas: dict[str, dict[str, Any]] = {}

    def ref(self, type_name: str) -> dict[str, Any]:
        name = type_name.lstrip(".")
        if name in _WELL_KNOWN:
            self.schemas.setdefault(name, _WELL_KNOWN[name])
        elif name not in self.schemas:
            self.schemas[name] = {}  # placeholder: recursive messages refer to themselves
            self.schemas[name] = self._enum(name) if name in self.protos.enums else self._message(name)
        return {"$ref": f"#/components/schemas/{name}"}

    def _enum(self, name: str) -> dict[str, Any]:
        enum = self.protos.enums[name]
        lines = [self.protos.comments.get(name, "")]
        lines += [f"- `{v.name}`: {self.protos.comments.get(f'{name}.{v.name}', '')}" for v in enum.value]
        return {"type": "string", "enum": [v.name for v in enum.value], "description": "\n".join(lines).strip()}

    def _message(self, name: str) -> dict[str, Any]:
        message = self.protos.messages[name]
        properties: dict[str, Any] = {}
        required: list[str] = []
        for field in message.field:
            schema = self._field(name, message, field)
            description = self.protos.comments.get(f"{name}.{field.name}", "")
            if field.HasField("oneof_index") and not field.proto3_optional:
                oneof = message.oneof_decl[field.oneof_index].name
                members = [
                    f.name for f in message.field if f.HasField("oneof_index") and f.oneof_index == field.oneof_index
                ]
                description += f"\n\nOne of `{oneof}`: set at most one of {', '.join(f'`{m}`' for m in members)}."
            behaviours = _behaviours(field)
            if REQUIRED in behaviours:
                required.append(field.name)
            if OUTPUT_ONLY in behaviours:
                schema = {**schema, "readOnly": True}
            if description:
                schema = {**schema, "description": description.strip()}
            properties[field.name] = schema
        result: dict[str, Any] = {"type": "object", "properties": properties}
        if required:
            result["required"] = required
        if name in self.protos.comments:
            result["description"] = self.protos.comments[name]
        return result

    def _field(self, parent: str, message: Any, field: descriptor_pb2.FieldDescriptorProto) -> dict[str, Any]:
        if field.type == F.TYPE_MESSAGE:
            entry = self.protos.messages.get(field.type_name.lstrip("."))
            if entry is not None and entry.options.map_entry:
                _, value = entry.field
                return {"type": "object", "additionalProperties": self._single(value)}
        single = self._single(field)
        if field.label == F.LABEL_REPEATED:
            return {"type": "array", "items": single}
        return single

    def _single(self, field: descriptor_pb2.FieldDescriptorProto) -> dict[str, Any]:
        if field.type in (F.TYPE_MESSAGE, F.TYPE_ENUM):
            return self.ref(field.type_name)
        return dict(_SCALARS[field.type])


def _summary(description: str) -> str:
    first = description.split("\n\n", 1)[0].replace("\n", " ")
    return first.split(". ", 1)[0].rstrip(".")


def document(protos: Protos, scopes: dict[str, str]) -> dict[str, Any]:
    schemas = Schemas(protos)
    paths: dict[str, Any] = {}
    services = [
        (SERVICE, protos.services[SERVICE]),
        ("grpc.health.v1.Health", protos.services["grpc.health.v1.Health"]),
    ]
    for service_name, service in services:
        tag = service_name.rsplit(".", 1)[1]
        for method in service.method:
            if method.client_streaming or method.server_streaming:
                continue
            if service_name == "grpc.health.v1.Health" and method.name != "Check":
                continue
            description = protos.comments.get(f"{service_name}.{method.name}", "")
            if service_name == SERVICE:
                description += f"\n\nWhen the server requires API keys: a key with the `{scopes[method.name]}` scope."
                security: list[dict[str, list[str]]] = [{"apiKey": []}, {}]
            else:
                description = (
                    "The gRPC health check (grpc.health.v1): `SERVING` or `NOT_SERVING` for the whole server "
                    '(`service` empty) or for "imagesearch.v1.ImageSearchService". Open without a key unless the '
                    "server sets IMAGESEARCH_AUTH_PROTECT_ALL."
                )
                security = [{}, {"apiKey": []}]
            paths[f"/{service_name}/{method.name}"] = {
                "post": {
                    "operationId": f"{tag}_{method.name}",
                    "tags": [tag],
                    "summary": _summary(description),
                    "description": description.strip(),
                    "parameters": [
                        {"$ref": "#/components/parameters/ConnectTimeoutMs"},
                        {"$ref": "#/components/parameters/RequestId"},
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": schemas.ref(method.input_type)}},
                    },
                    "responses": {
                        "200": {
                            "description": "Success.",
                            "headers": {"x-request-id": {"$ref": "#/components/headers/RequestId"}},
                            "content": {"application/json": {"schema": schemas.ref(method.output_type)}},
                        },
                        "default": {"$ref": "#/components/responses/Error"},
                    },
                    "security": security,
                }
            }
    paths["/healthz"] = {
        "get": {
            "operationId": "healthz",
            "tags": ["Health"],
            "summary": "Health for HTTP probes",
            "description": "The whole server's health status: 200 while `SERVING`, 503 otherwise (the vector store "
            "cannot be reached, or the server is draining). Open without a key unless the server sets "
            "IMAGESEARCH_AUTH_PROTECT_ALL.",
            "responses": {
                status: {
                    "description": description,
                    "content": {
                        "application/json": {"schema": {"type": "object", "properties": {"status": {"type": "string"}}}}
                    },
                }
                for status, description in (("200", "Serving."), ("503", "Not serving."))
            },
            "security": [{}, {"apiKey": []}],
        }
    }
    service_description = protos.comments.get(SERVICE, "")
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "imagesearch HTTP/JSON API",
            "version": "v1",
            "description": (
                f"{service_description}\n\n"
                "This is the HTTP/JSON port of the gRPC service `imagesearch.v1.ImageSearchService`, in the Connect "
                "protocol: each unary rpc is a POST of its request message as JSON to `/PACKAGE.SERVICE/METHOD` "
                "(`Content-Type: application/json`), answered with the response message as JSON. Field names are "
                "those of the .proto; 64-bit integers are strings, bytes are base64, enums are their names.\n\n"
                "Errors: the HTTP status follows the code (invalid_argument 400, unauthenticated 401, "
                "permission_denied 403, not_found 404, resource_exhausted 429, internal 500, unavailable 503, "
                "deadline_exceeded 504) and the body carries the code, the message and the details of the gRPC "
                "status (`google.rpc.BadRequest` naming each offending field, `google.rpc.RetryInfo`, "
                "`google.rpc.ResourceInfo`), each as base64 of the message with a readable `debug` copy.\n\n"
                "The streaming rpcs (Search, IndexProduct, IndexProducts) are served at their paths too, for "
                "Connect and gRPC-Web clients; plain HTTP callers use SearchInline and IndexProductInline."
            ),
        },
        "tags": [
            {"name": "ImageSearchService", "description": "Product search by image and text, and the catalogue."},
            {"name": "Health", "description": "Health checks."},
        ],
        "paths": paths,
        "components": {
            "schemas": dict(sorted({**schemas.schemas, "connect.Error": _error_schema()}.items())),
            "responses": {
                "Error": {
                    "description": "A Connect error: the gRPC status code, message and details.",
                    "headers": {"x-request-id": {"$ref": "#/components/headers/RequestId"}},
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/connect.Error"}}},
                }
            },
            "parameters": {
                "ConnectTimeoutMs": {
                    "name": "Connect-Timeout-Ms",
                    "in": "header",
                    "required": False,
                    "description": "The caller's deadline in milliseconds: past it the work is abandoned and the "
                    "call ends with deadline_exceeded (504).",
                    "schema": {"type": "integer", "minimum": 0},
                },
                "RequestId": {
                    "name": "x-request-id",
                    "in": "header",
                    "required": False,
                    "description": "An id for the server's log line of this call (at most 128 characters); the "
                    "server makes one when absent and returns it in the response's x-request-id.",
                    "schema": {"type": "string"},
                },
            },
            "headers": {
                "RequestId": {
                    "description": "The request id of the server's log line of this call.",
                    "schema": {"type": "string"},
                }
            },
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key (`Authorization: Bearer KEY`), when the server requires keys "
                    "(IMAGESEARCH_API_KEYS_FILE): read keys search and read, write keys also index and delete.",
                }
            },
        },
    }


def _error_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "A Connect error.",
        "properties": {
            "code": {"type": "string", "enum": CONNECT_CODES, "description": "The gRPC status code, in snake case."},
            "message": {"type": "string", "description": "What went wrong, for a person."},
            "details": {
                "type": "array",
                "description": "The status details: google.rpc.BadRequest (every offending field), RetryInfo "
                "(when to retry unavailable and resource_exhausted), ResourceInfo (unknown products).",
                "items": {
                    "type": "object",
                    "properties": {
                        "type": {"type": "string", "description": "The detail's type, e.g. google.rpc.BadRequest."},
                        "value": {
                            "type": "string",
                            "contentEncoding": "base64",
                            "description": "The detail in protobuf binary, base64 without padding.",
                        },
                        "debug": {"type": "object", "description": "The detail as JSON, for reading."},
                    },
                },
            },
        },
    }


def main(argv: list[str]) -> int:
    from imagesearch.api.auth import SCOPES

    output = Path(argv[1]) if len(argv) > 1 else OUTPUT
    text = json.dumps(document(Protos(descriptor_set()), dict(SCOPES)), indent=2, ensure_ascii=False) + "\n"
    output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
