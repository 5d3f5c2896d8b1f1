#!/usr/bin/env bash
# Contract discipline, run by CI: buf lint, buf format, buf breaking against the committed baseline of the released
# v1 contract (proto/baseline/imagesearch-v1.binpb), and the committed generated Python code identical to a fresh
# generation.
set -euo pipefail
cd "$(dirname "$0")/.."
BUF=.venv/bin/buf
BASELINE=proto/baseline/imagesearch-v1.binpb

"$BUF" lint
"$BUF" format -d --exit-code
# Against the released v1 contract, not the previous commit: against HEAD~1, a break is seen only while it is the
# newest commit (the next commit compares with the break and passes), and never when it sits in an earlier commit
# of a push. The baseline changes only on purpose, through tools/update_contract_baseline.sh.
"$BUF" breaking --against "$BASELINE"

tools/gen_proto.sh >/dev/null 2>&1
if ! git diff --quiet -- src/imagesearch/v1 || [ -n "$(git ls-files --others --exclude-standard src/imagesearch/v1)" ]; then
  echo "check_contracts: generated code in src/imagesearch/v1 is out of date; run tools/gen_proto.sh and commit" >&2
  git status --short src/imagesearch/v1 >&2
  exit 1
fi
echo "check_contracts: ok"
