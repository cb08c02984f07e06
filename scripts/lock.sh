#!/usr/bin/env bash
# Regenerate requirements-lock.txt from pyproject.toml (with the dev extra) using uv's resolver.
# torch is resolved as the local CPU wheel (so no CUDA packages enter the lock) but not written to the lock:
# it is installed first, from TORCH_SPEC in the Makefile, and every range in the lock admits it.
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-.venv/bin/uv}
TORCH_PIN=${TORCH_PIN:-torch==2.13.0+cpu}
override=$(mktemp)
trap 'rm -f "$override"' EXIT
echo "$TORCH_PIN" >"$override"
links=()
[ -d /opt/wheels ] && links=(--find-links /opt/wheels)
"$UV" pip compile pyproject.toml --extra dev "${links[@]}" --override "$override" \
  --python-version 3.11 --python-platform x86_64-unknown-linux-gnu \
  --no-emit-package torch --no-emit-find-links --custom-compile-command "make lock" \
  -o requirements-lock.txt "$@"
