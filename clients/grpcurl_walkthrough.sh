#!/usr/bin/env bash
# The README's grpcurl walkthrough, run and checked against a live server: list, describe, health checks,
# GetServiceInfo, IndexProduct (image bytes base64-encoded in grpcurl's JSON, 64 KiB per chunk), search by text,
# by a model code only the product's name carries (hybrid, the default for text), by the words alone (lexical) and
# with rank fusion, search by image, an INVALID_ARGUMENT with its google.rpc.BadRequest, GetProduct,
# DeleteProduct, and NOT_FOUND after the delete. Every answer is checked (python3 on grpcurl's JSON), not only exit codes; the first
# mismatch stops the script with exit 1.
#
# Usage: clients/grpcurl_walkthrough.sh TARGET IMAGE      e.g. clients/grpcurl_walkthrough.sh localhost:50051 mug.jpg
#   WALKTHROUGH_ID   product id to index and delete again (default grpcurl-mug-1; it must not exist yet)
#   IMAGESEARCH_API_KEY  sent as "authorization: Bearer KEY" when set (a write key: the walkthrough indexes)
#   GRPCURL          grpcurl binary (default: the repo's .venv/bin/grpcurl, else grpcurl on PATH)
# The script prints the last line "top hits: image=ID text=ID" for callers that check relevance.
set -euo pipefail
if [ $# -ne 2 ]; then
  echo "usage: $0 TARGET IMAGE" >&2
  exit 2
fi
target=$1
image=$(realpath -e "$2")
cd "$(dirname "$0")/.."
id=${WALKTHROUGH_ID:-grpcurl-mug-1}
GRPCURL=${GRPCURL:-$( [ -x .venv/bin/grpcurl ] && echo .venv/bin/grpcurl || echo grpcurl )}
SERVICE=imagesearch.v1.ImageSearchService
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# grpcurl with the options every call here uses: plaintext, a deadline, default values in the JSON output
# (so that e.g. "created": false is printed rather than left out), and the API key if there is one.
auth=()
if [ -n "${IMAGESEARCH_API_KEY:-}" ]; then
  auth=(-H "authorization: Bearer $IMAGESEARCH_API_KEY")
fi
g() { "$GRPCURL" -plaintext -max-time 30 -emit-defaults "${auth[@]}" "$@"; }

step() { printf '\n--- %s\n' "$*"; }

# check DESCRIPTION PYTHON_EXPRESSION [ARG...] < JSON: the expression sees the parsed JSON as r, the args as a.
check() {
  local description=$1 expression=$2
  shift 2
  if python3 -c "import json, sys; r = json.load(sys.stdin); a = sys.argv[1:]; sys.exit(0 if ($expression) else 1)" "$@"; then
    echo "ok: $description"
  else
    echo "MISMATCH: $description" >&2
    exit 1
  fi
}

# run_expect_code CODE OUTFILE grpcurl-args...: the call must fail with this gRPC status code (grpcurl exits
# 64 + code); its -format-error JSON status lands in OUTFILE.
run_expect_code() {
  local want=$1 out=$2 rc=0
  shift 2
  g -format-error "$@" >"$out" 2>&1 || rc=$?
  cat "$out"
  echo
  if [ "$rc" -ne $((64 + want)) ]; then
    echo "MISMATCH: expected gRPC status $want (grpcurl exit $((64 + want))), got exit $rc" >&2
    exit 1
  fi
}

# The image as IndexProduct/Search messages: one {"image_chunk": BASE64} line per 64 KiB of the file.
# shellcheck disable=SC2016  # $(base64 -w0) runs in the filter shell, once per chunk
image_chunks() { split -b 64K --filter='printf "{\"image_chunk\": \"%s\"}\n" "$(base64 -w0)"' "$1"; }

step "list services (reflection)"
g "$target" list | tee "$work/list"
for name in grpc.health.v1.Health $SERVICE; do
  grep -qx "$name" "$work/list" || { echo "MISMATCH: $name not listed" >&2; exit 1; }
done
echo "ok: health and $SERVICE listed"

step "describe $SERVICE"
g "$target" describe $SERVICE | tee "$work/describe"
for rpc in Search IndexProduct IndexProducts GetProduct DeleteProduct GetServiceInfo; do
  grep -q "rpc $rpc (" "$work/describe" || { echo "MISMATCH: rpc $rpc not described" >&2; exit 1; }
done
echo "ok: every rpc described"

step "health: whole server, then the service"
g "$target" grpc.health.v1.Health/Check | tee "$work/out"
check "server SERVING" 'r["status"] == "SERVING"' <"$work/out"
g -d "{\"service\": \"$SERVICE\"}" "$target" grpc.health.v1.Health/Check | tee "$work/out"
check "$SERVICE SERVING" 'r["status"] == "SERVING"' <"$work/out"

step "GetServiceInfo"
g "$target" $SERVICE/GetServiceInfo | tee "$work/info"
check "model, store and limits reported" \
  'r["model"]["embedding_dimension"] > 0 and r["store"]["backend"] in ("embedded", "qdrant") and r["limits"]["max_top_k"] >= 5' \
  <"$work/info"

step "the id $id is free (GetProduct: NOT_FOUND; else pick another with WALKTHROUGH_ID)"
run_expect_code 5 "$work/out" -d "{\"id\": \"$id\"}" "$target" $SERVICE/GetProduct

step "IndexProduct $id with $(basename "$image") ($(wc -c <"$image") bytes)"
{
  echo "{\"product\": {\"id\": \"$id\", \"name\": \"Red mug ZX-90210\", \"category\": \"mugs\", \"price\": 9.5, \"currency\": \"EUR\",
               \"attributes\": {\"colour\": \"red\"}}}"
  image_chunks "$image"
} | g -d @ "$target" $SERVICE/IndexProduct | tee "$work/out"
check "created $id" 'r["created"] is True and r["product"]["id"] == a[0]' "$id" <"$work/out"

step "Search by text"
g -d '{"query": {"text": "red mug", "top_k": 5}}' "$target" $SERVICE/Search | tee "$work/text"
check "text query, 1 to 5 hits, best first" \
  'r["query_kind"] == "QUERY_KIND_TEXT" and 1 <= len(r["hits"]) <= 5 and [h["score"] for h in r["hits"]] == sorted((h["score"] for h in r["hits"]), reverse=True)' \
  <"$work/text"

step "Search by a model code only the name carries (hybrid: the words and the picture, the default for text)"
g -d '{"query": {"text": "ZX-90210", "top_k": 3}}' "$target" $SERVICE/Search | tee "$work/out"
check "hybrid, $id first" \
  'r["mode"] == "SEARCH_MODE_HYBRID" and r["hits"][0]["product"]["id"] == a[0] and 0 < r["hits"][0]["score"] <= 1' \
  "$id" <"$work/out"

step "Search by the words alone (lexical: no model), then with reciprocal rank fusion"
g -d '{"query": {"text": "red mug zx-90210", "mode": "SEARCH_MODE_LEXICAL", "top_k": 3}}' "$target" $SERVICE/Search |
  tee "$work/out"
check "lexical, nothing encoded, $id first with the best score (1)" \
  'r["mode"] == "SEARCH_MODE_LEXICAL" and r["embedding_cache"] == "CACHE_OUTCOME_BYPASS" and r["hits"][0]["product"]["id"] == a[0] and abs(r["hits"][0]["score"] - 1) < 1e-6' \
  "$id" <"$work/out"
g -d '{"query": {"text": "red mug", "mode": "SEARCH_MODE_HYBRID", "hybrid_spec": {"fusion": "FUSION_RECIPROCAL_RANK"}, "top_k": 3}}' \
  "$target" $SERVICE/Search | tee "$work/out"
check "hybrid with rank fusion, scores 0 to 1, best first" \
  'r["mode"] == "SEARCH_MODE_HYBRID" and 1 <= len(r["hits"]) <= 3 and all(0 < h["score"] <= 1 for h in r["hits"]) and [h["score"] for h in r["hits"]] == sorted((h["score"] for h in r["hits"]), reverse=True)' \
  <"$work/out"

step "Search by image, filtered to category mugs and price <= 20"
{
  echo '{"query": {"top_k": 5, "filter": {"categories": ["mugs"], "price_max": 20}}}'
  image_chunks "$image"
} | g -d @ "$target" $SERVICE/Search | tee "$work/image"
check "image query, $id first with score ~1" \
  'r["query_kind"] == "QUERY_KIND_IMAGE" and r["hits"][0]["product"]["id"] == a[0] and r["hits"][0]["score"] > 0.99' \
  "$id" <"$work/image"
check "every hit passes the filter" \
  'all(h["product"]["category"] == "mugs" and h["product"]["price"] <= 20 for h in r["hits"])' <"$work/image"

step "INVALID_ARGUMENT: top_k 1000 (the limit is $(python3 -c 'import json,sys; print(json.load(sys.stdin)["limits"]["max_top_k"])' <"$work/info"))"
run_expect_code 3 "$work/out" -d '{"query": {"text": "red mug", "top_k": 1000}}' "$target" $SERVICE/Search
check "google.rpc.BadRequest names query.top_k" \
  '"query.top_k" in [v["field"] for d in r["details"] if d["@type"].endswith("google.rpc.BadRequest") for v in d["field_violations"]]' \
  <"$work/out"

step "GetProduct $id"
g -d "{\"id\": \"$id\"}" "$target" $SERVICE/GetProduct | tee "$work/out"
check "stored as sent" \
  'r["product"]["id"] == a[0] and r["product"]["name"] == "Red mug ZX-90210" and r["product"]["category"] == "mugs" and r["product"]["price"] == 9.5 and r["product"]["attributes"] == {"colour": "red"}' \
  "$id" <"$work/out"

step "DeleteProduct $id, then GetProduct: NOT_FOUND"
g -d "{\"id\": \"$id\"}" "$target" $SERVICE/DeleteProduct | tee "$work/out"
check "empty response" 'r == {}' <"$work/out"
run_expect_code 5 "$work/out" -d "{\"id\": \"$id\"}" "$target" $SERVICE/GetProduct

echo
echo "grpcurl walkthrough: all checks passed"
python3 -c 'import json, sys; print("top hits: image=%s text=%s" % tuple(json.load(open(p))["hits"][0]["product"]["id"] for p in sys.argv[1:]))' \
  "$work/image" "$work/text"
