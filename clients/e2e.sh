#!/usr/bin/env bash
# End-to-end check of the polyglot clients against a real server: installs the Go and Java toolchains if missing
# (clients/install_toolchains.sh), starts `imagesearch serve` with the bundled synthetic-clip model on a free
# loopback port and a temporary data directory, indexes a small synthetic catalogue of distractors (no red
# mugs), then runs the grpcurl walkthrough, the curl walkthrough of the HTTP/JSON port and the Go, Java and Python
# examples, each with its own red-mug
# photo (a ~480 KB PNG, so it travels in 8 chunks of 64 KiB) as the packshot and a detail view cropped from it as
# its second image. Each client must get its own product back first for its packshot, for its second image (the hit
# naming image 1, "detail", as the one matched), for a region of the packshot, for a search with a ranking rule
# (whose explanation gives the rule's part) and for the text "red mug"; FindDuplicates must list an exact
# re-upload of the packshot; each client deletes what it indexed. Finally SIGTERM must stop the server with exit 0.
#
# Usage: clients/e2e.sh      (after tools/install.sh; root or sudo for the first run's apt installs)
#   E2E_MODEL       model spec for the server (default synthetic-clip)
#   E2E_CHECK_TEXT  check that "red mug" finds each client's red mug first: auto (default: only with
#                   synthetic-clip, the model that knows the synthetic catalogue), 1 or 0
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
MODEL=${E2E_MODEL:-synthetic-clip}
PY=.venv/bin/python
GRPCURL=.venv/bin/grpcurl
for tool in "$PY" .venv/bin/imagesearch "$GRPCURL"; do
  [ -x "$tool" ] || { echo "e2e: $tool missing; run tools/install.sh first" >&2; exit 1; }
done

started=$(date +%s.%N)
timings=()
section_start=
section() {
  finish_section
  section_name=$1
  section_start=$(date +%s.%N)
  printf '\n========== %s ==========\n' "$1"
}
finish_section() {
  if [ -n "$section_start" ]; then
    timings+=("$(awk -v name="$section_name" -v t0="$section_start" -v t1="$(date +%s.%N)" \
      'BEGIN { printf "%-42s %6.1f s", name, t1 - t0 }')")
  fi
  section_start=
}
fail() { echo "E2E MISMATCH: $*" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/imagesearch-e2e.XXXXXX")
server_pid=
cleanup() {
  local rc=$?
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  if [ "$rc" -ne 0 ]; then
    echo >&2
    echo "========== E2E FAILED (exit $rc); last server log lines ==========" >&2
    tail -n 30 "$work/server.log" >&2 2>/dev/null || true
  fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT

section "toolchains (Go, Java, protoc)"
bash clients/install_toolchains.sh
go version
javac -version
protoc --version

section "server ($MODEL)"
port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
http_port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
target=127.0.0.1:$port
IMAGESEARCH_MODEL=$MODEL IMAGESEARCH_OFFLINE=1 IMAGESEARCH_HOST=127.0.0.1 IMAGESEARCH_PORT=$port \
  IMAGESEARCH_HTTP_PORT=$http_port \
  IMAGESEARCH_DATA_DIR=$work/data IMAGESEARCH_LOG_FORMAT=json \
  .venv/bin/imagesearch serve >"$work/server.log" 2>&1 &
server_pid=$!
echo "pid $server_pid, $target (HTTP/JSON on port $http_port), data in $work/data, model $MODEL"
for _ in $(seq 360); do
  if "$GRPCURL" -plaintext -max-time 2 "$target" grpc.health.v1.Health/Check 2>/dev/null | grep -q '"SERVING"'; then
    break
  fi
  kill -0 "$server_pid" 2>/dev/null || fail "the server exited during start-up"
  sleep 0.5
done
"$GRPCURL" -plaintext -max-time 2 "$target" grpc.health.v1.Health/Check | grep -q '"SERVING"' ||
  fail "the server is not SERVING after 180 s"
echo "SERVING"

section "test images and distractor catalogue"
"$PY" - "$work" <<'EOF'
import random
import sys
from pathlib import Path

from imagesearch.synthetic import make_catalogue, render

work = Path(sys.argv[1])
# One red-mug photo per client, each a different render, 512 px PNG: several 64 KiB chunks on the wire.
for seed, client in enumerate(("grpcurl", "go", "java", "python", "curl"), 101):
    render("mug", "red", "plain", random.Random(seed), size=512).save(work / f"{client}.png")
# Distractors: every other colour and kind, and no red mug, so "red mug" has one right answer per client.
for item in make_catalogue(48, seed=7):
    if (item.colour, item.kind) == ("red", "mug"):
        continue
    folder = work / "catalogue" / ("mugs" if item.kind == "mug" else "other")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{item.product_id}.jpg").write_bytes(item.jpeg())
EOF
ls -l "$work"/*.png
distractors=0
for category in mugs other; do
  IMAGESEARCH_TARGET=$target .venv/bin/imagesearch index --category "$category" "$work/catalogue/$category"
  distractors=$((distractors + $(find "$work/catalogue/$category" -name "*.jpg" | wc -l)))
done
echo "$distractors distractors indexed"

# product_count from GetServiceInfo
product_count() {
  "$GRPCURL" -plaintext -max-time 10 "$target" imagesearch.v1.ImageSearchService/GetServiceInfo |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["store"].get("product_count", 0))'
}
[ "$(product_count)" = "$distractors" ] || fail "product_count is $(product_count), want $distractors"

# expect_first LOG KIND ID: in a Go/Java example's output, the first hit listed under "KIND search" is ID.
expect_first() {
  local got
  got=$(awk -v kind="$2" '$0 ~ "^" kind " search" { getline; print $2; exit }' "$1")
  [ "$got" = "$3" ] || fail "$(basename "$1" .log): first hit for the $2 search is '$got', want '$3'"
  echo "e2e check ok: $(basename "$1" .log) $2 search -> $3 first"
}
# expect_matched LOG ID: in an example's output, the first hit of the search by its second image is ID, matched by
# its image 1 ("detail").
expect_matched() {
  local got
  got=$(awk '$0 ~ "^second-image search" { getline; print $2, $4; exit }' "$1")
  [ "$got" = "$2 image=1:detail" ] ||
    fail "$(basename "$1" .log): first hit for the second image is '$got', want '$2 image=1:detail'"
  echo "e2e check ok: $(basename "$1" .log) second-image search -> $2 first, matched by image 1 (detail)"
}
# expect_example LOG ID: what every example (Go, Java, Python) must show besides the text search.
expect_example() {
  local log=$1 id=$2 name
  name=$(basename "$log" .log)
  expect_first "$log" image "$id"
  expect_first "$log" second-image "$id"
  expect_matched "$log" "$id"
  expect_first "$log" region "$id"
  expect_first "$log" ranked "$id"
  # ln(1 + 1520) = 7.3271, times the rule's weight 0.01
  grep -q "^     explanation: relevance=[0-9.]* popular: f=7\.3271 +0\.0733$" "$log" ||
    fail "$name: the ranked hit's explanation does not give the rule popular: f=7.3271 +0.0733"
  echo "e2e check ok: $name ranked search explained (popular: f=7.3271 +0.0733)"
  grep -q "^duplicates of $id: $id-copy similarity=[01]\.[0-9]* image 0 ~ 0 exact=true$" "$log" ||
    fail "$name: FindDuplicates did not list $id-copy as an exact duplicate"
  echo "e2e check ok: $name FindDuplicates -> $id-copy, exact"
  grep -q "^  field violation: query.top_k: " "$log" || fail "$name: no BadRequest violation for query.top_k"
}
# expect_walkthrough LOG ID: a walkthrough's line about the search by the second image.
expect_walkthrough() {
  grep -qx "matched image: $2 1 detail" "$1" ||
    fail "$(basename "$1" .log) walkthrough: $(grep '^matched image:' "$1" || echo 'no matched image line')"
  echo "e2e check ok: $(basename "$1" .log) second-image search -> $2 first, matched by image 1 (detail)"
}
check_text=false
case "${E2E_CHECK_TEXT:-auto}" in
  auto) [ "$MODEL" = synthetic-clip ] && check_text=true ;;
  1 | true) check_text=true ;;
esac

section "grpcurl walkthrough"
WALKTHROUGH_ID=grpcurl-e2e-1 GRPCURL=$REPO/$GRPCURL clients/grpcurl_walkthrough.sh "$target" "$work/grpcurl.png" |
  tee "$work/grpcurl.log"
top=$(tail -n 1 "$work/grpcurl.log")
case "$top" in
  "top hits: image=grpcurl-e2e-1 text="*) echo "e2e check ok: grpcurl image search -> grpcurl-e2e-1 first" ;;
  *) fail "grpcurl walkthrough: $top" ;;
esac
expect_walkthrough "$work/grpcurl.log" grpcurl-e2e-1
if $check_text; then
  [ "$top" = "top hits: image=grpcurl-e2e-1 text=grpcurl-e2e-1" ] || fail "grpcurl walkthrough: $top"
  echo "e2e check ok: grpcurl text search -> grpcurl-e2e-1 first"
fi

section "curl walkthrough (HTTP/JSON port)"
WALKTHROUGH_ID=curl-e2e-1 clients/curl_walkthrough.sh "http://127.0.0.1:$http_port" "$work/curl.png" | tee "$work/curl.log"
top=$(tail -n 1 "$work/curl.log")
case "$top" in
  "top hits: image=curl-e2e-1 text="*) echo "e2e check ok: curl image search -> curl-e2e-1 first" ;;
  *) fail "curl walkthrough: $top" ;;
esac
expect_walkthrough "$work/curl.log" curl-e2e-1
if $check_text; then
  [ "$top" = "top hits: image=curl-e2e-1 text=curl-e2e-1" ] || fail "curl walkthrough: $top"
  echo "e2e check ok: curl text search -> curl-e2e-1 first"
fi

section "Go example (generate, build, run)"
clients/go/run.sh "$target" "$work/go.png" -id go-e2e-1 -text "red mug" | tee "$work/go.log"
expect_example "$work/go.log" go-e2e-1
if $check_text; then expect_first "$work/go.log" text go-e2e-1; fi

section "Java example (generate, compile, run)"
clients/java/run.sh "$target" "$work/java.png" --id java-e2e-1 --text "red mug" | tee "$work/java.log"
expect_example "$work/java.log" java-e2e-1
if $check_text; then expect_first "$work/java.log" text java-e2e-1; fi

section "Python example (imagesearch.client)"
"$PY" clients/python/example.py "$target" "$work/python.png" --id python-e2e-1 --text "red mug" | tee "$work/python.log"
expect_example "$work/python.log" python-e2e-1
if $check_text; then expect_first "$work/python.log" text python-e2e-1; fi

section "catalogue clean, server stops on SIGTERM"
[ "$(product_count)" = "$distractors" ] ||
  fail "product_count is $(product_count) after the clients deleted their products, want $distractors"
echo "product_count back to $distractors"
kill -TERM "$server_pid"
server_rc=0
wait "$server_pid" || server_rc=$?
server_pid=
[ "$server_rc" -eq 0 ] || fail "the server exited with $server_rc after SIGTERM, want 0"
echo "server exited 0"
finish_section

printf '\n========== timings ==========\n'
printf '%s\n' "${timings[@]}"
awk -v t0="$started" -v t1="$(date +%s.%N)" 'BEGIN { printf "%-42s %6.1f s\n", "total", t1 - t0 }'
echo "E2E PASSED: grpcurl, curl (HTTP/JSON), Go, Java and Python clients against $MODEL"
