#!/usr/bin/env bash
# Installs, from Debian packages, what the Go and Java example clients need to generate, build and run offline:
# Go 1.19 + protoc-gen-go + protoc-gen-go-grpc + grpc-go and genproto sources (GOPATH tree in /usr/share/gocode),
# Java 17 + protoc + grpc_java_plugin + the grpc-java/protobuf-java jars in /usr/share/java.
# Idempotent: packages already installed are skipped, and nothing runs apt-get when all are present.
#
# Usage: bash clients/install_toolchains.sh [go|java|all]   (default all; root, or a user with sudo)
set -euo pipefail

what=${1:-all}
common=(protobuf-compiler)
go_pkgs=(
  golang-go protoc-gen-go protoc-gen-go-grpc golang-google-grpc-dev golang-google-genproto-dev
  # Name the 1.5 line explicitly: with the older golang-goprotobuf-dev the client panics with
  # "protobuf tag not enough fields".
  golang-github-golang-protobuf-1-5-dev
)
java_pkgs=(
  openjdk-17-jdk-headless protobuf-compiler-grpc-java-plugin libgrpc-java libprotobuf-java libnetty-java
  libperfmark-java libgoogle-gson-java libgeronimo-annotation-1.3-spec-java grpc-proto
  # com.google.rpc.{Status,BadRequest} and com.google.api.FieldBehavior, compiled (proto-google-common-protos)
  libgoogle-common-protos-java
)
case "$what" in
  go) wanted=("${common[@]}" "${go_pkgs[@]}") ;;
  java) wanted=("${common[@]}" "${java_pkgs[@]}") ;;
  all) wanted=("${common[@]}" "${go_pkgs[@]}" "${java_pkgs[@]}") ;;
  *) echo "usage: $0 [go|java|all]" >&2; exit 2 ;;
esac

missing=()
for pkg in "${wanted[@]}"; do
  if [ "$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)" != installed ]; then
    missing+=("$pkg")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install_toolchains: all ${#wanted[@]} packages already installed"
  exit 0
fi

if [ "$(id -u)" = 0 ]; then
  SUDO=()
elif command -v sudo >/dev/null 2>&1; then
  SUDO=(sudo)
else
  echo "install_toolchains: need root or sudo to install: ${missing[*]}" >&2
  exit 1
fi
echo "install_toolchains: installing ${missing[*]}"
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install_toolchains: done"
