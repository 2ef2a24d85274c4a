#!/usr/bin/env bash
# One entry point for a fresh machine: creates .venv (pinned torch/torchvision from pip, everything else from
# pyproject.toml and deploy/constraints.txt) on first use, then runs
#   deploy/lineinspect.sh test        ruff, mypy and the test suite
#   deploy/lineinspect.sh ARGS...     the lineinspect command, e.g. `run --frames 200`
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${LINEINSPECT_VENV:-.venv}"
PY="${PYTHON:-python3}"
stamp="$VENV/.installed-$(cat pyproject.toml deploy/constraints.txt | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "lineinspect: setting up $VENV (first run only)..." >&2
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  # torch first and alone, so pip takes the pinned build from the local wheel cache rather than resolving a newer one.
  "$VENV/bin/pip" install -q torch==2.14.1 torchvision==0.29.1
  "$VENV/bin/pip" install -q -c deploy/constraints.txt -e ".[dev]"
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi
if [ "${1:-}" = "test" ]; then
  shift
  "$VENV/bin/ruff" check .   # every Python file, deploy/ scripts included
  "$VENV/bin/ruff" format --check .   # one layout: a file ruff would reformat fails here
  "$VENV/bin/mypy" .
  exec "$VENV/bin/pytest" -q "$@"
fi
exec "$VENV/bin/lineinspect" "$@"
