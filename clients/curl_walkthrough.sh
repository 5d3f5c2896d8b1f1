#!/usr/bin/env bash
# The README's curl walkthrough of the HTTP/JSON port, run and checked against a live server: /healthz, the
# health check and GetServiceInfo as JSON POSTs, IndexProductInline of a product with two images (base64-encoded
# in the JSON body) and a numeric attribute, SearchInline by text, by each image (the hit names the image that
# matched), by a region of the image and with a ranking rule and its score explanation, FindDuplicates of an exact
# re-upload and a search collapsing it, an invalid_argument (HTTP 400) with its google.rpc.BadRequest, GetProduct,
# ListProducts, DeleteProduct, not_found (HTTP 404) after the delete, and the OpenAPI document and /docs page.
# Every answer is checked (status code and python3 on the JSON), not only curl's exit code; the first mismatch
# stops the script with exit 1.
#
# Usage: clients/curl_walkthrough.sh BASE_URL IMAGE [SECOND_IMAGE]
#   e.g. clients/curl_walkthrough.sh http://localhost:8080 mug.jpg
#   IMAGE is the product's packshot; SECOND_IMAGE another view of it (default: a crop of IMAGE, the box
#   0.25,0.15,0.85,0.80, made with Python's PIL: $PYTHON, else the repo's .venv, else python3).
#   WALKTHROUGH_ID       product id to index and delete again (default curl-mug-1; it and ID-copy must not exist yet)
#   IMAGESEARCH_API_KEY  sent as "Authorization: Bearer KEY" when set (a write key: the walkthrough indexes)
# The script prints the line "matched image: ID 1 detail" (the first hit of the search by SECOND_IMAGE and the
# image of it that matched) and the last line "top hits: image=ID text=ID" for callers that check relevance.
set -euo pipefail
if [ $# -lt 2 ] || [ $# -gt 3 ]; then
  echo "usage: $0 BASE_URL IMAGE [SECOND_IMAGE]" >&2
  exit 2
fi
base=${1%/}
image=$(realpath -e "$2")
second=${3:+$(realpath -e "$3")}
id=${WALKTHROUGH_ID:-curl-mug-1}
copy=$id-copy
repo_python=$(dirname "$0")/../.venv/bin/python
PYTHON=${PYTHON:-$( [ -x "$repo_python" ] && echo "$repo_python" || echo python3 )}
SERVICE=imagesearch.v1.ImageSearchService
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The second image (a crop of the packshot unless given), the region (BOX) and the popularity both walkthroughs use.
source "$(dirname "$0")/walkthrough_images.sh"

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
check "the image and region limits reported" \
  'r["limits"]["max_images_per_product"] >= 2 and r["limits"]["max_query_regions"] >= 1' <"$work/info"

step "the ids $id and $copy are free (GetProduct: HTTP 404, not_found; else pick another with WALKTHROUGH_ID)"
post 404 "$work/out" $SERVICE/GetProduct "{\"id\": \"$id\"}"
check "not_found" 'r["code"] == "not_found"' <"$work/out"
post 404 "$work/out" $SERVICE/GetProduct "{\"id\": \"$copy\"}"

step "IndexProductInline $id with two images, $(basename "$image") and $(basename "$second") (base64 in the JSON)"
# product.images describes the images; images[i] (base64) are the bytes of product.images[i].
printf '{"product": {"id": "%s", "name": "Red mug", "category": "mugs", "price": 9.5, "currency": "EUR", "attributes": {"colour": "red"}, "numeric_attributes": {"popularity": %s}, "images": [{"id": "packshot", "role": "packshot"}, {"id": "detail", "role": "detail"}]}, "images": ["%s", "%s"]}' \
  "$id" "$POPULARITY" "$(base64 -w0 "$image")" "$(base64 -w0 "$second")" >"$work/index.json"
post 200 "$work/out" $SERVICE/IndexProductInline "@$work/index.json"
check "created $id" 'r["created"] is True and r["product"]["id"] == a[0]' "$id" <"$work/out"
check "both images stored, each with the SHA-256 of its bytes" \
  '[i["id"] for i in r["product"]["images"]] == ["packshot", "detail"] and all(len(i["sha256"]) == 64 for i in r["product"]["images"])' \
  <"$work/out"

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
check "the packshot matched: image 0" 'r["hits"][0].get("matched_image_index") == 0' <"$work/image"

step "SearchInline by the second image: the hit names the image that matched"
printf '{"query": {"top_k": 5}, "image": "%s"}' "$(base64 -w0 "$second")" >"$work/search.json"
post 200 "$work/second" $SERVICE/SearchInline "@$work/search.json"
check "$id first, matched by its image 1 (detail)" \
  'r["hits"][0]["product"]["id"] == a[0] and r["hits"][0].get("matched_image_index") == 1 and r["hits"][0]["matched_image_id"] == "detail"' \
  "$id" <"$work/second"

step "SearchInline for a region of the packshot (the server crops the box before encoding it)"
printf '{"query": {"top_k": 5, "regions": [%s]}, "image": "%s"}' "$BOX" "$(base64 -w0 "$image")" >"$work/search.json"
post 200 "$work/out" $SERVICE/SearchInline "@$work/search.json"
check "$id first" 'r["hits"][0]["product"]["id"] == a[0] and r["region_results"] == []' "$id" <"$work/out"

step "SearchInline with a ranking rule (popular first: 0.01 * ln(1 + popularity) added), scores explained"
printf '{"query": {"top_k": 3, "explain_scores": true, "ranking": {"rules": [{"name": "popular", "field": "popularity", "transform": "TRANSFORM_LOG1P", "weight": 0.01}]}}, "image": "%s"}' \
  "$(base64 -w0 "$image")" >"$work/search.json"
post 200 "$work/out" $SERVICE/SearchInline "@$work/search.json"
check "$id first; its explanation: popular f = ln(1 + $POPULARITY), score = relevance + 0.01 f" \
  'r["hits"][0]["product"]["id"] == a[0] and [x["name"] for x in r["hits"][0]["explanation"]["rules"]] == ["popular"] and abs(r["hits"][0]["explanation"]["rules"][0]["value"] - __import__("math").log1p(float(a[1]))) < 1e-3 and abs(r["hits"][0]["score"] - r["hits"][0]["explanation"]["relevance"] - r["hits"][0]["explanation"]["rules"][0]["weighted"]) < 1e-4' \
  "$id" "$POPULARITY" <"$work/out"

step "FindDuplicates: index $copy, an exact re-upload of the packshot, then ask for $id's duplicates"
printf '{"product": {"id": "%s", "name": "Red mug (a re-upload)", "category": "mugs", "price": 9.5}, "image": "%s"}' \
  "$copy" "$(base64 -w0 "$image")" >"$work/index.json"
post 200 "$work/out" $SERVICE/IndexProductInline "@$work/index.json"
check "created $copy" 'r["created"] is True' <"$work/out"
post 200 "$work/out" $SERVICE/FindDuplicates "{\"product_id\": \"$id\"}"
check "$copy listed under $id: exact, similarity ~1, packshot to packshot" \
  '[p["product_id"] for p in r["products"]] == [a[0]] and [(d["product_id"], d["exact"], d["image_index"], d["duplicate_image_index"]) for d in r["products"][0]["duplicates"]] == [(a[1], True, 0, 0)] and r["products"][0]["duplicates"][0]["similarity"] > 0.99' \
  "$id" "$copy" <"$work/out"

step "SearchInline by the packshot collapsing near-duplicate listings: $id and $copy show once"
printf '{"query": {"top_k": 5, "collapse_duplicates": true}, "image": "%s"}' "$(base64 -w0 "$image")" >"$work/search.json"
post 200 "$work/out" $SERVICE/SearchInline "@$work/search.json"
check "one of them first, the other collapsed into it and not listed" \
  '{r["hits"][0]["product"]["id"], *r["hits"][0]["duplicate_product_ids"]} == set(a) and len({h["product"]["id"] for h in r["hits"]} & set(a)) == 1' \
  "$id" "$copy" <"$work/out"
post 200 "$work/out" $SERVICE/DeleteProduct "{\"id\": \"$copy\"}"

step "invalid_argument (HTTP 400): top_k 1000 (the limit is $(python3 -c 'import json,sys; print(json.load(sys.stdin)["limits"]["max_top_k"])' <"$work/info"))"
post 400 "$work/out" $SERVICE/SearchInline '{"query": {"text": "red mug", "top_k": 1000}}'
check "google.rpc.BadRequest names query.top_k" \
  'r["code"] == "invalid_argument" and "query.top_k" in [v["field"] for d in r["details"] if d["type"] == "google.rpc.BadRequest" for v in d["debug"]["field_violations"]]' \
  <"$work/out"

step "GetProduct $id"
post 200 "$work/out" $SERVICE/GetProduct "{\"id\": \"$id\"}"
check "stored as sent" \
  'r["product"]["id"] == a[0] and r["product"]["name"] == "Red mug" and r["product"]["category"] == "mugs" and r["product"]["price"] == 9.5 and r["product"]["attributes"] == {"colour": "red"} and r["product"]["numeric_attributes"] == {"popularity": 1520} and [i["role"] for i in r["product"]["images"]] == ["packshot", "detail"]' \
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
python3 -c 'import json, sys; h = json.load(open(sys.argv[1]))["hits"][0]; print("matched image: %s %s %s" % (h["product"]["id"], h["matched_image_index"], h["matched_image_id"]))' \
  "$work/second"
python3 -c 'import json, sys; print("top hits: image=%s text=%s" % tuple(json.load(open(p))["hits"][0]["product"]["id"] for p in sys.argv[1:]))' \
  "$work/image" "$work/text"
