#!/usr/bin/env bash
# Idempotent set-up for the README's commands and CI: a venv in .venv with the pinned dev
# requirements, and torch_mla built into it (editable; the CMake build is incremental).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
stamp="$VENV/.requirements-dev.stamp"
if [ ! -f "$stamp" ] || ! cmp -s requirements-dev.txt "$stamp"; then
  "$VENV/bin/pip" install -q --disable-pip-version-check -r requirements-dev.txt
  cp requirements-dev.txt "$stamp"
fi
MAX_JOBS=${MAX_JOBS:-$(nproc)} "$VENV/bin/pip" install -q --disable-pip-version-check \
  --no-build-isolation --no-deps -e .
