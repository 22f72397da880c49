#!/usr/bin/env bash
# Installs the Python side of the test suite (tests/requirements.txt: tritonclient and its
# dependencies, every version pinned) into .test-venv, from PyPI only. Re-runs are no-ops
# while the requirements file is unchanged.
set -euo pipefail
VENV=${1:-.test-venv}
REQ=tests/requirements.txt
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
echo "test-venv: tritonclient $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("tritonclient"))') in $VENV"
