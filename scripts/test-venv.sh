#!/usr/bin/env bash
# Installs a Python side of the test suite into a venv, from PyPI only, every version pinned:
#   scripts/test-venv.sh .test-venv    tests/requirements.txt          (tritonclient, validators)
#   scripts/test-venv.sh .checkov-venv tests/requirements-checkov.txt  (checkov)
# Re-runs are no-ops while the requirements file is unchanged.
set -euo pipefail
VENV=${1:-.test-venv}
REQ=${2:-tests/requirements.txt}
STAMP="$VENV/.requirements.sha256"
want=$(sha256sum "$REQ" | cut -d' ' -f1)
if [ -x "$VENV/bin/python" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
PY=$(command -v python3 || command -v python) || { echo "test-venv: python3 with venv is needed" >&2; exit 1; }
rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check --only-binary=:all: -r "$REQ"
echo "$want" > "$STAMP"
echo "test-venv: $(grep -cv '^#' "$REQ") packages from $REQ in $VENV"
