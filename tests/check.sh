#!/usr/bin/env bash
# The one check: format, lint, types, tests. Usage: bash tests/check.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -m ruff format --check proxy pdsim tests benchmarks
"$PY" -m ruff check proxy pdsim tests benchmarks
"$PY" -m mypy
"$PY" -m pytest "$@"
