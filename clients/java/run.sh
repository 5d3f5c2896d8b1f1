#!/usr/bin/env bash
# Generates the stubs, compiles the Java example offline and runs it against a server.
# Usage:
#   clients/java/run.sh TARGET IMAGE [--id ID] [--text TEXT] [--keep]
# e.g. clients/java/run.sh localhost:50051 mug.jpg
#
# Everything comes from Debian (clients/install_toolchains.sh java): protoc + /usr/bin/grpc_java_plugin generate
# imagesearch.v1 and grpc.health.v1 into clients/java/build/gen (never committed); javac compiles them and the
# example against the jars in /usr/share/java. google.api.FieldBehavior and google.rpc.{Status,BadRequest} are
# not generated: they come compiled in proto-google-common-protos.jar (libgoogle-common-protos-java), the same
# classes io.grpc.protobuf.StatusProto uses.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 TARGET IMAGE [--id ID] [--text TEXT] [--keep]" >&2
  exit 2
fi
target=$1
image=$(realpath -e "$2")
shift 2
cd "$(dirname "$0")"
REPO=$(cd ../.. && pwd)
for tool in protoc javac java /usr/bin/grpc_java_plugin /usr/share/java/proto-google-common-protos.jar; do
  command -v "$tool" >/dev/null || [ -e "$tool" ] ||
    { echo "run.sh: $tool not found; run clients/install_toolchains.sh java" >&2; exit 1; }
done

jars=(
  grpc-api grpc-core grpc-context grpc-stub grpc-protobuf grpc-protobuf-lite grpc-netty
  protobuf proto-google-common-protos guava perfmark-api gson jsr305 error_prone_annotations
  geronimo-annotation-1.3-spec
  netty-buffer netty-codec netty-codec-http netty-codec-http2 netty-common netty-handler netty-resolver
  netty-transport
)
classpath=$(printf '/usr/share/java/%s.jar:' "${jars[@]}")
classpath=${classpath%:}

rm -rf build
mkdir -p build/gen build/classes
protoc -I"$REPO/proto" -I/usr/include -I/usr/share/grpc-proto \
  --plugin=protoc-gen-grpc-java=/usr/bin/grpc_java_plugin \
  --java_out=build/gen --grpc-java_out=build/gen \
  "$REPO"/proto/imagesearch/v1/*.proto grpc/health/v1/health.proto
find build/gen src/main/java -name '*.java' > build/sources.txt
javac -nowarn -encoding UTF-8 --release 17 -cp "$classpath" -d build/classes @build/sources.txt
exec java -cp "build/classes:$classpath" dev.imagesearch.example.Example "$target" "$image" "$@"
