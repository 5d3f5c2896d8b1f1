#!/usr/bin/env bash
# The README's curl walkthrough of the HTTP/JSON port, run and checked against a live server: /healthz, the
# health check and GetServiceInfo as JSON POSTs, IndexProductInline (the image base64-encoded in the JSON body),
# SearchInline by text and by image, an invalid_argument (HTTP 400) with its google.rpc.BadRequest, GetProduct,
# ListProducts, DeleteProduct, not_found (HTTP 404) after the delete, and the OpenAPI document and /docs page.
# Every answer is checked (status code and python3 on the JSON), not only curl's exit code; the first mismatch
# stops the script with exit 1.
#
# Usage: clients/curl_walkthrough.sh BASE_URL IMAGE     e.g. clients/curl_walkthrough.sh http://localhost:8080 mug.jpg
#   WALKTHROUGH_ID       product id to index and delete again (default curl-mug-1; it must not exist yet)
#   IMAGESEARCH_API_KEY  sent as "Authorization: Bearer KEY" when set (a write key: the walkthrough indexes)
# The script prints the last line "top hits: image=ID text=ID" for callers that check relevance.
set -euo pipefail
if [ $# -ne 2 ]; then
  echo "usage: $0 BASE_URL IMAGE" >&2
  exit 2
fi
base=${1%/}
image=$(realpath -e "$2")
id=${WALKTHROUGH_ID:-curl-mug-1}
SERVICE=imagesearch.v1.ImageSearchService
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

auth=()
if [ -n "${IMAGESEARCH_API_KEY:-}" ]; then
  auth=(-H "Authorization: Bearer $IMAGESEARCH_API_KEY")
fi

step() { printf '\n--- %s\n' "$*"; }

# post EXPECTED_STATUS OUTFILE PATH JSON_OR_@FILE: a Connect unary call, a plain POST of JSON; the HTTP status must
# be EXPECTED_STATUS, the response body lands in OUTFILE.
post() {
  local want=$1 out=$2 path=$3 body=$4 status
  status=$(curl -sS --max-time 30 "${auth[@]}" -H 'Content-Type: application/json' --data-binary "$body" \
    -o "$out" -w '%{http_code}' "$base/$path")
  cat "$out"
  echo
  if [ "$status" != "$want" ]; then
    echo "MISMATCH: POST /$path: HTTP $status, expected $want" >&2
    exit 1
  fi
}

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

step "GET /healthz (for HTTP probes)"
curl -sS --max-time 10 -f "$base/healthz" | tee "$work/out"
echo
check "SERVING" 'r["status"] == "SERVING"' <"$work/out"

step "health check as a Connect call: POST /grpc.health.v1.Health/Check"
post 200 "$work/out" grpc.health.v1.Health/Check "{\"service\": \"$SERVICE\"}"
check "$SERVICE SERVING" 'r["status"] == "SERVING"' <"$work/out"

step "GetServiceInfo"
post 200 "$work/info" $SERVICE/GetServiceInfo '{}'
check "model, store and limits reported" \
  'r["model"]["embedding_dimension"] > 0 and r["store"]["backend"] in ("embedded", "qdrant") and r["limits"]["max_top_k"] >= 5' \
  <"$work/info"

step "the id $id is free (GetProduct: HTTP 404, not_found; else pick another with WALKTHROUGH_ID)"
post 404 "$work/out" $SERVICE/GetProduct "{\"id\": \"$id\"}"
check "not_found" 'r["code"] == "not_found"' <"$work/out"

step "IndexProductInline $id with $(basename "$image") ($(wc -c <"$image") bytes, base64 in the JSON)"
printf '{"product": {"id": "%s", "name": "Red mug", "category": "mugs", "price": 9.5, "currency": "EUR", "attributes": {"colour": "red"}}, "image": "%s"}' \
  "$id" "$(base64 -w0 "$image")" >"$work/index.json"
post 200 "$work/out" $SERVICE/IndexProductInline "@$work/index.json"
check "created $id" 'r["created"] is True and r["product"]["id"] == a[0]' "$id" <"$work/out"

step "SearchInline by text"
post 200 "$work/text" $SERVICE/SearchInline '{"query": {"text": "red mug", "top_k": 5}}'
check "text query, 1 to 5 hits, best first" \
  'r["query_kind"] == "QUERY_KIND_TEXT" and 1 <= len(r["hits"]) <= 5 and [h["score"] for h in r["hits"]] == sorted((h["score"] for h in r["hits"]), reverse=True)' \
  <"$work/text"

step "SearchInline by image (inline), filtered to category mugs and price <= 20"
printf '{"query": {"top_k": 5, "filter": {"categories": ["mugs"], "price_max": 20}}, "image": "%s"}' \
  "$(base64 -w0 "$image")" >"$work/search.json"
post 200 "$work/image" $SERVICE/SearchInline "@$work/search.json"
check "image query, $id first with score ~1" \
  'r["query_kind"] == "QUERY_KIND_IMAGE" and r["hits"][0]["product"]["id"] == a[0] and r["hits"][0]["score"] > 0.99' \
  "$id" <"$work/image"
check "every hit passes the filter" \
  'all(h["product"]["category"] == "mugs" and h["product"]["price"] <= 20 for h in r["hits"])' <"$work/image"

step "invalid_argument (HTTP 400): top_k 1000 (the limit is $(python3 -c 'import json,sys; print(json.load(sys.stdin)["limits"]["max_top_k"])' <"$work/info"))"
post 400 "$work/out" $SERVICE/SearchInline '{"query": {"text": "red mug", "top_k": 1000}}'
check "google.rpc.BadRequest names query.top_k" \
  'r["code"] == "invalid_argument" and "query.top_k" in [v["field"] for d in r["details"] if d["type"] == "google.rpc.BadRequest" for v in d["debug"]["field_violations"]]' \
  <"$work/out"

step "GetProduct $id"
post 200 "$work/out" $SERVICE/GetProduct "{\"id\": \"$id\"}"
check "stored as sent" \
  'r["product"]["id"] == a[0] and r["product"]["name"] == "Red mug" and r["product"]["category"] == "mugs" and r["product"]["price"] == 9.5 and r["product"]["attributes"] == {"colour": "red"}' \
  "$id" <"$work/out"

step "ListProducts in category mugs"
post 200 "$work/out" $SERVICE/ListProducts '{"filter": {"categories": ["mugs"]}, "page_size": 1000}'
check "$id listed" 'a[0] in [p["id"] for p in r["products"]]' "$id" <"$work/out"

step "DeleteProduct $id, then GetProduct: HTTP 404"
post 200 "$work/out" $SERVICE/DeleteProduct "{\"id\": \"$id\"}"
check "empty response" 'r == {}' <"$work/out"
post 404 "$work/out" $SERVICE/GetProduct "{\"id\": \"$id\"}"

step "the OpenAPI document and the /docs page"
curl -sS --max-time 10 -f "${auth[@]}" "$base/openapi.json" -o "$work/openapi.json"
check "SearchInline documented" '"/imagesearch.v1.ImageSearchService/SearchInline" in r["paths"]' <"$work/openapi.json"
curl -sS --max-time 10 -f -L "${auth[@]}" "$base/docs" -o "$work/docs.html"
grep -q "swagger-ui" "$work/docs.html" || { echo "MISMATCH: /docs is not the Swagger UI page" >&2; exit 1; }
echo "ok: /docs serves Swagger UI"

echo
echo "curl walkthrough: all checks passed"
python3 -c 'import json, sys; print("top hits: image=%s text=%s" % tuple(json.load(open(p))["hits"][0]["product"]["id"] for p in sys.argv[1:]))' \
  "$work/image" "$work/text"
