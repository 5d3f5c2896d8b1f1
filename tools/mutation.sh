#!/usr/bin/env bash
# Mutation testing (mutmut) of the modules that guard users: the request rules (search/validation.py), page
# tokens (search/paging.py), cache keys and values (search/cache.py), error mapping and deadlines (api/status.py),
# URL fetching (search/urlfetch.py) and API keys (api/auth.py). Each mutant (a changed comparison, constant,
# argument, string...) runs against the fast tests that cover it, fastest first; a mutant no test notices
# "survives". Which tests run is [tool.mutmut] in pyproject.toml.
#
# Usage: bash tools/mutation.sh [--fresh] [MODULE...]
#   MODULE: validation paging cache status urlfetch auth (default: all six)
#   --fresh: forget earlier results (kept in mutants/, reused for functions that did not change)
# Environment: MUTATION_CHILDREN (parallel mutants, default 2).
# Prints the score per module and the surviving mutants; `.venv/bin/mutmut show NAME` shows one.
# Takes tens of minutes on 2 cores, so it is not part of the test command CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--fresh" ]; then
  rm -rf mutants
  shift
fi
declare -A module_of=(
  [validation]=imagesearch.search.validation
  [paging]=imagesearch.search.paging
  [cache]=imagesearch.search.cache
  [status]=imagesearch.api.status
  [urlfetch]=imagesearch.search.urlfetch
  [auth]=imagesearch.api.auth
)
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(validation paging cache status urlfetch auth)
patterns=()
for name in "${names[@]}"; do
  [ -n "${module_of[$name]:-}" ] || { echo "mutation.sh: unknown module $name" >&2; exit 2; }
  patterns+=("${module_of[$name]}.*")
done

.venv/bin/mutmut run --max-children "${MUTATION_CHILDREN:-2}" "${patterns[@]}" >/dev/null
.venv/bin/mutmut results --all true | .venv/bin/python -c '
import collections, sys
modules = sys.argv[1:]
counts = collections.defaultdict(collections.Counter)
survivors = []
for line in sys.stdin:
    name, _, status = line.strip().rpartition(": ")
    module = next((m for m in modules if name.startswith(m + ".")), None)
    if module is None:
        continue
    counts[module][status] += 1
    if status not in ("killed", "timeout"):
        survivors.append(f"  {status:>12}  {name}")
print("%-32s %7s %7s %7s %6s" % ("module", "mutants", "caught", "other", "score"))
for module in modules:
    c = counts[module]
    total, caught = sum(c.values()), c["killed"] + c["timeout"]
    print("%-32s %7d %7d %7d %5.1f%%" % (module, total, caught, total - caught, 100 * caught / max(total, 1)))
print("not killed (killed and timeout count as caught):", *survivors, sep="\n")
' "${patterns[@]%.\*}"
