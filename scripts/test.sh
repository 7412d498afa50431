#!/usr/bin/env bash
# Sets up the environment and runs the whole test suite (README's test command, and .ci/run's).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Debian's Chromium: the headless browser playwright drives in tests/test_serve.py and
# scripts/page_screenshot.py (playwright's own browser download is not reachable here; the
# main job does not need a browser, so setup.sh does not install it).
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "test: installing Debian's chromium (headless browser for the page test)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
.venv/bin/ruff check .
.venv/bin/python -m mypy  # common/ and client/ (pyproject.toml [tool.mypy])
# two workers, each test file whole on one (module fixtures are built once)
.venv/bin/python -m pytest -q -n 2 --dist loadfile --durations=30 "$@"
