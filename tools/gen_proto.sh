#!/usr/bin/env bash
# Regenerates the Python code for proto/imagesearch/v1/*.proto into src/imagesearch/v1/:
# messages (*_pb2.py), gRPC stubs (*_pb2_grpc.py) and typed stubs for both (*.pyi, by mypy-protobuf), and the
# HTTP/JSON port's OpenAPI document (image_search_service.openapi.json, by tools/gen_openapi.py).
# Never edit the generated files by hand; change the .proto and run this. CI checks they are up to date.
#
# Usage: tools/gen_proto.sh   (uses the project's .venv when present, else the python on PATH)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
BIN=$(dirname "$PY")
OUT=src
rm -f src/imagesearch/v1/*_pb2*.py src/imagesearch/v1/*_pb2*.pyi
# google/api/field_behavior.proto is not generated: its Python module ships in googleapis-common-protos.
"$PY" -m grpc_tools.protoc -Iproto \
  --python_out="$OUT" --grpc_python_out="$OUT" \
  --plugin=protoc-gen-mypy="$BIN/protoc-gen-mypy" --mypy_out="$OUT" \
  --plugin=protoc-gen-mypy_grpc="$BIN/protoc-gen-mypy_grpc" --mypy_grpc_out="$OUT" \
  proto/imagesearch/v1/*.proto
# The proto package imagesearch.v1 maps onto the Python package imagesearch.v1.
printf '"""Generated protobuf and gRPC code for imagesearch.v1 (tools/gen_proto.sh). Do not edit."""\n' \
  > src/imagesearch/v1/__init__.py
"$PY" tools/gen_openapi.py
