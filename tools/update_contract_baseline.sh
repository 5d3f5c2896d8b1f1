#!/usr/bin/env bash
# Rewrites the committed baseline of the released imagesearch.v1 contract (proto/baseline/imagesearch-v1.binpb),
# which tools/check_contracts.sh holds every change against with `buf breaking`. Run it only on purpose: after an
# additive change (a new field, message, rpc) is released, so that later commits cannot take the addition back.
# It refuses to record a contract that breaks the current baseline: a breaking change needs a new package (v2).
#
# Usage: tools/update_contract_baseline.sh   then commit proto/baseline/imagesearch-v1.binpb with the change
set -euo pipefail
cd "$(dirname "$0")/.."
BUF=.venv/bin/buf
BASELINE=proto/baseline/imagesearch-v1.binpb

"$BUF" lint
if [ -f "$BASELINE" ]; then
  "$BUF" breaking --against "$BASELINE"
fi
mkdir -p "$(dirname "$BASELINE")"
# Without source info (comments, line numbers): the image is about the wire contract, and rewording a comment
# should not change it.
"$BUF" build --exclude-source-info -o "$BASELINE"
echo "update_contract_baseline: wrote $BASELINE; review and commit it"
