#!/usr/bin/env bash
# The README's grpcurl walkthrough, run and checked against a live server: list, describe, health checks,
# GetServiceInfo, IndexProduct of a product with two images (each image's bytes base64-encoded in grpcurl's JSON,
# 64 KiB per chunk, after its image_index message) and a numeric attribute, search by text, by a model code only the
# product's name carries (hybrid, the default for text), by the words alone (lexical) and with rank fusion, search by
# each image (the hit names the image that matched), by a region of the image, with a ranking rule and its score
# explanation, FindDuplicates of an exact re-upload and a search collapsing it, an INVALID_ARGUMENT with its
# google.rpc.BadRequest, GetProduct, DeleteProduct, and NOT_FOUND after the delete. Every answer is checked (python3
# on grpcurl's JSON), not only exit codes; the first mismatch stops the script with exit 1.
#
# Usage: clients/grpcurl_walkthrough.sh TARGET IMAGE [SECOND_IMAGE]
#   e.g. clients/grpcurl_walkthrough.sh localhost:50051 mug.jpg
#   IMAGE is the product's packshot; SECOND_IMAGE another view of it (default: a crop of IMAGE, the box
#   0.25,0.15,0.85,0.80, made with Python's PIL: the repo's .venv, else python3).
#   WALKTHROUGH_ID   product id to index and delete again (default grpcurl-mug-1; it and ID-copy must not exist yet)
#   IMAGESEARCH_API_KEY  sent as "authorization: Bearer KEY" when set (a write key: the walkthrough indexes)
#   GRPCURL          grpcurl binary (default: the repo's .venv/bin/grpcurl, else grpcurl on PATH)
# The script prints the line "matched image: ID 1 detail" (the first hit of the search by SECOND_IMAGE and the
# image of it that matched) and the last line "top hits: image=ID text=ID" for callers that check relevance.
set -euo pipefail
if [ $# -lt 2 ] || [ $# -gt 3 ]; then
  echo "usage: $0 TARGET IMAGE [SECOND_IMAGE]" >&2
  exit 2
fi
target=$1
image=$(realpath -e "$2")
second=${3:+$(realpath -e "$3")}
cd "$(dirname "$0")/.."
id=${WALKTHROUGH_ID:-grpcurl-mug-1}
copy=$id-copy
GRPCURL=${GRPCURL:-$( [ -x .venv/bin/grpcurl ] && echo .venv/bin/grpcurl || echo grpcurl )}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
SERVICE=imagesearch.v1.ImageSearchService
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The second image (a crop of the packshot unless given), the region (BOX) and the popularity both walkthroughs use.
source clients/walkthrough_images.sh

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
for rpc in Search IndexProduct IndexProducts GetProduct DeleteProduct GetServiceInfo FindDuplicates; do
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
check "the runtime's reason, the CPU and the image and region limits reported" \
  'r["model"]["runtime_reason"] and "cpu" in r["model"] and r["limits"]["max_images_per_product"] >= 2 and r["limits"]["max_query_regions"] >= 1' \
  <"$work/info"

step "the ids $id and $copy are free (GetProduct: NOT_FOUND; else pick another with WALKTHROUGH_ID)"
run_expect_code 5 "$work/out" -d "{\"id\": \"$id\"}" "$target" $SERVICE/GetProduct
run_expect_code 5 "$work/out" -d "{\"id\": \"$copy\"}" "$target" $SERVICE/GetProduct

step "IndexProduct $id with two images: $(basename "$image") ($(wc -c <"$image") bytes) and $(basename "$second") ($(wc -c <"$second") bytes)"
# product.images describes the images; the bytes of images[i] follow an {"image_index": i} message.
{
  echo "{\"product\": {\"id\": \"$id\", \"name\": \"Red mug ZX-90210\", \"category\": \"mugs\", \"price\": 9.5, \"currency\": \"EUR\",
               \"attributes\": {\"colour\": \"red\"}, \"numeric_attributes\": {\"popularity\": $POPULARITY},
               \"images\": [{\"id\": \"packshot\", \"role\": \"packshot\"}, {\"id\": \"detail\", \"role\": \"detail\"}]}}"
  echo '{"image_index": 0}'
  image_chunks "$image"
  echo '{"image_index": 1}'
  image_chunks "$second"
} | g -d @ "$target" $SERVICE/IndexProduct | tee "$work/out"
check "created $id" 'r["created"] is True and r["product"]["id"] == a[0]' "$id" <"$work/out"
check "both images stored, each with the SHA-256 of its bytes" \
  '[i["id"] for i in r["product"]["images"]] == ["packshot", "detail"] and all(len(i["sha256"]) == 64 for i in r["product"]["images"])' \
  <"$work/out"

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
check "the packshot matched: image 0" 'r["hits"][0]["matched_image_index"] == 0' <"$work/image"

step "Search by the second image: the hit names the image that matched"
{
  echo '{"query": {"top_k": 5}}'
  image_chunks "$second"
} | g -d @ "$target" $SERVICE/Search | tee "$work/second"
check "$id first, matched by its image 1 (detail)" \
  'r["hits"][0]["product"]["id"] == a[0] and r["hits"][0]["matched_image_index"] == 1 and r["hits"][0]["matched_image_id"] == "detail"' \
  "$id" <"$work/second"

step "Search for a region of the packshot (the server crops the box before encoding it)"
{
  echo "{\"query\": {\"top_k\": 5, \"regions\": [$BOX]}}"
  image_chunks "$image"
} | g -d @ "$target" $SERVICE/Search | tee "$work/out"
check "$id first" 'r["hits"][0]["product"]["id"] == a[0] and r["region_results"] == []' "$id" <"$work/out"

step "Search with a ranking rule (popular first: 0.01 * ln(1 + popularity) added), scores explained"
{
  echo '{"query": {"top_k": 3, "explain_scores": true, "ranking": {"rules": [
    {"name": "popular", "field": "popularity", "transform": "TRANSFORM_LOG1P", "weight": 0.01}]}}}'
  image_chunks "$image"
} | g -d @ "$target" $SERVICE/Search | tee "$work/out"
check "$id first; its explanation: popular f = ln(1 + $POPULARITY), score = relevance + 0.01 f" \
  'r["hits"][0]["product"]["id"] == a[0] and [x["name"] for x in r["hits"][0]["explanation"]["rules"]] == ["popular"] and abs(r["hits"][0]["explanation"]["rules"][0]["value"] - __import__("math").log1p(float(a[1]))) < 1e-3 and abs(r["hits"][0]["score"] - r["hits"][0]["explanation"]["relevance"] - r["hits"][0]["explanation"]["rules"][0]["weighted"]) < 1e-4' \
  "$id" "$POPULARITY" <"$work/out"

step "FindDuplicates: index $copy, an exact re-upload of the packshot, then ask for $id's duplicates"
{
  echo "{\"product\": {\"id\": \"$copy\", \"name\": \"Red mug (a re-upload)\", \"category\": \"mugs\", \"price\": 9.5}}"
  image_chunks "$image"
} | g -d @ "$target" $SERVICE/IndexProduct | tee "$work/out"
check "created $copy" 'r["created"] is True' <"$work/out"
g -d "{\"product_id\": \"$id\"}" "$target" $SERVICE/FindDuplicates | tee "$work/out"
check "$copy listed under $id: exact, similarity ~1, packshot to packshot" \
  '[p["product_id"] for p in r["products"]] == [a[0]] and [(d["product_id"], d["exact"], d["image_index"], d["duplicate_image_index"]) for d in r["products"][0]["duplicates"]] == [(a[1], True, 0, 0)] and r["products"][0]["duplicates"][0]["similarity"] > 0.99' \
  "$id" "$copy" <"$work/out"

step "Search by the packshot collapsing near-duplicate listings: $id and $copy show once"
{
  echo '{"query": {"top_k": 5, "collapse_duplicates": true}}'
  image_chunks "$image"
} | g -d @ "$target" $SERVICE/Search | tee "$work/out"
check "one of them first, the other collapsed into it and not listed" \
  '{r["hits"][0]["product"]["id"], *r["hits"][0]["duplicate_product_ids"]} == set(a) and len({h["product"]["id"] for h in r["hits"]} & set(a)) == 1' \
  "$id" "$copy" <"$work/out"
g -d "{\"id\": \"$copy\"}" "$target" $SERVICE/DeleteProduct >/dev/null
echo "deleted $copy"

step "INVALID_ARGUMENT: top_k 1000 (the limit is $(python3 -c 'import json,sys; print(json.load(sys.stdin)["limits"]["max_top_k"])' <"$work/info"))"
run_expect_code 3 "$work/out" -d '{"query": {"text": "red mug", "top_k": 1000}}' "$target" $SERVICE/Search
check "google.rpc.BadRequest names query.top_k" \
  '"query.top_k" in [v["field"] for d in r["details"] if d["@type"].endswith("google.rpc.BadRequest") for v in d["field_violations"]]' \
  <"$work/out"

step "GetProduct $id"
g -d "{\"id\": \"$id\"}" "$target" $SERVICE/GetProduct | tee "$work/out"
check "stored as sent" \
  'r["product"]["id"] == a[0] and r["product"]["name"] == "Red mug ZX-90210" and r["product"]["category"] == "mugs" and r["product"]["price"] == 9.5 and r["product"]["attributes"] == {"colour": "red"} and r["product"]["numeric_attributes"] == {"popularity": 1520} and [i["role"] for i in r["product"]["images"]] == ["packshot", "detail"]' \
  "$id" <"$work/out"

step "DeleteProduct $id, then GetProduct: NOT_FOUND"
g -d "{\"id\": \"$id\"}" "$target" $SERVICE/DeleteProduct | tee "$work/out"
check "empty response" 'r == {}' <"$work/out"
run_expect_code 5 "$work/out" -d "{\"id\": \"$id\"}" "$target" $SERVICE/GetProduct

echo
echo "grpcurl walkthrough: all checks passed"
python3 -c 'import json, sys; h = json.load(open(sys.argv[1]))["hits"][0]; print("matched image: %s %s %s" % (h["product"]["id"], h["matched_image_index"], h["matched_image_id"]))' \
  "$work/second"
python3 -c 'import json, sys; print("top hits: image=%s text=%s" % tuple(json.load(open(p))["hits"][0]["product"]["id"] for p in sys.argv[1:]))' \
  "$work/image" "$work/text"
