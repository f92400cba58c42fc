"""The CI entry point runs the README's test command, the lowest-versions job, then the Colab-stack job.

Run against stand-ins (a README whose test command only echoes, a ci_lowest.sh that only echoes), so the
order and the extraction are checked in a second, without installing anything.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOWEST = ROOT / "scripts" / "ci_lowest.sh"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_ci_run_runs_the_readme_command_then_the_lowest_then_the_colab_job(tmp_path: Path) -> None:
    (tmp_path / ".ci").mkdir()
    shutil.copy(ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"<!-- test-command -->\s*```bash\n(.+?)\n```", readme)
    assert command, "README.md must mark its test command with <!-- test-command -->"
    (tmp_path / "README.md").write_text(readme.replace(command.group(1), "echo README-COMMAND-RAN"))
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "ci_lowest.sh").write_text("echo LOWEST-JOB-RAN\n")
    (tmp_path / "scripts" / "ci_colab.sh").write_text("echo COLAB-JOB-RAN\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "chromium").write_text("#!/bin/sh\n")
    (bin_dir / "chromium").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(
        ["bash", ".ci/run"], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    )
    lines = out.stdout.splitlines()
    order = [lines.index(x) for x in ("README-COMMAND-RAN", "LOWEST-JOB-RAN", "COLAB-JOB-RAN")]
    assert order == sorted(order), out.stdout


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_lowest_versions_job_is_valid_bash_and_runs_the_unit_tests_and_notebook_01() -> None:
    subprocess.run(["bash", "-n", str(LOWEST)], check=True)
    script = LOWEST.read_text()
    assert "--resolution lowest-direct" in script
    assert "notebooks/01_lora_math.ipynb" in script and (ROOT / "notebooks" / "01_lora_math.ipynb").exists()
    for skipped in ("tests/e2e", "tests/test_docs.py", "tests/test_quality.py"):
        assert f"--ignore={skipped}" in script


def test_every_dependency_declares_the_floor_the_lowest_job_checks() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11, as the lowest job needs
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        assert re.match(r"[A-Za-z0-9_.-]+>=[0-9.]+", dep), f"{dep!r} has no '>=' floor for the lowest job"
    assert "ipywidgets>=7.7.1,<9" in deps  # Colab's ipywidgets 7.7.1 stays installed; 8 would break there


def test_the_floor_check_fails_when_an_installed_version_is_not_the_floor() -> None:
    """The check inside ci_lowest.sh, run in this (newest-versions) environment: it must refuse."""
    check = re.search(r"<<'EOF'\n(.+?)\nEOF", LOWEST.read_text(), re.S)
    assert check
    out = subprocess.run([sys.executable, "-c", check.group(1)], cwd=ROOT, capture_output=True, text=True)
    if all("NOT the floor" not in line for line in out.stdout.splitlines()):
        pytest.skip("this environment happens to hold exactly the floors")
    assert out.returncode != 0 and "not the declared floors" in out.stderr
