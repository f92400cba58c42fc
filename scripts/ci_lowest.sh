#!/usr/bin/env bash
# Lowest-versions job: install the LOWEST versions that pyproject.toml's ranges allow for the direct
# dependencies (uv's --resolution lowest-direct), check that they are the declared floors, then run the
# unit tests and notebook 01 there.
# Why: Colab and course hubs ship their own transformers/ipywidgets, and pip keeps them when they satisfy
# our ranges, so every version a range admits must actually work. The upper ends are what the main job
# (the README's test command) installs.
# torch is the one floor not exercised: older torch wheels on PyPI are multi-GB CUDA builds, so torch stays at
# the 2.13.0 CPU build (a local wheel in $TORCH_WHEELS when that folder exists). The README says so.
# Needs Python >= 3.11 (tomllib) and network access to PyPI (or a warm uv cache).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
# Isolate this job from whatever environment started it: IPython (the notebook's kernel) adds the site-packages
# of any virtualenv still named in VIRTUAL_ENV to sys.path ("Attempting to work in a virtualenv"), which put
# the newest peft and accelerate beside numpy 1.24 when a contributor ran this from an activated venv.
unset VIRTUAL_ENV PYTHONPATH PYTHONHOME CONDA_PREFIX
venv="${LOWEST_VENV:-/tmp/lora_widgets_lowest}"
wheels="${TORCH_WHEELS:-/opt/wheels}"

if python -m uv --version >/dev/null 2>&1; then uv=(python -m uv);
elif command -v uv >/dev/null 2>&1; then uv=(uv);
else python -m pip install -q "uv>=0.4" && uv=(python -m uv); fi

rm -rf "$venv"
"${uv[@]}" venv -q -p "$(command -v python)" "$venv"
py="$venv/bin/python"
find_links=()
[ -d "$wheels" ] && find_links=(--find-links "$wheels")
# ipython < 9 as a constraint (not a requirement, so it resolves to the newest 8.x): ipython 9 requires
# psutil >= 7, which would hide our psutil floor; ipykernel and nbval are test tools, at what resolves.
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "ipython<9" >"$constraints"
"${uv[@]}" pip install -q -p "$py" "${find_links[@]}" --resolution lowest-direct -c "$constraints" \
  "torch==2.13.0" -e . "pytest>=8" "pytest-timeout>=2.3" "pytest-xdist>=3.5" "nbval>=0.11" "ipykernel>=6.29" \
  "nbformat>=5.9"

# The versions installed, next to the floors pyproject.toml declares: every floor but torch's must be the
# version installed, or this job is not testing what the ranges promise.
"$py" - <<'EOF'
import re, sys, tomllib
from importlib.metadata import version
from packaging.version import Version

deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
bad = []
print(f"lowest: python {sys.version.split()[0]}")
for dep in deps:
    name, floor = re.match(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", dep).groups()
    installed = version(name)
    ok = name == "torch" or Version(installed) == Version(floor)
    print(f"lowest: {name:<13} {installed:<10} (declared {dep}){'' if ok else '  <-- NOT the floor'}")
    if not ok:
        bad.append(name)
if bad:
    sys.exit(f"installed versions are not the declared floors for {bad}: raise the floor or fix the resolution")
EOF

# The unit tests that need only the package's own dependencies (peft/trl interop skip without them; docs,
# lint and the browser tests run in the main job), and notebook 01 under nbval, in two pytest-xdist processes
# given whole files (as the main job: the root conftest.py gives each one OpenMP thread per core it has).
"$py" -m pytest -q -p no:cacheprovider -o addopts="" --timeout=900 -n 2 --dist loadfile \
  --nbval-lax --nbval-current-env --nbval-cell-timeout=600 \
  --ignore=tests/e2e --ignore=tests/test_docs.py --ignore=tests/test_quality.py \
  tests notebooks/01_lora_math.ipynb
echo "lowest-versions job passed in $((SECONDS - start)) s"
