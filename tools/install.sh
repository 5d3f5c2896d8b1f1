#!/usr/bin/env bash
# Set-up for development and CI, idempotent: installs redis-server (the tests start their own instances of it),
# creates .venv and installs the project with its dev tools and the tracing and int8 extras (their tests run in CI).
#
# Usage: bash tools/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null
  elif command -v sudo >/dev/null 2>&1; then
    sudo apt-get update -qq
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null
  else
    echo "install.sh: redis-server is needed by the tests; install it (e.g. apt-get install redis-server)" >&2
    exit 1
  fi
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch comes in through open-clip-torch; where a pip constraint file caps it (as on our build machines), pip
# takes the capped local build.
.venv/bin/python -m pip install --quiet -e '.[dev,tracing,int8]'
echo "install.sh: ready. Run the tests with: .venv/bin/python -m pytest"
