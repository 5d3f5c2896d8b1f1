#!/usr/bin/env bash
# Generates the Go message and gRPC stubs for proto/imagesearch/v1/*.proto into clients/go/gen/imagesearch/v1
# (the directory their go_package names, relative to the module path github.com/imagesearch/imagesearch/clients/go).
# The output is generated, not committed (clients/go/.gitignore): run this after every proto change.
# google/api/field_behavior.proto and google/rpc/status.proto are not generated: their Go packages come from
# google.golang.org/genproto (Debian: golang-google-genproto-dev), as their go_package options say.
#
# Usage: clients/go/generate.sh   (needs protoc, protoc-gen-go, protoc-gen-go-grpc: clients/install_toolchains.sh)
set -euo pipefail
cd "$(dirname "$0")"
REPO=$(cd ../.. && pwd)
MODULE=github.com/imagesearch/imagesearch/clients/go

rm -rf gen
mkdir -p gen
# -I/usr/include: google/protobuf/*.proto (any.proto, descriptor.proto) from Debian's protobuf-compiler.
protoc -I"$REPO/proto" -I/usr/include \
  --go_out=. --go_opt=module="$MODULE" \
  --go-grpc_out=. --go-grpc_opt=module="$MODULE" \
  "$REPO"/proto/imagesearch/v1/*.proto
echo "generate.sh: $(find gen -name '*.go' | wc -l) files in clients/go/gen"
