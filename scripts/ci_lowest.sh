#!/usr/bin/env bash
# Lowest-versions job: install the LOWEST versions that pyproject.toml's ranges allow for the direct
# dependencies (uv's --resolution lowest-direct), then run the unit tests and one notebook there.
# Why: Colab and course hubs ship their own transformers/ipywidgets, and pip keeps them when they satisfy
# our ranges, so every version a range admits must actually work.
# torch stays at the local 2.13.0 CPU build: older torch wheels on PyPI are multi-GB CUDA builds that this
# job cannot download in reasonable time (the README says so; torch's floor is the one range not tested here).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${LOWEST_VENV:-/tmp/lora_widgets_lowest}"
python -m pip install -q "uv>=0.4"
rm -rf "$venv"
python -m uv venv -q -p "$(command -v python)" "$venv"
py="$venv/bin/python"
# The package at its lowest direct dependencies; the test tools (not part of the ranges) at what resolves.
python -m uv pip install -q -p "$py" --find-links /opt/wheels --resolution lowest-direct \
  "torch==2.13.0" -e . "pytest>=8" "pytest-timeout>=2.3" "nbval>=0.11" "ipykernel>=6.29" "nbformat>=5.9"
python -m uv pip list -p "$py" 2>/dev/null \
  | grep -iE '^(torch|transformers|safetensors|tokenizers|numpy|anywidget|ipywidgets|bqplot|psutil) ' \
  | sed 's/^/lowest: /'
# Unit tests that need only the package's own dependencies (peft/trl interop, docs, lint and the browser
# run in the main job), plus notebook 01.
"$py" -m pytest -q -p no:cacheprovider -o addopts="" --timeout=900 \
  --ignore=tests/e2e --ignore=tests/test_docs.py --ignore=tests/test_quality.py \
  tests
"$py" -m pytest -q -p no:cacheprovider -o addopts="" --timeout=900 \
  --nbval-lax --nbval-current-env --nbval-cell-timeout=600 notebooks/01_lora_math.ipynb
