"""scripts/ci_colab.sh installs exactly the widget versions the Colab browser tests expect, and runs them.

The job itself takes minutes (a venv, a browser); here its script is checked for what would make it test the
wrong thing: versions that drift from ``tests/e2e/test_colab_e2e.py``'s, a torch step before the package (the
README tells Colab users there is none), or the browser tests left out.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.e2e.test_colab_e2e import COLAB_WIDGETS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "ci_colab.sh"


def _pins() -> dict[str, str]:
    block = re.search(r"colab=\((.+?)\n\)", SCRIPT.read_text(), re.S)
    assert block, "ci_colab.sh lists Colab's preinstalled packages in colab=( ... )"
    return dict(re.findall(r'"([A-Za-z0-9_.-]+)==([0-9.*]+)"', block.group(1)))


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_colab_job_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_the_colab_job_installs_the_versions_the_browser_tests_check_for() -> None:
    pins = _pins()
    for name, wanted in COLAB_WIDGETS.items():
        assert pins.get(name) == wanted, (
            f"ci_colab.sh pins {name}=={pins.get(name)}, the tests expect {wanted}"
        )
    for name, wanted in {"widgetsnbextension": "3.6.10", "ipykernel": "6.17.1", "traitlets": "5.7.1"}.items():
        assert pins.get(name) == wanted  # Colab's (NOTES.md, 2026-08 pip freeze)
    assert '"notebook<7"' in SCRIPT.read_text()  # the classic front end


def test_the_package_is_installed_alone_then_checked_to_have_moved_nothing() -> None:
    script = SCRIPT.read_text()
    install = script.index("pip_install .\n")
    assert script.index('pip_install "${colab[@]}"') < install  # Colab's stack first, as on Colab
    assert "comm -23" in script[install:] and "bitsandbytes" in script[install:]
    assert "tests/e2e/test_colab_e2e.py" in script and "LORA_WIDGETS_COLAB_JOB=1" in script
    assert "unset VIRTUAL_ENV" in script  # NOTES.md: another venv's site-packages would leak into IPython
