#!/usr/bin/env bash
# Contract discipline, run by CI: buf lint, buf format, buf breaking against the previous commit, and the
# committed generated Python code identical to a fresh generation.
set -euo pipefail
cd "$(dirname "$0")/.."
BUF=.venv/bin/buf

"$BUF" lint
"$BUF" format -d --exit-code
if git rev-parse --verify --quiet HEAD~1 >/dev/null && git cat-file -e HEAD~1:buf.yaml 2>/dev/null; then
  "$BUF" breaking --against '.git#ref=HEAD~1'
else
  echo "check_contracts: no previous commit with protos; buf breaking skipped"
fi

tools/gen_proto.sh >/dev/null 2>&1
if ! git diff --quiet -- src/imagesearch/v1 || [ -n "$(git ls-files --others --exclude-standard src/imagesearch/v1)" ]; then
  echo "check_contracts: generated code in src/imagesearch/v1 is out of date; run tools/gen_proto.sh and commit" >&2
  git status --short src/imagesearch/v1 >&2
  exit 1
fi
echo "check_contracts: ok"
