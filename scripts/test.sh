#!/usr/bin/env bash
# Sets up the environment and runs the whole test suite (README's test command, and .ci/run's).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
