#!/usr/bin/env bash
# Assemble a Hugging Face Space folder: app.py + the uadlab package + this folder's README and requirements.
# Usage: spaces/build.sh OUT_DIR   then   cd OUT_DIR && git init && ... push to the Space's git remote
#        (or: hf upload <user>/<space> OUT_DIR . --repo-type space)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
out="${1:?usage: spaces/build.sh OUT_DIR}"
mkdir -p "$out"
cp "$root/app.py" "$here/README.md" "$here/requirements.txt" "$out/"
rm -rf "$out/uadlab"
cp -r "$root/uadlab" "$out/uadlab"
find "$out/uadlab" -name "__pycache__" -type d -prune -exec rm -rf {} +
echo "Space folder ready in $out"
