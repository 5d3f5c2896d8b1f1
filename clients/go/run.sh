#!/usr/bin/env bash
# Generates the stubs, builds the Go example offline and runs it against a server.
# Usage:
#   clients/go/run.sh TARGET IMAGE [more example flags, e.g. -id my-product -text "red mug" -keep]
# e.g. clients/go/run.sh localhost:50051 mug.jpg
#
# Builds in GOPATH mode against the Go sources Debian installs under /usr/share/gocode (grpc-go, protobuf-go,
# genproto), so it needs no module proxy; the toolchain comes from clients/install_toolchains.sh. The binary is
# clients/go/bin/example. With a module proxy, `go mod init github.com/imagesearch/imagesearch/clients/go &&
# go mod tidy` builds the same code in module mode.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 TARGET IMAGE [example flags]" >&2
  exit 2
fi
target=$1
image=$(realpath -e "$2")
shift 2
cd "$(dirname "$0")"
for tool in go protoc protoc-gen-go protoc-gen-go-grpc; do
  command -v "$tool" >/dev/null || { echo "run.sh: $tool not found; run clients/install_toolchains.sh go" >&2; exit 1; }
done

./generate.sh
# A GOPATH whose only project is this directory, under its import path; Debian's tree supplies the rest.
gopath=$PWD/.gopath
mkdir -p "$gopath/src/github.com/imagesearch/imagesearch/clients"
ln -sfn "$PWD" "$gopath/src/github.com/imagesearch/imagesearch/clients/go"
GO111MODULE=off GOPATH="$gopath:/usr/share/gocode" GOFLAGS='' \
  go build -o bin/example github.com/imagesearch/imagesearch/clients/go/example
exec bin/example -target "$target" -image "$image" "$@"
