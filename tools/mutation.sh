#!/usr/bin/env bash
# Mutation testing (mutmut) of the modules that guard users: the request rules (search/validation/), page
# tokens (search/paging.py), cache keys and values (search/cache.py), error mapping and deadlines (api/status.py),
# URL fetching (search/urlfetch.py) and API keys (api/auth.py). Each mutant (a changed comparison, constant,
# argument, string...) runs against the tests of its group that cover it, fastest first; a mutant that no test
# notices "survives".
#
# Groups, each run in its own scratch copy (.mutation/GROUP: src, tests and pyproject.toml, whose [tool.mutmut]
# gives the common settings; this script sets what to mutate and which tests run):
#   guards    validation, paging, cache, status  against their unit tests (tests/test_*_unit.py, a few seconds)
#   urlfetch  search/urlfetch.py                 against tests/test_urlfetch.py
#   auth      api/auth.py                        against tests/test_auth_unit.py and tests/test_security.py
#
# Usage: bash tools/mutation.sh [GROUP...]     (default: all three)
# Environment: MUTATION_CHILDREN (mutants run in parallel, default 2).
# Prints the score per module and every mutant not caught; `cd .mutation/GROUP && ../../.venv/bin/mutmut show NAME`
# shows one. About 10 minutes for guards on 2 cores, more for the others: not part of the test command CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

declare -A modules_of=(
  [guards]="search/validation search/paging.py search/cache.py api/status.py"
  [urlfetch]="search/urlfetch.py"
  [auth]="api/auth.py"
)
declare -A tests_of=(
  [guards]="tests/test_validation_unit.py tests/test_paging_unit.py tests/test_cache_keys_unit.py tests/test_status_unit.py"
  [urlfetch]="tests/test_urlfetch.py"
  [auth]="tests/test_auth_unit.py tests/test_security.py"
)
groups=("$@")
[ ${#groups[@]} -gt 0 ] || groups=(guards urlfetch auth)

for group in "${groups[@]}"; do
  [ -n "${modules_of[$group]:-}" ] || { echo "mutation.sh: unknown group $group" >&2; exit 2; }
  scratch="$root/.mutation/$group"
  # A fresh copy of the code and tests; earlier results (scratch/mutants) are kept and reused for functions that
  # did not change.
  mkdir -p "$scratch"
  rm -rf "$scratch/src" "$scratch/tests"
  cp -r "$root/src" "$root/tests" "$scratch/"
  rm -rf "$scratch"/src/*.egg-info
  ln -sfn "$root/.venv" "$scratch/.venv"
  .venv/bin/python - "$scratch/pyproject.toml" "${modules_of[$group]}" "${tests_of[$group]}" <<'EOF'
import re, sys
target, modules, tests = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
text = open("pyproject.toml").read()
def toml_list(values):
    return "[\n" + "".join(f'    "{v}",\n' for v in values) + "]"
for key, values in (("only_mutate", [f"src/imagesearch/{m}" for m in modules]),
                    ("pytest_add_cli_args_test_selection", tests)):
    text, count = re.subn(rf"^{key} = \[.*?^\]", f"{key} = {toml_list(values)}", text, flags=re.M | re.S)
    assert count == 1, key
open(target, "w").write(text)
EOF
  echo "== $group: mutating ${modules_of[$group]}"
  (cd "$scratch" && .venv/bin/mutmut run --max-children "${MUTATION_CHILDREN:-2}" >mutmut.log 2>&1) ||
    { echo "mutation.sh: mutmut failed, see $scratch/mutmut.log" >&2; exit 1; }
  (cd "$scratch" && .venv/bin/mutmut results --all true) | .venv/bin/python -c '
import collections, sys
modules = ["imagesearch." + m.removesuffix(".py").replace("/", ".") for m in sys.argv[1:]]
counts = collections.defaultdict(collections.Counter)
others = []
for line in sys.stdin:
    name, _, status = line.strip().rpartition(": ")
    module = next((m for m in modules if name.startswith(m + ".")), None)
    if module is None:
        continue
    counts[module][status] += 1
    if status not in ("killed", "timeout"):
        others.append("  %-12s %s" % (status, name))
print("%-32s %7s %7s %7s %6s" % ("module", "mutants", "caught", "other", "score"))
for module in modules:
    c = counts[module]
    total, caught = sum(c.values()), c["killed"] + c["timeout"]
    print("%-32s %7d %7d %7d %5.1f%%" % (module, total, caught, total - caught, 100 * caught / max(total, 1)))
print("not caught (killed and timeout count as caught):", *others, sep="\n")
' ${modules_of[$group]}
done
