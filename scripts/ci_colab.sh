#!/usr/bin/env bash
# Colab-stack job: Colab's own widget versions in the classic Notebook 6, driven through headless Chromium.
# Why: Colab is one of the three places this package runs, and its runtime ships ipywidgets 7 and bqplot 0.12
# (its published pip freeze, 2026-08), which the main job (ipywidgets 8, JupyterLab) never runs in a browser.
# Colab's front end cannot run here; the classic Notebook 6 speaks the same ipywidgets-7 protocol and loads the
# same widget JavaScript, so it stands in for it (NOTES.md).
#
# 1. a fresh venv with what Colab has preinstalled: exactly its widget versions, IPython 7.34 (Colab's; it
#    still installs on Python 3.11), transformers 5.15 and peft 0.20, torch (the local 2.13.0 CPU build:
#    uv does not see that file, so this job uses pip), and the classic `notebook<7`;
# 2. this package installed as the README tells Colab users (`pip install <the repository>`, no torch step),
#    then a check that this changed none of the preinstalled versions and brought no bitsandbytes;
# 3. the tests marked `colab` (tests/e2e/test_colab_e2e.py: renders, Train advances the charts, a cell runs
#    while it trains, Stop ends the run, every axis reads right, an attached HF Trainer works) and the axes'
#    synced state (tests/test_chart_axes.py).
# Needs Python >= 3.11, Chromium (.ci/run installs it) and PyPI (or a warm pip cache).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
venv="${COLAB_VENV:-/tmp/lora_widgets_colab}"
wheels="${TORCH_WHEELS:-/opt/wheels}"
# A venv of our own: IPython started here while VIRTUAL_ENV names another venv adds that one's site-packages.
unset VIRTUAL_ENV

rm -rf "$venv"
python -m venv "$venv"
py="$venv/bin/python"
find_links=()
[ -d "$wheels" ] && find_links=(--find-links "$wheels")
pip_install() {  # quiet, without pip's notices about index folders this machine may not have
  "$py" -m pip install -q --disable-pip-version-check "${find_links[@]}" "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }
}

# 1. Colab's preinstalled packages (the ones this package touches).
colab=(
  "torch==2.13.0" "ipywidgets==7.7.1" "widgetsnbextension==3.6.10" "anywidget==0.9.21" "bqplot==0.12.47"
  "ipykernel==6.17.1" "traitlets==5.7.1" "ipython==7.34.*" "transformers==5.15.*" "peft==0.20.*" "notebook<7"
)
pip_install "${colab[@]}"
before="$("$py" -m pip freeze --all | sort)"

# 2. The README's Colab line: the package alone; pip must keep every version above.
pip_install .
after="$("$py" -m pip freeze --all | sort)"
changed="$(comm -23 <(echo "$before") <(echo "$after") || true)"
if [ -n "$changed" ]; then
  echo "installing the package changed Colab's preinstalled packages:" >&2
  echo "$changed" >&2
  exit 1
fi
if "$py" -m pip show bitsandbytes >/dev/null 2>&1; then
  echo "installing the package brought bitsandbytes (it belongs in the qlora extra only)" >&2
  exit 1
fi
# test tools, constrained to what is installed so they cannot move the stack either
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "$after" | grep -v "^-e \|@ file" >"$constraints"
pip_install -c "$constraints" "pytest>=8" "pytest-timeout>=2.3" "playwright>=1.45" "nbformat>=5.9"
"$py" - <<'EOF'
from importlib.metadata import version
names = ["ipywidgets", "widgetsnbextension", "anywidget", "bqplot", "ipykernel", "traitlets", "ipython",
         "notebook", "torch", "transformers", "peft", "lora_widgets"]
print("colab stack: " + ", ".join(f"{n} {version(n)}" for n in names))
EOF

# 3. The browser checks, against this checkout (the kernel imports it through PYTHONPATH).
LORA_WIDGETS_COLAB_JOB=1 PYTHONPATH="$PWD" "$py" -m pytest -q -p no:cacheprovider -o addopts="" -ra \
  --timeout=900 tests/test_chart_axes.py tests/e2e/test_colab_e2e.py
echo "colab-stack job passed in $((SECONDS - start)) s"
