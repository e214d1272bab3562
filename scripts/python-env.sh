#!/usr/bin/env bash
# Makes the project's Python environment, target/venv, with the tools the
# tests drive (scripts/requirements-test.txt). Stock Debian refuses pip
# installs into the system Python (PEP 668), so everything goes into the
# venv; python3-venv comes from apt when it is missing. A second run with
# the same requirements does nothing.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=$root/target/venv
requirements=$root/scripts/requirements-test.txt
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
